"""The node's links as the node checks need them: kinds, MTUs, bridge ports, tunnel ends.

Pure part: :func:`net_link` (a pyroute2 RTM_NEWLINK message to a :class:`NetLink`) and the
classifications (:func:`pod_bridges`, :func:`overlay_links`). I/O: :func:`read_links`, in the
calling thread's network namespace (run it under ``run_in_netns`` for another one). pyroute2
is imported only here, when a check needs links (it costs ~23 MiB RSS, see ``vxlan.py``).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from collectors.pyroute2_import import pyroute2_imports

OVERLAY_KINDS = frozenset({"vxlan", "ipip", "wireguard", "ip6tnl", "geneve"})


@dataclass(frozen=True, slots=True)
class NetLink:
    """One link: what netlink says about it."""

    index: int
    name: str
    kind: str | None
    mtu: int | None = None
    master: int | None = None
    """IFLA_MASTER: the bridge (or bond, VRF) this link is a port of."""
    lower: int | None = None
    """The link a tunnel sends through, when pinned (IFLA_VXLAN_LINK, IFLA_IPTUN_LINK)."""
    local: str | None = None
    remote: str | None = None
    """Tunnel ends: vxlan local/group, ipip local/remote (None when not set)."""
    peer_elsewhere: bool = False
    """A veth whose peer is in another network namespace (IFLA_LINK_NETNSID): a pod's (or a
    container's) end of its link, unlike a veth pair with both ends here."""

    @property
    def is_pod_veth(self) -> bool:
        return self.kind == "veth" and self.peer_elsewhere


def _attr(message: Any, name: str) -> Any:
    value = message.get_attr(name)
    return None if value in (None, 0, "0.0.0.0", "::") else value


def net_link(message: Any) -> NetLink:
    """A :class:`NetLink` from a pyroute2 link message."""
    info = message.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    lower = local = remote = None
    if data is not None and kind == "vxlan":
        lower = _attr(data, "IFLA_VXLAN_LINK")
        local = _attr(data, "IFLA_VXLAN_LOCAL") or _attr(data, "IFLA_VXLAN_LOCAL6")
        remote = _attr(data, "IFLA_VXLAN_GROUP") or _attr(data, "IFLA_VXLAN_GROUP6")
    elif data is not None and kind in ("ipip", "ip6tnl"):
        lower = _attr(data, "IFLA_IPTUN_LINK")
        local = _attr(data, "IFLA_IPTUN_LOCAL")
        remote = _attr(data, "IFLA_IPTUN_REMOTE")
    return NetLink(
        index=int(message["index"]),
        name=str(message.get_attr("IFLA_IFNAME")),
        kind=kind,
        mtu=message.get_attr("IFLA_MTU"),
        master=message.get_attr("IFLA_MASTER"),
        lower=lower,
        local=None if local is None else str(local),
        remote=None if remote is None else str(remote),
        peer_elsewhere=message.get_attr("IFLA_LINK_NETNSID") is not None,
    )


def pod_bridges(links: Sequence[NetLink]) -> list[NetLink]:
    """Bridges with pods' veths as ports (``cni0``, ``docker0``, …): pods on a Linux bridge."""
    veth_masters = {link.master for link in links if link.is_pod_veth and link.master}
    return [link for link in links if link.kind == "bridge" and link.index in veth_masters]


def overlay_links(links: Sequence[NetLink]) -> list[NetLink]:
    return [link for link in links if link.kind in OVERLAY_KINDS]


def pod_network_links(links: Sequence[NetLink]) -> list[NetLink]:
    """Links that say pods are networked here: pods' veths, overlays, pod bridges."""
    return [link for link in links if link.is_pod_veth or link.kind in OVERLAY_KINDS] + (
        pod_bridges(links)
    )


@dataclass(frozen=True, slots=True)
class LinkView:
    """The links of one network namespace, and what the checks ask about them."""

    links: list[NetLink]
    global_ipv6: list[str] = field(default_factory=list)
    """Links (not ``lo``) holding a global IPv6 address."""

    def by_index(self, index: int | None) -> NetLink | None:
        return next((link for link in self.links if link.index == index), None)

    @property
    def ipv6_pod_links(self) -> list[str]:
        """Pod bridges and overlays with a global IPv6 address: pods get IPv6 here (an IPv6
        address on the uplink alone does not make the pods' network IPv6)."""
        pod_side = {link.name for link in pod_bridges(self.links) + overlay_links(self.links)}
        return [name for name in self.global_ipv6 if name in pod_side]


# ----------------------------------------------------------------------------------- I/O


def read_links() -> LinkView:
    """Links and global IPv6 addresses of the calling thread's network namespace."""
    with pyroute2_imports():
        from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        links = [net_link(message) for message in ipr.get_links()]
        names = {link.index: link.name for link in links}
        ipv6 = {
            names.get(int(a["index"]), str(a["index"]))
            for a in ipr.get_addr(family=socket.AF_INET6)
            if a["scope"] == 0 and int(a["index"]) in names
        }
    return LinkView(links, sorted(n for n in ipv6 if n != "lo"))


def route_device(destination: str | None) -> int | None:
    """The output link index of the route to ``destination`` (``None``: the default route),
    in the calling thread's namespace; ``None`` when there is no route."""
    with pyroute2_imports():
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        try:
            if destination is not None:
                routes = ipr.route("get", dst=destination)
            else:
                routes = ipr.get_default_routes(family=socket.AF_INET) or ipr.get_default_routes(
                    family=socket.AF_INET6
                )
        except NetlinkError:
            return None
        for route in routes:
            device = route.get_attr("RTA_OIF")
            if device:
                return int(device)
    return None


def address_device(address: str) -> int | None:
    """The link index holding ``address`` in the calling thread's namespace."""
    with pyroute2_imports():
        from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for entry in ipr.get_addr(address=address):
            return int(entry["index"])
    return None
