"""A resolver file that sends the cluster DNS back to itself.

Pods with ``dnsPolicy: Default`` — CoreDNS among them — get kubelet's ``resolvConf`` file
(``/etc/resolv.conf`` unless configured: :func:`collectors.cluster_dns.discover_resolv_conf`).
CoreDNS forwards what it does not serve to the nameservers there. A loopback nameserver
(systemd-resolved's stub ``127.0.0.53``, a local dnsmasq's ``127.0.0.1``, ``::1``) is the
pod itself inside the pod: CoreDNS forwards to itself, its ``loop`` plugin stops it
(CrashLoopBackOff) or queries go unanswered. No nameserver at all is as bad: the resolver
falls back to 127.0.0.1 and CoreDNS's ``forward`` has nowhere to go (`DNSResolverLoop`).

Pure part: :func:`resolver_finding` (on ``cluster_dns.nameservers``). I/O:
:class:`ResolverCollector` (files under the host root; symlinks followed inside it).
"""

from __future__ import annotations

import ipaddress
import os
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from collectors.cluster_dns import ResolvConfSetting, discover_resolv_conf, in_root, nameservers
from collectors.finding import Finding
from collectors.node_checks import check_gauge, set_check
from collectors.registry import CollectorError, SourceLog

RESOLVED_UPSTREAM = "/run/systemd/resolve/resolv.conf"
"""systemd-resolved's list of the real upstream servers (the stub file names 127.0.0.53)."""
MAX_NAMESERVERS = 3
"""glibc (MAXNS) and kubelet use the first three."""


def read_current(path: Path) -> str:
    """The file's text; CollectorError when the file read is no longer the one at that path
    on the host: a single-file hostPath mount keeps the file it was mounted with, and a host
    that replaces ``/etc/resolv.conf`` by rename (NetworkManager, dhclient, resolvconf) leaves
    the pod reading the old one, whose link count is then 0."""
    with path.open("rb") as file:
        if os.fstat(file.fileno()).st_nlink == 0:
            raise CollectorError(
                f"{path} was replaced on the host after it was mounted (the mounted file has"
                " no links left: a file hostPath keeps the old file); restart the pod to read"
                " the current one"
            )
        return file.read().decode(errors="replace")


def loopback(servers: list[str]) -> list[str]:
    return [s for s in servers[:MAX_NAMESERVERS] if ipaddress.ip_address(s).is_loopback]


def _fix(setting: ResolvConfSetting, target: str) -> dict[str, str]:
    if "rancher" in setting.source:
        where = "resolv-conf: " + target + " in /etc/rancher/{k3s,rke2}/config.yaml"
    else:
        where = f"resolvConf: {target} in the kubelet config (/var/lib/kubelet/config.yaml)"
    return {
        "fix": f"set {where}, restart kubelet, then restart the CoreDNS pods",
        "fix_resolv_conf": target,
    }


def resolver_finding(
    node: str, setting: ResolvConfSetting, servers: list[str], upstream: list[str] | None
) -> Finding | None:
    """``upstream``: the real servers in systemd-resolved's upstream file (None: no file)."""
    looped = loopback(servers)
    if servers and not looped:
        return None
    usable = [s for s in upstream or [] if not ipaddress.ip_address(s).is_loopback]
    if usable:
        fix = _fix(setting, RESOLVED_UPSTREAM)
        listed = ", ".join(usable)
        point = f" {RESOLVED_UPSTREAM} lists the real servers ({listed}): point kubelet at it."
    else:
        fix = _fix(setting, "/etc/kubernetes/resolv.conf")
        point = " Write a file listing the real upstream servers and point kubelet at it."
    what = (
        f"names loopback nameserver(s) {', '.join(looped)}, which inside a pod is the pod"
        " itself: CoreDNS forwards to itself and its loop plugin stops it (CrashLoopBackOff)"
        " or queries go unanswered"
        if looped
        else "names no nameserver: the resolver falls back to 127.0.0.1, so CoreDNS has"
        " nowhere to forward names it does not serve"
    )
    message = (
        f"kubelet gives pods with dnsPolicy Default (CoreDNS among them) {setting.path}"
        f" (from {setting.source}), which {what}.{point} Fix: {fix['fix']}."
    )
    details = {
        "resolv_conf": setting.path,
        "resolv_conf_source": setting.source,
        "nameservers": servers,
        "loopback": looped,
        "upstream_file": RESOLVED_UPSTREAM if upstream is not None else None,
        "upstream_nameservers": upstream,
        **fix,
    }
    return Finding.on_node("DNSResolverLoop", node, message, details, time=datetime.now(UTC))


class ResolverCollector:
    """Checks kubelet's resolvConf for loopback (or no) nameservers."""

    name = "resolver"

    def __init__(
        self,
        node: str,
        registry: CollectorRegistry,
        *,
        host_root: Path = Path("/"),
        check_ok: Gauge | None = None,
    ) -> None:
        self.node = node
        self.host_root = host_root
        self.sources = SourceLog()
        self.check_ok = check_ok if check_ok is not None else check_gauge(registry)

    def _read(self, path: str) -> list[str]:
        return nameservers(read_current(in_root(self.host_root, path)))

    def collect(self) -> list[Finding]:
        setting = discover_resolv_conf(self.host_root)
        if setting.problems:  # the file found may not be the one kubelet uses
            self.sources.failed("kubelet_config", "; ".join(setting.problems))
        if not setting.path:
            self.sources.skipped(
                "resolv_conf", f"kubelet gives pods no resolv.conf ({setting.source})"
            )
            set_check(self.check_ok, "resolver", None)
            return []
        servers = self.sources.read("resolv_conf", lambda: self._read(setting.path))
        if servers is None:
            set_check(self.check_ok, "resolver", None)
            return []
        upstream = None
        if not servers or loopback(servers):
            upstream_file = in_root(self.host_root, RESOLVED_UPSTREAM)
            if upstream_file.exists():
                upstream = self.sources.read(
                    "systemd_resolved", lambda: self._read(RESOLVED_UPSTREAM)
                )
        found = resolver_finding(self.node, setting, servers, upstream)
        set_check(self.check_ok, "resolver", found is None)
        return [found] if found is not None else []
