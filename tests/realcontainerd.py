"""Real containerd + runc for tests: a private containerd on its own socket, root and state
dirs, a local busybox OCI image, and Kubernetes-like containers (CRI labels, kubepods-style
cgroupfs paths) with real kernel OOM kills.

Everything here needs root and the Debian packages ``containerd``, ``runc`` and
``busybox-static``. Nothing here touches the host's own containerd (``/run/containerd``,
``/var/lib/containerd``) or real kubepods cgroups: sockets, root and state live under a fresh
``/run/nodediag-test-containerd-<hex>`` directory, cgroups under ``/nodediag-test-<hex>``.

Import as ``import realcontainerd`` (like ``realkernel``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import io
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

import realkernel

NAMESPACE = "k8s.io"
IMAGE_REF = "docker.io/library/nodediag-busybox:test"
BUSYBOX = Path("/bin/busybox")
#: The container init when a test does not ask for another one.
DEFAULT_ARGS: tuple[str, ...] = ("sleep", "3600")
RUN_BASE = Path("/run")
CGROUP_FS = Path("/sys/fs/cgroup")
MiB = 1 << 20

POD_NAME = "io.kubernetes.pod.name"
POD_NAMESPACE = "io.kubernetes.pod.namespace"
POD_UID = "io.kubernetes.pod.uid"
CONTAINER_NAME = "io.kubernetes.container.name"
KIND = "io.cri-containerd.kind"

Qos = Literal["guaranteed", "burstable", "besteffort"]

# Plugins a bare ``ctr`` workflow does not need; disabling them makes startup quiet and fast.
_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def missing_binaries() -> list[str]:
    """Which of the binaries this module runs are not installed."""
    needed = ("containerd", "ctr", "runc", "containerd-shim-runc-v2")
    return [name for name in needed if shutil.which(name) is None]


class CtrError(RuntimeError):
    """A ``ctr`` command failed."""


# -- containerd ----------------------------------------------------------------------------


class Containerd:
    """A real containerd on a private socket (``socket``), ``root`` and ``state``.

    Context manager: ``__enter__`` starts it, ``__exit__`` kills every task, deletes every
    container, stops containerd, unmounts what is left under its dirs and removes them.
    :meth:`stop` / :meth:`start` stop and restart the daemon on the same dirs; running
    containers survive that (their ``containerd-shim-runc-v2`` keeps running, as in
    production), and the restarted containerd reconnects to them.
    """

    def __init__(
        self,
        snapshotter: str | None = None,
        *,
        start_timeout: float = 30,
        base: Path | None = None,
    ) -> None:
        self.base = base or RUN_BASE / f"nodediag-test-containerd-{secrets.token_hex(4)}"
        self.socket = self.base / "containerd.sock"
        if len(str(self.socket)) + len(".ttrpc") >= 100:
            raise ValueError(f"socket path too long for AF_UNIX: {self.socket}")
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.runc_root = self.state / "runc"
        self.config = self.base / "config.toml"
        self.log_path = self.base / "containerd.log"
        self.logs = self.base / "logs"  # container stdout/stderr (``--log-uri file://``)
        self.snapshotter = snapshotter or ""
        self.start_timeout = start_timeout
        #: time the last :meth:`start` took until ``ctr version`` answered
        self.start_seconds = 0.0
        #: the imported busybox image ref (set by :func:`import_busybox_image`)
        self.image = ""
        #: top-level cgroup names (``nodediag-test-…``) of containers run here
        self.cgroup_prefixes: set[str] = set()
        self._process: subprocess.Popen[bytes] | None = None
        self._created_base = False

    #: plugins left out (a subclass with the CRI plugin drops it from the list)
    disabled_plugins: tuple[str, ...] = _DISABLED_PLUGINS

    def command(self) -> list[str]:
        """How containerd is started (a subclass may run it in a network namespace)."""
        return ["containerd", "--config", str(self.config)]

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Containerd:
        try:
            self._prepare()
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def _prepare(self) -> None:
        self.base.mkdir(mode=0o711)  # never reuse: FileExistsError is a bug
        self._created_base = True
        for directory in (self.root, self.state, self.logs):
            directory.mkdir(mode=0o711)
        if not self.snapshotter:
            self.snapshotter = "overlayfs" if overlay_mount_works(self.base) else "native"
        self.config.write_text(self._config_text())

    def _config_text(self) -> str:
        disabled = ", ".join(json.dumps(p) for p in self.disabled_plugins)
        return f"""\
