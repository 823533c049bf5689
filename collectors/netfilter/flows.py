"""The flows the cluster's DNS needs on this node, built from what the node itself shows
(``NodeFacts``), as packets the evaluator (``collectors.netfilter.evaluate``) walks through
the node's rules. Pure.

Flow names (the ``flow`` label of ``nodediag_dns_flow_ok``):

- ``pod-dns-udp``, ``pod-dns-tcp``: a pod (arriving on a pod interface, source in the node's
  pod CIDR) → the cluster DNS Service IP, port 53: PREROUTING (Service DNAT) then INPUT (a
  node-local cache) or FORWARD + POSTROUTING (an endpoint on this or another node);
- ``host-dns-udp``, ``host-dns-tcp``: the host network (kubelet, hostNetwork pods) → the
  cluster DNS: OUTPUT + POSTROUTING;
- ``dns-replies``: the answers to both, conntrack ESTABLISHED;
- ``overlay-vxlan``, ``overlay-ipip``, ``overlay-wireguard``: the overlay transport from
  peer nodes, INPUT, for each overlay link the node has;
- ``dns-upstream-udp``, ``dns-upstream-tcp``: the DNS pods → the nameservers of the resolver
  file kubelet gives them.

A flow whose inputs are unknown (no pod CIDR known, …) has no packets and says why in
``Flow.unknown``: it is reported as unknown, never guessed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

Family = Literal["ipv4", "ipv6"]
Origin = Literal["in", "local"]
CtState = Literal["new", "established", "related", "untracked", "invalid"]

FLOW_NAMES = (
    "pod-dns-udp",
    "pod-dns-tcp",
    "host-dns-udp",
    "host-dns-tcp",
    "dns-replies",
    "overlay-vxlan",
    "overlay-ipip",
    "overlay-wireguard",
    "dns-upstream-udp",
    "dns-upstream-tcp",
)


@dataclass(frozen=True, slots=True)
class OverlayLink:
    """An overlay link of the node: ``kind`` is vxlan, ipip or wireguard; ``port`` the UDP
    port its packets arrive on (vxlan ``dstport``, wireguard ``listen-port``), ``None`` for
    ipip; ``family`` the underlay's address family its packets travel in (a vxlan link's
    local or group address; ipip is IPv4), ``None`` when the link does not say."""

    name: str
    kind: Literal["vxlan", "ipip", "wireguard"]
    port: int | None = None
    family: Family | None = None

    @property
    def underlay(self) -> Family | None:
        return "ipv4" if self.kind == "ipip" else self.family


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the node shows about its network. ``pod_cidrs`` are this node's pod subnets
    (flannel's ``FLANNEL_SUBNET``, the CNI's host-local ranges); ``cluster_cidrs`` the whole
    cluster's pod network (flannel's ``FLANNEL_NETWORK``), routed over the overlay;
    ``pod_interfaces`` the interfaces pods arrive on (``cni0``, ``cali+``: iptables ``+``
    wildcards); ``local_dns_cache`` the addresses a node-local DNS cache binds (NodeLocal
    DNSCache's 169.254.20.10, and the kube-dns IP it also binds); ``service_ips_local`` is true
    in kube-proxy's IPVS mode (Service IPs are bound on ``kube-ipvs0``); ``peer_nodes`` other
    nodes' addresses when known (the overlay flows' source; a documentation address
    otherwise)."""

    cluster_dns: tuple[str, ...] = ()
    pod_cidrs: tuple[str, ...] = ()
    cluster_cidrs: tuple[str, ...] = ()
    node_addresses: tuple[str, ...] = ()
    pod_interfaces: tuple[str, ...] = ()
    uplink: str | None = None
    overlay: tuple[OverlayLink, ...] = ()
    upstream_dns: tuple[str, ...] = ()
    local_dns_cache: tuple[str, ...] = ()
    dns_endpoints: tuple[str, ...] = ()
    service_ips_local: bool = False
    peer_nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    """One route of the flow's routing table: ``network`` → ``dev``; ``local`` for the node's
    own addresses (delivered on INPUT). Longest prefix wins."""

    network: str
    dev: str | None
    local: bool = False


