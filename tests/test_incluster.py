"""In-cluster credentials for real: the API stand-in serves HTTPS with a CA the test makes,
requires the bearer token and authorizes every request against the RBAC rendered from
``daemonset/``; the agent finds its service account the way a pod does (``token``,
``ca.crt``, ``namespace`` and ``KUBERNETES_SERVICE_HOST``/``_PORT``), and goes on when the
token file is replaced (kubelet rotating the projected token) and the old token revoked.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import kube_standin as ks
import pytest
import realkernel
from agentproc import RunningAgent
from prometheus_client import CollectorRegistry
from standin_auth import ADMIN, Rbac, User, request_info, rule_allows, service_account_user
from standin_tls import TlsFiles, make_tls
from test_deploy import rendered
from test_events import NODE, node_finding, pod_object

from agent.kube import KubeConfigSource, KubeError, KubeUnreachable, config_source, connect
from agent.kube_services import start_kube
from agent.settings import Settings

AGENT = service_account_user("nodediag", "nodediag")
ADMIN_TOKEN = "admin-token"


def shipped_rbac() -> Rbac:
    return Rbac.of(rendered("base"))


# ----------------------------------------------------------------------------- the authorizer


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/pods", {}, ("list", "", "", "pods", "", "")),
        ("GET", "/api/v1/pods", {"watch": "1"}, ("watch", "", "", "pods", "", "")),
        ("GET", "/api/v1/nodes/n1", {}, ("get", "", "", "nodes", "", "n1")),
        ("POST", "/apis/events.k8s.io/v1/namespaces/a/events", {},
         ("create", "events.k8s.io", "a", "events", "", "")),
        ("PATCH", "/api/v1/namespaces/a/pods/p/status", {},
         ("patch", "", "a", "pods", "status", "p")),
        ("GET", "/api/v1/namespaces/a", {}, ("get", "", "a", "namespaces", "", "a")),
        ("DELETE", "/api/v1/namespaces/a/events", {},
         ("deletecollection", "", "a", "events", "", "")),
    ],
)  # fmt: skip
def test_request_attributes_as_the_api_server_reads_them(
    method: str, path: str, query: dict[str, str], expected: tuple[str, ...]
) -> None:
    info = request_info(method, path, query)
    assert info.resource_request
    got = (info.verb, info.api_group, info.namespace, info.resource, info.subresource, info.name)
    assert got == expected


def test_discovery_paths_are_non_resource_requests() -> None:
    for path in ("/api", "/api/v1", "/apis", "/apis/events.k8s.io/v1", "/version", "/openapi/v2"):
        info = request_info("GET", path, {})
        assert not info.resource_request and info.verb == "get", path


def test_rule_matching() -> None:
    pods_status = request_info("PATCH", "/api/v1/namespaces/a/pods/p/status", {})
    assert not rule_allows({"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]},
                           pods_status)  # fmt: skip
    assert rule_allows({"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
                       pods_status)  # fmt: skip
    assert rule_allows({"apiGroups": [""], "resources": ["*/status"], "verbs": ["*"]}, pods_status)
    named = {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"], "resourceNames": ["n1"]}
    assert rule_allows(named, request_info("GET", "/api/v1/nodes/n1", {}))
    assert not rule_allows(named, request_info("GET", "/api/v1/nodes/n2", {}))
    assert not rule_allows(named, request_info("GET", "/api/v1/nodes", {}))  # list: no name
    urls = {"nonResourceURLs": ["/apis/*"], "verbs": ["get"]}
    assert rule_allows(urls, request_info("GET", "/apis/events.k8s.io/v1", {}))
    assert not rule_allows(urls, request_info("GET", "/api/v1", {}))
    assert not rule_allows(urls, request_info("POST", "/apis/x", {}))


def test_role_binding_grants_only_in_its_namespace() -> None:
    rbac = Rbac.of([
        {"kind": "Role", "metadata": {"name": "r", "namespace": "a"},
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]},
        {"kind": "RoleBinding", "metadata": {"name": "b", "namespace": "a"},
         "roleRef": {"kind": "Role", "name": "r"},
         "subjects": [{"kind": "ServiceAccount", "name": "sa"}]},
    ])  # fmt: skip
    user = service_account_user("a", "sa")
    assert rbac.allowed(user, request_info("GET", "/api/v1/namespaces/a/pods", {}))
    assert not rbac.allowed(user, request_info("GET", "/api/v1/namespaces/b/pods", {}))
    assert not rbac.allowed(user, request_info("GET", "/api/v1/pods", {}))
    assert not rbac.allowed(service_account_user("b", "sa"),
                            request_info("GET", "/api/v1/namespaces/a/pods", {}))  # fmt: skip


# ----------------------------------------------------------------------------- HTTPS stand-in


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


def service_account_dir(directory: Path, tls: TlsFiles, token: str) -> Path:
    """The files kubelet projects into the pod (the token as written, newline included)."""
    files = {"token": (token + "\n").encode(), "ca.crt": tls.ca_cert.read_bytes(),
             "namespace": b"nodediag"}  # fmt: skip
    write_projected(directory, files)
    return directory


def rotate_token(directory: Path, token: str) -> None:
    """A new token, written as kubelet writes a projected volume (the other files kept)."""
    files = {name: (directory / name).read_bytes() for name in ("ca.crt", "namespace")}
    write_projected(directory, {**files, "token": (token + "\n").encode()})


def write_projected(directory: Path, files: dict[str, bytes]) -> None:
    """Kubelet's AtomicWriter: the files in a fresh ``..<timestamp>`` directory, the
    ``..data`` symlink swapped to it by a rename, each visible name a symlink through
    ``..data``; the previous directory removed. A reader sees all old or all new files."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "..data"
    previous = os.readlink(data) if data.is_symlink() else None
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir(mode=0o755)
    for name, content in files.items():
        (stamp / name).write_bytes(content)
        (stamp / name).chmod(0o644)
    swap = directory / "..data_tmp"
    swap.symlink_to(stamp.name)
    swap.rename(data)
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    if previous is not None:
        shutil.rmtree(directory / previous)


