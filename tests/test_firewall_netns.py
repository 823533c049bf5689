"""The firewall collector against real iptables-nft, iptables-legacy and nftables rules,
loaded into throwaway network namespaces (``ip netns add nodediag-fw-<random>``).

Traffic stays inside the namespace: an interface whose veth peer is in the same namespace
carries the routes to the cluster
ranges (packets routed there are discarded by the dummy device), and TCP to the namespace's
own address goes over its loopback.

The helpers here (``Netns``, ``SCENARIOS``) are also used by
``tests/vectors/firewall/record.py`` (which recorded the unit tests' vectors) and by
``bench/firewall.py``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import pytest
import realkernel
from prometheus_client import CollectorRegistry

from collectors.firewall_collector import FirewallCollector
from collectors.netfilter.nft_socket import NftNetlink
from collectors.registry import CollectorError, run_command

SRC = Path(__file__).parent / "vectors" / "firewall" / "src"
RKE2_DNS = "10.43.0.10"
KUBEADM_DNS = ("10.96.0.10", "fd00:10:96::a")
NODELOCAL_DNS = "169.254.20.10"

#: name -> (source files loaded in order, cluster DNS IPs). The loader is chosen by suffix:
#: .rules iptables-restore, .rules6 ip6tables-restore, .legacy iptables-legacy-restore,
#: .nft nft -f (fault files are loaded with --noflush on top of the clean set).
RKE2 = ("rke2_canal_nodelocal.rules", "native_clean.nft")
KUBEADM = ("kubeadm_calico.rules", "kubeadm_calico.rules6")
SCENARIOS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "clean_rke2": (RKE2, (RKE2_DNS, NODELOCAL_DNS)),
    "clean_kubeadm": (KUBEADM, KUBEADM_DNS),
    **{
        f"fault_{name}": ((*RKE2, f"fault_{name}.rules"), (RKE2_DNS, NODELOCAL_DNS))
        for name in (
            "output_drop",
            "custom_reject",
            "multiport",
            "range",
            "negated_dst",
            "proto_number",
            "all_to_dns",
            "negations",
            "no_endpoints",
            "ufw",
        )
    },
    "fault_ip6": ((*KUBEADM, "fault_ip6.rules6"), KUBEADM_DNS),
    "fault_legacy": ((*RKE2, "fault_legacy.legacy"), (RKE2_DNS, NODELOCAL_DNS)),
    "fault_native": ((*RKE2, "fault_native.nft"), (RKE2_DNS, NODELOCAL_DNS)),
}

#: scenario -> what the collector must report: (reason, backend, family, table, chain,
#: position, jump path, hits cluster DNS, manager).
Expected = tuple[str, str, str, str, str, int, tuple[str, ...], bool, str | None]
EXPECTED: dict[str, list[Expected]] = {
    "clean_rke2": [],
    "clean_kubeadm": [],
    "fault_negations": [],
    "fault_output_drop": [
        ("DNSDropRule", "iptables-nft", "ipv4", "filter", "OUTPUT", 1, ("OUTPUT",), True, None)
    ],
    "fault_custom_reject": [
        (
            "DNSDropRule",
            "iptables-nft",
            "ipv4",
            "filter",
            "HARDEN-IN",
            2,
            ("INPUT", "HARDEN-IN"),
            True,
            None,
        )
    ],
    "fault_multiport": [
        ("DNSDropRule", "iptables-nft", "ipv4", "filter", "OUTPUT", 9, ("OUTPUT",), True, None)
    ],
    "fault_range": [
        ("DNSDropRule", "iptables-nft", "ipv4", "filter", "FORWARD", 8, ("FORWARD",), True, None)
    ],
    # "! -d 10.43.0.10/32" still drops DNS to NodeLocal DNSCache's 169.254.20.10.
    "fault_negated_dst": [
        ("DNSDropRule", "iptables-nft", "ipv4", "filter", "OUTPUT", 9, ("OUTPUT",), True, None)
    ],
    "fault_proto_number": [
        ("DNSDropRule", "iptables-nft", "ipv4", "filter", "OUTPUT", 9, ("OUTPUT",), True, None)
    ],
    "fault_all_to_dns": [
        ("DNSDropRule", "iptables-nft", "ipv4", "filter", "OUTPUT", 9, ("OUTPUT",), True, None)
    ],
    "fault_no_endpoints": [
        (
            "DNSNoEndpointsReject",
            "iptables-nft",
            "ipv4",
            "filter",
            "KUBE-SERVICES",
            2,
            ("FORWARD", "KUBE-SERVICES"),
            True,
            None,
        )
    ],
    "fault_ufw": [
        (
            "DNSDropRule",
            "iptables-nft",
            "ipv4",
            "filter",
            "ufw-user-output",
            position,
            ("OUTPUT", "ufw-before-output", "ufw-user-output"),
            True,
            "ufw",
        )
        for position in (1, 2)
    ],
    "fault_ip6": [
        ("DNSDropRule", "iptables-nft", "ipv6", "filter", "OUTPUT", 1, ("OUTPUT",), True, None)
    ],
    "fault_legacy": [
        ("DNSDropRule", "iptables-legacy", "ipv4", "filter", "OUTPUT", 1, ("OUTPUT",), True, None)
    ],
    "fault_native": [
        ("DNSDropRule", "nft", "inet", "hardening", "out", 1, ("out",), True, None),
        (
            "DNSDropRule",
            "nft",
            "inet",
            "hardening",
            "dns_block",
            1,
            ("in", "dns_block"),
            True,
            None,
        ),
    ],
}

_LOADERS = {
    ".rules": ("iptables-restore", "--noflush"),
    ".rules6": ("ip6tables-restore", "--noflush"),
    ".legacy": ("iptables-legacy-restore", "--noflush"),
    ".nft": ("nft", "-f", "-"),
}
REQUIRED_TOOLS = ("ip", "iptables-restore", "ip6tables-restore", "iptables-save", "nft")

# Sends `count` UDP datagrams (or TCP connection attempts) to host:port; errors are the point.
_SENDER = r"""
import socket, sys
host, port, count, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
query = bytes.fromhex("12340100000100000000000003777777076578616d706c6503636f6d0000010001")
for _ in range(count):
    if proto == "udp":
        s = socket.socket(family, socket.SOCK_DGRAM)
        try:
            s.sendto(query, (host, port))
        except OSError:
            pass
    else:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect((host, port))
        except OSError:
            pass
    s.close()
