"""The firewall collector with the DNS flows: DNSFlowBlocked findings, how they relate to
DNSDropRule / DNSNoEndpointsReject, the nodediag_dns_flow_ok gauge (fake runner); node facts
from real netlink in a throwaway network namespace, and from support-bundle dumps."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import realkernel
from prometheus_client import CollectorRegistry
from test_firewall import fake_runner
from test_netfilter_evaluate import FACTS, filter_table, kube_proxy_nft

from collectors.dns_probe import run_in_netns
from collectors.firewall_collector import FirewallCollector, findings_from_files
from collectors.netfilter.flows import NodeFacts, OverlayLink
from collectors.node_facts import (
    Address,
    Link,
    Netlink,
    RouteEntry,
    dump_facts,
    facts_from,
    read_netlink,
    read_node_facts,
)

VECTORS = Path(__file__).parent / "vectors" / "firewall"


def collector(
    outputs: dict[str, str], facts: NodeFacts = FACTS
) -> tuple[FirewallCollector, CollectorRegistry]:
    registry = CollectorRegistry()
    _, runner = fake_runner(outputs)
    found = FirewallCollector(
        "node-1", lambda: facts.cluster_dns, registry, runner=runner, facts=lambda: facts
    )
    return found, registry


def flow_ok(registry: CollectorRegistry, flow: str, family: str = "ipv4") -> float | None:
    return registry.get_sample_value("nodediag_dns_flow_ok", {"flow": flow, "family": family})


def test_policy_drop_is_a_flow_finding_and_the_gauge_says_which_flows() -> None:
    rules = filter_table(policies={"FORWARD": "DROP"})
    found, registry = collector({"iptables-save": rules})
    findings = found.collect()
    blocked = [f for f in findings if f.reason == "DNSFlowBlocked"]
    assert {f.details["flow"] for f in blocked} == {
        "pod-dns-udp",
        "pod-dns-tcp",
        "dns-upstream-udp",
        "dns-upstream-tcp",
    }
    details = next(f.details for f in blocked if f.details["flow"] == "pod-dns-udp")
    assert details["certain"] is True and details["policy"] is True
    assert details["chain"] == "FORWARD" and details["rule"] is None
    assert details["fix"] and details["path"]
    assert flow_ok(registry, "pod-dns-udp") == 0
    assert flow_ok(registry, "host-dns-udp") == 1
    assert flow_ok(registry, "overlay-vxlan") == 1


def test_port_53_rule_is_reported_once_with_the_flows_it_stops() -> None:
    rules = filter_table("-A OUTPUT -p udp -m udp --dport 53 -j DROP")
    found, registry = collector({"iptables-save": rules})
    findings = found.collect()
    assert [f.reason for f in findings] == ["DNSDropRule"]
    assert findings[0].details["flows"] == ["host-dns-udp/ipv4"]
    assert flow_ok(registry, "host-dns-udp") == 0


def test_unknown_flows_have_no_series_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    found, registry = collector({"iptables-save": filter_table()}, replace(FACTS, pod_cidrs=()))
    assert found.collect() == []
    assert flow_ok(registry, "pod-dns-udp") is None
    assert flow_ok(registry, "host-dns-udp") == 1
    assert "pod-dns-udp (ipv4) not evaluated" in caplog.text
    caplog.clear()
    found.collect()
    assert "not evaluated" not in caplog.text  # said once per change


def test_nftables_mode_no_endpoints_is_dns_no_endpoints_reject() -> None:
    nft = kube_proxy_nft([], no_endpoints=True)
    found, registry = collector({"nft": nft})
    findings = found.collect()
    assert {f.reason for f in findings} == {"DNSNoEndpointsReject"}
    assert findings[0].severity == "info" and findings[0].details["chain"] == "reject-chain"
    # One finding for kube-proxy's reject, naming every flow it stops.
    assert len(findings) == 1
    assert findings[0].details["flows"] == [
        f"{flow}/ipv4" for flow in ("pod-dns-udp", "pod-dns-tcp", "host-dns-udp", "host-dns-tcp")
    ]
    assert flow_ok(registry, "pod-dns-udp") == 0


def test_collector_reads_nat_for_the_service_dnat() -> None:
    nat = "\n".join(
        [
            "*nat",
            ":PREROUTING ACCEPT [0:0]",
            ":KUBE-SERVICES - [0:0]",
            "-A PREROUTING -j KUBE-SERVICES",
            "-A KUBE-SERVICES -d 10.43.0.10/32 -p udp -j DNAT --to-destination 10.42.3.3:53",
            "COMMIT",
            "",
        ]
    )
    rules = filter_table("-A FORWARD -d 10.42.3.3/32 -j DROP")
    found, _ = collector({"iptables-save": nat + rules})
    flows = {f.details["flow"] for f in found.collect() if f.reason == "DNSFlowBlocked"}
    assert "pod-dns-udp" in flows and "pod-dns-tcp" not in flows


def test_analyze_dump_facts_from_kube_proxy_comments() -> None:
    text = (VECTORS / "clean_rke2.iptables-save").read_text()
    facts = dump_facts(text, None, (), ("10.42.0.0/24",))
    assert facts.cluster_dns == ("10.43.0.10",)
    assert "cali+" in facts.pod_interfaces
    flannel = dump_facts("-A INPUT -i flannel.1 -j ACCEPT\n", None, (), ())
    assert flannel.overlay == (OverlayLink("flannel.1", "vxlan", 8472),)
    nft = dump_facts(None, kube_proxy_nft(["10.42.0.5"]), (), ())
    assert nft.cluster_dns == ("10.43.0.10",)
    ufw = (VECTORS / "ufw_default.iptables-save").read_text()
    blank = dump_facts(ufw, None, ("10.43.0.10",), ("10.42.0.0/24",))
    assert blank.pod_interfaces == ("+",)
    findings = findings_from_files(ufw, None, blank.cluster_dns, "n", blank)
    assert {f.details["flow"] for f in findings} == {"pod-dns-udp", "pod-dns-tcp"}


def test_facts_from_calico_routes_and_files() -> None:
    links = [
        Link(1, "lo"),
        Link(2, "ens3"),
        Link(3, "cali12ab", "veth"),
        Link(4, "vxlan.calico", "vxlan", 4789),
        Link(5, "nodelocaldns", "dummy"),
        Link(6, "kube-ipvs0", "dummy"),
    ]
    addresses = [
        Address(2, "192.168.9.4"),
        Address(2, "fe80::1", global_scope=False),
        Address(5, "169.254.20.10"),
        Address(5, "fe80::2", global_scope=False),
        Address(4, "10.244.7.0"),
    ]
    routes = [
        RouteEntry(None, 2),
        RouteEntry("10.244.7.0/26", None, blackhole=True),
        RouteEntry("10.244.7.5/32", 3),
        RouteEntry("10.244.9.0/26", 4),
    ]
    cni = (
        '{"plugins": [{"type": "host-local", "ipam": {"ranges": [[{"subnet": "10.244.7.0/26"}]]}}]}'
    )
    resolv = "nameserver 8.8.8.8\n"
    fdb = [(4, "192.168.9.5"), (4, "192.168.9.4")]  # a peer, and the node itself
    facts = facts_from(links, addresses, routes, ["10.96.0.10"], None, [cni], resolv, fdb)
    assert facts.pod_cidrs == ("10.244.7.0/26",)
    assert facts.cluster_cidrs == ("10.244.9.0/26",)
    assert facts.pod_interfaces == ("cali+",)
    assert facts.node_addresses == ("192.168.9.4",)
    assert facts.uplink == "ens3"
    assert facts.overlay == (OverlayLink("vxlan.calico", "vxlan", 4789),)
    assert facts.local_dns_cache == ("169.254.20.10",)
    assert facts.peer_nodes == ("192.168.9.5",)
    assert facts.service_ips_local and facts.upstream_dns == ("8.8.8.8",)


def test_resolver_file_from_kubelet_config(tmp_path: Path) -> None:
    (tmp_path / "var/lib/kubelet").mkdir(parents=True)
    (tmp_path / "var/lib/kubelet/config.yaml").write_text("resolvConf: /run/resolved.conf\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run/resolved.conf").write_text("nameserver 9.9.9.9\n")
    (tmp_path / "run/flannel").mkdir()
    (tmp_path / "run/flannel/subnet.env").write_text(
        "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.3.1/24\n"
    )
    facts, problems = read_node_facts(tmp_path, ["10.43.0.10"], netlink=Netlink)
    assert problems == []
    assert facts.upstream_dns == ("9.9.9.9",)
    assert facts.pod_cidrs == ("10.42.3.0/24",) and facts.cluster_cidrs == ("10.42.0.0/16",)
    _, missing = read_node_facts(tmp_path / "none", [], netlink=Netlink)
    assert any("upstream nameservers unknown" in p for p in missing)


def test_unreadable_kubelet_config_is_a_problem_not_a_silent_default(tmp_path: Path) -> None:
    (tmp_path / "var/lib/kubelet").mkdir(parents=True)
    (tmp_path / "var/lib/kubelet/config.yaml").write_text("resolvConf: [unclosed\n")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/resolv.conf").write_text("nameserver 9.9.9.9\n")
    facts, problems = read_node_facts(tmp_path, ["10.43.0.10"], netlink=Netlink)
    assert facts.upstream_dns == ("9.9.9.9",)  # kubelet's default, as before
    assert any("var/lib/kubelet/config.yaml" in p for p in problems)


@pytest.fixture
def node_netns() -> Iterator[str]:
    if os.geteuid() != 0:
        realkernel.skip_or_fail("needs root")
    name = f"nodediag-facts-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in (
            "link set lo up",
            "link add eth0 type veth peer name eth0p",
            "addr add 192.168.5.10/24 dev eth0",
            "link set eth0 up",
            "link set eth0p up",
            "route add default via 192.168.5.1 dev eth0",
            "link add cni0 type bridge",
            "addr add 10.42.0.1/24 dev cni0",
            "link set cni0 up",
            "link add flannel.1 type vxlan id 1 local 192.168.5.10 dstport 8472 dev eth0",
            "link add vxlan-v6 type vxlan id 2 local fd00:5::10 dstport 4789 dev eth0",
            "link set flannel.1 up",
            "route add 10.42.1.0/24 via 10.42.1.0 dev flannel.1 onlink",
            "neigh add 10.42.1.0 lladdr 0a:00:00:00:00:01 dev flannel.1 nud permanent",
            "fdb append 0a:00:00:00:00:01 dev flannel.1 dst 192.168.5.20 self permanent",
            "link add nodelocaldns type veth peer name nlp",
            "addr add 169.254.20.10/32 dev nodelocaldns",
        ):
            tool = ["bridge", "-netns", name] if command.startswith("fdb") else ["ip", "-n", name]
            subprocess.run([*tool, *command.split()], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.root
def test_facts_from_real_netlink(node_netns: str) -> None:
    shown = run_in_netns(node_netns, read_netlink)
    facts = facts_from(
        shown.links,
        shown.addresses,
        shown.routes,
        ["10.43.0.10"],
        resolv_conf="nameserver 1.1.1.1",
        fdb=shown.fdb,
    )
    assert facts.pod_cidrs == ("10.42.0.0/24",)
    assert facts.cluster_cidrs == ("10.42.1.0/24",)
    assert facts.pod_interfaces == ("cni0",)
    assert facts.uplink == "eth0" and facts.node_addresses == ("192.168.5.10",)
    assert facts.overlay == (
        OverlayLink("flannel.1", "vxlan", 8472, "ipv4"),
        OverlayLink("vxlan-v6", "vxlan", 4789, "ipv6"),
    )
    assert facts.local_dns_cache == ("169.254.20.10",)
    assert facts.peer_nodes == ("192.168.5.20",)


def test_dead_port_53_rules_are_not_reported() -> None:
    rules = filter_table(
        "-A OUTPUT -j ACCEPT",
        "-A OUTPUT -p udp -m udp --dport 53 -j DROP",
        "-A FORWARD -g SOMEWHERE",
        "-A FORWARD -p tcp -m tcp --dport 53 -j REJECT",
        "-A SOMEWHERE -j RETURN",
        "-A SOMEWHERE -p udp -m udp --dport 53 -j DROP",
        chains=("SOMEWHERE",),
    )
    found, registry = collector({"iptables-save": rules})
    assert found.collect() == []
    assert flow_ok(registry, "host-dns-udp") == 1
    assert flow_ok(registry, "pod-dns-tcp") == 1


def test_collector_reads_ipset_members_for_the_flows() -> None:
    rules = filter_table("-A OUTPUT -m set --match-set blocked dst -j DROP")
    sets = "create blocked hash:ip family inet\nadd blocked 10.43.0.10\n"
    found, registry = collector({"iptables-save": rules, "ipset": sets})
    flows = {f.details["flow"] for f in found.collect() if f.reason == "DNSFlowBlocked"}
    assert flows == {"host-dns-udp", "host-dns-tcp"}
    assert flow_ok(registry, "dns-upstream-udp") == 1  # decided: 1.1.1.1 is not in the set
    without, _ = collector({"iptables-save": rules})
    undecided = [f for f in without.collect() if f.reason == "DNSFlowBlocked"]
    assert undecided and not any(f.details["certain"] for f in undecided)
