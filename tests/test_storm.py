"""OOM storm: the kernel rate-limits its OOM reports, so most kills arrive without a memory
cgroup; the memory cgroups' own ``oom_kill`` counters keep the counts exact."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import realkernel
import stormkit
from agentproc import RunningAgent

from agent.oom_counters import OomCounterLedger
from collectors.memcg import parse_oom_kill_counter, read_oom_kill_counters
from collectors.oom import OomKill, OomVictim

A = "/kubepods/burstable/pod1/" + "a" * 64
B = "/kubepods/burstable/pod2/" + "b" * 64


class FakeCounters:
    def __init__(self) -> None:
        self.values: dict[str, int] = {A: 5, B: 7}
        self.now = 100.0

    def read(self) -> dict[str, int]:
        return dict(self.values)

    def clock(self) -> float:
        return self.now


def _ledger(counters: FakeCounters) -> OomCounterLedger:
    ledger = OomCounterLedger(counters.read, grace=1.0, clock=counters.clock, wall=lambda: 1000.0)
    ledger.start()
    return ledger


def test_counter_parsing() -> None:
    assert parse_oom_kill_counter("oom_kill_disable 0\nunder_oom 0\noom_kill 12\n") == 12
    assert parse_oom_kill_counter("low 0\nhigh 0\nmax 3\noom 4\noom_kill 2\n") == 2
    assert parse_oom_kill_counter("oom_kill x\n") is None
    assert parse_oom_kill_counter("") is None


def test_single_candidate_is_attributed_and_counted_once() -> None:
    counters = FakeCounters()
    ledger = _ledger(counters)
    counters.values[A] += 1
    [verdict] = ledger.headerless()
    assert verdict.memcg == A and verdict.counted
    counters.now += 5
    assert ledger.reconcile() == {}  # the log already counted it
    assert ledger.counted == {A: 1}


def test_several_candidates_stay_unattributed_but_counts_are_exact() -> None:
    counters = FakeCounters()
    ledger = _ledger(counters)
    counters.values[A] += 3
    counters.values[B] += 2
    verdicts = ledger.headerless(5)
    assert all(v.memcg is None and v.candidates == (A, B) for v in verdicts)
    assert not any(v.counted for v in verdicts)
    assert ledger.reconcile() == {}  # within the grace: the reports may still come
    counters.now += 1.5
    assert ledger.reconcile() == {A: 3, B: 2}
    assert ledger.reconcile() == {}


def test_late_report_after_counter_fill_is_not_counted_again() -> None:
    counters = FakeCounters()
    ledger = _ledger(counters)
    counters.values[A] += 2
    ledger.reconcile()
    counters.now += 2
    assert ledger.reconcile() == {A: 2}  # records lost (overrun): the counter counts them
    assert ledger.claim(A) == 0  # a report for one of them arrives late
    assert ledger.claim(A) == 0
    counters.values[A] += 1
    assert ledger.claim(A) == 1  # a new kill, reported at once
    counters.now += 2
    ledger.reconcile()
    counters.now += 2
    assert ledger.reconcile() == {}
    assert ledger.counted[A] == 3


def test_headed_then_headerless_in_other_container() -> None:
    counters = FakeCounters()
    ledger = _ledger(counters)
    counters.values[A] += 1
    counters.values[B] += 1
    assert ledger.claim(A) == 1  # A's report was printed in full
    [verdict] = ledger.headerless()  # B's was not: only B is unaccounted
    assert verdict.memcg == B and verdict.counted


def test_kills_before_the_baseline_are_not_in_any_delta() -> None:
    ledger = _ledger(FakeCounters())
    victim = OomVictim(pid=1, comm="x")
    early = OomKill(victim, datetime.fromtimestamp(999, UTC), None, None, None, False, None, A)
    late = OomKill(victim, datetime.fromtimestamp(1001, UTC), None, None, None, False, None, A)
    assert ledger.before_baseline(early)
    assert not ledger.before_baseline(late)
    undated = OomKill(victim, None, None, None, None, False, None, A)
    assert ledger.before_baseline(undated)
    just_before = datetime.fromtimestamp(1000, UTC) - timedelta(microseconds=1)
    assert ledger.before_baseline(OomKill(victim, just_before, None, None, None, False, None, A))


def test_more_reports_than_kills_never_overcount() -> None:
    """An interleaved report read as two kills: the counter caps the count."""
    counters = FakeCounters()
    ledger = OomCounterLedger(
        counters.read, lambda path: counters.values.get(path), clock=counters.clock
    )
    ledger.start()
    counters.values[A] += 1
    assert ledger.claim(A) == 1
    assert ledger.claim(A) == 0
    assert ledger.counted[A] == 1


def test_group_kill_is_counted_from_its_report_whole() -> None:
    """cgroup v2 ``memory.oom.group``: the counter rises once per ``Killed process`` line of
    the one report (6.1 prints the chosen victim twice: 5 lines for 4 processes, VM lane).
    The report counts them all, so the counters add nothing with scope unknown later, and
    the container is no candidate for a later header-less kill elsewhere."""
    counters = FakeCounters()
    ledger = OomCounterLedger(
        counters.read, lambda path: counters.values.get(path), clock=counters.clock
    )
    ledger.start()
    counters.values[A] += 5
    assert ledger.claim(A, kills=5) == 5
    counters.values[B] += 1
    [verdict] = ledger.headerless()
    assert verdict.memcg == B and verdict.counted
    counters.now += 2
    ledger.reconcile()
    counters.now += 2
    assert ledger.reconcile() == {}
    assert ledger.counted == {A: 5, B: 1}


@pytest.mark.root
def test_counter_walk_finds_only_container_cgroups(
    throwaway_container: Callable[..., realkernel.ThrowawayContainer],
) -> None:
    container = throwaway_container()
    container.oom_kill("child")
    counters = read_oom_kill_counters(realkernel.memory_cgroup_root()[0])
    assert counters[container.cgroup_path] == container.oom_kill_count() == 1
    assert all("kubepods" in path for path in counters)


@pytest.mark.root
def test_storm_every_kill_counted_exactly(tmp_path: Path) -> None:
    """1,000 kills in ~10 s across 20 containers, read by a running agent from /dev/kmsg."""
    with stormkit.exclusive_oom():
        agent = RunningAgent(["--kernel-log", "kmsg", "--state-dir", str(tmp_path), "--no-kube"])
        try:
            agent.wait_ready()
            stormkit.wait_quiet(agent)  # the backlog of this boot's earlier kills is read
            with stormkit.Storm(n=20, per_container=50, gap=0) as storm:
                before = agent.metric("nodediag_oom_kills_total")
                rss_before = stormkit.rss_kib(agent.proc.pid)
                storm.start()
                result = storm.wait()
                assert result.kills == 1000, result.deltas
                deadline = time.monotonic() + 15
                while agent.metric("nodediag_oom_kills_total") - before < result.kills:
                    assert time.monotonic() < deadline, agent.log()
                    time.sleep(0.2)
                time.sleep(2)  # nothing more may come
                counted = agent.metric("nodediag_oom_kills_total") - before
                assert counted == result.kills, (counted, result.deltas, agent.log())
                assert agent.proc.poll() is None
                rss_after = stormkit.rss_kib(agent.proc.pid)
                ids = set(result.deltas)
                mine = [f for f in agent.findings if f["subject"].get("container_id") in ids
                        or set(f["details"].get("candidates", [])) & {
                            c.cgroup_path for c in result.containers}]  # fmt: skip
                per_container: dict[str, int] = {}
                for finding in mine:
                    cid = finding["subject"].get("container_id")
                    if cid:
                        per_container[cid] = per_container.get(cid, 0) + 1
                # Attributed findings never exceed a container's real kills.
                assert all(per_container.get(c, 0) <= n for c, n in result.deltas.items())
                assert len(mine) <= result.kills
                print(
                    f"storm: {result.kills} kills in {result.seconds:.1f} s; counted {counted}; "
                    f"findings {len(mine)} ({sum(per_container.values())} attributed); "
                    f"RSS {rss_before} -> {rss_after} KiB; lost "
                    f"{agent.metric('nodediag_kernel_log_lost_records_total')}"
                )
                assert rss_after - rss_before < 16 * 1024
        finally:
            assert agent.stop() == 0, agent.log()


def _cgroup(root: Path, relative: str, files: dict[str, str]) -> None:
    directory = root / relative
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


CID_A = "a" * 64
CID_B = "b" * 64
POD = "pod11111111_2222_3333_4444_555555555555"


def test_counter_walk_tells_cgroups_from_control_files_by_name(tmp_path: Path) -> None:
    """v1 tree, systemd driver: directory names with dots (``*.slice``, ``*.scope``) are
    walked, control files (``memory.*``, ``cgroup.*``, ``tasks``) are not, a stray file with
    another name is harmless, and nothing below a container cgroup is read."""
    v1 = {"memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "tasks": ""}
    root = tmp_path / "memory"
    _cgroup(root, "", {"memory.oom_control": "oom_kill 9\n", "cgroup.procs": "", "stray": "x"})
    pod = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-{POD}.slice"
    _cgroup(root, pod, {"memory.oom_control": "oom_kill 5\n", "notify_on_release": "0"})
    _cgroup(root, f"{pod}/cri-containerd-{CID_A}.scope", v1)
    nested = f"{pod}/cri-containerd-{CID_A}.scope/nested"
    _cgroup(root, nested, {"memory.oom_control": "oom_kill 7\n"})
    _cgroup(root, "system.slice/containerd.service", {"memory.oom_control": "oom_kill 1\n"})
    assert read_oom_kill_counters(root) == {f"/{pod}/cri-containerd-{CID_A}.scope": 3}


def test_counter_walk_on_cgroup_v2_reads_memory_events(tmp_path: Path) -> None:
    root = tmp_path / "unified"
    events = "low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n"
    _cgroup(root, "", {"cgroup.controllers": "memory", "cpu.stat": "", "io.stat": ""})
    _cgroup(root, f"kubepods/burstable/{POD.replace('_', '-')}", {"memory.events": "oom_kill 9\n"})
    _cgroup(root, f"kubepods/burstable/{POD.replace('_', '-')}/{CID_B}", {"memory.events": events})
    _cgroup(root, "io", {"memory.events": "oom_kill 1\n"})  # a cgroup named like a controller
    assert read_oom_kill_counters(root) == {
        f"/kubepods/burstable/{POD.replace('_', '-')}/{CID_B}": 2
    }