version = 2
root = {json.dumps(str(self.root))}
state = {json.dumps(str(self.state))}
disabled_plugins = [{disabled}]

[grpc]
  address = {json.dumps(str(self.socket))}

[ttrpc]
  address = {json.dumps(str(self.socket) + ".ttrpc")}

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = {json.dumps(str(self.base / "opt"))}
"""

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process else None

    def start(self) -> None:
        """Start containerd (again) and wait until ``ctr version`` answers."""
        if self.running:
            raise RuntimeError("containerd is already running")
        if not self.config.exists():
            raise RuntimeError("use Containerd as a context manager")
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C of pytest must not kill it mid-cleanup
                close_fds=True,
            )
        deadline = t0 + self.start_timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"containerd exited with {self._process.returncode}: {self._log_tail()}"
                )
            probe = subprocess.run(
                ["ctr", "--address", str(self.socket), "--connect-timeout", "1s", "version"],
                capture_output=True,
                timeout=10,
            )
            if probe.returncode == 0 and b"Server:" in probe.stdout:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"containerd did not answer: {self._log_tail()}")
            time.sleep(0.02)
        self.start_seconds = time.monotonic() - t0

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM containerd and wait (SIGKILL after ``timeout``). Shims keep running."""
        proc, self._process = self._process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "no log"
        return "\n".join(text.splitlines()[-lines:])

    # -- ctr -----------------------------------------------------------------------------

    def ctr(
        self,
        *args: str,
        namespace: str = NAMESPACE,
        check: bool = True,
        timeout: float = 60,
        connect_timeout: float = 5,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr --address SOCK -n NAMESPACE ARGS...``; raises :class:`CtrError`.
        ``connect_timeout``: ctr's dial timeout (its default, 10 s, is what a stopped
        containerd costs every call)."""
        argv = ["ctr", "--address", str(self.socket), "--namespace", namespace]
        argv += ["--connect-timeout", f"{connect_timeout}s", *args]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and proc.returncode != 0:
            raise CtrError(
                f"{' '.join(argv)} exited with {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def tasks(self) -> dict[str, tuple[int, str]]:
        """``ctr tasks ls``: container id -> (host pid of the init, status)."""
        out = self.ctr("tasks", "ls").stdout.splitlines()
        result: dict[str, tuple[int, str]] = {}
        for line in out[1:]:
            parts = line.split()
            if len(parts) >= 3:
                result[parts[0]] = (int(parts[1]), parts[2])
        return result

    def containers(self) -> list[str]:
        """``ctr containers ls -q``: ids of all containers in the namespace."""
        return self.ctr("containers", "ls", "-q").stdout.split()

    def container_info(self, container_id: str) -> dict[str, object]:
        """``ctr containers info``: the container record as JSON."""
        info: dict[str, object] = json.loads(self.ctr("containers", "info", container_id).stdout)
        return info

    def task_pids(self, container_id: str) -> list[int]:
        """``ctr tasks ps``: host pids of every process of the container's task."""
        out = self.ctr("tasks", "ps", container_id).stdout.splitlines()
        return [int(line.split()[0]) for line in out[1:] if line.split()]

    def remove_container(self, container_id: str) -> None:
        """SIGKILL the task (if any), delete it, delete the container and its snapshot."""
        tasks = self.tasks()
        if container_id in tasks:
            pid, status = tasks[container_id]
            if status != "STOPPED":
                self.ctr("tasks", "kill", "--all", "-s", "SIGKILL", container_id, check=False)
                _wait_host_exit(pid, time.monotonic() + 10)
            deadline = time.monotonic() + 10
            while True:
                proc = self.ctr("tasks", "delete", "--force", container_id, check=False)
                if proc.returncode == 0 or "not found" in proc.stderr:
                    break
                if time.monotonic() > deadline:
                    raise CtrError(f"tasks delete {container_id}: {proc.stderr.strip()}")
                time.sleep(0.05)
        self.ctr("containers", "delete", container_id, check=False)

    # -- cleanup -------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Kill/delete everything, stop containerd, unmount, remove dirs and cgroups."""
        errors: list[str] = []
        if self._created_base and self.config.exists():
            try:
                if not self.running:
                    self.start()  # reconnects to the shims so they can be shut down cleanly
                for cid in self.containers():
                    self.remove_container(cid)
            except Exception as e:  # keep cleaning up: the rest must still go away
                errors.append(f"removing containers: {e}")
        self.stop()
        self._kill_leftover_shims()
        for mount in reversed(_mounts_under(self.base)):
            proc = subprocess.run(["umount", "-l", mount], capture_output=True, text=True)
            if proc.returncode != 0:
                errors.append(f"umount {mount}: {proc.stderr.strip()}")
        for prefix in sorted(self.cgroup_prefixes):
            try:
                remove_cgroup_tree(prefix)
            except RuntimeError as e:
                errors.append(str(e))
        if self._created_base:
            shutil.rmtree(self.base, ignore_errors=True)
            self._created_base = False
        if errors:
            raise RuntimeError("containerd cleanup: " + "; ".join(errors))

    def _kill_leftover_shims(self) -> None:
        """SIGKILL shims (and their containers) that still talk to *our* socket."""
        for pid in _pids_with_argument(str(self.socket)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for prefix in self.cgroup_prefixes:
            for pid in _cgroup_tree_pids(prefix):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def overlay_mount_works(scratch: Path) -> bool:
    """Whether an overlay mount with upper/work dirs on ``scratch``'s filesystem works."""
    probe = Path(tempfile.mkdtemp(prefix=".overlay-probe-", dir=scratch))
    try:
        for name in ("lower", "upper", "work", "merged"):
            (probe / name).mkdir()
        options = f"lowerdir={probe}/lower,upperdir={probe}/upper,workdir={probe}/work"
        proc = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(probe / "merged")],
            capture_output=True,
        )
        if proc.returncode != 0:
            return False
        subprocess.run(["umount", str(probe / "merged")], capture_output=True)
        return True
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _mounts_under(base: Path) -> list[str]:
    """Mount points under ``base`` in /proc/self/mountinfo order (parents first)."""
    prefix = str(base).rstrip("/") + "/"
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point.startswith(prefix):
                result.append(mount_point)
    return result


