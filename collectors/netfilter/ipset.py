"""``ipset save`` text into sets, and the ``-m set --match-set NAME FLAGS`` test on a packet
(Calico's and kube-proxy's IPVS-mode rules match on ipsets). Pure.

A member is matched dimension by dimension: an address or network (``hash:ip``,
``hash:net``…), a port with its protocol (``udp:53``; a bare port is TCP), an interface (not
decided). ``list:set`` is the union of its member sets. A set the dump does not show, or a
member the parser does not understand, cannot be decided."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from collectors.netfilter.steps import PROTO_NUMBERS, State, Tri

_PORT_PROTOS = {"tcp": 6, "udp": 17, "sctp": 132, "udplite": 136}


@dataclass(slots=True)
class IpSet:
    name: str
    type: str
    members: list[str] = field(default_factory=list)

    @property
    def dimensions(self) -> list[str]:
        """``hash:ip,port`` → ``["ip", "port"]``."""
        return self.type.partition(":")[2].split(",")


def parse_ipset_save(text: str) -> dict[str, IpSet]:
    """The sets of ``ipset save`` output (``create``/``add`` lines). Never raises."""
    sets: dict[str, IpSet] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "create":
            sets[parts[1]] = IpSet(parts[1], parts[2])
        elif len(parts) >= 3 and parts[0] == "add" and parts[1] in sets:
            sets[parts[1]].members.append(parts[2])
    return sets


def set_matches(
    sets: Mapping[str, IpSet], name: str, flags: str, state: State, depth: int = 0
) -> Tri:
    """Whether ``state`` is in set ``name`` with ``flags`` (``src``, ``dst,dst``…)."""
    found = sets.get(name)
    if found is None or depth > 4:
        return None
    directions = flags.split(",")
    if found.type == "list:set":
        answers = [set_matches(sets, m, flags, state, depth + 1) for m in found.members]
        return True if True in answers else (None if None in answers else False)
    dims = found.dimensions
    unsure = False
    for member in found.members:
        answer = _member_matches(member.split(","), dims, directions, state)
        if answer:
            return True
        unsure = unsure or answer is None
    return None if unsure else False


def _member_matches(values: list[str], dims: list[str], directions: list[str], state: State) -> Tri:
    if len(values) != len(dims):
        return None
    answers: list[Tri] = []
    for value, dim, direction in zip(
        values, dims, [*directions, *directions[-1:] * 3], strict=False
    ):
        src = direction == "src"
        if dim in ("ip", "net"):
            answers.append(_address(value, state.saddr if src else state.daddr))
        elif dim == "port":
            answers.append(_port(value, state, src))
        else:  # iface, mark, mac: not followed
            answers.append(None)
    if False in answers:
        return False
    return None if None in answers else True


def _address(value: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Tri:
    try:
        if "-" in value:
            low, _, high = value.partition("-")
            lo, hi = ipaddress.ip_address(low), ipaddress.ip_address(high)
            return lo.version == address.version and lo <= address <= hi  # type: ignore[operator]
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None
    return net.version == address.version and address in net


def _port(value: str, state: State, src: bool) -> Tri:
    proto, sep, port_text = value.rpartition(":")
    proto_number = _PORT_PROTOS.get(proto, PROTO_NUMBERS.get(proto)) if sep else 6
    if proto_number is None:
        return None
    if state.l4 != proto_number:
        return False
    port = state.sport if src else state.dport
    low, _, high = port_text.partition("-")
    if not low.isdigit() or (high and not high.isdigit()) or port is None:
        return None
    return int(low) <= port <= int(high or low)
