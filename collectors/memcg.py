"""Live view of a memory cgroup: which processes it holds and which is its pid-namespace init."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEAD_STATES = frozenset("ZXx")


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """A host process as /proc/<pid>/status shows it."""

    pid: int
    comm: str
    state: str
    ns_pid: int | None
    """The pid in the process's innermost pid namespace (last NSpid field)."""

    @property
    def alive(self) -> bool:
        return self.state[:1] not in DEAD_STATES

    @property
    def is_namespace_init(self) -> bool:
        """PID 1 of its own pid namespace (a container's init), not the host's init."""
        return self.ns_pid == 1 and self.pid != 1


def parse_status(pid: int, text: str) -> ProcessInfo:
    """Parse the fields we need from /proc/<pid>/status text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Name", "State", "NSpid"):
            fields[key] = value.strip()
    ns_pids = fields.get("NSpid", "").split()
    return ProcessInfo(
        pid=pid,
        comm=fields.get("Name", ""),
        state=fields.get("State", "?"),
        ns_pid=int(ns_pids[-1]) if ns_pids and ns_pids[-1].isdigit() else None,
    )


def memory_hierarchy(host_root: Path) -> Path:
    """The mount of the memory controller: cgroup v1 ``memory``, else the v2 root."""
    cgroup = host_root / "sys/fs/cgroup"
    v1 = cgroup / "memory"
    if (v1 / "cgroup.procs").exists():
        return v1
    return cgroup


class MemcgProbe:
    """Reads memory cgroups and processes of the host under ``host_root``."""

    def __init__(self, host_root: Path = Path("/")) -> None:
        self.proc = host_root / "proc"
        self.hierarchy = memory_hierarchy(host_root)

    def cgroup_dir(self, cgroup_path: str) -> Path:
        return self.hierarchy / cgroup_path.lstrip("/")

    def process(self, pid: int) -> ProcessInfo | None:
        try:
            return parse_status(pid, (self.proc / str(pid) / "status").read_text())
        except (OSError, ValueError):
            return None

    def members(self, cgroup_path: str) -> list[ProcessInfo] | None:
        """Live processes of the cgroup (and its children); ``None`` when it does not exist."""
        directory = self.cgroup_dir(cgroup_path)
        if not directory.is_dir():
            return None
        pids: set[int] = set()
        for procs in directory.glob("**/cgroup.procs"):
            try:
                pids.update(int(line) for line in procs.read_text().split())
            except (OSError, ValueError):
                continue
        found = (self.process(pid) for pid in sorted(pids))
        return [info for info in found if info is not None and info.alive]
