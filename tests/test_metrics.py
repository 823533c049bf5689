"""The /metrics exposition passes `promtool check metrics`; health endpoints answer."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from datetime import UTC, datetime

import pytest
import realkernel
from prometheus_client import generate_latest

from agent.http import HttpServer, make_app
from agent.metrics import Metrics
from collectors.finding import Finding, Subject


def sample_metrics() -> Metrics:
    metrics = Metrics()
    metrics.start_source("journal")
    metrics.add_records("journal", 12)
    metrics.set_lost("kmsg", 3)
    metrics.collector_success.labels(collector="kernel_log").set(1)
    metrics.collector_duration.labels(collector="kernel_log").set(0.002)
    metrics.record_finding(
        Finding(
            reason="InvisibleOOMKill",
            severity="warning",
            time=datetime.now(UTC),
            node="n",
            subject=Subject(kind="Pod", uid="u", container_id="c"),
            message="m",
            details={"scope": "invisible"},
        )
    )
    return metrics


def test_exposition_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        realkernel.skip_or_fail("promtool not installed (Debian package prometheus)")
    text = generate_latest(sample_metrics().registry)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        b'nodediag_oom_kills_total{container="",namespace="",pod="",scope="invisible"} 1.0' in text
    )
    assert b'nodediag_kernel_log_lost_records_total{source="kmsg"} 3.0' in text
    assert b"nodediag_build_info{version=" in text


def test_lost_counter_follows_the_running_total() -> None:
    metrics = Metrics()
    metrics.set_lost("kmsg", 3)
    metrics.set_lost("kmsg", 3)
    metrics.set_lost("kmsg", 5)
    assert (
        metrics.registry.get_sample_value(
            "nodediag_kernel_log_lost_records_total", {"source": "kmsg"}
        )
        == 5
    )


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def server() -> object:
    state = {"healthy": True, "ready": False}
    app = make_app(
        sample_metrics().registry,
        lambda: (state["healthy"], "loop ok"),
        lambda: (state["ready"], "catching up"),
    )
    http = HttpServer("127.0.0.1", 0, app)
    http.start()
    yield http, state
    http.stop()


def test_health_endpoints(server: tuple[HttpServer, dict[str, bool]]) -> None:
    http, state = server
    assert _get(http.port, "/healthz") == (200, "loop ok\n")
    assert _get(http.port, "/readyz")[0] == 503
    state["ready"] = True
    assert _get(http.port, "/readyz")[0] == 200
    state["healthy"] = False
    assert _get(http.port, "/healthz")[0] == 503
    status, body = _get(http.port, "/metrics")
    assert status == 200 and "nodediag_oom_kills_total" in body
    assert _get(http.port, "/nope")[0] == 404
