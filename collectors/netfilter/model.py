"""The netfilter rule model shared by the parsers and the analyses: a ``Ruleset`` per source
(one ``*-save`` output or one ``nft -j list ruleset``) holding ``Table``s of ``Chain``s of
``Rule``s, and the ``Match`` of a rule. Also the value parsers both rule syntaxes share
(protocols, ports, networks). Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRanges = tuple[tuple[int, int], ...]

DNS_PORT = 53
XTABLES_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
#: Tables where a rule can drop (DROP/REJECT are refused in nat).
DROP_TABLES = frozenset({"filter", "raw", "mangle", "security"})
BASE_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
ALL_PROTOS = frozenset({"udp", "tcp", "other"})
DNS_PROTOS = frozenset({"udp", "tcp"})
_PROTO_NAMES = {"udp": "udp", "17": "udp", "tcp": "tcp", "6": "tcp", "all": "all", "0": "all"}
_PORT_NAMES = {"domain": 53, "dns": 53, "domain-s": 853, "mdns": 5353}

# --------------------------------------------------------------------------- rule model


_V = TypeVar("_V")


class OnDemand(dict[str, _V]):
    """A dict whose entries ``__missing__`` makes when first asked for (the lazily read
    chains and sets). ``get``, ``values`` and ``items`` go through it: dict's own do not
    call ``__missing__``."""

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def values(self) -> Any:
        return [self[name] for name in self]

    def items(self) -> Any:
        return [(name, self[name]) for name in self]


@dataclass(frozen=True, slots=True)
class Match:
    """What a rule matches, reduced to what matters for DNS.

    ``protocols`` is a subset of {"udp", "tcp", "other"}; ``dports``/``sports`` are inclusive
    ranges (``None``: any port) with a negation flag; ``dst``/``src`` are networks (``None``:
    any address) with a negation flag.
    """

    protocols: frozenset[str] = ALL_PROTOS
    dports: PortRanges | None = None
    dports_negated: bool = False
    sports: PortRanges | None = None
    sports_negated: bool = False
    dst: tuple[IpNetwork, ...] | None = None
    dst_negated: bool = False
    src: tuple[IpNetwork, ...] | None = None
    src_negated: bool = False
    in_interface: str | None = None
    out_interface: str | None = None
    comment: str | None = None
    target: str | None = None
    target_args: tuple[str, ...] = ()
    goto: bool = False
    #: nft verdict map on the destination port: (ports, verdict, jump target) per element.
    port_vmap: tuple[tuple[PortRanges, str, str | None], ...] = ()

    def admits_port(self, port: int) -> bool:
        return admits_ports(self.dports, self.dports_negated, port)


@dataclass(slots=True, eq=False)
class Rule:
    """One rule, in chain order; ``position`` is 1-based (``iptables -L --line-numbers``).
    ``parsed`` is set by the nft parser; iptables rules are parsed on first use (see
    ``collectors.netfilter.iptables.IptablesRule``)."""

    chain: str
    position: int
    text: str
    packets: int = 0
    bytes: int = 0
    handle: int | None = None
    parsed: Match | None = None
    #: nft rules: the rule's ``expr`` list as ``nft -j`` printed it (for the flow evaluator).
    expr: tuple[Any, ...] = ()

    @property
    def match(self) -> Match:
        if self.parsed is None:
            self.parsed = self._parse()
        return self.parsed

    def _parse(self) -> Match:
        return Match()

    def describe(self) -> str:
        """The rule's text (nft rules render it on first use)."""
        return self.text

    @property
    def quick_target(self) -> tuple[str | None, bool]:
        """(target, is_goto) without tokenising the whole rule."""
        if self.parsed is not None:
            return self.parsed.target, self.parsed.goto
        return self.match.target, self.match.goto


@dataclass(slots=True)
class Chain:
    name: str
    policy: str | None = None
    packets: int = 0
    bytes: int = 0
    hook: str | None = None
    handle: int | None = None
    rules: list[Rule] = field(default_factory=list)
    #: nft base chains: the declared priority and type (filter, nat, route).
    priority: int | None = None
    type: str | None = None


