"""Firewall rules that drop DNS: parse ``iptables-save -c`` and ``nft -j list ruleset`` into
one rule model, then find the rules that DROP/REJECT port-53 traffic.

Pure: text in, dataclasses out (the I/O is in ``collectors.firewall_collector``).

What counts as a DNS drop (``DnsRuleHit.kind == "drop"``):

- the rule's verdict is DROP or REJECT (nft ``drop``/``reject``, also through a verdict map on
  the destination port), in a chain reached from a base chain (INPUT, OUTPUT, FORWARD,
  PREROUTING, POSTROUTING; nft chains with a hook) through ``-j``/``-g``/``jump``/``goto``
  rules that themselves can pass DNS traffic (the jump path is recorded);
- it can match UDP or TCP (``-p`` absent/``all``/``udp``/``tcp``/``17``/``6``, ``! -p icmp``…);
- its destination port (``--dport``, ``-m multiport --dports/--ports``, nft ``udp/tcp/th
  dport``, ranges, lists, sets, negation) admits 53, or a jump on the way already restricted
  the traffic to port 53; or the rule has no port at all but names a destination (``-d``,
  ``ip daddr``) that covers a cluster DNS IP: dropping everything to the DNS Service drops DNS.
  A rule with neither port nor such a destination (``-p udp -j DROP``, a catch-all, a DROP
  policy) is a blanket rule, not a DNS rule, and is not reported.

kube-proxy's ``"… has no endpoints"`` REJECT is ``kind == "no_endpoints"``
(``DNSNoEndpointsReject``, info). NOTRACK/``CT --notrack``, ACCEPT, DNAT, MARK, RETURN and LOG
rules are never drops, whatever port they name. DROP/REJECT cannot exist in the nat table
(iptables refuses them), so the nat table is never tokenised: with kube-proxy it holds nearly
all of a node's rules.

iptables-nft tables are also visible to ``nft -j list ruleset`` (``table ip filter`` …). A nft
table is taken for iptables-nft's own when it holds ``xt`` expressions, or when it has an
xtables name (filter/nat/mangle/raw/security) in family ip/ip6 and every base chain carries
the xtables name of its hook (``INPUT`` for ``hook input`` …). Such a table is skipped when an
``iptables-save`` output of the nf_tables backend for the same family and table is among the
inputs (that form gives positions, comments and an exact ``iptables -D`` spec); without one it
is analysed from the nft JSON, so nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from collectors.finding import Finding, Severity

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRanges = tuple[tuple[int, int], ...]
Kind = Literal["drop", "no_endpoints"]

DNS_PORT = 53
XTABLES_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
#: Tables where a rule can drop (DROP/REJECT are refused in nat).
DROP_TABLES = frozenset({"filter", "raw", "mangle", "security"})
BASE_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
_ALL_PROTOS = frozenset({"udp", "tcp", "other"})
_DNS_PROTOS = frozenset({"udp", "tcp"})
_PROTO_NAMES = {"udp": "udp", "17": "udp", "tcp": "tcp", "6": "tcp", "all": "all", "0": "all"}
_PORT_NAMES = {"domain": 53, "dns": 53, "domain-s": 853, "mdns": 5353}
_VERDICTS = {"DROP", "REJECT"}
_NO_ENDPOINTS = ("has no endpoints", "has no local endpoints")
_NFT_FAMILY_LABEL = {"ip": "ipv4", "ip6": "ipv6"}
_NFT_FAMILY_KEYWORD = {"ipv4": "ip", "ipv6": "ip6"}
# A token: a double-quoted string (with \" and \\ escapes, as iptables-save prints comments)
# or a run of non-blanks.
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
_UNESCAPE = re.compile(r"\\(.)")
# Counters are 64-bit: at most 20 digits (more would also exceed int()'s digit limit).
_COUNTERS = re.compile(r"^\[(\d{1,20}):(\d{1,20})\]\s*")
_MAX_PATH_VISITS = 20_000


# --------------------------------------------------------------------------- rule model


@dataclass(frozen=True, slots=True)
class Match:
    """What a rule matches, reduced to what matters for DNS.

    ``protocols`` is a subset of {"udp", "tcp", "other"}; ``dports``/``sports`` are inclusive
    ranges (``None``: any port) with a negation flag; ``dst``/``src`` are networks (``None``:
    any address) with a negation flag.
    """

    protocols: frozenset[str] = _ALL_PROTOS
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
        return _admits(self.dports, self.dports_negated, port)


@dataclass(slots=True, eq=False)
class Rule:
    """One rule, in chain order; ``position`` is 1-based (``iptables -L --line-numbers``)."""

    chain: str
    position: int
    text: str
    packets: int = 0
    bytes: int = 0
    handle: int | None = None
    #: nft rules are parsed eagerly; iptables rules on first use (see ``match``).
    parsed: Match | None = None

    @property
    def match(self) -> Match:
        if self.parsed is None:
            self.parsed = parse_iptables_rule(self.text)
        return self.parsed

    @property
    def quick_target(self) -> tuple[str | None, bool]:
        """(target, is_goto) without tokenising the whole rule."""
        if self.parsed is not None:
            return self.parsed.target, self.parsed.goto
        return _quick_target(self.text)


@dataclass(slots=True)
class Chain:
    name: str
    policy: str | None = None
    packets: int = 0
    bytes: int = 0
    hook: str | None = None
    handle: int | None = None
    rules: list[Rule] = field(default_factory=list)


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

    def base_chains(self) -> list[Chain]:
        if self.backend == "nft":
            return [c for c in self.chains.values() if c.hook is not None]
        return [c for c in self.chains.values() if c.name in BASE_CHAINS]


@dataclass(slots=True)
class Ruleset:
    """The tables read from one source (one ``*-save`` output, or one ``nft -j``)."""

    backend: str
    tables: list[Table] = field(default_factory=list)
    #: Lines the source itself printed as warnings ("# Table `x' is incompatible …").
    warnings: list[str] = field(default_factory=list)

    def rule_count(self) -> int:
        return sum(len(c.rules) for t in self.tables for c in t.chains.values())


# --------------------------------------------------------------------------- iptables-save


def _backend_from_header(line: str) -> str:
    if "(nf_tables)" in line:
        return "iptables-nft"
    if "(legacy)" in line or re.search(r"v1\.\d+(\.\d+)?\s+on ", line):
        return "iptables-legacy"
    return "iptables"


def parse_iptables_save(
    text: str,
    *,
    backend: str | None = None,
    family: str | None = None,
    tables: Iterable[str] | None = None,
) -> Ruleset:
    """Parse ``iptables-save [-c]`` / ``ip6tables-save`` (legacy or nft) text.

    ``backend`` (iptables-nft/iptables-legacy) and ``family`` (ipv4/ipv6) default to what the
    ``# Generated by …`` header says (several concatenated outputs are fine). ``tables``
    keeps only these tables' rules (others keep their chain heads and are marked
    ``parsed=False``); their lines are skipped without any other work. Never raises.
    """
    keep = None if tables is None else frozenset(tables)
    result = Ruleset(backend=backend or "iptables")
    current_backend = backend or "iptables"
    current_family = family or "ipv4"
    table: Table | None = None
    skipping = False
    positions: dict[str, int] = {}
    for raw in text.splitlines():
        # The hot loop for a kube-proxy nat table: one comparison per line.
        if skipping and raw[:1] in ("-", "[", ":"):
            continue
        line = raw.strip()
        if not line:
            continue
        head = line[0]
        if head == "#":
            if line.startswith("# Generated by "):
                if backend is None:
                    current_backend = _backend_from_header(line)
                    result.backend = current_backend
                if family is None:
                    current_family = "ipv6" if "ip6tables" in line else "ipv4"
            elif "incompatible" in line or "Warning" in line:
                result.warnings.append(line[1:].strip())
            continue
        if head == "*":
            name = line[1:].strip()
            table = Table(current_family, current_backend, name)
            result.tables.append(table)
            skipping = keep is not None and name not in keep
            table.parsed = not skipping
            positions = {}
            continue
        if line == "COMMIT":
            table = None
            skipping = False
            continue
        if table is None:
            continue
        if head == ":":
            head_chain = _parse_chain_head(line)
            if head_chain is not None:
                table.chains.setdefault(head_chain.name, head_chain)
            continue
        if skipping:
            continue
        packets = nbytes = 0
        if head == "[":
            counters = _COUNTERS.match(line)
            if counters is None:
                continue
            packets, nbytes = int(counters[1]), int(counters[2])
            line = line[counters.end() :]
        if not line.startswith("-A "):
            continue
        chain_name = line[3:].split(" ", 1)[0]
        if not chain_name:
            continue
        position = positions.get(chain_name, 0) + 1
        positions[chain_name] = position
        chain = table.chains.get(chain_name)
        if chain is None:
            chain = table.chains[chain_name] = Chain(chain_name)
        chain.rules.append(Rule(chain_name, position, line, packets, nbytes))
    return result


def _parse_chain_head(line: str) -> Chain | None:
    parts = line[1:].split()
    if not parts:
        return None
    chain = Chain(parts[0])
    if len(parts) > 1 and parts[1] != "-":
        chain.policy = parts[1]
    if len(parts) > 2:
        counters = _COUNTERS.match(parts[2])
        if counters:
            chain.packets, chain.bytes = int(counters[1]), int(counters[2])
    if chain.name in BASE_CHAINS:
        chain.hook = chain.name.lower()
    return chain


def tokenize(text: str) -> list[str]:
    """Split a rule like a POSIX shell would for iptables-save's output (double quotes with
    backslash escapes; a stray quote is taken literally). Never raises."""
    tokens: list[str] = []
    for quoted, bare in _TOKEN.findall(text):
        if bare:
            tokens.append(bare)
        else:
            tokens.append(_UNESCAPE.sub(r"\1", quoted))
    return tokens


def _quick_target(text: str) -> tuple[str | None, bool]:
    j = text.rfind(" -j ")
    g = text.rfind(" -g ")
    at = max(j, g)
    if at < 0:
        if text.startswith("-j ") or text.startswith("-g "):
            at = -1
        else:
            return None, False
    rest = text[at + 4 :].lstrip()
    target = rest.split(" ", 1)[0] if rest else ""
    return (target or None), at == g and g >= 0


def parse_iptables_rule(text: str) -> Match:
    """The ``Match`` of one rule as iptables-save prints it (with or without ``-A CHAIN``).
    Unknown matches are ignored (they can only narrow a rule). Never raises."""
    tokens = tokenize(text)
    values: dict[str, Any] = {}
    negate = False
    i = 0
    n = len(tokens)

    def value() -> tuple[str, bool]:
        nonlocal i
        i += 1
        if i < n and tokens[i] == "!":  # pre-1.4.3 form: "-p ! udp"
            i += 1
            return (tokens[i] if i < n else ""), True
        return (tokens[i] if i < n else ""), False

    while i < n:
        token = tokens[i]
        if token == "!":
            negate = True
            i += 1
            continue
        if token in ("-j", "--jump", "-g", "--goto"):
            target, _ = value()
            values["target"] = target or None
            values["goto"] = token in ("-g", "--goto")
            values["target_args"] = tuple(tokens[i + 1 :])
            break
        if token in ("-A", "--append", "-I", "--insert"):
            value()
        elif token in ("-p", "--protocol"):
            proto, neg = value()
            values["protocols"] = _protocol_set([proto], negate or neg)
        elif token in ("-d", "--destination", "--dst"):
            nets, neg = value()
            values["dst"] = _networks(nets.split(","))
            values["dst_negated"] = negate or neg
        elif token in ("-s", "--source", "--src"):
            nets, neg = value()
            values["src"] = _networks(nets.split(","))
            values["src_negated"] = negate or neg
        elif token in ("-i", "--in-interface"):
            name, neg = value()
            values["in_interface"] = ("!" if negate or neg else "") + name
        elif token in ("-o", "--out-interface"):
            name, neg = value()
            values["out_interface"] = ("!" if negate or neg else "") + name
        elif token in ("--dport", "--destination-port", "--dports", "--destination-ports"):
            ports, neg = value()
            values["dports"] = _port_ranges(ports)
            values["dports_negated"] = negate or neg
        elif token == "--ports":  # multiport: source or destination
            ports, neg = value()
            values["dports"] = _port_ranges(ports)
            values["dports_negated"] = negate or neg
            values["sports"] = values["dports"]
            values["sports_negated"] = negate or neg
        elif token in ("--sport", "--source-port", "--sports", "--source-ports"):
            ports, neg = value()
            values["sports"] = _port_ranges(ports)
            values["sports_negated"] = negate or neg
        elif token == "--comment":
            comment, _ = value()
            values["comment"] = comment
        elif token.startswith("-") and i + 1 < n and not tokens[i + 1].startswith("-"):
            i += 1  # an option we do not need, with its value
        negate = False
        i += 1
    return Match(**values)


def _protocol_set(names: Iterable[str], negated: bool) -> frozenset[str]:
    chosen: set[str] = set()
    for raw in names:
        name = _PROTO_NAMES.get(str(raw).lower(), "other")
        if name == "all":
            chosen |= _ALL_PROTOS
        else:
            chosen.add(name)
    if negated:
        # "! -p udp" leaves tcp and the rest; "! -p icmp" leaves all three ("other" is many).
        return frozenset(p for p in _ALL_PROTOS if p == "other" or p not in chosen)
    return frozenset(chosen)


def _networks(texts: Iterable[str]) -> tuple[IpNetwork, ...] | None:
    nets: list[IpNetwork] = []
    for text in texts:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            continue  # a host name or garbage: cannot be evaluated
    return tuple(nets) or None


def _port(text: str) -> int | None:
    text = text.strip()
    # ASCII digits only (isdigit() alone also takes "²", which int() refuses), and at most
    # the 5 digits of a port (a longer run could exceed int()'s digit limit).
    if text.isascii() and text.isdigit() and len(text) <= 5:
        return int(text)
    return _PORT_NAMES.get(text.lower())


def _port_ranges(text: str) -> PortRanges:
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        if ":" in part:
            low, _, high = part.partition(":")
            lo = _port(low) if low.strip() else 0
            hi = _port(high) if high.strip() else 65535
        else:
            lo = hi = _port(part)
        if lo is not None and hi is not None:
            ranges.append((lo, hi))
    return tuple(ranges)


def _admits(ranges: PortRanges | None, negated: bool, port: int) -> bool:
    if ranges is None:
        return True
    inside = any(lo <= port <= hi for lo, hi in ranges)
    return not inside if negated else inside


# --------------------------------------------------------------------------- nft JSON


def parse_nft_json(text: str) -> Ruleset:
    """Parse ``nft -j list ruleset``. Bad JSON gives an empty ruleset with a warning; odd
    objects are skipped. Never raises."""
    result = Ruleset(backend="nft")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        result.warnings.append(f"not nft JSON: {error}")
        return result
    items = document.get("nftables") if isinstance(document, dict) else None
    if not isinstance(items, list):
        result.warnings.append("no 'nftables' list in the JSON")
        return result
    tables: dict[tuple[str, str], Table] = {}
    sets: dict[tuple[str, str, str], list[Any]] = {}
    rules: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        for kind, body in item.items():
            if not isinstance(body, dict):
                continue
            family = str(body.get("family", ""))
            if kind == "table":
                table = Table(
                    _NFT_FAMILY_LABEL.get(family, family), "nft", str(body.get("name", ""))
                )
                table.handle = _int(body.get("handle"))
                tables[(family, table.name)] = table
                result.tables.append(table)
            elif kind == "chain":
                owner = tables.get((family, str(body.get("table", ""))))
                if owner is None:
                    continue
                chain = Chain(str(body.get("name", "")))
                chain.hook = str(body["hook"]) if body.get("hook") else None
                chain.policy = str(body["policy"]).upper() if body.get("policy") else None
                chain.handle = _int(body.get("handle"))
                owner.chains[chain.name] = chain
            elif kind == "set" or kind == "map":
                elements = body.get("elem")
                key = (family, str(body.get("table", "")), str(body.get("name", "")))
                sets[key] = elements if isinstance(elements, list) else []
            elif kind == "rule":
                rules.append(body)
    for body in rules:
        family = str(body.get("family", ""))
        owner = tables.get((family, str(body.get("table", ""))))
        if owner is None:
            continue
        chain_name = str(body.get("chain", ""))
        rule_chain = owner.chains.setdefault(chain_name, Chain(chain_name))
        exprs = body.get("expr")
        exprs = exprs if isinstance(exprs, list) else []
        if any(isinstance(e, dict) and "xt" in e for e in exprs):
            owner.xtables = True
        table_sets = {k[2]: v for k, v in sets.items() if k[:2] == (family, owner.name)}
        try:
            match, text_, packets, nbytes = _nft_rule(exprs, body.get("comment"), table_sets)
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError):
            continue  # an expression shape we do not know
        rule = Rule(chain_name, len(rule_chain.rules) + 1, text_, packets, nbytes)
        rule.handle = _int(body.get("handle"))
        rule.parsed = match
        rule_chain.rules.append(rule)
    for (family, name), table in tables.items():
        if family in ("ip", "ip6") and name in XTABLES_TABLES:
            bases = table.base_chains()
            if bases and all(c.name == (c.hook or "").upper() for c in bases):
                table.xtables = True
    return result


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _nft_rule(
    exprs: list[Any], comment: Any, sets: Mapping[str, list[Any]]
) -> tuple[Match, str, int, int]:
    values: dict[str, Any] = {}
    parts: list[str] = []
    packets = nbytes = 0
    protocols = set(_ALL_PROTOS)
    for expr in exprs:
        if not isinstance(expr, dict) or len(expr) != 1:
            continue
        ((key, body),) = expr.items()
        if key == "match" and isinstance(body, dict):
            parts.append(_nft_match(body, values, protocols, sets))
        elif key == "counter":
            if isinstance(body, dict):
                packets = _int(body.get("packets")) or 0
                nbytes = _int(body.get("bytes")) or 0
            parts.append("counter")
        elif key in ("drop", "reject", "accept", "return", "queue", "continue"):
            values["target"] = key.upper()
            parts.append(key if key != "reject" else _nft_reject(body))
        elif key in ("jump", "goto") and isinstance(body, dict):
            values["target"] = str(body.get("target"))
            values["goto"] = key == "goto"
            parts.append(f"{key} {body.get('target')}")
        elif key == "vmap" and isinstance(body, dict):
            parts.append(_nft_vmap(body, values, protocols, sets))
        elif key == "xt" and isinstance(body, dict):
            if body.get("type") == "target":
                values["target"] = str(body.get("name"))
            parts.append(f"xt {body.get('type')} {body.get('name')}")
        else:
            parts.append(key if body is None else f"{key} {_nft_value(body)}")
    values["protocols"] = frozenset(protocols)
    if isinstance(comment, str):
        values["comment"] = comment
        parts.append(f'comment "{comment}"')
    return Match(**values), " ".join(parts), packets, nbytes


def _nft_reject(body: Any) -> str:
    if isinstance(body, dict) and body.get("type"):
        return f"reject with {body.get('type')} {body.get('expr', '')}".rstrip()
    return "reject"


def _nft_left(left: Any) -> tuple[str, str]:
    """(kind, text) of a match's left side; kind is dport/sport/proto/daddr/saddr/iif/oif
    or '' for anything else."""
    if isinstance(left, dict) and "payload" in left and isinstance(left["payload"], dict):
        proto = str(left["payload"].get("protocol", ""))
        fld = str(left["payload"].get("field", ""))
        text = f"{proto} {fld}"
        if fld in ("dport", "sport"):
            return f"{fld}:{proto}", text
        if (proto, fld) in (("ip", "protocol"), ("ip6", "nexthdr")):
            return "proto", text
        if fld in ("daddr", "saddr"):
            return fld, text
        return "", text
    if isinstance(left, dict) and "meta" in left and isinstance(left["meta"], dict):
        key = str(left["meta"].get("key", ""))
        if key == "l4proto":
            return "proto", "meta l4proto"
        if key in ("iifname", "oifname"):
            return key[0] + "if", key
        return "", f"meta {key}"
    return "", _nft_value(left)


def _nft_value(value: Any) -> str:
    if isinstance(value, dict):
        if "set" in value and isinstance(value["set"], list):
            return "{ " + ", ".join(_nft_value(v) for v in value["set"]) + " }"
        if "range" in value and isinstance(value["range"], list):
            return "-".join(_nft_value(v) for v in value["range"])
        if "prefix" in value and isinstance(value["prefix"], dict):
            return f"{value['prefix'].get('addr')}/{value['prefix'].get('len')}"
        if "elem" in value and isinstance(value["elem"], dict):
            return _nft_value(value["elem"].get("val"))
        if "concat" in value and isinstance(value["concat"], list):
            return " . ".join(_nft_value(v) for v in value["concat"])
        if len(value) == 1:
            ((key, body),) = value.items()
            return key if body is None else f"{key} {_nft_value(body)}"
        return json.dumps(value, sort_keys=True)
    if isinstance(value, list):
        return " : ".join(_nft_value(v) for v in value)
    if value is None:
        return ""
    return str(value)


def _nft_elements(right: Any, sets: Mapping[str, list[Any]]) -> list[Any]:
    if isinstance(right, str) and right.startswith("@"):
        return list(sets.get(right[1:], []))
    if isinstance(right, dict) and isinstance(right.get("set"), list):
        return list(right["set"])
    return [right]


def _unwrap(element: Any) -> Any:
    if isinstance(element, dict) and isinstance(element.get("elem"), dict):
        return element["elem"].get("val")
    return element


def _nft_ports(elements: Iterable[Any]) -> PortRanges:
    ranges: list[tuple[int, int]] = []
    for raw in elements:
        element = _unwrap(raw)
        if isinstance(element, dict) and isinstance(element.get("range"), list):
            bounds = [_port(str(v)) for v in element["range"][:2]]
            if len(bounds) == 2 and bounds[0] is not None and bounds[1] is not None:
                ranges.append((bounds[0], bounds[1]))
        else:
            port = _port(str(element))
            if port is not None:
                ranges.append((port, port))
    return tuple(ranges)


def _nft_networks(elements: Iterable[Any]) -> tuple[IpNetwork, ...] | None:
    nets: list[IpNetwork] = []
    for raw in elements:
        element = _unwrap(raw)
        try:
            if isinstance(element, dict) and isinstance(element.get("prefix"), dict):
                prefix = element["prefix"]
                nets.append(ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}", False))
            elif isinstance(element, dict) and isinstance(element.get("range"), list):
                low, high = (ipaddress.ip_address(str(v)) for v in element["range"][:2])
                nets.extend(ipaddress.summarize_address_range(low, high))
            elif isinstance(element, str):
                nets.append(ipaddress.ip_network(element, strict=False))
        except (ValueError, TypeError, KeyError):
            continue
    return tuple(nets) or None


def _nft_match(
    body: dict[str, Any], values: dict[str, Any], protocols: set[str], sets: Mapping[str, list[Any]]
) -> str:
    op = str(body.get("op", "=="))
    kind, left_text = _nft_left(body.get("left"))
    right = body.get("right")
    negated = op == "!="
    text = f"{left_text} {'' if op in ('==', 'in') else op + ' '}{_nft_value(right)}"
    if op not in ("==", "in", "!="):
        if kind.startswith("dport") and isinstance(right, int):
            bounds = {"<": (0, right - 1), "<=": (0, right), ">": (right + 1, 65535)}
            bounds[">="] = (right, 65535)
            if op in bounds:
                values["dports"] = (bounds[op],)
        return text
    elements = _nft_elements(right, sets)
    if kind.startswith(("dport:", "sport:")):
        which, proto = kind.split(":", 1)
        if proto in ("udp", "tcp"):
            protocols &= {proto}
        elif proto not in ("th",):  # sctp, dccp, udplite…: not DNS
            protocols &= {"other"}
        values[which + "s"] = _nft_ports(elements)
        values[which + "s_negated"] = negated
    elif kind == "proto":
        names = [str(_unwrap(e)) for e in elements]
        protocols &= _protocol_set(names, negated)
    elif kind in ("daddr", "saddr"):
        side = "dst" if kind == "daddr" else "src"
        values[side] = _nft_networks(elements)
        values[side + "_negated"] = negated
    elif kind in ("iif", "oif"):
        name = ("!" if negated else "") + ",".join(str(_unwrap(e)) for e in elements)
        values["in_interface" if kind == "iif" else "out_interface"] = name
    return text.strip()


def _nft_vmap(
    body: dict[str, Any], values: dict[str, Any], protocols: set[str], sets: Mapping[str, list[Any]]
) -> str:
    kind, left_text = _nft_left(body.get("key"))
    data = body.get("data")
    text = f"{left_text} vmap {_nft_value(data)}"
    if not kind.startswith("dport:"):
        return text
    proto = kind.split(":", 1)[1]
    if proto in ("udp", "tcp"):
        protocols &= {proto}
    entries: list[tuple[PortRanges, str, str | None]] = []
    for element in _nft_elements(data, sets):
        pair = _unwrap(element)
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], dict)):
            continue
        ports = _nft_ports([pair[0]])
        ((verdict, target),) = pair[1].items()
        jump = str(target.get("target")) if isinstance(target, dict) else None
        entries.append((ports, str(verdict).upper(), jump))
    values["port_vmap"] = tuple(entries)
    values["target"] = "VMAP"
    return text


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True, slots=True)
class _Context:
    """What the jumps on the way to a chain already required of the traffic."""

    protocols: frozenset[str] = _ALL_PROTOS
    port53: bool = False
    dst: tuple[tuple[tuple[IpNetwork, ...], bool], ...] = ()


@dataclass(frozen=True, slots=True)
class DnsRuleHit:
    """A rule that drops/rejects DNS, where it is, how traffic gets there and how to remove it."""

    family: str
    backend: str
    table: str
    chain: str
    position: int
    rule_text: str
    target: str
    jump_path: tuple[str, ...]
    packets: int
    bytes: int
    hits_cluster_dns: bool
    kind: Kind
    manager: str | None
    fix: str
    handle: int | None = None
    protocols: tuple[str, ...] = ()
    comment: str | None = None

    @property
    def identity(self) -> tuple[str, str, str, str, str]:
        """Stays the same while the rule exists, whatever is inserted before it."""
        return (self.backend, self.family, self.table, self.chain, self.rule_text)

    @property
    def reason(self) -> str:
        return "DNSDropRule" if self.kind == "drop" else "DNSNoEndpointsReject"

    def to_finding(self, node: str) -> Finding:
        where = f"{self.backend} {self.family} table {self.table} chain {self.chain}"
        path = " -> ".join(self.jump_path)
        counters = f"{self.packets} packets, {self.bytes} bytes"
        if self.kind == "no_endpoints":
            message = (
                f"kube-proxy rejects DNS because the DNS Service has no endpoints: rule "
                f"{self.position} of {where} ({self.rule_text}), reached via {path}, "
                f"{counters}; CoreDNS has no ready pods"
            )
        else:
            dns = " including the cluster DNS IP" if self.hits_cluster_dns else ""
            message = (
                f"firewall rule drops DNS{dns}: rule {self.position} of {where} "
                f"({self.rule_text}), reached via {path}, {counters}; fix: {self.fix}"
            )
        details: dict[str, Any] = {
            "family": self.family,
            "backend": self.backend,
            "table": self.table,
            "chain": self.chain,
            "position": self.position,
            "handle": self.handle,
            "rule": self.rule_text,
            "target": self.target,
            "jump_path": list(self.jump_path),
            "packets": self.packets,
            "bytes": self.bytes,
            "hits_cluster_dns": self.hits_cluster_dns,
            "kind": self.kind,
            "manager": self.manager,
            "fix": self.fix,
            "protocols": list(self.protocols),
            "comment": self.comment,
        }
        severity: Severity = "warning" if self.kind == "drop" else "info"
        return Finding.on_node(self.reason, node, message, details, severity=severity)


def _ip_version(family: str) -> frozenset[int]:
    if family == "ipv4":
        return frozenset({4})
    if family == "ipv6":
        return frozenset({6})
    if family in ("inet", "bridge", "netdev"):
        return frozenset({4, 6})
    return frozenset()


def _admits_ip(nets: tuple[IpNetwork, ...] | None, negated: bool, ip: Any) -> bool:
    if nets is None:
        return True
    inside = any(ip.version == net.version and ip in net for net in nets)
    return not inside if negated else inside


def _specific(nets: tuple[IpNetwork, ...] | None, negated: bool) -> bool:
    return nets is not None and not negated and all(net.prefixlen > 0 for net in nets)


def _narrow(context: _Context, match: Match) -> _Context:
    dst = context.dst
    if match.dst is not None:
        dst = (*dst, (match.dst, match.dst_negated))
    port53 = context.port53 or (match.dports is not None and match.admits_port(DNS_PORT))
    return _Context(context.protocols & match.protocols, port53, dst)


def _passes_dns(context: _Context, match: Match) -> bool:
    """Whether DNS traffic can match this rule (ignoring what the rule does with it)."""
    if not (context.protocols & match.protocols & _DNS_PROTOS):
        return False
    return match.admits_port(DNS_PORT)


def _manager(table: Table, chains: Iterable[str]) -> str | None:
    if table.backend == "nft" and table.name == "firewalld":
        return "firewalld"
    for name in chains:
        if name.startswith(("ufw-", "ufw6-")):
            return "ufw"
        if name.endswith("_direct") or name.startswith(
            ("IN_", "OUT_", "FWDI_", "FWDO_", "FWD_", "PRE_", "POST_", "filter_IN_", "filter_FWD")
        ):
            return "firewalld"
    return None


def _fix(table: Table, rule: Rule, manager: str | None) -> str:
    if manager == "ufw":
        if rule.chain.startswith(("ufw-user-", "ufw6-user-")):
            return (
                "remove it in ufw: `ufw status numbered`, then `ufw delete <number>` of the "
                "rule that denies port 53 (iptables changes are undone by `ufw reload`)"
            )
        return (
            "remove it in ufw: it comes from /etc/ufw/before.rules, after.rules or their "
            "*6.rules; edit the file and run `ufw reload`"
        )
    if manager == "firewalld":
        if rule.chain.endswith("_direct"):
            return (
                "remove it in firewalld: `firewall-cmd --permanent --direct --get-all-rules`, "
                "`firewall-cmd --permanent --direct --remove-rule …` for this rule, then "
                "`firewall-cmd --reload`"
            )
        return (
            "remove it in firewalld: find the zone/policy/rich rule that blocks port 53 "
            "(`firewall-cmd --list-all-zones`), remove it with `--permanent`, then "
            "`firewall-cmd --reload`"
        )
    if table.backend == "nft":
        keyword = _NFT_FAMILY_KEYWORD.get(table.family, table.family)
        handle = rule.handle if rule.handle is not None else "<handle>"
        return f"nft delete rule {keyword} {table.name} {rule.chain} handle {handle}"
    tool = "ip6tables" if table.family == "ipv6" else "iptables"
    if table.backend == "iptables-nft":
        tool += "-nft"
    elif table.backend == "iptables-legacy":
        tool += "-legacy"
    spec = rule.text[3:] if rule.text.startswith("-A ") else rule.text
    return f"{tool} -t {table.name} -D {spec}"


def _tables_to_analyse(rulesets: Iterable[Ruleset]) -> list[Table]:
    rulesets = list(rulesets)
    xtables_seen = {
        (t.family, t.name)
        for rs in rulesets
        for t in rs.tables
        if t.backend in ("iptables-nft", "iptables")
    }
    chosen: list[Table] = []
    for ruleset in rulesets:
        for table in ruleset.tables:
            if table.backend == "nft":
                if table.xtables and (table.family, table.name) in xtables_seen:
                    continue  # the same kernel table, already read through iptables-nft-save
                if table.family in ("ipv4", "ipv6") and table.name == "kube-proxy":
                    continue  # kube-proxy's nftables mode: its own rules, not foreign drops
            elif table.name not in DROP_TABLES or not table.parsed:
                continue
            chosen.append(table)
    return chosen


def dns_rule_hits(rulesets: Iterable[Ruleset], cluster_dns: Sequence[str]) -> list[DnsRuleHit]:
    """Every rule that drops or rejects DNS (see the module doc), each once, in table and
    chain order. ``cluster_dns`` are the cluster DNS Service IPs (and NodeLocal DNSCache's)."""
    dns_ips = []
    for text in cluster_dns:
        try:
            dns_ips.append(ipaddress.ip_address(text))
        except ValueError:
            continue
    hits: list[DnsRuleHit] = []
    for table in _tables_to_analyse(rulesets):
        hits.extend(_table_hits(table, dns_ips))
    return hits


def _table_hits(table: Table, dns_ips: Sequence[Any]) -> Iterator[DnsRuleHit]:
    versions = _ip_version(table.family)
    ips = [ip for ip in dns_ips if ip.version in versions]
    seen: set[int] = set()
    visited: set[tuple[str, _Context]] = set()
    queue: deque[tuple[Chain, tuple[str, ...], _Context]] = deque(
        (chain, (chain.name,), _Context()) for chain in table.base_chains()
    )
    visits = 0
    while queue and visits < _MAX_PATH_VISITS:
        chain, path, context = queue.popleft()
        if (chain.name, context) in visited:
            continue
        visited.add((chain.name, context))
        visits += 1
        for rule in chain.rules:
            target, _ = rule.quick_target
            if target is None:
                continue
            jump = table.chains.get(target) if target not in _VERDICTS else None
            is_verdict = target.upper() in _VERDICTS
            if jump is None and not is_verdict and not (rule.parsed and rule.parsed.port_vmap):
                continue  # ACCEPT, NOTRACK, DNAT, MARK, LOG…: the cheap majority
            match = rule.match
            if not match.target or not _passes_dns(context, match):
                continue
            for verdict, ports in _verdicts(match, match.target):
                if verdict in _VERDICTS:
                    hit = _hit(table, rule, match, verdict, ports, path, context, ips)
                    if hit is not None and id(rule) not in seen:
                        seen.add(id(rule))
                        yield hit
                else:
                    child = table.chains.get(verdict)
                    if child is not None and child.name not in path:
                        narrowed = _narrow(context, match)
                        if ports is not None and any(lo <= DNS_PORT <= hi for lo, hi in ports):
                            narrowed = _Context(narrowed.protocols, True, narrowed.dst)
                        queue.append((child, (*path, child.name), narrowed))


def _verdicts(match: Match, target: str) -> Iterator[tuple[str, PortRanges | None]]:
    if match.port_vmap:
        for ports, verdict, jump in match.port_vmap:
            if any(lo <= DNS_PORT <= hi for lo, hi in ports):
                yield (jump if jump else verdict), ports
        return
    yield (target.upper() if target.upper() in _VERDICTS else target), None


def _hit(
    table: Table,
    rule: Rule,
    match: Match,
    verdict: str,
    vmap_ports: PortRanges | None,
    path: tuple[str, ...],
    context: _Context,
    ips: Sequence[Any],
) -> DnsRuleHit | None:
    dst = list(context.dst)
    if match.dst is not None:
        dst.append((match.dst, match.dst_negated))
    covers = [ip for ip in ips if all(_admits_ip(nets, neg, ip) for nets, neg in dst)]
    specific = any(_specific(nets, neg) for nets, neg in dst)
    port_given = vmap_ports is not None or match.dports is not None or context.port53
    if not port_given and not (specific and covers):
        return None  # a blanket rule (no port, no DNS destination): not a DNS rule
    comment = match.comment
    no_endpoints = comment is not None and any(text in comment for text in _NO_ENDPOINTS)
    manager = None if no_endpoints else _manager(table, (*path, rule.chain))
    return DnsRuleHit(
        family=table.family,
        backend=table.backend,
        table=table.name,
        chain=rule.chain,
        position=rule.position,
        rule_text=rule.text,
        target=verdict,
        jump_path=path,
        packets=rule.packets,
        bytes=rule.bytes,
        hits_cluster_dns=bool(covers),
        kind="no_endpoints" if no_endpoints else "drop",
        manager=manager,
        fix=_fix(table, rule, manager),
        handle=rule.handle,
        protocols=tuple(sorted(context.protocols & match.protocols & _DNS_PROTOS)),
        comment=comment,
    )


# --------------------------------------------------------------------------- nat marks


def nat_marks(text: str) -> dict[str, bool]:
    """Double-NAT context from ``iptables-save`` text: whether kube-proxy's
    ``KUBE-POSTROUTING … MARK --set-xmark 0x4000/0x0`` and flannel's ``FLANNEL-POSTRTG …
    --mark 0x4000/0x4000 … RETURN`` are in a nat table. A substring scan of the nat table."""
    kube = flannel = False
    start = 0
    while True:
        at = text.find("*nat", start)
        if at < 0:
            break
        end = text.find("\nCOMMIT", at)
        section = text[at : end if end >= 0 else len(text)]
        start = at + 4
        for line in section.splitlines():
            if not kube and "-A KUBE-POSTROUTING " in line:
                kube = "MARK --set-xmark 0x4000/0x0" in line
            if not flannel and "-A FLANNEL-POSTRTG " in line:
                flannel = "--mark 0x4000/0x4000" in line and "-j RETURN" in line
        if kube and flannel:
            break
    return {"kube_proxy_masquerade_mark": kube, "flannel_postrouting_return": flannel}
