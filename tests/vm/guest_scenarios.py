"""OOM scenarios on cgroup v2, run inside the VM lane's guest (tests/test_vm_lane.py boots
it: Debian's kernel, cgroup2 with the memory controller, no swap, nothing else running).

Each scenario makes real OOM kills, reads the kernel's own counters (``memory.events``:
``oom_kill``, ``oom_group_kill``) and what two running agents found (one reading the
journal, one /dev/kmsg), asserts on both, and appends a record to
``$NODEDIAG_VM_LANE/scenarios.jsonl``; the host asserts on the records again. The last
tests run ``nodediag scan`` over both sources (from the log alone it must reach the same
verdicts) and save the kernel's ring buffer (``kmsg.txt``) for vectors.

Not collected on the host (the file name does not match ``test_*.py``): the lane names it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import realkernel
import stormkit
from agentproc import RunningAgent, json_lines, nodediag

from agent.settings import Settings

pytestmark = pytest.mark.root

MakeContainer = Callable[..., realkernel.ThrowawayContainer]
Agents = dict[str, RunningAgent]
SOURCES = ("journal", "kmsg")
LANE = Path(os.environ.get("NODEDIAG_VM_LANE", "/nonexistent"))
#: The agent's hold for a group line after a ``Killed process`` (its idle flush, default).
HOLD_MS = Settings().idle_flush_seconds * 1000
SETTLE = 3.0  # seconds the agents get after a first finding, for any second one
FINDING_WAIT = 60.0  # TCG is slow: a kill reaches the agents within seconds, not ms

#: container id -> the reason the agents must give it (filled as scenarios run)
EXPECTED: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def guest_only() -> None:
    if not os.environ.get("NODEDIAG_VM_GUEST"):
        pytest.skip("runs inside the VM lane's guest (tests/test_vm_lane.py boots it)")
    if realkernel.memory_cgroup_root()[1] != 2:
        pytest.fail("the guest must run cgroup v2", pytrace=False)


@pytest.fixture(scope="module")
def agents(
    journald: realkernel.JournaldHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agents]:
    """``nodediag run`` on each kernel log source, for the whole module."""
    running: Agents = {}
    try:
        for source in SOURCES:
            args = ["--kernel-log", source, "--no-kube", "--node-name", "vm-lane"]
            if source == "journal":
                args += ["--journal-path", str(journald.journal_dir)]
            state = tmp_path_factory.mktemp(f"state-{source}")
            running[source] = RunningAgent([*args, "--state-dir", str(state)])
        for agent in running.values():
            agent.wait_ready(timeout=120)
        yield running
    finally:
        for source, agent in running.items():
            assert agent.stop() == 0, f"{source}: {agent.log()}"


def memory_events(container: realkernel.ThrowawayContainer) -> dict[str, int]:
    text = (container.fs_path / "memory.events").read_text()
    return {key: int(value) for key, value in (line.split() for line in text.splitlines())}


def findings_of(agents: Agents, container: realkernel.ThrowawayContainer) -> dict[str, list[Any]]:
    """Every finding each agent made for the container: after the first, ``SETTLE`` more
    seconds for a second one (there must be none)."""
    for agent in agents.values():
        agent.wait_finding(container.container_id, timeout=FINDING_WAIT)
    time.sleep(SETTLE)
    return {source: agent.findings_for(container.container_id) for source, agent in agents.items()}


def record(
    scenario: str,
    container: realkernel.ThrowawayContainer,
    found: dict[str, list[Any]] | None = None,
    **facts: Any,
) -> None:
    """One line of scenarios.jsonl; ``found``: each source's reasons and their basis."""
    line = {
        "scenario": scenario,
        "kernel": platform.release(),
        "cgroup": container.cgroup_path,
        "container_id": container.container_id,
        **facts,
    }
    if found is not None:
        line["findings"] = summary(found)
        line["basis"] = {s: [f["details"]["basis"] for f in items] for s, items in found.items()}
    with open(LANE / "scenarios.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def summary(found: dict[str, list[Any]]) -> dict[str, list[str]]:
    return {source: [f["reason"] for f in items] for source, items in found.items()}


def _one_finding_each(found: dict[str, list[Any]], reason: str) -> list[dict[str, Any]]:
    for source, items in found.items():
        assert [f["reason"] for f in items] == [reason], (source, items)
    return [items[0] for items in found.values()]


@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_child_kill_without_oom_group_is_invisible(
    agents: Agents, throwaway_container: MakeContainer, driver: str
) -> None:
    c = throwaway_container(qos="burstable", driver=driver)
    (c.fs_path / "memory.oom.group").write_text("0")
    kill = c.oom_kill("child", timeout=20)
    events = memory_events(c)
    found = findings_of(agents, c)
    record(f"child, oom.group=0, {driver}", c, found, memory_events=events)
    EXPECTED[c.container_id] = "InvisibleOOMKill"

    assert (events["oom_kill"], events["oom_group_kill"]) == (1, 0)
    assert kill.init_pid in c.pids()
    for finding in _one_finding_each(found, "InvisibleOOMKill"):
        assert finding["subject"]["uid"] == c.pod_uid
        assert finding["details"]["pid"] == kill.victim_pid
        assert finding["details"]["init_pid"] == kill.init_pid
        assert finding["details"]["memcg"] == c.cgroup_path


def test_child_kill_with_oom_group_ends_the_container_once(
    agents: Agents, throwaway_container: MakeContainer
) -> None:
    c = throwaway_container(qos="burstable", driver="systemd")
    before = {s: _kills_by_scope(a) for s, a in agents.items()}
    kill = c.oom_kill_group(n_children=3, timeout=20)
    events = memory_events(c)
    found = findings_of(agents, c)
    for agent in agents.values():
        stormkit.wait_quiet(agent)
    rises = {s: _rises(before[s], _kills_by_scope(a)) for s, a in agents.items()}
    killed_lines = _killed_process_lines(kill.killed_pids)
    gap = _group_line_gap(kill.victim_pid, c.cgroup_path)
    victims = {
        source: [v["pid"] for f in items for v in f["details"].get("group_victims") or []]
        for source, items in found.items()
    }
    record(
        "child, oom.group=1 (group kill), systemd",
        c,
        found,
        memory_events=events,
        processes=len(kill.killed_pids),
        killed_process_lines=killed_lines,
        group_victims=victims,
        metric_rises=rises,
        group_line_after_ms=gap,
    )
    EXPECTED[c.container_id] = "ContainerOOMKill"

    assert c.pids() == []
    assert events["oom_group_kill"] == 1
    # The kernel counts each "Killed process" it printed (6.1 prints the selected victim
    # twice: as the victim, then as a group member), not the processes that died.
    assert events["oom_kill"] == len(killed_lines)
    if gap < HOLD_MS:
        for finding in _one_finding_each(found, "ContainerOOMKill"):
            assert finding["details"]["pid"] == kill.victim_pid
            assert finding["details"]["group_memcg"] == c.cgroup_path
    else:  # the agent reported the held victim before the group line came: two findings
        for source, items in found.items():
            assert [f["reason"] for f in items] == ["ContainerOOMKill"] * 2, (source, items)
            assert [f["details"].get("group_memcg") for f in items] == [None, c.cgroup_path]
    for source, pids in victims.items():
        assert {kill.victim_pid, kill.init_pid} <= set(pids) <= set(kill.killed_pids), source
    # Every kill the kernel counted is the one report's, none left over as scope unknown.
    assert rises == {source: {"container": events["oom_kill"]} for source in SOURCES}


def _group_line_gap(victim_pid: int, cgroup: str) -> float:
    """Milliseconds between the kernel's ``Killed process`` record of the group kill's
    victim and its ``Tasks in … memory.oom.group`` record (/dev/kmsg timestamps)."""
    stamps: dict[str, int] = {}
    for line in _read_kmsg().splitlines():
        head, _, message = line.partition(";")
        if message.startswith(f"Memory cgroup out of memory: Killed process {victim_pid} ("):
            stamps.setdefault("killed", int(head.split(",")[2]))
        elif message.startswith(f"Tasks in {cgroup} are going to be killed"):
            stamps["group"] = int(head.split(",")[2])
    return (stamps["group"] - stamps["killed"]) / 1000


def _kills_by_scope(agent: RunningAgent) -> dict[str, float]:
    scopes = ("invisible", "container", "unknown", "system", "node")
    return {scope: agent.metric("nodediag_oom_kills_total", scope=scope) for scope in scopes}


def _rises(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {scope: after[scope] - before[scope] for scope in after if after[scope] > before[scope]}


def _killed_process_lines(pids: tuple[int, ...]) -> list[str]:
    """The kernel's ``Killed process N (comm)`` lines for ``pids`` (pids are not reused
    within the guest's short life)."""
    needles = [f"Killed process {pid} (" for pid in pids]
    return [
        line.split(";", 1)[1].split(" total-vm:")[0]
        for line in _read_kmsg().splitlines()
        if any(n in line for n in needles)
    ]


@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_init_kill_ends_the_container(
    agents: Agents, throwaway_container: MakeContainer, driver: str
) -> None:
    c = throwaway_container(qos="besteffort", driver=driver)
    kill = c.oom_kill("init", timeout=20)
    events = memory_events(c)
    found = findings_of(agents, c)
    record(f"init, {driver}", c, found, memory_events=events)
    EXPECTED[c.container_id] = "ContainerOOMKill"

    assert (events["oom_kill"], events["oom_group_kill"]) == (1, 0)
    for finding in _one_finding_each(found, "ContainerOOMKill"):
        assert finding["details"]["pid"] == kill.victim_pid


def test_global_oom_names_the_victims_pod(
    agents: Agents, throwaway_container: MakeContainer
) -> None:
    """The guest runs out of memory (no swap): CONSTRAINT_NONE. The container's limit is
    far above the guest's RAM, so only the node's memory can run out."""
    c = throwaway_container(qos="burstable", limit_bytes=8 << 30)
    kill = c.oom_kill("child", alloc_factor=1, timeout=40)
    events = memory_events(c)
    found = findings_of(agents, c)
    record("global OOM (no swap), cgroupfs", c, found, memory_events=events)
    EXPECTED[c.container_id] = "SystemOOMKill"

    assert events["oom"] == 0  # the memcg itself never hit its limit
    assert events["oom_kill"] == 1  # the victim's memcg still counts the kill
    for finding in _one_finding_each(found, "SystemOOMKill"):
        assert finding["subject"]["kind"] == "Pod"
        assert finding["subject"]["uid"] == c.pod_uid
        assert finding["details"]["pid"] == kill.victim_pid


def test_ratelimited_reports_are_counted_exactly_from_memory_events(agents: Agents) -> None:
    """Back-to-back kills: the kernel drops most reports' memory cgroup lines (10 per 5 s);
    the kill counter each agent exports still rises by exactly the kernel's count."""
    with stormkit.exclusive_oom():
        before = {s: stormkit.wait_quiet(a, timeout=120) for s, a in agents.items()}
        with stormkit.Storm(n=2, per_container=20, gap=0) as storm:
            storm.start()
            result = storm.wait(timeout=300)
            counted: dict[str, float] = {}
            for source, agent in agents.items():
                deadline = time.monotonic() + 60
                while agent.metric("nodediag_oom_kills_total") - before[source] < result.kills:
                    assert time.monotonic() < deadline, agent.log()
                    time.sleep(0.5)
                time.sleep(SETTLE)  # nothing more may come
                counted[source] = agent.metric("nodediag_oom_kills_total") - before[source]
            events = [memory_events(c) for c in storm.containers]
            summaries = _summaries_logged([c.cgroup_path for c in storm.containers])
            for c, e in zip(storm.containers, events, strict=True):
                record(
                    "rate-limited burst (storm), cgroupfs",
                    c,
                    memory_events=e,
                    counted=counted,
                    kills=result.kills,
                    summaries_logged=summaries,
                )
    assert result.kills == 40 and all(e["oom_kill"] == 20 for e in events), result.deltas
    assert summaries < result.kills, "no report was rate-limited: the scenario proves nothing"
    assert counted == {source: result.kills for source in SOURCES}


def _summaries_logged(cgroups: list[str]) -> int:
    """How many ``oom-kill:`` summaries naming one of ``cgroups`` the kernel printed."""
    needles = [f"task_memcg={cgroup}," for cgroup in cgroups]
    return sum(
        1
        for line in _read_kmsg().splitlines()
        if "oom-kill:constraint=" in line and any(n in line for n in needles)
    )


def _read_kmsg() -> str:
    """The kernel's whole ring buffer, raw /dev/kmsg records."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    records = []
    try:
        while True:
            try:
                records.append(os.read(fd, 8192).decode("utf-8", "replace"))
            except BlockingIOError:
                break
            except BrokenPipeError:  # overwritten meanwhile: go on from the oldest left
                continue
    finally:
        os.close(fd)
    return "".join(records)


@pytest.mark.parametrize("source", SOURCES)
def test_scan_gives_every_container_the_same_verdict(
    journald: realkernel.JournaldHandle, source: str
) -> None:
    args = ["--kernel-log", source, "--no-kube", "--since", "1h"]
    if source == "journal":
        args += ["--journal-path", str(journald.journal_dir)]
    result = nodediag("scan", "--json", *args, timeout=300)
    (LANE / "kmsg.txt").write_text(_read_kmsg())
    assert result.returncode == 1, result.stderr
    verdicts: dict[str, list[str]] = {}
    for finding in json_lines(result.stdout):
        container_id = finding["subject"].get("container_id")
        if container_id in EXPECTED:
            verdicts.setdefault(container_id, []).append(finding["reason"])
    with open(LANE / "scan.jsonl", "a") as f:
        f.write(json.dumps({"source": source, "verdicts": verdicts}) + "\n")
    assert EXPECTED, "no scenario ran before the scan"
    # Long after the fact and from the log alone, scan must still reach every verdict.
    assert verdicts == {container_id: [reason] for container_id, reason in EXPECTED.items()}
