"""Live view of a memory cgroup: which processes it holds and which is its pid-namespace init."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from collectors.cgroup_path import parse_pod_cgroup

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


OOM_KILL_FILES_V1 = ("memory.oom_control",)
# v2: memory.events counts the cgroup's kills and its descendants' (a container's nested
# cgroups are the container's), memory.events.local only its own: the walk stops at the
# container level, so the hierarchical one is wanted; .local is the fallback.
OOM_KILL_FILES_V2 = ("memory.events", "memory.events.local")


def parse_oom_kill_counter(text: str) -> int | None:
    """The ``oom_kill N`` line of memory.oom_control / memory.events[.local]."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            value = value.strip()
            # A 64-bit counter: ASCII digits ("²" passes isdigit() but not int()), at most 20.
            return int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else None
    return None


# Names of cgroup control files: "<controller or cgroup>.<file>", plus a few bare ones.
# The walk tells child cgroups from control files by name, not by a stat of each of the
# ~35 files every cgroup directory holds (the walk runs twice a second after a kill).
_CONTROL_PREFIXES = frozenset(
    {
        "cgroup", "memory", "cpu", "cpuacct", "cpuset", "io", "blkio", "pids", "hugetlb",
        "rdma", "misc", "devices", "freezer", "net_cls", "net_prio", "perf_event",
    }
)  # fmt: skip
_CONTROL_FILES = frozenset({"tasks", "notify_on_release", "release_agent"})


def _child_cgroups(directory: str, *, top: bool = False) -> list[str]:
    """Names in a cgroup directory that may be child cgroups (control files left out).
    Raises OSError only for the ``top`` of the walk (the hierarchy is not there)."""
    try:
        names = os.listdir(directory)
    except OSError:  # removed meanwhile, or not a directory after all
        if top:
            raise
        return []
    children = []
    for name in names:
        head, dot, _ = name.partition(".")
        if (dot and head in _CONTROL_PREFIXES) or name in _CONTROL_FILES:
            continue
        children.append(name)
    return children


def read_oom_kill_counters(hierarchy: Path) -> dict[str, int]:
    """The ``oom_kill`` counter of every container memory cgroup under ``hierarchy``.

    Keys are cgroup paths as the kernel prints them (``/kubepods/…/<id>``, with any
    nesting prefix). One walk of the hierarchy; below a container cgroup nothing is
    read (its own counter is the container's). Unreadable cgroups (removed while walking)
    are skipped; an unreadable ``hierarchy`` is an OSError (not "no containers"). cgroup v1
    counters are per memcg; on v2 ``memory.events`` (hierarchical).
    """
    v1 = (hierarchy / "memory.oom_control").exists() or hierarchy.name == "memory"
    names = OOM_KILL_FILES_V1 if v1 else OOM_KILL_FILES_V2
    counters: dict[str, int] = {}
    stack: list[tuple[str, str]] = [(str(hierarchy), "")]
    while stack:
        directory, cgroup = stack.pop()
        for name in _child_cgroups(directory, top=not cgroup):
            path = f"{cgroup}/{name}"
            pod = parse_pod_cgroup(path) if "kubepods" in path else None
            if pod is None or pod.container_id is None:
                stack.append((f"{directory}/{name}", path))
                continue
            value = _read_counter(f"{directory}/{name}", names)
            if value is not None:
                counters[path] = value
    return counters


def _read_counter(directory: str, names: tuple[str, ...]) -> int | None:
    for name in names:
        try:
            fd = os.open(f"{directory}/{name}", os.O_RDONLY)
        except OSError:
            continue
        try:
            text = os.read(fd, 4096).decode("ascii", "replace")
        except OSError:
            continue
        finally:
            os.close(fd)
        value = parse_oom_kill_counter(text)
        if value is not None:
            return value
    return None


def read_oom_kill_counter(hierarchy: Path, cgroup_path: str) -> int | None:
    """One cgroup's ``oom_kill`` counter; ``None`` when it is gone or has none."""
    directory = hierarchy / cgroup_path.lstrip("/")
    v1 = (hierarchy / "memory.oom_control").exists() or hierarchy.name == "memory"
    return _read_counter(str(directory), OOM_KILL_FILES_V1 if v1 else OOM_KILL_FILES_V2)
