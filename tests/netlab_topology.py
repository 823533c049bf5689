"""The lab's network (tests/netlab.py): its namespaces by role, links, addresses and routes,
IPv4 and IPv6, and the vxlan link with an IPv6 underlay a scenario may ask for."""

from __future__ import annotations

import json
import subprocess

import test_firewall_netns

CLUSTER_DNS = "10.43.0.10"
POD_CIDR = "10.42.0.0/16"
NODE_POD_CIDR = "10.42.0.0/24"
POD_IP = "10.42.0.2"
NODE_IP = "10.99.0.1"
NODE_FLANNEL_IP = "10.42.0.0"
PEER_IP = "10.99.0.2"
DNS_POD_IP = "10.42.1.2"
UPSTREAM_DNS = "10.99.0.3"
# IPv6, beside IPv4 on the same links (the pods' IPv6 rides the IPv4 vxlan link too).
CLUSTER_DNS6 = "fd43::a"
POD_CIDR6 = "fd42::/56"
NODE_POD_CIDR6 = "fd42::/64"
POD_IP6 = "fd42::2"
NODE_IP6 = "fd99::1"
NODE_FLANNEL_IP6 = "fd42::ff"
PEER_IP6 = "fd99::2"
DNS_POD_IP6 = "fd42:0:0:1::2"
UPSTREAM_DNS6 = "fd99::3"
#: NodeLocal DNSCache's address, and the kube-dns IP it binds too (iptables mode).
NODE_CACHE = ("169.254.20.10", CLUSTER_DNS)
VXLAN_PORT = 8472
WIREGUARD_PORT = 51820
PROBE_NAME = "kubernetes.default.svc.cluster.local"
ROLES = ("node", "pod", "peer", "dnspod", "upstream")
#: Lab features a scenario may ask for beyond the IPv4 flows: IPv6 flows (``vxlan6``: the
#: pods' IPv6 over a vxlan link of its own with an IPv6 underlay, as Calico's
#: vxlan-v6.calico), NodeLocal DNSCache on the node, IP-in-IP and WireGuard overlay packets.
FEATURES = frozenset({"ipv6", "vxlan6", "nodelocal", "ipip", "wireguard"})
VXLAN6 = "vxlan-v6.calico"
VXLAN6_PORT = 4789


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Netns(test_firewall_netns.Netns):
    """A namespace of the lab, by name (``run`` a command in it, ``ip -n`` it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str) -> None:
        ip("-n", self.name, *args)


def veth(ns: dict[str, Netns], a: str, a_if: str, b: str, b_if: str) -> None:
    ip(
        "link", "add", a_if, "netns", ns[a].name, "type", "veth",
        "peer", "name", b_if, "netns", ns[b].name,
    )  # fmt: skip


def build(ns: dict[str, Netns]) -> None:
    """The namespaces of ``ns`` (by role) and the links, addresses and routes between them."""
    for netns in ns.values():
        ip("netns", "add", netns.name)
        for scope in ("all", "default"):  # IPv6 addresses usable at once (links too)
            netns.run(["sysctl", "-qw", f"net.ipv6.conf.{scope}.accept_dad=0"])
        netns.ip("link", "set", "lo", "up")
    node, pod, peer, dnspod, upstream = (ns[r] for r in ROLES)
    veth(ns, "node", "vpod", "pod", "eth0")
    veth(ns, "node", "eth0", "peer", "vnode")
    veth(ns, "upstream", "eth0", "peer", "vup")
    veth(ns, "peer", "vdns", "dnspod", "eth0")
    peer.ip("link", "add", "br0", "type", "bridge")
    for port in ("vnode", "vup"):
        peer.ip("link", "set", port, "master", "br0")
        peer.ip("link", "set", port, "up")
    peer.ip("addr", "add", f"{PEER_IP}/24", "dev", "br0")
    peer.ip("link", "set", "br0", "up")
    for bridged, port, gateway in ((node, "vpod", "10.42.0.1"), (peer, "vdns", "10.42.1.1")):
        bridged.ip("link", "add", "cni0", "type", "bridge")
        bridged.ip("addr", "add", f"{gateway}/24", "dev", "cni0")
        bridged.ip("link", "set", port, "master", "cni0")
        for ifname in ("cni0", port):
            bridged.ip("link", "set", ifname, "up")
        bridged.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    # A Docker-shaped bridge on the node: Docker's rules name it.
    node.ip("link", "add", "docker0", "type", "bridge")
    node.ip("addr", "add", "172.17.0.1/16", "dev", "docker0")
    for leaf, address, gateway in (
        (pod, POD_IP, "10.42.0.1"),
        (dnspod, DNS_POD_IP, "10.42.1.1"),
    ):
        leaf.ip("addr", "add", f"{address}/24", "dev", "eth0")
        leaf.ip("link", "set", "eth0", "up")
        leaf.ip("route", "add", "default", "via", gateway)
    upstream.ip("addr", "add", f"{UPSTREAM_DNS}/24", "dev", "eth0")
    upstream.ip("link", "set", "eth0", "up")
    upstream.ip("route", "add", NODE_POD_CIDR, "via", NODE_IP)
    node.ip("addr", "add", f"{NODE_IP}/24", "dev", "eth0")
    node.ip("link", "set", "eth0", "up")
    # The Service range leaves by the default route, as on a node.
    node.ip("route", "add", "default", "via", PEER_IP)
    flannel(node, NODE_IP, NODE_FLANNEL_IP, "eth0")
    flannel(peer, PEER_IP, "10.42.1.0", "br0")
    flannel_route(node, peer, PEER_IP, "10.42.1.0")
    flannel_route(peer, node, NODE_IP, NODE_FLANNEL_IP)
    build_ipv6(ns)


def build_ipv6(ns: dict[str, Netns]) -> None:
    """The same topology in IPv6 (no duplicate address detection: usable at once)."""
    node, pod, peer, dnspod, upstream = (ns[r] for r in ROLES)
    for netns in (node, peer):
        netns.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    for netns, ifname, address in (
        (node, "cni0", "fd42::1/64"),
        (peer, "cni0", "fd42:0:0:1::1/64"),
        (pod, "eth0", f"{POD_IP6}/64"),
        (dnspod, "eth0", f"{DNS_POD_IP6}/64"),
        (node, "eth0", f"{NODE_IP6}/64"),
        (peer, "br0", f"{PEER_IP6}/64"),
        (upstream, "eth0", f"{UPSTREAM_DNS6}/64"),
        (node, "flannel.1", f"{NODE_FLANNEL_IP6}/128"),
        (peer, "flannel.1", "fd42:0:0:1::ff/128"),
    ):
        netns.ip("-6", "addr", "add", address, "dev", ifname, "nodad")
    pod.ip("-6", "route", "add", "default", "via", "fd42::1")
    dnspod.ip("-6", "route", "add", "default", "via", "fd42:0:0:1::1")
    upstream.ip("-6", "route", "add", NODE_POD_CIDR6, "via", NODE_IP6)
    node.ip("-6", "route", "add", "default", "via", PEER_IP6)
    for here, there, vtep, subnet in (
        (node, peer, "fd42:0:0:1::ff", "fd42:0:0:1::/64"),
        (peer, node, NODE_FLANNEL_IP6, NODE_POD_CIDR6),
    ):
        mac = mac_of(there, "flannel.1")
        here.ip("-6", "route", "add", subnet, "via", vtep, "dev", "flannel.1", "onlink")
        here.ip("-6", "neigh", "add", vtep, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")


def flannel(netns: Netns, local: str, address: str, underlay: str) -> None:
    netns.ip(
        "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", local,
        "dev", underlay, "dstport", str(VXLAN_PORT), "nolearning",
    )  # fmt: skip
    netns.ip("addr", "add", f"{address}/32", "dev", "flannel.1")
    netns.ip("link", "set", "flannel.1", "up")


def mac_of(netns: Netns, ifname: str) -> str:
    info = json.loads(netns.run(["ip", "-j", "link", "show", ifname]))
    return str(info[0]["address"])


def flannel_route(here: Netns, there: Netns, there_ip: str, there_vtep: str) -> None:
    """flannel's per-peer state: route, neighbour and FDB entry of the remote VTEP."""
    subnet = there_vtep.rsplit(".", 1)[0] + ".0/24"
    mac = mac_of(there, "flannel.1")
    here.ip("route", "add", subnet, "via", there_vtep, "dev", "flannel.1", "onlink")
    here.ip("neigh", "add", there_vtep, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")
    here.run(["bridge", "fdb", "append", mac, "dev", "flannel.1", "dst", there_ip])


def set_vxlan6(ns: dict[str, Netns], wanted: bool) -> None:
    """The pods' IPv6 between the nodes over a vxlan link with an IPv6 underlay
    (``vxlan-v6.calico``, UDP 4789), instead of the IPv4 ``flannel.1``."""
    node, peer = ns["node"], ns["peer"]
    ends = ((node, NODE_IP6, "fd42::fe"), (peer, PEER_IP6, "fd42:0:0:1::fe"))
    if wanted:
        for netns, local, vtep in ends:
            netns.ip(
                "link", "add", VXLAN6, "type", "vxlan", "id", "4096", "local", local,
                "dev", "eth0" if netns is node else "br0", "dstport", str(VXLAN6_PORT),
                "nolearning",
            )  # fmt: skip
            netns.ip("-6", "addr", "add", f"{vtep}/128", "dev", VXLAN6, "nodad")
            netns.ip("link", "set", VXLAN6, "up")
    routes = (
        (node, peer, PEER_IP6, "fd42:0:0:1::fe", "fd42:0:0:1::ff", "fd42:0:0:1::/64"),
        (peer, node, NODE_IP6, "fd42::fe", NODE_FLANNEL_IP6, NODE_POD_CIDR6),
    )
    for here, there, there_ip, vtep6, vtep4, subnet in routes:
        if wanted:
            mac = mac_of(there, VXLAN6)
            here.ip("-6", "neigh", "add", vtep6, "lladdr", mac, "dev", VXLAN6, "nud", "permanent")
            here.run(["bridge", "fdb", "append", mac, "dev", VXLAN6, "dst", there_ip])
            via = ("via", vtep6, "dev", VXLAN6, "onlink")
        else:
            via = ("via", vtep4, "dev", "flannel.1", "onlink")
        # Not "replace": an onlink gateway routed through another link is refused.
        here.ip("-6", "route", "del", subnet)
        here.ip("-6", "route", "add", subnet, *via)
    if not wanted:
        for netns, _, _ in ends:
            netns.ip("link", "del", VXLAN6)
