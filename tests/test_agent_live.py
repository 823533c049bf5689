"""End to end on real components: real OOM kills in throwaway kubepods-style cgroups, read
by the real ``nodediag`` command from a real journald or from /dev/kmsg."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import realkernel
from agentproc import RunningAgent, json_lines, nodediag

pytestmark = pytest.mark.root

MakeContainer = Callable[..., realkernel.ThrowawayContainer]


@pytest.fixture(params=["journal", "kmsg"])
def source_args(request: pytest.FixtureRequest, journald: realkernel.JournaldHandle) -> list[str]:
    if request.param == "journal":
        return ["--kernel-log", "journal", "--journal-path", str(journald.journal_dir)]
    return ["--kernel-log", "kmsg"]


def _wait_logged(journald: realkernel.JournaldHandle, victim_pid: int) -> None:
    """The kill is in the journal (kmsg has it at once; journald needs a moment)."""
    journald.wait_for_kernel_message(f"Killed process {victim_pid} ", timeout=10)


def test_scan_tells_invisible_from_container_kills(
    source_args: list[str],
    journald: realkernel.JournaldHandle,
    throwaway_container: MakeContainer,
) -> None:
    survivor = throwaway_container(qos="burstable")
    child_kill = survivor.oom_kill("child")
    dead = throwaway_container(qos="besteffort", driver="systemd")
    init_kill = dead.oom_kill("init")
    _wait_logged(journald, init_kill.victim_pid)

    result = nodediag("scan", "--json", "--since", "10m", "--node-name", "node-a", *source_args)

    assert result.returncode == 1, result.stderr
    findings = json_lines(result.stdout)
    invisible = [f for f in findings if f["subject"]["container_id"] == survivor.container_id]
    assert len(invisible) == 1, findings
    finding = invisible[0]
    assert finding["reason"] == "InvisibleOOMKill"
    assert finding["node"] == "node-a"
    assert finding["subject"]["kind"] == "Pod"
    assert finding["subject"]["uid"] == survivor.pod_uid
    assert finding["details"]["pid"] == child_kill.victim_pid
    assert finding["details"]["comm"] == child_kill.victim_comm
    assert finding["details"]["init_pid"] == child_kill.init_pid
    assert finding["details"]["memcg"] == survivor.cgroup_path
    assert finding["details"]["qos_class"] == "burstable"

    ended = [f for f in findings if f["subject"]["container_id"] == dead.container_id]
    assert [f["reason"] for f in ended] == ["ContainerOOMKill"]
    assert ended[0]["subject"]["uid"] == dead.pod_uid
    assert ended[0]["details"]["pid"] == init_kill.victim_pid
    assert ended[0]["details"]["runtime"] == "containerd"


def test_scan_report_names_the_pod_and_exit_code(
    journald: realkernel.JournaldHandle, throwaway_container: MakeContainer
) -> None:
    container = throwaway_container()
    kill = container.oom_kill("child")
    _wait_logged(journald, kill.victim_pid)

    result = nodediag(
        "scan",
        "--since",
        "10m",
        "--kernel-log",
        "journal",
        "--journal-path",
        str(journald.journal_dir),
    )

    assert result.returncode == 1
    assert f"pid {kill.victim_pid}" in result.stdout
    assert container.pod_uid in result.stdout
    assert "InvisibleOOMKill" in result.stdout


def test_run_counts_a_kill_on_metrics_within_two_seconds(
    source_args: list[str], throwaway_container: MakeContainer, tmp_path: Path
) -> None:
    agent = RunningAgent([*source_args, "--state-dir", str(tmp_path), "--node-name", "node-b"])
    try:
        agent.wait_ready()
        assert agent.get("/healthz")[0] == 200
        before = agent.metric("nodediag_oom_kills_total", scope="invisible")
        container = throwaway_container()

        kill = container.oom_kill("child")

        deadline = kill.killed_at + 2.0
        while agent.metric("nodediag_oom_kills_total", scope="invisible") < before + 1:
            assert time.time() < deadline, f"counter not incremented within 2 s:\n{agent.log()}"
            time.sleep(0.02)
        assert agent.metric("nodediag_oom_kills_total", scope="invisible") == before + 1
        finding = agent.wait_finding(container.container_id)
        assert finding["reason"] == "InvisibleOOMKill"
        assert finding["details"]["pid"] == kill.victim_pid
        assert finding["details"]["init_pid"] == kill.init_pid
        assert agent.metric("nodediag_kernel_log_records_total") > 0
        assert agent.metric("nodediag_collector_success", collector="kernel_log") == 1
    finally:
        assert agent.stop() == 0, agent.log()


def test_run_reports_a_container_init_kill(
    source_args: list[str], throwaway_container: MakeContainer, tmp_path: Path
) -> None:
    agent = RunningAgent([*source_args, "--state-dir", str(tmp_path)])
    try:
        agent.wait_ready()
        container = throwaway_container()
        kill = container.oom_kill("init")
        finding = agent.wait_finding(container.container_id)
        assert finding["reason"] == "ContainerOOMKill"
        assert finding["details"]["pid"] == kill.victim_pid
    finally:
        agent.stop()


def test_restart_resumes_after_the_last_reported_record(
    source_args: list[str], throwaway_container: MakeContainer, tmp_path: Path
) -> None:
    args = [*source_args, "--state-dir", str(tmp_path)]
    first = RunningAgent(args)
    try:
        first.wait_ready()
        before_stop = throwaway_container()
        before_stop.oom_kill("child")
        first.wait_finding(before_stop.container_id)
    finally:
        assert first.stop() == 0, first.log()

    while_down = throwaway_container()
    down_kill = while_down.oom_kill("child")

    second = RunningAgent(args)
    try:
        second.wait_ready()
        finding = second.wait_finding(while_down.container_id)
        assert finding["reason"] == "InvisibleOOMKill"
        assert finding["details"]["pid"] == down_kill.victim_pid
        # Reported with its original time, not the time of the restart.
        kill_time = datetime.fromisoformat(finding["time"]).timestamp()
        assert abs(kill_time - down_kill.killed_at) < 3
        time.sleep(0.5)  # anything else would be reported by now
        assert len(second.findings_for(while_down.container_id)) == 1
        assert second.findings_for(before_stop.container_id) == []
        # Every kill counted is one reported (other kills on the machine may count too).
        assert second.metric("nodediag_oom_kills_total") == len(second.oom_findings)
    finally:
        assert second.stop() == 0, second.log()
