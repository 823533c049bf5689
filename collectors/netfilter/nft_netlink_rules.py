"""An nft rule as the kernel hands it over netlink (``NFT_MSG_NEWRULE``: a list of register
expressions: ``payload``/``meta``/``ct`` load a register, ``bitwise`` masks it, ``cmp``,
``range`` and ``lookup`` compare it, ``immediate`` sets a verdict…) turned into the statements
``nft -j`` prints for it, which ``collectors.netfilter.nft`` reads. Like nft, a protocol match
that only makes a later header field possible (``meta l4proto udp`` before ``udp dport``,
``meta nfproto ipv4`` before ``ip saddr`` in an inet table) is folded into that field.

A well-defined subset: matches on ip/ip6 addresses (prefixes), protocol, ports, icmp types,
``meta`` l4proto/nfproto/protocol/iifname/oifname/mark/pkttype, ``ct`` state/status/mark;
``&``/``|``/``^`` on marks; named and anonymous sets and verdict maps (concatenations too);
verdicts; counter, log, limit, notrack, mark and ct mark set, numgen, dnat/snat/masquerade/
redirect to literal addresses and ports, reject. Anything else raises ``NotUnderstood``.
Decoding uses pyroute2's message classes. Pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from pyroute2.netlink.nfnetlink.nftsocket import (  # type: ignore[import-untyped]
    nft_chain_msg,
    nft_rule_msg,
)

from collectors.netfilter.nft_netlink_state import (
    L3_NAMES,
    Loaded,
    RuleState,
    SetSource,
    attr_value,
    attr_verdict,
    load,
    raw_attrs,
    read_register,
    register,
    use_context,
)
from collectors.netfilter.nft_netlink_statements import STATEMENTS
from collectors.netfilter.nft_netlink_types import (
    CT_STATE_BITS,
    CT_STATUS_BITS,
    HEADER_NAMES,
    TYPE_BOOLEAN,
    TYPE_CT_DIR,
    TYPE_CT_STATE,
    TYPE_CT_STATUS,
    TYPE_FIB_ADDR,
    TYPE_ICMP6_TYPE,
    TYPE_ICMP_TYPE,
    TYPE_IFINDEX,
    TYPE_IFNAME,
    TYPE_INET_PROTOCOL,
    TYPE_INET_SERVICE,
    TYPE_INTEGER,
    TYPE_IP6ADDR,
    TYPE_IPADDR,
    TYPE_MARK,
    TYPE_NFPROTO,
    TYPE_PKTTYPE,
    TYPE_VERDICT_MAP,
    NotUnderstood,
    be_int,
    flag_names,
    host_int,
    one_or_list,
    render,
)

NFT_FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
#: The netfilter hooks of the ip, ip6 and inet families.
_HOOKS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}
_CMP_OPS = {
    "NFT_CMP_EQ": "==",
    "NFT_CMP_NEQ": "!=",
    "NFT_CMP_LT": "<",
    "NFT_CMP_LTE": "<=",
    "NFT_CMP_GT": ">",
    "NFT_CMP_GTE": ">=",
}
#: (offset, bytes) of a header field: (name, data type); addresses may be loaded in part (a
#: prefix of whole bytes).
_NETWORK_FIELDS = {
    "ip": {(12, 4): ("saddr", TYPE_IPADDR), (16, 4): ("daddr", TYPE_IPADDR),
           (9, 1): ("protocol", TYPE_INET_PROTOCOL)},
    "ip6": {(8, 16): ("saddr", TYPE_IP6ADDR), (24, 16): ("daddr", TYPE_IP6ADDR),
            (6, 1): ("nexthdr", TYPE_INET_PROTOCOL)},
}  # fmt: skip
_META_KEYS = {
    "NFT_META_L4PROTO": ("l4proto", TYPE_INET_PROTOCOL),
    "NFT_META_NFPROTO": ("nfproto", TYPE_NFPROTO),
    "NFT_META_IIFNAME": ("iifname", TYPE_IFNAME),
    "NFT_META_OIFNAME": ("oifname", TYPE_IFNAME),
    "NFT_META_IIF": ("iif", TYPE_IFINDEX),
    "NFT_META_OIF": ("oif", TYPE_IFINDEX),
    "NFT_META_MARK": ("mark", TYPE_MARK),
    "NFT_META_PKTTYPE": ("pkttype", TYPE_PKTTYPE),
}
_CT_KEYS = {
    "NFT_CT_STATE": ("state", TYPE_CT_STATE),
    "NFT_CT_STATUS": ("status", TYPE_CT_STATUS),
    "NFT_CT_MARK": ("mark", TYPE_MARK),
    "NFT_CT_DIRECTION": ("direction", TYPE_CT_DIR),
}
_NFTA_FIB_RESULT = 2
_NFTA_FIB_FLAGS = 3
_FIB_F_PRESENT = 32
_FIB_FLAGS = ((1, "saddr"), (2, "daddr"), (4, "mark"), (8, "iif"), (16, "oif"))


def decode_rule(data: bytes, sets: SetSource) -> dict[str, Any]:
    """One ``NFT_MSG_NEWRULE`` message as the rule object ``nft -j`` prints."""
    msg = nft_rule_msg(data)
    msg.decode()
    family = NFT_FAMILIES.get(msg["nfgen_family"])
    if family is None:
        raise NotUnderstood(f"nfgen family {msg['nfgen_family']}")
    rule = RuleState(family, sets, {}, [], {}, set())
    for expr in msg.get_attr("NFTA_RULE_EXPRESSIONS") or ():
        name = expr.get_attr("NFTA_EXPR_NAME")
        handler = _HANDLERS.get(name)
        if handler is None:
            raise NotUnderstood(f"expression {name}")
        handler(rule, expr.get_attr("NFTA_EXPR_DATA"))
    body: dict[str, Any] = {
        "family": family,
        "table": msg.get_attr("NFTA_RULE_TABLE"),
        "chain": msg.get_attr("NFTA_RULE_CHAIN"),
        "handle": msg.get_attr("NFTA_RULE_HANDLE"),
        "expr": [e for i, e in enumerate(rule.out) if i not in rule.folded],
    }
    comment = _comment(msg.get_attr("NFTA_RULE_USERDATA"))
    if comment is not None:
        body["comment"] = comment
    return body


def decode_chain(data: bytes) -> dict[str, Any]:
    """One ``NFT_MSG_NEWCHAIN`` message as the chain object ``nft -j`` prints."""
    msg = nft_chain_msg(data)
    msg.decode()
    family = NFT_FAMILIES.get(msg["nfgen_family"])
    if family not in ("ip", "ip6", "inet"):
        raise NotUnderstood(f"chain of nfgen family {msg['nfgen_family']}")
    body: dict[str, Any] = {
        "family": family,
        "table": msg.get_attr("NFTA_CHAIN_TABLE"),
        "name": msg.get_attr("NFTA_CHAIN_NAME"),
        "handle": msg.get_attr("NFTA_CHAIN_HANDLE"),
    }
    hook = msg.get_attr("NFTA_CHAIN_HOOK")
    if hook is not None:
        number = hook.get_attr("NFTA_HOOK_HOOKNUM")
        if number not in _HOOKS or hook.get_attr("NFTA_HOOK_DEV") is not None:
            raise NotUnderstood(f"hook {number}")
        policy = {0: "drop", 1: "accept"}.get(msg.get_attr("NFTA_CHAIN_POLICY"))
        if policy is None:
            raise NotUnderstood(f"chain policy {msg.get_attr('NFTA_CHAIN_POLICY')}")
        body["type"] = msg.get_attr("NFTA_CHAIN_TYPE")
        body["hook"] = _HOOKS[number]
        body["prio"] = hook.get_attr("NFTA_HOOK_PRIORITY")
        body["policy"] = policy
    return body


def _comment(userdata: Any) -> str | None:
    if userdata is None:
        return None
    if isinstance(userdata, str):
        return userdata
    raise NotUnderstood("rule user data other than a comment")


# --------------------------------------------------------------------------- loads


def _payload(rule: RuleState, data: Any) -> None:
    if data.get_attr("NFTA_PAYLOAD_SREG") is not None:
        raise NotUnderstood("payload write")
    base = data.get_attr("NFTA_PAYLOAD_BASE")
    offset, size = data.get_attr("NFTA_PAYLOAD_OFFSET"), data.get_attr("NFTA_PAYLOAD_LEN")
    if base == "NFT_PAYLOAD_NETWORK_HEADER":
        loaded = _network_field(rule, offset, size)
    elif base == "NFT_PAYLOAD_TRANSPORT_HEADER":
        loaded = _transport_field(rule, offset, size)
    else:
        raise NotUnderstood(f"payload base {base}")
    load(rule, data, loaded, "NFTA_PAYLOAD_DREG")


def _network_field(rule: RuleState, offset: int, size: int) -> Loaded:
    ip = rule.family in ("ip", "ip6")
    proto = rule.family if ip else use_context(rule, "l3", L3_NAMES)
    for (at, full), (name, kind) in _NETWORK_FIELDS[proto].items():
        addresses = kind in (TYPE_IPADDR, TYPE_IP6ADDR)
        if at == offset and (size == full or (addresses and 0 < size < full)):
            expr = {"payload": {"protocol": proto, "field": name}}
            depends = "l4" if name in ("protocol", "nexthdr") else None
            prefix = size * 8 if size < full else None
            return Loaded(expr, kind, size, full * 8 if addresses else None, prefix, None, None,
                           depends)  # fmt: skip
    raise NotUnderstood(f"{proto} header field at {offset} ({size} bytes)")


def _transport_field(rule: RuleState, offset: int, size: int) -> Loaded:
    context = rule.context.get("l4")
    number = context[0] if context else None
    if (offset, size) in ((0, 2), (2, 2)):
        field = "sport" if offset == 0 else "dport"
        proto = HEADER_NAMES.get(number, "th") if number in (6, 17, 33, 132, 136) else "th"
        if proto != "th":
            use_context(rule, "l4", {number: proto})
        return Loaded({"payload": {"protocol": proto, "field": field}}, TYPE_INET_SERVICE, 2)
    if (offset, size) == (0, 1) and number in (1, 58):
        folded = context is not None and context[1] is not None
        proto = use_context(rule, "l4", {1: "icmp", 58: "icmpv6"})
        l3 = rule.context.get("l3")
        if folded and l3 is not None and L3_NAMES.get(l3[0]) == ("ip" if number == 1 else "ip6"):
            use_context(rule, "l3", L3_NAMES)  # icmpv6 implies ipv6 too: nft folds both
        kind = TYPE_ICMP_TYPE if number == 1 else TYPE_ICMP6_TYPE
        return Loaded({"payload": {"protocol": proto, "field": "type"}}, kind, 1)
    raise NotUnderstood(f"transport header field at {offset} ({size} bytes)")


def _meta(rule: RuleState, data: Any) -> None:
    key = str(data.get_attr("NFTA_META_KEY"))
    if data.get_attr("NFTA_META_SREG") is not None:
        rule.out.append(_mangle(rule, data, "meta", key, "NFTA_META_SREG"))
        return
    if key == "NFT_META_PROTOCOL":
        loaded = Loaded({"meta": {"key": "protocol"}}, -1, 2, depends="l3")
    elif key in _META_KEYS:
        name, kind = _META_KEYS[key]
        depends = {"l4proto": "l4", "nfproto": "l3"}.get(name)
        size = {TYPE_IFNAME: 16, TYPE_MARK: 4, TYPE_IFINDEX: 4}.get(kind, 1)
        loaded = Loaded({"meta": {"key": name}}, kind, size, depends=depends)
    else:
        raise NotUnderstood(f"meta {key}")
    load(rule, data, loaded, "NFTA_META_DREG")


def _ct(rule: RuleState, data: Any) -> None:
    key = str(data.get_attr("NFTA_CT_KEY"))
    if data.get_attr("NFTA_CT_DIRECTION") is not None:
        raise NotUnderstood("ct with a direction")
    if data.get_attr("NFTA_CT_SREG") is not None:
        rule.out.append(_mangle(rule, data, "ct", key, "NFTA_CT_SREG"))
        return
    if key not in _CT_KEYS:
        raise NotUnderstood(f"ct {key}")
    name, kind = _CT_KEYS[key]
    size = 1 if kind == TYPE_CT_DIR else 4
    load(rule, data, Loaded({"ct": {"key": name}}, kind, size), "NFTA_CT_DREG")


def _mangle(rule: RuleState, data: Any, what: str, key: str, attr: str) -> dict[str, Any]:
    if key not in ("NFT_META_MARK", "NFT_CT_MARK"):
        raise NotUnderstood(f"{what} {key} set")
    source = read_register(rule, data, attr)
    value = host_int(source.literal) if source.literal is not None else source.expr
    return {"mangle": {"key": {what: {"key": "mark"}}, "value": value}}


def _fib(rule: RuleState, data: Any) -> None:
    """pyroute2 decodes fib's result and flags the wrong way round: read the raw attributes."""
    raw = raw_attrs(data)
    result = be_int(raw.get(_NFTA_FIB_RESULT, b""))
    flags = be_int(raw.get(_NFTA_FIB_FLAGS, b""))
    present = bool(flags & _FIB_F_PRESENT)
    names = [name for bit, name in _FIB_FLAGS if flags & bit]
    if flags & ~(_FIB_F_PRESENT | sum(bit for bit, _ in _FIB_FLAGS)) or not names:
        raise NotUnderstood(f"fib flags {flags:#x}")
    kinds = {1: ("oif", TYPE_BOOLEAN if present else TYPE_IFINDEX, 4),
             2: ("oifname", TYPE_BOOLEAN if present else TYPE_IFNAME, 16),
             3: ("type", TYPE_FIB_ADDR, 4)}  # fmt: skip
    if result not in kinds:
        raise NotUnderstood(f"fib result {result}")
    name, kind, size = kinds[result]
    expr = {"fib": {"result": name, "flags": names}}
    load(rule, data, Loaded(expr, kind, 4 if kind == TYPE_BOOLEAN else size), "NFTA_FIB_DREG")


