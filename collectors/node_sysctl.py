"""Node settings that break pod DNS: bridge netfilter, forwarding, strict reverse-path filter.

- ``br_netfilter`` absent (no ``/proc/sys/net/bridge``), or ``net.bridge.bridge-nf-call-
  iptables`` (``-ip6tables`` when the pod bridge has IPv6) = 0, while pods sit on a Linux
  bridge (a bridge with pods' veths as ports: ``cni0``, ``docker0``, …): bridged pod →
  Service traffic skips iptables, so kube-proxy's DNAT never happens for a DNS pod on the
  same bridge, and its replies come back from the pod IP the client never asked
  (`BridgeNetfilterDisabled`).
- ``net.ipv4.ip_forward`` = 0 (``net.ipv6.conf.all.forwarding`` = 0 when a pod bridge or
  overlay has IPv6) while pod links exist: nothing is routed between pods, the node and
  other nodes (`IPForwardingDisabled`).
- ``rp_filter`` = 1 (strict) on an overlay or pod-bridge link, the effective value being
  ``max(conf.all, conf.<link>)``: replies arriving on another link than the route back are
  dropped (`StrictReversePathFilter`).

Reads only the namespace's sysctls (``proc/sys/net``: with hostNetwork the node's) and its
links over netlink. Pure part: the ``*_finding`` functions. I/O: :class:`NodeSysctlCollector`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from collectors.dns_probe import run_in_netns
from collectors.finding import Finding
from collectors.links import LinkView, overlay_links, pod_bridges, pod_network_links, read_links
from collectors.node_checks import check_gauge, read_sysctl, set_check, sysctl_fix, sysctl_name
from collectors.registry import SourceLog

BRIDGE_NF = ("net", "bridge", "bridge-nf-call-iptables")
BRIDGE_NF6 = ("net", "bridge", "bridge-nf-call-ip6tables")
IP_FORWARD = ("net", "ipv4", "ip_forward")
IPV6_FORWARDING = ("net", "ipv6", "conf", "all", "forwarding")
MODULES_FILE = "/etc/modules-load.d/br_netfilter.conf"


def rp_filter_key(link: str) -> tuple[str, ...]:
    return ("net", "ipv4", "conf", link, "rp_filter")


@dataclass(frozen=True, slots=True)
class Settings:
    """The sysctls read (``None``: not read; bridge values ``None`` also when the module is
    absent, see ``br_netfilter``)."""

    br_netfilter: bool | None = None
    bridge_nf: int | None = None
    bridge_nf6: int | None = None
    ip_forward: int | None = None
    ipv6_forwarding: int | None = None
    rp_filter_all: int | None = None
    rp_filter: dict[str, int] | None = None
    """Per overlay/pod-bridge link."""


# ------------------------------------------------------------------------------ pure part


def _finding(reason: str, node: str, message: str, details: Mapping[str, object]) -> Finding:
    return Finding.on_node(reason, node, message, dict(details), time=datetime.now(UTC))


def bridge_finding(node: str, view: LinkView, s: Settings) -> Finding | None:
    bridges = [b.name for b in pod_bridges(view.links)]
    if not bridges or s.br_netfilter is None:
        return None
    ipv6 = bool(view.ipv6_pod_links)
    wanted = {sysctl_name(BRIDGE_NF): 1} | ({sysctl_name(BRIDGE_NF6): 1} if ipv6 else {})
    if not s.br_netfilter:
        evidence = "the br_netfilter module is not loaded (no /proc/sys/net/bridge)"
        fix = {
            "fix": "modprobe br_netfilter && " + sysctl_fix(wanted)["fix"],
            "fix_persistent": f"echo br_netfilter > {MODULES_FILE}; "
            + sysctl_fix(wanted)["fix_persistent"],
        }
    else:
        off = {k: v for k, v in ((BRIDGE_NF, s.bridge_nf), (BRIDGE_NF6, s.bridge_nf6)) if v == 0}
        off = {k: v for k, v in off.items() if k == BRIDGE_NF or ipv6}
        if not off:
            return None
        evidence = ", ".join(f"{sysctl_name(k)} = 0" for k in off)
        fix = sysctl_fix({sysctl_name(k): 1 for k in off})
    message = (
        f"Pods sit on Linux bridge(s) {', '.join(bridges)} but {evidence}: traffic between"
        " pods on one bridge skips iptables, so kube-proxy's Service DNAT does not happen and"
        " a pod cannot reach the DNS Service when a DNS pod is on the same bridge."
        f" Fix: `{fix['fix']}`; persist: `{fix['fix_persistent']}`."
    )
    details = {
        "bridges": bridges,
        "br_netfilter_loaded": s.br_netfilter,
        "bridge_nf_call_iptables": s.bridge_nf,
        "bridge_nf_call_ip6tables": s.bridge_nf6,
        "ipv6_pod_links": view.ipv6_pod_links,
        **fix,
    }
    return _finding("BridgeNetfilterDisabled", node, message, details)


def forwarding_finding(node: str, view: LinkView, s: Settings) -> Finding | None:
    pod_links = sorted({link.name for link in pod_network_links(view.links)})
    if not pod_links:
        return None
    off = {sysctl_name(IP_FORWARD): s.ip_forward}
    if view.ipv6_pod_links:
        off[sysctl_name(IPV6_FORWARDING)] = s.ipv6_forwarding
    off = {name: value for name, value in off.items() if value == 0}
    if not off:
        return None
    fix = sysctl_fix(dict.fromkeys(off, 1))
    shown = ", ".join(pod_links[:5]) + (
        f" and {len(pod_links) - 5} more" if len(pod_links) > 5 else ""
    )
    message = (
        f"{' and '.join(f'{n} = 0' for n in off)} while pod links exist ({shown}): the node"
        " routes nothing between pods, itself and other nodes, so pods cannot reach the DNS"
        f" (or anything else). Fix: `{fix['fix']}`; persist: `{fix['fix_persistent']}`."
    )
    details = {
        "disabled": list(off),
        "pod_links": pod_links,
        "ipv6_pod_links": view.ipv6_pod_links,
        **fix,
    }
    return _finding("IPForwardingDisabled", node, message, details)


def strict_links(view: LinkView, s: Settings) -> dict[str, int]:
    """Overlay and pod-bridge links whose effective rp_filter (max of all and the link's) is
    1, with the link's own value."""
    if s.rp_filter_all is None or s.rp_filter is None:
        return {}
    return {name: own for name, own in s.rp_filter.items() if max(s.rp_filter_all, own) == 1}


def rp_filter_targets(view: LinkView) -> list[str]:
    return sorted({link.name for link in overlay_links(view.links) + pod_bridges(view.links)})


def rp_filter_finding(node: str, view: LinkView, s: Settings) -> Finding | None:
    strict = strict_links(view, s)
    if not strict or s.rp_filter_all is None:
        return None
    wanted: dict[str, int] = {}
    if s.rp_filter_all == 1:
        wanted[sysctl_name(("net", "ipv4", "conf", "all", "rp_filter"))] = 2
    for name, own in strict.items():
        if own == 1:
            wanted[sysctl_name(rp_filter_key(name))] = 2
    if any(own == 1 for own in strict.values()):  # links made later start from "default"
        wanted[sysctl_name(rp_filter_key("default"))] = 2
    fix = sysctl_fix(wanted)
    message = (
        f"Strict reverse-path filtering (rp_filter 1; all = {s.rp_filter_all}) on overlay or"
        f" pod-bridge link(s) {', '.join(strict)}: a packet arriving on a link other than"
        " the route back to its source is dropped, which asymmetric pod and overlay paths do"
        f" (DNS replies lost). Fix (2 = loose): `{fix['fix']}`; persist:"
        f" `{fix['fix_persistent']}`."
    )
    details = {"links": strict, "rp_filter_all": s.rp_filter_all, **fix}
    return _finding("StrictReversePathFilter", node, message, details)


# ----------------------------------------------------------------------------- collector


class NodeSysctlCollector:
    """Bridge netfilter, forwarding and rp_filter of the node's network namespace."""

    name = "node_sysctl"

    def __init__(
        self,
        node: str,
        registry: CollectorRegistry,
        *,
        proc: Path = Path("/proc"),
        netns: str | None = None,
        links: Callable[[], LinkView] = read_links,
        check_ok: Gauge | None = None,
    ) -> None:
        self.node = node
        self.proc = proc
        self.netns = netns
        self.links = links
        self.sources = SourceLog()
        self.check_ok = check_ok if check_ok is not None else check_gauge(registry)

    def _sysctl(self, source: str, parts: tuple[str, ...]) -> int | None:
        return self.sources.read(source, lambda: _read(self.proc, parts))

    def _read_here(self) -> tuple[LinkView | None, Settings]:
        view = self.sources.read("links", self.links)
        bridge_dir = self.proc / "sys" / "net" / "bridge"
        loaded = bridge_dir.is_dir()
        s = Settings(
            br_netfilter=loaded,
            bridge_nf=self._sysctl("bridge-nf-call-iptables", BRIDGE_NF) if loaded else None,
            bridge_nf6=self._sysctl("bridge-nf-call-ip6tables", BRIDGE_NF6) if loaded else None,
            ip_forward=self._sysctl("ip_forward", IP_FORWARD),
            ipv6_forwarding=self._ipv6_forwarding(),
            rp_filter_all=self._sysctl("rp_filter", ("net", "ipv4", "conf", "all", "rp_filter")),
            rp_filter=self._rp_filters(view) if view is not None else None,
        )
        return view, s

    def _ipv6_forwarding(self) -> int | None:
        if not (self.proc / "sys" / "net" / "ipv6").is_dir():
            self.sources.skipped("ipv6_forwarding", "IPv6 is disabled on this node")
            return None
        return self._sysctl("ipv6_forwarding", IPV6_FORWARDING)

    def _rp_filters(self, view: LinkView) -> dict[str, int] | None:
        def read_all() -> dict[str, int]:
            return {name: _read(self.proc, rp_filter_key(name)) for name in rp_filter_targets(view)}

        return self.sources.read("rp_filter_links", read_all)

    def collect(self) -> list[Finding]:
        view, s = run_in_netns(self.netns, self._read_here)
        findings: list[Finding] = []
        checks = {
            "bridge_netfilter": bridge_finding,
            "ip_forward": forwarding_finding,
            "rp_filter": rp_filter_finding,
        }
        for check, judge in checks.items():
            found = judge(self.node, view, s) if view is not None else None
            known = view is not None and self._known(check, s)
            set_check(self.check_ok, check, (found is None) if known else None)
            if found is not None:
                findings.append(found)
        return findings

    @staticmethod
    def _known(check: str, s: Settings) -> bool:
        if check == "bridge_netfilter":
            return s.br_netfilter is False or s.bridge_nf is not None
        if check == "ip_forward":
            return s.ip_forward is not None
        return s.rp_filter_all is not None and s.rp_filter is not None


def _read(proc: Path, parts: tuple[str, ...]) -> int:
    try:
        return read_sysctl(proc, parts)
    except ValueError as error:
        raise OSError(f"{sysctl_name(parts)}: not a number: {error}") from error
