"""Reading the node's firewall rules for the firewall collector (``firewall_collector``).

It runs whichever of ``iptables-save -c``, ``ip6tables-save -c``, ``iptables-legacy-save -c``,
``ip6tables-legacy-save -c`` and ``nft -j list ruleset`` exist (never ``iptables -L``, which
takes the xtables lock, and never ``-t`` with the legacy save, which creates tables); when
iptables-nft-save has shown tables, nft lists only the other tables (``nft -j list chains``,
then ``nft -j list table FAMILY NAME``), since nft needs about a minute to print a
kube-proxy-sized iptables-nft table as JSON.

iptables-nft's tables are read piece by piece (``collectors.netfilter.xtables_nft``): their
chains from ``nft -j list chains``, each table but nat with ``iptables-nft -t TABLE -S -v``,
nat's chains when the analyses first reach them. A native nft table of ``netlink_min_chains``
chains or more (kube-proxy's nftables mode: about four chains per Service) is read over
netlink, only the chains and sets the analyses reach (``collectors.netfilter.nft_netlink_table``);
if any of them holds something that reader does not understand, the table is read with
``nft -j list table`` after all and the source ``nft-netlink`` says why.

Neither lazy read is one snapshot: the ruleset's generation is noted before the first read
(over the same netlink connection) and compared after the analyses (``unchanged``); the
collector decides what to do when it moved (``snapshot=True``: every table read whole).

Each tool is a source (``nodediag_collector_source_success{collector="firewall",source=TOOL}``):
a missing tool is skipped, a tool that fails is named (reading rules needs CAP_NET_ADMIN;
``iptables-legacy-save`` also CAP_NET_RAW) and the others are still read; when none works
the read fails with one line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from collectors.pyroute2_import import pyroute2_imports
from collectors.registry import CollectorError, Runner, SourceLog, ToolNotFound

if TYPE_CHECKING:
    from collectors.netfilter.nft_socket import NftDumps

log = logging.getLogger(__name__)

#: Native nft tables with this many chains or more are read over netlink (the analyses need
#: a few of their chains; nft would fetch all their sets). Smaller ones with ``nft -j``.
NETLINK_MIN_CHAINS = 100

LEGACY_TABLE_NAMES = {"ipv4": "ip_tables_names", "ipv6": "ip6_tables_names"}
"""Files in /proc/net listing the legacy (x_tables) tables the kernel holds, by family."""

XTABLES_NFT_TOOLS = {"ipv4": "iptables-nft", "ipv6": "ip6tables-nft"}


def host_netlink() -> NftDumps:
    """nf_tables over netlink in this network namespace (pyroute2 is loaded only now)."""
    with pyroute2_imports():
        from collectors.netfilter.nft_socket import NftNetlink

    return NftNetlink()


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


class RuleReader:
    """The rules of every source, each outcome recorded in ``sources``. ``flows``: the DNS
    flows are evaluated (the nat table and ipsets are needed); ``proc``: where
    ``net/ip_tables_names`` tells whether legacy tables exist when ``iptables-legacy-save``
    is not installed; ``netlink``: the connection to nf_tables (big native nft tables, the
    ruleset's generation)."""

    def __init__(
        self,
        runner: Runner,
        sources: Sequence[Source],
        proc: Path,
        flows: bool,
        netlink: NetlinkTables,
        source_log: SourceLog,
    ) -> None:
        self.runner = runner
        self.rule_sources = tuple(sources)
        self.proc = proc
        self.flows = flows
        self.netlink = netlink
        self.sources = source_log
        self.last_nat_marks: dict[str, bool] = {}
        #: The tools of the last read that read iptables-nft tables piece by piece.
        self.piecewise: list[str] = []
        self._snapshot = False
        self._unchecked_said = False
        self._listing: str | None = None
        self._listing_items: list[Any] | None = None
        self._listing_error: CollectorError | OSError | None = None
        self._netlink_made: list[Table] = []

    def read(self, snapshot: bool = False) -> list[Ruleset]:
        """Run every source that exists; CollectorError when none could be read.
        ``snapshot``: every table read whole (no piecewise or netlink reads)."""
        read: list[tuple[Source, Ruleset]] = []
        errors: list[str] = []
        self.last_nat_marks = {}
        self._snapshot = snapshot
        self._listing = None
        self._listing_items = None
        self._listing_error = None
        self.netlink.start(not snapshot)
        self._netlink_made = []
        self.piecewise = []
        for source in self.rule_sources:
            if source.backend == "ipset" and not self.flows:
                continue  # only the flow evaluator needs set members
            if source.backend is None and source.family is not None and not snapshot:
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
                self._add_marks(text)
            read.append((source, ruleset))
        rulesets = _drop_duplicates(read)
        if not any(r.backend != "ipset" for r in rulesets):
            missing = all(e.endswith("not found") for e in errors)
            why = "none of them is installed" if missing else "reading rules needs CAP_NET_ADMIN"
            tools = ", ".join(s.tool for s in self.rule_sources)
            raise CollectorError(f"cannot read firewall rules ({tools}): {why}: {errors[-1]}")
        return rulesets

    def lazy_sources(self) -> list[str]:
        """The sources of the last read that were not read as one snapshot."""
        return self.piecewise + (["nft-netlink"] if self.netlink.tables else [])

    def unchanged(self) -> bool:
        """Whether the lazy reads of the last read (and the analyses that made them) saw one
        ruleset: the generation noted before the first read is still the ruleset's. True
        when nothing was read lazily, or when the generation could not be noted (said once:
        iptables-nft is then read unchecked, as before)."""
        if not self.lazy_sources():
            return True
        error = self.netlink.error  # then no table was read over netlink either
        if error is None:
            try:
                return self.netlink.unchanged()
            except OSError as asking:
                error = asking
        self._say_unchecked(error)
        return True

    def _say_unchecked(self, error: OSError) -> None:
        if not self._unchecked_said:
            log.warning(
                "%s read piece by piece without a consistency check (the ruleset's generation"
                " over netlink: %s): rules changed during a read (kube-proxy syncing) may give"
                " one interval's wrong verdict",
                " and ".join(self.lazy_sources()),
                error,
            )
        self._unchecked_said = True

    def _add_marks(self, text: str) -> None:
        for key, value in nat_marks(text).items():
            self.last_nat_marks[key] = self.last_nat_marks.get(key, False) or value

    def _chain_listing(self) -> str | None:
        """``nft -j list chains`` (once per read): the tables and their chains; None when nft
        cannot list them. The ruleset's generation is noted first: every lazy read starts
        from this listing."""
        if self._listing is None:
            if not self._snapshot:
                self.netlink.note()
            try:
                self._listing = self.runner(("nft", "-j", "list", "chains"))
            except (CollectorError, OSError) as error:
                self._listing = ""
                self._listing_error = error
        return self._listing or None

    def _listed_chains(self) -> list[Any]:
        """The items of ``nft -j list chains``, decoded once per read (4 MB of JSON with
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
        tool = XTABLES_NFT_TOOLS[family]
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
        self.piecewise.append(tool)
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
            self._add_marks(text + "COMMIT\n")
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
        ruleset = _parse(source, text, nat=self.flows)
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

    def fall_back(self, rulesets: list[Ruleset], fallback: NetlinkFallback) -> None:
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
