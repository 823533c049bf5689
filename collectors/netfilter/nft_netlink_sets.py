"""An nft set or map as the kernel hands it over netlink (``NFT_MSG_NEWSET`` for its head,
``NFT_MSG_NEWSETELEM`` for its elements) turned into the elements ``nft -j`` prints: values of
the set's key type (concatenations too), ``[key, verdict]`` pairs for a verdict map, intervals
as prefixes and ranges, comments as ``{"elem": {"val": …, "comment": …}}``. Elements are in
ascending key order, as nft sorts them. Timeouts, per-element counters, data maps other than
verdict maps and concatenated intervals raise ``NotUnderstood``. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.nfnetlink.nftsocket import (  # type: ignore[import-untyped]
    nft_set_elem_list_msg,
    nft_set_msg,
)

from collectors.netfilter.nft_netlink_rules import SetInfo, verdict_json
from collectors.netfilter.nft_netlink_types import (
    TYPE_INET_PROTOCOL,
    TYPE_INET_SERVICE,
    TYPE_IP6ADDR,
    TYPE_IPADDR,
    TYPE_VERDICT_MAP,
    NotUnderstood,
    be_int,
    concat_types,
    render,
    render_key,
)

_BIG_ENDIAN = 2  # nftables' enum byteorder: 1 host, 2 big endian
_INTERVAL_TYPES = frozenset({TYPE_IPADDR, TYPE_IP6ADDR, TYPE_INET_SERVICE, TYPE_INET_PROTOCOL})
_ELEM_INTERVAL_END = 1


@dataclass(frozen=True, slots=True)
class SetHead:
    name: str
    flags: frozenset[str]
    key_type: int
    key_len: int
    data_type: int | None
    key_big_endian: bool
    handle: int | None

    @property
    def anonymous(self) -> bool:
        return "NFT_SET_ANONYMOUS" in self.flags

    @property
    def is_map(self) -> bool:
        return "NFT_SET_MAP" in self.flags

    @property
    def interval(self) -> bool:
        return "NFT_SET_INTERVAL" in self.flags

    def info(self, elements: tuple[Any, ...] = ()) -> SetInfo:
        return SetInfo(self.name, self.anonymous, self.key_len, self.data_type, elements)


def decode_set_head(data: bytes) -> SetHead:
    msg = nft_set_msg(data)
    msg.decode()
    flags = frozenset(str(f) for f in msg.get_attr("NFTA_SET_FLAGS") or ())
    unknown = flags - {
        "NFT_SET_ANONYMOUS",
        "NFT_SET_CONSTANT",
        "NFT_SET_INTERVAL",
        "NFT_SET_MAP",
        "NFT_SET_CONCAT",
    }
    if unknown:
        raise NotUnderstood(f"set flags {', '.join(sorted(unknown))}")
    order = 0
    for name, value in msg.get_attr("NFTA_SET_USERDATA") or ():
        if name == "NFTNL_UDATA_SET_KEYBYTEORDER" and isinstance(value, bytes):
            order = int.from_bytes(value[:4], "little")
    return SetHead(
        name=str(msg.get_attr("NFTA_SET_NAME")),
        flags=flags,
        key_type=int(msg.get_attr("NFTA_SET_KEY_TYPE") or 0),
        key_len=int(msg.get_attr("NFTA_SET_KEY_LEN") or 0),
        data_type=msg.get_attr("NFTA_SET_DATA_TYPE"),
        key_big_endian=order == _BIG_ENDIAN,
        handle=msg.get_attr("NFTA_SET_HANDLE"),
    )


def decode_elements(head: SetHead, messages: list[bytes]) -> list[Any]:
    """The elements of the set ``head`` from its ``NFT_MSG_NEWSETELEM`` dump."""
    if head.is_map and head.data_type != TYPE_VERDICT_MAP:
        raise NotUnderstood(f"map @{head.name} of data type {head.data_type}")
    raw: list[tuple[bytes, bool, Any, str | None]] = []
    for data in messages:
        msg = nft_set_elem_list_msg(data)
        msg.decode()
        for element in msg.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS") or ():
            raw.append(_element(head, element))
    if head.interval and len(concat_types(head.key_type)) == 1:
        return _intervals(head, raw)
    raw.sort(key=lambda e: e[0])
    return [_element_json(head, render_key(head.key_type, key, head.key_big_endian), data, note)
            for key, _end, data, note in raw]  # fmt: skip


def _element(head: SetHead, element: Any) -> tuple[bytes, bool, Any, str | None]:
    attrs = dict(element.get("attrs", []))
    extra = set(attrs) - {
        "NFTA_SET_ELEM_KEY",
        "NFTA_SET_ELEM_DATA",
        "NFTA_SET_ELEM_FLAGS",
        "NFTA_SET_ELEM_USERDATA",
        "NFTA_SET_ELEM_KEY_END",
    }
    if extra:
        raise NotUnderstood(f"set elements with {', '.join(sorted(extra))}")
    key = _data_value(attrs.get("NFTA_SET_ELEM_KEY"))
    if "NFTA_SET_ELEM_KEY_END" in attrs and _data_value(attrs["NFTA_SET_ELEM_KEY_END"]) != key:
        raise NotUnderstood("concatenated intervals")
    end = _ELEM_INTERVAL_END in (attrs.get("NFTA_SET_ELEM_FLAGS") or ())
    data = None
    if head.is_map and not end:
        verdict = dict(attrs.get("NFTA_SET_ELEM_DATA", {}).get("attrs", []))
        data = verdict_json(dict(verdict.get("NFTA_DATA_VERDICT", {}).get("attrs", [])))
    note = None
    for name, value in attrs.get("NFTA_SET_ELEM_USERDATA") or ():
        if name == "NFTNL_UDATA_SET_ELEM_COMMENT" and isinstance(value, bytes):
            note = value.rstrip(b"\0").decode("utf-8", "replace")
        else:
            raise NotUnderstood(f"set element user data {name}")
    return key, end, data, note


def _data_value(body: Any) -> bytes:
    for name, value in (body or {}).get("attrs", []):
        if name == "NFTA_DATA_VALUE" and isinstance(value, bytes):
            return value
    raise NotUnderstood("a set element without a key")


def _element_json(head: SetHead, key: Any, data: Any, note: str | None) -> Any:
    if note is not None:
        key = {"elem": {"val": key, "comment": note}}
    return [key, data] if head.is_map else key


def _intervals(head: SetHead, raw: list[tuple[bytes, bool, Any, str | None]]) -> list[Any]:
    """An interval set's elements: each interval is a start element and an end element one
    past its last value (none when it runs to the top of the range)."""
    if head.key_type not in _INTERVAL_TYPES:
        raise NotUnderstood(f"interval set of data type {head.key_type}")
    size = head.key_len
    ordered = sorted(raw, key=lambda e: (be_int(e[0]), 0 if e[1] else 1))
    found: list[Any] = []
    start: tuple[int, Any, str | None] | None = None
    for key, end, data, note in ordered:
        value = be_int(key)
        if end:
            if start is not None:
                found.append(_element_json(head, _span(head, start[0], value - 1), *start[1:]))
                start = None
            continue
        if start is not None:
            raise NotUnderstood("interval start without an end")
        start = (value, data, note)
    if start is not None:
        top = (1 << (8 * size)) - 1
        found.append(_element_json(head, _span(head, start[0], top), *start[1:]))
    return found


def _span(head: SetHead, low: int, high: int) -> Any:
    size = head.key_len
    first = render(head.key_type, low.to_bytes(size, "big"))
    if low == high:
        return first
    last = render(head.key_type, high.to_bytes(size, "big"))
    if head.key_type in (TYPE_IPADDR, TYPE_IP6ADDR):
        width = size * 8
        span = high - low + 1
        if span & (span - 1) == 0 and low % span == 0:
            length = width - span.bit_length() + 1
            return {"prefix": {"addr": first, "len": length}}
    return {"range": [first, last]}
