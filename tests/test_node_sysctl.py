"""Bridge netfilter, forwarding, rp_filter and overlay MTU checks on real kernel state in
network namespaces the tests create (these sysctls are per namespace), with the kernel as the
oracle where it can say: a pod's query to a Service IP DNAT'd to a pod on the same bridge
gets its answer only with bridge netfilter and forwarding on. Cases the kernel here cannot
build (no br_netfilter module to unload, no ipip/wireguard drivers) run on recorded inputs."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import REPO, free_port, json_lines
from nodenet import NodeNetns, throwaway_netns
from prometheus_client import CollectorRegistry

from collectors.dns_probe import run_in_netns
from collectors.finding import Finding
from collectors.links import LinkView, NetLink
from collectors.node_sysctl import NodeSysctlCollector, Settings, rp_filter_finding
from collectors.overlay_mtu import OverlayMtuCollector, Underlay, mtu_finding, overhead

SERVICE_IP = "10.96.0.10"


def reasons(findings: list[Finding]) -> list[str]:
    return sorted(f.reason for f in findings)


def check(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value("nodediag_node_check_ok", {"check": name})


# ------------------------------------------------------------------ recorded inputs


def link(index: int, name: str, kind: str | None, **kw: object) -> NetLink:
    return NetLink(index, name, kind, **kw)  # type: ignore[arg-type]


def test_br_netfilter_absent_on_a_fixture_proc(tmp_path: Path) -> None:
    """A kernel without br_netfilter loaded has no /proc/sys/net/bridge."""
    ipv4 = tmp_path / "sys" / "net" / "ipv4"
    (ipv4 / "conf" / "all").mkdir(parents=True)
    (ipv4 / "ip_forward").write_text("1\n")
    (ipv4 / "conf" / "all" / "rp_filter").write_text("0\n")
    pod_veth = link(3, "veth1", "veth", master=2, peer_elsewhere=True)
    view = LinkView([link(2, "cni0", "bridge"), pod_veth], ["cni0"])
    (ipv4 / "conf" / "cni0").mkdir()
    (ipv4 / "conf" / "cni0" / "rp_filter").write_text("0\n")
    registry = CollectorRegistry()
    collector = NodeSysctlCollector("node-1", registry, proc=tmp_path, links=lambda: view)
    [finding] = collector.collect()
    assert finding.reason == "BridgeNetfilterDisabled"
    assert finding.details["br_netfilter_loaded"] is False
    assert finding.details["fix"].startswith("modprobe br_netfilter && sysctl -w")
    assert "net.bridge.bridge-nf-call-ip6tables=1" in finding.details["fix"]  # IPv6 on cni0
    assert "/etc/modules-load.d/br_netfilter.conf" in finding.details["fix_persistent"]
    assert check(registry, "bridge_netfilter") == 0
    results = {r.source: r.status for r in collector.sources.results()}
    assert results["ipv6_forwarding"] == "skipped"  # no /proc/sys/net/ipv6 in the fixture


def test_unreadable_sysctl_is_a_failed_source_and_the_rest_go_on(tmp_path: Path) -> None:
    view = LinkView([link(3, "veth1", "veth", peer_elsewhere=True)])
    registry = CollectorRegistry()
    collector = NodeSysctlCollector("n", registry, proc=tmp_path, links=lambda: view)
    assert collector.collect() == []
    results = {r.source: r.status for r in collector.sources.results()}
    assert results["ip_forward"] == "failed" and results["links"] == "ok"
    assert check(registry, "ip_forward") is None  # not known, so no series


def test_rp_filter_effective_value_is_the_max() -> None:
    view = LinkView([link(4, "flannel.1", "vxlan"), link(5, "vxlan.calico", "vxlan")])
    loose_all = Settings(rp_filter_all=2, rp_filter={"flannel.1": 1, "vxlan.calico": 0})
    assert rp_filter_finding("n", view, loose_all) is None  # max(2, 1) = 2
    strict_all = Settings(rp_filter_all=1, rp_filter={"flannel.1": 0, "vxlan.calico": 2})
    finding = rp_filter_finding("n", view, strict_all)
    assert finding is not None and finding.details["links"] == {"flannel.1": 0}
    assert finding.details["fix"] == "sysctl -w net.ipv4.conf.all.rp_filter=2"
    own = rp_filter_finding("n", view, Settings(rp_filter_all=0, rp_filter={"vxlan.calico": 1}))
    assert own is not None
    assert own.details["fix"] == (
        "sysctl -w net.ipv4.conf.vxlan/calico.rp_filter=2 net.ipv4.conf.default.rp_filter=2"
    )


@pytest.mark.parametrize(
    ("tunnel", "extra"),
    [
        (link(7, "tunl0", "ipip", mtu=1480, local="10.0.0.1"), 20),
        (link(8, "wireguard.cali", "wireguard", mtu=1440), 60),
        (link(9, "vxlan-v6.calico", "vxlan", mtu=1430, local="fd00::1"), 70),
        (link(10, "flannel.1", "vxlan", mtu=1450), 50),
    ],
)
def test_overlay_overheads(tunnel: NetLink, extra: int) -> None:
    assert overhead(tunnel) == extra
    fits = Underlay(link(2, "eth0", "veth", mtu=(tunnel.mtu or 0) + extra), "pinned link")
    assert mtu_finding("n", tunnel, fits) is None
    small = Underlay(link(2, "eth0", None, mtu=(tunnel.mtu or 0) + extra - 1), "default route")
    finding = mtu_finding("n", tunnel, small)
    assert finding is not None and finding.details["excess"] == 1
    assert finding.details["fix"] == f"ip link set dev {tunnel.name} mtu {(tunnel.mtu or 0) - 1}"
    assert overhead(link(11, "genev_sys", "geneve", mtu=1400)) is None


# ------------------------------------------------------------------ real namespaces (root)


def known_start(ns: NodeNetns) -> None:
    """Settings a new namespace would otherwise inherit from the host's (IPv4 conf copies
    the initial namespace's): forwarding on, rp_filter off, for links made later too."""
    ns.write_sysctl("net/ipv4/ip_forward", 1)
    ns.write_sysctl("net/ipv4/conf/all/rp_filter", 0)
    ns.write_sysctl("net/ipv4/conf/default/rp_filter", 0)


