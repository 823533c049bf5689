"""A flow's packets on their way through the node: the routing the evaluator does (the
flow's routes, longest prefix first; local delivery), the packet's first state, the answer
to a packet that got through, and the encapsulating packet of an overlay link. Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import replace

from collectors.netfilter.flows import EPHEMERAL_PORT, Family, Packet, Route, Tunnel
from collectors.netfilter.steps import PROTO_NUMBERS, Address, IpNetwork, State

Routes = list[tuple[IpNetwork, Route]]


def parse_routes(routes: Sequence[Route]) -> Routes:
    parsed: Routes = []
    for route in routes:
        try:
            parsed.append((ipaddress.ip_network(route.network, strict=False), route))
        except ValueError:
            continue
    parsed.sort(key=lambda r: -r[0].prefixlen)
    return parsed


def lookup_route(routes: Routes, address: Address) -> Route | None:
    for net, route in routes:
        if net.version == address.version and address in net:
            return route
    return None


def initial_state(packet: Packet, routes: Routes) -> State:
    local = frozenset(
        net.network_address for net, route in routes if route.local and net.num_addresses == 1
    )
    l4 = packet.l4proto
    number = l4 if isinstance(l4, int) else PROTO_NUMBERS.get(l4, -1)
    state = State(
        family=packet.family,
        saddr=ipaddress.ip_address(packet.saddr),
        daddr=ipaddress.ip_address(packet.daddr),
        l4=number,
        sport=packet.sport,
        dport=packet.dport,
        iif=packet.iif if packet.origin == "in" else None,
        oif=None,
        ct=packet.ct_state,
        local=local,
        mark=packet.mark,
        reply=packet.is_reply,
    )
    return state


def route(state: State, routes: Routes) -> State:
    route = lookup_route(routes, state.daddr)
    if state.to_local or state.is_local(state.daddr) or (route is not None and route.local):
        # Sent by the host to itself: out through the loopback.
        return replace(state, to_local=True, oif=None if state.iif else "lo")
    return replace(state, oif=route.dev if route is not None else None)


def reply_packet(state: State) -> Packet:
    """The answer to a query that got through: from where it went, back to where it came from."""
    local_answer = state.to_local
    return Packet(
        family="ipv4" if state.family == "ipv4" else "ipv6",
        origin="local" if local_answer else "in",
        saddr=str(state.daddr),
        daddr=str(state.saddr),
        l4proto=proto_name(state.l4),
        sport=state.dport,
        dport=state.sport,
        iif=None if local_answer else state.oif,
        # An untracked query left no conntrack entry: its answer starts a new one.
        ct_state="new" if state.ct == "untracked" else "established",
        is_reply=True,
        note="reply",
    )


def outer_packet(tunnel: Tunnel, incoming: bool) -> Packet:
    """The encapsulating packet: a new flow from the peer to the node's overlay port, or
    from the node to the peer's."""
    family: Family = "ipv4" if ipaddress.ip_address(tunnel.local).version == 4 else "ipv6"
    ports = tunnel.port is not None
    if incoming:
        return Packet(
            family,
            "in",
            tunnel.remote,
            tunnel.local,
            tunnel.l4proto,
            tunnel.port,
            EPHEMERAL_PORT if ports else None,
            iif=tunnel.underlay,
            note=f"{tunnel.dev} encapsulation",
        )
    return Packet(
        family,
        "local",
        tunnel.local,
        tunnel.remote,
        tunnel.l4proto,
        tunnel.port,
        EPHEMERAL_PORT if ports else None,
        note=f"{tunnel.dev} encapsulation",
    )


def proto_name(number: int) -> str | int:
    return {6: "tcp", 17: "udp"}.get(number, number)