def _numgen(rule: RuleState, data: Any) -> None:
    mode = {"NFT_NG_RANDOM": "random", "NFT_NG_INCREMENTAL": "inc"}.get(
        str(data.get_attr("NFTA_NG_TYPE"))
    )
    if mode is None:
        raise NotUnderstood(f"numgen {data.get_attr('NFTA_NG_TYPE')}")
    expr = {
        "numgen": {
            "mode": mode,
            "mod": data.get_attr("NFTA_NG_MODULUS"),
            "offset": data.get_attr("NFTA_NG_OFFSET") or 0,
        }
    }
    load(rule, data, Loaded(expr, TYPE_INTEGER, 4), "NFTA_NG_DREG")


def _bitwise(rule: RuleState, data: Any) -> None:
    if str(data.get_attr("NFTA_BITWISE_OP") or "NFT_BITWISE_BOOL") != "NFT_BITWISE_BOOL":
        raise NotUnderstood("bitwise shift")
    source = read_register(rule, data, "NFTA_BITWISE_SREG")
    mask, xor = attr_value(data, "NFTA_BITWISE_MASK"), attr_value(data, "NFTA_BITWISE_XOR")
    if not len(mask) == len(xor) == source.size == data.get_attr("NFTA_BITWISE_LEN"):
        raise NotUnderstood("bitwise on part of a register")
    load(rule, data, _masked(source, mask, xor), "NFTA_BITWISE_DREG")


