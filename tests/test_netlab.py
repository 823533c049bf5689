"""The kernel as the oracle for the DNS flow evaluator.

A two-node lab in network namespaces (tests/netlab.py) gets real rule sets made by the real
tools (tests/netlab_scenarios.py: ufw, firewalld on a private D-Bus, nftables configs,
iptables-nft and -legacy, Docker- and kube-proxy-shaped rules); real DNS queries go along
every flow and the kernel's verdict (the query reached the server or not, the answer came
back or not, which drop counter rose) is compared with

- what each scenario is known to do (``KERNEL_DROPS``: the lab still behaves as recorded);
- the vectors recorded by tests/vectors/firewall/record_lab.py (offline, no root);
- the evaluator's verdict on the same rules (collectors.netfilter.evaluate) for the lab's
  ``NodeFacts``, live and on the recorded dumps: the same verdict, and for a dropped flow
  the same rule or policy (the kernel's: the counter that rose, or ``nft monitor trace``);
- the fixes the evaluator proposes, run in the lab: the kernel no longer stops the flow there.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import realkernel
from netlab import (
    NODE_CACHE,
    Lab,
    flow_key,
    iptables_drop_counters,
    lab,
    lab_flows,
    trace_stops,
)
from netlab_scenarios import SCENARIOS, apply_fix, load, missing_tools, runnable_fix

VECTORS = Path(__file__).parent / "vectors" / "firewall"
DUMPS = ("iptables-save", "ip6tables-save", "iptables-legacy-save", "nft.json")
#: Recorded since the lab has IPv6 scenarios (before, ip6tables-legacy was never loaded).
LATER_DUMPS = ("ip6tables-legacy-save",)

POD = ("pod-dns-udp", "pod-dns-tcp")
HOST = ("host-dns-udp", "host-dns-tcp")
UPSTREAM = ("dns-upstream-udp", "dns-upstream-tcp")
REPLIES = ("dns-replies",)
OVERLAY = ("overlay-vxlan",)
TUNNELS = ("overlay-ipip", "overlay-wireguard")


def v6(*flows: str) -> tuple[str, ...]:
    return tuple(flow_key(f, "ipv6") for f in flows)


#: scenario -> the flows the kernel stops (every other flow of ``netlab.lab_flows`` passes).
KERNEL_DROPS: dict[str, tuple[str, ...]] = {
    "lab_kube_proxy_iptables": (),
    "lab_kube_proxy_nft": (),
    # kube-proxy's "has no endpoints" REJECT in filter KUBE-SERVICES (FORWARD, OUTPUT).
    "lab_kube_proxy_iptables_no_endpoints": (*POD, *HOST),
    # kube-proxy's own reject for a Service without endpoints (filter-forward/-output).
    "lab_kube_proxy_nft_no_endpoints": (*POD, *HOST),
    # FORWARD policy DROP; INPUT policy DROP takes the vxlan packets from the peer, so the
    # answers from the DNS pod there never come back.
    "lab_ufw_default": (*POD, *UPSTREAM, *REPLIES, *OVERLAY),
    "lab_ufw_forward_accept": (*REPLIES, *OVERLAY),
    # `allow in on cni0` is an INPUT rule: forwarded pod traffic still meets FORWARD's DROP.
    "lab_ufw_allow_cni0": (*POD, *UPSTREAM, *REPLIES, *OVERLAY),
    # firewalld forwards DNAT'ed packets (ct status dnat accept) but rejects other
    # forwarding out of the public zone and UDP 8472 in.
    "lab_firewalld_nft": (*UPSTREAM, *REPLIES, *OVERLAY),
    "lab_firewalld_nft_fixed": (),
    "lab_firewalld_iptables": (*UPSTREAM, *REPLIES, *OVERLAY),
    "lab_firewalld_iptables_fixed": (),
    # input's final "counter drop" takes the vxlan packets; forward is not filtered.
    "lab_debian_workstation": (*REPLIES, *OVERLAY),
    "lab_alpine": (*POD, *UPSTREAM, *REPLIES, *OVERLAY),
    # Docker's FORWARD policy DROP; the host's own traffic is not forwarded.
    "lab_docker": (*POD, *UPSTREAM),
    # The pods' DNS to the other node leaves as vxlan from the node itself: OUTPUT.
    "lab_output_web_only": (*POD, *HOST),
    "lab_forward_drop_nft": (*POD, *UPSTREAM),
    "lab_forward_drop_legacy": (*POD, *UPSTREAM),
    # The twins of the fault_* vectors, on the lab's kube-proxy rules. A filter rule that
    # names the Service IP never sees it: nat's DNAT (priority -100) came first.
    "lab_fault_output_drop": (),
    "lab_fault_custom_reject": (),
    "lab_fault_multiport": ("host-dns-udp",),
    "lab_fault_range": ("pod-dns-tcp", "dns-upstream-tcp"),
    "lab_fault_negated_dst": ("host-dns-udp",),
    "lab_fault_proto_number": ("host-dns-tcp",),
    "lab_fault_all_to_dns": (),
    # "-p udp ! --dport 53 -j DROP" in OUTPUT also takes the vxlan packets the node sends.
    "lab_fault_negations": (*POD, *HOST),
    "lab_fault_ufw": HOST,
    "lab_fault_legacy": (),
    "lab_fault_native": (),
    # Dual stack: the pods' IPv6 rides the IPv4 vxlan link (its answers too).
    "lab_ipv6_kube_proxy": (),
    "lab_ipv6_kube_proxy_nft": (),
    # kube-proxy's reject for the IPv6 Service without endpoints; IPv4's still has one.
    "lab_ipv6_kube_proxy_nft_no_endpoints": v6(*POD, *HOST),
    # Forwarded UDP and the host's TCP dropped in IPv6 only, by either backend.
    "lab_ipv6_dns_drop_nft": v6("pod-dns-udp", "dns-upstream-udp", "host-dns-tcp"),
    "lab_ipv6_dns_drop_legacy": v6("pod-dns-udp", "dns-upstream-udp", "host-dns-tcp"),
    # ufw's IPv6 defaults are its IPv4 ones: FORWARD policy DROP; the IPv6 answers from the
    # other node come back inside vxlan, which IPv4's INPUT policy DROP takes.
    "lab_ipv6_ufw_default": (
        *POD,
        *UPSTREAM,
        *REPLIES,
        *OVERLAY,
        *v6(*POD, *UPSTREAM, *REPLIES),
    ),
    "lab_ipv6_inet_dns": v6("pod-dns-udp", "dns-upstream-udp", "host-dns-tcp"),
    "lab_ipv6_firewalld_nft": (*UPSTREAM, *REPLIES, *OVERLAY, *v6(*UPSTREAM, *REPLIES)),
    "lab_ipv6_firewalld_iptables": (*UPSTREAM, *REPLIES, *OVERLAY, *v6(*UPSTREAM, *REPLIES)),
    # The nftables examples are inet tables: both families alike.
    "lab_ipv6_debian_workstation": (*REPLIES, *OVERLAY, *v6(*REPLIES)),
    "lab_ipv6_alpine": (*POD, *UPSTREAM, *REPLIES, *OVERLAY, *v6(*POD, *UPSTREAM, *REPLIES)),
    "lab_vxlan6_alpine": (
        *POD,
        *UPSTREAM,
        *REPLIES,
        *OVERLAY,
        *v6(*POD, *UPSTREAM, *REPLIES, *OVERLAY),
    ),
    # The pods' IPv6 over vxlan-v6.calico: its packets are IPv6 UDP 4789, IPv6's INPUT judges
    # them (and the IPv6 answers from the other node inside them).
    "lab_vxlan6_kube_proxy": (),
    "lab_vxlan6_ufw_default": (
        *POD,
        *UPSTREAM,
        *REPLIES,
        *OVERLAY,
        *v6(*POD, *UPSTREAM, *REPLIES, *OVERLAY),
    ),
    "lab_vxlan6_firewalld_nft": (*UPSTREAM, *REPLIES, *OVERLAY, *v6(*UPSTREAM, *REPLIES, *OVERLAY)),
    # NodeLocal DNSCache: pods and host ask the node; the queries are untracked (NOTRACK).
    "lab_nodelocal": (),
    # Untracked is not ESTABLISHED: the pods' queries meet the input policy; the host's come
    # in on lo, which the firewall accepts.
    "lab_nodelocal_established_only": (*POD, *OVERLAY),
    # node-cache's INPUT accepts come before ufw's chains; the pods' upstream meets FORWARD's
    # policy (the cache's own, from the host, passes).
    "lab_nodelocal_ufw_default": (*UPSTREAM, *OVERLAY),
    # firewalld's inet table is not iptables' INPUT: its public zone rejects the pods' queries.
    "lab_nodelocal_firewalld_nft": (*POD, *UPSTREAM, *OVERLAY),
    # firewalld's public zone rejects protocol 4 and UDP 51820 as it does UDP 8472.
    "lab_tunnels_firewalld": (*UPSTREAM, *REPLIES, *OVERLAY, *TUNNELS),
    "lab_tunnels_firewalld_allowed": (),
    "lab_tunnels_ufw_default": (*POD, *UPSTREAM, *REPLIES, *OVERLAY, *TUNNELS),
    # Stacked stops: a hand-written drop of 8472/udp before ufw's INPUT policy DROP.
    "lab_stacked_ufw_overlay": (*POD, *UPSTREAM, *REPLIES, *OVERLAY),
    # The inet table's drop of forwarded UDP 53, then iptables-legacy's FORWARD policy.
    "lab_stacked_forward_tables": (*POD, *UPSTREAM),
    # DOCKER-USER's drop of forwarded UDP 53 (iptables, priority 0), then firewalld's forward
    # (priority 10) for the upstream; the pods' DNAT'ed queries firewalld accepts.
    "lab_stacked_firewalld_docker_user": ("pod-dns-udp", *UPSTREAM, *REPLIES, *OVERLAY),
    # The clean vectors' rule sets let every flow through, as their vectors say.
    "lab_clean_rke2": (),
    "lab_clean_kubeadm": (),
}

#: (scenario, flow) -> why the evaluator cannot decide it from the dumps ("may-drop" there
#: is then the right answer).
UNDECIDABLE: dict[tuple[str, str], str] = {}

#: (scenario, flow) -> why the evaluator and the kernel disagree, and which one is right. The
#: tests fail when this list is out of date either way (a new disagreement or a fixed one).
#: Empty: the evaluator learnt the overlay's own packets (vxlan out through OUTPUT, the peer's
#: answers in as a new UDP 8472 flow on INPUT) and firewalld's `ct status dnat` from what
#: this lab showed.
KNOWN_MISMATCHES: dict[tuple[str, str], str] = {}


def kernel_verdicts(scenario: str) -> dict[str, str]:
    drops = KERNEL_DROPS[scenario]
    features = SCENARIOS[scenario].features
    verdicts = {flow: "drop" if flow in drops else "pass" for flow in lab_flows(features)}
    for family in ("ipv4", "ipv6") if "ipv6" in features else ("ipv4",):
        queries = [flow_key(f, family) for f in (*POD, *HOST)]
        if all(flow in drops for flow in queries):  # no query got through to be answered
            verdicts[flow_key("dns-replies", family)] = "unobserved"
    return verdicts


def recorded(scenario: str) -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = json.loads(
        (VECTORS / f"{scenario}.observed.json").read_text()
    )
    return loaded


def recorded_dumps(scenario: str) -> dict[str, str]:
    dumps = {suffix: (VECTORS / f"{scenario}.{suffix}").read_text() for suffix in DUMPS}
    for suffix in LATER_DUMPS:
        path = VECTORS / f"{scenario}.{suffix}"
        dumps[suffix] = path.read_text() if path.is_file() else ""
    return dumps


# ------------------------------------------------------------ recorded observations


def test_every_scenario_is_recorded_and_expected() -> None:
    assert sorted(KERNEL_DROPS) == sorted(SCENARIOS)
    for scenario in SCENARIOS:
        for suffix in (*DUMPS, "observed.json"):
            assert (VECTORS / f"{scenario}.{suffix}").is_file(), (scenario, suffix)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_recorded_kernel_verdicts(scenario: str) -> None:
    observed = recorded(scenario)
    assert {flow: o["verdict"] for flow, o in observed.items()} == kernel_verdicts(scenario)
    for flow in KERNEL_DROPS[scenario]:
        if flow.endswith("dns-replies"):
            assert ":lost" in observed[flow]["evidence"]
        else:
            assert (
                "never got" in observed[flow]["evidence"]
                or "did not rise" in (observed[flow]["evidence"])
            )


# ------------------------------------------------------------- the lab's own readers

# Recorded in the lab (lab_firewalld_nft, lab_alpine, lab_fault_proto_number).
TRACE = """\
trace id 807de583 inet nodediag_lab_trace out rule meta nftrace set 1 # handle 4 (verdict continue)
trace id 807de583 ip filter OUTPUT policy accept
trace id b2fc0137 inet firewalld filter_FWD_public rule reject with icmpx admin-prohibited # handle 101 (verdict drop)
trace id 7bd20cef inet filter forward policy drop
trace id 9fb5f962 ip filter OUTPUT rule tcp dport 53 counter packets 0 bytes 0 drop # handle 27 (verdict drop)
trace id 7bd20ce0 inet filter forward policy drop
"""  # noqa: E501


def test_trace_stops() -> None:
    assert trace_stops(TRACE.splitlines(keepends=True), {("ip", "filter")}) == {
        "nft inet firewalld filter_FWD_public handle 101": 1,
        "nft inet filter forward policy drop": 2,
    }


def test_iptables_drop_counters() -> None:
    text = (
        "*filter\n"
        ":INPUT DROP [7:420]\n"
        ":OUTPUT ACCEPT [9:540]\n"
        '[3:180] -A OUTPUT -p udp -m udp --dport 53 -j LOG --log-prefix "dns -j DROP "\n'
        "[2:120] -A OUTPUT -p udp -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable\n"
        "[1:60] -A OUTPUT -j ACCEPT\n"
    )
    assert iptables_drop_counters(text, "iptables-nft") == {
        "iptables-nft filter INPUT policy DROP": 7,
        "iptables-nft filter OUTPUT -p udp -m udp --dport 53 -j REJECT "
        "--reject-with icmp-port-unreachable": 2,
    }


# ------------------------------------------------------------------ the evaluator

try:
    from collectors.netfilter import evaluate as _evaluate_module
    from collectors.netfilter import flows as _flows_module
except ImportError as error:  # the evaluator's package is not on this branch yet
    _EVALUATOR_MISSING: str | None = f"collectors.netfilter evaluator not importable: {error}"
else:
    _EVALUATOR_MISSING = None


def lab_facts(features: frozenset[str] = frozenset()) -> Any:
    """What the lab's node shows: NodeFacts as the collector would build them. The IP-in-IP
    and WireGuard links stand for the ones this kernel cannot make (their packets are sent
    and received by sockets)."""
    link = _flows_module.OverlayLink
    overlay = [link("flannel.1", "vxlan", 8472, "ipv4")]
    if "vxlan6" in features:
        overlay.append(link("vxlan-v6.calico", "vxlan", 4789, "ipv6"))
    if "ipip" in features:
        overlay.append(link("tunl0", "ipip"))
    if "wireguard" in features:
        overlay.append(link("wg0", "wireguard", 51820, "ipv4"))

    def both(ipv4: tuple[str, ...], ipv6: tuple[str, ...]) -> tuple[str, ...]:
        return (*ipv4, *ipv6) if "ipv6" in features else ipv4

    return _flows_module.NodeFacts(
        cluster_dns=both(("10.43.0.10",), ("fd43::a",)),
        pod_cidrs=both(("10.42.0.0/24",), ("fd42::/64",)),
        cluster_cidrs=both(("10.42.0.0/16",), ("fd42::/56",)),
        node_addresses=both(
            ("10.99.0.1", "10.42.0.0", "10.42.0.1", "172.17.0.1"), ("fd99::1", "fd42::1")
        ),
        pod_interfaces=("cni0",),
        uplink="eth0",
        overlay=tuple(overlay),
        upstream_dns=both(("10.99.0.3",), ("fd99::3",)),
        local_dns_cache=NODE_CACHE if "nodelocal" in features else (),
        dns_endpoints=both(("10.42.1.2",), ("fd42:0:0:1::2",)),
        peer_nodes=both(("10.99.0.2",), ("fd99::2",)),
    )


def rulesets_from_dumps(dumps: dict[str, str]) -> list[Any]:
    """The dumps parsed as the collector parses them; nft's copy of the iptables-nft tables
    is left out (iptables-save shows them in iptables' own terms)."""
    from collectors.netfilter.iptables import parse_iptables_save
    from collectors.netfilter.model import Ruleset
    from collectors.netfilter.nft import parse_nft_json

    iptables = [
        parse_iptables_save(dumps["iptables-save"], family="ipv4"),
        parse_iptables_save(dumps["ip6tables-save"], family="ipv6"),
        parse_iptables_save(
            dumps["iptables-legacy-save"], backend="iptables-legacy", family="ipv4"
        ),
    ]
    covered = {
        (t.family, t.name) for r in iptables for t in r.tables if t.backend == "iptables-nft"
    }
    iptables.append(
        parse_iptables_save(
            dumps.get("ip6tables-legacy-save", ""), backend="iptables-legacy", family="ipv6"
        )
    )
    nft = parse_nft_json(dumps["nft.json"])
    native = [t for t in nft.tables if (t.family, t.name) not in covered]
    return [*iptables, Ruleset(backend="nft", tables=native, warnings=nft.warnings)]


def evaluator_verdicts(dumps: dict[str, str], scenario: str) -> dict[str, Any]:
    """The evaluator's verdict of each flow, by :func:`netlab.flow_key`."""
    if _EVALUATOR_MISSING:
        pytest.skip(_EVALUATOR_MISSING)
    flows = _flows_module.dns_flows(lab_facts(SCENARIOS[scenario].features))
    try:
        verdicts = _evaluate_module.evaluate(rulesets_from_dumps(dumps), flows)
    except NotImplementedError:
        pytest.skip("collectors.netfilter.evaluate.evaluate is not implemented yet")
    return {flow_key(v.flow.name, v.flow.family): v for v in verdicts}


def describe(verdict: Any) -> str:
    stop = verdict.stopped_by
    where = f" by {stop.backend} {stop.table} {stop.chain} {stop.rule or 'policy'}" if stop else ""
    return f"{verdict.verdict}{where}"


def agrees(scenario: str, flow: str, kernel: str, said: str) -> bool:
    if said == kernel or (kernel, said) == ("unobserved", "unknown"):
        return True
    return said == "may-drop" and (scenario, flow) in UNDECIDABLE


_NFT_FAMILY = {"ipv4": "ip", "ipv6": "ip6"}


def stop_key(stop: Any) -> str:
    """The evaluator's stop in the words of the lab's drop evidence (netlab's counters and
    trace keys)."""
    if stop.backend == "nft":
        family = _NFT_FAMILY.get(stop.family, stop.family)
        where = "policy drop" if stop.is_policy else f"handle {stop.handle}"
        return f"nft {family} {stop.table} {stop.chain} {where}"
    rule = "policy DROP" if stop.is_policy else stop.rule.removeprefix(f"-A {stop.chain} ")
    backend = stop.backend.replace("iptables", "ip6tables", stop.family == "ipv6")
    return f"{backend} {stop.table} {stop.chain} {rule}"


def disagreements(
    scenario: str, dumps: dict[str, str], kernel: dict[str, dict[str, Any]]
) -> dict[str, str]:
    """flow -> what the kernel did and what the evaluator said, where they disagree: on the
    verdict, or on the rule or policy that stopped a dropped flow."""
    return compare(scenario, evaluator_verdicts(dumps, scenario), kernel)


def compare(
    scenario: str, found: dict[str, Any], kernel: dict[str, dict[str, Any]]
) -> dict[str, str]:
    """:func:`disagreements` for the verdicts ``found`` (by :func:`netlab.flow_key`)."""
    wrong = {
        flow: f"evaluator has {describe(verdict)}, a flow the lab's node does not have"
        for flow, verdict in found.items()
        if flow not in kernel and verdict.verdict != "unknown"
    }
    for flow in kernel:
        verdict = found.get(flow)
        said = verdict.verdict if verdict else "missing"
        did = kernel[flow]["verdict"]
        if not agrees(scenario, flow, did, said):
            wrong[flow] = f"kernel {did}, evaluator {describe(verdict) if verdict else said}"
        elif said == "drop" and verdict and verdict.stopped_by:
            key = stop_key(verdict.stopped_by)
            if key not in kernel[flow]["drops"]:
                wrong[flow] = f"evaluator stops at {key}, the kernel at {kernel[flow]['drops']}"
    return wrong


def known_mismatches(scenario: str) -> list[str]:
    return sorted(flow for s, flow in KNOWN_MISMATCHES if s == scenario)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_evaluator_agrees_with_recorded_kernel(scenario: str) -> None:
    dumps = recorded_dumps(scenario)
    kernel = recorded(scenario)
    assert sorted(disagreements(scenario, dumps, kernel)) == known_mismatches(scenario)


# ------------------------------------------------------------------ live, as root

LAB_TOOLS = ("ip", "nft", "iptables-restore", "iptables-save", "iptables-legacy-save", "conntrack")


@dataclass
class Collected:
    """What the firewall collector made of the node, run there with the facts it reads."""

    facts: Any
    verdicts: dict[str, Any]
    sources: dict[str, str]
    flow_ok: dict[str, float | None]
    reported: dict[str, set[str]]
    """flow (by :func:`netlab.flow_key`) -> the reasons of the findings that name it."""


@dataclass
class LiveRun:
    observed: dict[str, dict[str, Any]]
    dumps: dict[str, str]
    collected: Collected

    @property
    def verdicts(self) -> dict[str, str]:
        return {flow: o["verdict"] for flow, o in self.observed.items()}


class LiveLab:
    """One lab for the module: scenarios only change the node's rules (reset in between)."""

    def __init__(self, made: Lab, workdir: Path) -> None:
        self.made = made
        self.workdir = workdir
        self.runs: dict[str, LiveRun] = {}

    def run(self, scenario: str, fixes: Sequence[str] = ()) -> LiveRun:
        """Loads the scenario (then runs the ``fixes`` commands), sends the queries; the
        result without fixes is kept for the other tests of the same scenario."""
        if not fixes and scenario in self.runs:
            return self.runs[scenario]
        absent = missing_tools(SCENARIOS[scenario])
        if absent:
            realkernel.skip_or_fail(f"not installed: {', '.join(absent)}")
        result = self._observe(scenario, fixes)
        if not fixes and result.verdicts != kernel_verdicts(scenario):
            # Once seen in a full run on a busy machine and not reproduced since: look again,
            # say so, and keep the second look (the test still fails if it disagrees too).
            warnings.warn(f"{scenario}: observed again after {result.observed}", stacklevel=1)
            result = self._observe(scenario, fixes)
        if not fixes:
            self.runs[scenario] = result
        return result

    def _observe(self, scenario: str, fixes: Sequence[str]) -> LiveRun:
        self.made.reset(SCENARIOS[scenario].features)
        load(SCENARIOS[scenario], self.made.node, self.workdir)
        for command in fixes:
            apply_fix(self.made.node, self.workdir, command)
        observed = {flow: asdict(o) for flow, o in self.made.observe().items()}
        return LiveRun(observed, self.made.dumps(), self._collect(scenario))

    def _collect(self, scenario: str) -> Collected:
        """The firewall collector, as the agent runs it, reading the node's rules with the
        real tools in its namespace and its facts from netlink, flannel's subnet.env and the
        resolver file; IP-in-IP and WireGuard links stand in for the ones this kernel cannot
        make."""
        from prometheus_client import CollectorRegistry

        from collectors.firewall_collector import FirewallCollector
        from collectors.netfilter.nft_socket import NftNetlink

        features = SCENARIOS[scenario].features
        facts = node_facts(self.made.node, self.workdir, features)
        stand_ins = [o for o in lab_facts(features).overlay if o.kind != "vxlan"]
        facts = replace(facts, overlay=(*facts.overlay, *stand_ins))
        registry = CollectorRegistry()
        collector = FirewallCollector(
            "lab-node",
            lambda: facts.cluster_dns,
            registry,
            runner=self.made.node.runner,
            facts=lambda: facts,
            nft_netlink=lambda: NftNetlink(self.made.node.name),
        )
        findings = collector.collect()
        flow_ok = {
            flow_key(v.flow.name, v.flow.family): registry.get_sample_value(
                "nodediag_dns_flow_ok", {"flow": v.flow.name, "family": v.flow.family}
            )
            for v in collector.last_verdicts
        }
        return Collected(
            facts,
            {flow_key(v.flow.name, v.flow.family): v for v in collector.last_verdicts},
            {r.source: r.status for r in collector.sources.results()},
            flow_ok,
            reported_flows(findings),
        )


def reported_flows(findings: Sequence[Any]) -> dict[str, set[str]]:
    """flow key -> reasons of the findings naming it: ``DNSFlowBlocked`` its flow, the rule
    findings (``DNSDropRule``, ``DNSNoEndpointsReject``) the flows in ``details.flows``."""
    reported: dict[str, set[str]] = {}
    for finding in findings:
        details = finding.details
        named = [f"{details['flow']}/{details['family']}"] if "flow" in details else []
        for label in [*named, *details.get("flows", [])]:
            name, family = label.rsplit("/", 1)
            reported.setdefault(flow_key(name, family), set()).add(finding.reason)
    return reported


def node_facts(node: Any, workdir: Path, features: frozenset[str]) -> Any:
    """The node's facts as the collector reads them in the lab's node namespace, with the
    files a flannel node has (subnet.env, the resolver file kubelet gives pods)."""
    from collectors.dns_probe import run_in_netns
    from collectors.node_facts import read_netlink, read_node_facts

    root = workdir / "host"
    (root / "run/flannel").mkdir(parents=True, exist_ok=True)
    (root / "run/flannel/subnet.env").write_text(
        "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\n"
    )
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/resolv.conf").write_text("nameserver 10.99.0.3\nnameserver fd99::3\n")
    cluster_dns = ["10.43.0.10", "fd43::a"] if "ipv6" in features else ["10.43.0.10"]
    facts, problems = read_node_facts(
        root, cluster_dns, netlink=lambda: run_in_netns(node.name, read_netlink)
    )
    assert problems == []
    return facts


@pytest.fixture(scope="module")
def live_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveLab]:
    if os.geteuid() != 0:
        realkernel.skip_or_fail("needs root")
    missing = [tool for tool in LAB_TOOLS if shutil.which(tool) is None]
    if missing:
        realkernel.skip_or_fail(
            f"not installed: {', '.join(missing)} (Debian iproute2, nftables, iptables, conntrack)"
        )
    workdir = tmp_path_factory.mktemp("netlab")
    with lab(workdir) as made:
        yield LiveLab(made, workdir)