@pytest.fixture
def ns() -> Iterator[NodeNetns]:
    with throwaway_netns() as made:
        known_start(made)
        yield made


@pytest.fixture
def pod() -> Iterator[NodeNetns]:
    with throwaway_netns() as made:
        yield made


def pod_bridge(ns: NodeNetns, pod: NodeNetns | None = None) -> None:
    """cni0 with a veth port; the veth's other end in ``pod``'s namespace, as a pod's is (a
    pair with both ends here is no pod)."""
    ns.ip("link", "add", "cni0", "type", "bridge")
    peer = ["netns", pod.name] if pod is not None else []
    ns.ip("link", "add", "veth0", "type", "veth", "peer", "name", "eth0", *peer)
    ns.ip("link", "set", "veth0", "master", "cni0")


@pytest.mark.root
def test_bridge_netfilter_forwarding_and_rp_filter_in_a_namespace(
    ns: NodeNetns, pod: NodeNetns
) -> None:
    registry = CollectorRegistry()
    collector = NodeSysctlCollector("node-1", registry, netns=ns.name)
    ns.write_sysctl("net/ipv4/ip_forward", 1)
    ns.write_sysctl("net/ipv6/conf/all/forwarding", 1)
    ns.write_sysctl("net/ipv4/conf/all/rp_filter", 0)
    ns.write_sysctl("net/bridge/bridge-nf-call-iptables", 0)
    assert collector.collect() == []  # no bridge with veths: nothing depends on it
    assert check(registry, "bridge_netfilter") == 1
    pod_bridge(ns)
    assert collector.collect() == []  # a veth pair with both ends here is no pod
    ns.ip("link", "del", "cni0")
    ns.ip("link", "del", "veth0")
    pod_bridge(ns, pod)
    [bridge] = collector.collect()
    assert bridge.reason == "BridgeNetfilterDisabled"
    assert bridge.details["bridges"] == ["cni0"]
    assert bridge.details["fix"] == "sysctl -w net.bridge.bridge-nf-call-iptables=1"
    ns.write_sysctl("net/bridge/bridge-nf-call-iptables", 1)
    ns.write_sysctl("net/bridge/bridge-nf-call-ip6tables", 0)
    assert collector.collect() == []  # ip6tables matters only on an IPv6 node
    ns.ip("link", "set", "cni0", "up")
    ns.ip("addr", "add", "2001:db8:42::1/64", "dev", "cni0", "nodad")
    [bridge6] = collector.collect()
    assert bridge6.details["fix"] == "sysctl -w net.bridge.bridge-nf-call-ip6tables=1"
    ns.write_sysctl("net/bridge/bridge-nf-call-ip6tables", 1)

    ns.write_sysctl("net/ipv4/ip_forward", 0)
    ns.write_sysctl("net/ipv6/conf/all/forwarding", 0)
    [forwarding] = collector.collect()
    assert forwarding.reason == "IPForwardingDisabled"
    assert forwarding.details["disabled"] == ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]
    assert check(registry, "ip_forward") == 0
    ns.write_sysctl("net/ipv4/ip_forward", 1)
    ns.write_sysctl("net/ipv6/conf/all/forwarding", 1)

    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "8472")
    ns.write_sysctl("net/ipv4/conf/flannel.1/rp_filter", 1)
    [strict] = collector.collect()
    assert strict.reason == "StrictReversePathFilter"
    assert strict.details["links"] == {"flannel.1": 1}
    # the fix the finding prints, applied in the namespace, clears it
    ns.run("sh", "-c", strict.details["fix"])
    assert ns.read_sysctl("net/ipv4/conf/flannel.1/rp_filter") == "2"
    assert collector.collect() == []
    assert [check(registry, c) for c in ("bridge_netfilter", "ip_forward", "rp_filter")] == [1] * 3