@dataclass(frozen=True, slots=True)
class Packet:
    """The first packet of a flow, as the node sees it. ``origin`` ``in``: it arrives on
    ``iif`` (PREROUTING, then INPUT or FORWARD + POSTROUTING by the route of its destination
    after PREROUTING's DNAT); ``local``: the host sends it (OUTPUT + POSTROUTING, ``iif``
    unset). ``l4proto`` is ``udp``, ``tcp`` or an IP protocol number. ``mark`` is the packet
    mark it starts with. ``replies``: the flow is the answers to this query (each way the query
    gets through is answered back along it); ``is_reply``: this packet is itself an answer."""

    family: Family
    origin: Origin
    saddr: str
    daddr: str
    l4proto: str | int
    dport: int | None = None
    sport: int | None = None
    iif: str | None = None
    ct_state: CtState = "new"
    mark: int = 0
    replies: bool = False
    is_reply: bool = False
    note: str = ""


@dataclass(frozen=True, slots=True)
class Tunnel:
    """An overlay link's encapsulation: a packet routed out of ``dev`` leaves the node as an
    ``l4proto`` packet (to ``port``) from ``local`` to ``remote`` out of ``underlay``, which
    the node sends itself (OUTPUT); a packet arriving on ``dev`` first arrived so, from
    ``remote`` to ``local`` on ``underlay`` (a new flow to ``port`` on INPUT)."""

    dev: str
    l4proto: str | int
    port: int | None
    local: str
    remote: str
    underlay: str


@dataclass(frozen=True, slots=True)
class Flow:
    """A flow: the packets that must all pass (one per path it can take), the routes the
    evaluator routes them by, the overlay encapsulations on the way, and ``unknown`` (why it
    cannot be evaluated) when the node did not show its inputs."""

    name: str
    family: Family
    packets: tuple[Packet, ...] = ()
    routes: tuple[Route, ...] = ()
    unknown: str | None = None
    tunnels: tuple[Tunnel, ...] = ()


#: Stands for a peer node when the node does not show one (RFC 5737 / 3849 documentation).
PEER_PLACEHOLDER = {"ipv4": "192.0.2.1", "ipv6": "2001:db8::1"}
DEFAULT_PORTS = {"vxlan": 8472, "wireguard": 51820}
EPHEMERAL_PORT = 40000


def dns_flows(facts: NodeFacts) -> list[Flow]:
    """The flows of ``FLOW_NAMES`` for each address family of the cluster DNS (ipv4 when none
    is known: the flows then say so). Overlay flows exist only for the overlay links the node
    has."""
    families = [f for f in ("ipv4", "ipv6") if _of(facts.cluster_dns, f)] or ["ipv4"]
    flows: list[Flow] = []
    for family in families:
        flows.extend(_family_flows(facts, family))  # type: ignore[arg-type]
    return flows


def _family_flows(facts: NodeFacts, family: Family) -> list[Flow]:
    tunnels = node_tunnels(facts)
    routes = node_routes(facts, family)
    # The overlay's own packets may travel in the other family: route them too.
    for other in dict.fromkeys(_family_of(t.local) for t in tunnels if t.local):
        if other != family:
            routes += node_routes(facts, other)
    pod = _pod_queries(facts, family)
    host = _host_queries(facts, family)
    flows = [
        _flow(name, family, routes, packets, tunnels)
        for name, packets in (
            ("pod-dns-udp", _only(pod, "udp")),
            ("pod-dns-tcp", _only(pod, "tcp")),
            ("host-dns-udp", _only(host, "udp")),
            ("host-dns-tcp", _only(host, "tcp")),
        )
    ]
    replies = _replies(pod, host)
    flows.append(_flow("dns-replies", family, routes, replies, tunnels))
    flows.extend(_overlay_flows(facts, family, routes))
    upstream = _upstream_queries(facts, family)
    flows.append(_flow("dns-upstream-udp", family, routes, _only(upstream, "udp"), tunnels))
    flows.append(_flow("dns-upstream-tcp", family, routes, _only(upstream, "tcp"), tunnels))
    return flows


