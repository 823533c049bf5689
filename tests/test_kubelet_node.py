"""A kubelet-shaped node: pods and containers made through containerd's CRI, real OOM kills
in them, the agent (``nodediag run``) watching, and the CRI's own ContainerStatus as the
oracle for every verdict — what kubelet would report:

- ``ContainerOOMKill`` ⇔ the container exited (``CONTAINER_EXITED``) with reason
  ``OOMKilled``;
- ``InvisibleOOMKill`` ⇔ the container is still ``CONTAINER_RUNNING`` and never exited
  (``finished_at`` 0). containerd 1.6 writes reason ``OOMKilled`` on a running container too
  when a child was killed; kubelet reads no reason while a container runs, so neither does
  the oracle.

Names in findings, metrics and Events (pod, namespace, container) must equal the sandbox's
and the container's CRI metadata.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import kube_standin as ks
import pytest
import realcontainerd
import realcri
import realkernel
from agentproc import RunningAgent
from cri_api import api_pb2 as cri
from realcri import CriClient, CriContainer, CriContainerd, CriPod, child_hog_args
from test_events import NODE

from agent.settings import Settings

pytestmark = pytest.mark.root

LIMIT = 32 * realcontainerd.MiB
LIVE_EVIDENCE_WINDOW = Settings.live_evidence_window


def test_committed_cri_stubs_match_the_proto(tmp_path: Path) -> None:
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    subprocess.run([str(repo / "scripts/gen-protos"), str(tmp_path)], check=True, cwd=repo)
    for name in ("api_pb2.py", "api_pb2.pyi"):
        generated = (tmp_path / "tests/cri_api" / name).read_text()
        committed = (repo / "tests/cri_api" / name).read_text()
        assert generated == committed, f"{name} is stale: run scripts/gen-protos"


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[CriContainerd, CriClient]]:
    if os.geteuid() != 0:
        realkernel.skip_or_fail("needs root")
    missing = realcri.missing_binaries()
    if missing:
        realkernel.skip_or_fail(f"not installed: {', '.join(missing)}")
    with realcri.kubelet_node() as made:
        yield made


@pytest.fixture(scope="module")
def api() -> Iterator[ks.KubeStandin]:
    with ks.running() as standin:
        standin.add_node(NODE)
        yield standin


@pytest.fixture(scope="module")
def agent(
    node: tuple[CriContainerd, CriClient],
    api: ks.KubeStandin,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningAgent]:
    cd, _ = node
    tmp = tmp_path_factory.mktemp("agent")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NODEDIAG_EVENT_FLUSH_INTERVAL", "0.5")
        running = RunningAgent([
            "--kubeconfig", str(api.write_kubeconfig(tmp / "kubeconfig")),
            "--kernel-log", "kmsg", "--state-dir", str(tmp / "state"), "--node-name", NODE,
            "--containerd-socket", str(cd.socket), "--cluster-dns", "127.0.0.1",
        ])  # fmt: skip
    running.wait_ready()
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def cri_client(node: tuple[CriContainerd, CriClient], agent: RunningAgent) -> CriClient:
    return node[1]


# ----------------------------------------------------------------------------- the oracle


def cri_verdict(status: cri.ContainerStatus) -> str:
    """The reason the agent must give, from what kubelet would read of the container."""
    if status.state == cri.CONTAINER_EXITED and status.reason == "OOMKilled":
        return "ContainerOOMKill"
    if status.state == cri.CONTAINER_RUNNING and status.finished_at == 0:
        return "InvisibleOOMKill"
    state = cri.ContainerState.Name(status.state)
    raise AssertionError(f"the CRI says {state} ({status.reason}): no OOM verdict fits")


def finding_for(agent: RunningAgent, container: CriContainer) -> dict[str, Any]:
    return agent.wait_finding(container.id, timeout=30)


def assert_agrees(
    agent: RunningAgent, api: ks.KubeStandin, container: CriContainer, status: cri.ContainerStatus
) -> dict[str, Any]:
    """The agent's finding, metric and Event agree with the CRI's status and metadata."""
    finding = finding_for(agent, container)
    expected = cri_verdict(status)
    assert finding["reason"] == expected, (finding["details"].get("basis"), status.state)
    pod = container.pod
    subject = finding["subject"]
    assert (subject["namespace"], subject["name"], subject["uid"]) == (
        pod.namespace, pod.name, pod.uid
    )  # fmt: skip
    assert (subject["container"], subject["container_id"]) == (status.metadata.name, status.id)
    scope = "container" if expected == "ContainerOOMKill" else "invisible"
    labels = {"scope": scope, "namespace": pod.namespace, "pod": pod.name,
              "container": status.metadata.name}  # fmt: skip
    assert api.wait_for(lambda _: agent.metric("nodediag_oom_kills_total", **labels) >= 1), (
        agent.log()
    )

    def event(standin: ks.KubeStandin) -> ks.JSON | None:
        return next(
            (e for e in standin.events(pod.namespace)
             if e["regarding"].get("uid") == pod.uid and e["reason"] == expected),
            None,
        )  # fmt: skip

    assert api.wait_for(lambda s: event(s) is not None, timeout=20), (api.events(), agent.log())
    regarding = event(api)["regarding"]  # type: ignore[index]
    assert (regarding["kind"], regarding["namespace"], regarding["name"]) == (
        "Pod", pod.namespace, pod.name
    )  # fmt: skip
    return finding


def kill_child(container: CriContainer) -> cri.ContainerStatus:
    container.go()
    time.sleep(0.3)  # the victim is reaped; the init goes on
    return container.status()


def kill_init(container: CriContainer) -> cri.ContainerStatus:
    container.go()
    return container.wait_state(cri.CONTAINER_EXITED)


# ----------------------------------------------------------------------------- the cases


def test_child_killed_init_alive(
    cri_client: CriClient, agent: RunningAgent, api: ks.KubeStandin
) -> None:
    pod = cri_client.run_pod("web-0", "shop")
    app = pod.create_container("app", child_hog_args(LIMIT), memory_limit=LIMIT)
    status = kill_child(app)
    assert status.state == cri.CONTAINER_RUNNING
    assert_agrees(agent, api, app, status)
    assert app.status().state == cri.CONTAINER_RUNNING  # and still, after the finding


def test_init_killed(cri_client: CriClient, agent: RunningAgent, api: ks.KubeStandin) -> None:
    pod = cri_client.run_pod("batch-0", "jobs")
    job = pod.create_container("job", realcontainerd.oom_init_args(LIMIT), memory_limit=LIMIT)
    status = kill_init(job)
    assert (status.reason, status.exit_code) == ("OOMKilled", 137)
    assert_agrees(agent, api, job, status)


def test_two_containers_in_one_pod_one_killed(
    cri_client: CriClient, agent: RunningAgent, api: ks.KubeStandin
) -> None:
    pod = cri_client.run_pod("duo-0", "shop")
    worker = pod.create_container("worker", child_hog_args(LIMIT), memory_limit=LIMIT)
    sidecar = pod.create_container("sidecar", memory_limit=LIMIT)
    status = kill_child(worker)
    assert_agrees(agent, api, worker, status)
    quiet = sidecar.status()
    assert (quiet.state, quiet.reason) == (cri.CONTAINER_RUNNING, "")
    assert agent.findings_for(sidecar.id) == []


def test_restarted_container_new_id_same_pod(
    cri_client: CriClient, agent: RunningAgent, api: ks.KubeStandin
) -> None:
    """The container's init is killed (kubelet would restart it): the new container (new
    id, attempt 1, same name and pod uid) then loses a child."""
    pod = cri_client.run_pod("api-0", "shop")
    first = pod.create_container("api", realcontainerd.oom_init_args(LIMIT), memory_limit=LIMIT)
    assert_agrees(agent, api, first, kill_init(first))
    second = pod.create_container("api", child_hog_args(LIMIT), memory_limit=LIMIT, attempt=1)
    assert second.id != first.id
    finding = assert_agrees(agent, api, second, kill_child(second))
    assert finding["subject"]["uid"] == pod.uid
    assert cri_verdict(first.status()) == "ContainerOOMKill"  # the first stays as it was


def test_pod_removed_right_after_the_kill(
    cri_client: CriClient, agent: RunningAgent, api: ks.KubeStandin
) -> None:
    """The pod is deleted (StopPodSandbox + RemovePodSandbox) right after a child's kill:
    the CRI said the container was running when the kill happened; the agent must say so
    too, and still name the pod."""
    pod = cri_client.run_pod("gone-0", "shop")
    app = pod.create_container("app", child_hog_args(LIMIT), memory_limit=LIMIT)
    app.go()
    status = app.status()
    pod.remove()
    assert_agrees(agent, api, app, status)


@pytest.mark.parametrize("qos", ["guaranteed", "besteffort"])
def test_qos_classes(
    cri_client: CriClient, agent: RunningAgent, api: ks.KubeStandin, qos: realcontainerd.Qos
) -> None:
    """Guaranteed: the pod's cgroup sits directly under kubepods. BestEffort: no container
    limit; the kill comes from a limit on the pod's cgroup (oom_memcg = the pod)."""
    pod: CriPod = cri_client.run_pod(f"{qos}-0", "shop", qos=qos)
    if qos == "besteffort":
        pod.limit_pod_memory(LIMIT)
        app = pod.create_container("app", child_hog_args(LIMIT), memory_limit=0)
    else:
        app = pod.create_container("app", child_hog_args(LIMIT), memory_limit=LIMIT)
    finding = assert_agrees(agent, api, app, kill_child(app))
    assert finding["details"]["memcg"] == app.cgroup_path
    assert ("/kubepods/pod" in app.cgroup_path) == (qos == "guaranteed")


