"""Classification of OOM kills on fixture trees (a fake host root with cgroups and /proc)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_oom import load, run

from agent.containers import ContainerLookup
from agent.oom_findings import (
    LiveEvidence,
    OomFindings,
    Undecided,
    Verdict,
    verdict_from_log,
    verdict_from_task,
)
from collectors.containerd import ContainerdClient, TaskInfo
from collectors.finding import Finding
from collectors.memcg import MemcgProbe, parse_status
from collectors.oom import OomKill, OomVictim
from collectors.oom_tasks import TaskRow

NOW = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)
POD_UID = "11112222-3333-4444-5555-666677778888"
CID = "ab" * 32
MEMCG = f"/kubepods/burstable/pod{POD_UID}/{CID}"


def kill(
    pid: int = 4885,
    memcg: str | None = MEMCG,
    *,
    is_global: bool = False,
    age: float = 0.1,
    tasks: tuple[TaskRow, ...] | None = None,
) -> OomKill:
    return OomKill(
        victim=OomVictim(pid=pid, comm="worker", uid=0, anon_rss_kb=50_000),
        time=NOW - timedelta(seconds=age),
        uptime=100.0,
        position=None,
        constraint="CONSTRAINT_NONE" if is_global else "CONSTRAINT_MEMCG",
        is_global=is_global,
        oom_memcg=memcg,
        task_memcg=memcg,
        memcg_limit_kb=65536,
        tasks=tasks,
    )


class HostTree:
    """A fake host root: cgroup v1 memory hierarchy and /proc/<pid>/status files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hierarchy = root / "sys/fs/cgroup/memory"
        self.hierarchy.mkdir(parents=True)
        (self.hierarchy / "cgroup.procs").write_text("1\n")

    def cgroup(self, path: str, pids: list[int]) -> None:
        directory = self.hierarchy / path.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))

    def process(self, pid: int, ns_pid: int, state: str = "S (sleeping)") -> None:
        status = self.root / "proc" / str(pid)
        status.mkdir(parents=True, exist_ok=True)
        (status / "status").write_text(
            f"Name:\tworker\nState:\t{state}\nPid:\t{pid}\nNSpid:\t{pid}\t{ns_pid}\n"
        )


@pytest.fixture
def host(tmp_path: Path) -> HostTree:
    return HostTree(tmp_path)


def live(host: HostTree, sleeps: list[float] | None = None) -> LiveEvidence:
    return LiveEvidence(
        MemcgProbe(host.root),
        window=10,
        sleep=(sleeps.append if sleeps is not None else lambda _s: None),
        now=lambda: NOW,
    )


def test_status_parsing_takes_the_innermost_pid() -> None:
    info = parse_status(4885, "Name:\tsh\nState:\tS (sleeping)\nNSpid:\t4885\t77\t1\n")
    assert (info.comm, info.ns_pid, info.alive, info.is_namespace_init) == ("sh", 1, True, True)
    assert not parse_status(9, "State:\tZ (zombie)\nNSpid:\t9\n").alive


def test_init_alive_means_invisible(host: HostTree) -> None:
    host.cgroup(MEMCG, [4871, 4890])
    host.process(4871, ns_pid=1)
    host.process(4890, ns_pid=7)
    finding = OomFindings("node-1", live(host)).finding(kill())
    assert finding.reason == "InvisibleOOMKill"
    assert finding.details["scope"] == "invisible"
    assert finding.details["init_pid"] == 4871
    assert finding.subject.uid == POD_UID
    assert finding.subject.container_id == CID
    assert "kept running" in finding.message


def test_victim_that_was_namespace_init_means_container_kill(host: HostTree) -> None:
    host.cgroup(MEMCG, [4885, 4886])
    host.process(4885, ns_pid=1, state="R (running)")  # still exiting
    host.process(4886, ns_pid=2)
    finding = OomFindings("node-1", live(host)).finding(kill())
    assert finding.reason == "ContainerOOMKill"
    assert finding.details["init_pid"] == 4885


def test_empty_cgroup_right_after_the_kill_means_container_kill(host: HostTree) -> None:
    host.cgroup(MEMCG, [])
    finding = OomFindings("n", live(host)).finding(kill())
    assert finding.reason == "ContainerOOMKill"
    assert (
        finding.details["basis"] == "the container's memory cgroup was empty right after the kill"
    )


# --- a container cgroup gone when read: deleted, by the kill or after it --------------------