def _flow(
    name: str,
    family: Family,
    routes: tuple[Route, ...],
    packets: tuple[Packet, ...] | str,
    tunnels: tuple[Tunnel, ...] = (),
) -> Flow:
    if isinstance(packets, str):
        return Flow(name, family, unknown=packets)
    return Flow(name, family, packets, routes, tunnels=tunnels)


def node_tunnels(facts: NodeFacts) -> tuple[Tunnel, ...]:
    """The overlay links' encapsulation between this node's address and a peer's, in the
    link's underlay family (unknown: the family of the node's first address)."""
    if not facts.node_addresses or facts.uplink is None:
        return ()
    tunnels = []
    for link in facts.overlay:
        family = link.underlay or _family_of(facts.node_addresses[0])
        local = next(iter(_of(facts.node_addresses, family)), None)
        if local is None:
            continue
        remote = next(iter(_of(facts.peer_nodes, family)), PEER_PLACEHOLDER[family])
        proto: str | int = 4 if link.kind == "ipip" else "udp"
        port = None if link.kind == "ipip" else link.port or DEFAULT_PORTS[link.kind]
        tunnels.append(Tunnel(link.name, proto, port, local, remote, facts.uplink))
    return tuple(tunnels)


def _family_of(address: str) -> Family:
    return "ipv4" if ipaddress.ip_address(address).version == 4 else "ipv6"


def _only(packets: tuple[Packet, ...] | str, proto: str) -> tuple[Packet, ...] | str:
    if isinstance(packets, str):
        return packets
    return tuple(p for p in packets if p.l4proto == proto)


def _replies(
    pod: tuple[Packet, ...] | str, host: tuple[Packet, ...] | str
) -> tuple[Packet, ...] | str:
    known = [p for group in (pod, host) if not isinstance(group, str) for p in group]
    if not known:
        return pod if isinstance(pod, str) else str(host)
    return tuple(replace(p, replies=True) for p in known)


def node_routes(facts: NodeFacts, family: Family) -> tuple[Route, ...]:
    """The routes the flows are routed by: the node's own addresses (and a node-local cache's,
    and in IPVS mode the Service IPs) are local; this node's pod CIDR goes to the pod
    interface; the rest of the cluster's pod network over the overlay; the rest to the uplink."""
    full = 32 if family == "ipv4" else 128
    local = [*facts.node_addresses, *facts.local_dns_cache]
    if facts.service_ips_local:
        local.extend(facts.cluster_dns)
    routes = [Route(f"{a}/{full}", "lo", local=True) for a in _of(local, family)]
    pod_dev = facts.pod_interfaces[0] if facts.pod_interfaces else None
    routes.extend(Route(c, pod_dev) for c in _of(facts.pod_cidrs, family))
    # The pods of a family ride the overlay link whose packets travel in that family (Calico's
    # vxlan-v6.calico, flannel's flannel-v6.1), else the first one.
    same = (o.name for o in facts.overlay if o.underlay == family)
    overlay = next(same, None) or next((o.name for o in facts.overlay), facts.uplink)
    routes.extend(Route(c, overlay) for c in _of(facts.cluster_cidrs, family))
    routes.append(Route("0.0.0.0/0" if family == "ipv4" else "::/0", facts.uplink))
    return tuple(routes)


def _dns_targets(facts: NodeFacts, family: Family) -> list[str]:
    return list(dict.fromkeys(_of([*facts.cluster_dns, *facts.local_dns_cache], family)))


def _pod_queries(facts: NodeFacts, family: Family) -> tuple[Packet, ...] | str:
    targets = _dns_targets(facts, family)
    if not targets:
        return "the cluster DNS IP is unknown (--cluster-dns)"
    pod_ip = _host_in(_of(facts.pod_cidrs, family))
    if pod_ip is None:
        return "this node's pod CIDR is unknown (--pod-cidr)"
    if not facts.pod_interfaces:
        return "the interface pods arrive on is unknown (no CNI bridge or pod link found)"
    iif = facts.pod_interfaces[0]
    return tuple(
        Packet(family, "in", pod_ip, dns, proto, 53, EPHEMERAL_PORT, iif=iif)
        for proto in ("udp", "tcp")
        for dns in targets
    )


