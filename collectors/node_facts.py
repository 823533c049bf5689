"""What the node shows about its network, for the DNS flow evaluator (``NodeFacts``).

Pure part: :func:`facts_from` builds the facts from the node's links, addresses and routes
(:class:`Link`, :class:`Address`, :class:`RouteEntry`), flannel's ``subnet.env``, the CNI
configs and the resolver file kubelet gives pods. I/O part: :func:`read_node_facts` lists
links, addresses and routes with pyroute2 (in the calling thread's network namespace: the
host's, in the DaemonSet) and reads the files under the host root.

- this node's pod CIDR: a route on a pod bridge (``cni0``, ``cbr0``), Calico's blackhole
  block routes, flannel's ``FLANNEL_SUBNET``, host-local ``subnet``/``ranges`` in the CNI
  config; the cluster's pod network: ``FLANNEL_NETWORK`` and the routes over overlay links;
- the pod interfaces: the bridge, or ``cali+``/``lxc+`` when such links exist;
- overlay links: ``vxlan`` (its UDP port), ``ipip``, ``wireguard`` links;
- other nodes' addresses (the overlay's source): the VXLAN links' forwarding entries, the
  next hops of routes over IP-in-IP links;
- the node's addresses (global ones, not on pod, overlay, cache or IPVS links) and the uplink
  (the default route's device); NodeLocal DNSCache's addresses on ``nodelocaldns``; IPVS mode
  when ``kube-ipvs0`` exists;
- the upstream nameservers: kubelet's ``resolvConf`` (``cluster_dns.discover_resolv_conf``;
  default ``/etc/resolv.conf``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from collectors.cluster_dns import discover_resolv_conf, in_root, nameservers
from collectors.netfilter.flows import NodeFacts, OverlayLink
from collectors.pyroute2_import import pyroute2_imports
from collectors.registry import SourceLog

log = logging.getLogger(__name__)

FLANNEL_ENV = "run/flannel/subnet.env"
CNI_DIR = "etc/cni/net.d"
DEFAULT_RESOLV = "etc/resolv.conf"
POD_BRIDGES = ("cni0", "cbr0")
POD_LINK_PREFIXES = {"cali": "cali+", "lxc": "lxc+"}
WIREGUARD_PORTS = {"cilium_wg0": 51871, "wireguard.cali": 51820, "wg-v6.cali": 51821}
_NOT_NODE = ("nodelocaldns", "kube-ipvs0", "docker0", "lo")
RTN_BLACKHOLE = 6


@dataclass(frozen=True, slots=True)
class Link:
    """A link; ``underlay`` the address family a vxlan link's packets travel in (its local
    or group address), None when it does not say."""

    index: int
    name: str
    kind: str | None = None
    port: int | None = None
    underlay: Literal["ipv4", "ipv6"] | None = None


@dataclass(frozen=True, slots=True)
class Address:
    index: int
    address: str
    global_scope: bool = True


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """A main-table route: ``dst`` a CIDR (``None``: default), ``oif`` a link index,
    ``gateway`` its next hop."""

    dst: str | None
    oif: int | None
    blackhole: bool = False
    gateway: str | None = None


@dataclass(frozen=True, slots=True)
class Netlink:
    """What netlink shows: links, addresses, main-table routes, and the remote addresses of
    the bridge forwarding entries of each link (a VXLAN link's peers: ``link index → dst``)."""

    links: list[Link] = field(default_factory=list)
    addresses: list[Address] = field(default_factory=list)
    routes: list[RouteEntry] = field(default_factory=list)
    fdb: list[tuple[int, str]] = field(default_factory=list)


def facts_from(
    links: Sequence[Link],
    addresses: Sequence[Address],
    routes: Sequence[RouteEntry],
    cluster_dns: Sequence[str],
    flannel_env: str | None = None,
    cni_configs: Sequence[str] = (),
    resolv_conf: str | None = None,
    fdb: Sequence[tuple[int, str]] = (),
) -> NodeFacts:
    by_index = {link.index: link for link in links}
    names = {link.name for link in links}
    flannel = parse_env(flannel_env or "")
    overlay = tuple(o for link in links if (o := _overlay(link)) is not None)
    overlay_names = {o.name for o in overlay}
    pod_interfaces = _pod_interfaces(names)
    pod_cidrs = _pod_cidrs(routes, by_index, flannel, cni_configs)
    cluster_cidrs = _networks([flannel.get("FLANNEL_NETWORK", "")])
    cluster_cidrs += _networks(
        r.dst for r in routes if r.dst and _name(by_index, r.oif) in overlay_names
    )
    uplink = next((_name(by_index, r.oif) for r in routes if r.dst is None), None)
    skip = {*_NOT_NODE, *overlay_names, *POD_BRIDGES}
    node_addresses = [
        a.address
        for a in addresses
        if a.global_scope
        and (name := _name(by_index, a.index)) is not None
        and name not in skip
        and not name.startswith(tuple(POD_LINK_PREFIXES))
    ]
    if uplink is not None:  # the uplink's addresses first: they are what peers talk to
        on_uplink = [
            a.address for a in addresses if a.global_scope and _name(by_index, a.index) == uplink
        ]
        node_addresses = [*dict.fromkeys([*on_uplink, *node_addresses])]
    # Not the link's IPv6 link-local address: nothing asks the cache there.
    cache = [
        a.address
        for a in addresses
        if a.global_scope and _name(by_index, a.index) == "nodelocaldns"
    ]
    return NodeFacts(
        cluster_dns=tuple(cluster_dns),
        pod_cidrs=tuple(dict.fromkeys(pod_cidrs)),
        cluster_cidrs=tuple(dict.fromkeys(cluster_cidrs)),
        node_addresses=tuple(node_addresses),
        pod_interfaces=pod_interfaces,
        uplink=uplink,
        overlay=overlay,
        upstream_dns=tuple(nameservers(resolv_conf or "")),
        local_dns_cache=tuple(cache),
        service_ips_local="kube-ipvs0" in names,
        peer_nodes=_peers(by_index, overlay, routes, fdb, node_addresses),
    )


def _peers(
    by_index: dict[int, Link],
    overlay: Sequence[OverlayLink],
    routes: Sequence[RouteEntry],
    fdb: Sequence[tuple[int, str]],
    own: Sequence[str],
) -> tuple[str, ...]:
    """Other nodes' addresses: the remote ends of the VXLAN links' forwarding entries
    (flannel, Calico) and the next hops of routes over IP-in-IP links (a VXLAN route's next
    hop is the peer's VTEP address, not the node's)."""
    vxlan = {o.name for o in overlay if o.kind == "vxlan"}
    ipip = {o.name for o in overlay if o.kind == "ipip"}
    found = [dst for index, dst in fdb if _name(by_index, index) in vxlan]
    found += [r.gateway for r in routes if r.gateway and _name(by_index, r.oif) in ipip]
    return tuple(a for a in dict.fromkeys(found) if a not in own and _networks([a]))


def _name(by_index: dict[int, Link], index: int | None) -> str | None:
    link = by_index.get(index) if index is not None else None
    return link.name if link is not None else None


def _overlay(link: Link) -> OverlayLink | None:
    if link.kind == "vxlan":
        return OverlayLink(link.name, "vxlan", link.port or 8472, link.underlay)
    if link.kind == "ipip" or link.name == "tunl0":
        return OverlayLink(link.name, "ipip")
    if link.kind == "wireguard":
        return OverlayLink(link.name, "wireguard", WIREGUARD_PORTS.get(link.name, 51820))
    return None


def _pod_interfaces(names: Iterable[str]) -> tuple[str, ...]:
    found = [b for b in POD_BRIDGES if b in names]
    for prefix, pattern in POD_LINK_PREFIXES.items():
        if any(n.startswith(prefix) and n != "cali.vxlan" for n in names):
            found.append(pattern)
    return tuple(found)


def _pod_cidrs(
    routes: Sequence[RouteEntry],
    by_index: dict[int, Link],
    flannel: dict[str, str],
    cni_configs: Sequence[str],
) -> list[str]:
    found = _networks(
        r.dst
        for r in routes
        if r.dst is not None and (_name(by_index, r.oif) in POD_BRIDGES or r.blackhole)
    )
    found += _networks([flannel.get("FLANNEL_SUBNET", "")])
    for text in cni_configs:
        found += _networks(_cni_subnets(text))
    return found


def _networks(texts: Iterable[str]) -> list[str]:
    nets = []
    for text in texts:
        try:
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            continue
        if not net.is_link_local:
            nets.append(str(net))
    return nets


def parse_env(text: str) -> dict[str, str]:
    """``KEY=value`` lines (flannel's ``subnet.env``)."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key] = value.strip().strip('"')
    return values


def _cni_subnets(text: str) -> list[str]:
    """host-local IPAM ``subnet`` / ``ranges`` of a CNI ``.conf``/``.conflist``."""
    try:
        config = json.loads(text)
    except ValueError:
        return []
    plugins = config.get("plugins", [config]) if isinstance(config, dict) else []
    subnets: list[str] = []
    for plugin in plugins if isinstance(plugins, list) else []:
        ipam = plugin.get("ipam") if isinstance(plugin, dict) else None
        if not isinstance(ipam, dict):
            continue
        if isinstance(ipam.get("subnet"), str):
            subnets.append(ipam["subnet"])
        for group in ipam.get("ranges") or []:
            for item in group if isinstance(group, list) else []:
                if isinstance(item, dict) and isinstance(item.get("subnet"), str):
                    subnets.append(item["subnet"])
    return subnets


# --------------------------------------------------------------------------- I/O


def resolv_conf_path(host_root: Path, problems: list[str]) -> Path:
    """The resolver file kubelet gives pods (:func:`discover_resolv_conf`: its flag or config,
    kubeadm's, K3s/RKE2's, else ``/etc/resolv.conf``), seen under the host root; a kubelet
    config that could not be read is added to ``problems`` (the file may then be the wrong one)."""
    setting = discover_resolv_conf(host_root)
    problems += setting.problems
    return in_root(host_root, setting.path or "/" + DEFAULT_RESOLV)


def _read(path: Path, problems: list[str]) -> str | None:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    except OSError as error:
        problems.append(f"{path}: {error.strerror or error}")
        return None


def read_node_facts(
    host_root: Path,
    cluster_dns: Sequence[str],
    netlink: Callable[[], Netlink] | None = None,
) -> tuple[NodeFacts, list[str]]:
    """The facts, and what could not be read (each with why)."""
    problems: list[str] = []
    try:
        shown = (netlink or read_netlink)()
    except Exception as error:  # pyroute2's NetlinkError is no OSError
        problems.append(f"netlink (links, addresses, routes): {error}")
        shown = Netlink()
    cni: list[str] = []
    cni_dir = host_root / CNI_DIR
    if cni_dir.is_dir():
        for path in sorted(cni_dir.glob("*.conf*")):
            text = _read(path, problems)
            if text is not None:
                cni.append(text)
    try:
        resolv_path = resolv_conf_path(host_root, problems)
    except OSError as error:  # a symlink loop under the host root
        problems.append(f"kubelet's resolver file: {error} (upstream nameservers unknown)")
        resolv = None
    else:
        resolv = _read(resolv_path, problems)
        if resolv is None:
            problems.append(f"{resolv_path}: missing (upstream nameservers unknown)")
    facts = facts_from(
        shown.links,
        shown.addresses,
        shown.routes,
        cluster_dns,
        _read(host_root / FLANNEL_ENV, problems),
        cni,
        resolv,
        shown.fdb,
    )
    return facts, problems


def read_netlink() -> Netlink:
    """Links, addresses, main-table routes and bridge forwarding entries of this network
    namespace (pyroute2)."""
    with pyroute2_imports():
        from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        links = [_link(m) for m in ipr.get_links()]
        addresses = [
            Address(m["index"], m.get_attr("IFA_ADDRESS"), m["scope"] == 0)
            for m in ipr.get_addr()
            if m.get_attr("IFA_ADDRESS")
        ]
        routes = [r for m in ipr.get_routes(table=254) if (r := _route(m)) is not None]
        fdb = [
            (m["ifindex"], m.get_attr("NDA_DST"))
            for m in ipr.get_neighbours(family=socket.AF_BRIDGE)
            if m.get_attr("NDA_DST")
        ]
    return Netlink(links, addresses, routes, fdb)


def _link(message: Any) -> Link:
    info = message.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    port = None
    underlay: Literal["ipv4", "ipv6"] | None = None
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    if kind == "vxlan" and data is not None and hasattr(data, "get_attr"):
        port = data.get_attr("IFLA_VXLAN_PORT")
        if data.get_attr("IFLA_VXLAN_LOCAL6") or data.get_attr("IFLA_VXLAN_GROUP6"):
            underlay = "ipv6"
        elif data.get_attr("IFLA_VXLAN_LOCAL") or data.get_attr("IFLA_VXLAN_GROUP"):
            underlay = "ipv4"
    return Link(message["index"], message.get_attr("IFLA_IFNAME"), kind, port, underlay)


def _route(message: Any) -> RouteEntry | None:
    dst = message.get_attr("RTA_DST")
    length = message["dst_len"]
    if dst is None and length != 0:
        return None
    return RouteEntry(
        f"{dst}/{length}" if dst is not None else None,
        message.get_attr("RTA_OIF"),
        message["type"] == RTN_BLACKHOLE,
        message.get_attr("RTA_GATEWAY"),
    )


# --------------------------------------------------------------------------- support bundles

_KUBE_DNS_RULE = re.compile(
    r"-A KUBE-SERVICES -d ([0-9a-fA-F.:]+)/(?:32|128) [^\n]*--comment \"?kube-system/"
    r"[^ \"]*(?:kube-dns|coredns)[^ \"]*:(?:dns|udp-53)\b"
)
_KUBE_DNS_ELEMENT = re.compile(
    r"\"([0-9a-fA-F.:]+)\", \"udp\", 53\]\}, \{\"goto\": \{\"target\": \"service-[^\"]*"
    r"kube-system/[^\"/]*(?:kube-dns|coredns)"
)


def dump_facts(
    iptables_save: str | None,
    nft_json: str | None,
    cluster_dns: Sequence[str],
    pod_cidrs: Sequence[str],
) -> NodeFacts:
    """Facts for a support bundle: the cluster DNS given, else kube-dns's Service IP as
    kube-proxy's rules show it; the pod CIDRs given; the pod interface and overlay links the
    rules name (``-i cni0``, ``cali+``, ``flannel.1``…), else ``+`` (some interface: a rule
    naming an interface then cannot be decided, and says so). The node's addresses, uplink
    and upstream nameservers are not in a rule dump: the flows that need them say so."""
    text = (iptables_save or "") + (nft_json or "")
    dns = list(cluster_dns)
    if not dns:
        dns = [m[1] for m in _KUBE_DNS_RULE.finditer(iptables_save or "")]
        dns += [m[1] for m in _KUBE_DNS_ELEMENT.finditer(nft_json or "")]
    names = {name for name in POD_BRIDGES if name in text}
    names |= {f"{prefix}x" for prefix in POD_LINK_PREFIXES if f"{prefix}+" in text}
    overlay = [
        OverlayLink(name, "vxlan", port)
        for name, port in (("flannel.1", 8472), ("vxlan.calico", 4789))
        if name in text
    ]
    return NodeFacts(
        cluster_dns=tuple(dict.fromkeys(dns)),
        pod_cidrs=tuple(pod_cidrs),
        pod_interfaces=_pod_interfaces(names) or ("+",),
        overlay=tuple(overlay),
    )


NODE_FACTS_SOURCE = "node-facts"
"""The firewall collector's source for the node's own network facts."""


class NodeFactsReader:
    """The node's facts, re-read on each call (links and configs change); logs what could
    not be read once per change, and records it in ``sources`` as ``node-facts`` (the flows
    that needed it are then unknown)."""

    def __init__(
        self,
        host_root: Path,
        cluster_dns: Callable[[], Sequence[str]],
        sources: SourceLog | None = None,
    ) -> None:
        self.host_root = host_root
        self.cluster_dns = cluster_dns
        self.sources = sources
        self._problems: list[str] = []

    def __call__(self) -> NodeFacts:
        facts, problems = read_node_facts(self.host_root, self.cluster_dns())
        if problems != self._problems:
            for problem in problems:
                log.warning("node network facts: %s", problem)
            self._problems = problems
        if self.sources is not None and problems:
            self.sources.failed(NODE_FACTS_SOURCE, "; ".join(problems))
        elif self.sources is not None:
            self.sources.ok(NODE_FACTS_SOURCE)
        return facts


NODE_POD_CIDR_SOURCE = "node-pod-cidr"
"""The firewall collector's source for the Node object's ``spec.podCIDRs``."""


@dataclass(frozen=True, slots=True)
class PodCidrLookup:
    """This node's pod CIDRs as its Node object holds them, and why the last read failed."""

    cidrs: tuple[str, ...] = ()
    error: str | None = None


class PodCidrSources:
    """The node's facts with its pod CIDR from the first source that has it: the CIDRs
    given (``--pod-cidr``); what the node itself shows (``facts``: what it really routes);
    the Node object's ``spec.podCIDRs`` (``node_object``, asked only when neither has one).
    The Node object's read is recorded in ``sources`` as ``node-pod-cidr``; each change of
    where the pod CIDR comes from is logged once."""

    def __init__(
        self,
        facts: Callable[[], NodeFacts],
        sources: SourceLog,
        given: Sequence[str] = (),
        node_object: Callable[[], PodCidrLookup] | None = None,
    ) -> None:
        self.facts = facts
        self.sources = sources
        self.given = tuple(given)
        self.node_object = node_object
        self.origin: str | None = None
        self._said: tuple[str | None, tuple[str, ...]] | None = None

    def __call__(self) -> NodeFacts:
        facts = self.facts()
        cidrs, origin = self._choose(facts)
        self._say(origin, cidrs)
        self.origin = origin
        return replace(facts, pod_cidrs=cidrs)

    def _choose(self, facts: NodeFacts) -> tuple[tuple[str, ...], str | None]:
        if self.given:
            self._not_needed("--pod-cidr is given")
            return self.given, "--pod-cidr"
        if facts.pod_cidrs:
            self._not_needed("the node's routes or CNI config show its pod CIDR")
            return facts.pod_cidrs, "the node's routes and CNI config"
        if self.node_object is None:
            return (), None
        try:
            lookup = self.node_object()
        except Exception as error:  # an optional source: never the collector's end
            lookup = PodCidrLookup((), f"crashed: {error!r}")
        if lookup.error is not None:
            self.sources.failed(NODE_POD_CIDR_SOURCE, lookup.error)
        else:
            self.sources.ok(NODE_POD_CIDR_SOURCE)
        return lookup.cidrs, "the Node object's spec.podCIDRs" if lookup.cidrs else None

    def _not_needed(self, why: str) -> None:
        if self.node_object is not None:
            self.sources.skipped(NODE_POD_CIDR_SOURCE, why)

    def _say(self, origin: str | None, cidrs: tuple[str, ...]) -> None:
        if self._said == (origin, cidrs):
            return
        self._said = (origin, cidrs)
        if origin is not None:
            log.info("pod CIDR %s (from %s)", ", ".join(cidrs), origin)
            return
        where = "no --pod-cidr, no pod bridge route, flannel subnet or CNI host-local range"
        if self.node_object is not None:
            where += ", and the Node object has no spec.podCIDRs (or could not be read)"
        log.info("this node's pod CIDR is unknown (%s): the DNS flows from pods are not "
                 "evaluated", where)  # fmt: skip