def _masked(source: Loaded, mask: bytes, xor: bytes) -> Loaded:
    if source.field_bits is not None and not any(xor):
        bits = be_int(mask)
        width = len(mask) * 8
        ones = bin(bits).count("1")
        if bits == ((1 << ones) - 1) << (width - ones):
            return replace(source, prefix=ones)
        raise NotUnderstood("an address mask that is not a prefix")
    if source.kind in (TYPE_CT_STATE, TYPE_CT_STATUS) and not any(xor):
        return replace(source, flags_mask=host_int(mask))
    if source.kind != TYPE_MARK:
        raise NotUnderstood(f"bitwise on {source.expr!r:.60}")
    full = (1 << (8 * len(mask))) - 1
    mask_n, xor_n = host_int(mask), host_int(xor)
    if xor_n == 0:
        expr: Any = {"&": [source.expr, mask_n]}
    elif mask_n == full:
        expr = {"^": [source.expr, xor_n]}
    elif mask_n & xor_n == 0 and mask_n | xor_n == full:
        expr = {"|": [source.expr, xor_n]}
    else:
        raise NotUnderstood("bitwise with both a mask and an xor")
    return Loaded(expr, TYPE_MARK, source.size)


def _immediate(rule: RuleState, data: Any) -> None:
    if str(data.get_attr("NFTA_IMMEDIATE_DREG")) == "NFT_REG_VERDICT":
        rule.out.append(attr_verdict(data, "NFTA_IMMEDIATE_DATA"))
        return
    literal = attr_value(data, "NFTA_IMMEDIATE_DATA")
    load(rule, data, Loaded(None, TYPE_INTEGER, len(literal), literal=literal),
          "NFTA_IMMEDIATE_DREG")  # fmt: skip


