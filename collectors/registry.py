"""Periodic collectors: the protocol they follow and the small registry that runs them.

Like node_exporter: one module per collector, each owning the metrics it exports (registered
on the registry it is given); one collector's failure never stops the others, and each run
records ``nodediag_collector_success{collector}`` and ``…_duration_seconds{collector}``.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Gauge

from collectors.finding import Finding

log = logging.getLogger(__name__)

Runner = Callable[[Sequence[str]], str]
"""Runs a command (argv) and returns its stdout; raises CollectorError when it cannot."""


class CollectorError(Exception):
    """A collector cannot do its work (a tool or capability is missing, bad input, …)."""


class Collector(Protocol):
    """Something read from the node on an interval."""

    name: str
    """Label value of ``nodediag_collector_*{collector}``, e.g. ``firewall``."""

    def collect(self) -> list[Finding]:
        """Read the node once, update the collector's own metrics, return its findings.
        Raises CollectorError (or OSError) when it cannot."""
        ...


def run_command(argv: Sequence[str], timeout: float = 30.0) -> str:
    """The default Runner: the command's stdout; CollectorError naming the tool otherwise."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as error:
        raise CollectorError(f"{argv[0]} not found") from error
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


class CollectorSet:
    """Runs collectors, records success and duration, logs each distinct failure once."""

    def __init__(self, collectors: Sequence[Collector], success: Gauge, duration: Gauge) -> None:
        """``success`` and ``duration`` are the ``nodediag_collector_*{collector}`` gauges."""
        self.collectors = list(collectors)
        self.success = success
        self.duration = duration
        self._last_error: dict[str, str | None] = {}

    def run_all(self) -> list[CollectorRun]:
        return [self.run(collector) for collector in self.collectors]

    def run(self, collector: Collector) -> CollectorRun:
        result = CollectorRun(collector.name)
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
        self._log_change(collector.name, result.error)
        return result

    def _log_change(self, name: str, error: str | None) -> None:
        previous = self._last_error.get(name)
        if error and error != previous:
            log.error("collector %s failed: %s (other collectors go on)", name, error)
        elif previous and not error:
            log.info("collector %s works again", name)
        self._last_error[name] = error
