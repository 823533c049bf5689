"""Real-kernel test helpers: throwaway kubepods-style memory cgroups with real OOM kills,
and a real systemd-journald that ingests /dev/kmsg.

Everything here needs root. Nothing here touches a cgroup it did not create: every cgroup
lives under a fresh ``/nodediag-test-<random>`` prefix that is removed again on exit.

Import as ``import realkernel`` (``tests/`` has no ``__init__.py``; pytest puts ``tests/`` on
``sys.path`` for the conftest and mypy resolves it the same way).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn

import pytest

Qos = Literal["guaranteed", "burstable", "besteffort"]
Driver = Literal["cgroupfs", "systemd"]
Target = Literal["child", "init"]

MiB = 1 << 20
SYS_FS_CGROUP = Path("/sys/fs/cgroup")
JOURNALD_BINARY = Path("/lib/systemd/systemd-journald")
JOURNAL_DIRS = (Path("/run/log/journal"), Path("/var/log/journal"))
JOURNALD_SOCKET = Path("/run/systemd/journal/socket")
JOURNALD_START_LOCK = Path("/run/nodediag-test-journald.lock")

#: Interpreter for the allocator. Debian's /usr/bin/python3 gives the victim the realistic
#: comm ``python3``; the test interpreter is the fallback.
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable

# The allocator: record "<host pid> <host ppid> <comm>" atomically, wait for the go byte on
# stdin, then allocate ``total`` bytes in ``chunk`` pieces, writing every byte (so every page
# is really charged to the memory cgroup). Exit 3 means the limit was not enforced.
# argv: info_file total chunk [comm]
_ALLOCATOR = r"""
import os, sys
info, total, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if len(sys.argv) > 4:
    with open('/proc/self/comm', 'w') as f:
        f.write(sys.argv[4])
pid = int(os.readlink('/proc/self'))
with open('/proc/self/stat') as f:
    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
with open('/proc/self/comm') as f:
    comm = f.read().rstrip('\n')
with open(info + '.tmp', 'w') as f:
    f.write('%d %d %s' % (pid, ppid, comm))