@pytest.fixture
def secure_api(tls: TlsFiles) -> Iterator[ks.KubeStandin]:
    users = {"sa-token-1": AGENT, ADMIN_TOKEN: ADMIN}
    with ks.running(tls=tls, rbac=shipped_rbac(), users=users) as standin:
        standin.add_node(NODE)
        yield standin


@pytest.fixture
def in_cluster(
    secure_api: ks.KubeStandin, tls: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    directory = service_account_dir(tmp_path / "serviceaccount", tls, "sa-token-1")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(secure_api.port))
    monkeypatch.setenv("NODEDIAG_SERVICE_ACCOUNT_DIR", str(directory))
    return directory


def test_shipped_rbac_allows_what_the_agent_does_and_denies_the_rest(
    secure_api: ks.KubeStandin, in_cluster: Path
) -> None:
    source = config_source(Settings())
    assert source == KubeConfigSource("in-cluster", in_cluster)
    client = connect(source)
    try:
        assert client.request("GET", "/api/v1/pods", query={"resourceVersion": "0"})["items"] == []
        assert client.request("GET", "/apis/events.k8s.io/v1")["groupVersion"]  # discovery
        assert client.request("GET", f"/api/v1/nodes/{NODE}")["metadata"]["name"] == NODE
        with pytest.raises(KubeError) as denied:
            client.request("GET", "/api/v1/nodes")  # get, not list
        assert denied.value.status == 403 and denied.value.reason == "Forbidden"
        assert denied.value.body["kind"] == "Status"
        assert denied.value.message == (
            'nodes is forbidden: User "system:serviceaccount:nodediag:nodediag" '
            'cannot list resource "nodes" in API group "" at the cluster scope'
        )
        with pytest.raises(KubeError) as denied:
            client.request("GET", "/api/v1/namespaces/shop/pods/web-0")  # list, not get
        assert denied.value.status == 403
        with pytest.raises(KubeError) as denied:
            client.request("DELETE", "/api/v1/namespaces/default/events/x")
        assert denied.value.status == 403
    finally:
        client.close()


def test_a_wrong_token_is_401_and_a_wrong_ca_is_refused(
    secure_api: ks.KubeStandin, in_cluster: Path
) -> None:
    rotate_token(in_cluster, "not-a-token")
    client = connect(KubeConfigSource("in-cluster", in_cluster))
    try:
        with pytest.raises(KubeError) as refused:
            client.request("GET", "/api/v1/pods")
        assert refused.value.status == 401 and refused.value.body["reason"] == "Unauthorized"
    finally:
        client.close()
    (in_cluster / "ca.crt").write_text((in_cluster / "namespace").read_text())  # not a cert
    with pytest.raises(KubeUnreachable):
        connect(KubeConfigSource("in-cluster", in_cluster)).request("GET", "/version")


def test_plain_http_is_not_answered(secure_api: ks.KubeStandin, tmp_path: Path) -> None:
    kubeconfig = secure_api.write_kubeconfig(tmp_path / "kc", token=ADMIN_TOKEN)
    kubeconfig.write_text(kubeconfig.read_text().replace("https://", "http://"))
    client = connect(KubeConfigSource("kubeconfig", kubeconfig))
    try:
        with pytest.raises(KubeUnreachable):
            client.request("GET", "/version")
    finally:
        client.close()