class UdpEcho:
    """A UDP server in a namespace answering each datagram with its own bytes."""

    def __init__(self, netns: str, address: str, port: int) -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((address, port))
            return sock

        self.sock = run_in_netns(netns, make)
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def query(netns: str, server: str, port: int = 53) -> bool:
    """Whether a datagram to ``server`` from a socket in ``netns`` is answered (from the
    address it was sent to: a reply from another address is not an answer)."""
    sock = run_in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.settimeout(1.0)
    with sock:
        sock.connect((server, port))  # connected: replies from other addresses are dropped
        sock.send(b"nodediag")
        try:
            return sock.recv(512) == b"nodediag"
        except (TimeoutError, ConnectionRefusedError):
            return False


@pytest.mark.root
def test_the_kernel_agrees_a_pod_on_the_bridge_cannot_reach_the_dns_service() -> None:
    """Node namespace with cni0 and a DNAT of the DNS Service IP to a DNS pod on the same
    bridge; a client pod asks the Service IP. With bridge-nf-call-iptables 0 the DNS pod's
    reply is bridged straight back, un-NATed, and the client never gets it."""
    with (
        throwaway_netns() as node,
        throwaway_netns() as client,
        throwaway_netns() as dns,
    ):
        for each in (node, client, dns):
            known_start(each)
        node.ip("link", "add", "cni0", "type", "bridge")
        node.ip("addr", "add", "10.244.0.1/24", "dev", "cni0")
        node.ip("link", "set", "cni0", "up")
        for pod, address in ((client, "10.244.0.2"), (dns, "10.244.0.3")):
            port = f"veth{address.rsplit('.', 1)[1]}"
            node.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", pod.name)
            node.ip("link", "set", port, "master", "cni0", "up")
            pod.ip("addr", "add", f"{address}/24", "dev", "eth0")
            pod.ip("link", "set", "eth0", "up")
            pod.ip("route", "add", "default", "via", "10.244.0.1")
        node.run(
            "nft",
            "add table ip kube; add chain ip kube pre"
            " { type nat hook prerouting priority -100; };"
            f" add rule ip kube pre ip daddr {SERVICE_IP} udp dport 53 dnat to 10.244.0.3:53",
        )
        node.write_sysctl("net/ipv4/conf/all/rp_filter", 0)
        echo = UdpEcho(dns.name, "10.244.0.3", 53)
        try:
            registry = CollectorRegistry()
            collector = NodeSysctlCollector("node-1", registry, netns=node.name)
            verdicts = {}
            for forward, bridge_nf in ((1, 1), (1, 0), (0, 1)):
                node.write_sysctl("net/ipv4/ip_forward", forward)
                node.write_sysctl("net/bridge/bridge-nf-call-iptables", bridge_nf)
                node.run("conntrack", "-F", check=False)  # no entry from the last round
                answered = query(client.name, SERVICE_IP)
                verdicts[(forward, bridge_nf)] = (answered, reasons(collector.collect()))
            assert query(client.name, "10.244.0.3")  # the pod itself is reachable throughout
        finally:
            echo.close()
        assert verdicts == {
            (1, 1): (True, []),
            (1, 0): (False, ["BridgeNetfilterDisabled"]),
            (0, 1): (False, ["IPForwardingDisabled"]),
        }