@pytest.mark.root
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_kernel_verdicts_live(live_lab: LiveLab, scenario: str) -> None:
    live = live_lab.run(scenario)
    assert live.verdicts == kernel_verdicts(scenario), live.observed
    # The same rules or policies stopped the packets as when the vectors were recorded.
    assert {flow: sorted(o["drops"]) for flow, o in live.observed.items()} == {
        flow: sorted(o["drops"]) for flow, o in recorded(scenario).items()
    }


@pytest.mark.root
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_evaluator_agrees_with_kernel_live(live_lab: LiveLab, scenario: str) -> None:
    live = live_lab.run(scenario)
    assert sorted(disagreements(scenario, live.dumps, live.observed)) == known_mismatches(scenario)


#: Scenarios where a flow's first stop is not its only one (the fixes of all are needed).
STACKED = (
    "lab_stacked_ufw_overlay",
    "lab_stacked_forward_tables",
    "lab_stacked_firewalld_docker_user",
    "lab_fault_negations",
)

#: Scenarios whose stops come with a fix the lab can run (ufw and firewalld commands,
#: iptables, nft; kube-proxy's are about the Service).
FIXABLE = (
    "lab_ufw_default",
    "lab_ufw_forward_accept",
    "lab_ufw_allow_cni0",
    "lab_firewalld_nft",
    "lab_firewalld_iptables",
    "lab_debian_workstation",
    "lab_alpine",
    "lab_docker",
    "lab_output_web_only",
    "lab_forward_drop_nft",
    "lab_forward_drop_legacy",
    "lab_fault_multiport",
    "lab_fault_range",
    "lab_fault_negated_dst",
    "lab_fault_proto_number",
    "lab_fault_negations",
    "lab_ipv6_dns_drop_nft",
    "lab_ipv6_dns_drop_legacy",
    "lab_ipv6_ufw_default",
    "lab_ipv6_inet_dns",
    "lab_ipv6_firewalld_nft",
    "lab_ipv6_firewalld_iptables",
    "lab_nodelocal_established_only",
    "lab_nodelocal_ufw_default",
    "lab_nodelocal_firewalld_nft",
    "lab_tunnels_firewalld",
    "lab_tunnels_ufw_default",
    "lab_vxlan6_ufw_default",
    "lab_vxlan6_firewalld_nft",
    "lab_ipv6_debian_workstation",
    "lab_ipv6_alpine",
    "lab_vxlan6_alpine",
    *STACKED,
)


