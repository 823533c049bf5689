"""VXLAN tx-checksum offload on overlay links, with the evidence around it, and the opt-in fix.

``tx-checksum-ip-generic: on`` on ``flannel.1`` / ``vxlan.calico`` / ``vxlan-v6.calico`` (any
``vxlan`` link), together with kube-proxy's and flannel's double NAT, makes the kernel emit
node → ClusterIP VXLAN packets with a wrong outer UDP checksum; the receiving node drops them
(``Udp: InCsumErrors`` rises there), DNS times out and TCP stalls for 63 s. The workaround is
``ethtool -K flannel.1 tx-checksum-ip-generic off``, which is lost when the link is re-created.

Pure part: :func:`parse_snmp` (``/proc/net/snmp`` by header) and :func:`overlay_link`
(a pyroute2 RTM_NEWLINK message to an :class:`OverlayLink`).

I/O part: :class:`VxlanCollector`. Links are listed with pyroute2's ``IPRoute`` and the
feature is read and set with ``pyroute2.ethtool.Ethtool`` (the ``SIOCETHTOOL`` ioctl on an
``AF_INET`` socket: it acts on the network namespace that socket was created in). With
``netns`` set, both are created, used and closed inside :func:`run_in_netns`'s short-lived
thread, which entered the namespace; the calling thread never changes namespace.

Footprint: importing any part of pyroute2 runs ``pyroute2/__init__`` (~160 modules, ~23 MiB
RSS); no submodule entry point avoids it. So pyroute2 is imported only inside the methods
that need it, and a scan first lists link names and kinds with one raw ``RTM_GETLINK`` dump
(:func:`link_kinds`, stdlib only): a node without overlay links never loads pyroute2.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from collectors.dns_probe import run_in_netns
from collectors.finding import Finding
from collectors.kernel_counter import KernelCounter
from collectors.pyroute2_import import pyroute2_imports
from collectors.registry import CollectorError, SourceLog

log = logging.getLogger(__name__)

FEATURE = "tx-checksum-ip-generic"
SNMP = "/proc/net/snmp"
IPIP_LINK = "tunl0"
"""Calico's IP-in-IP device: reported in the gauge, never flagged (no outer UDP checksum)."""

# Kernel ABI constants (linux/rtnetlink.h, linux/netlink.h, linux/if_link.h).
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTMGRP_LINK = 1
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_IFLA_IFNAME, _IFLA_LINKINFO, _IFLA_INFO_KIND = 3, 18, 1

NatMarks = Callable[[], dict[str, bool]]
"""``{"kube_proxy_mark": …, "flannel_return": …}`` from the nat table (another module)."""

UDEV_RULE = (
    'ACTION=="add", SUBSYSTEM=="net", KERNEL=="flannel.1", '
    'RUN+="/usr/sbin/ethtool -K %k tx-checksum-ip-generic off"'
)


# ------------------------------------------------------------------------------ pure part


def parse_snmp(text: str) -> dict[str, dict[str, int]]:
    """``/proc/net/snmp`` as ``{"Udp": {"InCsumErrors": 0, …}, …}``.

    Each protocol has a header line (``Udp: InDatagrams NoPorts …``) followed by a values
    line with the same prefix; fields are matched by name, never by position, since kernels
    add fields over time. Lines that do not pair up are skipped."""
    table: dict[str, dict[str, int]] = {}
    pending: tuple[str, list[str]] | None = None
    for line in text.splitlines():
        prefix, colon, rest = line.partition(":")
        if not colon:
            pending = None
            continue
        words = rest.split()
        if pending is not None and pending[0] == prefix:
            names = pending[1]
            pending = None
            if len(words) != len(names):
                continue
            try:
                table[prefix] = {name: int(value) for name, value in zip(names, words, strict=True)}
            except ValueError:
                continue
        else:
            pending = (prefix, words)
    return table


def udp_in_csum_errors(text: str) -> int | None:
    """``Udp: InCsumErrors`` (UDP datagrams this node dropped for a bad checksum)."""
    return parse_snmp(text).get("Udp", {}).get("InCsumErrors")