def _pids_with_argument(argument: str) -> list[int]:
    """Pids of processes whose command line contains ``argument`` as a whole word."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in argv:
            pids.append(int(entry.name))
    return pids


def _has_arg(pid: int, argument: str) -> bool:
    try:
        return argument.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def _wait_host_exit(pid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if not realkernel.host_pid_alive(pid):
            return True
        time.sleep(0.005)
    return False


# -- cgroups -------------------------------------------------------------------------------


def _hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy: v1 controller dirs under /sys/fs/cgroup, or the v2
    root itself."""
    if (CGROUP_FS / "cgroup.controllers").exists():
        return [CGROUP_FS]
    return [p for p in sorted(CGROUP_FS.iterdir()) if (p / "cgroup.procs").exists()]


def _cgroup_tree_pids(prefix: str) -> list[int]:
    pids: set[int] = set()
    for hierarchy in _hierarchies():
        top = hierarchy / prefix
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def remove_cgroup_tree(prefix: str, timeout: float = 10) -> None:
    """Remove ``/<prefix>`` and everything below it in every cgroup hierarchy, leaf
    first, killing processes left inside. Only ``nodediag-test-…`` prefixes are allowed."""
    if not prefix.startswith("nodediag-test-") or "/" in prefix:
        raise ValueError(f"refusing to remove cgroup tree {prefix!r}")
    errors = []
    for hierarchy in _hierarchies():
        top = hierarchy / prefix
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for path in [*dirs, top]:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        errors.append(f"{path}: {e}")
                        break
                    for pid in _cgroup_tree_pids(prefix):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    time.sleep(0.01)
    if errors:
        raise RuntimeError("could not remove test cgroups: " + "; ".join(errors))


