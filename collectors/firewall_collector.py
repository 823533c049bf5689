"""The firewall collector: reads the node's rules and reports the ones that drop DNS.

I/O only; the parsing and analysis are in ``collectors.netfilter``. It runs whichever of
``iptables-save -c``, ``ip6tables-save -c``, ``iptables-legacy-save -c``,
``ip6tables-legacy-save -c`` and ``nft -j list ruleset`` exist (never ``iptables -L``, which
takes the xtables lock, and never ``-t`` with the legacy save, which creates tables); when
iptables-nft-save has shown tables, nft lists only the other tables (``nft -j list chains``,
then ``nft -j list table FAMILY NAME``), since nft needs about a minute to print a
kube-proxy-sized iptables-nft table as JSON.

A native nft table of ``netlink_min_chains`` chains or more (kube-proxy's nftables mode:
about four chains per Service) is not printed by nft at all: nft 1.0.6 fetches every set of
a table it touches, one anonymous verdict map per Service included, so each command on such
a table costs seconds. Its chains and sets are read over netlink instead, only those the
analyses reach (``collectors.netfilter.nft_netlink_table``); if any of them holds something
that reader does not understand, the table is read with ``nft -j list table`` after all and
the source ``nft-netlink`` says why.

Each tool is a source (``nodediag_collector_source_success{collector="firewall",source=TOOL}``):
a missing tool is skipped, a tool that fails is named (reading rules needs CAP_NET_ADMIN;
``iptables-legacy-save`` also CAP_NET_RAW) and the others are still read; when none works
the run fails with one line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from collectors.finding import Finding
from collectors.netfilter.dns_rules import DnsRuleHit, dns_rule_hits
from collectors.netfilter.evaluate import FlowVerdict, evaluate
from collectors.netfilter.flow_findings import flow_findings, with_flows
from collectors.netfilter.flows import NodeFacts, dns_flows
from collectors.netfilter.ipset import parse_ipset_save
from collectors.netfilter.iptables import nat_marks, parse_iptables_save
from collectors.netfilter.model import DROP_TABLES, Ruleset, Table
from collectors.netfilter.nft import parse_nft_json
from collectors.netfilter.nft_netlink_tables import NetlinkTables
from collectors.netfilter.nft_netlink_types import NetlinkFallback
from collectors.netfilter.xtables_nft import (
    FetchedChains,
    save_text,
    spec_to_save,
    xtables_chains,
)
from collectors.registry import (
    CollectorError,
    Runner,
    SourceLog,
    ToolNotFound,
    collector_failed,
    run_command,
)

if TYPE_CHECKING:
    from collectors.netfilter.nft_socket import NftDumps

log = logging.getLogger(__name__)

__all__ = ["SOURCES", "FirewallCollector", "Source", "findings_from_files", "nat_marks"]


#: Native nft tables with this many chains or more are read over netlink (the analyses need
#: a few of their chains; nft would fetch all their sets). Smaller ones with ``nft -j``.
NETLINK_MIN_CHAINS = 100


#: Reads over netlink that may see the rules change under them before nft reads instead.
NETLINK_ATTEMPTS = 2


def host_netlink() -> NftDumps:
    """nf_tables over netlink in this network namespace (pyroute2 is loaded only now)."""
    from collectors.netfilter.nft_socket import NftNetlink

    return NftNetlink()


LEGACY_TABLE_NAMES = {"ipv4": "ip_tables_names", "ipv6": "ip6_tables_names"}
"""Files in /proc/net listing the legacy (x_tables) tables the kernel holds, by family."""


@dataclass(frozen=True, slots=True)
class Source:
    """One command that prints rules, and how to read its output."""

    argv: tuple[str, ...]
    backend: str | None
    family: str | None

    @property
    def tool(self) -> str:
        return self.argv[0]

    def explain(self, error: str) -> str:
        """``error`` and the capabilities reading needs, when it is a permission error."""
        if "Permission denied" not in error and "Operation not permitted" not in error:
            return error
        if self.backend == "iptables-legacy":
            return f"{error} (needs CAP_NET_ADMIN and CAP_NET_RAW: it opens a raw socket)"
        return f"{error} (needs CAP_NET_ADMIN)"


SOURCES: tuple[Source, ...] = (
    Source(("iptables-save", "-c"), None, "ipv4"),
    Source(("ip6tables-save", "-c"), None, "ipv6"),
    Source(("iptables-legacy-save", "-c"), "iptables-legacy", "ipv4"),
    Source(("ip6tables-legacy-save", "-c"), "iptables-legacy", "ipv6"),
    Source(("nft", "-j", "list", "ruleset"), "nft", None),
    # The members of the ipsets iptables rules match on (Calico, kube-proxy's IPVS mode).
    Source(("ipset", "save"), "ipset", None),
)


def _parse(source: Source, text: str, nat: bool = False) -> Ruleset:
    """``nat``: keep the nat table's rules too (the flow evaluator follows the Service DNAT)."""
    if source.backend == "nft":
        return parse_nft_json(text)
    if source.backend == "ipset":
        return Ruleset(backend="ipset", ipsets=dict(parse_ipset_save(text)))
    if not nat:
        return parse_iptables_save(
            text, backend=source.backend, family=source.family, tables=DROP_TABLES
        )
    # kube-proxy's nat table holds nearly all rules; the flows need few of its chains.
    return parse_iptables_save(text, backend=source.backend, family=source.family, lazy=("nat",))


