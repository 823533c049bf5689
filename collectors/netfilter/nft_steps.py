"""An nft rule (its ``expr`` list as ``nft -j`` prints it) compiled into evaluator steps
(``collectors.netfilter.steps``). Named sets and maps are looked up by their elements as the
dump shows them (indexed once per set). An expression the compiler does not know becomes a
test that cannot be decided, never a silent pass. Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from collectors.netfilter.nft_values import (
    ABSENT,
    PRESENT,
    RANDOM,
    UNKNOWN,
    Flags,
    Sentinel,
    SetIndex,
    build_index,
    element_number,
    equal,
)
from collectors.netfilter.steps import (
    INERT,
    PORT_PROTOS,
    PROTO_NUMBERS,
    Compiled,
    Effect,
    Lookup,
    State,
    Step,
    Test,
    Tri,
    Verdict,
    dnat_to,
    notrack,
    redirect,
    undecided,
)

Getter = Callable[[State], Any]

_INERT_STATEMENTS = frozenset({"counter", "log", "set", "quota_ignored", "ct helper", "ct zone"})


# --------------------------------------------------------------------------- left sides


def getter(expr: Any, family: str) -> Getter | None:
    """How to read ``expr`` (a match's left side, a map key) from a packet; None: unknown."""
    if isinstance(expr, dict) and len(expr) == 1:
        ((key, body),) = expr.items()
        reader = _READERS.get(key)
        if reader is not None:
            return reader(body, family)
    return None


def _payload(body: Any, family: str) -> Getter | None:
    if not isinstance(body, dict):
        return None
    proto, name = str(body.get("protocol", "")), str(body.get("field", ""))
    if proto in ("ip", "ip6"):
        version = "ipv4" if proto == "ip" else "ipv6"
        if name in ("saddr", "daddr"):
            return lambda s: getattr(s, name) if s.family == version else ABSENT
        if name in ("protocol", "nexthdr"):
            return lambda s: s.l4 if s.family == version else ABSENT
        return lambda s: UNKNOWN if s.family == version else ABSENT
    if name in ("dport", "sport"):
        number = PROTO_NUMBERS.get(proto)
        if proto == "th" or number is not None:

            def port(state: State) -> Any:
                if (number is not None and state.l4 != number) or state.l4 not in PORT_PROTOS:
                    return ABSENT
                value = getattr(state, name)
                return UNKNOWN if value is None else value

            return port
    number = PROTO_NUMBERS.get(proto)
    if number is not None:
        return lambda s: UNKNOWN if s.l4 == number else ABSENT
    return None


def _meta(body: Any, family: str) -> Getter | None:
    key = str(body.get("key", "")) if isinstance(body, dict) else ""
    simple: dict[str, Getter] = {
        "l4proto": lambda s: s.l4,
        "nfproto": lambda s: s.family,
        "protocol": lambda s: "ip" if s.family == "ipv4" else "ip6",
        "iifname": lambda s: s.iif if s.iif else "",
        "iif": lambda s: s.iif if s.iif else UNKNOWN,
        "oifname": _oifname,
        "oif": lambda s: s.oif if s.oif else UNKNOWN,
        "mark": lambda s: s.mark,
        "pkttype": lambda s: "multicast" if s.daddr.is_multicast else "host",
    }
    found: Getter = simple.get(key, lambda _s: UNKNOWN)
    return found


def _oifname(state: State) -> Any:
    if state.oif:
        return state.oif
    return "" if state.hook in ("prerouting", "input") else UNKNOWN


def _ct(body: Any, family: str) -> Getter | None:
    key = str(body.get("key", "")) if isinstance(body, dict) else ""
    if key == "state":
        return lambda s: s.ct_seen
    found = _ct_key(key, body.get("dir") is not None)

    def read(state: State) -> Any:
        # An untracked packet has no connection: every ct key but the state fails to load,
        # and the rule does not match (NodeLocal DNSCache's NOTRACK'd queries).
        return ABSENT if state.ct == "untracked" else found(state)

    return read


def _ct_key(key: str, directed: bool) -> Getter:
    if directed:
        return lambda _s: UNKNOWN
    if key == "mark":
        return lambda s: s.ctmark
    if key == "direction":
        return lambda s: "reply" if s.reply else "original"
    if key == "status":
        return _ct_status
    return lambda _s: UNKNOWN


def _ct_status(state: State) -> Any:
    """What the evaluator knows of the connection's status bits: whether it was DNATed (on
    the original direction: an answer's connection may have been), and that SNAT, which
    comes after the filter hooks, has not happened to a new connection yet."""
    if state.reply or state.ct not in ("new",):
        return Flags(frozenset(), frozenset())
    dnat = frozenset({"dnat"})
    if state.dnat:
        return Flags(dnat, frozenset({"snat"}))
    return Flags(frozenset(), dnat | {"snat"})


def _fib(body: Any, family: str) -> Getter | None:
    result = str(body.get("result", "")) if isinstance(body, dict) else ""
    flags = body.get("flags", []) if isinstance(body, dict) else []
    flags = [flags] if isinstance(flags, str) else flags
    if result == "type" and "daddr" in flags:
        return lambda s: s.address_type(s.daddr)
    if result == "type" and "saddr" in flags:
        return lambda s: s.address_type(s.saddr)
    if result == "oif" and "saddr" in flags:
        return lambda _s: PRESENT
    return lambda _s: UNKNOWN


def _binary(op: str) -> Callable[[Any, str], Getter | None]:
    def reader(body: Any, family: str) -> Getter | None:
        if not (isinstance(body, list) and len(body) == 2):
            return None
        inner = getter(body[0], family)
        mask = _flag_number(body[1])
        if inner is None or mask is None:
            return None
        inner_get = inner

        def apply(state: State) -> Any:
            value = inner_get(state)
            if not isinstance(value, int) or isinstance(value, bool):
                return value if isinstance(value, Sentinel) else UNKNOWN
            if op == "&":
                return value & mask
            if op == "|":
                return value | mask
            return value ^ mask

        return apply

    return reader


def _flag_number(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.startswith("0x"):
        try:
            return int(value, 16)
        except ValueError:
            return None
    return None


def _concat(body: Any, family: str) -> Getter | None:
    if not isinstance(body, list):
        return None
    parts = [getter(p, family) for p in body]
    if any(p is None for p in parts):
        return None
    readers = [p for p in parts if p is not None]
    return lambda s: tuple(r(s) for r in readers)


def _random(body: Any, family: str) -> Getter | None:
    return lambda _s: RANDOM


_READERS: dict[str, Callable[[Any, str], Getter | None]] = {
    "payload": _payload,
    "meta": _meta,
    "ct": _ct,
    "fib": _fib,
    "&": _binary("&"),
    "|": _binary("|"),
    "^": _binary("^"),
    "concat": _concat,
    "numgen": _random,
    "jhash": _random,
    "symhash": _random,
}


# --------------------------------------------------------------------------- rules


@dataclass(slots=True)
class NftCompiler:
    """Compiles the rules of one table; ``sets`` are the table's named sets and maps."""

    family: str
    sets: Mapping[str, list[Any]]
    _indexes: dict[tuple[str, bool], SetIndex] = field(default_factory=dict)

    def index(self, name: str, is_map: bool) -> SetIndex | None:
        if name not in self.sets:
            return None
        key = (name, is_map)
        if key not in self._indexes:
            self._indexes[key] = build_index(self.sets[name], is_map)
        return self._indexes[key]

    def compile(self, exprs: tuple[Any, ...]) -> Compiled:
        steps: list[Step] = []
        for expr in exprs:
            if not isinstance(expr, dict) or len(expr) != 1:
                steps.append(undecided(f"expression {expr!r:.60}"))
                continue
            ((key, body),) = expr.items()
            if key == "reject" and self.family == "inet":
                steps.extend(self._inet_reject_guard(body))
            step = self._statement(key, body)
            if step is not None:
                steps.append(step)
        if not any(isinstance(s, (Verdict, Effect, Lookup)) for s in steps):
            return INERT
        return Compiled(tuple(steps))

    def _statement(self, key: str, body: Any) -> Step | None:
        if key == "match" and isinstance(body, dict):
            return self._match(body)
        if key in ("accept", "drop", "return"):
            return Verdict(key, text=key)  # type: ignore[arg-type]
        if key == "reject":
            return self._reject(body)
        if key in ("jump", "goto") and isinstance(body, dict):
            target = str(body.get("target"))
            return Verdict(key, chain=target, text=f"{key} {target}")  # type: ignore[arg-type]
        if key == "continue" or key in _INERT_STATEMENTS:
            return None
        if key == "queue":
            return Verdict("queue", text="queue")
        if key == "vmap" and isinstance(body, dict):
            return self._vmap(body)
        if key == "mangle" and isinstance(body, dict):
            return self._mangle(body)
        if key == "notrack":
            return Effect("notrack", notrack)
        if key in ("dnat", "redirect"):
            return self._dnat(key, body)
        if key in ("snat", "masquerade"):
            return Verdict("accept", text=key)
        if key == "xt" and isinstance(body, dict):
            if body.get("type") == "target":
                return Verdict("unknown", text=f"xt target {body.get('name')}")
            return undecided(f"xt match {body.get('name')}")
        if key in ("limit", "quota", "meter", "connlimit", "synproxy"):
            return undecided(key)
        return Verdict("unknown", text=key)

    def _match(self, body: dict[str, Any]) -> Step:
        op = str(body.get("op", "=="))
        left, right = body.get("left"), body.get("right")
        read = getter(left, self.family)
        text = f"{left!r:.80} {op} {right!r:.80}"
        if read is None:
            return undecided(text)
        contains = self._right(right)
        if contains is None:
            return undecided(text)
        compare = _comparison(op, right)

        def check(state: State) -> Tri:
            value = read(state)
            if value is ABSENT:
                return False
            if compare is not None:
                return compare(value)
            answer = contains(value)
            if op == "!=" and answer is not None:
                return not answer
            return answer

        return Test(text, check, random=False)

    def _right(self, right: Any) -> Callable[[Any], Tri] | None:
        if isinstance(right, str) and right.startswith("@"):
            index = self.index(right[1:], is_map=False)
            if index is None:
                return None
            return lambda value: index.lookup(value)[0]
        if isinstance(right, dict) and isinstance(right.get("set"), list):
            anonymous = build_index(right["set"], is_map=False)
            return lambda value: anonymous.lookup(value)[0]
        if isinstance(right, list):  # flags: any of them
            flags = build_index(right, is_map=False)
            return lambda value: flags.lookup(value)[0]
        return lambda value: equal(value, right)

    def _vmap(self, body: dict[str, Any]) -> Step:
        read = getter(body.get("key"), self.family)
        data = body.get("data")
        name = None
        if isinstance(data, str) and data.startswith("@"):
            name = data[1:]
            index = self.index(name, is_map=True)
        elif isinstance(data, dict) and isinstance(data.get("set"), list):
            index = build_index(data["set"], is_map=True)
        else:
            index = None
        text = f"vmap {data if name else '{…}'}"
        if name is not None and index is None:
            # A map not in the dump (not read): any verdict, or none, may come of it.
            return Verdict("unknown", text=f"{text} (not read)")
        if read is None or index is None:
            return undecided(text)
        found_index = index
        reader = read
        every: list[tuple[Verdict, ...]] = []

        def verdicts() -> tuple[Verdict, ...]:
            """Every verdict the map can give (made once, when a key cannot be decided)."""
            if not every:
                data = [*found_index.exact.values(), *(d for _, d in found_index.others)]
                every.append(tuple(v for v in (_map_verdict(d, name) for d in data) if v))
            return every[0]

        def choose(state: State) -> Verdict | tuple[Verdict, ...] | None:
            value = reader(state)
            if value is ABSENT:
                return None
            found, chosen = found_index.lookup(value)
            if found:
                return _map_verdict(chosen, name)
            if found is None:
                return verdicts()
            return None

        key = body.get("key")
        random = isinstance(key, dict) and any(k in key for k in ("numgen", "jhash", "symhash"))
        return Lookup(text, choose, random=random)

    def _reject(self, body: Any) -> Step:
        kind = str(body.get("type", "")) if isinstance(body, dict) else ""
        text = "reject" + (f" with {kind} {body.get('expr', '')}".rstrip() if kind else "")
        return Verdict("reject", text=text)

    def _inet_reject_guard(self, body: Any) -> list[Step]:
        """In an inet table ``reject with icmp …`` only rejects IPv4 (``icmpv6``: IPv6); the
        listing drops the ``meta nfproto`` it implies."""
        kind = str(body.get("type", "")) if isinstance(body, dict) else ""
        if kind not in ("icmp", "icmpv6"):
            return []
        only = "ipv4" if kind == "icmp" else "ipv6"
        return [Test(f"meta nfproto {only}", lambda s: s.family == only)]

    def _mangle(self, body: dict[str, Any]) -> Step:
        key = body.get("key")
        which = getter(key, self.family)
        value = body.get("value")
        text = f"{key!r:.40} set {value!r:.40}"
        if not (isinstance(key, dict) and which is not None):
            return undecided(text)
        conn = isinstance(key.get("ct"), dict) and key["ct"].get("key") == "mark"
        meta = isinstance(key.get("meta"), dict) and key["meta"].get("key") == "mark"
        if not conn and not meta:
            return Effect(text, lambda s: s)  # a priority, a label…: nothing we follow
        number = _flag_number(value)
        compute = getter(value, self.family) if number is None else None
        if number is None and compute is None:
            return undecided(text)

        def apply(state: State) -> State:
            new = number if number is not None else compute(state)  # type: ignore[misc]
            if not isinstance(new, int):
                return state
            if conn:
                return replace(state, ctmark=new & 0xFFFFFFFF)
            return replace(state, mark=new & 0xFFFFFFFF)

        return Effect(text, apply)

    def _dnat(self, key: str, body: Any) -> Step:
        if not isinstance(body, dict):
            body = {}
        port = body.get("port")
        port_number = port if isinstance(port, int) else None
        if port is not None and port_number is None:
            return Verdict("unknown", text=f"{key} to {port!r:.60}")
        if key == "redirect":
            return Verdict("accept", effect=redirect(port_number), text=f"redirect {port or ''}")
        addr = body.get("addr")
        try:
            address = ipaddress.ip_address(str(addr)) if addr is not None else None
        except ValueError:
            return Verdict("unknown", text=f"dnat to {addr!r:.60}")
        return Verdict("accept", effect=dnat_to(address, port_number), text=f"dnat to {addr}")


def _comparison(op: str, right: Any) -> Callable[[Any], Tri] | None:
    if op not in ("<", ">", "<=", ">="):
        return None
    bound = element_number(right)

    def compare(value: Any) -> Tri:
        if bound is None or not isinstance(value, int):
            return None
        return {"<": value < bound, ">": value > bound, "<=": value <= bound}.get(
            op, value >= bound
        )

    return compare


def _map_verdict(data: Any, name: str | None) -> Verdict | None:
    if isinstance(data, dict) and len(data) == 1:
        ((kind, body),) = data.items()
        if kind in ("jump", "goto") and isinstance(body, dict):
            target = str(body.get("target"))
            return Verdict(kind, chain=target, text=f"{kind} {target}", via_map=name)
        if kind in ("accept", "drop", "return"):
            return Verdict(kind, text=kind, via_map=name)
        if kind == "reject":
            return Verdict("reject", text="reject", via_map=name)
        if kind == "continue":
            return None
    return Verdict("unknown", text=f"map value {data!r:.60}", via_map=name)
