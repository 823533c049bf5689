"""VXLAN offload collector: /proc/net/snmp parsing (unit) and real vxlan links in a network
namespace the test creates (root)."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import realkernel
from prometheus_client import CollectorRegistry

from collectors.vxlan import (
    FEATURE,
    VxlanCollector,
    parse_link_dump,
    parse_snmp,
    udp_in_csum_errors,
)

# /proc/net/snmp of kernel 6.18 (recorded on the test machine, counters changed)
SNMP_6_18 = """\
Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams InUnknownProtos InDiscards InDelivers OutRequests OutDiscards OutNoRoutes ReasmTimeout ReasmReqds ReasmOKs ReasmFails FragOKs FragFails FragCreates OutTransmits
Ip: 2 64 100205 0 0 0 0 0 100205 97040 0 0 0 0 0 0 0 0 0 97040
Icmp: InMsgs InErrors InCsumErrors InDestUnreachs InTimeExcds InParmProbs InSrcQuenchs InRedirects InEchos InEchoReps InTimestamps InTimestampReps InAddrMasks InAddrMaskReps OutMsgs OutErrors OutRateLimitGlobal OutRateLimitHost OutDestUnreachs OutTimeExcds OutParmProbs OutSrcQuenchs OutRedirects OutEchos OutEchoReps OutTimestamps OutTimestampReps OutAddrMasks OutAddrMaskReps
Icmp: 1 0 11 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
IcmpMsg: InType3
IcmpMsg: 1
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts InCsumErrors
Tcp: 1 200 120000 -1 5558 4979 522 4 0 100086 96923 0 0 610 13
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 122 0 57 123 0 0 42 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 0 0 7 0 0
"""  # noqa: E501

# Kernel 3.10 (RHEL 7 era): Udp has no InCsumErrors column yet
SNMP_3_10 = """\
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts
Tcp: 1 200 120000 -1 10 5 0 0 2 300 280 0 0 1
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors
Udp: 50 1 0 51 0 0
"""  # noqa: E501


def test_parse_snmp_by_header() -> None:
    table = parse_snmp(SNMP_6_18)
    assert table["Udp"]["InCsumErrors"] == 42
    assert table["Udp"]["InErrors"] == 57
    assert table["UdpLite"]["InCsumErrors"] == 7  # not confused with Udp
    assert table["Icmp"]["InCsumErrors"] == 11
    assert table["Tcp"]["MaxConn"] == -1
    assert udp_in_csum_errors(SNMP_6_18) == 42


def test_parse_snmp_field_order_and_old_kernels() -> None:
    reordered = "Udp: InCsumErrors InDatagrams\nUdp: 9 100\n"
    assert udp_in_csum_errors(reordered) == 9
    assert udp_in_csum_errors(SNMP_3_10) is None
    assert parse_snmp(SNMP_3_10)["Udp"]["NoPorts"] == 1


def test_parse_snmp_skips_broken_pairs() -> None:
    broken = (
        "Udp: InDatagrams InCsumErrors\n"
        "Udp: 1\n"  # too few values
        "Tcp: A B\n"
        "Tcp: x 2\n"  # not a number
        "Ip: Forwarding\n"  # header without values (next prefix differs)
        "Udp: InCsumErrors\n"
        "Udp: 3\n"
    )
    table = parse_snmp(broken)
    assert table == {"Udp": {"InCsumErrors": 3}}
    assert parse_snmp("") == {}
    assert udp_in_csum_errors("garbage\nwithout colons\n") is None


# ------------------------------------------------------------------ real links (root)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Namespace:
    name: str

    def run(self, *argv: str) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], check=True, capture_output=True, text=True
        )
        return done.stdout

    def add_vxlan(self, ifname: str = "flannel.1", vni: int = 1, port: int = 8472) -> None:
        ip(
            "-n",
            self.name,
            "link",
            "add",
            ifname,
            "type",
            "vxlan",
            "id",
            str(vni),
            "dstport",
            str(port),
            "local",
            "10.251.0.1",
            "dev",
            "vxu0",
        )

    def delete_link(self, ifname: str) -> None:
        ip("-n", self.name, "link", "del", ifname)

    def offload(self, ifname: str = "flannel.1") -> bool:
        for line in self.run("ethtool", "-k", ifname).splitlines():
            key, _, value = line.strip().partition(":")
            if key == FEATURE:
                return value.split()[0] == "on"
        raise AssertionError(f"no {FEATURE} in ethtool -k {ifname}")

    def set_offload(self, on: bool, ifname: str = "flannel.1") -> None:
        self.run("ethtool", "-K", ifname, FEATURE, "on" if on else "off")


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """A fresh network namespace with an underlay veth (10.251.0.1/24 on vxu0) and a
    ``flannel.1`` vxlan link (VNI 1, port 8472) on it; deleted after the test."""
    if os.geteuid() != 0:
        realkernel.skip_or_fail("needs root")
    for tool in ("ip", "ethtool"):
        if shutil.which(tool) is None:
            realkernel.skip_or_fail(f"{tool} not found (Debian iproute2, ethtool)")
    ns = Namespace(f"nodediag-vx-{secrets.token_hex(4)}")
    ip("netns", "add", ns.name)
    try:
        # the kernel may lack the dummy driver; a veth pair is an underlay as good
        ip("-n", ns.name, "link", "add", "vxu0", "type", "veth", "peer", "name", "vxu1")
        ip("-n", ns.name, "addr", "add", "10.251.0.1/24", "dev", "vxu0")
        ip("-n", ns.name, "link", "set", "vxu0", "up")
        try:
            ns.add_vxlan()
        except subprocess.CalledProcessError as error:
            realkernel.skip_or_fail(f"cannot create a vxlan link: {error.stderr.strip()}")
        yield ns
    finally:
        ip("netns", "del", ns.name)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.mark.root
def test_offload_on_is_one_finding_and_off_is_none(netns: Namespace, tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "snmp").write_text(SNMP_6_18)
    registry = CollectorRegistry()
    marks = {"kube_proxy_mark": True, "flannel_return": True}
    collector = VxlanCollector(
        "node-a", registry, netns=netns.name, proc=tmp_path, nat_marks=lambda: marks
    )
    assert collector.name == "vxlan"
    assert netns.offload()  # the kernel's default for a new vxlan link

    findings = collector.collect()
    assert len(findings) == 1
    finding = findings[0]
    assert (finding.reason, finding.severity, finding.subject.kind) == (
        "VXLANChecksumOffload",
        "warning",
        "Node",
    )
    assert finding.subject.name == "node-a"
    details = finding.details
    assert details["interface"] == "flannel.1"
    assert (details["vni"], details["vxlan_port"], details["udp_checksum"]) == (1, 8472, True)
    assert details["kernel"] == os.uname().release
    assert details["double_nat"] == marks
    assert details["udp_in_csum_errors"] == 42
    assert "ethtool -K flannel.1 tx-checksum-ip-generic off" in finding.message
    assert "ChecksumOffloadBroken=true" in finding.message
    assert sample(registry, "nodediag_vxlan_tx_checksum_offload", interface="flannel.1") == 1
    assert sample(registry, "nodediag_udp_checksum_errors_total") == 42
    assert netns.offload(), "without fix=True nothing is changed"

    netns.set_offload(False)
    (tmp_path / "net" / "snmp").write_text(SNMP_6_18.replace("123 0 0 42", "123 0 0 45"))
    assert collector.collect() == []
    assert sample(registry, "nodediag_vxlan_tx_checksum_offload", interface="flannel.1") == 0
    assert sample(registry, "nodediag_udp_checksum_errors_total") == 45  # the kernel's total

    netns.delete_link("flannel.1")
    assert collector.collect() == []
    assert sample(registry, "nodediag_vxlan_tx_checksum_offload", interface="flannel.1") is None


@pytest.mark.root
def test_any_vxlan_link_counts_and_other_links_do_not(netns: Namespace, tmp_path: Path) -> None:
    netns.add_vxlan("vxlan.calico", vni=4096, port=4789)
    registry = CollectorRegistry()
    collector = VxlanCollector("node-a", registry, netns=netns.name, proc=tmp_path)
    findings = collector.collect()
    assert sorted((f.details["interface"], f.details["vxlan_port"]) for f in findings) == [
        ("flannel.1", 8472),
        ("vxlan.calico", 4789),
    ]
    assert all(f.details["double_nat"] is None for f in findings)  # no nat_marks given
    assert all(f.details["udp_in_csum_errors"] is None for f in findings)  # no snmp file
    assert sample(registry, "nodediag_vxlan_tx_checksum_offload", interface="vxu0") is None
    assert sample(registry, "nodediag_udp_checksum_errors_total") is None


@pytest.mark.root
def test_fix_turns_offload_off_and_again_after_recreation(netns: Namespace, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    collector = VxlanCollector("node-a", registry, netns=netns.name, proc=tmp_path, fix=True)
    assert netns.offload()
    assert collector.collect() == []
    assert not netns.offload()
    assert sample(registry, "nodediag_vxlan_tx_checksum_offload", interface="flannel.1") == 0
    assert sample(registry, "nodediag_vxlan_offload_fixes_total", interface="flannel.1") == 1
    assert collector.collect() == []  # nothing left to do, nothing counted
    assert sample(registry, "nodediag_vxlan_offload_fixes_total", interface="flannel.1") == 1

    stop = threading.Event()
    watcher = threading.Thread(target=collector.watch_links, args=(stop,), daemon=True)
    watcher.start()
    try:
        time.sleep(0.3)  # let it subscribe
        netns.delete_link("flannel.1")
        netns.add_vxlan()
        created = time.monotonic()
        while netns.offload() and time.monotonic() - created < 2.0:
            time.sleep(0.05)
        assert not netns.offload(), "watch_links did not fix the re-created link within 2 s"
        assert sample(registry, "nodediag_vxlan_offload_fixes_total", interface="flannel.1") == 2
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert not watcher.is_alive()


@pytest.mark.root
def test_watch_links_without_fix_returns_at_once(netns: Namespace) -> None:
    collector = VxlanCollector("node-a", CollectorRegistry(), netns=netns.name)
    collector.watch_links(threading.Event())
    assert netns.offload()


@pytest.mark.root
def test_missing_namespace_is_an_error_not_a_new_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        realkernel.skip_or_fail("needs root")
    name = f"nodediag-vx-absent-{secrets.token_hex(4)}"
    collector = VxlanCollector("node-a", CollectorRegistry(), netns=name, proc=tmp_path)
    with pytest.raises(FileNotFoundError):
        collector.collect()
    assert not Path("/run/netns", name).exists()


@pytest.mark.parametrize(
    ("message", "errno_value"),
    [
        (struct.pack("=IHHII", 20, 2, 0, 1, 0) + struct.pack("=i", -1), 1),  # EPERM
        (struct.pack("=IHHII", 16, 2, 0, 1, 0), errno.EIO),  # no room for the errno
        (struct.pack("=IHHII", 20, 2, 0, 1, 0) + struct.pack("=i", -(2**31)), errno.EIO),
    ],
)
def test_netlink_error_answers_raise_oserror_only(message: bytes, errno_value: int) -> None:
    with pytest.raises(OSError) as raised:
        parse_link_dump(message)
    assert raised.value.errno == errno_value
