"""Turn an ``OomKill`` into a ``Finding``: attribute it, classify it by evidence, word it.

Classification is decided by facts, in this order, and ``details.basis`` says which:
1. a global OOM (``CONSTRAINT_NONE``/``global_oom``) is ``SystemOOMKill`` whoever the victim;
2. a memcg kill outside kubepods is ``NodeProcessOOMKill``;
3. a container kill is ``InvisibleOOMKill`` when the container survived and the victim was
   not its init, ``ContainerOOMKill`` when its init was killed, else ``OOMKill`` (unknown).
   Evidence, strongest first: containerd (the task's init pid is the victim, or the task
   runs on with another init), the node itself (the container's memory cgroup and its
   processes, read right after the kill; a cgroup found gone decides nothing: the
   container was deleted, by the kill or after it), a later OOM report of the same
   container (it was still there), the report's task table (the victim was the
   container's only process).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from agent.containers import ContainerLookup
from collectors.cgroup_path import PodCgroup, container_cgroup, parse_pod_cgroup
from collectors.containerd import ContainerInfo, TaskInfo
from collectors.finding import Finding, Subject
from collectors.memcg import MemcgProbe, ProcessInfo
from collectors.oom import OomKill
from collectors.oom_tasks import TaskRow

SETTLE_SECONDS = 0.3
SETTLE_STEP = 0.05


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: str
    scope: str
    basis: str
    init_pid: int | None = None


INVISIBLE = ("InvisibleOOMKill", "invisible")
CONTAINER = ("ContainerOOMKill", "container")
UNKNOWN = ("OOMKill", "unknown")
# Processes of the pod sandbox, in no container: the pause container's, CRI-O's monitor.
SANDBOX_PROCESSES = frozenset({"pause", "conmon"})
OOM_SCORE_ADJ_MIN = -1000  # "never kill": memory.oom.group kills spare such tasks


@dataclass(frozen=True, slots=True)
class Undecided:
    """What the node showed that decides nothing; said in the verdict's basis."""

    seen: str


CGROUP_GONE = (
    "the container's memory cgroup was gone when read: deleted after the kill (the pod "
    "removed, or the container's task ended, later or by this kill)"
)