def _position_last(command: str) -> tuple[int, str]:
    """Deleting rules by position: the higher positions first."""
    tail = command.rsplit(" ", 1)[-1]
    return (-int(tail) if tail.isdigit() else 0, command)


def proposed_fixes(found: dict[str, Any]) -> dict[str, list[tuple[str | None, Any]]]:
    """flow -> (the command the lab can run, or None; the stop) for each stop of a stopped
    flow: the first, then the further ones."""
    fixes: dict[str, list[tuple[str | None, Any]]] = {}
    for flow, verdict in found.items():
        if verdict.verdict in ("drop", "may-drop") and verdict.stopped_by is not None:
            stops = (verdict.stopped_by, *verdict.also_stopped_by)
            fixes[flow] = [(runnable_fix(s.owner, s.fix), s) for s in stops]
    return fixes


@pytest.mark.root
@pytest.mark.parametrize("scenario", FIXABLE)
def test_proposed_fixes_remove_the_stops(live_lab: LiveLab, scenario: str) -> None:
    """Every fix the findings propose (each flow's first stop and the further ones), run in
    the lab: the kernel no longer stops a flow at its first stop, lets it through when every
    one of its stops had a fix the lab can run, and the evaluator still agrees with it."""
    found = evaluator_verdicts(live_lab.run(scenario).dumps, scenario)
    fixes = proposed_fixes(found)
    commands = {command for stops in fixes.values() for command, _ in stops if command}
    assert commands, "no runnable fix proposed"
    fixed = live_lab.run(scenario, sorted(commands, key=_position_last))
    for flow, stops in fixes.items():
        command, first = stops[0]
        if command is None or flow not in fixed.observed:
            continue
        after = fixed.observed[flow]
        assert stop_key(first) not in after["drops"], (command, flow)
        if all(c is not None for c, _ in stops):
            assert after["verdict"] == "pass", (flow, [c for c, _ in stops], after)
        else:  # a stop without a runnable fix may stop it: the kernel names it
            assert after["verdict"] == "pass" or after["drops"], (command, flow)
    still = disagreements(scenario, fixed.dumps, fixed.observed)
    assert sorted(still) == known_mismatches(scenario), still