# --------------------------------------------------------------------------- comparisons


def _cmp(rule: RuleState, data: Any) -> None:
    left = read_register(rule, data, "NFTA_CMP_SREG")
    op = _CMP_OPS.get(str(data.get_attr("NFTA_CMP_OP")))
    if op is None:
        raise NotUnderstood(f"cmp {data.get_attr('NFTA_CMP_OP')}")
    value = attr_value(data, "NFTA_CMP_DATA")
    if left.flags_mask is not None:
        if op != "!=" or any(value):
            raise NotUnderstood("a ct flags match other than 'in'")
        bits = CT_STATE_BITS if left.kind == TYPE_CT_STATE else CT_STATUS_BITS
        right = one_or_list(flag_names(left.flags_mask, bits))
        rule.out.append({"match": {"op": "in", "left": left.expr, "right": right}})
        return
    right = _right(left, value)
    if left.depends is not None and op == "==":
        number = value[0] if left.kind == TYPE_INET_PROTOCOL else right
        # nft folds its own dependencies (meta l4proto, meta nfproto); in an inet table not
        # an ip protocol / ip6 nexthdr match written in the rule.
        # In ip and ip6 tables a written ip protocol / ip6 nexthdr match is folded too.
        folds = "meta" in left.expr or rule.family in ("ip", "ip6")
        rule.context[left.depends] = (number, len(rule.out) if folds else None)
    previous = rule.out[-1].get("match") if rule.out else None
    if op == "<=" and previous and previous["op"] == ">=" and previous["left"] == left.expr:
        # nft writes a range as ">= low" then "<= high" and prints it back as one range.
        low = previous["right"]
        rule.out[-1] = {"match": {"op": "==", "left": left.expr, "right": {"range": [low, right]}}}
        return
    rule.out.append({"match": {"op": op, "left": left.expr, "right": right}})