class LiveEvidence:
    """Reads the node right after a kill to tell whether the container survived it.

    A container memory cgroup found empty right after the kill means the kill ended the
    container. One found gone does not: the container was deleted, by the kill or by
    anything after it (kubelet removes the containers of a deleted pod, containerd's shim
    the cgroup of an ended task), so the log decides.
    """

    def __init__(
        self,
        probe: MemcgProbe,
        window: float,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.probe = probe
        self.window = window
        self._sleep = sleep
        self._now = now

    def verdict(self, kill: OomKill, cgroup_path: str) -> Verdict | Undecided | None:
        """Decide from the cgroup now; ``Undecided`` when the node cannot tell but showed
        something worth saying, ``None`` when it cannot tell any more."""
        fresh = self._is_fresh(kill)
        victim = self.probe.process(kill.victim.pid) if fresh else None
        members = self._survivors(cgroup_path, kill.victim.pid)
        init = _namespace_init(members or ())
        if init is not None:
            return Verdict(
                *INVISIBLE,
                f"the container's init (pid {init.pid}, pid 1 in its namespace) is alive "
                "after the kill",
                init.pid,
            )
        if victim is not None and victim.is_namespace_init:
            return Verdict(
                *CONTAINER, "the victim was pid 1 of the container's pid namespace", victim.pid
            )
        if fresh and members:
            members = self._settle(cgroup_path, kill.victim.pid, members)
        if members:
            return Verdict(
                *INVISIBLE,
                f"the container's memory cgroup still holds {len(members)} live process(es) "
                "after the kill",
            )
        if not fresh:
            return None
        if members is None:
            return Undecided(CGROUP_GONE)
        return Verdict(*CONTAINER, "the container's memory cgroup was empty right after the kill")

    def _is_fresh(self, kill: OomKill) -> bool:
        if kill.time is None:
            return False
        return (self._now() - kill.time).total_seconds() <= self.window

    def _survivors(self, cgroup_path: str, victim_pid: int) -> list[ProcessInfo] | None:
        """The cgroup's live processes but the victim; ``None`` when the cgroup is gone."""
        members = self.probe.members(cgroup_path)
        if members is None:
            return None
        return [m for m in members if m.pid != victim_pid]

    def _settle(
        self, cgroup_path: str, victim_pid: int, members: list[ProcessInfo] | None
    ) -> list[ProcessInfo] | None:
        """Processes of a dying container linger for a moment: look again until they are
        gone (or the cgroup is)."""
        waited = 0.0
        while members and waited < SETTLE_SECONDS:
            self._sleep(SETTLE_STEP)
            waited += SETTLE_STEP
            members = self._survivors(cgroup_path, victim_pid)
        return members


def _namespace_init(members: Sequence[ProcessInfo]) -> ProcessInfo | None:
    return next((m for m in members if m.is_namespace_init), None)


def verdict_from_task(kill: OomKill, task: TaskInfo | None) -> Verdict | None:
    """Decide from containerd's task: its init pid and whether it still runs."""
    if task is None or task.pid == 0:
        return None
    killed = {kill.victim.pid} | {member.pid for member in kill.group_victims}
    if task.pid in killed:
        return Verdict(
            *CONTAINER,
            f"the victim was the container's init (containerd task pid {task.pid})"
            if task.pid == kill.victim.pid
            else f"memory.oom.group: the container's init (containerd task pid {task.pid}) "
            "was one of the processes killed",
            task.pid,
        )
    if task.status in ("RUNNING", "PAUSED", "PAUSING"):
        return Verdict(
            *INVISIBLE,
            f"containerd: the container's task still runs with init pid {task.pid}",
            task.pid,
        )
    # The init was not the victim, so it outlived the kill; that the container stopped
    # since (its pod deleted, or its init gave up after the loss) is another event. The
    # CRI said CONTAINER_RUNNING right after such a kill: an empty cgroup seen later must
    # not make it a container kill.
    return Verdict(
        *INVISIBLE,
        f"the victim was not the container's init (containerd task pid {task.pid}, "
        f"{task.status.lower() or 'stopped'} now)",
        task.pid,
    )


def verdict_from_log(
    kill: OomKill, later: Sequence[OomKill] = (), earlier: Sequence[OomKill] = ()
) -> Verdict:
    """Decide from the log alone.

    ``later`` and ``earlier`` are the log's other kills after and before this one in the
    file; a kill of the same container *after this one in time* shows that the container
    survived. Else a ``memory.oom.group`` kill of the container (or above), else the
    report's task table.
    """
    successor = _successor(kill, later, earlier)
    if successor is not None:
        when = successor.time.isoformat() if successor.time else f"uptime {successor.uptime}s"
        return Verdict(
            *INVISIBLE,
            f"a later OOM kill in the same container (pid {successor.victim.pid} at {when}) "
            "shows it kept running",
        )
    return (
        _verdict_from_group(kill)
        or verdict_from_table(kill)
        or Verdict(*UNKNOWN, "the log does not show whether the container survived the kill")
    )


def kill_container(kill: OomKill) -> str | None:
    """The container memory cgroup of a kill's victim (``None``: not in a container)."""
    memcg = kill.task_memcg or kill.group_memcg
    return container_cgroup(memcg) if memcg else None


def _successor(
    kill: OomKill, later: Sequence[OomKill], earlier: Sequence[OomKill]
) -> OomKill | None:
    """A kill of another process of the same container that happened after ``kill``: by
    the time stamps where both have one, else by the order in the file."""
    container = kill_container(kill)
    if container is None:
        return None

    def same_container(other: OomKill) -> bool:
        return other.victim.pid != kill.victim.pid and kill_container(other) == container

    for other in later:
        if same_container(other) and _compare_time(other, kill) in (1, 0, None):
            return other
    for other in earlier:
        if same_container(other) and _compare_time(other, kill) == 1:
            return other
    return None


def _compare_time(a: OomKill, b: OomKill) -> int | None:
    """1 if ``a`` happened after ``b``, -1 if before, 0 at the same time; ``None`` when the
    stamps cannot tell (one of them has none, or they are of different kinds)."""
    if a.time is not None and b.time is not None:
        return (a.time > b.time) - (a.time < b.time)
    if a.uptime is not None and b.uptime is not None:
        return (a.uptime > b.uptime) - (a.uptime < b.uptime)
    return None


def _verdict_from_group(kill: OomKill) -> Verdict | None:
    """A memory.oom.group kill of the container's memory cgroup, or of one above it
    (the pod's), killed every process in it: the container ended.

    The kernel spares only tasks with oom_score_adj -1000 (and the global init): when the
    report's table lists one outside the pod sandbox, the group kill proves nothing.
    """
    group = kill.group_memcg
    container = kill_container(kill)
    if group is None or container is None:
        return None
    if container != group and not container.startswith(group.rstrip("/") + "/"):
        return None  # a cgroup nested inside the container: only part of it was killed
    spared = [
        row
        for row in kill.tasks or ()
        if row.oom_score_adj == OOM_SCORE_ADJ_MIN and row.name not in SANDBOX_PROCESSES
    ]
    if spared:
        return None
    where = "the container's memory cgroup" if group == container else "a cgroup above it"
    return Verdict(
        *CONTAINER,
        f"memory.oom.group: the kernel killed every process of {group} ({where}), "
        f"{len(kill.group_victims)} process(es)",
    )


def verdict_from_table(kill: OomKill) -> Verdict | None:
    """Decide from the report's task table (the processes of the OOM memory cgroup).

    Which rows are the victim's container: when the limit hit was the container's own
    (or one inside it), every row is; when it was the pod's (or above), the sandbox's
    processes (``pause``, CRI-O's ``conmon``) belong to no container and the table does
    not say which container any other row is in. The kernel lists a memory cgroup's
    processes in the order they joined it, so a container's init (its first process)
    is listed before the processes it started.
    """
    if kill.tasks is None or kill.oom_memcg is None or kill.task_memcg is None:
        return None
    container = container_cgroup(kill.task_memcg)
    victim = _victim_row(kill)
    if container is None or victim is None:
        return None
    processes = _processes(kill.tasks)
    others = [row for row in processes if _process_id(row) != _process_id(victim)]
    oom_memcg = kill.oom_memcg.rstrip("/")
    if oom_memcg == container or oom_memcg.startswith(container + "/"):
        before = processes[: processes.index(victim)]
        return _container_table_verdict(others, before, whole=oom_memcg == container)
    if not container.startswith(oom_memcg + "/"):
        return None
    others = [row for row in others if row.name not in SANDBOX_PROCESSES]
    level = "the pod's" if _is_pod_cgroup(oom_memcg) else "above the pod"
    if not others:
        return Verdict(
            *CONTAINER,
            f"the report's task table ({oom_memcg}, {level}) lists no process but the "
            "victim outside the pod sandbox (pause, conmon): it was its container's only "
            "process",
        )
    return Verdict(
        *UNKNOWN,
        f"the report's task table ({oom_memcg}, {level}) lists {len(others)} other "
        f"process(es) ({_names(others)}) and does not say which container each is in",
    )


def _container_table_verdict(
    others: list[TaskRow], before: list[TaskRow], *, whole: bool
) -> Verdict | None:
    """The table lists only the container's processes (``whole``: all of them); ``before``
    are those listed before the victim."""
    if not others:
        if not whole:
            return None  # the container may have processes outside the cgroup that hit
        return Verdict(
            *CONTAINER,
            "the victim was the only process in the container's memory cgroup "
            "(the report's task table)",
        )
    if not before:
        return Verdict(
            *UNKNOWN,
            f"the report's task table lists the victim first of its container's "
            f"{len(others) + 1} processes: it may have been the container's init",
        )
    return Verdict(
        *INVISIBLE,
        f"the report's task table lists {len(others)} other process(es) of the container, "
        f"which the kernel did not kill ({_names(others)}); the victim was listed after "
        f"{before[0].name} (pid {_process_id(before[0])}), so it was not the container's init",
    )


def _process_id(row: TaskRow) -> int:
    return row.tgid if row.tgid is not None else row.pid


def _processes(rows: Sequence[TaskRow]) -> list[TaskRow]:
    """One row per process (the first of its thread group), in table order."""
    seen: set[int] = set()
    processes = []
    for row in rows:
        if _process_id(row) not in seen:
            seen.add(_process_id(row))
            processes.append(row)
    return processes


def _victim_row(kill: OomKill) -> TaskRow | None:
    pid = kill.victim.pid
    return next((row for row in _processes(kill.tasks or ()) if pid in (row.pid, row.tgid)), None)


def _is_pod_cgroup(memcg: str) -> bool:
    pod = parse_pod_cgroup(memcg)
    return pod is not None and pod.container_id is None


def _names(rows: Sequence[TaskRow], shown: int = 5) -> str:
    names = ", ".join(f"{row.name} (pid {_process_id(row)})" for row in rows[:shown])
    return names + (f" and {len(rows) - shown} more" if len(rows) > shown else "")


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who the kill hit: the pod cgroup (ids) and what containerd adds (names, task)."""

    pod: PodCgroup | None
    container: ContainerInfo | None = None
    task: TaskInfo | None = None


class PodNames(Protocol):
    """A second source of names when containerd cannot tell (``agent.pod_lookup``)."""

    def container_info(
        self, pod_uid: str | None, container_id: str | None
    ) -> ContainerInfo | None: ...


class OomFindings:
    """Builds findings for one node; ``live``, ``containers`` and ``pods`` are ``None``
    offline."""

    def __init__(
        self,
        node: str,
        live: LiveEvidence | None,
        containers: ContainerLookup | None = None,
        pods: PodNames | None = None,
    ) -> None:
        self.node = node
        self.live = live
        self.containers = containers
        self.pods = pods

    def finding(
        self,
        kill: OomKill,
        later: Sequence[OomKill] = (),
        *,
        earlier: Sequence[OomKill] = (),
        counter_memcg: str | None = None,
        candidates: Sequence[str] = (),
    ) -> Finding:
        """``later``/``earlier``: the log's other kills after/before this one (file order);
        ``counter_memcg``: a header-less kill's container, from the memory cgroups'
        ``oom_kill`` counters (``agent.oom_counters``); ``candidates``: the containers it
        may belong to when the counters cannot tell which."""
        memcg = kill.task_memcg or kill.group_memcg or counter_memcg
        who = self._attribute(memcg)
        verdict = self._verdict(kill, memcg, who, later, earlier)
        if counter_memcg is not None and memcg == counter_memcg:
            verdict = Verdict(
                verdict.reason,
                verdict.scope,
                f"the kernel printed no memory cgroup (report rate-limited); its memory "
                f"cgroup's oom_kill counter rose, and no other container's did unaccounted; "
                f"{verdict.basis}",
                verdict.init_pid,
            )
        elif candidates:
            verdict = Verdict(
                verdict.reason,
                verdict.scope,
                f"{verdict.basis}; the oom_kill counters of {len(candidates)} containers "
                "rose, so which one is not known (each is counted from its own counter)",
                verdict.init_pid,
            )
        subject = _subject(who) if who.pod else Subject(kind="Node", name=self.node)
        details = _details(kill, verdict, who)
        if counter_memcg is not None:
            details["memcg"] = memcg
            details["memcg_source"] = "oom_kill counter"
        if candidates:
            details["candidates"] = list(candidates)
        return Finding(
            reason=verdict.reason,
            severity="warning",
            time=kill.time,
            node=self.node,
            subject=subject,
            message=_message(kill, verdict, subject, self.node),
            details=details,
        )

    def for_log(self, kills: Sequence[OomKill]) -> list[Finding]:
        """The findings of a log's kills (in file order), each judged with the others of
        its container: a later one shows that the container survived."""
        containers = [kill_container(kill) for kill in kills]
        by_container: dict[str | None, list[OomKill]] = {}
        place: list[int] = []  # each kill's index among its container's kills
        for kill, container in zip(kills, containers, strict=True):
            same = by_container.setdefault(container, [])
            place.append(len(same))
            same.append(kill)
        return [
            self.finding(kill, later=same[i + 1 :], earlier=same[:i])
            for kill, container, i in zip(kills, containers, place, strict=True)
            for same in (by_container[container],)
        ]

    def subject_for(self, memcg: str) -> Subject:
        """Who a container memory cgroup belongs to (for counts taken from its counter)."""
        who = self._attribute(memcg)
        return _subject(who) if who.pod else Subject(kind="Node", name=self.node)

    def _attribute(self, memcg: str | None) -> Attribution:
        pod = parse_pod_cgroup(memcg) if memcg else None
        if pod is None:
            return Attribution(pod)
        container = task = None
        if pod.container_id is not None and self.containers is not None:
            container = self.containers.container(pod.container_id)
            # A container containerd no longer has may still be known from its task's start.
            task = (
                self.containers.task(pod.container_id)
                if container is not None
                else self.containers.started_task(pod.container_id)
            )
        if container is None and self.pods is not None:
            # containerd down or without this container: the API's pod watch may name it.
            container = self.pods.container_info(pod.pod_uid, pod.container_id)
        return Attribution(pod, container, task)

    def _verdict(
        self,
        kill: OomKill,
        memcg: str | None,
        who: Attribution,
        later: Sequence[OomKill],
        earlier: Sequence[OomKill],
    ) -> Verdict:
        pod = who.pod
        if kill.is_global:
            return Verdict(
                "SystemOOMKill",
                "system",
                f"global OOM: the node ran out of memory ({kill.constraint or 'global_oom'})",
            )
        if memcg is None:
            return Verdict(
                *UNKNOWN,
                "the kernel printed no memory cgroup for this kill (its report header was "
                "rate-limited or cut off): which container, if any, is unknown",
            )
        if pod is None:
            return Verdict(
                "NodeProcessOOMKill", "node", f"memory cgroup {memcg} is outside kubepods"
            )
        if pod.container_id is None:
            return Verdict(*UNKNOWN, "the memory cgroup is the pod's, not one container's")
        by_task = verdict_from_task(kill, who.task)
        if by_task is not None:
            return by_task
        live = self.live.verdict(kill, memcg) if self.live is not None else None
        if isinstance(live, Verdict):
            return live
        by_log = verdict_from_log(kill, later, earlier)
        if isinstance(live, Undecided):
            return Verdict(
                by_log.reason, by_log.scope, f"{live.seen}; {by_log.basis}", by_log.init_pid
            )
        return by_log


def _subject(who: Attribution) -> Subject:
    # The cgroup path gives the ids; names come from containerd's CRI labels.
    assert who.pod is not None
    info = who.container
    return Subject(
        kind="Pod",
        name=info.pod_name if info else None,
        namespace=info.pod_namespace if info else None,
        uid=(info.pod_uid if info and info.pod_uid else who.pod.pod_uid),
        container=info.container_name if info else None,
        container_id=who.pod.container_id,
    )


def _message(kill: OomKill, verdict: Verdict, subject: Subject, node: str) -> str:
    victim = f"process {kill.victim.comm} (pid {kill.victim.pid})"
    if kill.is_group:
        victim = (
            f"{len(kill.group_victims)} processes of memory cgroup {kill.group_memcg} "
            f"(memory.oom.group), first {victim},"
        )
    where = _where(subject, node)
    limit = (
        f" at its memory limit of {kill.memcg_limit_kb // 1024} MiB"
        if kill.memcg_limit_kb and not kill.is_global
        else ""
    )
    text = {
        "InvisibleOOMKill": f"{victim} in {where} was OOM-killed{limit}; the container kept "
        "running, so Kubernetes shows no OOMKilled and no restart. Raise the container's "
        "memory limit or fix the process's memory use",
        "ContainerOOMKill": (
            f"{victim} in {where} were OOM-killed together{limit}"
            if kill.is_group
            else f"the init {victim} of {where} was OOM-killed{limit}"
        )
        + "; the container ended (Kubernetes shows OOMKilled). Raise its memory limit or fix "
        "its memory use",
        "OOMKill": f"{victim} in {where} was OOM-killed{limit}; whether the container "
        "survived is unknown"
        if subject.kind == "Pod"
        else f"{victim} on node {node} was killed at a memory cgroup limit; the kernel "
        "printed no memory cgroup, so which container (if any) is unknown",
        "SystemOOMKill": f"{victim} in {where} was killed because node {node} ran out of "
        "memory. Check node memory requests/limits and system reservations",
        "NodeProcessOOMKill": f"{victim} in {where} was OOM-killed{limit}. Raise that "
        "service's memory limit or fix its memory use",
    }
    return text[verdict.reason]


def _where(subject: Subject, node: str) -> str:
    if subject.kind == "Node":
        return f"node {node}"
    if subject.container:
        container = f"container {subject.container}"
    elif subject.container_id:
        container = f"container {subject.container_id[:12]}"
    else:
        container = "a container"
    if subject.name:
        return f"{container} of pod {subject.namespace}/{subject.name}"
    return f"{container} of pod uid {subject.uid}"


def _details(kill: OomKill, verdict: Verdict, who: Attribution) -> dict[str, Any]:
    victim = kill.victim
    pod = who.pod
    details: dict[str, Any] = {
        "scope": verdict.scope,
        "pid": victim.pid,
        "comm": victim.comm,
        "uid": victim.uid,
        "memcg": kill.task_memcg,
        "oom_memcg": kill.oom_memcg,
        "constraint": kill.constraint,
        "trigger": {"comm": kill.trigger_comm, "pid": kill.trigger_pid},
        "anon_rss_kb": victim.anon_rss_kb,
        "file_rss_kb": victim.file_rss_kb,
        "shmem_rss_kb": victim.shmem_rss_kb,
        "total_vm_kb": victim.total_vm_kb,
        "oom_score_adj": victim.oom_score_adj,
        "memory_limit_kb": kill.memcg_limit_kb,
        "qos_class": pod.qos if pod else None,
        "runtime": pod.runtime if pod else None,
        "init_pid": verdict.init_pid,
        "image": (who.container.image or None) if who.container else None,
        "basis": verdict.basis,
        "uptime": kill.uptime,
        "complete": kill.complete,
        "year_inferred": kill.year_inferred,
    }
    if kill.is_group:
        details["group_memcg"] = kill.group_memcg
        details["group_victims"] = [{"pid": v.pid, "comm": v.comm} for v in kill.group_victims]
    return details