@pytest.mark.root
def test_overlay_mtu_against_real_links(ns: NodeNetns) -> None:
    registry = CollectorRegistry()
    collector = OverlayMtuCollector("node-1", registry, netns=ns.name)
    ns.ip("link", "add", "eth0", "mtu", "1400", "type", "veth", "peer", "name", "eth0p")
    ns.ip("addr", "add", "192.0.2.1/24", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "8472", "dev", "eth0")
    assert ns.run("cat", "/sys/class/net/flannel.1/mtu").strip() == "1350"  # the kernel's own
    assert collector.collect() == []
    assert check(registry, "overlay_mtu") == 1
    ns.ip("link", "set", "eth0", "mtu", "1380")  # the underlay shrank under the overlay
    [pinned] = collector.collect()
    assert pinned.reason == "OverlayMTUTooLarge"
    assert (pinned.details["underlay"], pinned.details["excess"]) == ("eth0", 20)
    assert pinned.details["underlay_found_by"] == "pinned link"
    ns.run("sh", "-c", pinned.details["fix"])
    assert collector.collect() == []

    # a vxlan without "dev": its underlay is the route to its remote end
    ns.ip(
        "link",
        "add",
        "vxlan.calico",
        "mtu",
        "1500",
        "type",
        "vxlan",
        "id",
        "4096",
        "dstport",
        "4789",
        "remote",
        "192.0.2.9",
    )
    [routed] = collector.collect()
    assert routed.details["interface"] == "vxlan.calico"
    assert routed.details["underlay_found_by"] == "route to 192.0.2.9"
    assert routed.details["excess"] == 1500 + 50 - 1380
    assert check(registry, "overlay_mtu") == 0
    ns.ip("link", "del", "vxlan.calico")
    # no dev, no remote, no local, no default route: not checked, and said so
    ns.ip("link", "add", "vx9", "type", "vxlan", "id", "9", "dstport", "4789")
    collector.sources.start()
    assert collector.collect() == []
    failed = [r for r in collector.sources.results() if r.status == "failed"]
    assert [r.source for r in failed] == ["underlay of vx9"]
    assert check(registry, "overlay_mtu") is None


# ------------------------------------------------------------------ the real CLI