os.rename(info + '.tmp', info)
sys.stdin.buffer.read(1)
hog = []
for _ in range(total // chunk):
    hog.append(b'\x5a' * chunk)
sys.exit(3)
"""

# PID 1 of the new pid namespace. Its first act is to move itself into the container's
# cgroup (writing "0" to cgroup.procs moves the writer), so every process it forks is
# charged there while unshare itself stays outside, like containerd-shim.
# argv: $1 cgroup.procs, $2 python, $3 allocator code, $4 info file, $5 total, $6 chunk,
# $7 status file, $8 target, $9 number of sleepers (group kill), $10 comm (optional)
_INIT_SCRIPT = r"""
echo 0 > "$1" || exit 125
i=0
while [ "$i" -lt "$9" ]; do sleep 3600 </dev/null & i=$((i+1)); done
if [ "$8" = init ]; then
    exec "$2" -I -S -c "$3" "$4" "$5" "$6" ${10:+"${10}"}
fi
"$2" -I -S -c "$3" "$4" "$5" "$6" ${10:+"${10}"}
echo $? > "$7.tmp" && mv "$7.tmp" "$7"
exec 0</dev/null
sleep 3600
"""


#: The kernel prints the OOM report header *and* the ``oom-kill:constraint=…`` summary
#: under ``__ratelimit(&oom_rs)`` (DEFAULT_RATELIMIT_BURST 10 per DEFAULT_RATELIMIT_INTERVAL
#: 5 s, host-wide); beyond that only ``Killed process …`` is logged, followed later by
#: ``oom_kill_process: N callbacks suppressed``. Test kills stay below it, with margin.
OOM_RATELIMIT_BURST = 8
OOM_RATELIMIT_WINDOW = 6.0
OOM_PACE_FILE = Path("/run/nodediag-test-oom-pace")
#: Multiplies the OOM kill timeouts: the VM lane's software-emulated guest (qemu TCG) is
#: many times slower than a real machine, and a memcg OOM first reclaims the allocator's
#: own file pages (read back over 9p there).
TIMEOUT_SCALE = float(os.environ.get("NODEDIAG_TEST_TIMEOUT_SCALE", "1"))


@contextlib.contextmanager
def oom_ratelimit_slot(enabled: bool = True) -> Iterator[None]:
    """Serialize test OOM kills host-wide (flock, also across concurrent pytest sessions)
    and keep them under the kernel's OOM report ratelimit: at most
    ``OOM_RATELIMIT_BURST`` kills per ``OOM_RATELIMIT_WINDOW`` seconds (CLOCK_MONOTONIC
    stamps in ``OOM_PACE_FILE``). ``enabled=False`` only serializes and records the kill."""
    with open(OOM_PACE_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        now = time.monotonic()
        recent = [t for t in map(float, f.read().split()) if now - t < OOM_RATELIMIT_WINDOW]
        if enabled and len(recent) >= OOM_RATELIMIT_BURST:
            time.sleep(max(0.0, sorted(recent)[-OOM_RATELIMIT_BURST] + OOM_RATELIMIT_WINDOW - now))
        try:
            yield
        finally:
            now = time.monotonic()
            recent = [t for t in recent if now - t < OOM_RATELIMIT_WINDOW] + [now]
            f.seek(0)
            f.truncate()
            f.write(" ".join(f"{t:.6f}" for t in recent))
            f.flush()


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``$CI`` is set (CI runs as root and must not skip)."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, refusing to skip: {reason}", pytrace=False)
    pytest.skip(reason)


def memory_cgroup_root(base: Path = SYS_FS_CGROUP) -> tuple[Path, int]:
    """The memory controller's mount point and cgroup version (1 or 2)."""
    v1 = base / "memory"
    if (v1 / "cgroup.procs").exists():
        return v1, 1
    controllers = base / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return base, 2
    raise RuntimeError(
        f"no memory cgroup controller: neither {v1}/cgroup.procs (v1) exists nor does "
        f"{controllers} (v2) list 'memory'"
    )


@dataclass(frozen=True)
class OomOutcome:
    """One real OOM kill. Pids are host pids."""

    victim_pid: int
    init_pid: int
    victim_comm: str
    killed_at: float  # time.time() right after the victim was seen to exit


@dataclass(frozen=True)
class OomGroupOutcome:
    """A memory.oom.group kill: every process of the container died."""

    victim_pid: int  # the allocator (the task the OOM killer selected)
    init_pid: int
    victim_comm: str
    killed_pids: tuple[int, ...]  # every process that was in the cgroup (init included)
    killed_at: float


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def host_pid_alive(pid: int) -> bool:
    """True while host ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_exit(pid: int, deadline: float) -> bool:
    """Wait for a (non-child) process to exit; True when it did before ``deadline``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # pidfd unsupported: poll /proc
        while time.monotonic() < deadline:
            if not host_pid_alive(pid):
                return True
            time.sleep(0.002)
        return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        remaining = max(0.0, deadline - time.monotonic())
        return bool(poller.poll(int(remaining * 1000)))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Run:
    """One ``unshare … sh`` process tree and the files its processes report through."""

    proc: subprocess.Popen[bytes]  # unshare (outside the cgroup)
    info: Path  # "<host pid> <host ppid> <comm>" of the allocator
    status: Path  # the allocator's exit status as seen by sh ("child" runs)
    log: Path  # stdout + stderr of the whole tree

    def read_info(self, deadline: float) -> tuple[int, int, str]:
        pid, ppid, comm = _wait_file(self.info, deadline, self.proc, self.log).split(" ", 2)
        return int(pid), int(ppid), comm

    def go(self) -> None:
        """Let the allocator start allocating."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")
        self.proc.stdin.close()


def _wait_file(path: Path, deadline: float, proc: subprocess.Popen[bytes], log: Path) -> str:
    while True:
        try:
            return path.read_text()
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            try:
                output = log.read_text(errors="replace").strip() or "no output"
            except OSError:
                output = "no output"
            raise RuntimeError(
                f"container init exited with {proc.returncode} before {path.name}: {output}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.002)


class ThrowawayContainer:
    """A kubepods-style memory cgroup under a unique ``/nodediag-test-<hex>`` prefix.

    ``cgroup_path`` is the kernel's view (what ``task_memcg=`` prints), ``fs_path`` the
    directory in the cgroup filesystem. Use as a context manager; on exit every process
    left in the cgroup is killed and the created directories are removed leaf first.
    """

    def __init__(
        self,
        qos: Qos = "burstable",
        driver: Driver = "cgroupfs",
        limit_bytes: int = 32 * MiB,
        *,
        runtime: str = "cri-containerd",
        pod_uid: str | None = None,
        container_id: str | None = None,
        prefix: str | None = None,
    ) -> None:
        if qos not in ("guaranteed", "burstable", "besteffort"):
            raise ValueError(f"qos must be guaranteed|burstable|besteffort, not {qos!r}")
        if driver not in ("cgroupfs", "systemd"):
            raise ValueError(f"driver must be cgroupfs|systemd, not {driver!r}")
        self.root, self.version = memory_cgroup_root()
        self.qos: Qos = qos
        self.driver: Driver = driver
        self.limit_bytes = limit_bytes
        self.pod_uid = pod_uid or str(uuid.uuid4())
        self.container_id = container_id or secrets.token_hex(32)
        self.prefix = prefix or f"nodediag-test-{secrets.token_hex(4)}"
        parts = [self.prefix, *self._kube_parts(runtime)]
        self.cgroup_path = "/" + "/".join(parts)
        self.fs_path = self.root.joinpath(*parts)
        self._components = parts
        self._created: list[Path] = []  # in creation order (top first)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._tmp: Path | None = None  # files the processes report through
        self._runs = 0

    def _kube_parts(self, runtime: str) -> list[str]:
        if self.driver == "cgroupfs":
            qos_dir = [] if self.qos == "guaranteed" else [self.qos]
            return ["kubepods", *qos_dir, f"pod{self.pod_uid}", self.container_id]
        uid = self.pod_uid.replace("-", "_")
        if self.qos == "guaranteed":
            return [
                "kubepods.slice",
                f"kubepods-pod{uid}.slice",
                f"{runtime}-{self.container_id}.scope",
            ]
        return [
            "kubepods.slice",
            f"kubepods-{self.qos}.slice",
            f"kubepods-{self.qos}-pod{uid}.slice",
            f"{runtime}-{self.container_id}.scope",
        ]

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> ThrowawayContainer:
        try:
            self._create()
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

    def _create(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="nodediag-oom-"))
        path = self.root
        for name in self._components:
            if self.version == 2:
                self._enable_memory_controller(path)
            path = path / name
            path.mkdir()  # never reuse an existing cgroup: FileExistsError is a bug
            self._created.append(path)
        leaf = self.fs_path
        if self.version == 1:
            _write(leaf / "memory.limit_in_bytes", str(self.limit_bytes))
            if (leaf / "memory.memsw.limit_in_bytes").exists():
                _write(leaf / "memory.memsw.limit_in_bytes", str(self.limit_bytes))
        else:
            _write(leaf / "memory.max", str(self.limit_bytes))
            if (leaf / "memory.swap.max").exists():
                _write(leaf / "memory.swap.max", "0")

    def _enable_memory_controller(self, cgroup: Path) -> None:
        """v2: ``+memory`` in ``cgroup.subtree_control`` unless already enabled (so a
        cgroup we did not create is written to only when memory is missing there)."""
        control = cgroup / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            _write(control, "+memory")

    def pids(self) -> list[int]:
        """Host pids currently in the container's cgroup."""
        try:
            text = (self.fs_path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def oom_kill_count(self) -> int:
        """The cgroup's ``oom_kill`` counter (v1 memory.oom_control, v2 memory.events)."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.fs_path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise RuntimeError(f"no oom_kill counter in {self.fs_path / name}")

    def cleanup(self) -> None:
        """Kill everything left in the cgroup, reap our children, remove created dirs."""
        if self._created:
            self._kill_all()
        for proc in self._procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        errors: list[str] = []
        for path in reversed(self._created):
            deadline = time.monotonic() + 5
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
                    self._kill_all(path)
                    time.sleep(0.01)
        self._created.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if errors:
            raise RuntimeError("could not remove test cgroups: " + "; ".join(errors))

    def _kill_all(self, cgroup: Path | None = None) -> None:
        cgroup = cgroup or self.fs_path
        kill_file = cgroup / "cgroup.kill"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
            except FileNotFoundError:
                return
            if not pids:
                return
            if kill_file.exists():
                _write(kill_file, "1")
            else:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    # -- running processes ---------------------------------------------------------------

    def _start(self, target: Target, sleepers: int, comm: str | None, alloc_factor: int) -> _Run:
        if not self._created or self._tmp is None:
            raise RuntimeError("use ThrowawayContainer as a context manager")
        unshare = shutil.which("unshare")
        if unshare is None:
            raise RuntimeError("unshare (util-linux) not found")
        self._runs += 1
        info = self._tmp / f"info{self._runs}"
        status = self._tmp / f"status{self._runs}"
        log = self._tmp / f"output{self._runs}"
        argv = [
            unshare, "--pid", "--fork", "--kill-child",
            "sh", "-c", _INIT_SCRIPT, "sh", str(self.fs_path / "cgroup.procs"),
            PYTHON, _ALLOCATOR, str(info), str(alloc_factor * self.limit_bytes), str(MiB),
            str(status), target, str(sleepers), *([comm] if comm else []),
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=out, stderr=out, close_fds=True
            )
        self._procs.append(proc)
        return _Run(proc, info, status, log)

    def oom_kill(
        self,
        target: Target = "child",
        timeout: float = 20,
        *,
        comm: str | None = None,
        alloc_factor: int = 4,
        pace: bool = True,
    ) -> OomOutcome:
        """Run a process tree in the cgroup and let the kernel OOM-kill one process.

        ``sh`` is PID 1 of a new pid namespace (like a container's init). ``"child"``: a
        forked allocator is killed, sh keeps running (``sleep 3600``). ``"init"``: PID 1
        itself is the allocator, the whole container dies. ``comm`` renames the victim
        (``/proc/self/comm``, the kernel truncates to 15 bytes).

        ``pace`` (default): wait, host-wide, until the kernel's OOM report ratelimit has room
        (see :func:`oom_ratelimit_slot`), so the full report including the ``oom-kill:``
        line is printed. ``pace=False`` lets tests provoke the suppressed form on purpose.
        """
        with oom_ratelimit_slot(enabled=pace):
            return self._oom_kill(target, timeout * TIMEOUT_SCALE, comm, alloc_factor)

    def _oom_kill(
        self, target: Target, timeout: float, comm: str | None, alloc_factor: int
    ) -> OomOutcome:
        deadline = time.monotonic() + timeout
        before = self.oom_kill_count()
        run = self._start(target, 0, comm, alloc_factor)
        victim, parent, victim_comm = run.read_info(deadline)
        init_pid = victim if target == "init" else parent
        run.go()
        if not _wait_exit(victim, deadline):
            raise TimeoutError(f"allocator {victim} still alive after {timeout}s")
        killed_at = time.time()
        if target == "child":
            rc = int(_wait_file(run.status, deadline, run.proc, run.log))
            if rc != 128 + signal.SIGKILL:
                raise RuntimeError(f"allocator {victim} exited with {rc}, not SIGKILL (137)")
        else:
            # unshare's own exit code is useless here: util-linux 2.38 cannot re-raise
            # SIGKILL on itself and exits 1 ("sigprocmask unblock failed"). The cgroup's
            # oom_kill counter below is the proof; the victim was its only process.
            try:
                run.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as e:
                raise TimeoutError("unshare did not exit after its init died") from e
        self._wait_oom_counter(before, deadline)
        return OomOutcome(victim, init_pid, victim_comm, killed_at)

    def oom_kill_group(
        self, n_children: int = 3, timeout: float = 20, *, alloc_factor: int = 4, pace: bool = True
    ) -> OomGroupOutcome:
        """cgroup v2 ``memory.oom.group=1``: one OOM kills every process of the container.

        sh (PID 1) starts ``n_children`` sleepers plus one allocator. Skips on cgroup v1,
        which has no memory.oom.group: a kernel feature really absent, in CI too.
        """
        if self.version != 2 or not (self.fs_path / "memory.oom.group").exists():
            pytest.skip(
                f"memory.oom.group needs the cgroup v2 memory controller; "
                f"{self.root} is cgroup v{self.version}"
            )
        _write(self.fs_path / "memory.oom.group", "1")
        with oom_ratelimit_slot(enabled=pace):
            return self._oom_kill_group(n_children, timeout * TIMEOUT_SCALE, alloc_factor)

    def _oom_kill_group(
        self, n_children: int, timeout: float, alloc_factor: int
    ) -> OomGroupOutcome:
        deadline = time.monotonic() + timeout
        before = self.oom_kill_count()
        run = self._start("child", n_children, None, alloc_factor)
        victim, init_pid, victim_comm = run.read_info(deadline)
        members = tuple(self.pids())
        run.go()
        for pid in members:
            if not _wait_exit(pid, deadline):
                raise TimeoutError(f"process {pid} survived the group OOM kill")
        killed_at = time.time()
        try:
            run.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as e:
            raise TimeoutError("unshare did not exit after its init died") from e
        self._wait_oom_counter(before, deadline)
        return OomGroupOutcome(victim, init_pid, victim_comm, members, killed_at)

    def _wait_oom_counter(self, before: int, deadline: float) -> None:
        while self.oom_kill_count() <= before:
            if time.monotonic() > deadline:
                raise RuntimeError("process died but the cgroup's oom_kill counter is unchanged")
            time.sleep(0.002)


# -- journald ------------------------------------------------------------------------------


def _systemd_is_pid1() -> bool:
    return Path("/proc/1/comm").read_text().strip() == "systemd"


def journald_pids() -> list[int]:
    """Pids of running (non-zombie) systemd-journald processes."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "systemd-journal":
                continue
        except OSError:
            continue
        if host_pid_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


@dataclass
class JournaldHandle:
    """A running systemd-journald; ``started`` says whether this process started it."""

    journal_dir: Path
    started: bool
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop journald if we started it (no-op otherwise)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def ensure_running(self) -> None:
        """Start journald again if it went away (e.g. a concurrent test session that had
        started it stopped it). A journald started here belongs to this handle."""
        if journald_pids():
            return
        self.stop()  # reap ours, if it was ours
        fresh = ensure_journald()
        self.journal_dir = fresh.journal_dir
        if fresh.started:
            self.process, self.started = fresh.process, True

    def restart(self) -> None:
        """Stop every running journald and start a fresh one (see :meth:`stop_all`)."""
        self.stop_all()
        self.start()

    def stop_all(self) -> None:
        """SIGTERM every running journald and wait for it to exit; on a host whose PID 1
        is systemd, ``systemctl stop`` it instead.

        journald remembers the last /dev/kmsg sequence number it stored
        (/run/systemd/journal/kernel-seqnum), so the next one goes on where it stopped:
        what the kernel logged meanwhile is ingested from the ring buffer.
        """
        if _systemd_is_pid1():
            subprocess.run(["systemctl", "stop", "systemd-journald"], check=True)
            return
        pids = journald_pids()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        self.stop()  # reaps ours
        deadline = time.monotonic() + 15
        while any(host_pid_alive(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"systemd-journald {pids} did not exit on SIGTERM")
            time.sleep(0.02)

    def start(self) -> None:
        """Start journald (it then belongs to this handle) and wait until it has ingested
        /dev/kmsg."""
        if _systemd_is_pid1():
            subprocess.run(["systemctl", "start", "systemd-journald"], check=True)
        fresh = ensure_journald()
        self.journal_dir = fresh.journal_dir
        if fresh.started:
            self.process, self.started = fresh.process, True

    def journal_files(self) -> list[Path]:
        return sorted(self.journal_dir.glob("*/*.journal*"))

    def rotate_and_vacuum(self) -> None:
        """``journalctl --rotate`` then ``--vacuum-files=1``: every file written so far is
        archived, then the archived ones are deleted."""
        subprocess.run(["journalctl", "--rotate"], check=True, capture_output=True)
        subprocess.run(
            ["journalctl", "-D", str(next(self.journal_dir.iterdir())), "--vacuum-files=1"],
            check=True,
            capture_output=True,
        )

    def wait_for_kernel_message(
        self, substring: str, timeout: float, since_realtime: float | None = None
    ) -> dict[str, Any]:
        """:func:`wait_for_kernel_message` on this journal, restarting journald if it died
        meanwhile (it re-reads the kernel's ring buffer, so nothing is lost)."""
        deadline = time.monotonic() + timeout
        while True:
            self.ensure_running()
            step = min(1.0, max(0.0, deadline - time.monotonic()))
            try:
                return wait_for_kernel_message(
                    substring, step, since_realtime, journal_dir=self.journal_dir
                )
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise


@contextlib.contextmanager
def _kernel_reader(journal_dir: Path | None) -> Iterator[Any]:
    from systemd import journal

    if journal_dir is None:
        reader = journal.Reader(journal.LOCAL_ONLY | journal.SYSTEM)
    else:
        reader = journal.Reader(path=str(journal_dir))
    try:
        reader.add_match(_TRANSPORT="kernel")
        yield reader
    finally:
        reader.close()


def wait_for_kernel_message(
    substring: str,
    timeout: float,
    since_realtime: float | None = None,
    *,
    journal_dir: Path | None = None,
) -> dict[str, Any]:
    """Poll the journal for a ``_TRANSPORT=kernel`` entry whose MESSAGE contains
    ``substring`` (received at or after ``since_realtime``, a ``time.time()`` value).

    Returns the entry's fields as python-systemd converts them (``__REALTIME_TIMESTAMP``
    is a datetime, ``SYSLOG_FACILITY`` an int, ...). ``journal_dir=None``: the local
    system journals. Raises TimeoutError.
    """
    deadline = time.monotonic() + timeout
    with _kernel_reader(journal_dir) as reader:
        if since_realtime is None:
            reader.seek_head()
        else:
            reader.seek_realtime(since_realtime)
        while True:
            entry = reader.get_next()
            while entry:
                message = entry.get("MESSAGE", "")
                if isinstance(message, bytes):
                    message = message.decode("utf-8", "replace")
                if substring in message:
                    return dict(entry)
                entry = reader.get_next()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no kernel journal entry containing {substring!r}")
            reader.wait(min(remaining, 0.05))


def ensure_journald(timeout: float = 30) -> JournaldHandle:
    """Make sure systemd-journald runs and has ingested /dev/kmsg.

    Starts ``/lib/systemd/systemd-journald`` standalone (no systemd PID 1 needed) if no
    journald runs. Readiness: a marker line written to /dev/kmsg (a userspace record,
    facility ``user``) is readable from the journal; journald reads /dev/kmsg in order, so
    everything logged before is ingested too. ``journal_dir`` is where the marker landed.
    """
    started: subprocess.Popen[bytes] | None = None
    # concurrent test sessions on one host: only one of them may start journald
    with open(JOURNALD_START_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not journald_pids():
            if not JOURNALD_BINARY.exists():
                raise FileNotFoundError(JOURNALD_BINARY)
            started = subprocess.Popen(
                [str(JOURNALD_BINARY)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
    try:
        deadline = time.monotonic() + timeout
        # Stale sockets from an earlier journald may exist: the socket existing is not
        # enough, so wait for the marker to come back through the journal.
        while not JOURNALD_SOCKET.exists():
            if started is not None and started.poll() is not None:
                raise RuntimeError(f"systemd-journald exited with {started.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{JOURNALD_SOCKET} did not appear")
            time.sleep(0.01)
        marker = f"nodediag-test journald-ready {uuid.uuid4()}"
        since = time.time() - 1  # journald stamps the marker when it reads it: later
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"<14>nodediag-test[{os.getpid()}]: {marker}\n")
        journal_dir = _find_marker(marker, since, deadline, started)
    except BaseException:
        if started is not None:
            JournaldHandle(Path(), True, started).stop()
        raise
    return JournaldHandle(journal_dir, started is not None, started)


def _find_marker(
    marker: str, since: float, deadline: float, started: subprocess.Popen[bytes] | None
) -> Path:
    while True:
        for directory in JOURNAL_DIRS:
            if not directory.is_dir():
                continue
            with contextlib.suppress(TimeoutError):
                wait_for_kernel_message(marker, 0, since, journal_dir=directory)
                return directory
        if started is not None and started.poll() is not None:
            raise RuntimeError(f"systemd-journald exited with {started.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError("journald did not ingest a /dev/kmsg marker")
        time.sleep(0.02)