def memory_cgroup_dir(cgroup_path: str) -> Path:
    """The memory controller's directory for the kernel cgroup path ``cgroup_path``."""
    root, _version = realkernel.memory_cgroup_root()
    return root / cgroup_path.lstrip("/")


def oom_kill_count(cgroup_path: str) -> int:
    """The cgroup's ``oom_kill`` counter (v1 ``memory.oom_control``, v2 ``memory.events``;
    0 when the cgroup is gone)."""
    directory = memory_cgroup_dir(cgroup_path)
    for name in ("memory.oom_control", "memory.events"):
        try:
            text = (directory / name).read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


def kubepods_cgroup_path(
    prefix: str, pod_uid: str, container_id: str, qos: Qos = "burstable"
) -> str:
    """A cgroupfs-driver kubepods path under the throwaway ``prefix``:
    ``/<prefix>/kubepods[/<qos>]/pod<uid>/<container id>``."""
    return f"{pod_cgroup_parent(prefix, pod_uid, qos)}/{container_id}"


def pod_cgroup_parent(prefix: str, pod_uid: str, qos: Qos = "burstable") -> str:
    """The pod's cgroup as kubelet's cgroupfs driver lays it out under ``prefix``:
    ``/<prefix>/kubepods[/<qos>]/pod<uid>`` (Guaranteed pods directly under kubepods)."""
    qos_dir = [] if qos == "guaranteed" else [qos]
    return "/" + "/".join([prefix.strip("/"), "kubepods", *qos_dir, f"pod{pod_uid}"])


# -- image ---------------------------------------------------------------------------------

_TARBALL: Path | None = None


def _goarch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )


def _busybox_applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    return sorted({a for a in out.stdout.split() if a and a != "busybox" and "/" not in a})


def _rootfs_layer() -> bytes:
    """An uncompressed tar: /bin/busybox, a symlink per applet, /etc/passwd, /tmp, ..."""
    buf = io.BytesIO()
    mtime = 0

    def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, mtime
        tar.addfile(info)

    def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, mtime
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "dev", "etc", "proc", "root", "sys", "var", "run"):
            add_dir(tar, name)
        add_dir(tar, "tmp", 0o1777)
        add_file(tar, "bin/busybox", BUSYBOX.read_bytes(), 0o755)
        for applet in _busybox_applets():
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, "busybox", 0o777, 0
            tar.addfile(info)
        add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        add_file(tar, "etc/group", b"root:x:0:\n")
    return buf.getvalue()


