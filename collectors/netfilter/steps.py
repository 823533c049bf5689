"""What the flow evaluator runs: a packet's ``State`` as it crosses the hooks, and a rule
compiled into ``Step``s (tests on the packet, effects on it, a verdict), whatever syntax the
rule came from. A test answers True, False, or None when it cannot be decided from what the
rules and the flow show (the evaluator then follows both ways). Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTO_NUMBERS = {
    "icmp": 1,
    "igmp": 2,
    # IP-in-IP (what Calico's tunl0 sends) is protocol 4, "ipencap" in /etc/protocols, and
    # "ipv4" in IANA's list; "ipip" is protocol 94 to iptables and nft alike.
    "ipencap": 4,
    "ipv4": 4,
    "4": 4,
    "tcp": 6,
    "udp": 17,
    "ipv6": 41,
    "ipip": 94,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "icmpv6": 58,
    "ipv6-icmp": 58,
    "icmp6": 58,
    "sctp": 132,
    "udplite": 136,
}
PORT_PROTOS = frozenset({6, 17, 33, 132, 136})


@dataclass(frozen=True, slots=True)
class State:
    """A packet at one point of its path. ``iif``/``oif`` may end in ``+`` (any interface with
    that prefix: the flow only knows the family of interfaces, e.g. Calico's ``cali+``);
    ``oif`` is None before routing or when no route is known. ``ct`` is the conntrack state
    the packet has after the conntrack hook (``new``, ``established``, ``related``,
    ``untracked``, ``invalid``); ``before_conntrack`` is true in chains that run before it
    (priority below -200), where the kernel sees no conntrack entry yet."""

    family: str
    saddr: Address
    daddr: Address
    l4: int
    sport: int | None
    dport: int | None
    iif: str | None
    oif: str | None
    ct: str
    local: frozenset[Address]
    mark: int = 0
    ctmark: int = 0
    orig_daddr: Address | None = None
    orig_dport: int | None = None
    to_local: bool = False
    reply: bool = False
    nat_done: bool = False
    hook: str = ""
    before_conntrack: bool = False

    @property
    def ct_seen(self) -> str:
        if self.ct == "untracked":
            return "untracked"
        return "invalid" if self.before_conntrack else self.ct

    @property
    def dnat(self) -> bool:
        return self.orig_daddr is not None

    def is_local(self, address: Address) -> bool:
        return address in self.local or address.is_loopback

    def address_type(self, address: Address) -> str:
        if self.is_local(address):
            return "local"
        if address.is_multicast:
            return "multicast"
        if isinstance(address, ipaddress.IPv4Address) and int(address) == 0xFFFFFFFF:
            return "broadcast"
        return "unicast"


Tri = bool | None


@dataclass(frozen=True, slots=True)
class Test:
    """A match: ``check`` answers for a state; ``negated`` inverts a decided answer."""

    text: str
    check: Callable[[State], Tri]
    negated: bool = False
    random: bool = False

    def test(self, state: State) -> Tri:
        answer = self.check(state)
        if answer is None or not self.negated:
            return answer
        return not answer


@dataclass(frozen=True, slots=True)
class Effect:
    """A statement that changes the packet and goes on (MARK, CONNMARK, NOTRACK)."""

    text: str
    apply: Callable[[State], State]


VerdictKind = Literal["accept", "drop", "reject", "return", "jump", "goto", "queue", "unknown"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The end of a rule: ``accept`` ends the base chain (DNAT, SNAT, MASQUERADE … too, after
    their ``effect``); ``drop``/``reject`` end the packet; ``queue`` hands it to a program
    and ``unknown`` is a target the evaluator does not know (both: may drop)."""

    kind: VerdictKind
    chain: str | None = None
    effect: Callable[[State], State] | None = None
    text: str = ""
    #: This verdict comes from a map named like kube-proxy's no-endpoints map.
    via_map: str | None = None


@dataclass(frozen=True, slots=True)
class Lookup:
    """An nft verdict map: ``choose`` gives the verdict for a state (None: no element
    matches: the rule ends there), or ``UNDECIDED`` with every verdict the map can give."""

    text: str
    choose: Callable[[State], Verdict | tuple[Verdict, ...] | None]
    random: bool = False


Step = Test | Effect | Verdict | Lookup


@dataclass(frozen=True, slots=True)
class Compiled:
    """A rule as steps, in order. ``inert``: it can neither stop the packet nor change it
    (LOG, counters, comments): the evaluator skips it without testing its matches."""

    steps: tuple[Step, ...]
    inert: bool = False


INERT = Compiled((), inert=True)


# --------------------------------------------------------------------------- common tests


def parse_network(text: str) -> IpNetwork | None:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


def in_networks(address: Address, nets: tuple[IpNetwork, ...]) -> bool:
    return any(address.version == net.version and address in net for net in nets)


def interface_matches(packet: str | None, rule: str) -> Tri:
    """Whether interface ``packet`` (possibly a ``+`` family) matches rule name ``rule``
    (iptables ``+`` or nft ``*`` suffix: a prefix). None: cannot tell."""
    if packet is None:
        return None
    rule_prefix = rule[:-1] if rule.endswith(("+", "*")) else None
    packet_prefix = packet[:-1] if packet.endswith("+") else None
    if packet_prefix is None:
        if rule_prefix is None:
            return packet == rule
        return packet.startswith(rule_prefix)
    if rule_prefix is not None and packet_prefix.startswith(rule_prefix):
        return True
    # The packet's interface is "packet_prefix…": does a name of that family match the rule?
    name = rule_prefix if rule_prefix is not None else rule
    if name.startswith(packet_prefix) or packet_prefix.startswith(name):
        return None
    return False


def apply_mark(value: int, mask: int, current: int, how: str) -> int:
    """iptables MARK/CONNMARK arithmetic: set-xmark ``(cur & ~mask) ^ value``, set-mark
    ``(cur & ~mask) | value``, and/or/xor."""
    full = 0xFFFFFFFF
    if how == "set-xmark":
        return ((current & ~mask) ^ value) & full
    if how == "set-mark":
        return ((current & ~mask) | value) & full
    if how == "and":
        return current & value
    if how == "or":
        return current | value
    if how == "xor":
        return current ^ value
    return current


def with_mark(how: str, value: int, mask: int, conn: bool) -> Callable[[State], State]:
    def apply(state: State) -> State:
        if conn:
            return replace(state, ctmark=apply_mark(value, mask, state.ctmark, how))
        return replace(state, mark=apply_mark(value, mask, state.mark, how))

    return apply


def notrack(state: State) -> State:
    return replace(state, ct="untracked")


def dnat_to(address: Address | None, port: int | None) -> Callable[[State], State]:
    def apply(state: State) -> State:
        if state.ct != "new":
            return state
        return replace(
            state,
            daddr=address if address is not None else state.daddr,
            dport=port if port is not None else state.dport,
            orig_daddr=state.orig_daddr or state.daddr,
            orig_dport=state.orig_dport if state.orig_daddr else state.dport,
        )

    return apply


def redirect(port: int | None) -> Callable[[State], State]:
    def apply(state: State) -> State:
        return replace(
            state,
            dport=port if port is not None else state.dport,
            orig_daddr=state.orig_daddr or state.daddr,
            orig_dport=state.orig_dport if state.orig_daddr else state.dport,
            to_local=True,
        )

    return apply


def undecided(text: str, random: bool = False) -> Test:
    return Test(text, lambda _state: None, random=random)