INIT_THEN_VICTIM = (TaskRow(pid=4871, tgid=4871, name="sh"), TaskRow(pid=4885, tgid=4885, name="w"))


def test_live_evidence_tells_a_gone_cgroup_from_an_empty_one(host: HostTree) -> None:
    gone = live(host).verdict(kill(), MEMCG)
    assert isinstance(gone, Undecided) and "gone when read" in gone.seen
    host.cgroup(MEMCG, [])
    empty = live(host).verdict(kill(), MEMCG)
    assert isinstance(empty, Verdict) and empty.reason == "ContainerOOMKill"


def test_gone_cgroup_after_a_child_kill_is_judged_by_the_task_table(host: HostTree) -> None:
    """The pod was removed right after a child's kill: the CRI said the container ran on."""
    finding = OomFindings("n", live(host)).finding(kill(tasks=INIT_THEN_VICTIM))
    assert finding.reason == "InvisibleOOMKill"
    basis = finding.details["basis"]
    assert basis.startswith("the container's memory cgroup was gone when read")
    assert "listed after sh (pid 4871)" in basis


def test_gone_cgroup_after_a_child_kill_is_judged_by_a_later_kill(host: HostTree) -> None:
    finding = OomFindings("n", live(host)).finding(kill(), later=[kill(pid=4886, age=0.05)])
    assert finding.reason == "InvisibleOOMKill"
    assert "a later OOM kill in the same container (pid 4886" in finding.details["basis"]


def test_gone_cgroup_with_the_victim_alone_in_the_table_is_a_container_kill(
    host: HostTree,
) -> None:
    alone = kill(tasks=(TaskRow(pid=4885, tgid=4885, name="w"),))
    finding = OomFindings("n", live(host)).finding(alone)
    assert finding.reason == "ContainerOOMKill"
    assert "the victim was the only process" in finding.details["basis"]


def test_gone_cgroup_without_other_evidence_is_unknown(host: HostTree) -> None:
    finding = OomFindings("n", live(host)).finding(kill())
    assert (finding.reason, finding.details["scope"]) == ("OOMKill", "unknown")
    assert finding.details["basis"].startswith("the container's memory cgroup was gone")


def test_gone_cgroup_with_the_victim_still_its_namespace_init_is_a_container_kill(
    host: HostTree,
) -> None:
    host.process(4885, ns_pid=1, state="R (running)")  # still exiting
    assert OomFindings("n", live(host)).finding(kill()).reason == "ContainerOOMKill"


def test_cgroup_removed_while_waiting_for_its_processes_decides_nothing(host: HostTree) -> None:
    host.cgroup(MEMCG, [4890])
    host.process(4890, ns_pid=4890)
    directory = host.hierarchy / MEMCG.lstrip("/")

    def remove_cgroup(_seconds: float) -> None:
        (directory / "cgroup.procs").unlink(missing_ok=True)
        if directory.exists():
            directory.rmdir()

    evidence = LiveEvidence(MemcgProbe(host.root), window=10, sleep=remove_cgroup, now=lambda: NOW)
    finding = OomFindings("n", evidence).finding(kill())
    assert finding.reason == "OOMKill"
    assert "gone when read" in finding.details["basis"]


def test_gone_container_is_judged_by_its_remembered_task_start(
    host: HostTree, tmp_path: Path
) -> None:
    """containerd has deleted the container; its task's init pid, seen at its start, says
    the victim was a child (no containerd answers here at all)."""
    lookup = ContainerLookup(ContainerdClient([tmp_path / "no.sock"]))
    lookup.remember_start(CID, 4871)
    findings = OomFindings("n", live(host), containers=lookup)
    child = findings.finding(kill())
    assert child.reason == "InvisibleOOMKill"
    assert child.details["init_pid"] == 4871
    assert "deleted now" in child.details["basis"]
    assert findings.finding(kill(pid=4871)).reason == "ContainerOOMKill"


def test_old_kill_in_a_gone_cgroup_falls_back_to_the_log(host: HostTree) -> None:
    finding = OomFindings("n", live(host)).finding(kill(age=3600))
    assert finding.reason == "OOMKill"
    assert finding.details["scope"] == "unknown"


def test_old_kill_in_a_populated_cgroup_is_invisible(host: HostTree) -> None:
    host.cgroup(MEMCG, [4871])
    host.process(4871, ns_pid=1)
    assert OomFindings("n", live(host)).finding(kill(age=3600)).reason == "InvisibleOOMKill"