def _attrs(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    """Netlink attributes (type without the nested/byte-order flags, payload) from offset."""
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def parse_link_dump(data: bytes) -> tuple[list[tuple[str, str | None]], bool]:
    """``(name, kind)`` of each RTM_NEWLINK message in one netlink read, and whether the
    dump is done. ``OSError`` for an NLMSG_ERROR answer."""
    links: list[tuple[str, str | None]] = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == _NLMSG_DONE:
            return links, True
        if kind == _NLMSG_ERROR:
            raise _netlink_error(data, offset)
        if kind == RTM_NEWLINK:
            name, link_kind = "", None
            for attr, payload in _attrs(data[offset : offset + length], 32):
                if attr == _IFLA_IFNAME:
                    name = payload.split(b"\0", 1)[0].decode(errors="replace")
                elif attr == _IFLA_LINKINFO:
                    for sub, value in _attrs(payload, 0):
                        if sub == _IFLA_INFO_KIND:
                            link_kind = value.split(b"\0", 1)[0].decode(errors="replace")
            links.append((name, link_kind))
        offset += (length + 3) & ~3
    return links, False


def _netlink_error(data: bytes, offset: int) -> OSError:
    """The ``OSError`` an NLMSG_ERROR message carries (its errno, negated)."""
    if offset + 20 > len(data):
        return OSError(errno.EIO, "truncated netlink error message")
    code = -struct.unpack_from("=i", data, offset + 16)[0]
    try:
        return OSError(code, os.strerror(code))
    except (ValueError, OverflowError):
        return OSError(errno.EIO, f"netlink error {code}")


def link_kinds() -> list[tuple[str, str | None]]:
    """Every link of the calling thread's network namespace as ``(name, kind)``: one
    RTM_GETLINK dump on a raw netlink socket (no pyroute2)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        request = struct.pack("=IHHII", 32, RTM_GETLINK, _NLM_F_REQUEST_DUMP, 1, 0)
        sock.send(request + bytes(16))  # struct ifinfomsg, all zero: every link
        links: list[tuple[str, str | None]] = []
        done = False
        while not done:
            batch, done = parse_link_dump(sock.recv(1 << 16))
            links.extend(batch)
        return links


@dataclass(frozen=True, slots=True)
class OverlayLink:
    """A ``vxlan`` link (or ``tunl0``) and what netlink says about it."""

    ifname: str
    index: int
    kind: str | None
    vni: int | None = None
    port: int | None = None
    """IFLA_VXLAN_PORT, the UDP destination port (8472 flannel, 4789 Calico/IANA)."""
    udp_csum: bool | None = None
    """IFLA_VXLAN_UDP_CSUM: whether the outer UDP checksum is computed (IPv4)."""

    @property
    def is_vxlan(self) -> bool:
        return self.kind == "vxlan"


def overlay_link(message: Any) -> OverlayLink | None:
    """The overlay link an RTM_NEWLINK message describes, or None for any other link."""
    ifname = message.get_attr("IFLA_IFNAME")
    info = message.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    if kind != "vxlan" and ifname != IPIP_LINK:
        return None
    vni = port = udp_csum = None
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    if kind == "vxlan" and data is not None:
        vni = data.get_attr("IFLA_VXLAN_ID")
        port = data.get_attr("IFLA_VXLAN_PORT")
        csum = data.get_attr("IFLA_VXLAN_UDP_CSUM")
        udp_csum = None if csum is None else bool(csum)
    return OverlayLink(str(ifname), int(message["index"]), kind, vni, port, udp_csum)


# ----------------------------------------------------------------------------- collector


@dataclass(frozen=True, slots=True)
class LinkState:
    link: OverlayLink
    offload: bool | None
    """``tx-checksum-ip-generic`` enabled; None when the device does not have the feature."""
    fixable: bool


class VxlanCollector:
    """Reports tx-checksum offload on overlay links; with ``fix`` turns it off."""

    name = "vxlan"

    def __init__(
        self,
        node: str,
        registry: CollectorRegistry,
        *,
        netns: str | None = None,
        proc: Path = Path("/proc"),
        nat_marks: NatMarks | None = None,
        fix: bool = False,
    ) -> None:
        self.node = node
        self.netns = netns
        self.proc = proc
        self.nat_marks = nat_marks
        self.fix = fix
        self._lock = threading.Lock()
        self._interfaces: set[str] = set()
        self.offload = Gauge(
            "nodediag_vxlan_tx_checksum_offload",
            f"1 if {FEATURE} is on for the overlay link, else 0.",
            ["interface"],
            registry=registry,
        )
        self.fixes = Counter(
            "nodediag_vxlan_offload_fixes",
            f"Times nodediag turned {FEATURE} off on an overlay link (--fix-vxlan-offload).",
            ["interface"],
            registry=registry,
        )
        self.csum_errors = KernelCounter(
            "nodediag_udp_checksum_errors",
            "UDP datagrams this node dropped for a bad checksum (Udp InCsumErrors, kernel total).",
        )
        registry.register(self.csum_errors)
        self.sources = SourceLog()
        """``/proc/net/snmp`` (the receiver-side evidence): read, or named as failed."""

    # -- reading

    def _links_here(self) -> list[LinkState]:
        """Overlay links and their feature, read in the current thread's namespace."""
        if not any(kind == "vxlan" or name == IPIP_LINK for name, kind in link_kinds()):
            return []  # pyroute2 stays unloaded
        with pyroute2_imports():
            from pyroute2 import IPRoute  # type: ignore[import-untyped]
            from pyroute2.ethtool import Ethtool  # type: ignore[import-untyped]

        with IPRoute() as ipr:
            links = [link for m in ipr.get_links() if (link := overlay_link(m)) is not None]
        states = []
        with Ethtool() as ethtool:
            for link in links:
                try:
                    features = ethtool.get_features(link.ifname).features
                except OSError as error:
                    if error.errno != errno.ENODEV:
                        raise
                    continue  # deleted in between
                feature = features.get(FEATURE)
                states.append(
                    LinkState(
                        link,
                        None if feature is None else bool(feature.enable),
                        feature is not None and bool(feature.available),
                    )
                )
        return states

    def _disable_here(self, ifname: str) -> bool:
        """Turn the feature off in the current thread's namespace; True if it was on."""
        with pyroute2_imports():
            from pyroute2.ethtool import Ethtool

        with Ethtool() as ethtool:
            features = ethtool.get_features(ifname)
            feature = features.features.get(FEATURE)
            if feature is None or not feature.enable:
                return False
            feature.enable = False
            ethtool.set_features(ifname, features)
            if ethtool.get_features(ifname).features[FEATURE].enable:
                raise CollectorError(f"{ifname}: the kernel kept {FEATURE} on")
            return True

    def disable_offload(self, ifname: str, why: str) -> bool:
        """Turn ``tx-checksum-ip-generic`` off on ``ifname``; log and count it if it was on."""
        with self._lock:
            changed = run_in_netns(self.netns, lambda: self._disable_here(ifname))
            if changed:
                self.fixes.labels(ifname).inc()
                self.offload.labels(ifname).set(0)
                log.warning("turned %s off on %s (%s)", FEATURE, ifname, why)
            return changed

    def _read_csum_errors(self) -> int | None:
        text = self.sources.read(SNMP, (self.proc / "net" / "snmp").read_text)
        return None if text is None else udp_in_csum_errors(text)

    def _double_nat(self) -> dict[str, bool] | None:
        if self.nat_marks is None:
            return None
        try:
            return dict(self.nat_marks())
        except (CollectorError, OSError) as error:
            log.debug("no double-NAT context: %s", error)
            return None

    def collect(self) -> list[Finding]:
        self.sources.start()
        states = run_in_netns(self.netns, self._links_here)
        csum_errors = self._read_csum_errors()
        self.csum_errors.value = csum_errors
        double_nat = self._double_nat() if any(s.offload for s in states) else None
        findings: list[Finding] = []
        seen: set[str] = set()
        for state in states:
            ifname = state.link.ifname
            seen.add(ifname)
            on = bool(state.offload)
            if on and self.fix and state.link.is_vxlan and state.fixable:
                # A link the fix cannot change is still reported, not a failed scan.
                on = not self._fix_quietly(ifname, "found on during a scan")
            self.offload.labels(ifname).set(1 if on else 0)
            if on and state.link.is_vxlan:
                findings.append(self._finding(state, csum_errors, double_nat))
        with self._lock:
            for gone in self._interfaces - seen:
                with contextlib.suppress(KeyError):
                    self.offload.remove(gone)
            self._interfaces = seen
        return findings

    def _finding(
        self, state: LinkState, csum_errors: int | None, double_nat: dict[str, bool] | None
    ) -> Finding:
        link = state.link
        kernel = os.uname().release
        fix_now = f"ethtool -K {link.ifname} {FEATURE} off"
        nat = ""
        if double_nat is not None:
            present = [k for k, v in double_nat.items() if v]
            nat = (
                f" The nat table has the double-NAT marks ({', '.join(present)})."
                if present
                else " No double-NAT marks were found."
            )
        message = (
            f"{FEATURE} is on for vxlan link {link.ifname}"
            f" (VNI {link.vni}, UDP port {link.port}, UDP checksum"
            f" {'on' if link.udp_csum else 'off' if link.udp_csum is not None else 'unknown'},"
            f" kernel {kernel}): with kube-proxy's and the CNI's double NAT, node-to-ClusterIP"
            " UDP through this link can leave with a wrong outer UDP checksum that the"
            " receiving node drops (DNS timeouts, 63 s TCP stalls)."
            f"{nat} Fix: `{fix_now}` (lost when the link is re-created: persist it with a udev"
            " rule or a systemd unit, or on Calico set featureDetectOverride:"
            ' "ChecksumOffloadBroken=true" in the FelixConfiguration), or run nodediag with'
            " --fix-vxlan-offload."
        )
        return Finding.on_node(
            "VXLANChecksumOffload",
            self.node,
            message,
            time=datetime.now(UTC),
            details={
                "interface": link.ifname,
                "kind": link.kind,
                "vni": link.vni,
                "vxlan_port": link.port,
                "udp_checksum": link.udp_csum,
                "feature": FEATURE,
                "offload": True,
                "kernel": kernel,
                "double_nat": double_nat,
                "udp_in_csum_errors": csum_errors,
                "fix": fix_now,
                "fix_persistent_udev": UDEV_RULE.replace("flannel.1", link.ifname),
                "fix_calico": "featureDetectOverride: ChecksumOffloadBroken=true",
            },
        )

    # -- remediation on link events

    def _link_socket(self) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.bind((0, RTMGRP_LINK))
            return sock

        return run_in_netns(self.netns, make)

    def _fix_all(self, why: str) -> None:
        for state in run_in_netns(self.netns, self._links_here):
            if state.link.is_vxlan and state.offload and state.fixable:
                self._fix_quietly(state.link.ifname, why)

    def _fix_quietly(self, ifname: str, why: str) -> bool:
        """Like disable_offload, but a failure is logged, not raised; True when now off
        (turned off here, or already off: the link watcher may have been first)."""
        try:
            self.disable_offload(ifname, why)
            return True
        except (CollectorError, OSError) as error:
            if getattr(error, "errno", None) != errno.ENODEV:
                log.error("cannot turn %s off on %s: %s", FEATURE, ifname, error)
            return False

    def handle_link_messages(self, messages: Iterable[Any]) -> None:
        """Fix every vxlan link an RTM_NEWLINK message announces (new, renamed, changed)."""
        for message in messages:
            if message.get("header", {}).get("type") != RTM_NEWLINK:
                continue
            link = overlay_link(message)
            if link is not None and link.is_vxlan:
                self._fix_quietly(link.ifname, "link (re)created or changed")

    def watch_links(self, stop: threading.Event, poll: float = 0.5) -> None:
        """Until ``stop`` is set: listen to netlink link events and turn the feature off on
        each vxlan link as it appears. Does nothing unless the collector was made with
        ``fix=True``. Meant for its own thread; checks ``stop`` every ``poll`` seconds."""
        if not self.fix:
            return
        with pyroute2_imports():
            from pyroute2.netlink.rtnl.marshal import MarshalRtnl  # type: ignore[import-untyped]

        with self._link_socket() as sock:
            sock.settimeout(poll)
            marshal = MarshalRtnl()
            self._fix_all("watch started")  # links made before the subscription
            while not stop.is_set():
                try:
                    data = sock.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError as error:
                    if error.errno != errno.ENOBUFS:
                        raise
                    log.warning("netlink link events overflowed; checking every link")
                    self._fix_all("after lost link events")
                    continue
                self.handle_link_messages(marshal.parse(data))
