"""Faults in journald while ``nodediag run`` reads it (real journald, real OOM kills):
journald restarted, down while a kill happens, the journal rotated and vacuumed under a
running agent and under a stopped one. After each, every kill is reported exactly once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import realkernel
from agentproc import RunningAgent

pytestmark = pytest.mark.root

MakeContainer = Callable[..., realkernel.ThrowawayContainer]


def _args(journald: realkernel.JournaldHandle, state_dir: Path) -> list[str]:
    return [
        "--kernel-log",
        "journal",
        "--journal-path",
        str(journald.journal_dir),
        "--state-dir",
        str(state_dir),
        "--no-kube",
    ]


def _kill_and_expect(
    agent: RunningAgent, make: MakeContainer, seen: list[realkernel.ThrowawayContainer]
) -> None:
    container = make()
    kill = container.oom_kill("child")
    finding = agent.wait_finding(container.container_id, timeout=20)
    assert finding["reason"] == "InvisibleOOMKill"
    assert finding["details"]["pid"] == kill.victim_pid
    seen.append(container)


def _inodes(journald: realkernel.JournaldHandle) -> set[int]:
    return {path.stat().st_ino for path in journald.journal_files()}


def _assert_each_once(agent: RunningAgent, seen: list[realkernel.ThrowawayContainer]) -> None:
    time.sleep(1.0)  # a duplicate would be reported by now
    for container in seen:
        assert len(agent.findings_for(container.container_id)) == 1, agent.log()


def test_run_reads_on_across_journald_restart_outage_rotation_and_vacuum(
    journald: realkernel.JournaldHandle, throwaway_container: MakeContainer, tmp_path: Path
) -> None:
    agent = RunningAgent(_args(journald, tmp_path))
    seen: list[realkernel.ThrowawayContainer] = []
    try:
        agent.wait_ready()
        _kill_and_expect(agent, throwaway_container, seen)

        journald.restart()
        _kill_and_expect(agent, throwaway_container, seen)

        # Killed while no journald runs: the kernel's ring buffer holds the report until
        # journald is back and ingests it.
        journald.stop_all()
        down = throwaway_container()
        down_kill = down.oom_kill("child")
        journald.start()
        finding = agent.wait_finding(down.container_id, timeout=20)
        assert finding["details"]["pid"] == down_kill.victim_pid
        seen.append(down)

        # The file the agent is reading is archived, then deleted.
        files_before = _inodes(journald)
        journald.rotate_and_vacuum()
        assert not files_before & _inodes(journald), "the files read so far are still there"
        _kill_and_expect(agent, throwaway_container, seen)

        _assert_each_once(agent, seen)
        assert agent.proc.poll() is None
        assert agent.metric("nodediag_collector_success", collector="kernel_log") == 1
        # Every kill counted is one reported (other kills on the machine may count too).
        assert agent.metric("nodediag_oom_kills_total") == len(agent.oom_findings)
    finally:
        assert agent.stop() == 0, agent.log()
    assert "Traceback" not in "\n".join(agent.log_lines)


def test_restart_after_its_resume_entry_was_vacuumed(
    journald: realkernel.JournaldHandle, throwaway_container: MakeContainer, tmp_path: Path
) -> None:
    """The state file names a journal entry whose file was deleted while the agent was down:
    the agent resumes at the next entry still there, reports the kill it missed, and
    nothing it had already reported."""
    first = RunningAgent(_args(journald, tmp_path))
    seen: list[realkernel.ThrowawayContainer] = []
    try:
        first.wait_ready()
        _kill_and_expect(first, throwaway_container, seen)
    finally:
        assert first.stop() == 0, first.log()

    journald.rotate_and_vacuum()
    while_down = throwaway_container()
    down_kill = while_down.oom_kill("child")

    second = RunningAgent(_args(journald, tmp_path))
    try:
        second.wait_ready()
        finding = second.wait_finding(while_down.container_id, timeout=20)
        assert finding["details"]["pid"] == down_kill.victim_pid
        _assert_each_once(second, [while_down])
        assert second.findings_for(seen[0].container_id) == []
    finally:
        assert second.stop() == 0, second.log()
