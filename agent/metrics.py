"""The agent's Prometheus metrics (names fixed by DESIGN.md) on a registry of its own.

Safety (issue 7): every label value on the registry — the agent's own and the collectors'
— is bounded to :data:`LABEL_LIMIT` characters at exposition time (:class:`BoundedRegistry`,
the one place); ``nodediag_oom_kills_total`` series of pods no longer seen expire after
``oom_series_ttl`` seconds (:meth:`Metrics.expire_oom_series`), and their number is capped
at ``max_oom_series`` (the least recently seen go first). prometheus_client escapes ``\\``,
``"`` and newlines in label values.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric

from agent import __version__
from collectors.finding import Finding, Subject

OOM_REASONS = frozenset(
    {"InvisibleOOMKill", "ContainerOOMKill", "OOMKill", "SystemOOMKill", "NodeProcessOOMKill"}
)
LABEL_LIMIT = 128
"""Longest label value exposed; longer ones keep a prefix and a hash of the whole value."""
OOM_SERIES_TTL = 24 * 3600.0
"""Seconds an OOM series of a pod not seen (no kill, not on the node) is kept."""
MAX_OOM_SERIES = 5000


def bound_label(value: str, limit: int = LABEL_LIMIT) -> str:
    """``value`` if short enough, else a prefix + ``~`` + 8 hex digits of its SHA-1 (so two
    long values sharing a prefix stay two series), ``limit`` characters in all."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return value[: limit - 9] + "~" + digest


class BoundedRegistry(CollectorRegistry):
    """A registry whose exposition bounds every label value (see :func:`bound_label`)."""

    def __init__(self, label_limit: int = LABEL_LIMIT) -> None:
        super().__init__()
        self.label_limit = label_limit

    def collect(self) -> Iterable[Metric]:
        return _bounded(super().collect(), self.label_limit)

    def restricted_registry(self, names: Iterable[str]) -> _BoundedView:  # type: ignore[override]
        """``/metrics?name[]=…`` goes through here: bounded as well."""
        return _BoundedView(super().restricted_registry(names), self.label_limit)


