"""The reading loop's resume logic on a recorded kernel log (no real journal needed)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from agent.kernel_watch import KernelWatch
from agent.metrics import Metrics
from agent.oom_findings import OomFindings
from agent.state import StateFile
from collectors.finding import Finding
from collectors.records import KernelRecord

MEMCG = "/kubepods/besteffort/pod11112222-3333-4444-5555-666677778888/" + "cd" * 32
REPORT = [
    "worker invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
    "memory: usage 51200kB, limit 51200kB, failcnt 272",
    "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
    f"oom_memcg={MEMCG},task_memcg={MEMCG},task=worker,pid={{pid}},uid=0",
    "Memory cgroup out of memory: Killed process {pid} (worker) total-vm:221368kB, "
    "anon-rss:50816kB, file-rss:6716kB, shmem-rss:0kB, UID:0 pgtables:160kB oom_score_adj:0",
]


def report(pid: int) -> list[str]:
    return [line.replace("{pid}", str(pid)) for line in REPORT]


class RecordedSource:
    """A kernel log source over a list of messages; positions are list indexes."""

    name = "journal"

    def __init__(self, messages: list[str]) -> None:
        self.messages = messages
        self.lost_records = 0
        self.skipped = 0
        self.next = 0

    def start(self, *, resume: str | None = None, since: datetime | None = None) -> None:
        self.next = int(resume) + 1 if resume is not None else 0

    def records(
        self, prefilter: Callable[[], tuple[bytes, ...] | None] | None = None
    ) -> Iterator[KernelRecord]:
        while self.next < len(self.messages):
            self.next += 1
            yield KernelRecord(self.messages[self.next - 1])

    def position(self) -> str | None:
        return str(self.next - 1) if self.next else None

    def wait(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass


def watch(source: RecordedSource, state: StateFile, out: list[Finding]) -> KernelWatch:
    w = KernelWatch(source, OomFindings("n", live=None), out.append, Metrics(), state)
    source.start(resume=w.resume_point())
    return w


def test_position_is_saved_only_outside_a_report(tmp_path: Path) -> None:
    messages = ["noise 0", *report(100), "noise 5", *report(200)[:2]]  # second report cut
    state = StateFile(tmp_path / "state.json")
    found: list[Finding] = []
    w = watch(RecordedSource(messages), state, found)
    w.drain()
    w.flush()
    assert [f.details["pid"] for f in found] == [100]
    # The cut report starts at index 6: resuming must re-read it from there.
    saved = state.load()
    assert (saved["source"], saved["position"]) == ("journal", "5")


def test_restart_reports_each_kill_once(tmp_path: Path) -> None:
    messages = ["noise", *report(100), *report(200)[:2]]
    state = StateFile(tmp_path / "state.json")
    first: list[Finding] = []
    w = watch(RecordedSource(messages), state, first)
    w.drain()
    w.flush()
    messages += [*report(200)[2:], "noise", *report(300)]
    second: list[Finding] = []
    w2 = watch(RecordedSource(messages), state, second)
    w2.drain()
    w2.flush()
    assert [f.details["pid"] for f in first] == [100]
    assert [f.details["pid"] for f in second] == [200, 300]
    assert second[0].details["memcg"] == MEMCG  # the report was re-read from its start


def test_held_kill_is_reported_on_a_busy_log_without_waiting_for_quiet(tmp_path: Path) -> None:
    found: list[Finding] = []
    source = RecordedSource([*report(100), "noise"])
    w = watch(source, StateFile(tmp_path / "s.json"), found)
    w.drain(hold=0.0)  # the log never went quiet, but the hold is over
    assert [f.details["pid"] for f in found] == [100]
    assert w.assembler.idle


def test_a_group_kill_counts_each_killed_line_once_in_one_finding(tmp_path: Path) -> None:
    """6.1's group kill (VM lane vector): 3 ``Killed process`` lines (the chosen victim
    twice), as the memory cgroup's ``oom_kill`` counter counts them; one finding."""
    vector = Path(__file__).parent / "vectors" / "oom" / "group_6_1_v2_pidns_vm_lane.log"
    messages = [line.split("] ", 1)[1] for line in vector.read_text().splitlines()]
    found: list[Finding] = []
    metrics = Metrics()
    w = KernelWatch(
        RecordedSource(messages), OomFindings("n", live=None), found.append, metrics,
        StateFile(tmp_path / "s"),
    )  # fmt: skip
    w.drain()
    w.flush()
    [finding] = found
    assert [v["pid"] for v in finding.details["group_victims"]] == [289, 285]
    total = sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "nodediag_oom_kills"
        for sample in family.samples
        if sample.name == "nodediag_oom_kills_total"
    )
    assert total == 3


