"""This node's pod CIDR from its Node object: one GET of ``/api/v1/nodes/<node>`` against the
API stand-in over HTTPS with in-cluster credentials and the RBAC rendered from ``daemonset/``
(403 without ``get`` on ``nodes``, as from a real API server), cached and read again on a fake
clock; the firewall collector evaluates the DNS flows from pods with it, and says so when it
cannot."""

from __future__ import annotations

import copy
import itertools
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import kube_standin as ks
import pytest
from prometheus_client import CollectorRegistry, Gauge
from standin_auth import Rbac
from standin_tls import TlsFiles
from test_deploy import rendered
from test_events import NODE
from test_incluster import AGENT, service_account_dir, tls  # noqa: F401

from agent.kube import KubeConfigSource, connect
from agent.node_pod_cidr import NodePodCidrReader, node_pod_cidrs
from collectors.firewall_collector import FirewallCollector, Source
from collectors.netfilter.flows import NodeFacts
from collectors.node_facts import NODE_POD_CIDR_SOURCE, PodCidrLookup, PodCidrSources
from collectors.registry import CollectorSet, SourceLog, ToolNotFound

POD_CIDR = "10.42.1.0/24"
# The forward policy drops what is not accepted: a pod's DNS query to the Service IP is
# forwarded (no kube-proxy DNAT here), so once the pod CIDR is known the flow is "drop".
FILTER = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
NODE_FACTS = NodeFacts(
    cluster_dns=("10.43.0.10",),
    pod_interfaces=("lxc+",),  # Cilium: lxc_health exists before any pod, no pod route
    node_addresses=("10.250.0.1",),
    uplink="eth0",
    upstream_dns=("10.250.0.2",),
)


def node_object(name: str = NODE, *, cidrs: Sequence[str] = (), single: str | None = None) -> Any:
    spec: dict[str, Any] = {}
    if cidrs:
        spec["podCIDRs"] = list(cidrs)
        spec["podCIDR"] = cidrs[0]
    if single is not None:
        spec["podCIDR"] = single
    return {"metadata": {"name": name}, "spec": spec}


def rbac_without_nodes_get() -> Rbac:
    """The shipped RBAC as an older manifest had it: no rule for ``nodes``."""
    objects = copy.deepcopy(rendered("base"))
    for obj in objects:
        if obj["kind"] == "ClusterRole":
            obj["rules"] = [r for r in obj["rules"] if "nodes" not in r["resources"]]
    return Rbac.of(objects)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["shipped"])
def api(request: pytest.FixtureRequest, tls: TlsFiles) -> Iterator[ks.KubeStandin]:  # noqa: F811
    rbac = Rbac.of(rendered("base")) if request.param == "shipped" else rbac_without_nodes_get()
    with ks.running(tls=tls, rbac=rbac, users={"sa-token-1": AGENT}) as standin:
        yield standin


@pytest.fixture
def client(
    api: ks.KubeStandin,
    tls: TlsFiles,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Any]:
    """The agent's own client, in-cluster: the projected token, the CA, the Service env."""
    directory = service_account_dir(tmp_path / "serviceaccount", tls, "sa-token-1")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
    made = connect(KubeConfigSource("in-cluster", directory))
    try:
        yield made
    finally:
        made.close()


def node_gets(api: ks.KubeStandin) -> list[int | None]:
    return [r.status for r in api.requests if r.path == f"/api/v1/nodes/{NODE}"]