class _Collects(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class _BoundedView:
    def __init__(self, inner: _Collects, limit: int) -> None:
        self.inner = inner
        self.limit = limit

    def collect(self) -> Iterable[Metric]:
        return _bounded(self.inner.collect(), self.limit)


def _bounded(metrics: Iterable[Metric], limit: int) -> Iterator[Metric]:
    for metric in metrics:
        if any(len(v) > limit for s in metric.samples for v in s.labels.values()):
            metric.samples = [
                s._replace(labels={k: bound_label(v, limit) for k, v in s.labels.items()})
                for s in metric.samples
            ]
        yield metric


Labels = tuple[str, str, str, str]  # scope, namespace, pod, container


class _Seen(NamedTuple):
    at: float  # when the series' pod was last seen (a kill, or alive on the node)
    uid: str | None  # the pod's UID, for asking whether it is still on the node


class Metrics:
    """All series the agent exports; ``registry`` is what ``/metrics`` serves."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        oom_series_ttl: float = OOM_SERIES_TTL,
        max_oom_series: int = MAX_OOM_SERIES,
    ) -> None:
        self.registry = registry or BoundedRegistry()
        self._clock = clock
        self.oom_series_ttl = oom_series_ttl
        self.max_oom_series = max_oom_series
        self._oom_lock = threading.Lock()
        self._oom_seen: dict[Labels, _Seen] = {}
        r = self.registry
        self.oom_kills = Counter(
            "nodediag_oom_kills",
            "OOM kills seen in the kernel log, by scope (invisible|container|unknown|system|node).",
            ["scope", "namespace", "pod", "container"],
            registry=r,
        )
        self.kernel_log_records = Counter(
            "nodediag_kernel_log_records", "Kernel log records read.", ["source"], registry=r
        )
        self.kernel_log_lost = Counter(
            "nodediag_kernel_log_lost_records",
            "Kernel log records overwritten before they could be read.",
            ["source"],
            registry=r,
        )
        self.collector_success = Gauge(
            "nodediag_collector_success",
            "Whether the collector's last run succeeded (1) or failed (0).",
            ["collector"],
            registry=r,
        )
        self.collector_source_success = Gauge(
            "nodediag_collector_source_success",
            "Whether the collector could read this source (a tool, a file) in its last run"
            " (1) or not (0); a source that is not there at all has no series.",
            ["collector", "source"],
            registry=r,
        )
        self.collector_duration = Gauge(
            "nodediag_collector_duration_seconds",
            "How long the collector's last run took.",
            ["collector"],
            registry=r,
        )
        self.containerd_lookup_failures = Counter(
            "nodediag_containerd_lookup_failures",
            "containerd lookups that failed: unreachable, or the container was not found.",
            ["reason"],
            registry=r,
        )
        self.build_info = Gauge(
            "nodediag_build_info", "nodediag build; always 1.", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self._lost_seen: dict[str, int] = {}

    def start_source(self, source: str) -> None:
        """Show the source's counters at 0 from the start, not only after a first record."""
        self.kernel_log_records.labels(source=source)
        self.kernel_log_lost.labels(source=source)

    def record_finding(self, finding: Finding, kills: int = 1) -> None:
        if finding.reason in OOM_REASONS:
            self.count_oom(str(finding.details.get("scope", "unknown")), finding.subject, kills)

    def count_oom(self, scope: str, subject: Subject, amount: float = 1) -> None:
        """Raise ``nodediag_oom_kills_total`` for ``subject``: the one way to touch that
        counter, so that its series are bounded (length, expiry, cap)."""
        labels: Labels = (
            bound_label(scope),
            bound_label(subject.namespace or ""),
            bound_label(subject.name if subject.kind == "Pod" and subject.name else ""),
            bound_label(subject.container or ""),
        )
        uid = subject.uid if subject.kind == "Pod" else None
        with self._oom_lock:
            if labels not in self._oom_seen:
                self._make_room(self.max_oom_series - 1)
            self._oom_seen[labels] = _Seen(self._clock(), uid)
            self.oom_kills.labels(*labels).inc(amount)

    @property
    def oom_series(self) -> int:
        with self._oom_lock:
            return len(self._oom_seen)

    def expire_oom_series(self, alive: Callable[[str], bool] | None = None) -> int:
        """Drop the OOM series of pods not seen for ``oom_series_ttl`` seconds; ``alive(uid)``
        (e.g. the pod watch) marks a pod still on the node as seen now. Series without a pod
        (node, system) never expire; the cap still applies. Returns how many were dropped."""
        now = self._clock()
        with self._oom_lock:
            before = len(self._oom_seen)
            for labels, seen in list(self._oom_seen.items()):
                if not labels[2]:
                    continue
                if alive is not None and seen.uid and alive(seen.uid):
                    self._oom_seen[labels] = _Seen(now, seen.uid)
                elif now - seen.at > self.oom_series_ttl:
                    self._drop(labels)
            self._make_room(self.max_oom_series)
            return before - len(self._oom_seen)

    def _make_room(self, keep: int) -> None:
        """Drop the least recently seen series until at most ``keep`` remain (lock held)."""
        excess = len(self._oom_seen) - max(keep, 0)
        if excess > 0:
            oldest = sorted(self._oom_seen.items(), key=lambda item: item[1].at)[:excess]
            for labels, _ in oldest:
                self._drop(labels)

    def _drop(self, labels: Labels) -> None:
        del self._oom_seen[labels]
        with contextlib.suppress(KeyError):
            self.oom_kills.remove(*labels)

    def add_records(self, source: str, count: int) -> None:
        if count:
            self.kernel_log_records.labels(source=source).inc(count)

    def set_lost(self, source: str, total: int) -> None:
        """Raise the lost counter to the source's running total."""
        delta = total - self._lost_seen.get(source, 0)
        if delta > 0:
            self.kernel_log_lost.labels(source=source).inc(delta)
            self._lost_seen[source] = total