def test_a_kill_is_held_back_for_a_group_line(tmp_path: Path) -> None:
    group = "Tasks in " + MEMCG + " are going to be killed due to memory.oom.group set"
    member = "Memory cgroup out of memory: Killed process 101 (worker) total-vm:1kB"
    found: list[Finding] = []
    w = watch(RecordedSource([*report(100), group, member]), StateFile(tmp_path / "s"), found)
    w.drain(hold=60)
    assert found == []
    w.flush()
    [finding] = found
    assert [v["pid"] for v in finding.details["group_victims"]] == [100, 101]


def test_state_for_another_source_is_ignored(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    state.save({"source": "kmsg", "position": "boot:12"})
    w = watch(RecordedSource(report(1)), state, [])
    assert w.resume_point() is None


def test_torn_state_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"source": "jour')
    assert StateFile(tmp_path / "state.json").load() == {}


def test_counts_records_and_kills(tmp_path: Path) -> None:
    found: list[Finding] = []
    w = watch(RecordedSource(["a", *report(7)]), StateFile(tmp_path / "s.json"), found)
    w.drain()
    w.flush()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in w.metrics.registry.collect()
        for s in metric.samples
    }
    assert samples[("nodediag_kernel_log_records_total", (("source", "journal"),))] == 5
    key = (
        "nodediag_oom_kills_total",
        (("container", ""), ("namespace", ""), ("pod", ""), ("scope", "unknown")),
    )
    assert samples[key] == 1


def test_counter_kills_with_a_silent_log_are_logged_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory cgroup counters rise but the log shows no kill (journald stopped): one
    warning, not one per reconcile; a kill in the log ends the silence."""
    from agent import kernel_watch
    from agent.oom_counters import OomCounterLedger

    monkeypatch.setattr(kernel_watch, "SILENT_LOG_SECONDS", 0.0)
    values = {MEMCG: 0}
    ledger = OomCounterLedger(lambda: dict(values), grace=0.0)
    ledger.start()
    source = RecordedSource([])
    found: list[Finding] = []
    w = KernelWatch(source, OomFindings("n", live=None), found.append, Metrics(), None, ledger)
    caplog.set_level(logging.INFO, logger="agent.kernel_watch")
    for kills in (1, 2, 3):
        values[MEMCG] = kills
        w.reconcile()
    warnings = [r for r in caplog.records if "counted from memory cgroup counters" in r.message]
    assert len(warnings) == 1 and "journal" in warnings[0].message
    counted = sum(
        sample.value
        for family in w.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "nodediag_oom_kills_total" and sample.labels["scope"] == "unknown"
    )
    assert counted == 3  # every kill the counters saw is counted
    source.messages += report(300)
    w.drain()
    w.flush()
    assert any("shows OOM kills again" in r.message for r in caplog.records)


def test_backlog_is_judged_from_the_log_like_analyze(tmp_path: Path) -> None:
    """Kills read while catching up after a start are judged together: a later kill of
    the same container shows that it survived the earlier one."""
    found: list[Finding] = []
    source = RecordedSource([*report(100), "noise", *report(200)])
    w = watch(source, StateFile(tmp_path / "s.json"), found)
    w.drain(hold=0.0)
    assert [(f.details["pid"], f.reason) for f in found] == [
        (100, "InvisibleOOMKill"),
        (200, "OOMKill"),
    ]
    assert "pid 200" in found[0].details["basis"]
    assert w.state is not None and w.state.load()["position"] == str(len(source.messages) - 1)


def test_kills_after_catching_up_are_reported_at_once(tmp_path: Path) -> None:
    found: list[Finding] = []
    source = RecordedSource([])
    w = watch(source, StateFile(tmp_path / "s.json"), found)
    w.caught_up = True
    source.messages += [*report(100), "noise"]
    w.drain(hold=0.0)
    assert [f.details["pid"] for f in found] == [100]


def test_lines_not_understood_are_logged_not_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = "Jan  5 15:19:27 kernel: "
    found: list[Finding] = []
    source = RecordedSource([prefix + line for line in report(100)])
    w = watch(source, StateFile(tmp_path / "s.json"), found)
    caplog.set_level(logging.WARNING, logger="agent.kernel_watch")
    w.drain()
    w.flush()
    assert found == []
    [warning] = [r for r in caplog.records if "not understood" in r.message]
    assert warning.message.startswith("3 journal line(s) worded like OOM report lines")
