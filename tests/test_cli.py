"""The command line: offline analysis on vectors, and one clear error line for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from agentproc import json_lines, nodediag

VECTORS = Path(__file__).parent / "vectors"


def test_analyze_dmesg_reports_the_kill_as_json() -> None:
    result = nodediag(
        "analyze",
        "--kernel-log",
        str(VECTORS / "oom_dmesg.log"),
        "--json",
        "--node-name",
        "bundle-node",
    )
    assert result.returncode == 1, result.stderr
    [finding] = json_lines(result.stdout)
    assert finding["node"] == "bundle-node"
    assert finding["subject"] == {
        "kind": "Pod",
        "name": None,
        "namespace": None,
        "uid": "11112222-3333-4444-5555-666677778888",
        "container": None,
        "container_id": "0123456789abcdef" * 4,
    }
    assert finding["details"]["pid"] == 1796
    assert finding["details"]["comm"] == "python3"
    assert finding["details"]["memory_limit_kb"] == 51200
    # The task table lists sh before the victim in the container's own memory cgroup: sh
    # (the container's init) was not killed, so the container kept running.
    assert finding["reason"] == "InvisibleOOMKill"
    assert finding["details"]["scope"] == "invisible"
    assert "sh (pid 1795)" in finding["details"]["basis"]


@pytest.mark.parametrize("name", sorted(p.name for p in VECTORS.glob("oom_*.log")))
def test_analyze_finds_the_same_kill_in_every_format(name: str) -> None:
    result = nodediag("analyze", "--kernel-log", str(VECTORS / name), "--json")
    assert result.returncode == 1, result.stderr
    [finding] = json_lines(result.stdout)
    assert finding["details"]["pid"] == 1796


def test_analyze_report_is_readable() -> None:
    result = nodediag("analyze", "--kernel-log", str(VECTORS / "oom_dmesg_T.log"))
    assert result.returncode == 1
    assert "1 finding(s), 1 warning(s)" in result.stdout
    assert "process python3 (pid 1796)" in result.stdout
    assert "evidence:" in result.stdout


def test_analyze_clean_log_exits_zero(tmp_path: Path) -> None:
    log = tmp_path / "clean.log"
    log.write_bytes(b"[    0.000000] Linux version 6.1\n\xff\xfe garbage \x00\n" + b"x" * 200_000)
    result = nodediag("analyze", "--kernel-log", str(log))
    assert result.returncode == 0, result.stderr
    assert "No faults found." in result.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["analyze", "--kernel-log", "/nonexistent/dmesg"],
            "--kernel-log /nonexistent/dmesg: no such file",
        ),
        (["scan", "--since", "10 minutes"], "argument --since: invalid duration '10 minutes'"),
        (["run", "--listen", "localhost"], "argument --listen: invalid listen address 'localhost'"),
        (["run", "--kernel-log", "syslog"], "argument --kernel-log: invalid choice: 'syslog'"),
        (
            ["scan", "--kernel-log", "journal", "--journal-path", "/nonexistent/journal"],
            "--journal-path /nonexistent/journal: no such directory",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["scan", "--cluster-dns", "999.1.1.1"], "argument --cluster-dns: invalid IP address"),
        (["scan", "--dns-probe-name", "a..b"], "argument --dns-probe-name: invalid DNS name"),
        (["run", "--state-dir", "/proc/version"], "--state-dir /proc/version: not a writable"),
        (["run", "--kubeconfig", "/nonexistent/kubeconfig"], "--kubeconfig /nonexistent/"),
        (["pid", "0"], "argument PID: invalid PID '0'"),
        (["pid", "999999999"], "no process 999999999"),
        (["analyze"], "analyze needs at least one of --kernel-log, --iptables-save"),
        (["analyze", "--iptables-save", "/nonexistent"], "--iptables-save /nonexistent: no such"),
        (["analyze", "--nft-json", "/nonexistent"], "--nft-json /nonexistent: no such file"),
        (["scan", "--host-root", "/nonexistent", "--kernel-log", "kmsg"], "cannot open"),
    ],
)
def test_bad_input_is_one_clear_error(args: list[str], says: str) -> None:
    result = nodediag(*args)
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_environment_values_are_named(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from agentproc import REPO

    env = {**os.environ, "NODEDIAG_LISTEN": "nonsense"}
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run"], capture_output=True, text=True, env=env,
        cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "invalid listen address 'nonsense'" in result.stderr


def test_garbage_rule_files_are_named_as_not_checked(tmp_path: Path) -> None:
    """A file that holds no rules is not "No faults found": it is named, and exit 2 says
    something could not be checked."""
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff\xfe*filter\n:INPUT DROP [x:y]\n-A INPUT -p udp --dport 53:\n{[")
    for flag in ("--iptables-save", "--nft-json"):
        result = nodediag("analyze", flag, str(garbage))
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert "No faults found." not in result.stdout
        assert "COULD NOT CHECK" in result.stdout
        assert f"{flag} (firewall):" in result.stdout
        [failed] = json_lines(nodediag("analyze", flag, str(garbage), "--json").stdout)
        assert failed["reason"] == "CollectorFailed"
        assert failed["severity"] == "error"
        assert failed["details"]["source"] == flag


def test_an_empty_rule_file_is_no_rules(tmp_path: Path) -> None:
    """iptables-save prints nothing on a node without tables: that is checked, and clean."""
    empty = tmp_path / "empty"
    empty.write_text("")
    result = nodediag("analyze", "--iptables-save", str(empty))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No faults found." in result.stdout


def test_kmsg_needs_the_device(tmp_path: Path) -> None:
    result = nodediag("scan", "--kernel-log", "kmsg", "--host-root", str(tmp_path))
    assert result.returncode == 2
    assert "cannot open" in result.stderr
    assert "Traceback" not in result.stderr


def test_analyze_syslog_without_hostname_finds_the_memcg_kill() -> None:
    result = nodediag(
        "analyze", "--kernel-log", str(VECTORS / "oom_syslog_no_hostname.log"), "--json"
    )
    [finding] = json_lines(result.stdout)
    assert (finding["reason"], finding["subject"]["kind"]) == ("InvisibleOOMKill", "Pod")
    assert finding["details"]["constraint"] == "CONSTRAINT_MEMCG"
    assert finding["details"]["trigger"]["comm"] == "python3"
    assert finding["details"]["year_inferred"] is True
    assert "have no year" in result.stderr


def test_analyze_year_flag_dates_year_less_stamps() -> None:
    log = str(VECTORS / "oom_journal_short.log")
    result = nodediag("analyze", "--kernel-log", log, "--json", "--year", "2015")
    [finding] = json_lines(result.stdout)
    assert finding["time"].startswith("2015-11-25T07:41:49")
    assert finding["details"]["year_inferred"] is False
    bad = nodediag("analyze", "--kernel-log", log, "--year", "15")
    assert bad.returncode == 2 and "argument --year: invalid year '15'" in bad.stderr


def test_analyze_skips_and_names_lines_it_does_not_understand(tmp_path: Path) -> None:
    # An unknown stamp on every line: no line is a kernel message, none may become a finding.
    lines = (VECTORS / "oom_dmesg.log").read_text().splitlines()
    log = tmp_path / "unknown-stamps.log"
    log.write_text("".join(f"2026-11-25 07:41:49,123 node-1 kernel: {line}\n" for line in lines))
    result = nodediag("analyze", "--kernel-log", str(log), "--json")
    assert result.returncode == 0, result.stderr
    assert json_lines(result.stdout) == []
    assert "3 OOM report line(s) not understood, skipped (line 6, line 84, line 85)" in (
        result.stderr
    )


def test_analyze_counts_unstamped_lines_in_a_stamped_file(tmp_path: Path) -> None:
    log = tmp_path / "dmesg.log"
    text = (VECTORS / "oom_dmesg.log").read_text()
    log.write_text(text + "Killed process 1796 (python3) pasted without its stamp\n")
    result = nodediag("analyze", "--kernel-log", str(log), "--json")
    assert [f["details"]["pid"] for f in json_lines(result.stdout)] == [1796]
    assert "1 line(s) in no log format understood, skipped (line 86)" in result.stderr
