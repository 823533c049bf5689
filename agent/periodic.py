"""The periodic collectors (firewall, VXLAN offload, DNS probe, node checks) and what their
findings do.

A fault a collector sees stays visible run after run; it is reported when it appears (or
changes) and logged once when it is gone, not every interval.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from agent.metrics import Metrics
from agent.settings import Settings
from collectors.cluster_dns import ClusterDns, discover
from collectors.conntrack import TableFullLog
from collectors.finding import Finding
from collectors.registry import (
    Collector,
    CollectorError,
    CollectorRun,
    CollectorSet,
    SourceLog,
    run_command,
)

if TYPE_CHECKING:
    from collectors.node_facts import PodCidrLookup

log = logging.getLogger(__name__)

Sink = Callable[[Finding], None]
# Details that change from run to run without the fault changing.
VOLATILE_DETAILS = frozenset(
    {"packets", "bytes", "duration_seconds", "checked_at", "latency", "counters"}
)


class ClusterDnsSource:
    """The cluster DNS, re-read each time it is asked (configs change); logs changes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.current: ClusterDns | None = None

    def servers(self) -> Sequence[str]:
        found = discover(self.settings.host_root, self.settings.cluster_dns)
        if found != self.current and found.servers:
            # Unknown is the dns_probe collector's failed source "cluster-dns" (logged there).
            log.info("cluster DNS %s (from %s)", ", ".join(found.servers), found.source)
            for problem in found.problems:
                log.warning("cluster DNS: cannot read %s", problem)
        self.current = found
        return found.servers

    def required(self) -> Sequence[str]:
        """The servers; CollectorError saying why when none is known (the DNS probe then
        cannot run: a thing not checked, not a clean result)."""
        servers = self.servers()
        if not servers:
            raise CollectorError(
                "cluster DNS unknown: " + _unknown(self.current or ClusterDns((), "none"))
            )
        return servers


def _unknown(found: ClusterDns) -> str:
    unreadable = f"; unreadable: {'; '.join(found.problems)}" if found.problems else ""
    return (
        "no kubelet config, K3s/RKE2 config or kubelet flag names it; pass --cluster-dns"
        + unreadable
    )


def build_collectors(
    settings: Settings,
    metrics: Metrics,
    dns: ClusterDnsSource,
    table_full: TableFullLog | None = None,
    node_object: Callable[[], PodCidrLookup] | None = None,
) -> list[Collector]:
    """Every periodic collector, each registering its own metrics. ``table_full``: the
    kernel log's conntrack messages (``run``), for the conntrack collector; ``node_object``:
    this node's pod CIDR from its Node object (a cluster connection), for the DNS flows."""
    from collectors.dns_probe import DnsProbeCollector
    from collectors.firewall_collector import FirewallCollector
    from collectors.node_facts import NodeFactsReader, PodCidrSources
    from collectors.vxlan import VxlanCollector

    registry = metrics.registry
    sources = SourceLog()
    facts = NodeFactsReader(settings.host_root, dns.servers, sources)
    # iptables-save of a kube-proxy-sized nft-backend rule set can take tens of seconds.
    firewall = FirewallCollector(
        settings.node_name,
        dns.servers,
        registry,
        runner=partial(run_command, timeout=120),
        proc=settings.resolve("/proc"),
        facts=PodCidrSources(facts, sources, settings.pod_cidrs, node_object),
        source_log=sources,
    )

    def marks() -> dict[str, bool]:
        # The firewall collector runs first and reads the nat table anyway.
        return firewall.last_nat_marks

    return [
        firewall,
        VxlanCollector(
            settings.node_name,
            registry,
            proc=settings.resolve("/proc"),
            nat_marks=marks,
            fix=settings.fix_vxlan_offload,
        ),
        DnsProbeCollector(settings.node_name, dns.required, registry, name=settings.dns_probe_name),
        *node_check_collectors(settings, registry, table_full),
    ]


def node_check_collectors(
    settings: Settings, registry: CollectorRegistry, table_full: TableFullLog | None
) -> list[Collector]:
    """The node settings that break pod DNS (DESIGN fault 5), sharing one check gauge."""
    from collectors.conntrack import ConntrackCollector
    from collectors.node_checks import check_gauge
    from collectors.node_sysctl import NodeSysctlCollector
    from collectors.overlay_mtu import OverlayMtuCollector
    from collectors.resolver import ResolverCollector

    node, proc, checks = settings.node_name, settings.resolve("/proc"), check_gauge(registry)
    return [
        ConntrackCollector(node, registry, proc=proc, log=table_full),
        NodeSysctlCollector(node, registry, proc=proc, check_ok=checks),
        OverlayMtuCollector(node, registry, check_ok=checks),
        ResolverCollector(node, registry, host_root=settings.host_root, check_ok=checks),
    ]


def finding_key(finding: Finding) -> tuple[Any, ...]:
    """What makes two findings the same fault (counters and timings aside)."""
    stable = tuple(
        sorted((k, repr(v)) for k, v in finding.details.items() if k not in VOLATILE_DETAILS)
    )
    return (finding.reason, finding.subject, stable)


class FindingTracker:
    """Passes on findings that are new since the last run; logs the ones that went away."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._seen: dict[str, dict[tuple[Any, ...], Finding]] = {}

    def update(self, collector: str, findings: list[Finding]) -> None:
        now = {finding_key(f): f for f in findings}
        before = self._seen.get(collector, {})
        for key, finding in now.items():
            if key not in before:
                self.sink(finding)
        for key, finding in before.items():
            if key not in now:
                log.info("resolved: %s on %s", finding.reason, finding.message[:200])
        self._seen[collector] = now


class PeriodicCollectors:
    """Runs the collectors once (``scan``) or on an interval (``run``)."""

    def __init__(
        self, collectors: Sequence[Collector], metrics: Metrics, sink: Sink | None = None
    ) -> None:
        self.set = CollectorSet(
            collectors,
            metrics.collector_success,
            metrics.collector_duration,
            metrics.collector_source_success,
        )
        self.tracker = FindingTracker(sink) if sink is not None else None

    def run_once(self) -> list[CollectorRun]:
        runs = self.set.run_all()
        for run in runs:
            if run.error is None and self.tracker is not None:
                self.tracker.update(run.name, run.findings)
        return runs

    def loop(self, stop: threading.Event, interval: float) -> None:
        while not stop.is_set():
            self.run_once()
            stop.wait(interval)
