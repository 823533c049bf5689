"""Periodic collectors: the protocol they follow and the small registry that runs them.

Like node_exporter: one module per collector, each owning the metrics it exports (registered
on the registry it is given); one collector's failure never stops the others, and each run
records ``nodediag_collector_success{collector}`` and ``…_duration_seconds{collector}``.

A collector that reads several sources (the firewall: one per save tool) keeps a
:class:`SourceLog` as its ``sources`` attribute (:class:`HasSources`) and records each
source's outcome there; the registry exports them as
``nodediag_collector_source_success{collector,source}``, logs each change once and hands
them on in :class:`CollectorRun`, so a collector that read some sources but not all is
never silent about the others.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol, TypeVar, runtime_checkable

from prometheus_client import Gauge

from collectors.finding import Finding

log = logging.getLogger(__name__)

T = TypeVar("T")

Runner = Callable[[Sequence[str]], str]
"""Runs a command (argv) and returns its stdout; raises CollectorError when it cannot."""


class CollectorError(Exception):
    """A collector cannot do its work (a tool or capability is missing, bad input, …)."""


class ToolNotFound(CollectorError):
    """The command a source runs is not installed."""


class Collector(Protocol):
    """Something read from the node on an interval."""

    name: str
    """Label value of ``nodediag_collector_*{collector}``, e.g. ``firewall``."""

    def collect(self) -> list[Finding]:
        """Read the node once, update the collector's own metrics, return its findings.
        Raises CollectorError (or OSError) when it cannot."""
        ...


SourceStatus = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True, slots=True)
class SourceResult:
    """What became of one source in one run: ``detail`` is the error (``failed``) or why
    it was not read (``skipped``: e.g. the tool is not installed)."""

    source: str
    status: SourceStatus
    detail: str | None = None


class SourceLog:
    """The outcome of each source a collector reads, for the run in progress."""

    def __init__(self) -> None:
        self._results: dict[str, SourceResult] = {}

    def start(self) -> None:
        """A new run: forget the previous run's outcomes."""
        self._results = {}

    def ok(self, source: str) -> None:
        self._results[source] = SourceResult(source, "ok")

    def failed(self, source: str, error: str) -> None:
        self._results[source] = SourceResult(source, "failed", error)

    def skipped(self, source: str, why: str) -> None:
        self._results[source] = SourceResult(source, "skipped", why)

    def read(self, source: str, func: Callable[[], T]) -> T | None:
        """``func()``, recorded as ``source`` read or failed (None when it failed)."""
        try:
            value = func()
        except (CollectorError, OSError) as error:
            self.failed(source, str(error))
            return None
        self.ok(source)
        return value

    def results(self) -> list[SourceResult]:
        return list(self._results.values())


@runtime_checkable
class HasSources(Protocol):
    """A collector that reports the outcome of each of its sources."""

    sources: SourceLog


def run_command(argv: Sequence[str], timeout: float = 30.0) -> str:
    """The default Runner: the command's stdout; CollectorError naming the tool otherwise."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as error:
        raise ToolNotFound(f"{argv[0]} not found") from error
    except subprocess.TimeoutExpired as error:
        raise CollectorError(f"{argv[0]} took more than {timeout:.0f}s") from error
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        raise CollectorError(
            f"{' '.join(argv)} exited with {done.returncode}: {message[-1] if message else ''}"
        )
    return done.stdout


@dataclass
class CollectorRun:
    """The outcome of one collector run."""

    name: str
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    sources: list[SourceResult] = field(default_factory=list)

    @property
    def failed_sources(self) -> list[SourceResult]:
        return [s for s in self.sources if s.status == "failed"]

    def failures(self, node: str) -> list[Finding]:
        """A ``CollectorFailed`` finding (severity ``error``) for the run's failure and for
        each source that failed: what this run could not check."""
        found = [] if self.error is None else [collector_failed(node, self.name, None, self.error)]
        return found + [
            collector_failed(node, self.name, s.source, s.detail or "") for s in self.failed_sources
        ]


def collector_failed(node: str, collector: str, source: str | None, error: str) -> Finding:
    """What nodediag could not check: the whole ``collector`` (``source`` None) or one source."""
    what = (
        f"nodediag's {collector} collector failed"
        if source is None
        else f"nodediag could not read {source} ({collector} collector)"
    )
    return Finding.on_node(
        "CollectorFailed",
        node,
        f"{what}, so what it covers was not checked: {error}",
        {"collector": collector, "source": source, "error": error},
        severity="error",
        time=datetime.now(UTC),
    )


class CollectorSet:
    """Runs collectors, records success and duration, logs each distinct failure once."""

    def __init__(
        self,
        collectors: Sequence[Collector],
        success: Gauge,
        duration: Gauge,
        source_success: Gauge | None = None,
    ) -> None:
        """``success``, ``duration`` and ``source_success`` are the
        ``nodediag_collector_*{collector}`` and ``…_source_success{collector,source}`` gauges."""
        self.collectors = list(collectors)
        self.success = success
        self.duration = duration
        self.source_success = source_success
        self._last_error: dict[str, str | None] = {}
        self._last_skip: dict[str, str] = {}
        self._exported: dict[str, set[str]] = {}

    def run_all(self) -> list[CollectorRun]:
        return [self.run(collector) for collector in self.collectors]

    def run(self, collector: Collector) -> CollectorRun:
        result = CollectorRun(collector.name)
        sources = collector.sources if isinstance(collector, HasSources) else None
        if sources is not None:
            sources.start()
        started = time.perf_counter()
        try:
            result.findings = collector.collect()
        except (CollectorError, OSError) as error:
            result.error = str(error)
        except Exception as error:  # a collector's bug must not take the others down
            log.exception("collector %s crashed", collector.name)
            result.error = f"crashed: {error!r}"
        result.seconds = time.perf_counter() - started
        self.success.labels(collector=collector.name).set(0 if result.error else 1)
        self.duration.labels(collector=collector.name).set(result.seconds)
        self._log_change(f"collector {collector.name}", result.error)
        if sources is not None:
            result.sources = sources.results()
            self._export_sources(collector.name, result.sources)
        return result

    def _export_sources(self, name: str, results: Sequence[SourceResult]) -> None:
        """Sources read (1) or failed (0); a skipped or no longer reported source has none."""
        exported: set[str] = set()
        for result in results:
            what = f"collector {name} source {result.source}"
            if result.status == "skipped":
                self._log_skip(what, result.detail or "")
                continue
            self._log_change(what, result.detail if result.status == "failed" else None, "")
            exported.add(result.source)
            if self.source_success is not None:
                value = 1 if result.status == "ok" else 0
                self.source_success.labels(collector=name, source=result.source).set(value)
        for gone in self._exported.get(name, set()) - exported:
            if self.source_success is not None:
                self.source_success.remove(name, gone)
        self._exported[name] = exported

    def _log_skip(self, what: str, why: str) -> None:
        if self._last_skip.get(what) != why:
            log.info("%s not read: %s", what, why)
        self._last_skip[what] = why
        self._last_error.pop(what, None)

    def _log_change(
        self, what: str, error: str | None, after: str = " (other collectors go on)"
    ) -> None:
        """``what``: ``collector NAME`` or ``collector NAME source SOURCE``."""
        previous = self._last_error.get(what)
        if error and error != previous:
            log.error("%s failed: %s%s", what, error, after)
        elif previous and not error:
            log.info("%s works again", what)
        self._last_error[what] = error
        self._last_skip.pop(what, None)