def test_members_without_a_namespace_init_are_waited_for(host: HostTree) -> None:
    host.cgroup(MEMCG, [4890])
    host.process(4890, ns_pid=4890)  # no pid namespace of its own
    sleeps: list[float] = []
    finding = OomFindings("n", live(host, sleeps)).finding(kill())
    assert finding.reason == "InvisibleOOMKill"
    assert "still holds 1 live process" in finding.details["basis"]
    assert sum(sleeps) == pytest.approx(0.3)


def test_zombies_do_not_count_as_survivors(host: HostTree) -> None:
    host.cgroup(MEMCG, [4890])
    host.process(4890, ns_pid=3, state="Z (zombie)")
    assert OomFindings("n", live(host)).finding(kill()).reason == "ContainerOOMKill"


def test_global_oom_is_a_system_kill_on_the_victims_pod(host: HostTree) -> None:
    finding = OomFindings("n", live(host)).finding(kill(is_global=True))
    assert finding.reason == "SystemOOMKill"
    assert finding.subject.kind == "Pod"
    assert finding.details["scope"] == "system"


def test_global_oom_outside_pods_is_on_the_node(host: HostTree) -> None:
    finding = OomFindings("n", live(host)).finding(kill(memcg="/", is_global=True))
    assert (finding.reason, finding.subject.kind, finding.subject.name) == (
        "SystemOOMKill",
        "Node",
        "n",
    )


def test_memcg_kill_outside_kubepods_is_a_node_process_kill(host: HostTree) -> None:
    finding = OomFindings("n", live(host)).finding(kill(memcg="/system.slice/db.service"))
    assert finding.reason == "NodeProcessOOMKill"
    assert finding.details["scope"] == "node"
    assert finding.subject.kind == "Node"


def test_kill_without_memcg_is_reported_but_not_guessed(host: HostTree) -> None:
    finding = OomFindings("n", live(host)).finding(kill(memcg=None))
    assert finding.reason == "OOMKill"
    assert finding.subject.kind == "Node"
    assert finding.subject.uid is None


def test_log_evidence_later_kill_in_same_container_means_survived() -> None:
    verdict = verdict_from_log(kill(pid=10), later=[kill(pid=11)])
    assert verdict.reason == "InvisibleOOMKill"
    assert "pid 11" in verdict.basis


def test_log_evidence_task_table_decides() -> None:
    alone = kill(pid=10, tasks=(TaskRow(pid=10, tgid=10, name="worker"),))
    assert verdict_from_log(alone, later=[]).reason == "ContainerOOMKill"
    crowded = kill(
        pid=10, tasks=(TaskRow(pid=9, tgid=9, name="sh"), TaskRow(pid=10, tgid=10, name="w"))
    )
    assert verdict_from_log(crowded, later=[]).reason == "InvisibleOOMKill"


def test_offline_findings_never_read_the_host() -> None:
    finding = OomFindings("n", live=None).finding(kill(), later=[])
    assert finding.reason == "OOMKill"
    assert finding.to_dict()["subject"]["name"] is None


# --- from the log alone (analyze, scan, run's backlog) -------------------------------------

# vector (tests/vectors/oom) -> the reason of each kill, judged from the log alone.
LOG_REASONS = {
    # The task table lists sh before the victim: sh is the container's init, not killed.
    "memcg_6_18_kubepods_this_machine.log": ["InvisibleOOMKill"],
    "memcg_6_18_two_kills_spaces_commas_this_machine.log": ["InvisibleOOMKill", "OOMKill"],
    "made_container_limit_child_4_14_v1.log": ["InvisibleOOMKill"],
    # memory.oom.group on the container: every process of it was killed.
    "made_group_v2_container_limit_6x.log": ["ContainerOOMKill"],
    "group_systemd_cgroup_aks_npd.log": ["ContainerOOMKill"],
    # Pod-level limits: pause/conmon are in no container; other rows may be in any.
    "made_pod_limit_v1_pause_and_victim_6x.log": ["ContainerOOMKill"],
    "made_pod_limit_v1_two_containers_6x.log": ["OOMKill"],
    "made_pod_limit_v2_crio_conmon_6x.log": ["OOMKill"],
    "made_header_cut_after_unfinished_report_6x.log": ["OOMKill"],
    # The kill 95 s earlier (pasted second) is the one the later kill shows survived.
    "made_same_container_pasted_out_of_order_6x.log": ["OOMKill", "InvisibleOOMKill"],
    "memcg_6_18_ratelimited_this_machine.log": ["ContainerOOMKill"] + ["OOMKill"] * 3,
    "group_5_0_lkml_tetsuo.log": ["NodeProcessOOMKill"],
    "legacy_3_10_sacrificed_child_k8s56891.log": ["OOMKill"],
}


