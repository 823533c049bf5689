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

from dataclasses import dataclass
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
    ipip."""

    name: str
    kind: Literal["vxlan", "ipip", "wireguard"]
    port: int | None = None


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
    mark it starts with."""

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
    note: str = ""


@dataclass(frozen=True, slots=True)
class Flow:
    """A flow: the packets that must all pass (one per path it can take), the routes the
    evaluator routes them by, and ``unknown`` (why it cannot be evaluated) when the node did
    not show its inputs."""

    name: str
    family: Family
    packets: tuple[Packet, ...] = ()
    routes: tuple[Route, ...] = ()
    unknown: str | None = None


def dns_flows(facts: NodeFacts) -> list[Flow]:
    """The flows of ``FLOW_NAMES`` for each address family the facts have, in that order."""
    raise NotImplementedError
