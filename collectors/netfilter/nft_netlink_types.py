"""nft's data types, for reading rules over netlink: the bytes of a value (a ``cmp`` operand, a
set element) in the form ``nft -j`` prints it (``"10.43.0.10"``, ``"udp"``, ``53``,
``["established", "related"]``…). Only the types the firewall analyses meet are known; any
other raises ``NotUnderstood`` (the table is then read with ``nft -j``). Pure."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any


class NotUnderstood(Exception):
    """A netlink expression, set or value this reader does not turn into ``nft -j`` JSON (the
    table is read with nft instead). Not a ValueError: the analyses catch those."""


class NetlinkFallback(Exception):
    """The table ``family``/``name`` (nft's family keyword) cannot be read over netlink:
    ``why``; it is read with ``nft -j`` instead. Not a ValueError or KeyError: the analyses
    catch those."""

    def __init__(self, family: str, name: str, why: str) -> None:
        super().__init__(f"table {family} {name}: {why}")
        self.family = family
        self.name = name
        self.why = why


# nftables' include/datatype.h
TYPE_VERDICT = 1
TYPE_NFPROTO = 2
TYPE_INTEGER = 4
TYPE_IPADDR = 7
TYPE_IP6ADDR = 8
TYPE_INET_PROTOCOL = 12
TYPE_INET_SERVICE = 13
TYPE_ICMP_TYPE = 14
TYPE_MARK = 19
TYPE_IFINDEX = 20
TYPE_CT_STATE = 26
TYPE_CT_DIR = 27
TYPE_CT_STATUS = 28
TYPE_ICMP6_TYPE = 29
TYPE_PKTTYPE = 31
TYPE_FIB_ADDR = 38
TYPE_BOOLEAN = 39
TYPE_IFNAME = 41
#: NFTA_SET_DATA_TYPE of a verdict map.
TYPE_VERDICT_MAP = 0xFFFFFF00
#: A concatenation's type: its parts' types, 6 bits each.
TYPE_BITS = 6

#: Bytes of a value of each type (the others have no fixed size here).
TYPE_SIZES = {
    TYPE_NFPROTO: 1,
    TYPE_IPADDR: 4,
    TYPE_IP6ADDR: 16,
    TYPE_INET_PROTOCOL: 1,
    TYPE_INET_SERVICE: 2,
    TYPE_ICMP_TYPE: 1,
    TYPE_ICMP6_TYPE: 1,
    TYPE_MARK: 4,
    TYPE_IFINDEX: 4,
    TYPE_CT_STATE: 4,
    TYPE_CT_STATUS: 4,
    TYPE_CT_DIR: 1,
    TYPE_PKTTYPE: 1,
    TYPE_IFNAME: 16,
}

#: The names nft prints for protocol numbers (/etc/protocols).
PROTOCOL_NAMES = {
    1: "icmp",
    2: "igmp",
    4: "ipencap",
    6: "tcp",
    17: "udp",
    33: "dccp",
    41: "ipv6",
    47: "gre",
    50: "esp",
    51: "ah",
    58: "ipv6-icmp",
    132: "sctp",
    136: "udplite",
}
#: Protocols whose header nft names in ``PROTO dport`` (the name differs from /etc/protocols
#: for ICMPv6).
HEADER_NAMES = {
    1: "icmp",
    6: "tcp",
    17: "udp",
    33: "dccp",
    58: "icmpv6",
    132: "sctp",
    136: "udplite",
}
ICMP_TYPES = {
    0: "echo-reply",
    3: "destination-unreachable",
    4: "source-quench",
    5: "redirect",
    8: "echo-request",
    9: "router-advertisement",
    10: "router-solicitation",
    11: "time-exceeded",
    12: "parameter-problem",
    13: "timestamp-request",
    14: "timestamp-reply",
    15: "info-request",
    16: "info-reply",
    17: "address-mask-request",
    18: "address-mask-reply",
}
ICMP6_TYPES = {
    1: "destination-unreachable",
    2: "packet-too-big",
    3: "time-exceeded",
    4: "parameter-problem",
    128: "echo-request",
    129: "echo-reply",
    130: "mld-listener-query",
    131: "mld-listener-report",
    132: "mld-listener-done",
    133: "nd-router-solicit",
    134: "nd-router-advert",
    135: "nd-neighbor-solicit",
    136: "nd-neighbor-advert",
    137: "nd-redirect",
    138: "router-renumbering",
    141: "ind-neighbor-solicit",
    142: "ind-neighbor-advert",
    143: "mld2-listener-report",
}
CT_STATE_BITS = ((1, "invalid"), (2, "established"), (4, "related"), (8, "new"), (64, "untracked"))
CT_STATUS_BITS = (
    (1, "expected"),
    (2, "seen-reply"),
    (4, "assured"),
    (8, "confirmed"),
    (16, "snat"),
    (32, "dnat"),
    (512, "dying"),
)
NFPROTO_NAMES = {2: "ipv4", 10: "ipv6"}
PKTTYPE_NAMES = {0: "host", 1: "broadcast", 2: "multicast", 3: "other"}
FIB_ADDR_TYPES = {
    0: "unspec",
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
}
VERDICT_NAMES = {0: "drop", 1: "accept", -1: "continue", -3: "jump", -4: "goto", -5: "return"}
VERDICT_CODES = {
    "NF_DROP": "drop",
    "NF_ACCEPT": "accept",
    "NFT_CONTINUE": "continue",
    "NFT_JUMP": "jump",
    "NFT_GOTO": "goto",
    "NFT_RETURN": "return",
}


def host_int(data: bytes) -> int:
    return int.from_bytes(data, "little")


def be_int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def flag_names(value: int, bits: tuple[tuple[int, str], ...]) -> list[str]:
    names = [name for bit, name in bits if value & bit]
    if sum(bit for bit, _ in bits if value & bit) != value:
        raise NotUnderstood(f"flag bits {value:#x}")
    return names


def one_or_list(names: list[str]) -> Any:
    """nft prints one flag as a string, several as a list."""
    return names[0] if len(names) == 1 else names


def render(kind: int, data: bytes, big_endian: bool = False) -> Any:
    """The value ``data`` of type ``kind`` as ``nft -j`` prints it; ``big_endian`` for plain
    integers (``TYPE_INTEGER``: a set's key byte order)."""
    if kind == TYPE_IPADDR and len(data) == 4:
        return str(ipaddress.IPv4Address(data))
    if kind == TYPE_IP6ADDR and len(data) == 16:
        return socket.inet_ntop(socket.AF_INET6, data)  # as nft spells it: ::ffff:0.0.0.0
    if kind == TYPE_INET_SERVICE and len(data) == 2:
        return be_int(data)
    if kind == TYPE_INET_PROTOCOL and len(data) == 1:
        return PROTOCOL_NAMES.get(data[0], data[0])
    if kind in (TYPE_MARK, TYPE_INTEGER) and 0 < len(data) <= 8:
        return be_int(data) if big_endian else host_int(data)
    if kind == TYPE_IFNAME:
        return ifname(data)
    if kind in (TYPE_CT_STATE, TYPE_CT_STATUS) and len(data) == 4:
        bits = CT_STATE_BITS if kind == TYPE_CT_STATE else CT_STATUS_BITS
        return one_or_list(flag_names(host_int(data), bits))
    named = {
        TYPE_ICMP_TYPE: ICMP_TYPES,
        TYPE_ICMP6_TYPE: ICMP6_TYPES,
        TYPE_NFPROTO: NFPROTO_NAMES,
        TYPE_PKTTYPE: PKTTYPE_NAMES,
        TYPE_CT_DIR: {0: "original", 1: "reply"},
    }.get(kind)
    if named is not None and len(data) == 1:
        return named.get(data[0], data[0])
    if kind == TYPE_FIB_ADDR and len(data) == 4:
        return FIB_ADDR_TYPES.get(host_int(data), host_int(data))
    if kind == TYPE_BOOLEAN and len(data) in (1, 4):
        return bool(host_int(data))
    if kind == TYPE_IFINDEX and len(data) == 4 and host_int(data) == 1:
        return "lo"  # the loopback is index 1 in every network namespace
    raise NotUnderstood(f"value of data type {kind} ({len(data)} bytes)")


def ifname(data: bytes) -> str:
    """An interface name; one compared without its terminating NUL is a prefix (``eth*``)."""
    text = data.split(b"\0", 1)[0].decode("utf-8", "replace")
    return text if b"\0" in data else f"{text}*"


def concat_types(kind: int) -> list[int]:
    """The parts of a concatenated type (a single type: itself)."""
    parts = []
    while kind:
        parts.append(kind & ((1 << TYPE_BITS) - 1))
        kind >>= TYPE_BITS
    return list(reversed(parts)) or [0]


def render_key(kind: int, data: bytes, big_endian: bool) -> Any:
    """A set key: one value, or a concatenation (each part padded to 4 bytes)."""
    parts = concat_types(kind)
    if len(parts) == 1:
        return render(kind, data, big_endian)
    values = []
    offset = 0
    for part in parts:
        size = TYPE_SIZES.get(part)
        if size is None:
            raise NotUnderstood(f"concatenation part of data type {part}")
        values.append(render(part, data[offset : offset + size]))
        offset += (size + 3) // 4 * 4
    if offset != len(data):
        raise NotUnderstood(f"concatenation of {len(data)} bytes for {len(parts)} parts")
    return {"concat": values}