class Firewall:
    """The firewall collector with a fixed rule set and fixed node facts, its pod CIDR from
    ``node_object``; run through the registry's CollectorSet, as the daemon runs it."""

    def __init__(
        self,
        node_object: NodePodCidrReader | None,
        facts: NodeFacts = NODE_FACTS,
        given: Sequence[str] = (),
    ) -> None:
        self.registry = CollectorRegistry()
        log = SourceLog()
        self.pod_cidr = PodCidrSources(lambda: facts, log, given, node_object)

        def runner(argv: Sequence[str]) -> str:
            if argv[0] != "iptables-save":
                raise ToolNotFound(f"{argv[0]} not found")
            return FILTER

        self.collector = FirewallCollector(
            NODE, lambda: facts.cluster_dns, self.registry, runner=runner,
            sources=(Source(("iptables-save", "-c"), None, "ipv4"),),
            facts=self.pod_cidr, nft_netlink=None, source_log=log,
        )  # fmt: skip
        self.set = CollectorSet(
            [self.collector],
            Gauge("nodediag_collector_success", "", ["collector"], registry=self.registry),
            Gauge("nodediag_collector_duration_seconds", "", ["collector"],
                  registry=self.registry),
            Gauge("nodediag_collector_source_success", "", ["collector", "source"],
                  registry=self.registry),
        )  # fmt: skip

    def run(self) -> dict[str, str]:
        """One run: the pod flows' verdicts (``unknown: why`` when not evaluated)."""
        run = self.set.run(self.collector)
        assert run.error is None, run.error
        return {
            v.flow.name: v.verdict if v.verdict != "unknown" else f"unknown: {v.reason}"
            for v in self.collector.last_verdicts
            if v.flow.name.startswith("pod-dns")
        }

    def source(self) -> float | None:
        return self.registry.get_sample_value(
            "nodediag_collector_source_success",
            {"collector": "firewall", "source": NODE_POD_CIDR_SOURCE},
        )

    def flow_ok(self, flow: str) -> float | None:
        return self.registry.get_sample_value(
            "nodediag_dns_flow_ok", {"flow": flow, "family": "ipv4"}
        )


UNKNOWN = "unknown: this node's pod CIDR is unknown (--pod-cidr)"


# ----------------------------------------------------------------------------- parsing


def test_pod_cidrs_of_a_node_object() -> None:
    assert node_pod_cidrs(node_object(cidrs=["10.42.1.0/24", "fd00:42:1::/64"])) == (
        "10.42.1.0/24",
        "fd00:42:1::/64",
    )
    assert node_pod_cidrs(node_object(single="10.244.3.0/24")) == ("10.244.3.0/24",)
    assert node_pod_cidrs(node_object()) == ()
    assert node_pod_cidrs({"metadata": {"name": NODE}}) == ()
    assert node_pod_cidrs({"spec": {"podCIDRs": ["not a cidr", "10.1.0.0/16"]}}) == ("10.1.0.0/16",)
    assert node_pod_cidrs({"spec": {"podCIDRs": "10.1.0.0/16"}}) == ()  # not a list
    assert node_pod_cidrs({"spec": "x"}) == ()


def test_the_stand_in_validates_node_objects(api: ks.KubeStandin) -> None:
    with pytest.raises(ValueError, match="podCIDRs"):
        api.add_node({"metadata": {"name": "bad"}, "spec": {"podCIDRs": "10.42.1.0/24"}})


# ----------------------------------------------------------------------------- with the API


