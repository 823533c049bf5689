"""The statements of an nft rule decoded from netlink (``nft_netlink_rules``): counter, log,
limit, notrack, reject, dnat/snat/masquerade/redirect to literal addresses and ports, in the
form ``nft -j`` prints them. Pure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from collectors.netfilter.nft_netlink_state import (
    L3_NAMES,
    RuleState,
    raw_attrs,
    read_register,
    register,
    use_context,
)
from collectors.netfilter.nft_netlink_types import (
    TYPE_IP6ADDR,
    TYPE_IPADDR,
    NotUnderstood,
    be_int,
    one_or_list,
    render,
)

_ICMP_CODES = {0: "net-unreachable", 1: "host-unreachable", 2: "prot-unreachable",
               3: "port-unreachable", 9: "net-prohibited", 10: "host-prohibited",
               13: "admin-prohibited"}  # fmt: skip

_ICMP6_CODES = {0: "no-route", 1: "admin-prohibited", 3: "addr-unreachable",
                4: "port-unreachable", 5: "policy-fail", 6: "reject-route"}  # fmt: skip

_ICMPX_CODES = {0: "no-route", 1: "port-unreachable", 2: "host-unreachable", 3: "admin-prohibited"}

_NFTA_REJECT_ICMP_CODE = 2

_LOG_LEVELS = {"NFT_LOGLEVEL_EMERG": "emerg", "NFT_LOGLEVEL_ALERT": "alert",
               "NFT_LOGLEVEL_CRIT": "crit", "NFT_LOGLEVEL_ERR": "err",
               "NFT_LOGLEVEL_WARNING": "warn", "NFT_LOGLEVEL_NOTICE": "notice",
               "NFT_LOGLEVEL_INFO": "info", "NFT_LOGLEVEL_DEBUG": "debug",
               "NFT_LOGLEVEL_AUDIT": "audit"}  # fmt: skip

_LIMIT_UNITS = {1: "second", 60: "minute", 3600: "hour", 86400: "day", 604800: "week"}

_NAT_FLAG_NAMES = (
    ("NF_NAT_RANGE_PROTO_RANDOM", "random"),
    ("NF_NAT_RANGE_PROTO_RANDOM_FULLY", "fully-random"),
    ("NF_NAT_RANGE_PERSISTENT", "persistent"),
)

_NAT_IMPLIED_FLAGS = frozenset({"NF_NAT_RANGE_MAP_IPS", "NF_NAT_RANGE_PROTO_SPECIFIED"})


def _counter(rule: RuleState, data: Any) -> None:
    packets = data.get_attr("NFTA_COUNTER_PACKETS") or 0
    nbytes = data.get_attr("NFTA_COUNTER_BYTES") or 0
    rule.out.append({"counter": {"packets": packets, "bytes": nbytes}})


def _notrack(rule: RuleState, data: Any) -> None:
    rule.out.append({"notrack": None})


def _log(rule: RuleState, data: Any) -> None:
    body: dict[str, Any] = {}
    if data.get_attr("NFTA_LOG_PREFIX") is not None:
        body["prefix"] = data.get_attr("NFTA_LOG_PREFIX")
    if data.get_attr("NFTA_LOG_GROUP") is not None:
        body["group"] = data.get_attr("NFTA_LOG_GROUP")
    level = data.get_attr("NFTA_LOG_LEVEL")
    if level is not None:
        if level not in _LOG_LEVELS:
            raise NotUnderstood(f"log level {level}")
        body["level"] = _LOG_LEVELS[level]
    if data.get_attr("NFTA_LOG_FLAGS") or data.get_attr("NFTA_LOG_SNAPLEN"):
        raise NotUnderstood("log flags")
    rule.out.append({"log": body or None})


def _limit(rule: RuleState, data: Any) -> None:
    unit = _LIMIT_UNITS.get(data.get_attr("NFTA_LIMIT_UNIT"))
    if unit is None or str(data.get_attr("NFTA_LIMIT_TYPE")) != "NFT_LIMIT_PKTS":
        raise NotUnderstood("limit in bytes or odd units")
    body: dict[str, Any] = {"rate": data.get_attr("NFTA_LIMIT_RATE")}
    burst = data.get_attr("NFTA_LIMIT_BURST")
    if burst:
        body["burst"] = burst
    body["per"] = unit
    if data.get_attr("NFTA_LIMIT_FLAGS"):
        body["inv"] = True
    rule.out.append({"limit": body})


def _reject(rule: RuleState, data: Any) -> None:
    kind = str(data.get_attr("NFTA_REJECT_TYPE"))
    if kind == "NFT_REJECT_TCP_RST":
        rule.out.append({"reject": {"type": "tcp reset"}})
        return
    # pyroute2 names the code by the icmpx table whatever the type: read the raw byte.
    raw = raw_attrs(data).get(_NFTA_REJECT_ICMP_CODE)
    if not raw:
        raise NotUnderstood("reject without a code")
    code = raw[0]
    if kind == "NFT_REJECT_ICMPX_UNREACH":
        if code not in _ICMPX_CODES:
            raise NotUnderstood(f"reject code {code}")
        rule.out.append({"reject": {"type": "icmpx", "expr": _ICMPX_CODES[code]}})
        return
    if kind != "NFT_REJECT_ICMP_UNREACH":
        raise NotUnderstood(f"reject {kind}")
    if rule.family in ("ip", "ip6"):
        version = "ipv4" if rule.family == "ip" else "ipv6"
    else:
        version = {"ip": "ipv4", "ip6": "ipv6"}[use_context(rule, "l3", L3_NAMES)]
    codes = _ICMP_CODES if version == "ipv4" else _ICMP6_CODES
    if code not in codes:
        raise NotUnderstood(f"reject code {code}")
    icmp = "icmp" if version == "ipv4" else "icmpv6"
    rule.out.append({"reject": {"type": icmp, "expr": codes[code]}})


def _nat(rule: RuleState, data: Any) -> None:
    kind = {"NFT_NAT_DNAT": "dnat", "NFT_NAT_SNAT": "snat"}.get(str(data.get_attr("NFTA_NAT_TYPE")))
    if kind is None:
        raise NotUnderstood(f"nat {data.get_attr('NFTA_NAT_TYPE')}")
    flags = nat_flags(data.get_attr("NFTA_NAT_FLAGS"))
    body: dict[str, Any] = {}
    version = {2: "ip", 10: "ip6"}.get(data.get_attr("NFTA_NAT_FAMILY"))
    if version is None:
        raise NotUnderstood("nat family")
    if rule.family == "inet":
        body["family"] = version
    addr_kind = TYPE_IPADDR if version == "ip" else TYPE_IP6ADDR
    address = literal_pair(rule, data, "NFTA_NAT_REG_ADDR_MIN", "NFTA_NAT_REG_ADDR_MAX")
    if address is not None:
        body["addr"] = render(addr_kind, address)
    port = literal_pair(rule, data, "NFTA_NAT_REG_PROTO_MIN", "NFTA_NAT_REG_PROTO_MAX")
    if port is not None:
        body["port"] = be_int(port)
    if flags:
        body["flags"] = flags
    rule.out.append({kind: body or None})


def literal_pair(rule: RuleState, data: Any, low: str, high: str) -> bytes | None:
    if data.get_attr(low) is None:
        return None
    first = read_register(rule, data, low)
    last = data.get_attr(high)
    if last is not None and register(last) != register(data.get_attr(low)):
        raise NotUnderstood("a nat range")
    if first.literal is None:
        raise NotUnderstood("a nat address from a map")
    return first.literal


def _masq(rule: RuleState, data: Any) -> None:
    if data.get_attr("NFTA_MASQ_REG_PROTO_MIN") is not None:
        raise NotUnderstood("masquerade to ports")
    flags = nat_flags(data.get_attr("NFTA_MASQ_FLAGS"))
    rule.out.append({"masquerade": {"flags": flags} if flags else None})


def nat_flags(flags: Any) -> Any:
    """The flags nft prints (``random``, ``fully-random``, ``persistent``): one as a string."""
    given = set(flags or ()) - _NAT_IMPLIED_FLAGS
    names = [name for key, name in _NAT_FLAG_NAMES if key in given]
    if len(names) != len(given):
        raise NotUnderstood(f"nat flags {', '.join(sorted(map(str, given)))}")
    return one_or_list(names) if names else None


def _redir(rule: RuleState, data: Any) -> None:
    flags = nat_flags(data.get_attr("NFTA_REDIR_FLAGS"))
    port = literal_pair(rule, data, "NFTA_REDIR_REG_PROTO_MIN", "NFTA_REDIR_REG_PROTO_MAX")
    body: dict[str, Any] = {} if port is None else {"port": be_int(port)}
    if flags:
        body["flags"] = flags
    rule.out.append({"redirect": body or None})


STATEMENTS: dict[str, Callable[[RuleState, Any], None]] = {
    "counter": _counter,
    "notrack": _notrack,
    "log": _log,
    "limit": _limit,
    "reject": _reject,
    "nat": _nat,
    "masq": _masq,
    "redir": _redir,
}