"""


class Netns:
    """A throwaway network namespace with lo up and an interface ``dummy0`` (one end of a
    veth pair whose other end is in the same namespace) routing the cluster ranges (10.42/16,
    10.43/16, 10.96/12, 169.254.20.10, fd00:10::/32) into the void."""

    def __init__(self) -> None:
        self.name = f"nodediag-fw-{secrets.token_hex(4)}"

    def __enter__(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            for argv in (
                ["ip", "link", "set", "lo", "up"],
                # A veth pair with both ends here (no dummy module everywhere): what is
                # routed out of dummy0 arrives on its peer, is not forwarded, and dies.
                ["ip", "link", "add", "dummy0", "type", "veth", "peer", "name", "dummy0p"],
                ["ip", "link", "set", "dummy0", "up"],
                ["ip", "link", "set", "dummy0p", "up"],
                ["ip", "addr", "add", "10.0.0.1/24", "dev", "dummy0"],
                ["ip", "-6", "addr", "add", "fd00:1::1/64", "dev", "dummy0", "nodad"],
                ["ip", "route", "add", "10.42.0.0/16", "dev", "dummy0"],
                ["ip", "route", "add", "10.43.0.0/16", "dev", "dummy0"],
                ["ip", "route", "add", "10.96.0.0/12", "dev", "dummy0"],
                ["ip", "route", "add", "169.254.20.10/32", "dev", "dummy0"],
                ["ip", "-6", "route", "add", "fd00:10::/32", "dev", "dummy0"],
            ):
                self.run(argv)
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.delete()

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

    def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name}: {done.stderr.strip()}")
        return done.stdout

    def runner(self, argv: Sequence[str]) -> str:
        """A collector Runner that runs the command inside the namespace."""
        if shutil.which(argv[0]) is None:
            raise CollectorError(f"{argv[0]} not found")
        return run_command(["ip", "netns", "exec", self.name, *argv], timeout=300)

    def load(self, path: Path, *, flush: bool = False) -> None:
        loader = _LOADERS[path.suffix]
        argv = [a for a in loader if not (flush and a == "--noflush")]
        self.run(argv, stdin=path.read_text())

    def load_scenario(self, name: str) -> tuple[str, ...]:
        files, cluster_dns = SCENARIOS[name]
        for file in files:
            self.load(SRC / file)
        return cluster_dns

    def send(self, host: str, port: int = 53, count: int = 1, proto: str = "udp") -> None:
        self.run(["python3", "-c", _SENDER, host, str(port), str(count), proto])


def kube_proxy_rules(services: int, endpoints: int = 3) -> str:
    """An iptables-restore text shaped like kube-proxy's with ``services`` ClusterIP Services
    of ``endpoints`` endpoints each (about 3 + 3 * endpoints nat rules per Service), plus the
    rke2 node's filter/raw/mangle rules and a kube-dns Service at 10.43.0.10."""
    base = (SRC / "rke2_canal_nodelocal.rules").read_text()
    head, _, nat = base.partition("*nat\n")
    nat_body = nat.rsplit("COMMIT", 1)[0]
    chains: list[str] = []
    rules: list[str] = []
    for n in range(services):
        ip = f"10.43.{100 + n // 250}.{n % 250 + 1}"
        svc = f"KUBE-SVC-{n:016X}"
        name = f"ns{n % 97}/svc-{n}:http"
        chains.append(f":{svc} - [0:0]")
        rules.append(
            f'-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment "{name} cluster IP" '
            f"-m tcp --dport 80 -j {svc}"
        )
        rules.append(
            f"-A {svc} ! -s 10.42.0.0/16 -d {ip}/32 -p tcp "
            f'-m comment --comment "{name} cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ'
        )
        for e in range(endpoints):
            sep = f"KUBE-SEP-{n:012X}{e:04X}"
            pod = f"10.42.{(n * endpoints + e) // 250 % 256}.{(n * endpoints + e) % 250 + 2}"
            chains.append(f":{sep} - [0:0]")
            left = endpoints - e
            stat = f"-m statistic --mode random --probability {1 / left:.11f} " if left > 1 else ""
            rules.append(f'-A {svc} -m comment --comment "{name} -> {pod}:8080" {stat}-j {sep}')
            rules.append(f'-A {sep} -s {pod}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ')
            rules.append(
                f'-A {sep} -p tcp -m comment --comment "{name}" -m tcp '
                f"-j DNAT --to-destination {pod}:8080"
            )
    nat_lines = nat_body.splitlines()
    declared = [line for line in nat_lines if line.startswith(":")]
    appended = [line for line in nat_lines if line.startswith("-A")]
    last = [line for line in appended if "NOTE: this must be the last rule" in line]
    appended = [line for line in appended if line not in last]
    return (
        head + "*nat\n" + "\n".join([*declared, *chains, *appended, *rules, *last]) + "\nCOMMIT\n"
    )


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