def log_findings(name: str) -> list[Finding]:
    return OomFindings("n", live=None).for_log(run(load(name)))


@pytest.mark.parametrize("name", sorted(LOG_REASONS))
def test_reasons_from_the_log_alone(name: str) -> None:
    assert [f.reason for f in log_findings(name)] == LOG_REASONS[name]


def test_child_listed_after_other_processes_names_them() -> None:
    [finding] = log_findings("memcg_6_18_kubepods_this_machine.log")
    assert "sh (pid 6423)" in finding.details["basis"]
    assert "not the container's init" in finding.details["basis"]


def test_group_kill_of_the_container_is_one_container_kill() -> None:
    [finding] = log_findings("made_group_v2_container_limit_6x.log")
    assert finding.details["scope"] == "container"
    assert "memory.oom.group" in finding.details["basis"]
    assert [v["pid"] for v in finding.details["group_victims"]] == [21507, 21401]


def test_group_kill_of_a_cgroup_inside_the_container_proves_nothing() -> None:
    nested = replace(kill(), group_memcg=MEMCG + "/workers", group_victims=(OomVictim(1, "a"),))
    assert verdict_from_log(nested).reason == "OOMKill"


def test_group_kill_sparing_a_never_kill_task_proves_nothing() -> None:
    rows = (TaskRow(pid=7, tgid=7, name="keep", oom_score_adj=-1000),)
    group = replace(kill(tasks=rows), group_memcg=MEMCG, group_victims=(OomVictim(4885, "w"),))
    assert verdict_from_log(group).reason == "OOMKill"


def test_group_kill_is_judged_by_containerd_when_it_can_tell() -> None:
    members = (OomVictim(4885, "w"), OomVictim(4001, "app"))
    group = replace(kill(), group_memcg=MEMCG, group_victims=members)
    killed_init = verdict_from_task(group, TaskInfo(4001, "RUNNING", 0))  # not reaped yet
    assert killed_init is not None and killed_init.reason == "ContainerOOMKill"
    assert "memory.oom.group" in killed_init.basis
    spared_init = verdict_from_task(group, TaskInfo(4002, "RUNNING", 0))
    assert spared_init is not None and spared_init.reason == "InvisibleOOMKill"


def test_pod_table_names_the_processes_it_cannot_place() -> None:
    [finding] = log_findings("made_pod_limit_v2_crio_conmon_6x.log")
    basis = finding.details["basis"]
    assert "sh (pid 5133)" in basis and "conmon" not in basis.split("lists")[1]
    assert "does not say which container" in basis


def test_victim_listed_first_may_be_the_init() -> None:
    rows = (TaskRow(pid=4885, tgid=4885, name="w"), TaskRow(pid=4890, tgid=4890, name="c"))
    verdict = verdict_from_log(kill(tasks=rows))
    assert verdict.reason == "OOMKill"
    assert "may have been the container's init" in verdict.basis


def test_threads_of_the_victim_are_not_other_processes() -> None:
    rows = (TaskRow(pid=4885, tgid=4885, name="w"), TaskRow(pid=4886, tgid=4885, name="w"))
    assert verdict_from_log(kill(tasks=rows)).reason == "ContainerOOMKill"


def test_later_kill_follows_time_not_file_order() -> None:
    first_in_file = kill(pid=11, age=0)
    earlier_in_time = kill(pid=10, age=95)
    assert verdict_from_log(first_in_file, later=[earlier_in_time]).reason == "OOMKill"
    verdict = verdict_from_log(earlier_in_time, earlier=[first_in_file])
    assert verdict.reason == "InvisibleOOMKill" and "pid 11" in verdict.basis


def test_kill_without_memcg_says_that_the_container_is_unknown() -> None:
    finding = OomFindings("node-1", live=None).finding(kill(memcg=None))
    assert (finding.reason, finding.subject.kind) == ("OOMKill", "Node")
    assert "which container (if any) is unknown" in finding.message
    assert "the container survived" not in finding.message
