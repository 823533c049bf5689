"""What operators read: Debian's ``kubectl`` (1.20) against the HTTPS stand-in shows the
agent's Events — ``kubectl get events -A``, ``kubectl describe pod``, ``kubectl describe
node``. The agent writes ``events.k8s.io/v1`` Events in-cluster with the shipped RBAC; kubectl
reads them through ``core/v1`` (server-side tables for ``get``, client-side describers), as
from a real API server.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import kube_standin as ks
import pytest
import realkubectl
from prometheus_client import CollectorRegistry
from standin_auth import ADMIN
from standin_tls import TlsFiles, make_tls
from test_events import NODE, POD_UID, node_finding, pod_finding, pod_object
from test_incluster import AGENT, service_account_dir, shipped_rbac

from agent.kube_services import KubeServices, start_kube
from agent.settings import Settings

ADMIN_TOKEN = "kubectl-admin-token"


@pytest.fixture(scope="module")
def kubectl() -> Path:
    path = realkubectl.debian_kubectl()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's kubectl is not unpacked (scripts/test does it)")
        pytest.skip("Debian's kubectl not unpacked: see tests/realkubectl.py")
    assert realkubectl.client_version(path).startswith("v1.20"), path
    return path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def cluster(
    tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ks.KubeStandin, Path]]:
    """A stand-in holding the agent's Events: a pod's kill series (3) and a node finding,
    written in-cluster with the shipped RBAC; and a kubeconfig of an admin for kubectl."""
    tmp = tmp_path_factory.mktemp("kubectl")
    users = {"sa-token": AGENT, ADMIN_TOKEN: ADMIN}
    with (
        ks.running(tls=tls, rbac=shipped_rbac(), users=users) as api,
        pytest.MonkeyPatch.context() as env,
    ):
        api.add_node(NODE)
        api.add_pod(pod_object())
        kube = _agent_sink(api, service_account_dir(tmp / "sa", tls, "sa-token"), env)
        for _ in range(3):
            kube.submit(pod_finding())
        kube.submit(node_finding())
        assert kube.sink.flush(10) == 0
        assert not [r for r in api.requests if r.status in (401, 403)]
        yield api, api.write_kubeconfig(tmp / "kubeconfig", token=ADMIN_TOKEN)


def _agent_sink(api: ks.KubeStandin, sa_dir: Path, env: pytest.MonkeyPatch) -> KubeServices:
    env.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    env.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
    env.setenv("NODEDIAG_SERVICE_ACCOUNT_DIR", str(sa_dir))
    stop = threading.Event()
    stop.set()  # no background threads: flush() writes
    kube = start_kube(Settings(node_name=NODE), CollectorRegistry(), stop)
    assert kube is not None
    return kube


def test_get_events_all_namespaces(kubectl: Path, cluster: tuple[ks.KubeStandin, Path]) -> None:
    api, kubeconfig = cluster
    rows = realkubectl.table(realkubectl.run(kubectl, kubeconfig, "get", "events", "-A"))
    by_reason = {row["REASON"]: row for row in rows}
    pod = by_reason["InvisibleOOMKill"]
    assert pod["NAMESPACE"] == "shop" and pod["TYPE"] == "Warning"
    assert pod["OBJECT"] == "pod/web-0"
    assert pod["MESSAGE"].startswith("process worker (pid 4885) in container app of pod shop/web-0")
    node = by_reason["DNSDropRule"]
    assert (node["NAMESPACE"], node["OBJECT"]) == ("default", f"node/{NODE}")
    wide = realkubectl.table(
        realkubectl.run(kubectl, kubeconfig, "get", "events", "-A", "-o", "wide")
    )
    counts = {row["REASON"]: row["COUNT"] for row in wide}
    assert counts == {"InvisibleOOMKill": "3", "DNSDropRule": "1"}  # the series count
    sources = {row["SOURCE"] for row in wide}
    assert sources == {f"nodediag.io/agent, nodediag-{NODE}"}
    assert api.requests_matching("GET", "^/api/v1/events$")  # read through core/v1


def test_describe_pod_shows_the_kill(kubectl: Path, cluster: tuple[ks.KubeStandin, Path]) -> None:
    _, kubeconfig = cluster
    out = realkubectl.run(kubectl, kubeconfig, "describe", "pod", "web-0", "-n", "shop")
    assert "Name:         web-0" in out
    events = realkubectl.events_section(out)
    assert len(events) == 1, out
    kind, reason, *rest = events[0].split()
    assert (kind, reason) == ("Warning", "InvisibleOOMKill")
    assert "nodediag.io/agent" in rest
    assert "process worker (pid 4885) in container app of pod shop/web-0" in events[0]


def test_describe_node_shows_the_node_finding(
    kubectl: Path, cluster: tuple[ks.KubeStandin, Path]
) -> None:
    api, kubeconfig = cluster
    out = realkubectl.run(kubectl, kubeconfig, "describe", "node", NODE)
    events = realkubectl.events_section(out)
    assert len(events) == 1, out
    assert events[0].split()[:2] == ["Warning", "DNSDropRule"]
    assert f"DNSDropRule on node {NODE} (INPUT); fix: remove the rule" in events[0]
    assert "web-0" in out  # the node's pods, from the same stand-in
    searched = api.requests_matching("GET", "^/api/v1/events$")[-1].query["fieldSelector"]
    assert f"involvedObject.uid={NODE}" in searched  # kubectl 1.20 looks up the name as uid
    assert POD_UID not in searched
