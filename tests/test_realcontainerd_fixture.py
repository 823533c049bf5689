"""The real containerd + runc fixtures work: CRI-labelled containers in kubepods-style
memory cgroups, real OOM kills of a child and of the init, containerd restarts."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import realcontainerd
import realkernel
from realcontainerd import Containerd, RunningContainer

MakeContainer = Callable[..., RunningContainer]


def _proc_cgroup(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"no {controller} line in /proc/{pid}/cgroup")


def _nspid(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(p) for p in line.split()[1:]]
    raise AssertionError(f"no NSpid in /proc/{pid}/status")


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_oci_tarball_digests_and_sizes(tmp_path: Path) -> None:
    if not realcontainerd.BUSYBOX.exists():
        realkernel.skip_or_fail(f"no {realcontainerd.BUSYBOX} (Debian busybox-static)")
    tarball = realcontainerd.build_busybox_oci_tarball(tmp_path / "image.tar")
    with tarfile.open(tarball) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}

    def blob(desc: dict[str, object]) -> bytes:
        digest = str(desc["digest"])
        data = files[f"blobs/sha256/{digest.removeprefix('sha256:')}"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        assert len(data) == desc["size"]
        return data

    (manifest_desc,) = json.loads(files["index.json"])["manifests"]
    assert manifest_desc["annotations"]["io.containerd.image.name"] == realcontainerd.IMAGE_REF
    manifest = json.loads(blob(manifest_desc))
    config = json.loads(blob(manifest["config"]))
    assert config["config"]["Cmd"] == ["sh"]
    (layer_desc,) = manifest["layers"]
    layer = blob(layer_desc)
    assert config["rootfs"]["diff_ids"] == [layer_desc["digest"]]
    with tarfile.open(fileobj=io.BytesIO(layer)) as rootfs:
        members = {m.name: m for m in rootfs}
    assert members["bin/busybox"].size == realcontainerd.BUSYBOX.stat().st_size
    for applet in ("sh", "sleep", "dd", "head", "cat", "tail"):
        assert members[f"bin/{applet}"].issym() and members[f"bin/{applet}"].linkname == "busybox"


@pytest.mark.root
def test_container_has_cri_labels(containerd: Containerd, k8s_container: MakeContainer) -> None:
    c = k8s_container(pod="web-0", namespace="shop", name="nginx")
    assert len(c.container_id) == 64 and int(c.container_id, 16) >= 0
    info = containerd.container_info(c.container_id)
    labels = info["Labels"]
    assert isinstance(labels, dict)
    # ctr adds io.containerd.image.config.stop-signal from the image config
    assert {k: v for k, v in labels.items() if not k.startswith("io.containerd.")} == {
        "io.kubernetes.pod.name": "web-0",
        "io.kubernetes.pod.namespace": "shop",
        "io.kubernetes.pod.uid": c.pod_uid,
        "io.kubernetes.container.name": "nginx",
        "io.cri-containerd.kind": "container",
    }
    assert labels.items() >= c.labels.items()
    assert info["Image"] == containerd.image == c.image
    assert info["Snapshotter"] == containerd.snapshotter
    runtime = info["Runtime"]
    assert isinstance(runtime, dict) and runtime["Name"] == "io.containerd.runc.v2"
    assert c.container_id in containerd.containers()
    assert containerd.tasks()[c.container_id] == (c.init_pid, "RUNNING")


@pytest.mark.root
def test_init_lives_in_the_kubepods_memory_cgroup(k8s_container: MakeContainer) -> None:
    c = k8s_container(memory_limit=48 * realcontainerd.MiB, qos="burstable")
    parts = c.cgroup_path.split("/")
    assert parts[1].startswith("nodediag-test-")
    assert parts[2:] == ["kubepods", "burstable", f"pod{c.pod_uid}", c.container_id]
    assert _proc_cgroup(c.init_pid, "memory") == c.cgroup_path
    assert c.pids() == [c.init_pid]
    assert _comm(c.init_pid) == "sleep"
    assert _nspid(c.init_pid)[-1] == 1  # PID 1 of the container's pid namespace
    _, version = realkernel.memory_cgroup_root()
    limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
    assert int((c.memory_cgroup / limit_file).read_text()) == 48 * realcontainerd.MiB


@pytest.mark.root
def test_exec_runs_inside_the_container(k8s_container: MakeContainer) -> None:
    c = k8s_container()
    c.exec(["sh", "-c", "echo $$ > /tmp/exec.pid.tmp && mv /tmp/exec.pid.tmp /tmp/exec.pid"])
    out = Path(f"/proc/{c.init_pid}/root/tmp/exec.pid")
    deadline = time.monotonic() + 10
    while not out.exists():
        assert time.monotonic() < deadline, "the exec'd shell wrote nothing"
        time.sleep(0.01)
    assert int(out.read_text()) > 1  # a pid in the container's pid namespace, not its init


@pytest.mark.root
def test_child_oom_kill_leaves_task_running(
    containerd: Containerd, k8s_container: MakeContainer
) -> None:
    c = k8s_container(memory_limit=32 * realcontainerd.MiB)
    oom = c.oom_kill_child()
    assert oom.victim_pid != c.init_pid
    assert oom.init_pid == c.init_pid
    assert oom.oom_kills == c.oom_kill_count() == 1
    assert realkernel.host_pid_alive(c.init_pid)
    assert not realkernel.host_pid_alive(oom.victim_pid)
    assert containerd.tasks()[c.container_id] == (c.init_pid, "RUNNING")
    assert c.pids() == [c.init_pid]
    # and again: the container keeps working after an OOM kill
    second = c.oom_kill_child()
    assert second.oom_kills == 2 and second.victim_pid not in (oom.victim_pid, c.init_pid)
    assert c.status() == "RUNNING"


@pytest.mark.root
def test_init_oom_kill_ends_task(containerd: Containerd, k8s_container: MakeContainer) -> None:
    limit = 32 * realcontainerd.MiB
    c = k8s_container(memory_limit=limit, args=realcontainerd.oom_init_args(limit))
    assert c.status() == "RUNNING"
    oom = c.oom_kill_init()
    assert oom.victim_pid == oom.init_pid == c.init_pid
    assert oom.oom_kills == 1
    assert not realkernel.host_pid_alive(c.init_pid)
    assert c.status() == "STOPPED"
    assert c.delete_task() == 137  # SIGKILL
    assert c.status() == ""
    assert c.container_id in containerd.containers()  # the container record stays


@pytest.mark.root
def test_init_oom_kill_delete_task(k8s_container: MakeContainer) -> None:
    limit = 24 * realcontainerd.MiB
    c = k8s_container(memory_limit=limit, args=realcontainerd.oom_init_args(limit))
    oom = c.oom_kill_init(delete_task=True)
    assert oom.exit_status == 137
    assert c.status() == ""


@pytest.mark.root
def test_containerd_restart_keeps_container_and_task(
    containerd: Containerd, k8s_container: MakeContainer, tmp_path: Path
) -> None:
    c = k8s_container()
    k3s = tmp_path / "run" / "k3s" / "containerd" / "containerd.sock"
    link = contextlib.ExitStack()
    link.enter_context(realcontainerd.symlink_socket(containerd, k3s))
    shim = int(Path(f"/proc/{c.init_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert _comm(shim).startswith("containerd-shim")
    containerd.stop()
    try:
        assert not containerd.running
        down = containerd.ctr("version", check=False, connect_timeout=0.5)
        assert down.returncode != 0
        # containerd down: the shim and the container keep running
        assert realkernel.host_pid_alive(shim)
        assert realkernel.host_pid_alive(c.init_pid)
    finally:
        containerd.start()
    assert containerd.running
    assert containerd.tasks()[c.container_id] == (c.init_pid, "RUNNING")
    assert c.container_id in containerd.containers()
    labels = containerd.container_info(c.container_id)["Labels"]
    assert isinstance(labels, dict) and labels.items() >= c.labels.items()
    assert containerd.task_pids(c.container_id) == [c.init_pid]
    with link:  # the K3s-path symlink follows the restarted containerd's new socket
        out = subprocess.run(
            ["ctr", "--address", str(k3s), "-n", "k8s.io", "tasks", "ls"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert c.container_id in out
    # the restarted containerd still drives the task: an OOM kill works through it
    oom = c.oom_kill_child()
    assert oom.oom_kills == 1 and c.status() == "RUNNING"


@pytest.mark.root
@pytest.mark.parametrize("mode", ["symlink", "bind"])
def test_socket_at_k3s_path(
    containerd: Containerd, k8s_container: MakeContainer, tmp_path: Path, mode: str
) -> None:
    c = k8s_container()
    k3s = tmp_path / "host" / "run" / "k3s" / "containerd" / "containerd.sock"
    with realcontainerd.symlink_socket(containerd, k3s, mode=mode) as path:  # type: ignore[arg-type]
        assert path == k3s
        out = subprocess.run(
            ["ctr", "--address", str(k3s), "-n", "k8s.io", "tasks", "ls"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert c.container_id in out and "RUNNING" in out
    assert not k3s.exists() and not (tmp_path / "host" / "run").exists()


@pytest.mark.root
def test_cleanup_after_containerd_was_stopped() -> None:
    """Exiting a Containerd whose daemon is down still kills the shims and containers,
    unmounts the rootfs and removes dirs and cgroups."""
    if realcontainerd.missing_binaries():
        realkernel.skip_or_fail(f"not installed: {realcontainerd.missing_binaries()}")
    with Containerd() as cd:
        realcontainerd.import_busybox_image(cd)
        c = realcontainerd.run_container(cd)
        shim = int(Path(f"/proc/{c.init_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        base, prefix = cd.base, c.cgroup_path.split("/")[1]
        assert realcontainerd._mounts_under(base)
        cd.stop()
    assert not base.exists()
    assert not realkernel.host_pid_alive(c.init_pid)
    assert not realkernel.host_pid_alive(shim)
    assert not realcontainerd._mounts_under(base)
    root, _ = realkernel.memory_cgroup_root()
    assert not (root / prefix).exists()
