"""End to end with a real Prometheus (Debian's ``/usr/bin/prometheus``) on loopback: it
scrapes a running ``nodediag run`` every second with ``daemonset/alerts/nodediag.rules.yaml``
loaded; a real OOM kill of a child process in a throwaway kubepods-style cgroup must show up
in Prometheus as ``nodediag_oom_kills_total{scope="invisible"}`` and fire
``NodediagInvisibleOOMKill`` (the rule fires on the first kill by design: no ``for:``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import realkernel
import yaml
from agentproc import RunningAgent, free_port

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "daemonset" / "alerts" / "nodediag.rules.yaml"
ALERT = "NodediagInvisibleOOMKill"
INVISIBLE = 'nodediag_oom_kills_total{scope="invisible"}'


class Prometheus:
    """A real Prometheus server on 127.0.0.1 with a temporary TSDB."""

    def __init__(
        self,
        workdir: Path,
        target: str,
        rule_files: list[Path],
        jobs: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """``jobs``: more scrape jobs of the target, by name, with their scrape settings."""
        binary = shutil.which("prometheus")
        if binary is None:
            realkernel.skip_or_fail("prometheus not installed (Debian package prometheus)")
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": name, "static_configs": [{"targets": [target]}], **settings}
                for name, settings in {"nodediag": {}, **(jobs or {})}.items()
            ],
        }
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def api(self, path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=5) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("/api/v1/query", query=expr)["result"]
        return result

    def wait(self, what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log()}")
            try:
                found = check()
            except (OSError, urllib.error.URLError):
                found = None
            if found:
                return found
            time.sleep(0.25)
        raise TimeoutError(f"{what} not seen in {timeout}s; prometheus log:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def state_at_end_of_kmsg(tmp_path: Path) -> Path:
    """A state dir whose saved position is the current end of /dev/kmsg: an agent started
    with it counts only kills from now on (earlier tests' kills are in the same log)."""
    state = tmp_path / "state"
    agent = RunningAgent(["--no-kube", "--kernel-log", "kmsg", "--state-dir", str(state)])
    try:
        agent.wait_ready()
    finally:
        assert agent.stop() == 0, agent.log()
    assert any(state.iterdir()), "the agent saved no position"
    return state


@pytest.fixture
def running(
    tmp_path: Path, state_at_end_of_kmsg: Path
) -> Iterator[tuple[RunningAgent, Prometheus]]:
    agent = RunningAgent(
        [
            "--no-kube",
            "--kernel-log",
            "kmsg",
            "--state-dir",
            str(state_at_end_of_kmsg),
            "--node-name",
            "e2e-node",
        ]
    )
    prometheus: Prometheus | None = None
    try:
        agent.wait_ready()
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        prometheus = Prometheus(workdir, f"127.0.0.1:{agent.port}", [RULES])
        yield agent, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        agent.stop()


def test_real_prometheus_sees_the_kill_and_fires_the_alert(
    running: tuple[RunningAgent, Prometheus],
    throwaway_container: Callable[..., realkernel.ThrowawayContainer],
) -> None:
    agent, prometheus = running
    # The target is up and the rules are loaded.
    prometheus.wait("the nodediag target up", lambda: prometheus.query('up{job="nodediag"} == 1'))
    groups = prometheus.api("/api/v1/rules")["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert ALERT in loaded
    assert {"NodediagDNSDropRule", "NodediagAgentDown"} <= loaded
    prometheus.wait(
        "nodediag_build_info scraped", lambda: prometheus.query("nodediag_build_info == 1")
    )
    # Scraped for a few rounds. Normally no invisible kill is known yet and nothing fires;
    # the kernel log is the machine's, so a kill made meanwhile by another process on this
    # machine would count too: then only the rise is ours.
    time.sleep(3)
    before = _value(prometheus.query(INVISIBLE))
    if before == 0:
        assert not _alerts(prometheus, ALERT)

    container = throwaway_container(qos="burstable")
    kill = container.oom_kill("child")
    assert kill.victim_pid != kill.init_pid
    finding = agent.wait_finding(container.container_id)
    assert finding["reason"] == "InvisibleOOMKill"

    samples = prometheus.wait(
        "the invisible OOM kill counter",
        lambda: (found := prometheus.query(INVISIBLE)) and _value(found) >= before + 1 and found,
    )
    assert {s["metric"]["job"] for s in samples} == {"nodediag"}
    assert {s["metric"]["scope"] for s in samples} == {"invisible"}

    alerts = prometheus.wait(
        f"{ALERT} firing",
        lambda: [a for a in _alerts(prometheus, ALERT) if a["state"] == "firing"],
        timeout=30,
    )
    alert = alerts[0]
    assert alert["labels"]["severity"] == "warning"
    assert alert["labels"]["instance"] == f"127.0.0.1:{agent.port}"
    assert float(alert["value"]) >= 1.0
    assert alert["annotations"]["runbook_url"].endswith(f"docs/runbooks/{ALERT}.md")
    # The scraped agent is healthy: no agent or collector alert goes off.
    assert not _alerts(prometheus, "NodediagAgentDown")
    assert prometheus.query('ALERTS{alertname="NodediagAgentAbsent"}') == []


def _alerts(prometheus: Prometheus, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = prometheus.api("/api/v1/alerts")["alerts"]
    return [a for a in found if a["labels"]["alertname"] == name]


def _value(samples: list[dict[str, Any]]) -> float:
    return sum(float(s["value"][1]) for s in samples)