# The agent (re)started after the kill and the pod's removal: no TaskStart of the container
# seen, no task (nor container) in containerd, the memory cgroup gone when the agent reads
# the kill from the log's backlog, within its live-evidence window. The log decides; the
# basis says the cgroup was gone. (case id: container args, the kill, the expected basis)
LATE_CASES = {
    "child-killed": (child_hog_args(LIMIT), kill_child, "the victim was listed after sh"),
    "init-killed": (
        realcontainerd.oom_init_args(LIMIT),
        kill_init,
        "the victim was the only process in the container's memory cgroup",
    ),
}


@pytest.mark.parametrize("case", LATE_CASES)
def test_agent_started_after_the_kill_and_the_pods_removal(
    node: tuple[CriContainerd, CriClient], tmp_path: Path, case: str
) -> None:
    """A gone cgroup must not make a child's kill a container kill (the CRI said running),
    nor hide an init's (the CRI said OOMKilled): the report's task table tells them apart."""
    args, kill, table_basis = LATE_CASES[case]
    cd, client = node
    pod = client.run_pod(f"late-{case}", "shop")
    app = pod.create_container("app", args, memory_limit=LIMIT)
    status = kill(app)
    pod.remove()
    assert not realcontainerd.memory_cgroup_dir(app.cgroup_path).exists()
    late = RunningAgent([
        "--no-kube", "--kernel-log", "kmsg", "--state-dir", str(tmp_path / "state"),
        "--node-name", NODE, "--containerd-socket", str(cd.socket), "--cluster-dns", "127.0.0.1",
    ])  # fmt: skip
    try:
        finding = late.wait_finding(app.id, timeout=60)
        read_after = time.time() - datetime.fromisoformat(finding["time"]).timestamp()
    finally:
        assert late.stop() == 0, late.log()
    basis = finding["details"]["basis"]
    assert finding["reason"] == cri_verdict(status), basis
    assert finding["subject"]["uid"] == pod.uid
    if read_after <= LIVE_EVIDENCE_WINDOW:  # else the node was too slow to read it fresh
        assert basis.startswith("the container's memory cgroup was gone when read"), basis
    assert table_basis in basis, basis
    print(f"{case}: read {read_after:.1f}s after the kill: {basis}")
