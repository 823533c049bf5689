"""DNS probe: the wire format on recorded packets (unit), and real probes between two network
namespaces the test creates, joined by a veth pair, with a DNS test host in one (root).

All traffic stays inside those namespaces: 10.250.0.1/30 (client) and 10.250.0.2/30 (server)
exist only there."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import realkernel
from prometheus_client import CollectorRegistry

from collectors.dns_probe import (
    IP_RECVERR,
    DnsFormatError,
    DnsProbeCollector,
    build_query,
    encode_name,
    is_answer_to,
    new_query_id,
    parse_error_queue_offender,
    parse_header,
    run_in_netns,
)
from collectors.finding import Finding

NAME = "kubernetes.default.svc.cluster.local"
# Recorded with tests/dns_test_server.py: the query build_query(NAME, 0x1234) sent and
# the server's answer (NOERROR, one A record 10.43.0.1, TTL 30, name compressed to c00c).
QUERY_1234 = bytes.fromhex(
    "1234010000010000000000000a6b756265726e657465730764656661756c740373766307636c757374"
    "6572056c6f63616c0000010001"
)
ANSWER_1234 = bytes.fromhex(
    "1234858000010001000000000a6b756265726e657465730764656661756c740373766307636c757374"
    "6572056c6f63616c0000010001c00c000100010000001e00040a2b0001"
)
QUERY_BEEF = bytes.fromhex(
    "beef01000001000000000000076d697373696e6707636c7573746572056c6f63616c0000010001"
)
NXDOMAIN_BEEF = bytes.fromhex(
    "beef85830001000000000000076d697373696e6707636c7573746572056c6f63616c0000010001"
)


def test_build_query_matches_recorded_packets() -> None:
    assert build_query(NAME, 0x1234) == QUERY_1234
    assert build_query("missing.cluster.local", 0xBEEF) == QUERY_BEEF
    assert build_query("missing.cluster.local.", 0xBEEF) == QUERY_BEEF  # trailing dot


def test_parse_recorded_answers() -> None:
    header = parse_header(ANSWER_1234)
    assert (header.id, header.is_response, header.rcode_name, header.answers) == (
        0x1234,
        True,
        "NOERROR",
        1,
    )
    assert (header.questions, header.authority, header.additional, header.opcode) == (1, 0, 0, 0)
    assert not header.truncated
    assert is_answer_to(header, 0x1234)
    assert not is_answer_to(header, 0x1235)

    nx = parse_header(NXDOMAIN_BEEF)
    assert (nx.id, nx.rcode, nx.rcode_name, nx.answers) == (0xBEEF, 3, "NXDOMAIN", 0)
    assert is_answer_to(nx, 0xBEEF)  # NXDOMAIN still means the server answered

    query = parse_header(QUERY_1234)
    assert not query.is_response
    assert not is_answer_to(query, 0x1234)  # our own query echoed back is no answer


def test_parse_header_edge_cases() -> None:
    with pytest.raises(DnsFormatError):
        parse_header(ANSWER_1234[:11])
    truncated = bytearray(ANSWER_1234)
    truncated[2] |= 0x02
    assert parse_header(bytes(truncated)).truncated
    odd = bytearray(ANSWER_1234)
    odd[3] = (odd[3] & 0xF0) | 9
    assert parse_header(bytes(odd)).rcode_name == "RCODE9"


def test_encode_name_limits() -> None:
    assert encode_name(".") == b"\x00"
    assert encode_name("a" * 63 + ".b") == b"\x3f" + b"a" * 63 + b"\x01b\x00"
    for bad in ("a" * 64 + ".b", "a..b", "ünicode.example", ".".join(["abcdefgh"] * 30)):
        with pytest.raises(DnsFormatError):
            encode_name(bad)
    with pytest.raises(ValueError):
        build_query(NAME, 0x10000)


def test_query_ids_are_random() -> None:
    ids = {new_query_id() for _ in range(64)}
    assert len(ids) > 50
    assert all(0 <= i <= 0xFFFF for i in ids)


def test_error_queue_offender() -> None:
    # struct sock_extended_err (ECONNREFUSED, origin ICMP, type 3 code 3) + sockaddr_in
    err = struct.pack("=IBBBBII", 111, 2, 3, 3, 0, 0, 0)
    offender = struct.pack("=H", socket.AF_INET) + b"\x00\x35" + socket.inet_aton("10.1.2.3")
    data = err + offender + b"\x00" * 8
    assert parse_error_queue_offender(socket.IPPROTO_IP, IP_RECVERR, data) == "10.1.2.3"
    local_origin = struct.pack("=IBBBBII", 90, 1, 0, 0, 0, 0, 0) + offender + b"\x00" * 8
    assert parse_error_queue_offender(socket.IPPROTO_IP, IP_RECVERR, local_origin) is None
    assert parse_error_queue_offender(socket.SOL_SOCKET, 1, data) is None
    assert parse_error_queue_offender(socket.IPPROTO_IP, IP_RECVERR, err) is None


def test_collector_rejects_a_bad_name() -> None:
    with pytest.raises(DnsFormatError):
        DnsProbeCollector("n", list, CollectorRegistry(), name="a..b")


# --------------------------------------------------------- real namespaces (root)

CLIENT_IP = "10.250.0.1"
SERVER_IP = "10.250.0.2"
SERVER_SCRIPT = Path(__file__).with_name("dns_test_server.py")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class DnsLab:
    client: str
    server: str
    ready: Path
    process: subprocess.Popen[bytes] | None = None

    def iptables(self, netns: str, *rule: str) -> None:
        subprocess.run(
            ["ip", "netns", "exec", netns, "iptables", "-w", *rule],
            check=True,
            capture_output=True,
        )

    def start_server(self) -> None:
        self.ready.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.server,
                sys.executable,
                str(SERVER_SCRIPT),
                "--address",
                SERVER_IP,
                "--ready",
                str(self.ready),
            ]
        )
        deadline = time.monotonic() + 10
        while not self.ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the DNS test server did not start")
            time.sleep(0.02)

    def stop_server(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)
        self.process = None


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DnsLab]:
    """Client and server namespaces joined by a veth pair, the DNS test host running in the
    server namespace; all removed after the test."""
    if os.geteuid() != 0:
        realkernel.skip_or_fail("needs root")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            realkernel.skip_or_fail(f"{tool} not found (Debian iproute2, iptables)")
    tag = secrets.token_hex(3)
    lab = DnsLab(f"nodediag-dns-c-{tag}", f"nodediag-dns-s-{tag}", tmp_path / "ready")
    created: list[str] = []
    try:
        for name in (lab.client, lab.server):
            ip("netns", "add", name)
            created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        ip(
            "link",
            "add",
            f"ndc{tag}",
            "netns",
            lab.client,
            "type",
            "veth",
            "peer",
            "name",
            f"nds{tag}",
            "netns",
            lab.server,
        )
        ip("-n", lab.client, "addr", "add", f"{CLIENT_IP}/30", "dev", f"ndc{tag}")
        ip("-n", lab.server, "addr", "add", f"{SERVER_IP}/30", "dev", f"nds{tag}")
        ip("-n", lab.client, "link", "set", f"ndc{tag}", "up")
        ip("-n", lab.server, "link", "set", f"nds{tag}", "up")
        lab.start_server()
        yield lab
    finally:
        lab.stop_server()
        for name in created:
            ip("netns", "del", name)


def make_collector(
    lab: DnsLab, timeout: float = 1.0
) -> tuple[DnsProbeCollector, CollectorRegistry]:
    registry = CollectorRegistry()
    collector = DnsProbeCollector(
        "node-a", lambda: [SERVER_IP], registry, timeout=timeout, netns=lab.client
    )
    return collector, registry


def success(registry: CollectorRegistry, protocol: str) -> float | None:
    return registry.get_sample_value(
        "nodediag_dns_probe_success", {"server": SERVER_IP, "protocol": protocol}
    )


def by_protocol(findings: Sequence[Finding]) -> dict[str, dict[str, Any]]:
    return {finding.details["protocol"]: finding.details for finding in findings}


@pytest.mark.root
def test_probe_succeeds_over_udp_and_tcp(lab: DnsLab) -> None:
    collector, registry = make_collector(lab)
    assert collector.name == "dns_probe"
    before = os.readlink("/proc/thread-self/ns/net")
    assert collector.collect() == []
    assert os.readlink("/proc/thread-self/ns/net") == before  # our thread never moved
    assert success(registry, "udp") == 1
    assert success(registry, "tcp") == 1
    for protocol in ("udp", "tcp"):
        labels = {"server": SERVER_IP, "protocol": protocol}
        count = registry.get_sample_value("nodediag_dns_probe_duration_seconds_count", labels)
        assert count == 1


@pytest.mark.root
def test_nxdomain_counts_as_an_answer(lab: DnsLab) -> None:
    registry = CollectorRegistry()
    collector = DnsProbeCollector(
        "node-a",
        lambda: [SERVER_IP],
        registry,
        name="nothing.example",
        timeout=1.0,
        netns=lab.client,
    )
    assert collector.collect() == []
    assert success(registry, "udp") == 1


@pytest.mark.root
@pytest.mark.parametrize(
    "target",
    [["DROP"], ["REJECT"], ["REJECT", "--reject-with", "icmp-admin-prohibited"]],
    ids=["drop", "reject", "reject-admin"],
)
def test_local_output_rule_is_local_rule(lab: DnsLab, target: list[str]) -> None:
    lab.iptables(lab.client, "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", *target)
    collector, registry = make_collector(lab, timeout=2.0)
    started = time.monotonic()
    findings = collector.collect()
    assert time.monotonic() - started < 1.0, "a local rule must be reported promptly"
    details = by_protocol(findings)
    assert set(details) == {"udp"}
    assert details["udp"]["outcome"] == "local_rule"
    assert details["udp"]["error"] == "EPERM"
    assert details["udp"]["seconds"] < 0.5
    finding = findings[0]
    assert (finding.reason, finding.severity, finding.subject.kind) == (
        "DNSProbeFailed",
        "warning",
        "Node",
    )
    assert SERVER_IP in finding.message and "UDP" in finding.message
    assert "local firewall rule" in finding.message and "DNSDropRule" in finding.message
    assert success(registry, "udp") == 0
    assert success(registry, "tcp") == 1


@pytest.mark.root
def test_local_tcp_reject_is_local_rule_by_icmp_offender(lab: DnsLab) -> None:
    lab.iptables(lab.client, "-A", "OUTPUT", "-p", "tcp", "--dport", "53", "-j", "REJECT")
    collector, _ = make_collector(lab, timeout=2.0)
    details = by_protocol(collector.collect())
    assert set(details) == {"tcp"}
    assert details["tcp"]["outcome"] == "local_rule"
    assert details["tcp"]["error"] == "ECONNREFUSED"
    assert details["tcp"]["offender"] == CLIENT_IP  # the ICMP came from this node
    assert details["tcp"]["seconds"] < 0.5


@pytest.mark.root
def test_silent_server_is_timeout(lab: DnsLab) -> None:
    for protocol in ("udp", "tcp"):
        lab.iptables(lab.server, "-A", "INPUT", "-p", protocol, "--dport", "53", "-j", "DROP")
    collector, registry = make_collector(lab, timeout=0.5)
    findings = collector.collect()
    details = by_protocol(findings)
    assert {p: d["outcome"] for p, d in details.items()} == {"udp": "timeout", "tcp": "timeout"}
    assert all("timed out beyond this node" in f.message for f in findings)
    assert success(registry, "udp") == 0
    assert success(registry, "tcp") == 0


@pytest.mark.root
def test_stopped_server_is_refused_not_a_local_rule(lab: DnsLab) -> None:
    lab.stop_server()  # its host answers with ICMP port unreachable (UDP) and RST (TCP)
    collector, _ = make_collector(lab, timeout=2.0)
    started = time.monotonic()
    details = by_protocol(collector.collect())
    assert time.monotonic() - started < 1.0
    assert details["udp"]["outcome"] == "refused"
    assert details["udp"]["offender"] == SERVER_IP
    assert details["tcp"]["outcome"] == "refused"


LOCAL_SERVER_IP = "10.250.1.53"


def local_server_collector(lab: DnsLab) -> DnsProbeCollector:
    """A DNS server address of the probing node itself, as NodeLocal DNSCache binds one."""
    ip("-n", lab.client, "addr", "add", f"{LOCAL_SERVER_IP}/32", "dev", "lo")
    registry = CollectorRegistry()
    return DnsProbeCollector(
        "node-a", lambda: [LOCAL_SERVER_IP], registry, timeout=2.0, netns=lab.client
    )


@pytest.mark.root
def test_dead_local_server_is_refused_not_a_local_rule(lab: DnsLab) -> None:
    details = by_protocol(local_server_collector(lab).collect())
    assert details["udp"]["outcome"] == "refused"
    assert details["udp"]["offender"] == LOCAL_SERVER_IP
    assert "nothing listens" in details["udp"]["error"]
    assert details["tcp"]["outcome"] == "refused"


@pytest.mark.root
def test_local_server_behind_a_local_reject_is_a_local_rule(lab: DnsLab) -> None:
    collector = local_server_collector(lab)
    listener = run_in_netns(lab.client, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with listener:
        listener.bind((LOCAL_SERVER_IP, 53))
        lab.iptables(lab.client, "-A", "INPUT", "-p", "udp", "--dport", "53", "-j", "REJECT")
        details = by_protocol(collector.collect())
    assert details["udp"]["outcome"] == "local_rule"
    assert details["udp"]["offender"] == LOCAL_SERVER_IP


@pytest.mark.root
def test_series_of_removed_servers_go_away(lab: DnsLab) -> None:
    servers = [SERVER_IP]
    registry = CollectorRegistry()
    collector = DnsProbeCollector(
        "node-a", lambda: servers, registry, timeout=1.0, netns=lab.client
    )
    collector.collect()
    assert success(registry, "udp") == 1
    servers.clear()
    assert collector.collect() == []
    assert success(registry, "udp") is None


@pytest.mark.root
def test_run_in_netns_restores_nothing_because_it_never_moves(lab: DnsLab) -> None:
    here = os.readlink("/proc/thread-self/ns/net")
    there = run_in_netns(lab.client, lambda: os.readlink("/proc/thread-self/ns/net"))
    assert there != here
    assert os.readlink("/proc/thread-self/ns/net") == here
    with pytest.raises(FileNotFoundError):
        run_in_netns(f"nodediag-absent-{secrets.token_hex(3)}", lambda: None)