@pytest.mark.root
@pytest.mark.parametrize("scenario", STACKED)
def test_first_fixes_alone_leave_the_further_stops(live_lab: LiveLab, scenario: str) -> None:
    """Only the fixes of the first stops of the flows with further stops, run in the lab:
    such a flow is still dropped, by the kernel at the further stop the evaluator named (the
    first whose fix was not run)."""
    found = evaluator_verdicts(live_lab.run(scenario).dumps, scenario)
    fixes = proposed_fixes(found)
    stacked = {flow: stops[1:] for flow, stops in fixes.items() if len(stops) > 1}
    assert stacked, "no flow with further stops"
    firsts = {fixes[flow][0][0] for flow in stacked}
    assert None not in firsts
    fixed = live_lab.run(scenario, sorted((c for c in firsts if c), key=_position_last))
    for flow, further in stacked.items():
        left = [stop for command, stop in further if command not in firsts]
        if not left:
            continue
        after = fixed.observed[flow]
        assert after["verdict"] == "drop", (flow, after)
        assert stop_key(left[0]) in after["drops"], (flow, after)
    still = disagreements(scenario, fixed.dumps, fixed.observed)
    assert sorted(still) == known_mismatches(scenario), still


@pytest.mark.root
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_collector_in_the_node_agrees_with_the_kernel(live_lab: LiveLab, scenario: str) -> None:
    """The firewall collector run in the lab's node (the real tools read the rules, netlink
    and files give the facts): its verdicts are the kernel's; every source it reads is read,
    IPv6's too; nodediag_dns_flow_ok says each flow and family as the packets did."""
    live = live_lab.run(scenario)
    collected = live.collected
    features = SCENARIOS[scenario].features
    flannel = _flows_module.OverlayLink("flannel.1", "vxlan", 8472, "ipv4")
    assert collected.facts.overlay[0] == flannel
    vxlan = [o for o in collected.facts.overlay if o.kind == "vxlan"]
    assert vxlan == [o for o in lab_facts(features).overlay if o.kind == "vxlan"]
    cache = set(NODE_CACHE) if "nodelocal" in features else set()
    assert set(collected.facts.local_dns_cache) == cache
    assert set(collected.sources.values()) <= {"ok", "skipped"}, collected.sources
    assert collected.sources["ip6tables-legacy-save"] == "ok"
    still = compare(scenario, collected.verdicts, live.observed)
    assert sorted(still) == known_mismatches(scenario), still
    gauges = {
        flow: 1.0 if o["verdict"] == "pass" else 0.0
        for flow, o in live.observed.items()
        if o["verdict"] != "unobserved"
    }
    assert {flow: collected.flow_ok.get(flow) for flow in gauges} == gauges
    dropped = {flow for flow, o in live.observed.items() if o["verdict"] == "drop"}
    assert set(collected.reported) == dropped, collected.reported
