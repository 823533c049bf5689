"""The right sides of nft matches: the values a flow gives a left side (including the
sentinels for a field absent or unknown), nft's set elements (literal, prefix, range,
concatenation) and how one is compared with the other, exactly or undecided. Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from collectors.netfilter.model import parse_port
from collectors.netfilter.steps import PROTO_NUMBERS, Address, Tri, interface_matches


class Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: The packet has no such field (``udp dport`` of a TCP packet): the match fails.
ABSENT = Sentinel("absent")
#: The value cannot be known from the flow (random numbers, socket owners…).
UNKNOWN = Sentinel("unknown")
#: ``fib saddr . iif oif``: the flows' sources have a route back (rp_filter passes).
PRESENT = Sentinel("present")
RANDOM = Sentinel("random")


@dataclass(frozen=True, slots=True)
class Flags:
    """A bit set known only in part (``ct status``): the flags known set and known unset."""

    set: frozenset[str]
    unset: frozenset[str]

    def has(self, flag: str) -> Tri:
        if flag in self.set:
            return True
        return False if flag in self.unset else None


@dataclass(slots=True)
class SetIndex:
    """A named or anonymous set/map: exact elements in a dict, the rest scanned."""

    exact: dict[Any, Any] = field(default_factory=dict)
    others: list[tuple[Any, Any]] = field(default_factory=list)

    def lookup(self, value: Any) -> tuple[Tri, Any]:
        """(found, data): found None when it cannot be told."""
        if not _has_wildcard(value):
            key = _normal(value)
            if key in self.exact:
                return True, self.exact[key]
            candidates = self.others
        else:
            candidates = [*((k, d) for k, d in self.exact.items()), *self.others]
        unsure: Any = None
        for element, data in candidates:
            answer = equal(value, element)
            if answer:
                return True, data
            if answer is None and unsure is None:
                unsure = (data,)
        if unsure is not None:
            return None, unsure[0]
        return False, None


def build_index(elements: list[Any], is_map: bool) -> SetIndex:
    index = SetIndex()
    for raw in elements:
        key, data = (
            (raw[0], raw[1])
            if is_map and isinstance(raw, list) and len(raw) == 2
            else (
                raw,
                True,
            )
        )
        key = _unwrap(key)
        exact = _exact_key(key)
        if exact is not None:
            index.exact.setdefault(exact, data)
        else:
            index.others.append((key, data))
    return index


def _unwrap(element: Any) -> Any:
    if isinstance(element, dict) and isinstance(element.get("elem"), dict):
        return element["elem"].get("val")
    return element


def _exact_key(element: Any) -> Any:
    """The dict key of an element that is one exact value (None: a prefix, range, wildcard):
    addresses as their canonical text, protocol names as numbers."""
    if isinstance(element, dict):
        concat = element.get("concat")
        if not isinstance(concat, list):
            return None
        parts = tuple(_exact_key(_unwrap(p)) for p in concat)
        return None if None in parts else parts
    if isinstance(element, bool):
        return None
    if isinstance(element, int):
        return element
    if isinstance(element, str) and not element.endswith("*"):
        number = PROTO_NUMBERS.get(element)
        if number is not None:
            return number
        if ":" in element:  # IPv6: one canonical spelling
            try:
                return ipaddress.ip_address(element).compressed
            except ValueError:
                return element
        return element
    return None


def _normal(value: Any) -> Any:
    """A packet value as a dict key (see ``_exact_key``)."""
    if isinstance(value, tuple):
        return tuple(_normal(v) for v in value)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value.compressed
    if isinstance(value, str):
        return PROTO_NUMBERS.get(value, value)
    return value


def _has_wildcard(value: Any) -> bool:
    if isinstance(value, tuple):
        return any(_has_wildcard(v) for v in value)
    return (isinstance(value, str) and value.endswith("+")) or isinstance(value, Sentinel)


def equal(value: Any, element: Any) -> Tri:
    """Whether packet ``value`` is ``element`` (a literal, prefix, range or concatenation)."""
    element = _unwrap(element)
    if value is UNKNOWN or value is RANDOM:
        return None
    if value is ABSENT:
        return False
    if value is PRESENT:
        return None if element not in (False, 0) else False
    if isinstance(value, Flags):
        return value.has(str(element)) if isinstance(element, str) else None
    if isinstance(value, tuple):
        parts = element.get("concat") if isinstance(element, dict) else None
        if not isinstance(parts, list) or len(parts) != len(value):
            return None
        answers = [equal(v, p) for v, p in zip(value, parts, strict=True)]
        if False in answers:
            return False
        return None if None in answers else True
    if isinstance(element, dict):
        return _equal_structured(value, element)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return _address_in(value, str(element))
    if isinstance(value, int) and not isinstance(value, bool):
        number = element_number(element)
        return None if number is None else value == number
    if isinstance(value, str):
        if isinstance(element, str) and (element.endswith("*") or value.endswith("+")):
            return interface_matches(value, element)
        return value == str(element)
    return None


def _equal_structured(value: Any, element: dict[str, Any]) -> Tri:
    if "prefix" in element and isinstance(element["prefix"], dict):
        prefix = element["prefix"]
        return _address_in(value, f"{prefix.get('addr')}/{prefix.get('len')}")
    if "range" in element and isinstance(element["range"], list) and len(element["range"]) == 2:
        low, high = element["range"]
        if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            try:
                lo, hi = ipaddress.ip_address(str(low)), ipaddress.ip_address(str(high))
            except ValueError:
                return None
            return value.version == lo.version and lo <= value <= hi  # type: ignore[operator]
        lo_n, hi_n = element_number(low), element_number(high)
        if isinstance(value, int) and lo_n is not None and hi_n is not None:
            return lo_n <= value <= hi_n
    return None


def _address_in(address: Address, text: str) -> Tri:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return address.version == net.version and address in net


def element_number(element: Any) -> int | None:
    if isinstance(element, bool):
        return None
    if isinstance(element, int):
        return element
    if isinstance(element, str):
        if element in PROTO_NUMBERS:
            return PROTO_NUMBERS[element]
        if element.startswith("0x"):
            try:
                return int(element, 16)
            except ValueError:
                return None
        return parse_port(element)
    return None
