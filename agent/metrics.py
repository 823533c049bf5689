"""The agent's Prometheus metrics (names fixed by DESIGN.md) on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from agent import __version__
from collectors.finding import Finding

OOM_REASONS = frozenset(
    {"InvisibleOOMKill", "ContainerOOMKill", "OOMKill", "SystemOOMKill", "NodeProcessOOMKill"}
)


class Metrics:
    """All series the agent exports; ``registry`` is what ``/metrics`` serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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

    def record_finding(self, finding: Finding) -> None:
        if finding.reason in OOM_REASONS:
            subject = finding.subject
            self.oom_kills.labels(
                scope=str(finding.details.get("scope", "unknown")),
                namespace=subject.namespace or "",
                pod=subject.name if subject.kind == "Pod" and subject.name else "",
                container=subject.container or "",
            ).inc()

    def add_records(self, source: str, count: int) -> None:
        if count:
            self.kernel_log_records.labels(source=source).inc(count)

    def set_lost(self, source: str, total: int) -> None:
        """Raise the lost counter to the source's running total."""
        delta = total - self._lost_seen.get(source, 0)
        if delta > 0:
            self.kernel_log_lost.labels(source=source).inc(delta)
            self._lost_seen[source] = total