def build_busybox_oci_tarball(
    path: Path, ref: str = IMAGE_REF, cmd: Sequence[str] = ("sh",)
) -> Path:
    """Write an OCI image layout tarball (``oci-layout``, ``index.json``,
    ``blobs/sha256/*``) with one layer built from the host's static busybox; ``cmd`` is
    the image's default command."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    layer = _rootfs_layer()
    layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(layer)}
    arch = _goarch()
    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": list(cmd),
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "nodediag tests"}],
    }
    config_desc = {
        "mediaType": "application/vnd.oci.image.config.v1+json",
        **blob(_json_bytes(config)),
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }
    manifest_desc = {
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        **blob(_json_bytes(manifest)),
        "platform": {"architecture": arch, "os": "linux"},
        "annotations": {
            "io.containerd.image.name": ref,
            "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1],
        },
    }
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_desc],
    }
    files = {
        "oci-layout": _json_bytes({"imageLayoutVersion": "1.0.0"}),
        "index.json": _json_bytes(index),
    }
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [*files.items()] + [
            (f"blobs/sha256/{d.split(':', 1)[1]}", b) for d, b in blobs.items()
        ]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def busybox_oci_tarball() -> Path:
    """The busybox OCI tarball, built once per process (removed at exit)."""
    global _TARBALL
    if _TARBALL is None or not _TARBALL.exists():
        directory = Path(tempfile.mkdtemp(prefix="nodediag-oci-"))
        atexit.register(shutil.rmtree, directory, True)
        _TARBALL = build_busybox_oci_tarball(directory / "busybox-oci.tar")
    return _TARBALL


def import_busybox_image(cd: Containerd, ref: str = IMAGE_REF) -> str:
    """Import the local busybox image into ``cd`` (namespace k8s.io), unpacked into its
    snapshotter; returns the image ref and sets ``cd.image``."""
    if ref != IMAGE_REF:
        tarball = build_busybox_oci_tarball(cd.base / "busybox-oci.tar", ref)
    else:
        tarball = busybox_oci_tarball()
    import_oci_archive(cd, tarball, ref)
    cd.image = ref
    return ref


def import_oci_archive(cd: Containerd, tarball: Path, ref: str) -> str:
    """``ctr images import`` an OCI archive whose image is named ``ref`` into ``cd``
    (namespace k8s.io), unpacked into its snapshotter; returns ``ref``."""
    cd.ctr(
        "images", "import", "--snapshotter", cd.snapshotter,
        "--platform", f"linux/{_goarch()}", str(tarball), timeout=300,
    )  # fmt: skip
    names = cd.ctr("images", "ls", "-q").stdout.split()
    if ref not in names:
        raise CtrError(f"imported image is listed as {names}, not {ref}")
    return ref


# -- containers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ContainerOom:
    """One real OOM kill inside a containerd container. Pids are host pids."""

    victim_pid: int
    init_pid: int
    oom_kills: int  # the cgroup's oom_kill counter afterwards
    killed_at: float  # time.time() right after the victim was seen to exit
    exit_status: int | None = None  # task exit status ("init" kills), 137 = SIGKILL


@dataclass
class RunningContainer:
    """A container started by :func:`run_container` (its task runs detached)."""

    cd: Containerd = field(repr=False)
    container_id: str
    init_pid: int
    cgroup_path: str  # the kernel's view, e.g. /nodediag-test-…/kubepods/burstable/pod…/<id>
    pod_uid: str
    namespace: str
    pod: str
    name: str
    image: str
    memory_limit: int
    labels: dict[str, str]
    _execs: int = field(default=0, repr=False)

    @property
    def memory_cgroup(self) -> Path:
        return memory_cgroup_dir(self.cgroup_path)

    def status(self) -> str:
        """``RUNNING``, ``STOPPED``, ... (``""`` when the task is gone)."""
        return self.cd.tasks().get(self.container_id, (0, ""))[1]

    def pids(self) -> list[int]:
        """Host pids in the container's memory cgroup."""
        try:
            text = (self.memory_cgroup / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def oom_kill_count(self) -> int:
        return oom_kill_count(self.cgroup_path)

    def exec(self, args: Sequence[str], exec_id: str | None = None) -> str:
        """Start ``args`` as a new process in the container (``ctr tasks exec -d``);
        returns the exec id. Its output goes to the container's log dir."""
        self._execs += 1
        exec_id = exec_id or f"exec-{self._execs}-{secrets.token_hex(3)}"
        log = self.cd.logs / f"{self.container_id}-{exec_id}.log"
        self.cd.ctr(
            "tasks", "exec", "--detach", "--exec-id", exec_id,
            "--log-uri", f"file://{log}", self.container_id, *args,
        )  # fmt: skip
        return exec_id

    def wait_stopped(self, timeout: float = 20) -> None:
        """Wait until the task is STOPPED (or gone)."""
        deadline = time.monotonic() + timeout
        while (status := self.status()) not in ("STOPPED", ""):
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {self.container_id} still {status}")
            time.sleep(0.02)

    def delete_task(self) -> int:
        """``ctr tasks delete`` a STOPPED task; returns its exit status (137 = SIGKILL).
        ``ctr`` only reports it here, as ``… exit with non-zero exit code N``."""
        proc = self.cd.ctr("tasks", "delete", self.container_id)
        match = re.search(r"exit code (\d+)", proc.stderr + proc.stdout)
        return int(match.group(1)) if match else 0

    def oom_kill_child(
        self,
        timeout: float = 30,
        *,
        factor: int = 4,
        before_go: Callable[[], object] | None = None,
    ) -> ContainerOom:
        """Exec a memory hog (busybox ``dd`` with a block size of ``factor`` times the limit:
        its read() of /dev/zero touches every page) and wait until the kernel OOM-killed
        it. The init keeps running. Paced with :func:`realkernel.oom_ratelimit_slot`.
        ``before_go`` runs once the hog waits, just before it allocates (e.g. to stop
        containerd: the kill then needs no ctr call)."""
        if self.memory_limit <= 0:
            raise ValueError("oom_kill_child needs a container with a memory limit")
        go = f"/tmp/.nodediag-go-{secrets.token_hex(4)}"
        hog = (
            f"while [ ! -e {go} ]; do sleep 0.01; done; "
            f"exec dd if=/dev/zero of=/dev/null bs={factor * self.memory_limit} count=1"
        )
        with realkernel.oom_ratelimit_slot():
            deadline = time.monotonic() + timeout
            before_pids = set(self.pids())
            before = self.oom_kill_count()
            self.exec(["sh", "-c", hog])
            # the exec'd sh (it execs dd, same pid); its `sleep 0.01` children come and go,
            # and one just forked (not yet exec'd) still shows the sh's command line
            while len(new := [p for p in set(self.pids()) - before_pids if _has_arg(p, hog)]) != 1:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not one exec'd memory hog in the cgroup: {new}")
                time.sleep(0.005)
            (victim,) = new
            if before_go is not None:
                before_go()
            # the hog is waiting for the go file: make it from the host side
            Path(f"/proc/{self.init_pid}/root{go}").touch()
            if not _wait_host_exit(victim, deadline):
                raise TimeoutError(f"memory hog {victim} still alive after {timeout}s")
            killed_at = time.time()
            count = self._wait_oom_counter(before, deadline)
        return ContainerOom(victim, self.init_pid, count, killed_at)

    def oom_kill_init(self, timeout: float = 30, *, delete_task: bool = False) -> ContainerOom:
        """Let the container's init allocate until the kernel OOM-kills it (start the
        container with ``args=oom_init_args(limit)``: init waits for ``/tmp/go``). Returns
        once the task is STOPPED; with ``delete_task`` the task is deleted too and
        ``exit_status`` filled in (otherwise it stays STOPPED, as after a real OOM, and
        :meth:`delete_task` gives the status). Paced with
        :func:`realkernel.oom_ratelimit_slot`."""
        deadline = time.monotonic() + timeout
        with realkernel.oom_ratelimit_slot():
            before = self.oom_kill_count()
            go = Path(f"/proc/{self.init_pid}/root/tmp/go")
            if not go.parent.is_dir():
                raise RuntimeError(f"init {self.init_pid} is gone already")
            go.touch()
            if not _wait_host_exit(self.init_pid, deadline):
                raise TimeoutError(f"init {self.init_pid} still alive after {timeout}s")
            killed_at = time.time()
            count = self._wait_oom_counter(before, deadline)
        self.wait_stopped(max(1.0, deadline - time.monotonic()))
        status = self.delete_task() if delete_task else None
        return ContainerOom(self.init_pid, self.init_pid, count, killed_at, status)

    def _wait_oom_counter(self, before: int, deadline: float) -> int:
        while (count := self.oom_kill_count()) <= before:
            if time.monotonic() > deadline:
                raise RuntimeError("process died but the cgroup's oom_kill counter is unchanged")
            time.sleep(0.005)
        return count

    def remove(self) -> None:
        self.cd.remove_container(self.container_id)


def oom_init_args(memory_limit: int, factor: int = 4) -> list[str]:
    """Container args whose init waits for ``/tmp/go`` (made by
    :meth:`RunningContainer.oom_kill_init`) and then allocates ``factor`` times the limit."""
    return [
        "sh", "-c",
        "while [ ! -e /tmp/go ]; do sleep 0.01; done; "
        f"exec dd if=/dev/zero of=/dev/null bs={factor * memory_limit} count=1",
    ]  # fmt: skip


def run_container(
    cd: Containerd,
    image: str | None = None,
    *,
    container_id: str | None = None,
    pod: str = "test-pod",
    namespace: str = "default",
    name: str = "main",
    pod_uid: str | None = None,
    qos: Qos = "burstable",
    cgroup_prefix: str | None = None,
    cgroup_path: str | None = None,
    labels: dict[str, str] | None = None,
    memory_limit: int = 32 * MiB,
    args: Sequence[str] = DEFAULT_ARGS,
    options: Sequence[str] = (),
    timeout: float = 30,
) -> RunningContainer:
    """``ctr -n k8s.io run -d`` a Kubernetes-like container and return it running.

    Labels: the four CRI labels from ``pod``/``namespace``/``pod_uid``/``name`` plus
    ``io.cri-containerd.kind=container``; ``labels`` adds/overrides. Cgroup (cgroupfs
    driver): ``cgroup_path`` or ``/<cgroup_prefix>/kubepods/<qos>/pod<uid>/<id>`` with a
    fresh ``nodediag-test-<hex>`` prefix by default (removed by ``cd``'s cleanup).
    ``memory_limit`` 0 means unlimited. ``options``: more ``ctr run`` options (mounts,
    capabilities, namespaces, ...; see ``podspec``).
    """
    image = image or cd.image or IMAGE_REF
    container_id = container_id or secrets.token_hex(32)
    pod_uid = pod_uid or str(uuid.uuid4())
    if cgroup_path is None:
        prefix = cgroup_prefix or f"nodediag-test-{secrets.token_hex(4)}"
        cgroup_path = kubepods_cgroup_path(prefix, pod_uid, container_id, qos)
    top = cgroup_path.strip("/").split("/", 1)[0]
    if top.startswith("nodediag-test-"):
        cd.cgroup_prefixes.add(top)
    all_labels = {
        POD_NAME: pod,
        POD_NAMESPACE: namespace,
        POD_UID: pod_uid,
        CONTAINER_NAME: name,
        KIND: "container",
        **(labels or {}),
    }
    argv = ["run", "--detach", "--snapshotter", cd.snapshotter, "--cgroup", cgroup_path]
    argv += ["--runc-root", str(cd.runc_root), "--log-uri", f"file://{cd.logs}/{container_id}.log"]
    if memory_limit:
        argv += ["--memory-limit", str(memory_limit)]
    for key, value in all_labels.items():
        argv += ["--label", f"{key}={value}"]
    cd.ctr(*argv, *options, image, container_id, *args, timeout=timeout)
    try:
        deadline = time.monotonic() + timeout
        while (task := cd.tasks().get(container_id)) is None or task[1] == "CREATED":
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {container_id} did not start: {task}")
            time.sleep(0.02)
    except BaseException:
        with contextlib.suppress(Exception):
            cd.remove_container(container_id)
        raise
    return RunningContainer(
        cd=cd,
        container_id=container_id,
        init_pid=task[0],
        cgroup_path=cgroup_path,
        pod_uid=pod_uid,
        namespace=namespace,
        pod=pod,
        name=name,
        image=image,
        memory_limit=memory_limit,
        labels=all_labels,
    )


# -- socket aliases ------------------------------------------------------------------------


@contextlib.contextmanager
def symlink_socket(
    cd: Containerd, path: Path, mode: Literal["symlink", "bind"] = "symlink"
) -> Iterator[Path]:
    """Make ``path`` (e.g. ``<host root>/run/k3s/containerd/containerd.sock``) reach
    ``cd``'s socket: a symlink (gRPC over unix follows it: connect(2) resolves symlinks),
    or with ``mode="bind"`` a bind mount of the socket inode (works across mount
    namespaces/chroots where the symlink target is not visible, but goes stale when
    containerd restarts: it creates a new socket inode; the symlink keeps working).
    Missing parent dirs are created and removed again."""
    created: list[Path] = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for directory in reversed(created):
        directory.mkdir()
    try:
        if mode == "symlink":
            path.symlink_to(cd.socket)
        else:
            path.touch(exist_ok=False)
            subprocess.run(["mount", "--bind", str(cd.socket), str(path)], check=True)
        try:
            yield path
        finally:
            if mode == "bind":
                subprocess.run(["umount", str(path)], check=False)
            path.unlink(missing_ok=True)
    finally:
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()
