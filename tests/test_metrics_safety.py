"""Issue 7, Security: the metrics endpoint serves only GET/HEAD of its three paths; names from
containers and logs are escaped and bounded in labels; OOM series are bounded in number."""

from __future__ import annotations

import http.client
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import realkernel
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.http import HttpServer, make_app
from agent.metrics import LABEL_LIMIT, BoundedRegistry, Metrics, bound_label
from collectors.finding import Finding, Subject

HOSTILE = [
    'a"b\\nc}',
    'x",scope="system',
    "line\nbreak",
    "back\\slash\\",
    '} nodediag_oom_kills_total{pod="fake"} 1e9\n# TYPE x counter',
    "ünïcødé ☃ \t tab",
    "",
]


def oom(pod: str, namespace: str = "ns", container: str = "c", uid: str | None = None) -> Finding:
    return Finding(
        reason="InvisibleOOMKill",
        severity="warning",
        time=datetime.now(UTC),
        node="n",
        subject=Subject(
            kind="Pod", name=pod, namespace=namespace, uid=uid or pod, container=container
        ),
        message="m",
        details={"scope": "invisible"},
    )


def oom_samples(metrics: Metrics) -> dict[tuple[str, str, str, str], float]:
    text = generate_latest(metrics.registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "nodediag_oom_kills_total":
                key = (s.labels["scope"], s.labels["namespace"], s.labels["pod"],
                       s.labels["container"])  # fmt: skip
                found[key] = s.value
    return found


def promtool_check(text: bytes) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        realkernel.skip_or_fail("promtool not installed (Debian package prometheus)")
        return
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ escaping and length


def test_hostile_label_values_are_escaped_and_round_trip() -> None:
    metrics = Metrics()
    for i, value in enumerate(HOSTILE):
        metrics.record_finding(oom(pod=value or f"p{i}", namespace=value, container=value))
    # A collector's own metric on the same registry (e.g. a rule comment as a label).
    comment = Gauge("nodediag_test_rule", "t", ["comment"], registry=metrics.registry)
    for value in HOSTILE:
        comment.labels(comment=value).set(1)
    text = generate_latest(metrics.registry)
    promtool_check(text)
    samples = oom_samples(metrics)
    for i, value in enumerate(HOSTILE):
        assert samples[("invisible", value, value or f"p{i}", value)] == 1
    parsed = {
        s.labels["comment"]
        for f in text_string_to_metric_families(text.decode())
        for s in f.samples
        if s.name == "nodediag_test_rule"
    }
    assert parsed == set(HOSTILE)
    # No injected series or scope: exactly one OOM series per finding, all "invisible".
    assert len(samples) == len(HOSTILE)
    assert {k[0] for k in samples} == {"invisible"}


def test_bound_label_is_short_stable_and_keeps_long_values_apart() -> None:
    assert bound_label("short") == "short"
    assert bound_label("x" * LABEL_LIMIT) == "x" * LABEL_LIMIT
    a, b = "p" * 300 + "a", "p" * 300 + "b"
    assert len(bound_label(a)) == LABEL_LIMIT
    assert bound_label(a) == bound_label(a) != bound_label(b)
    assert bound_label(a).startswith("p" * (LABEL_LIMIT - 9) + "~")


def test_every_label_on_the_registry_is_bounded() -> None:
    """The agent's own OOM series and a collector's metric on the same registry."""
    metrics = Metrics()
    long_pod = "pod-" + "z" * 400
    metrics.record_finding(oom(pod=long_pod, container='c"' * 200))
    iface = Gauge("nodediag_test_iface", "t", ["interface"], registry=metrics.registry)
    iface.labels(interface="i" * 1000).set(1)
    for registry in (metrics.registry, metrics.registry.restricted_registry(
            ["nodediag_test_iface", "nodediag_oom_kills_total"])):  # fmt: skip
        text = generate_latest(registry)
        promtool_check(text)
        values = [
            v
            for f in text_string_to_metric_families(text.decode())
            for s in f.samples
            for v in s.labels.values()
        ]
        assert values and max(len(v) for v in values) <= LABEL_LIMIT
        assert bound_label(long_pod) in values
        assert bound_label("i" * 1000) in values


def test_bounded_registry_leaves_short_values_alone() -> None:
    plain, bounded = CollectorRegistry(), BoundedRegistry()
    for r in (plain, bounded):
        Gauge("g", "g", ["l"], registry=r).labels(l='a"b\\nc}').set(2)
    assert generate_latest(plain) == generate_latest(bounded)


# ------------------------------------------------------------------ series count


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_series_of_pods_gone_expire_after_the_ttl() -> None:
    clock = Clock()
    metrics = Metrics(clock=clock, oom_series_ttl=24 * 3600)
    metrics.record_finding(oom("old", uid="u-old"))
    metrics.record_finding(oom("alive", uid="u-alive"))
    node = oom("x")
    node = Finding(**{**{f: getattr(node, f) for f in node.__dataclass_fields__},
                      "subject": Subject(kind="Node", name="n")})  # fmt: skip
    metrics.record_finding(node)  # no pod: never expires
    clock.now += 23 * 3600
    metrics.record_finding(oom("recent", uid="u-recent"))
    assert metrics.expire_oom_series(lambda uid: uid == "u-alive") == 0
    clock.now += 2 * 3600  # "old" unseen for 25 h; "alive" was seen 2 h ago (on the node)
    assert metrics.expire_oom_series(lambda uid: False) == 1
    pods = {k[2] for k in oom_samples(metrics)}
    assert pods == {"alive", "recent", ""}
    clock.now += 25 * 3600
    assert metrics.expire_oom_series() == 2
    assert {k[2] for k in oom_samples(metrics)} == {""}
    assert metrics.oom_series == 1
    # A pod seen again after expiry starts a new series (a counter reset for Prometheus).
    metrics.record_finding(oom("old", uid="u-old"))
    assert oom_samples(metrics)[("invisible", "ns", "old", "c")] == 1


def test_oom_series_are_capped_oldest_first() -> None:
    clock = Clock()
    metrics = Metrics(clock=clock, max_oom_series=50)
    for i in range(120):
        clock.now += 1
        metrics.record_finding(oom(f"p{i}"))
    clock.now += 1
    assert {k[2] for k in oom_samples(metrics)} == {f"p{i}" for i in range(70, 120)}
    metrics.record_finding(oom("p70"))  # the oldest, seen again: now the newest
    metrics.record_finding(oom("p200"))  # a new series pushes out the oldest, p71
    pods = {k[2] for k in oom_samples(metrics)}
    assert len(pods) == 50 == metrics.oom_series
    assert pods == {f"p{i}" for i in range(72, 120)} | {"p70", "p200"}
    assert oom_samples(metrics)[("invisible", "ns", "p70", "c")] == 2
    metrics.max_oom_series = 10
    assert metrics.expire_oom_series() == 40
    assert metrics.oom_series == 10


# ------------------------------------------------------------------ the endpoint


@pytest.fixture
def port() -> Iterator[int]:
    app = make_app(Metrics().registry, lambda: (True, "ok"), lambda: (True, "ready"))
    server = HttpServer("127.0.0.1", 0, app)
    server.start()
    yield server.port
    server.stop()


def request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=b"x" if method in ("POST", "PUT", "PATCH") else None)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
def test_get_and_head_of_the_documented_paths(port: int, path: str) -> None:
    status, headers, body = request(port, "GET", path)
    assert status == 200 and body
    status, head_headers, head_body = request(port, "HEAD", path)
    assert status == 200 and head_body == b""
    assert head_headers["Content-Type"] == headers["Content-Type"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FOO"])
@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
def test_other_methods_are_405(port: int, method: str, path: str) -> None:
    status, headers, body = request(port, method, path)
    assert status == 405, (method, path, body)
    assert headers["Allow"] == "GET, HEAD"
    assert b"nodediag_" not in body


@pytest.mark.parametrize(
    "path",
    ["/", "/metrics/", "/metrics/x", "/favicon.ico", "/debug", "/../etc/passwd", "/METRICS",
     "/healthz/../metrics", "/metrics%00"],
)  # fmt: skip
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_other_paths_are_404(port: int, path: str, method: str) -> None:
    status, _, body = request(port, method, path)
    assert status == 404
    assert b"nodediag_" not in body


def test_count_oom_is_bounded_like_findings() -> None:
    """Counter-reconciled kills (no finding) go through the same bookkeeping."""
    clock = Clock()
    metrics = Metrics(clock=clock, max_oom_series=2, oom_series_ttl=60)
    long_name = "p" * 500
    metrics.count_oom("unknown", Subject(kind="Pod", name=long_name, namespace="ns"), 3)
    assert oom_samples(metrics) == {("unknown", "ns", bound_label(long_name), ""): 3}
    metrics.count_oom("unknown", Subject(kind="Pod", name="b", namespace="ns"), 1)
    metrics.count_oom("unknown", Subject(kind="Pod", name="c", namespace="ns"), 1)
    assert {k[2] for k in oom_samples(metrics)} == {"b", "c"}
    clock.now += 61
    assert metrics.expire_oom_series() == 2 and metrics.oom_series == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_idle_server_stops_at_once(host: str) -> None:
    """The server thread sleeps in select() for IDLE_POLL seconds between shutdown checks
    (no wake-ups while idle); stop() still ends it at once."""
    import time

    from agent import http as agent_http

    assert agent_http.IDLE_POLL >= 10
    app = make_app(CollectorRegistry(), lambda: (True, ""), lambda: (True, ""))
    server = HttpServer(host, 0, app)
    server.start()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("GET", "/healthz")
    assert connection.getresponse().status == 200
    connection.close()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2
    assert not server._thread.is_alive()