def _drop_duplicates(read: list[tuple[Source, Ruleset]]) -> list[Ruleset]:
    """``iptables-save`` may be the legacy one (update-alternatives, old distributions); its
    tables are then read again by ``iptables-legacy-save``: keep only that copy."""
    legacy = {s.family for s, _ in read if s.backend == "iptables-legacy"}
    return [
        ruleset
        for source, ruleset in read
        if not (
            source.backend is None
            and ruleset.backend == "iptables-legacy"
            and source.family in legacy
        )
    ]


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
        netlink for the big native nft tables (None: read every table with nft);
        ``source_log``: shared with ``facts`` when they record sources of their own."""
        self.node = node
        self.proc = proc
        self.facts = facts
        self.cluster_dns = cluster_dns
        self.runner = runner
        self.rule_sources = tuple(sources)
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
        self.last_nat_marks: dict[str, bool] = {}
        self.sources = source_log or SourceLog()
        self._listing: str | None = None
        self._listing_items: list[Any] | None = None
        self._listing_error: CollectorError | OSError | None = None
        self.netlink = NetlinkTables(nft_netlink, netlink_min_chains)
        self._netlink_made: list[Table] = []

    @property
    def netlink_reads(self) -> list[str]:
        """What the last run read over netlink ("ip kube-proxy chain services", "… set …")."""
        return self.netlink.reads if self.netlink.tables else []

    def read(self, netlink: bool = True) -> list[Ruleset]:
        """Run every source that exists, recording each one's outcome in ``sources``;
        CollectorError when none could be read. ``netlink``: big native nft tables may be
        read over netlink."""
        read: list[tuple[Source, Ruleset]] = []
        errors: list[str] = []
        self.last_nat_marks = {}
        self.sources.start()
        self._listing = None
        self._listing_items = None
        self._listing_error = None
        self.netlink.start(netlink)
        self._netlink_made = []
        for source in self.rule_sources:
            if source.backend == "ipset" and self.facts is None:
                continue  # only the flow evaluator needs set members
            if source.backend is None and source.family is not None:
                piecewise = self._read_xtables_nft(source.family)
                if piecewise is not None:
                    read.append((source, piecewise))
                    self.sources.skipped(source.tool, "read table by table with iptables-nft")
                    continue
            try:
                ruleset, text = self._read_one(source, [r for _, r in read])
            except ToolNotFound as error:
                self._not_installed(source)
                errors.append(str(error))
                continue
            except (CollectorError, OSError) as error:  # OSError: the tool could not start
                self.sources.failed(source.tool, source.explain(str(error)))
                errors.append(str(error))
                continue
            self.sources.ok(source.tool)
            if source.backend != "nft" and source.family == "ipv4":
                marks = nat_marks(text)
                for key, value in marks.items():
                    self.last_nat_marks[key] = self.last_nat_marks.get(key, False) or value
            read.append((source, ruleset))
        rulesets = _drop_duplicates(read)
        if not any(r.backend != "ipset" for r in rulesets):
            missing = all(e.endswith("not found") for e in errors)
            why = "none of them is installed" if missing else "reading rules needs CAP_NET_ADMIN"
            tools = ", ".join(s.tool for s in self.rule_sources)
            raise CollectorError(f"cannot read firewall rules ({tools}): {why}: {errors[-1]}")
        return rulesets

    def _chain_listing(self) -> str | None:
        """``nft -j list chains`` (once per run): the tables and their chains; None when nft
        cannot list them."""
        if self._listing is None:
            try:
                self._listing = self.runner(("nft", "-j", "list", "chains"))
            except (CollectorError, OSError) as error:
                self._listing = ""
                self._listing_error = error
        return self._listing or None

    def _listed_chains(self) -> list[Any]:
        """The items of ``nft -j list chains``, decoded once per run (4 MB of JSON with
        kube-proxy's nftables mode at 10,000 Services); ValueError when it is not JSON."""
        if self._listing_items is None:
            listing = self._chain_listing()
            items = json.loads(listing or "{}").get("nftables", [])
            self._listing_items = items if isinstance(items, list) else []
        return self._listing_items

    def _read_xtables_nft(self, family: str) -> Ruleset | None:
        """The iptables-nft tables of ``family`` read piece by piece (``xtables_nft``); None
        when they cannot be (no nft or iptables-nft, or no such tables): then the caller
        reads ``iptables-save -c`` whole."""
        listing = self._chain_listing()
        tool = "iptables-nft" if family == "ipv4" else "ip6tables-nft"
        try:
            tables = xtables_chains(self._listed_chains(), family) if listing else {}
        except (ValueError, AttributeError, TypeError):
            return None
        if not tables:
            return None
        ruleset = Ruleset(backend="iptables-nft")
        try:
            for name, chains in tables.items():
                if name == "nat":
                    ruleset.tables.append(self._nat_table(tool, family, chains))
                else:
                    spec = self.runner((tool, "-t", name, "-S", "-v"))
                    text = save_text(name, spec)
                    parsed = parse_iptables_save(text, backend="iptables-nft", family=family)
                    ruleset.tables.extend(parsed.tables)
        except ToolNotFound:
            return None
        except (CollectorError, OSError) as error:
            self.sources.failed(tool, Source((tool,), "iptables-nft", family).explain(str(error)))
            return None
        self.sources.ok(tool)
        return ruleset

    def _nat_table(self, tool: str, family: str, names: Sequence[str]) -> Table:
        """The nat table, its chains read when first needed; the base chains and the two
        chains of the double-NAT marks now (a base chain that cannot be read fails the
        source: no base chain is silently left out)."""

        def fetch(chain: str) -> list[str] | None:
            try:
                return spec_to_save(self.runner((tool, "-t", "nat", "-S", chain, "-v")))
            except (CollectorError, OSError) as error:
                self.sources.failed(tool, f"chain {chain} of table nat not read: {error}")
                return None

        chains = FetchedChains(names, fetch)
        table = Table(family, "iptables-nft", "nat", chains=chains)
        for name in chains.base_names():
            if name not in chains:
                raise CollectorError(f"{tool} -t nat -S {name} failed")
        if family == "ipv4":
            marked = [c for c in ("KUBE-POSTROUTING", "FLANNEL-POSTRTG") if c in chains]
            text = "*nat\n" + "".join(f"{r.text}\n" for name in marked for r in chains[name].rules)
            for key, value in nat_marks(text + "COMMIT\n").items():
                self.last_nat_marks[key] = self.last_nat_marks.get(key, False) or value
        return table

    def _not_installed(self, source: Source) -> None:
        """Skipped, unless the kernel holds tables only this tool could have shown."""
        names = LEGACY_TABLE_NAMES.get(source.family or "")
        tables: list[str] = []
        if source.backend == "iptables-legacy" and names:
            try:
                tables = (self.proc / "net" / names).read_text().split()
            except OSError:
                tables = []  # cannot tell: as if there were none
        if tables:
            self.sources.failed(
                source.tool,
                f"not installed, but the kernel holds legacy tables ({', '.join(tables)} in"
                f" /proc/net/{names}): their rules are not read",
            )
        else:
            self.sources.skipped(source.tool, "not installed")

    def _read_one(self, source: Source, before: Sequence[Ruleset]) -> tuple[Ruleset, str]:
        """One source's rules and raw text; CollectorError when its output is not rules."""
        if source.backend == "nft":
            text = self._read_nft(source, before)
        else:
            text = self.runner(source.argv)
        ruleset = _parse(source, text, nat=self.facts is not None)
        if source.backend == "nft" and not ruleset.tables and ruleset.warnings:
            raise CollectorError(f"{source.tool} printed no rules: {ruleset.warnings[0]}")
        if source.backend == "nft":
            ruleset.tables.extend(self._netlink_made)
        return ruleset, text

    def _read_nft(self, source: Source, iptables: Sequence[Ruleset]) -> str:
        """``nft -j list ruleset``, without the tables iptables-nft-save has already shown:
        nft translating a kube-proxy-sized iptables-nft table to JSON takes about a minute
        (see bench/firewall.py). When some are covered, ``nft -j list chains`` (to learn the
        tables) and then ``nft -j list table FAMILY NAME`` for each table that is not."""
        covered = {
            ("ip6" if t.family == "ipv6" else "ip", t.name)
            for ruleset in iptables
            for t in ruleset.tables
            if t.backend == "iptables-nft"
        }
        try:
            big = self._netlink_candidates(covered)
            if not covered and not big:
                return self.runner(source.argv)
            text = self._list_tables(source, covered | set(big))
        except (ValueError, AttributeError, TypeError) as error:
            raise CollectorError(f"{source.tool} -j printed unexpected JSON: {error}") from error
        if big:
            self._netlink_made = self.netlink.make(big)
            self.sources.ok("nft-netlink")
        return text

    def _netlink_candidates(self, covered: set[tuple[str, str]]) -> dict[Any, list[Any]]:
        """The tables to read over netlink, with their chains' objects; none when nf_tables
        cannot be asked over netlink (said in the ``nft-netlink`` source): nft reads them."""
        if self.netlink.opener is None or not self.netlink.enabled:
            return {}
        chosen = self.netlink.choose(self._listed_chains(), covered)
        if not chosen:
            return {}
        try:
            self.netlink.open()
        except OSError as error:
            self.sources.skipped("nft-netlink", f"nf_tables over netlink: {error}; read with nft")
            return {}
        return chosen

    def _fall_back(self, rulesets: list[Ruleset], fallback: NetlinkFallback) -> None:
        """Read the table the netlink reader gave up on with ``nft -j list table``."""
        table = self.netlink.tables.pop((fallback.family, fallback.name))
        self.sources.skipped("nft-netlink", f"{fallback}; read with nft -j instead")
        argv = ("nft", "-j", "list", "table", fallback.family, fallback.name)
        parsed = parse_nft_json(self.runner(argv))
        if not parsed.tables:
            why = parsed.warnings[0] if parsed.warnings else "no table"
            raise CollectorError(f"{' '.join(argv)}: {why}")
        for ruleset in rulesets:
            if table in ruleset.tables:
                at = ruleset.tables.index(table)
                ruleset.tables[at : at + 1] = parsed.tables

    def _list_tables(self, source: Source, covered: set[tuple[str, str]]) -> str:
        # "list chains" names every table that has a chain (a table without chains has no
        # rules) and is fast; "list tables" makes nft read every rule first.
        if self._chain_listing() is None:
            if self._listing_error is not None:
                raise self._listing_error
            raise CollectorError(f"{source.tool} -j list chains printed nothing")
        tables: dict[tuple[str, str], None] = {}
        for item in self._listed_chains():
            chain = item.get("chain") if isinstance(item, dict) else None
            if isinstance(chain, dict):
                tables[(str(chain.get("family")), str(chain.get("table")))] = None
        items: list[Any] = []
        for family, name in tables:
            if (family, name) in covered:
                continue
            one = json.loads(self.runner((source.tool, "-j", "list", "table", family, name)))
            items.extend(i for i in one.get("nftables", []) if "metainfo" not in i)
        return json.dumps({"nftables": items})

    def collect(self) -> list[Finding]:
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
        """The rules read and analysed. Tables read over netlink are not one snapshot: when
        the ruleset's generation moved during the run (kube-proxy wrote), read again; when
        it moved again, read every table with nft (nft retries until it has a snapshot)."""
        for _attempt in range(NETLINK_ATTEMPTS):
            found = self._analyse(self.read())
            if not self.netlink.tables or self.netlink.unchanged():
                return found
        found = self._analyse(self.read(netlink=False))
        why = f"the rules changed while being read ({NETLINK_ATTEMPTS} times); read with nft -j"
        self.sources.skipped("nft-netlink", why)
        return found

    def _analyse(
        self, rulesets: list[Ruleset]
    ) -> tuple[list[DnsRuleHit], list[FlowVerdict] | None]:
        """The port-53 rules and (with ``facts``) the flows' verdicts; a table the netlink
        reader gives up on is read with nft and the analyses start again."""
        while True:
            try:
                hits = dns_rule_hits(rulesets, self.cluster_dns())
                if self.facts is None:
                    return hits, None
                return hits, evaluate(rulesets, dns_flows(self.facts()))
            except NetlinkFallback as fallback:
                self._fall_back(rulesets, fallback)

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