@dataclass(slots=True)
class Table:
    """One table of one backend; ``family`` is ipv4/ipv6 for iptables, the nft family
    (ipv4/ipv6/inet/arp/bridge/netdev) for nft."""

    family: str
    backend: str
    name: str
    chains: dict[str, Chain] = field(default_factory=dict)
    handle: int | None = None
    parsed: bool = True
    """False when the parser skipped the table's rules (only chain heads were kept)."""
    xtables: bool = False
    """For nft tables: the table looks like iptables-nft's own (see the module doc)."""
    sets: dict[str, list[Any]] = field(default_factory=dict)
    """For nft tables: the elements of each named set and map, as ``nft -j`` printed them."""

    def base_chains(self) -> list[Chain]:
        if self.backend == "nft":
            hooked = getattr(self.chains, "hooked", None)  # read lazily: only the base chains
            if hooked is not None:
                return list(hooked())
            return [c for c in self.chains.values() if c.hook is not None]
        return [self.chains[name] for name in BASE_CHAINS if name in self.chains]


@dataclass(slots=True)
class Ruleset:
    """The tables read from one source (one ``*-save`` output, or one ``nft -j``)."""

    backend: str
    tables: list[Table] = field(default_factory=list)
    #: Lines the source itself printed as warnings ("# Table `x' is incompatible …").
    warnings: list[str] = field(default_factory=list)
    #: ``ipset save``: set name → its ``IpSet`` (``collectors.netfilter.ipset``).
    ipsets: dict[str, Any] = field(default_factory=dict)


def distinct_tables(rulesets: Iterable[Ruleset]) -> list[Table]:
    """Every table once: an nft table that is iptables-nft's own (``Table.xtables``) is left
    out when an ``iptables-save`` of the same family and name is among the rulesets (the same
    kernel table, with positions and comments)."""
    rulesets = list(rulesets)
    xtables_seen = {
        (t.family, t.name)
        for rs in rulesets
        for t in rs.tables
        if t.backend in ("iptables-nft", "iptables")
    }
    return [
        table
        for ruleset in rulesets
        for table in ruleset.tables
        if not (
            table.backend == "nft" and table.xtables and (table.family, table.name) in xtables_seen
        )
    ]


def protocol_set(names: Iterable[str], negated: bool) -> frozenset[str]:
    chosen: set[str] = set()
    for raw in names:
        name = _PROTO_NAMES.get(str(raw).lower(), "other")
        if name == "all":
            chosen |= ALL_PROTOS
        else:
            chosen.add(name)
    if negated:
        # "! -p udp" leaves tcp and the rest; "! -p icmp" leaves all three ("other" is many).
        return frozenset(p for p in ALL_PROTOS if p == "other" or p not in chosen)
    return frozenset(chosen)


def networks(texts: Iterable[str]) -> tuple[IpNetwork, ...] | None:
    nets: list[IpNetwork] = []
    for text in texts:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            continue  # a host name or garbage: cannot be evaluated
    return tuple(nets) or None


def parse_port(text: str) -> int | None:
    text = text.strip()
    # ASCII digits only (isdigit() alone also takes "²", which int() refuses), and at most
    # the 5 digits of a port (a longer run could exceed int()'s digit limit).
    if text.isascii() and text.isdigit() and len(text) <= 5:
        return int(text)
    return _PORT_NAMES.get(text.lower())


def port_ranges(text: str) -> PortRanges:
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        if ":" in part:
            low, _, high = part.partition(":")
            lo = parse_port(low) if low.strip() else 0
            hi = parse_port(high) if high.strip() else 65535
        else:
            lo = hi = parse_port(part)
        if lo is not None and hi is not None:
            ranges.append((lo, hi))
    return tuple(ranges)


def admits_ports(ranges: PortRanges | None, negated: bool, port: int) -> bool:
    if ranges is None:
        return True
    inside = any(lo <= port <= hi for lo, hi in ranges)
    return not inside if negated else inside
