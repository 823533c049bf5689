"""OOM findings and ``nodediag pid`` against a real containerd + runc (private socket)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import realcontainerd
from agentproc import RunningAgent, nodediag

pytestmark = pytest.mark.root

MakeContainer = Callable[..., realcontainerd.RunningContainer]


def agent_args(containerd: realcontainerd.Containerd, state: Path) -> list[str]:
    return [
        "--kernel-log", "kmsg",
        "--containerd-socket", str(containerd.socket),
        "--state-dir", str(state),
    ]  # fmt: skip


@pytest.fixture
def agent(containerd: realcontainerd.Containerd, tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(agent_args(containerd, tmp_path))
    running.wait_ready()
    yield running
    assert running.stop() == 0, running.log()


def test_child_kill_in_a_running_container_is_invisible_and_named(
    agent: RunningAgent, k8s_container: MakeContainer
) -> None:
    container = k8s_container(pod="web-0", namespace="shop", name="app")
    kill = container.oom_kill_child()

    finding = agent.wait_finding(container.container_id)

    assert finding["reason"] == "InvisibleOOMKill"
    assert finding["subject"] == {
        "kind": "Pod",
        "name": "web-0",
        "namespace": "shop",
        "uid": container.pod_uid,
        "container": "app",
        "container_id": container.container_id,
    }
    assert finding["details"]["pid"] == kill.victim_pid
    assert finding["details"]["init_pid"] == container.init_pid
    assert "containerd" in finding["details"]["basis"]
    assert finding["details"]["image"] == container.image
    assert "container app of pod shop/web-0" in finding["message"]
    assert container.status() == "RUNNING"
    labels = {"scope": "invisible", "namespace": "shop", "pod": "web-0", "container": "app"}
    assert agent.metric("nodediag_oom_kills_total", **labels) == 1


def test_init_kill_is_a_container_kill(agent: RunningAgent, k8s_container: MakeContainer) -> None:
    limit = 32 * realcontainerd.MiB
    container = k8s_container(
        pod="job-1", namespace="batch", name="worker",
        memory_limit=limit, args=realcontainerd.oom_init_args(limit),
    )  # fmt: skip
    kill = container.oom_kill_init()

    finding = agent.wait_finding(container.container_id)

    assert finding["reason"] == "ContainerOOMKill"
    assert finding["details"]["pid"] == kill.victim_pid == container.init_pid
    assert finding["subject"]["name"] == "job-1"
    assert finding["subject"]["container"] == "worker"


def test_containerd_down_keeps_ids_and_recovers_without_restart(
    containerd: realcontainerd.Containerd, agent: RunningAgent, k8s_container: MakeContainer
) -> None:
    first = k8s_container(pod="api-0", namespace="shop", name="api")
    try:
        kill = first.oom_kill_child(before_go=containerd.stop)
        finding = agent.wait_finding(first.container_id)
    finally:
        containerd.start()
    assert finding["details"]["pid"] == kill.victim_pid
    assert finding["subject"]["uid"] == first.pod_uid
    assert finding["subject"]["container_id"] == first.container_id
    assert finding["subject"]["name"] is None
    assert finding["subject"]["namespace"] is None
    assert finding["subject"]["container"] is None
    assert agent.metric("nodediag_containerd_lookup_failures_total", reason="unreachable") >= 1
    assert sum("containerd unreachable" in line for line in agent.log_lines) == 1

    second = k8s_container(pod="api-1", namespace="shop", name="api")
    second.oom_kill_child()
    named = agent.wait_finding(second.container_id)
    assert named["reason"] == "InvisibleOOMKill"
    assert (named["subject"]["namespace"], named["subject"]["name"]) == ("shop", "api-1")
    assert named["subject"]["container"] == "api"


def test_pid_names_the_container_of_a_process(
    containerd: realcontainerd.Containerd, k8s_container: MakeContainer
) -> None:
    container = k8s_container(pod="db-0", namespace="data", name="postgres")
    result = nodediag(
        "pid", str(container.init_pid), "--json", "--containerd-socket", str(containerd.socket)
    )
    assert result.returncode == 0, result.stderr
    place = json.loads(result.stdout)
    assert place["in_container"] is True
    assert place["namespace"] == "data"
    assert place["pod"] == "db-0"
    assert place["container"] == "postgres"
    assert place["container_id"] == container.container_id
    assert place["init_pid"] == container.init_pid
    assert place["pod_uid"] == container.pod_uid
    assert place["image"] == container.image

    text = nodediag("pid", str(container.init_pid), "--containerd-socket", str(containerd.socket))
    assert "data/db-0" in text.stdout and "postgres" in text.stdout


def test_pid_of_a_host_process_is_not_in_a_container() -> None:
    result = nodediag("pid", str(os.getpid()))
    assert result.returncode == 0, result.stderr
    assert f"process {os.getpid()} is not in a container" in result.stdout


@pytest.fixture
def host_root(tmp_path: Path) -> Path:
    """A host root that is this machine's, but for the containerd socket location."""
    root = tmp_path / "host"
    root.mkdir()
    for name in ("proc", "sys", "dev"):
        (root / name).symlink_to(f"/{name}")
    return root


@pytest.mark.parametrize(
    "socket", ["run/containerd/containerd.sock", "run/k3s/containerd/containerd.sock"]
)
def test_default_socket_locations_are_found(
    socket: str, host_root: Path, containerd: realcontainerd.Containerd,
    k8s_container: MakeContainer,
) -> None:  # fmt: skip
    container = k8s_container(pod="edge-0", namespace="k3s", name="svc")
    with realcontainerd.symlink_socket(containerd, host_root / socket):
        result = nodediag("pid", str(container.init_pid), "--json", "--host-root", str(host_root))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pod"] == "edge-0"