# --------------------------------------------------------------------------- tests

pytestmark = pytest.mark.root


@pytest.fixture
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0:
        realkernel.skip_or_fail("needs root")
    missing = missing_tools()
    if missing:
        realkernel.skip_or_fail(
            f"not installed: {', '.join(missing)} (Debian iptables, nftables, iproute2)"
        )
    with Netns() as ns:
        yield ns


def _collector(
    ns: Netns, cluster_dns: Sequence[str]
) -> tuple[FirewallCollector, CollectorRegistry]:
    registry = CollectorRegistry()
    collector = FirewallCollector(
        "node-1",
        lambda: cluster_dns,
        registry,
        runner=ns.runner,
        nft_netlink=lambda: NftNetlink(ns.name),  # the ruleset's generation in ns
    )
    return collector, registry


def _observed(collector: FirewallCollector) -> list[Expected]:
    return [
        (
            "DNSDropRule" if h.kind == "drop" else "DNSNoEndpointsReject",
            h.backend,
            h.family,
            h.table,
            h.chain,
            h.position,
            h.jump_path,
            h.hits_cluster_dns,
            h.manager,
        )
        for h in collector.last_hits
    ]


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_scenario_found_exactly_once(netns: Netns, scenario: str) -> None:
    cluster_dns = netns.load_scenario(scenario)
    collector, _ = _collector(netns, cluster_dns)
    findings = collector.collect()
    assert sorted(_observed(collector)) == sorted(EXPECTED[scenario])
    assert [f.reason for f in findings] == [h.reason for h in collector.last_hits]
    assert collector.last_nat_marks == {
        "kube_proxy_masquerade_mark": True,
        "flannel_postrouting_return": scenario.endswith(
            tuple(n for n in SCENARIOS if "kubeadm" not in n and n != "fault_ip6")
        ),
    }


