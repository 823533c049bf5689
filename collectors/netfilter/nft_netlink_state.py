"""The state of one nft rule being decoded from netlink (``nft_netlink_rules``): what each
register holds, the statements so far, the protocols earlier matches fixed (nft's
dependencies, folded into the header fields that need them); and the helpers that read a
netlink expression's attributes. Pure."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collectors.netfilter.nft_netlink_types import VERDICT_CODES, NotUnderstood

#: ``meta nfproto`` / ``meta protocol`` values: the network header they fix.
L3_NAMES = {"ipv4": "ip", "ipv6": "ip6", "ip": "ip", "ip6": "ip6"}


@dataclass(frozen=True, slots=True)
class SetInfo:
    """What a rule needs of a set it looks up: its name and flags, its key's length, and, for
    an anonymous set (printed inline), its elements as ``nft -j`` prints them."""

    name: str
    anonymous: bool
    key_len: int
    data_type: int | None
    elements: tuple[Any, ...] = ()


SetSource = Callable[[str], SetInfo]


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a register holds: ``expr`` (the left side in ``nft -j`` form), the data type of
    the values compared with it, its size; a prefix mask applied to an address
    (``prefix``: bits), the flags a ``ct state`` was masked with, or a literal value."""

    expr: Any
    kind: int
    size: int
    field_bits: int | None = None
    prefix: int | None = None
    flags_mask: int | None = None
    literal: bytes | None = None
    depends: str | None = None


@dataclass(slots=True)
class RuleState:
    """One rule being decoded: its registers, the statements so far, nft's dependencies."""

    family: str
    sets: SetSource
    regs: dict[int, Loaded]
    out: list[Any]
    #: "l3"/"l4": the protocol a match fixed (nft's dependency) and where that match is.
    context: dict[str, tuple[Any, int | None]]
    folded: set[int]


def register(name: Any) -> int:
    """A register name as the index of its first 32-bit word (NFT_REG_1 is NFT_REG32_00)."""
    text = str(name)
    if text.startswith("NFT_REG32_"):
        return int(text[len("NFT_REG32_") :])
    if text.startswith("NFT_REG_") and text[len("NFT_REG_") :].isdigit():
        return (int(text[len("NFT_REG_") :]) - 1) * 4
    raise NotUnderstood(f"register {name}")


def load(rule: RuleState, data: Any, loaded: Loaded, attr: str) -> None:
    """``loaded`` into the register ``attr`` names; what it overwrites in part is gone."""
    start = register(data.get_attr(attr))
    end = start + _words(loaded)
    for other, held in list(rule.regs.items()):
        if other < end and start < other + _words(held):
            del rule.regs[other]
    rule.regs[start] = loaded


def _words(loaded: Loaded) -> int:
    return max(1, (loaded.size + 3) // 4)


def read_register(rule: RuleState, data: Any, attr: str) -> Loaded:
    found = rule.regs.get(register(data.get_attr(attr)))
    if found is None:
        raise NotUnderstood("a register read before it is set")
    return found


def attr_value(data: Any, attr: str) -> bytes:
    value = (data.get_attr(attr) or {}).get("attrs", [])
    for key, body in value:
        if key == "NFTA_DATA_VALUE" and isinstance(body, bytes):
            return body
    raise NotUnderstood(f"{attr} without a value")


def attr_verdict(data: Any, attr: str) -> dict[str, Any]:
    for key, body in (data.get_attr(attr) or {}).get("attrs", []):
        if key == "NFTA_DATA_VERDICT":
            return verdict_json(dict(body.get("attrs", [])))
    raise NotUnderstood(f"{attr} without a verdict")


def verdict_json(attrs: dict[str, Any]) -> dict[str, Any]:
    """``NFTA_VERDICT_*`` attributes as ``{"accept": null}``, ``{"goto": {"target": …}}``…"""
    name = VERDICT_CODES.get(str(attrs.get("NFTA_VERDICT_CODE")))
    if name is None:
        raise NotUnderstood(f"verdict {attrs.get('NFTA_VERDICT_CODE')}")
    if name in ("jump", "goto"):
        return {name: {"target": str(attrs.get("NFTA_VERDICT_CHAIN"))}}
    return {name: None}


def raw_attrs(data: Any) -> dict[int, bytes]:
    """The attributes of a decoded netlink attribute, from its bytes."""
    buffer = bytes(data.data[data.offset : data.offset + data.length])
    found: dict[int, bytes] = {}
    offset = 4
    while offset + 4 <= len(buffer):
        length, kind = struct.unpack_from("=HH", buffer, offset)
        if length < 4:
            break
        found[kind & 0x7FFF] = buffer[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return found


def use_context(rule: RuleState, layer: str, names: dict[Any, str]) -> str:
    """The protocol an earlier match fixed for ``layer``; that match is folded into this one
    (nft prints ``udp dport 53``, not ``meta l4proto udp udp dport 53``)."""
    context = rule.context.get(layer)
    if context is None or context[0] not in names:
        raise NotUnderstood(f"a header field without its {layer} protocol")
    value, index = context
    if index is not None:
        rule.folded.add(index)
    return names[value]
