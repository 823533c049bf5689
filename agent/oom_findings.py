"""Turn an ``OomKill`` into a ``Finding``: attribute it, classify it by evidence, word it.

Classification is decided by facts, in this order, and ``details.basis`` says which:
1. a global OOM (``CONSTRAINT_NONE``/``global_oom``) is ``SystemOOMKill`` whoever the victim;
2. a memcg kill outside kubepods is ``NodeProcessOOMKill``;
3. a container kill is ``InvisibleOOMKill`` when the container survived and the victim was
   not its init, ``ContainerOOMKill`` when its init was killed, else ``OOMKill`` (unknown).
   Evidence, strongest first: containerd (the task's init pid is the victim, or the task
   runs on with another init), the node itself (the container's memory cgroup and its
   processes, read right after the kill), a later OOM report of the same container (it was
   still there), the report's task table (the victim was the container's only process).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from agent.containers import ContainerLookup
from collectors.cgroup_path import PodCgroup, parse_pod_cgroup
from collectors.containerd import ContainerInfo, TaskInfo
from collectors.finding import Finding, Subject
from collectors.memcg import MemcgProbe, ProcessInfo
from collectors.oom import OomKill

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


class LiveEvidence:
    """Reads the node right after a kill to tell whether the container survived it."""

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

    def verdict(self, kill: OomKill, cgroup_path: str) -> Verdict | None:
        """Decide from the cgroup now; ``None`` when the node cannot tell any more."""
        fresh = self._is_fresh(kill)
        victim = self.probe.process(kill.victim.pid) if fresh else None
        members = self._survivors(cgroup_path, kill.victim.pid)
        init = _namespace_init(members)
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
        if fresh:
            members = self._settle(cgroup_path, kill.victim.pid, members)
        if members:
            return Verdict(
                *INVISIBLE,
                f"the container's memory cgroup still holds {len(members)} live process(es) "
                "after the kill",
            )
        if fresh:
            return Verdict(
                *CONTAINER, "the container's memory cgroup was empty right after the kill"
            )
        return None

    def _is_fresh(self, kill: OomKill) -> bool:
        if kill.time is None:
            return False
        return (self._now() - kill.time).total_seconds() <= self.window

    def _survivors(self, cgroup_path: str, victim_pid: int) -> list[ProcessInfo]:
        members = self.probe.members(cgroup_path) or []
        return [m for m in members if m.pid != victim_pid]

    def _settle(
        self, cgroup_path: str, victim_pid: int, members: list[ProcessInfo]
    ) -> list[ProcessInfo]:
        """Processes of a dying container linger for a moment: look again until they are gone."""
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
    if task.pid == kill.victim.pid:
        return Verdict(
            *CONTAINER,
            f"the victim was the container's init (containerd task pid {task.pid})",
            task.pid,
        )
    if task.status in ("RUNNING", "PAUSED", "PAUSING"):
        return Verdict(
            *INVISIBLE,
            f"containerd: the container's task still runs with init pid {task.pid}",
            task.pid,
        )
    return None


def verdict_from_log(kill: OomKill, later: Sequence[OomKill]) -> Verdict:
    """Decide from the log alone: later reports of the same container, else the task table."""
    successor = next(
        (k for k in later if k.task_memcg == kill.task_memcg and k.victim.pid != kill.victim.pid),
        None,
    )
    if successor is not None:
        when = successor.time.isoformat() if successor.time else f"uptime {successor.uptime}s"
        return Verdict(
            *INVISIBLE,
            f"a later OOM kill in the same container (pid {successor.victim.pid} at {when}) "
            "shows it kept running",
        )
    if kill.tasks is not None and kill.oom_memcg == kill.task_memcg:
        processes = {row.tgid if row.tgid is not None else row.pid for row in kill.tasks}
        if processes == {kill.victim.pid}:
            return Verdict(
                *CONTAINER,
                "the victim was the only process in the container's "
                "memory cgroup (the report's task table)",
            )
    return Verdict(*UNKNOWN, "the log does not show whether the container survived the kill")


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
        counter_memcg: str | None = None,
        candidates: Sequence[str] = (),
    ) -> Finding:
        """``counter_memcg``: a header-less kill's container, from the memory cgroups'
        ``oom_kill`` counters (``agent.oom_counters``); ``candidates``: the containers it
        may belong to when the counters cannot tell which."""
        memcg = kill.group_memcg or kill.task_memcg or counter_memcg
        who = self._attribute(memcg)
        verdict = self._verdict(kill, memcg, who, later)
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
            task = self.containers.task(pod.container_id) if container is not None else None
        if container is None and self.pods is not None:
            # containerd down or without this container: the API's pod watch may name it.
            container = self.pods.container_info(pod.pod_uid, pod.container_id)
        return Attribution(pod, container, task)

    def _verdict(
        self, kill: OomKill, memcg: str | None, who: Attribution, later: Sequence[OomKill]
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
                "the kernel printed no memory cgroup for this kill "
                "(its report header was rate-limited or cut off)",
            )
        if pod is None:
            return Verdict(
                "NodeProcessOOMKill", "node", f"memory cgroup {memcg} is outside kubepods"
            )
        if pod.container_id is None:
            return Verdict(*UNKNOWN, "the memory cgroup is the pod's, not one container's")
        by_task = verdict_from_task(kill, who.task) if not kill.is_group else None
        if by_task is not None:
            return by_task
        if self.live is not None:
            live = self.live.verdict(kill, memcg)
            if live is not None:
                return live
        return verdict_from_log(kill, later)


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
        "ContainerOOMKill": f"the init {victim} of {where} was OOM-killed{limit}; the container "
        "ended (Kubernetes shows OOMKilled). Raise its memory limit or fix its memory use",
        "OOMKill": f"{victim} in {where} was OOM-killed{limit}; whether the container "
        "survived is unknown",
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
    }
    if kill.is_group:
        details["group_memcg"] = kill.group_memcg
        details["group_victims"] = [{"pid": v.pid, "comm": v.comm} for v in kill.group_victims]
    return details
