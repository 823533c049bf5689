"""``nft -j list ruleset`` JSON into the rule model. Pure."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from collectors.netfilter.model import (
    ALL_PROTOS,
    XTABLES_TABLES,
    Chain,
    IpNetwork,
    Match,
    PortRanges,
    Rule,
    Ruleset,
    Table,
    parse_port,
    protocol_set,
)

NFT_FAMILY_LABEL = {"ip": "ipv4", "ip6": "ipv6"}


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
                    NFT_FAMILY_LABEL.get(family, family), "nft", str(body.get("name", ""))
                )
                table.handle = _int(body.get("handle"))
                tables[(family, table.name)] = table
                result.tables.append(table)
            elif kind == "chain":
                owner = tables.get((family, str(body.get("table", ""))))
                if owner is None:
                    continue
                chain = chain_from_json(body)
                owner.chains[chain.name] = chain
            elif kind == "set" or kind == "map":
                elements = body.get("elem")
                key = (family, str(body.get("table", "")), str(body.get("name", "")))
                sets[key] = elements if isinstance(elements, list) else []
                owner = tables.get((family, key[1]))
                if owner is not None:
                    owner.sets[key[2]] = sets[key]
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
        rule_chain.rules.append(rule_from_json(body, len(rule_chain.rules) + 1, owner.sets))
    for (family, name), table in tables.items():
        if family in ("ip", "ip6") and name in XTABLES_TABLES:
            bases = table.base_chains()
            if bases and all(c.name == (c.hook or "").upper() for c in bases):
                table.xtables = True
    return result


def chain_from_json(body: Mapping[str, Any]) -> Chain:
    """A ``chain`` object of ``nft -j`` (its head: hook, policy, priority; no rules)."""
    chain = Chain(str(body.get("name", "")))
    chain.hook = str(body["hook"]) if body.get("hook") else None
    chain.policy = str(body["policy"]).upper() if body.get("policy") else None
    chain.handle = _int(body.get("handle"))
    chain.priority = _int(body.get("prio"))
    chain.type = str(body["type"]) if body.get("type") else None
    return chain


def rule_from_json(
    body: Mapping[str, Any], position: int, sets: Mapping[str, list[Any]]
) -> NftRule:
    """A ``rule`` object of ``nft -j``, the ``position``-th of its chain; ``sets`` are its
    table's named sets and maps."""
    exprs = body.get("expr")
    exprs = exprs if isinstance(exprs, list) else []
    packets, nbytes = _nft_counters(exprs)
    rule = NftRule(str(body.get("chain", "")), position, "", packets, nbytes)
    rule.handle = _int(body.get("handle"))
    rule.expr = tuple(exprs)
    rule.comment = body.get("comment")
    rule.sets = sets
    return rule


@dataclass(slots=True, eq=False)
class NftRule(Rule):
    """An nft rule kept as its expressions; its ``Match`` and text are made on first use
    (kube-proxy's nftables table has tens of thousands of rules the analyses never read)."""

    comment: Any = None
    sets: Mapping[str, list[Any]] = field(default_factory=dict)

    def _parse(self) -> Match:
        try:
            match, text, _, _ = _nft_rule(list(self.expr), self.comment, self.sets)
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError):
            # An expression shape we do not know: kept (the evaluator says it cannot decide
            # it), with no target for the port-53 analysis.
            match, text = Match(), "(not understood)"
        self.text = text
        return match

    def describe(self) -> str:
        if self.parsed is None:
            self.parsed = self._parse()
        return self.text


def _nft_counters(exprs: list[Any]) -> tuple[int, int]:
    for expr in exprs:
        body = expr.get("counter") if isinstance(expr, dict) else None
        if isinstance(body, dict):
            return _int(body.get("packets")) or 0, _int(body.get("bytes")) or 0
    return 0, 0


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _nft_rule(
    exprs: list[Any], comment: Any, sets: Mapping[str, list[Any]]
) -> tuple[Match, str, int, int]:
    values: dict[str, Any] = {}
    parts: list[str] = []
    packets = nbytes = 0
    protocols = set(ALL_PROTOS)
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
            bounds = [parse_port(str(v)) for v in element["range"][:2]]
            if len(bounds) == 2 and bounds[0] is not None and bounds[1] is not None:
                ranges.append((bounds[0], bounds[1]))
        else:
            number = parse_port(str(element))
            if number is not None:
                ranges.append((number, number))
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
        protocols &= protocol_set(names, negated)
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
