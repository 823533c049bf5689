"""The firewall collector: reads the node's rules (``firewall_reader``) and reports the ones
that drop DNS, and with the node's network (``facts``) the verdicts of the DNS flows.

I/O only; the parsing and analysis are in ``collectors.netfilter``. The lazy reads
(iptables-nft piece by piece, big native nft tables over netlink) are not one snapshot: when
the ruleset's generation moved while they and the analyses ran (kube-proxy resyncing), the
rules are read again; when it moved again, every table is read whole (``iptables-save -c``,
``nft -j``: each a snapshot) and the lazy sources say why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from collectors.finding import Finding
from collectors.firewall_reader import (
    LEGACY_TABLE_NAMES,
    NETLINK_MIN_CHAINS,
    SOURCES,
    RuleReader,
    Source,
    host_netlink,
)
from collectors.netfilter.dns_rules import DnsRuleHit, dns_rule_hits
from collectors.netfilter.evaluate import FlowVerdict, evaluate
from collectors.netfilter.flow_findings import flow_findings, with_flows
from collectors.netfilter.flows import Flow, NodeFacts, dns_flows
from collectors.netfilter.iptables import nat_marks, parse_iptables_save
from collectors.netfilter.model import DROP_TABLES, Ruleset
from collectors.netfilter.nft import parse_nft_json
from collectors.netfilter.nft_netlink_tables import NetlinkTables
from collectors.netfilter.nft_netlink_types import NetlinkFallback
from collectors.registry import Runner, SourceLog, collector_failed, run_command

if TYPE_CHECKING:
    from collectors.netfilter.nft_socket import NftDumps

log = logging.getLogger(__name__)

__all__ = [
    "LEGACY_TABLE_NAMES",
    "NETLINK_MIN_CHAINS",
    "SOURCES",
    "FirewallCollector",
    "Source",
    "findings_from_files",
    "host_netlink",
    "nat_marks",
]


#: Reads with lazy parts that may see the rules change under them before every table is
#: read whole instead.
READ_ATTEMPTS = 2

#: What reads a lazily read source's tables whole (one snapshot each).
WHOLE_READS = {"nft-netlink": "nft -j", "ip6tables-nft": "ip6tables-save -c"}


class FirewallCollector:
    """Reports ``DNSDropRule`` / ``DNSNoEndpointsReject`` findings and the
    ``nodediag_dns_drop_rules`` / ``nodediag_dns_dropped_packets_total`` metrics; with
    ``facts`` (the node's network, for the DNS flows) also ``DNSFlowBlocked`` and
    ``nodediag_dns_flow_ok``."""

    name = "firewall"

    def __init__(
        self,
        node: str,
        cluster_dns: Callable[[], Sequence[str]],
        registry: CollectorRegistry,
        runner: Runner = run_command,
        sources: Sequence[Source] = SOURCES,
        proc: Path = Path("/proc"),
        facts: Callable[[], NodeFacts] | None = None,
        nft_netlink: Callable[[], NftDumps] | None = host_netlink,
        netlink_min_chains: int = NETLINK_MIN_CHAINS,
        source_log: SourceLog | None = None,
    ) -> None:
        """``proc``: where ``net/ip_tables_names`` tells whether legacy tables exist when
        ``iptables-legacy-save`` is not installed; ``nft_netlink`` opens nf_tables over
        netlink, for the ruleset's generation and the big native nft tables (None: read
        every native table with nft, iptables-nft unchecked);
        ``source_log``: shared with ``facts`` when they record sources of their own."""
        self.node = node
        self.facts = facts
        self.cluster_dns = cluster_dns
        self.drop_rules = Gauge(
            "nodediag_dns_drop_rules",
            "Firewall rules that drop or reject DNS (port 53) traffic, found by the last scan.",
            ["family", "table", "chain", "target"],
            registry=registry,
        )
        self.dropped_packets = Counter(
            "nodediag_dns_dropped_packets",
            "Packets dropped or rejected by firewall rules that drop DNS, from rule counters.",
            ["family", "table", "chain"],
            registry=registry,
        )
        self.flow_ok = Gauge(
            "nodediag_dns_flow_ok",
            "1 when a flow the cluster's DNS needs passes this node's firewall, 0 when it is "
            "dropped or may be; no series for a flow whose inputs are unknown.",
            ["flow", "family"],
            registry=registry,
        )
        self._flow_labels: set[tuple[str, str]] = set()
        self._unknown_flows: dict[tuple[str, str], str] = {}
        self.last_verdicts: list[FlowVerdict] = []
        self._gauge_labels: set[tuple[str, str, str, str]] = set()
        self._last_packets: dict[tuple[str, str, str, str, str], int] = {}
        self.last_hits: list[DnsRuleHit] = []
        self.sources = source_log or SourceLog()
        self.netlink = NetlinkTables(nft_netlink, netlink_min_chains)
        self.reader = RuleReader(
            runner, sources, proc, facts is not None, self.netlink, self.sources
        )

    @property
    def last_nat_marks(self) -> dict[str, bool]:
        """kube-proxy's and flannel's double-NAT marks seen by the last read (vxlan)."""
        return self.reader.last_nat_marks

    @property
    def netlink_reads(self) -> list[str]:
        """What the last run read over netlink ("ip kube-proxy chain services", "… set …")."""
        return self.netlink.reads if self.netlink.tables else []

    def collect(self) -> list[Finding]:
        self.sources.start()  # once a run: ``facts`` records sources into it too
        try:
            hits, verdicts = self._read_and_analyse()
        finally:
            self.netlink.close()
        self.last_hits = hits
        self._update_metrics(hits)
        if verdicts is None:
            return [hit.to_finding(self.node) for hit in hits]
        self.last_verdicts = verdicts
        self._update_flow_metrics(verdicts)
        return findings_with_flows(hits, verdicts, self.node)

    def _read_and_analyse(self) -> tuple[list[DnsRuleHit], list[FlowVerdict] | None]:
        """The rules read and analysed. The lazy reads are checked against the ruleset's
        generation after the analyses (which make the lazy reads): when it moved (kube-proxy
        wrote), the rules are read again; when it moved again, every table is read whole."""
        cluster_dns = self.cluster_dns()
        flows = dns_flows(self.facts()) if self.facts is not None else None
        lazy: list[str] = []
        for attempt in range(READ_ATTEMPTS):
            found = self._analyse(self.reader.read(), cluster_dns, flows)
            if self.reader.unchanged():
                return found
            lazy = self.reader.lazy_sources()
            if attempt + 1 < READ_ATTEMPTS:
                log.info("the rules changed while read by %s: read again", ", ".join(lazy))
        found = self._analyse(self.reader.read(snapshot=True), cluster_dns, flows)
        for source in lazy:
            whole = WHOLE_READS.get(source, "iptables-save -c")
            why = f"the rules changed while being read ({READ_ATTEMPTS} times); read with {whole}"
            self.sources.skipped(source, why)
        return found

    def _analyse(
        self, rulesets: list[Ruleset], cluster_dns: Sequence[str], flows: list[Flow] | None
    ) -> tuple[list[DnsRuleHit], list[FlowVerdict] | None]:
        """The port-53 rules and (with ``facts``) the flows' verdicts; a table the netlink
        reader gives up on is read with nft and the analyses start again."""
        while True:
            try:
                hits = dns_rule_hits(rulesets, cluster_dns)
                if flows is None:
                    return hits, None
                return hits, evaluate(rulesets, flows)
            except NetlinkFallback as fallback:
                self.reader.fall_back(rulesets, fallback)

    def _update_flow_metrics(self, verdicts: Sequence[FlowVerdict]) -> None:
        """``nodediag_dns_flow_ok``; a flow whose inputs are unknown has no series and is
        logged (once per change of why)."""
        labels: set[tuple[str, str]] = set()
        unknown: dict[tuple[str, str], str] = {}
        for verdict in verdicts:
            key = (verdict.flow.name, str(verdict.flow.family))
            if verdict.verdict == "unknown":
                unknown[key] = verdict.reason
                continue
            labels.add(key)
            self.flow_ok.labels(*key).set(1 if verdict.verdict == "pass" else 0)
        for stale in self._flow_labels - labels:
            self.flow_ok.remove(*stale)
        self._flow_labels = labels
        for key, reason in unknown.items():
            if self._unknown_flows.get(key) != reason:
                log.warning("DNS flow %s (%s) not evaluated: %s", *key, reason)
        self._unknown_flows = unknown

    def _update_metrics(self, hits: Sequence[DnsRuleHit]) -> None:
        counts: dict[tuple[str, str, str, str], int] = {}
        packets: dict[tuple[str, str, str, str, str], int] = {}
        for hit in hits:
            if hit.kind != "drop":
                continue
            labels = (hit.family, hit.table, hit.chain, hit.target)
            counts[labels] = counts.get(labels, 0) + 1
            # Two identical rules in one chain have one identity: add their counters up.
            packets[hit.identity] = packets.get(hit.identity, 0) + hit.packets
        for labels, count in counts.items():
            self.drop_rules.labels(*labels).set(count)
        for stale in self._gauge_labels - counts.keys():
            self.drop_rules.remove(*stale)
        self._gauge_labels = set(counts)
        for identity, now in packets.items():
            before = self._last_packets.get(identity)
            # First sight: everything the rule has counted so far. A decrease is a new rule
            # (or zeroed counters): the counter starts again from its new value.
            delta = now if before is None or now < before else now - before
            _backend, family, table, chain, _text = identity
            counter = self.dropped_packets.labels(family, table, chain)
            if delta:
                counter.inc(delta)
        self._last_packets = packets


def findings_from_files(
    iptables_save: str | None,
    nft_json: str | None,
    cluster_dns: Sequence[str],
    node: str,
    facts: NodeFacts | None = None,
) -> list[Finding]:
    """Findings from a support bundle: ``iptables_save`` is the *text* of ``iptables-save -c``
    output (ipv4 and/or ipv6, either backend, several concatenated outputs are fine) and
    ``nft_json`` the text of ``nft -j list ruleset`` (the CLI reads the files). A text that
    is not what it should be (empty is fine: no rules) gives a ``CollectorFailed`` finding
    (source ``--iptables-save`` or ``--nft-json``) instead of silence."""
    rulesets: list[Ruleset] = []
    unreadable: list[Finding] = []
    if iptables_save is not None:
        ruleset = (
            parse_iptables_save(iptables_save, lazy=("nat",))
            if facts
            else parse_iptables_save(iptables_save, tables=DROP_TABLES)
        )
        if not ruleset.tables and iptables_save.strip():
            why = "no table (no '*filter' line): not iptables-save output"
            unreadable.append(collector_failed(node, "firewall", "--iptables-save", why))
        rulesets.append(ruleset)
    if nft_json is not None:
        ruleset = parse_nft_json(nft_json)
        if not ruleset.tables and ruleset.warnings:
            why = f"not `nft -j list ruleset` output: {ruleset.warnings[0]}"
            unreadable.append(collector_failed(node, "firewall", "--nft-json", why))
        rulesets.append(ruleset)
    hits = dns_rule_hits(rulesets, cluster_dns)
    if facts is None:
        return [hit.to_finding(node) for hit in hits] + unreadable
    verdicts = evaluate(rulesets, dns_flows(facts))
    for verdict in verdicts:
        if verdict.verdict == "unknown":
            log.warning(
                "DNS flow %s (%s) not evaluated: %s",
                verdict.flow.name,
                verdict.flow.family,
                verdict.reason,
            )
    return findings_with_flows(hits, verdicts, node) + unreadable


def findings_with_flows(
    hits: Sequence[DnsRuleHit], verdicts: Sequence[FlowVerdict], node: str
) -> list[Finding]:
    """The port-53 rule findings (each with the flows it stops) and the flow findings."""
    flow_found, stopped = flow_findings(verdicts, hits, node)
    return [with_flows(hit.to_finding(node), hit, stopped) for hit in hits] + flow_found