def test_shipped_rbac_reads_the_pod_cidr_and_the_pod_flows_are_evaluated(
    api: ks.KubeStandin, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    api.add_node(node_object(cidrs=[POD_CIDR]))
    firewall = Firewall(NodePodCidrReader(NODE, lambda: client))
    with caplog.at_level(logging.INFO):
        verdicts = firewall.run()
    assert verdicts == {"pod-dns-udp": "drop", "pod-dns-tcp": "drop"}
    assert firewall.flow_ok("pod-dns-udp") == 0
    assert firewall.source() == 1
    assert node_gets(api) == [200]
    assert f"pod CIDR {POD_CIDR} (from the Node object's spec.podCIDRs)" in caplog.text
    blocked = [f for f in firewall.collector.collect() if f.reason == "DNSFlowBlocked"]
    assert {f.details["flow"] for f in blocked} >= {"pod-dns-udp", "pod-dns-tcp"}


def test_the_node_object_is_read_once_then_hourly_or_every_ten_minutes_while_unset(
    api: ks.KubeStandin, client: Any
) -> None:
    api.add_node(node_object())  # registered, node IPAM has not assigned a CIDR yet
    clock = Clock()
    start = clock.now
    firewall = Firewall(NodePodCidrReader(NODE, lambda: client, clock=clock))
    reads = []
    for minute in range(80):  # collector runs a minute apart
        before = len(node_gets(api))
        if minute == 15:
            api.add_node(node_object(cidrs=[POD_CIDR]))  # assigned (stored anew)
        verdict = firewall.run()["pod-dns-udp"]
        if len(node_gets(api)) > before:
            reads.append((minute, verdict))
        clock.now += 60
    assert reads == [(0, UNKNOWN), (10, UNKNOWN), (20, "drop")]
    assert set(node_gets(api)) == {200}
    assert all(r.query == {"resourceVersion": "0"} for r in api.requests if "/nodes/" in r.path)
    assert clock.now == start + 80 * 60  # an hour after the read that found it
    firewall.run()
    assert len(node_gets(api)) == 4


@pytest.mark.parametrize("api", ["without-nodes-get"], indirect=True)
def test_rbac_without_nodes_get_is_403_flows_unknown_said_once(
    api: ks.KubeStandin, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    api.add_node(node_object(cidrs=[POD_CIDR]))
    clock = Clock()
    firewall = Firewall(NodePodCidrReader(NODE, lambda: client, clock=clock, rand=lambda: 1.0))
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            assert firewall.run() == {"pod-dns-udp": UNKNOWN, "pod-dns-tcp": UNKNOWN}
    assert node_gets(api) == [403]
    assert firewall.source() == 0
    assert firewall.flow_ok("pod-dns-udp") is None  # no series for an unknown flow
    failed = [r for r in caplog.records if "source node-pod-cidr failed" in r.getMessage()]
    assert len(failed) == 1, caplog.text
    assert "the ClusterRole lacks get on nodes" in failed[0].getMessage()
    assert 'cannot get resource "nodes"' in failed[0].getMessage()
    run = firewall.set.run(firewall.collector)
    [failure] = run.failures(NODE)
    assert failure.details["source"] == NODE_POD_CIDR_SOURCE


@pytest.mark.parametrize("api", ["without-nodes-get"], indirect=True)
def test_after_a_failure_the_read_backs_off(api: ks.KubeStandin, client: Any) -> None:
    """30 s, 60 s, 120 s … (jitter at its top here) up to 10 minutes; a success resets it."""
    api.add_node(node_object(cidrs=[POD_CIDR]))
    clock = Clock()
    reader = NodePodCidrReader(NODE, lambda: client, clock=clock, rand=lambda: 1.0)
    times = []
    start = clock.now
    while clock.now - start < 2000:
        before = len(node_gets(api))
        reader()
        if len(node_gets(api)) > before:
            times.append(clock.now - start)
        clock.now += 10
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[:5] == [30, 60, 120, 240, 480]
    assert set(gaps[5:]) == {600}
    assert reader().error is not None and "403" in str(reader().error)


def test_a_node_without_pod_cidr_leaves_the_flows_unknown(api: ks.KubeStandin, client: Any) -> None:
    api.add_node(node_object())
    firewall = Firewall(NodePodCidrReader(NODE, lambda: client))
    assert firewall.run() == {"pod-dns-udp": UNKNOWN, "pod-dns-tcp": UNKNOWN}
    assert firewall.source() == 1  # read, nothing in it
    assert node_gets(api) == [200]


def test_a_missing_node_is_a_failed_source(api: ks.KubeStandin, client: Any) -> None:
    reader = NodePodCidrReader(NODE, lambda: client)
    firewall = Firewall(reader)
    assert firewall.run()["pod-dns-udp"] == UNKNOWN
    assert firewall.source() == 0
    why = f"Node {NODE} not found (is --node-name / $NODE_NAME this node's name?)"
    assert reader().error == why


def test_the_node_itself_and_the_flag_win_over_the_api(api: ks.KubeStandin, client: Any) -> None:
    api.add_node(node_object(cidrs=["10.99.0.0/24"]))
    routed = replace(NODE_FACTS, pod_cidrs=(POD_CIDR,))
    firewall = Firewall(NodePodCidrReader(NODE, lambda: client), facts=routed)
    firewall.run()
    assert firewall.pod_cidr.origin == "the node's routes and CNI config"
    given = Firewall(NodePodCidrReader(NODE, lambda: client), given=["10.77.0.0/24"])
    given.run()
    assert given.pod_cidr.origin == "--pod-cidr"
    assert node_gets(api) == []  # not asked at all
    assert firewall.source() is None and given.source() is None  # skipped: no series


def test_an_unreachable_api_is_a_failed_source_not_a_failed_collector() -> None:
    def unreachable() -> Any:
        from agent.kube import KubeUnreachable

        raise KubeUnreachable("GET /api/v1/nodes/node-1: connection refused")

    firewall = Firewall(NodePodCidrReader(NODE, unreachable))
    assert firewall.run()["pod-dns-udp"] == UNKNOWN
    assert firewall.source() == 0

    def crashing() -> PodCidrLookup:
        raise RuntimeError("bug")

    broken = Firewall(None)
    broken.pod_cidr.node_object = crashing
    assert broken.run()["pod-dns-udp"] == UNKNOWN
    assert broken.source() == 0


def test_without_a_cluster_nothing_changes() -> None:
    firewall = Firewall(None)
    assert firewall.run() == {"pod-dns-udp": UNKNOWN, "pod-dns-tcp": UNKNOWN}
    assert firewall.source() is None


# ----------------------------------------------------------------------------- the flag


def test_pod_cidr_flag_for_every_command() -> None:
    from agent.cli import build_parser, settings_from

    for command in (["run"], ["scan"], ["analyze", "--nft-json", "x"]):
        args = build_parser().parse_args([*command, "--pod-cidr", "10.42.1.7/24"])
        assert settings_from(args).pod_cidrs == ("10.42.1.0/24",)


@pytest.mark.parametrize(
    ("variable", "good", "read", "bad", "error"),
    [
        (
            "NODEDIAG_POD_CIDR",
            "10.42.1.0/24,fd00:42::/64",
            ("10.42.1.0/24", "fd00:42::/64"),
            "10.42.1.0/33",
            "--pod-cidr (or $NODEDIAG_POD_CIDR): invalid CIDR '10.42.1.0/33'",
        ),
        (
            "NODEDIAG_CLUSTER_DNS",
            "10.43.0.10, fd00:43::a",
            ("10.43.0.10", "fd00:43::a"),
            "10.43.0.300",
            "--cluster-dns (or $NODEDIAG_CLUSTER_DNS): invalid IP address '10.43.0.300'",
        ),
    ],
)
def test_list_flags_from_the_environment_are_checked(
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    good: str,
    read: tuple[str, ...],
    bad: str,
    error: str,
) -> None:
    from agent.cli import InputError, build_parser, settings_from

    def settings() -> Any:
        return settings_from(build_parser().parse_args(["run"]))

    field = "pod_cidrs" if variable.endswith("POD_CIDR") else "cluster_dns"
    monkeypatch.setenv(variable, good)
    assert getattr(settings(), field) == read
    monkeypatch.setenv(variable, bad)
    with pytest.raises(InputError, match=re.escape(error)):
        settings()


def test_node_facts_that_cannot_be_read_are_a_failed_source(tmp_path: Path) -> None:
    """What the DNS flows needed and could not be read is a source of the firewall
    collector, not only a log line: a resolver file that loops is said, not a crash."""
    from collectors.node_facts import NODE_FACTS_SOURCE, NodeFactsReader
    from collectors.registry import SourceLog

    log = SourceLog()
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "resolv.conf").write_text("nameserver 10.0.0.2\n")
    reader = NodeFactsReader(tmp_path, lambda: ["10.43.0.10"], log)
    reader()
    assert {r.source: r.status for r in log.results()}[NODE_FACTS_SOURCE] == "ok"
    (tmp_path / "etc" / "resolv.conf").unlink()
    (tmp_path / "etc" / "resolv.conf").symlink_to("resolv.conf")  # a loop
    log.start()
    facts = reader()
    (result,) = [r for r in log.results() if r.source == NODE_FACTS_SOURCE]
    assert result.status == "failed"
    assert result.detail is not None and "upstream nameservers unknown" in result.detail
    assert facts.upstream_dns == ()
