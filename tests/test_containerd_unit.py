"""containerd pieces that need no containerd: stubs in sync with the protos, the
/proc/<pid>/cgroup forms, task-based classification, and failure handling."""

from __future__ import annotations

import logging
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from agent.containers import ContainerLookup
from agent.metrics import Metrics
from agent.oom_findings import verdict_from_task
from agent.pidinfo import cgroup_of
from collectors.containerd import ContainerdClient, TaskInfo
from collectors.oom import OomKill, OomVictim

REPO = Path(__file__).resolve().parent.parent
CID = "f" * 64
POD = "11112222-3333-4444-5555-666677778888"


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run([str(REPO / "scripts/gen-protos"), str(tmp_path)], check=True, cwd=REPO)
    for name in ("containers_pb2.py", "tasks_pb2.py", "events_pb2.py", "containers_pb2.pyi",
                 "tasks_pb2.pyi", "events_pb2.pyi"):  # fmt: skip
        generated = (tmp_path / "collectors/containerd_api" / name).read_text()
        committed = (REPO / "collectors/containerd_api" / name).read_text()
        assert generated == committed, f"{name} is stale: run scripts/gen-protos"


@pytest.mark.parametrize(
    "text",
    [
        # cgroup v1 (hybrid), cgroupfs driver
        f"12:memory:/kubepods/burstable/pod{POD}/{CID}\n11:pids:/kubepods/burstable/pod{POD}/{CID}\n"
        "0::/\n",
        # cgroup v2, systemd driver
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}"
        f".slice/cri-containerd-{CID}.scope\n",
    ],
)
def test_cgroup_of_finds_the_container_line(text: str) -> None:
    path = cgroup_of(text)
    assert path is not None and CID in path


def test_cgroup_of_a_host_process() -> None:
    text = "12:memory:/system.slice/sshd.service\n1:name=systemd:/system.slice/sshd.service\n0::/\n"
    assert cgroup_of(text) == "/system.slice/sshd.service"
    assert cgroup_of("0::/user.slice/user-0.slice/session-1.scope\n") == (
        "/user.slice/user-0.slice/session-1.scope"
    )


def _kill(pid: int) -> OomKill:
    return OomKill(
        victim=OomVictim(pid=pid, comm="w"),
        time=None,
        uptime=None,
        position=None,
        constraint="CONSTRAINT_MEMCG",
        is_global=False,
        oom_memcg=None,
        task_memcg=None,
    )


def test_task_verdicts() -> None:
    container = verdict_from_task(_kill(40), TaskInfo(pid=40, status="RUNNING", exit_status=0))
    assert container is not None and container.reason == "ContainerOOMKill"
    assert container.init_pid == 40
    invisible = verdict_from_task(_kill(41), TaskInfo(pid=40, status="RUNNING", exit_status=0))
    assert invisible is not None and invisible.reason == "InvisibleOOMKill"
    # the init outlived the kill; the container stopped afterwards (e.g. its pod deleted)
    stopped = verdict_from_task(_kill(41), TaskInfo(pid=40, status="STOPPED", exit_status=137))
    assert stopped is not None and stopped.reason == "InvisibleOOMKill"
    assert verdict_from_task(_kill(41), None) is None


def test_a_task_containerd_cannot_tell_is_judged_by_the_init_pid_seen_at_its_start(
    tmp_path: Path,
) -> None:
    """containerd does not answer (or has deleted the task: tests/test_kubelet_node.py): the
    init pid remembered from the TaskStart event still tells init kill from child kill, and
    the basis does not claim the task was deleted."""
    lookup = ContainerLookup(ContainerdClient([tmp_path / "no.sock"]), Metrics())
    assert lookup.task(CID) is None
    lookup.remember_start(CID, 40)
    task = lookup.task(CID)
    assert task == TaskInfo(pid=40, status="UNKNOWN", exit_status=0)
    assert lookup.started_task(CID) == TaskInfo(pid=40, status="DELETED", exit_status=0)
    child = verdict_from_task(_kill(41), task)
    assert child is not None and child.reason == "InvisibleOOMKill"
    assert "unknown now" in child.basis and "deleted" not in child.basis
    init = verdict_from_task(_kill(40), task)
    assert init is not None and init.reason == "ContainerOOMKill"


def test_unreachable_containerd_is_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A unix socket that exists but where nothing answers, like containerd stopped.
    dead = tmp_path / "containerd.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(dead))
    listener.close()
    metrics = Metrics()
    lookup = ContainerLookup(ContainerdClient([dead], timeout=0.5), metrics)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert lookup.container(CID) is None
    warnings = [r for r in caplog.records if "containerd unreachable" in r.getMessage()]
    assert len(warnings) == 1
    assert (
        metrics.registry.get_sample_value(
            "nodediag_containerd_lookup_failures_total", {"reason": "unreachable"}
        )
        == 3
    )


def test_task_events_that_cannot_be_followed_are_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lookup = ContainerLookup(ContainerdClient([tmp_path / "no.sock"], timeout=0.5), Metrics())
    stop = threading.Event()
    worker = threading.Thread(target=lookup.follow_task_starts, args=(stop,))
    with caplog.at_level(logging.WARNING):
        worker.start()
        stop.wait(2.5)  # two or three subscription attempts
        stop.set()
        worker.join(5)
    assert not worker.is_alive()
    said = [r for r in caplog.records if "task events not followed" in r.getMessage()]
    assert len(said) == 1
    assert "no containerd socket" in said[0].getMessage()


def test_missing_sockets_say_where_they_were_looked_for(tmp_path: Path) -> None:
    client = ContainerdClient([tmp_path / "a.sock", tmp_path / "b.sock"])
    with pytest.raises(Exception, match=r"no containerd socket at .*a\.sock, .*b\.sock"):
        client.container(CID)
