"""An OOM storm on real kernel memory cgroups: many containers whose init keeps forking
allocators, so the kernel OOM-kills fast and rate-limits its reports (most kills are then
logged only as ``Memory cgroup out of memory: Killed process …``, without a memory cgroup).

Shared by tests/test_storm.py, tests/test_kernel_log_faults.py and bench/storm.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import realkernel
from agentproc import RunningAgent

# PID 1 of a new pid namespace: joins the container's cgroup, then runs ``$2`` allocators
# one after the other (``dd`` with a buffer twice the cgroup's limit: the kernel kills it,
# sh survives), ``$3`` seconds apart, the first after ``$6`` seconds, then sleeps (the
# container keeps running).
_STORM_INIT = r"""
echo 0 > "$1" || exit 125
[ "$6" = 0 ] || sleep "$6"
i=0
while [ "$i" -lt "$2" ]; do
    dd if=/dev/zero of=/dev/null bs=$5 count=1 2>/dev/null
    i=$((i+1))
    [ "$3" = 0 ] || sleep "$3"
done
echo done > "$4"
exec sleep 3600
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class StormResult:
    containers: list[realkernel.ThrowawayContainer]
    deltas: dict[str, int]  # container id -> oom_kill counter rise
    seconds: float

    @property
    def kills(self) -> int:
        return sum(self.deltas.values())


class Storm:
    """``n`` throwaway containers, each killed ``per_container`` times, ``gap`` seconds
    apart; all at once, or (``stagger``) container ``i`` starts ``i * stagger / n`` seconds
    after the first: a steady ``n / stagger`` kills per second when ``gap == stagger``."""

    def __init__(
        self,
        n: int = 20,
        per_container: int = 50,
        gap: float = 0.0,
        limit_mib: int = 8,
        stagger: float = 0.0,
    ) -> None:
        self.limit_mib = limit_mib
        self.stagger = stagger
        self.n = n
        self.per_container = per_container
        self.gap = gap
        self.containers: list[realkernel.ThrowawayContainer] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._done: list[Path] = []
        self._before: dict[str, int] = {}
        self._started = 0.0

    def __enter__(self) -> Storm:
        prefix = "nodediag-storm-" + os.urandom(3).hex()
        for _ in range(self.n):
            container = realkernel.ThrowawayContainer(
                prefix=f"{prefix}-{len(self.containers)}",
                limit_bytes=self.limit_mib * realkernel.MiB,
            )
            container.__enter__()
            self.containers.append(container)
            self._before[container.container_id] = container.oom_kill_count()
        return self

    def start(self) -> None:
        unshare = shutil.which("unshare")
        assert unshare is not None
        self._started = time.monotonic()
        for index, container in enumerate(self.containers):
            done = Path(f"/tmp/nodediag-storm-{os.getpid()}-{id(self)}-{index}")
            done.unlink(missing_ok=True)
            self._done.append(done)
            argv = [
                unshare, "--pid", "--fork", "--kill-child", "sh", "-c", _STORM_INIT, "sh",
                str(container.fs_path / "cgroup.procs"), str(self.per_container),
                str(self.gap), str(done), f"{2 * self.limit_mib}M",
                f"{index * self.stagger / self.n:.3f}" if self.stagger else "0",
            ]  # fmt: skip
            self._procs.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def wait(self, timeout: float = 120) -> StormResult:
        deadline = time.monotonic() + timeout
        while not all(done.exists() for done in self._done):
            if time.monotonic() > deadline:
                raise TimeoutError("storm did not finish")
            time.sleep(0.05)
        seconds = time.monotonic() - self._started
        return StormResult(self.containers, self.deltas(), seconds)

    def deltas(self) -> dict[str, int]:
        return {
            c.container_id: c.oom_kill_count() - self._before[c.container_id]
            for c in self.containers
        }

    def stop(self) -> None:
        """End the kills now (the containers stay until ``__exit__``)."""
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        for done in self._done:
            done.unlink(missing_ok=True)
        errors = []
        for container in self.containers:
            try:
                container.cleanup()
            except RuntimeError as error:
                errors.append(str(error))
        if errors:
            raise RuntimeError("; ".join(errors))


@contextlib.contextmanager
def exclusive_oom() -> Iterator[None]:
    """Hold the host-wide test OOM lock: no other test's kill lands in our counts."""
    with realkernel.oom_ratelimit_slot(enabled=False):
        yield


def wait_quiet(agent: RunningAgent, quiet: float = 1.5, timeout: float = 60) -> float:
    """Wait until the agent's kill counter stops moving (its backlog is read); its value."""
    deadline = time.monotonic() + timeout
    last = agent.metric("nodediag_oom_kills_total")
    since = time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise TimeoutError(f"kill counter still moving: {agent.log()}")
        time.sleep(0.25)
        value = agent.metric("nodediag_oom_kills_total")
        if value != last:
            last, since = value, time.monotonic()
    return last
