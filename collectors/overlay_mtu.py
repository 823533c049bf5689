"""An overlay link whose MTU plus its encapsulation is more than its underlay can carry.

A packet that fills the overlay's MTU leaves the node ``overhead`` bytes larger: VXLAN 50
(outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14; 70 over IPv6), IP-in-IP 20 (ip6tnl
40), WireGuard 60 (80 over IPv6). When that exceeds the underlay link's MTU, full-size
packets are fragmented or dropped: large DNS answers (TCP, EDNS0 UDP) get lost while small
queries work (`OverlayMTUTooLarge`).

The underlay: the link the tunnel is pinned to (IFLA_VXLAN_LINK, IFLA_IPTUN_LINK), else the
route to its remote end, else the link holding its local address, else the default route's
link (WireGuard, flannel's vxlan without ``dev``). Pure part: :func:`overhead`,
:func:`mtu_finding`. I/O: :class:`OverlayMtuCollector`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Gauge

from collectors.dns_probe import run_in_netns
from collectors.finding import Finding
from collectors.links import (
    LinkView,
    NetLink,
    address_device,
    overlay_links,
    read_links,
    route_device,
)
from collectors.node_checks import check_gauge, set_check
from collectors.registry import SourceLog

# (over an IPv4 underlay, over IPv6)
OVERHEAD = {"vxlan": (50, 70), "ipip": (20, 20), "ip6tnl": (40, 40), "wireguard": (60, 80)}


@dataclass(frozen=True, slots=True)
class Underlay:
    link: NetLink
    how: str
    """How it was found: ``pinned link``, ``route to <ip>``, ``local address <ip>``, …"""


def ipv6_underlay(link: NetLink) -> bool:
    return ":" in (link.local or "") or ":" in (link.remote or "") or link.kind == "ip6tnl"


def overhead(link: NetLink) -> int | None:
    """Bytes the encapsulation adds (None: a kind not checked, e.g. geneve's options vary)."""
    sizes = OVERHEAD.get(link.kind or "")
    return None if sizes is None else sizes[1 if ipv6_underlay(link) else 0]


def too_large(link: NetLink, underlay: Underlay) -> int | None:
    """By how many bytes the encapsulated packet exceeds the underlay MTU (None: it fits or
    is unknown)."""
    extra = overhead(link)
    if extra is None or link.mtu is None or underlay.link.mtu is None:
        return None
    excess = link.mtu + extra - underlay.link.mtu
    return excess if excess > 0 else None


def mtu_finding(node: str, link: NetLink, underlay: Underlay) -> Finding | None:
    excess = too_large(link, underlay)
    if excess is None or link.mtu is None or underlay.link.mtu is None:
        return None
    extra = overhead(link) or 0
    fits = underlay.link.mtu - extra
    fix = f"ip link set dev {link.name} mtu {fits}"
    message = (
        f"Overlay link {link.name} ({link.kind}) has MTU {link.mtu}; with {extra} bytes of"
        f" encapsulation a full packet is {link.mtu + extra} bytes, {excess} more than its"
        f" underlay {underlay.link.name} (MTU {underlay.link.mtu}, found by {underlay.how})"
        " carries: full-size packets are fragmented or dropped, so large DNS answers (TCP,"
        f" EDNS0) are lost while small queries work. Fix: `{fix}` and the pods' MTU to at"
        f" most {fits} — flannel takes it from the underlay interface at start (check"
        " --iface, restart flannel), Calico from FelixConfiguration vxlanMTU / ipipMTU /"
        " wireguardMTU (or the operator's Installation spec.calicoNetwork.mtu)."
    )
    details = {
        "interface": link.name,
        "kind": link.kind,
        "mtu": link.mtu,
        "overhead": extra,
        "underlay": underlay.link.name,
        "underlay_mtu": underlay.link.mtu,
        "underlay_found_by": underlay.how,
        "excess": excess,
        "fix": fix,
        "fix_mtu": fits,
        "fix_calico": f"FelixConfiguration {link.kind}MTU: {fits}",
    }
    return Finding.on_node("OverlayMTUTooLarge", node, message, details, time=datetime.now(UTC))


# ----------------------------------------------------------------------------- collector


class OverlayMtuCollector:
    """Checks every overlay link's MTU against its underlay's."""

    name = "overlay_mtu"

    def __init__(
        self,
        node: str,
        registry: CollectorRegistry,
        *,
        netns: str | None = None,
        links: Callable[[], LinkView] = read_links,
        check_ok: Gauge | None = None,
    ) -> None:
        self.node = node
        self.netns = netns
        self.links = links
        self.sources = SourceLog()
        self.check_ok = check_ok if check_ok is not None else check_gauge(registry)

    def underlay(self, link: NetLink, view: LinkView) -> Underlay | None:
        """In the collector's namespace thread: the link the tunnel's packets leave by."""
        pinned = view.by_index(link.lower)
        if pinned is not None:
            return Underlay(pinned, "pinned link")
        if link.remote is not None:
            found = view.by_index(route_device(link.remote))
            if found is not None:
                return Underlay(found, f"route to {link.remote}")
        if link.local is not None:
            found = view.by_index(address_device(link.local))
            if found is not None:
                return Underlay(found, f"local address {link.local}")
        found = view.by_index(route_device(None))
        return Underlay(found, "default route") if found is not None else None

    def _read_here(self) -> list[tuple[NetLink, Underlay | None]] | None:
        view = self.sources.read("links", self.links)
        if view is None:
            return None
        checked = [link for link in overlay_links(view.links) if overhead(link) is not None]
        return self.sources.read(
            "routes", lambda: [(link, self.underlay(link, view)) for link in checked]
        )

    def collect(self) -> list[Finding]:
        pairs = run_in_netns(self.netns, self._read_here)
        if pairs is None:
            set_check(self.check_ok, "overlay_mtu", None)
            return []
        for link, underlay in pairs:
            if underlay is None:  # not checked: say so
                self.sources.failed(
                    f"underlay of {link.name}",
                    "no pinned link, no route to its remote end, no link with its local"
                    " address and no default route",
                )
        findings = [
            found
            for link, underlay in pairs
            if underlay is not None and (found := mtu_finding(self.node, link, underlay))
        ]
        unchecked = any(underlay is None for _, underlay in pairs)
        set_check(
            self.check_ok, "overlay_mtu", None if unchecked and not findings else not findings
        )
        return findings