def _dropped(registry: CollectorRegistry, family: str, table: str, chain: str) -> float:
    value = registry.get_sample_value(
        "nodediag_dns_dropped_packets_total", {"family": family, "table": table, "chain": chain}
    )
    return value or 0.0


def test_counters_rise_with_dns_packets_and_never_go_down(netns: Netns) -> None:
    cluster_dns = netns.load_scenario("fault_output_drop")
    netns.load(SRC / "fault_custom_reject.rules")
    collector, registry = _collector(netns, cluster_dns)
    collector.collect()
    assert (
        registry.get_sample_value(
            "nodediag_dns_drop_rules",
            {"family": "ipv4", "table": "filter", "chain": "OUTPUT", "target": "DROP"},
        )
        == 1
    )
    before = {(h.table, h.chain): h.packets for h in collector.last_hits}
    assert before[("filter", "OUTPUT")] == 0

    # UDP to the cluster DNS IP: NodeLocal DNSCache's NOTRACK keeps kube-proxy's DNAT away,
    # so filter OUTPUT sees 10.43.0.10 and drops (sendto fails with EPERM). TCP to our own
    # address goes out and back in over lo, through INPUT -> HARDEN-IN's REJECT.
    netns.send(RKE2_DNS, count=5)
    netns.send("10.0.0.1", count=3, proto="tcp")
    collector.collect()
    after = {(h.table, h.chain): h.packets for h in collector.last_hits}
    assert after[("filter", "OUTPUT")] == 5
    assert after[("filter", "HARDEN-IN")] >= 3
    assert _dropped(registry, "ipv4", "filter", "OUTPUT") == 5
    assert _dropped(registry, "ipv4", "filter", "HARDEN-IN") == after[("filter", "HARDEN-IN")]

    # The same rule deleted and re-created: its counters restart at 0, ours must not fall.
    rule = "-d 10.43.0.10/32 -p udp -m udp --dport 53 -j DROP"
    netns.run(["iptables", "-D", "OUTPUT", *rule.split()])
    netns.run(["iptables", "-I", "OUTPUT", "1", *rule.split()])
    netns.send(RKE2_DNS, count=2)
    collector.collect()
    again = {(h.table, h.chain): h.packets for h in collector.last_hits}
    assert again[("filter", "OUTPUT")] == 2
    assert _dropped(registry, "ipv4", "filter", "OUTPUT") == 7

    # A rule that is gone leaves the gauge (stale label sets are removed).
    netns.run(["iptables", "-D", "OUTPUT", "1"])
    collector.collect()
    assert (
        registry.get_sample_value(
            "nodediag_dns_drop_rules",
            {"family": "ipv4", "table": "filter", "chain": "OUTPUT", "target": "DROP"},
        )
        is None
    )
    assert _dropped(registry, "ipv4", "filter", "OUTPUT") == 7


def test_native_nft_counters_rise(netns: Netns) -> None:
    netns.load(SRC / "fault_native.nft")
    collector, registry = _collector(netns, (RKE2_DNS,))
    collector.collect()
    netns.send(RKE2_DNS, count=4)
    collector.collect()
    hits = {(h.table, h.chain): h for h in collector.last_hits}
    assert hits[("hardening", "out")].packets == 4
    assert _dropped(registry, "inet", "hardening", "out") == 4
    assert hits[("hardening", "out")].fix.startswith("nft delete rule inet hardening out handle ")


def test_fix_command_deletes_the_rule(netns: Netns) -> None:
    cluster_dns = netns.load_scenario("fault_custom_reject")
    netns.load(SRC / "fault_legacy.legacy")
    netns.load(SRC / "fault_native.nft")
    collector, _ = _collector(netns, cluster_dns)
    collector.collect()
    assert len(collector.last_hits) == 4
    for hit in collector.last_hits:
        netns.run(["sh", "-c", hit.fix])
    assert collector.collect() == []


def test_no_tool_at_all_is_one_clear_error(netns: Netns) -> None:
    def runner(argv: Sequence[str]) -> str:
        raise CollectorError(f"{argv[0]} not found")

    collector = FirewallCollector("n", lambda: (), CollectorRegistry(), runner=runner)
    with pytest.raises(CollectorError, match="none of them is installed"):
        collector.collect()