@pytest.mark.root
def test_scan_reports_node_settings_and_the_resolver_loop(
    ns: NodeNetns, pod: NodeNetns, tmp_path: Path
) -> None:
    """``nodediag scan`` in a namespace playing the node, with a host root whose
    /etc/resolv.conf is systemd-resolved's stub (and /proc the real one)."""
    pod_bridge(ns, pod)
    ns.write_sysctl("net/bridge/bridge-nf-call-iptables", 0)
    ns.write_sysctl("net/ipv4/ip_forward", 1)
    ns.ip("link", "add", "eth0", "mtu", "1450", "type", "veth", "peer", "name", "uplink")
    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "8472", "dev", "eth0")
    ns.ip("link", "set", "eth0", "mtu", "1420")  # flannel.1 keeps 1400: 30 bytes too many
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "resolv.conf").write_text("nameserver 127.0.0.53\noptions edns0\n")
    (root / "proc").symlink_to("/proc")
    result = ns.scan(root, "10.43.0.10")
    assert result.returncode == 1, result.stderr
    found = {f["reason"]: f for f in json_lines(result.stdout)}
    assert {"BridgeNetfilterDisabled", "OverlayMTUTooLarge", "DNSResolverLoop"} <= set(found)
    for reason in ("BridgeNetfilterDisabled", "OverlayMTUTooLarge", "DNSResolverLoop"):
        assert found[reason]["subject"]["kind"] == "Node"
        assert found[reason]["subject"]["name"] == "node-x"
        assert found[reason]["severity"] == "warning"
    assert found["OverlayMTUTooLarge"]["details"]["underlay"] == "eth0"
    assert found["OverlayMTUTooLarge"]["details"]["excess"] == 30
    assert found["DNSResolverLoop"]["details"]["loopback"] == ["127.0.0.53"]
    assert "IPForwardingDisabled" not in found


@pytest.mark.root
def test_run_exports_the_node_checks(ns: NodeNetns, pod: NodeNetns, tmp_path: Path) -> None:
    """``nodediag run`` in a namespace playing the node: the checks' gauge, the conntrack
    gauges, every new collector and source read, and the finding in the log."""
    from prometheus_client.parser import text_string_to_metric_families

    pod_bridge(ns, pod)
    ns.write_sysctl("net/bridge/bridge-nf-call-iptables", 0)
    root = tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    (root / "proc").symlink_to("/proc")
    port = free_port()
    out = (tmp_path / "stdout").open("w+")  # files, not pipes: a full pipe would block it
    agent = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-m", "agent", "run", "--no-kube",
         "--kernel-log", "kmsg", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path),
         "--host-root", str(root), "--cluster-dns", "127.0.0.1", "--node-name", "node-x"],
        stdout=out, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
    )  # fmt: skip
    script = f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    new = ("conntrack", "node_sysctl", "overlay_mtu", "resolver")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = ns.run("python3", "-c", script, check=False)
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            if all(("nodediag_collector_success", (("collector", c),)) in samples for c in new):
                break
            time.sleep(0.2)
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        out.seek(0)
        log = out.read()
        out.close()
    assert [samples.get(("nodediag_collector_success", (("collector", c),))) for c in new] == [
        1.0
    ] * 4
    sources = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "nodediag_collector_source_success" and dict(labels)["collector"] in new
    }
    assert sources and set(sources.values()) == {1.0}, sources
    checks = {
        dict(labels)["check"]: value
        for (name, labels), value in samples.items()
        if name == "nodediag_node_check_ok"
    }
    assert checks == {
        "bridge_netfilter": 0.0, "ip_forward": 1.0, "rp_filter": 1.0, "overlay_mtu": 1.0,
        "resolver": 1.0,
    }  # fmt: skip
    limit = float(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    assert samples[("nodediag_conntrack_max", ())] == limit
    assert ("nodediag_conntrack_insert_failed_total", ()) in samples
    reasons = [json_lines(line)[0]["reason"] for line in log.splitlines() if line.startswith("{")]
    assert "BridgeNetfilterDisabled" in reasons