def _host_queries(facts: NodeFacts, family: Family) -> tuple[Packet, ...] | str:
    targets = _dns_targets(facts, family)
    if not targets:
        return "the cluster DNS IP is unknown (--cluster-dns)"
    source = next(iter(_of(facts.node_addresses, family)), None)
    if source is None:
        return "the node's own address is unknown"
    return tuple(
        Packet(family, "local", source, dns, proto, 53, EPHEMERAL_PORT)
        for proto in ("udp", "tcp")
        for dns in targets
    )


def _overlay_flows(facts: NodeFacts, family: Family, routes: tuple[Route, ...]) -> list[Flow]:
    node = next(iter(_of(facts.node_addresses, family)), None)
    peer = next(iter(_of(facts.peer_nodes, family)), PEER_PLACEHOLDER[family])
    note = "" if _of(facts.peer_nodes, family) else f"peer node unknown: {peer} stands for it"
    flows: list[Flow] = []
    for kind, name in (
        ("vxlan", "overlay-vxlan"),
        ("ipip", "overlay-ipip"),
        ("wireguard", "overlay-wireguard"),
    ):
        # A link whose packets travel in the other family has no flow in this one.
        links = [o for o in facts.overlay if o.kind == kind and o.underlay in (None, family)]
        if not links:
            continue
        if node is None or facts.uplink is None:
            flows.append(Flow(name, family, unknown="the node's address or uplink is unknown"))
            continue
        packets = tuple(
            Packet(
                family,
                "in",
                peer,
                node,
                4 if kind == "ipip" else "udp",
                None if kind == "ipip" else link.port or DEFAULT_PORTS[kind],
                None if kind == "ipip" else EPHEMERAL_PORT,
                iif=facts.uplink,
                note=f"{link.name}; {note}".rstrip("; "),
            )
            for link in links
        )
        flows.append(Flow(name, family, tuple(dict.fromkeys(packets)), routes))
    return flows


def _upstream_queries(facts: NodeFacts, family: Family) -> tuple[Packet, ...] | str:
    upstream = [
        u for u in _of(facts.upstream_dns, family) if not ipaddress.ip_address(u).is_loopback
    ]
    if not upstream:
        return "the upstream nameservers are unknown (resolver file kubelet gives pods)"
    packets: list[Packet] = []
    pod_ip = next(iter(_of(facts.dns_endpoints, family)), None) or _host_in(
        _of(facts.pod_cidrs, family)
    )
    if pod_ip is not None and facts.pod_interfaces:
        iif = facts.pod_interfaces[0]
        packets += [
            Packet(family, "in", pod_ip, u, p, 53, EPHEMERAL_PORT, iif=iif)
            for p in ("udp", "tcp")
            for u in upstream
        ]
    source = next(iter(_of(facts.node_addresses, family)), None)
    if facts.local_dns_cache and source is not None:
        packets += [
            Packet(family, "local", source, u, p, 53, EPHEMERAL_PORT)
            for p in ("udp", "tcp")
            for u in upstream
        ]
    if not packets:
        return "the DNS pods' source (pod CIDR and pod interface) is unknown"
    return tuple(packets)


def _of(addresses: Iterable[str], family: str) -> list[str]:
    version = 4 if family == "ipv4" else 6
    found = []
    for text in addresses:
        try:
            if ipaddress.ip_network(text, strict=False).version == version:
                found.append(text)
        except ValueError:
            continue
    return found


def _host_in(cidrs: list[str]) -> str | None:
    """An address inside the first pod CIDR (its second host: the first is the gateway)."""
    for text in cidrs:
        net = ipaddress.ip_network(text, strict=False)
        if net.num_addresses >= 4:
            return str(net.network_address + 2)
    return None