def _right(left: Loaded, value: bytes) -> Any:
    if left.literal is not None or left.expr is None:
        raise NotUnderstood("a comparison of a literal")
    if len(value) != left.size and not (left.kind == TYPE_IFNAME and len(value) < left.size):
        # Only an interface name is compared in part (a prefix: "eth*").
        raise NotUnderstood(f"{len(value)} bytes compared with {left.size}")
    if left.prefix is not None and left.field_bits is not None:
        full = value.ljust(left.field_bits // 8, b"\0")
        return {"prefix": {"addr": render(left.kind, full), "len": left.prefix}}
    if left.kind == -1:  # meta protocol: an ethertype
        names = {0x0800: "ip", 0x86DD: "ip6"}
        return names.get(be_int(value), be_int(value))
    return render(left.kind, value)


def _range(rule: RuleState, data: Any) -> None:
    left = read_register(rule, data, "NFTA_RANGE_SREG")
    op = {"NFT_RANGE_EQ": "==", "NFT_RANGE_NEQ": "!="}.get(str(data.get_attr("NFTA_RANGE_OP")))
    if op is None or left.prefix is not None:
        raise NotUnderstood("range")
    low = _right(left, attr_value(data, "NFTA_RANGE_FROM_DATA"))
    high = _right(left, attr_value(data, "NFTA_RANGE_TO_DATA"))
    rule.out.append({"match": {"op": op, "left": left.expr, "right": {"range": [low, high]}}})


def _lookup(rule: RuleState, data: Any) -> None:
    name = str(data.get_attr("NFTA_LOOKUP_SET"))
    info = rule.sets(name)
    start = register(data.get_attr("NFTA_LOOKUP_SREG"))
    left = _key(rule, start, info.key_len)
    right: Any = {"set": list(info.elements)} if info.anonymous else f"@{name}"
    inverted = "NFT_LOOKUP_F_INV" in (data.get_attr("NFTA_LOOKUP_FLAGS") or ())
    dreg = data.get_attr("NFTA_LOOKUP_DREG")
    if dreg is None:
        op = "!=" if inverted else "=="
        rule.out.append({"match": {"op": op, "left": left, "right": right}})
    elif str(dreg) == "NFT_REG_VERDICT" and info.data_type == TYPE_VERDICT_MAP and not inverted:
        rule.out.append({"vmap": {"key": left, "data": right}})
    else:
        raise NotUnderstood(f"a data map lookup (@{name})")


def _key(rule: RuleState, start: int, key_len: int) -> Any:
    """The left side of a lookup: one register, or the concatenation of consecutive ones."""
    parts: list[Any] = []
    covered = 0
    reg = start
    while covered < key_len:
        loaded = rule.regs.get(reg)
        if loaded is None or loaded.expr is None or loaded.prefix is not None:
            raise NotUnderstood("a lookup key not loaded")
        if loaded.flags_mask is not None:
            raise NotUnderstood("a lookup of masked flags")
        parts.append(loaded.expr)
        words = (loaded.size + 3) // 4
        covered += words * 4
        reg += words
    if covered != key_len and not (len(parts) == 1 and covered >= key_len):
        raise NotUnderstood("a lookup key of another size")
    return parts[0] if len(parts) == 1 else {"concat": parts}


_HANDLERS: dict[str, Callable[[RuleState, Any], None]] = {
    **STATEMENTS,
    "payload": _payload,
    "meta": _meta,
    "ct": _ct,
    "numgen": _numgen,
    "fib": _fib,
    "bitwise": _bitwise,
    "immediate": _immediate,
    "cmp": _cmp,
    "range": _range,
    "lookup": _lookup,
}