def test_event_sink_and_pod_watch_go_on_after_the_token_is_rotated(
    secure_api: ks.KubeStandin, in_cluster: Path
) -> None:
    """The sink writes with the first token; kubelet replaces the file and the old token stops
    working at once (harsher than real expiry); the next write and the next watch use the new
    token, with no Event lost."""
    secure_api.add_pod(pod_object())
    stop = threading.Event()
    registry = CollectorRegistry()
    kube = start_kube(Settings(node_name=NODE), registry, stop)
    assert kube is not None
    try:
        kube.submit(node_finding())
        assert secure_api.wait_for(lambda s: len(s.events()) == 1)
        assert kube.pods.synced.wait(5)
        secure_api.add_user("sa-token-2", AGENT)
        rotate_token(in_cluster, "sa-token-2")
        secure_api.revoke("sa-token-1")
        secure_api.clear_requests()
        kube.submit(node_finding("DNSProbeFailed", server="10.43.0.10"))
        assert secure_api.wait_for(lambda s: len(s.events()) == 2), secure_api.requests
        secure_api.outage(0.3, "drop")  # the watch is cut; it comes back with the new token
        time.sleep(0.4)
        secure_api.add_pod(pod_object("late-0", "shop", "uid-late"))
        assert secure_api.wait_for(lambda _: kube.pods.pod("uid-late") is not None, timeout=15)
        statuses = [r.status for r in secure_api.requests if r.fault is None]
        assert statuses.count(401) <= 2  # at most one per thread, then the new token
        assert 403 not in statuses
        assert registry.get_sample_value(
            "nodediag_events_total", {"reason": "DNSProbeFailed", "result": "dropped"}
        ) in (None, 0)
    finally:
        stop.set()
        kube.sink.wake()
        kube.join(10)


# ----------------------------------------------------------------------------- the agent process


@pytest.mark.root
def test_agent_process_in_cluster_with_a_rotated_token(
    secure_api: ks.KubeStandin,
    in_cluster: Path,
    tmp_path: Path,
    throwaway_container: Callable[..., realkernel.ThrowawayContainer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``nodediag run`` with no kubeconfig: in-cluster over HTTPS, the token file ending in a
    newline (the Event sink thread once died on it), the shipped RBAC enforced; then the token
    rotated and the old one revoked while an OOM kill comes in."""
    monkeypatch.setenv("NODEDIAG_EVENT_FLUSH_INTERVAL", "0.5")
    monkeypatch.setenv("NODEDIAG_EVENT_BACKOFF_CAP", "2")
    agent = RunningAgent([
        "--kernel-log", "kmsg", "--state-dir", str(tmp_path / "state"), "--node-name", NODE,
        "--containerd-socket", str(tmp_path / "no-containerd.sock"),
        "--cluster-dns", "127.0.0.1",
    ])  # fmt: skip
    try:
        agent.wait_ready()
        assert secure_api.wait_for(
            lambda s: any(e["reason"] == "DNSProbeFailed" for e in s.events("default")),
            timeout=20,
        ), agent.log()
        assert secure_api.wait_for(
            lambda s: any(r.query.get("watch") and r.status == 200 for r in s.requests)
        )
        secure_api.add_user("sa-token-2", AGENT)
        rotate_token(in_cluster, "sa-token-2")
        secure_api.revoke("sa-token-1")
        container = throwaway_container()
        secure_api.add_pod(
            pod_object("web-0", "shop", container.pod_uid, {"app": container.container_id})
        )
        time.sleep(0.3)
        container.oom_kill("child")
        assert secure_api.wait_for(
            lambda s: any(e["regarding"].get("uid") == container.pod_uid for e in s.events("shop")),
            timeout=20,
        ), (secure_api.events(), agent.log())
        event = next(
            e for e in secure_api.events("shop") if e["regarding"].get("uid") == container.pod_uid
        )
        assert event["regarding"]["name"] == "web-0"
        assert not [r for r in secure_api.requests if r.status == 403], agent.log()
        assert agent.get("/healthz")[0] == 200
        assert agent.metric("nodediag_thread_errors_total") == 0
        assert agent.metric("nodediag_events_total", result="dropped") == 0
    finally:
        assert agent.stop() == 0, agent.log()


def test_admin_user_for_kubectl(secure_api: ks.KubeStandin, tmp_path: Path) -> None:
    """The test's own admin (system:masters → cluster-admin) may read everything."""
    kubeconfig = secure_api.write_kubeconfig(tmp_path / "kc", token=ADMIN_TOKEN)
    client = connect(KubeConfigSource("kubeconfig", kubeconfig))
    try:
        assert client.request("GET", "/api/v1/nodes")["items"]
    finally:
        client.close()
    assert isinstance(ADMIN, User)
