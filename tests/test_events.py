"""The Event sink and the pod lookup against the Kubernetes API stand-in (in process).

Each test drives a real ``EventSink`` over the real HTTP client (``agent.kube``) against
``kube_standin``, which validates every body against the official schemas and the API
server's Event rules. Time-dependent behaviour (backoff, Retry-After, flush intervals, a
60 s outage) runs on a fake clock: ``Sim.run`` advances it by what ``step()`` asks for.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kube_standin as ks
import pytest
from prometheus_client import CollectorRegistry

from agent.event_body import isomorphic_key, trim_utf8
from agent.events import EventSink, EventSinkOptions
from agent.kube import (
    JSON,
    Api,
    KubeClient,
    KubeConfigSource,
    KubeError,
    KubeUnreachable,
    config_source,
    connect,
)
from agent.kube_services import fan_out, start_event_sink
from agent.pod_lookup import PodLookup
from agent.settings import Settings
from collectors.finding import Finding, Subject

NODE = "node-1"
POD_UID = "0b4f3c1e-0000-4000-8000-000000000001"
MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
OOM_REASONS = ("InvisibleOOMKill", "ContainerOOMKill", "OOMKill", "SystemOOMKill")


# ----------------------------------------------------------------------------- helpers


def pod_finding(
    reason: str = "InvisibleOOMKill",
    container: str | None = "app",
    *,
    uid: str = POD_UID,
    name: str | None = "web-0",
    namespace: str | None = "shop",
    message: str | None = None,
    when: datetime | None = None,
) -> Finding:
    message = message or (
        f"process worker (pid 4885) in container {container} of pod shop/web-0 was "
        "OOM-killed; the container kept running. Raise the container's memory limit"
    )
    return Finding(
        reason=reason,
        severity="warning",
        time=when or datetime.now(UTC),
        node=NODE,
        subject=Subject("Pod", name, namespace, uid, container, "4f1a" + "0" * 60),
        message=message,
        details={"scope": "invisible", "pid": 4885},
    )


def node_finding(reason: str = "DNSDropRule", severity: str = "warning", **details: Any) -> Finding:
    details = details or {"family": "ipv4", "table": "filter", "chain": "INPUT",
                          "rule": "-A INPUT -p udp --dport 53 -j DROP"}  # fmt: skip
    return Finding(
        reason=reason,
        severity=severity,  # type: ignore[arg-type]
        time=None,
        node=NODE,
        subject=Subject("Node", NODE),
        message=f"{reason} on node {NODE} ({details.get('chain')}); fix: remove the rule",
        details=details,
    )


def pod_object(name: str = "web-0", namespace: str = "shop", uid: str = POD_UID,
               containers: Mapping[str, str] | None = None) -> JSON:  # fmt: skip
    containers = containers or {"app": "4f1a" + "0" * 60}
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {
            "nodeName": NODE,
            "containers": [{"name": c, "image": "busybox"} for c in containers],
        },
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": c,
                    "containerID": f"containerd://{cid}",
                    "image": "busybox:latest",
                    "imageID": "",
                    "ready": True,
                    "restartCount": 0,
                }
                for c, cid in containers.items()
            ],
        },
    }


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.wall0 = datetime(2026, 11, 25, 7, 0, 0, 123456, tzinfo=UTC)

    def __call__(self) -> float:
        return self.t

    def now(self) -> datetime:
        return self.wall0 + timedelta(seconds=self.t - 1000.0)

    def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 0.0)


class Recorder:
    """An ``Api`` in front of the real client: logs (fake time, method, path, outcome)."""

    def __init__(self, client: Api, clock: Callable[[], float]) -> None:
        self.client = client
        self.clock = clock
        self.calls: list[tuple[float, str, str, str]] = []
        self.lose_answer_once: str | None = None  # method whose answer is lost once

    def request(self, method: str, path: str, **kwargs: Any) -> JSON:
        try:
            answer = self.client.request(method, path, **kwargs)
        except KubeError as error:
            self.calls.append((self.clock(), method, path, str(error.status)))
            raise
        except KubeUnreachable:
            self.calls.append((self.clock(), method, path, "unreachable"))
            raise
        self.calls.append((self.clock(), method, path, "ok"))
        if self.lose_answer_once == method:
            self.lose_answer_once = None
            raise KubeUnreachable("answer lost (test)")
        return answer

    def watch(
        self, path: str, query: Mapping[str, str], *, timeout: float,
        stop: threading.Event | None = None,
    ) -> Iterator[JSON]:  # fmt: skip
        return self.client.watch(path, query, timeout=timeout, stop=stop)

    def writes(self) -> list[tuple[float, str, str, str]]:
        return [c for c in self.calls if c[1] in ("POST", "PATCH")]


class Sim:
    """A sink on a fake clock, stepped in the test's thread."""

    def __init__(
        self,
        client: Api,
        registry: CollectorRegistry | None = None,
        pods: PodLookup | None = None,
        **options: Any,
    ) -> None:
        self.clock = FakeClock()
        self.api = Recorder(client, self.clock)
        self.registry = registry or CollectorRegistry()
        self.sink = EventSink(
            NODE,
            self.api,
            self.registry,
            pods=pods,
            options=EventSinkOptions(**{"flush_interval": 10.0, **options}),
            clock=self.clock,
            now=self.clock.now,
            sleep=self.clock.sleep,
            rand=lambda: 0.5,
        )
        self.on_tick: Callable[[float], None] = lambda _t: None

    def run(self, seconds: float, max_steps: int = 10_000) -> None:
        """Step the sink for ``seconds`` of fake time."""
        end = self.clock.t + seconds
        for _ in range(max_steps):
            self.on_tick(self.clock.t)
            delay = self.sink.step()
            if self.clock.t >= end:
                return
            self.clock.sleep(min(delay, end - self.clock.t) if delay > 0 else 0.0)
        raise AssertionError("sink did not settle")

    def settle(self, seconds: float = 60.0) -> None:
        """Run until nothing is pending (or fail after ``seconds``)."""
        end = self.clock.t + seconds
        while self.sink.pending():
            assert self.clock.t < end, f"still pending: {self.sink.pending()}"
            self.run(1.0)

    def metric(self, reason: str, result: str) -> float:
        value = self.registry.get_sample_value(
            "nodediag_events_total", {"reason": reason, "result": result}
        )
        return value or 0.0


@pytest.fixture
def api() -> Iterator[ks.KubeStandin]:
    with ks.running() as standin:
        standin.add_node(NODE)
        yield standin


@pytest.fixture
def client(api: ks.KubeStandin, tmp_path: Path) -> Iterator[KubeClient]:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    kube = connect(KubeConfigSource("kubeconfig", kubeconfig))
    yield kube
    kube.close()


def only_event(
    api: ks.KubeStandin, namespace: str | None = None, *, group: str = ks.EVENTS_GROUP
) -> JSON:
    events = api.events(namespace, group=group)
    assert len(events) == 1, events
    return events[0]


# ----------------------------------------------------------------------------- fields


@pytest.mark.parametrize("reason", OOM_REASONS)
def test_pod_findings_land_on_the_pod(api: ks.KubeStandin, client: KubeClient, reason: str) -> None:
    sim = Sim(client)
    finding = pod_finding(reason)
    sim.sink.submit(finding)
    sim.settle()

    event = only_event(api, "shop")
    assert event["regarding"] == {
        "apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "web-0", "uid": POD_UID,
    }  # fmt: skip
    assert event["reason"] == reason
    assert event["type"] == "Warning"
    assert event["action"] == "Detected"
    assert event["reportingController"] == "nodediag.io/agent"
    assert event["reportingInstance"] == f"nodediag-{NODE}"
    assert event["note"] == finding.message
    assert MICRO.match(event["eventTime"])
    assert finding.time is not None
    assert event["eventTime"] == finding.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert "series" not in event
    assert event["metadata"]["name"].startswith("web-0.")
    assert sim.metric(reason, "created") == 1


@pytest.mark.parametrize(
    ("reason", "severity", "details"),
    [
        (
            "DNSDropRule",
            "warning",
            {"chain": "INPUT", "rule": "-A INPUT -p udp --dport 53 -j DROP"},
        ),
        ("DNSNoEndpointsReject", "info", {"chain": "KUBE-SERVICES", "rule": "-j REJECT"}),
        ("VXLANChecksumOffload", "warning", {"interface": "flannel.1"}),
        ("DNSProbeFailed", "warning", {"server": "10.43.0.10", "protocol": "udp"}),
        ("NodeProcessOOMKill", "warning", {"memcg": "/system.slice/foo.service"}),
    ],
)
def test_node_findings_land_on_the_node_in_default(
    api: ks.KubeStandin, client: KubeClient, reason: str, severity: str, details: JSON
) -> None:
    sim = Sim(client)
    sim.sink.submit(node_finding(reason, severity, **details))
    sim.settle()

    event = only_event(api)
    assert event["metadata"]["namespace"] == "default"
    # kubelet's convention (the name as uid): what `kubectl describe node` searches for
    assert event["regarding"] == {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": NODE}
    assert event["reason"] == reason
    assert event["type"] == ("Warning" if severity == "warning" else "Normal")
    assert MICRO.match(event["eventTime"])


def test_system_oom_without_pod_goes_on_the_node(api: ks.KubeStandin, client: KubeClient) -> None:
    sim = Sim(client)
    message = "process java (pid 1) was killed because node node-1 ran out of memory"
    finding = Finding(
        "SystemOOMKill", "warning", datetime.now(UTC), NODE, Subject("Node", NODE), message
    )
    sim.sink.submit(finding)
    sim.settle()
    assert only_event(api, "default")["regarding"]["kind"] == "Node"


def test_note_is_trimmed_to_1kib_on_a_character_boundary(
    api: ks.KubeStandin, client: KubeClient
) -> None:
    sim = Sim(client)
    sim.sink.submit(pod_finding(message="é" * 700 + " fix: raise the limit"))
    sim.settle()
    note = only_event(api)["note"]
    assert len(note.encode()) <= 1024
    assert note.endswith("…") and note.startswith("éé")
    assert trim_utf8("x" * 1024) == "x" * 1024
    assert trim_utf8("€" * 400).encode().__len__() <= 1024


def test_isomorphic_keys() -> None:
    assert isomorphic_key(pod_finding(container="app")) != isomorphic_key(
        pod_finding(container="b")
    )
    rule = node_finding(chain="INPUT", rule="-j DROP")
    assert isomorphic_key(rule) != isomorphic_key(node_finding(chain="FORWARD", rule="-j DROP"))
    vx = node_finding("VXLANChecksumOffload", interface="flannel.1")
    assert isomorphic_key(vx) == "interface=flannel.1"


def test_pod_known_only_by_uid_is_named_from_the_watch(
    api: ks.KubeStandin, client: KubeClient
) -> None:
    api.add_pod(pod_object())
    pods, stop = _run_lookup(client)
    try:
        assert pods.synced.wait(5)
        sim = Sim(client, pods=pods)
        sim.sink.submit(pod_finding(name=None, namespace=None, container=None))
        sim.settle()
    finally:
        stop.set()
    event = only_event(api, "shop")
    assert event["regarding"]["name"] == "web-0"
    assert event["regarding"]["uid"] == POD_UID


def test_pod_nobody_can_name_goes_on_the_node(api: ks.KubeStandin, client: KubeClient) -> None:
    sim = Sim(client)
    sim.sink.submit(pod_finding(name=None, namespace=None, message="pod uid x: killed"))
    sim.settle()
    event = only_event(api, "default")
    assert event["regarding"]["kind"] == "Node"
    assert event["note"] == "pod uid x: killed"


# ----------------------------------------------------------------------------- aggregation


def test_repeats_make_one_event_whose_series_counts_them(
    api: ks.KubeStandin, client: KubeClient
) -> None:
    sim = Sim(client)
    for _ in range(7):
        sim.sink.submit(pod_finding())
        sim.run(3.0)
    sim.settle()
    event = only_event(api)
    assert event["series"]["count"] == 7
    assert MICRO.match(event["series"]["lastObservedTime"])
    # 1 create, then at most one patch per flush interval (10 s) over ~21 s
    assert [c[1] for c in sim.api.writes()] == ["POST", "PATCH", "PATCH"]
    assert sim.metric("InvisibleOOMKill", "created") == 1
    assert sim.metric("InvisibleOOMKill", "updated") == 2


def test_another_container_is_another_event(api: ks.KubeStandin, client: KubeClient) -> None:
    sim = Sim(client)
    for container in ("app", "sidecar", "app"):
        sim.sink.submit(pod_finding(container=container))
    sim.settle()
    counts = sorted((e["series"]["count"] if "series" in e else 1) for e in api.events())
    assert counts == [1, 2]


def test_series_ends_after_idle_time(api: ks.KubeStandin, client: KubeClient) -> None:
    sim = Sim(client, series_idle=360.0)
    sim.sink.submit(pod_finding())
    sim.sink.submit(pod_finding())
    sim.settle()
    sim.run(400)
    sim.sink.submit(pod_finding())
    sim.settle()
    events = api.events()
    assert len(events) == 2
    assert events[0]["series"]["count"] == 2 and "series" not in events[1]


def test_oom_storm_makes_a_handful_of_calls_and_a_node_finding_goes_out_at_once(
    api: ks.KubeStandin, client: KubeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """1,000 kills in one pod over 5 s (real time, real worker thread)."""
    registry = CollectorRegistry()
    sink = EventSink(NODE, client, registry, options=EventSinkOptions(flush_interval=2.0))
    stop = threading.Event()
    worker = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    worker.start()
    node_submitted = node_seen = 0.0
    try:
        for i in range(1000):
            sink.submit(pod_finding())
            if i == 500:
                node_submitted = time.monotonic()
                sink.submit(node_finding("DNSProbeFailed", server="10.43.0.10"))
            time.sleep(0.005)
            if (
                node_submitted
                and not node_seen
                and any(e["reason"] == "DNSProbeFailed" for e in api.events())
            ):
                node_seen = time.monotonic()
        assert api.wait_for(lambda s: any(e["reason"] == "DNSProbeFailed" for e in s.events()))
        node_seen = node_seen or time.monotonic()
        assert sink.flush(10) == 0
    finally:
        stop.set()
        sink.wake()
        worker.join(10)
    storm = only_event(api, "shop")
    assert storm["series"]["count"] == 1000
    writes = api.requests_matching(path=r"/namespaces/shop/events")
    assert len(writes) <= 6, [(r.method, r.status) for r in writes]
    assert node_seen - node_submitted < 0.5
    with capsys.disabled():
        print(f"\nstorm: 1000 findings -> {len(writes)} API writes "
              f"({len(writes) / 1000:.3f} per finding); node finding after "
              f"{node_seen - node_submitted:.3f} s")  # fmt: skip


def test_token_bucket_is_per_object_and_reason(api: ks.KubeStandin, client: KubeClient) -> None:
    sim = Sim(client, burst=2, refill_seconds=30.0)
    for chain in ("A", "B", "C"):
        sim.sink.submit(node_finding(chain=chain, rule=f"-A {chain} -j DROP"))
    sim.sink.submit(pod_finding())
    sim.run(1.0)
    reasons = sorted(e["reason"] for e in api.events())
    assert reasons == ["DNSDropRule", "DNSDropRule", "InvisibleOOMKill"]  # the third rule waits
    sim.run(31.0)
    assert len(api.events()) == 4


# ----------------------------------------------------------------------------- failures


def test_outage_of_60s_500s_then_drops_loses_nothing(
    api: ks.KubeStandin, client: KubeClient
) -> None:
    sim = Sim(client)
    sim.run(0.1)  # connected
    start = sim.clock.t
    phase = ["up"]

    def faults(t: float) -> None:
        wanted = "500" if t - start < 30 else "drop" if t - start < 60 else "up"
        if wanted != phase[0]:
            api.clear_faults()
            if wanted == "500":
                api.fail_next(500, count=10**6)
            elif wanted == "drop":
                api.drop_next(count=10**6)
            phase[0] = wanted

    sim.on_tick = faults
    expected: dict[tuple[str, str], int] = {}
    for second in range(60):
        container = f"c{second % 3}"
        sim.sink.submit(pod_finding(container=container))
        key = ("InvisibleOOMKill", container)
        expected[key] = expected.get(key, 0) + 1
        if second in (10, 45):
            sim.sink.submit(node_finding(chain=f"X{second}", rule=f"-A X{second} -j DROP"))
            expected[("DNSDropRule", f"X{second}")] = 1
        sim.run(1.0)
    assert phase[0] == "drop" or sim.clock.t - start >= 60
    assert api.events() == []  # nothing got through during the outage
    sim.run(5.0)
    assert phase[0] == "up"
    sim.settle(120)

    got: dict[tuple[str, str], int] = {}
    for event in api.events():
        match = re.search(r"in container (\S+) |(X\d+)", event["note"])
        assert match is not None, event["note"]
        key = (event["reason"], match.group(1) or match.group(2))
        assert key not in got, "one Event per fault"
        got[key] = event.get("series", {}).get("count", 1)
    assert got == expected
    assert sim.metric("InvisibleOOMKill", "dropped") == 0
    assert sim.metric("InvisibleOOMKill", "failed") > 0
    failed_attempts = [c for c in sim.api.calls if c[3] != "ok"]
    # backoff: a handful of attempts per minute, not a hammering
    assert len(failed_attempts) < 30, len(failed_attempts)
    recovered_at = start + 60
    first_ok = min(c[0] for c in sim.api.writes() if c[3] == "ok")
    assert first_ok - recovered_at < 31  # the backoff cap


def test_429_retry_after_is_honored(api: ks.KubeStandin, client: KubeClient) -> None:
    sim = Sim(client)
    sim.run(0.1)
    api.fail_next(429, method="POST", retry_after=7)
    sim.sink.submit(pod_finding())
    sim.settle()
    posts = [c for c in sim.api.calls if c[1] == "POST"]
    assert [c[3] for c in posts] == ["429", "ok"]
    assert posts[1][0] - posts[0][0] >= 7
    assert sim.metric("InvisibleOOMKill", "failed") == 1
    assert sim.metric("InvisibleOOMKill", "created") == 1


def test_5xx_and_dropped_connections_are_retried_with_backoff(
    api: ks.KubeStandin, client: KubeClient
) -> None:
    sim = Sim(client)
    sim.run(0.1)
    api.fail_next(503, count=2, method="POST")
    api.drop_next(count=2, method="POST")
    sim.sink.submit(pod_finding())
    sim.settle()
    posts = [c for c in sim.api.calls if c[1] == "POST"]
    assert [c[3] for c in posts] == ["503", "503", "unreachable", "unreachable", "ok"]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(posts)]
    assert gaps == sorted(gaps) and gaps[0] > 0  # growing delays (jitter fixed at 0.5)
    assert len(api.events()) == 1


def test_403_is_logged_once_naming_the_permission(
    api: ks.KubeStandin, client: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "agent.events")
    api.forbid("create", "events", "events.k8s.io")
    sim = Sim(client)
    sim.sink.submit(pod_finding())
    sim.sink.submit(node_finding())
    sim.run(300)
    lines = [r.getMessage() for r in caplog.records if "not allowed" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "create" in lines[0] and "events.k8s.io" in lines[0]
    assert sim.metric("InvisibleOOMKill", "failed") >= 2
    api.clear_faults()  # RBAC fixed: what waited goes out
    sim.settle(400)
    assert len(api.events()) == 2


def test_core_v1_fallback(tmp_path: Path) -> None:
    with ks.running(serve_events_v1=False) as api:
        api.add_node(NODE)
        client = connect(KubeConfigSource("kubeconfig", api.write_kubeconfig(tmp_path / "kc")))
        sim = Sim(client)
        for _ in range(3):
            sim.sink.submit(pod_finding())
        sim.sink.submit(node_finding())
        sim.settle()
        sim.sink.submit(pod_finding())
        sim.run(11)
        pod = only_event(api, "shop", group="")
        assert pod["involvedObject"]["uid"] == POD_UID
        assert pod["reportingComponent"] == "nodediag.io/agent"
        assert (pod["series"]["count"], pod["count"]) == (4, 4)
        node = only_event(api, "default", group="")
        assert node["involvedObject"]["kind"] == "Node"
        assert all("/api/v1/" in r.path for r in api.requests_matching("POST"))


def test_patch_of_a_deleted_event_recreates_it_with_the_full_count(
    api: ks.KubeStandin, client: KubeClient
) -> None:
    sim = Sim(client)
    sim.sink.submit(pod_finding())
    sim.settle()
    name = only_event(api)["metadata"]["name"]
    api.delete_event("shop", name)
    sim.sink.submit(pod_finding())
    sim.settle()
    event = only_event(api)
    assert event["metadata"]["name"] != name
    assert event["series"]["count"] == 2
    assert [c[3] for c in sim.api.writes()] == ["ok", "404", "ok"]


def test_create_whose_answer_was_lost_is_not_duplicated(
    api: ks.KubeStandin, client: KubeClient
) -> None:
    sim = Sim(client)
    sim.api.lose_answer_once = "POST"
    sim.sink.submit(pod_finding())
    sim.settle()
    sim.sink.submit(pod_finding())
    sim.run(11)
    event = only_event(api)  # the retried POST got 409 AlreadyExists, not a duplicate
    assert event["series"]["count"] == 2
    assert [c[1:] for c in sim.api.writes()][:2] == [
        ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events", "ok"),
        ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events", "409"),
    ]
    assert sim.metric("InvisibleOOMKill", "created") == 1


def test_full_queue_merges_instead_of_dropping(api: ks.KubeStandin, client: KubeClient) -> None:
    api.fail_next(500, count=10**6)
    sim = Sim(client, max_series=3)
    for container in ("a", "b", "c", "d", "e"):
        sim.sink.submit(pod_finding(container=container))
    sim.sink.submit(node_finding())  # another object: nothing of its kind to merge into
    assert sim.sink.pending() == 5
    assert sim.metric("DNSDropRule", "dropped") == 1
    api.clear_faults()
    sim.settle()
    counts = sorted(e.get("series", {}).get("count", 1) for e in api.events())
    assert counts == [1, 1, 3]  # "d" and "e" merged into the oldest ("a")
    assert sim.metric("InvisibleOOMKill", "dropped") == 0


def test_unreachable_at_start_logs_once_and_keeps_trying(
    api: ks.KubeStandin, client: KubeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "agent.events")
    state = {"up": False}

    def factory() -> Api:
        if not state["up"]:
            raise KubeUnreachable("connection refused (test)")
        return client

    sim = Sim(client)
    sim.sink._api = factory
    sim.sink.submit(pod_finding())
    sim.run(120)
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    assert "log only" in unreachable[0].getMessage()
    state["up"] = True
    sim.settle(120)
    assert len(api.events()) == 1


def test_fan_out_keeps_going_when_a_sink_fails() -> None:
    seen: list[str] = []

    def broken(_f: Finding) -> None:
        raise RuntimeError("boom")

    fan_out(broken, lambda f: seen.append(f.reason))(node_finding())
    assert seen == ["DNSDropRule"]


# ----------------------------------------------------------------------------- config


def test_config_source_order(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    env_file = tmp_path / "env"
    assert config_source(Settings(no_kube=True, kubeconfig=flag)) is None
    assert config_source(Settings(kubeconfig=flag), {"KUBECONFIG": str(env_file)}) == (
        KubeConfigSource("kubeconfig", flag)
    )
    source = config_source(Settings(), {"KUBECONFIG": f"{tmp_path}/missing:{env_file}"})
    assert source == KubeConfigSource("kubeconfig", tmp_path / "missing")  # none exists
    env_file.write_text("{}")
    source = config_source(Settings(), {"KUBECONFIG": f"{tmp_path}/missing:{env_file}"})
    assert source == KubeConfigSource("kubeconfig", env_file)
    assert config_source(Settings(), {}) is None


def test_start_event_sink_off_with_no_kube(tmp_path: Path) -> None:
    stop = threading.Event()
    settings = Settings(no_kube=True, kubeconfig=tmp_path / "kc")
    assert start_event_sink(settings, CollectorRegistry(), stop) is None


def test_start_event_sink_end_to_end_in_process(api: ks.KubeStandin, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    stop = threading.Event()
    settings = Settings(node_name=NODE, kubeconfig=api.write_kubeconfig(tmp_path / "kc"))
    submit = start_event_sink(settings, registry, stop)
    assert submit is not None
    submit(node_finding())
    labels = {"reason": "DNSDropRule", "result": "created"}
    assert api.wait_for(lambda _: registry.get_sample_value("nodediag_events_total", labels) == 1)
    stop.set()
    assert len(api.events()) == 1


def test_missing_kubeconfig_is_retried(tmp_path: Path) -> None:
    with pytest.raises(KubeUnreachable, match="cannot load"):
        connect(KubeConfigSource("kubeconfig", tmp_path / "nope"))


# ----------------------------------------------------------------------------- pod lookup


def _run_lookup(client: Api) -> tuple[PodLookup, threading.Event]:
    pods, stop, _ = run_lookup(client)
    return pods, stop


def run_lookup(client: Api) -> tuple[PodLookup, threading.Event, threading.Thread]:
    """A pod lookup following ``client`` on its own thread, until the event is set."""
    pods = PodLookup(NODE, lambda: client, rand=lambda: 0.0)
    stop = threading.Event()
    thread = threading.Thread(target=pods.run, args=(stop,), daemon=True)
    thread.start()
    return pods, stop, thread


def test_pod_lookup_names_pods_and_containers_from_list_and_watch(
    api: ks.KubeStandin, client: KubeClient
) -> None:
    api.add_pod(pod_object())
    other = pod_object("elsewhere", "x", "uid-2")
    other["spec"]["nodeName"] = "node-2"
    api.add_pod(other)
    pods, stop = _run_lookup(client)
    try:
        assert pods.synced.wait(5)
        ref = pods.pod(POD_UID)
        assert ref is not None and (ref.namespace, ref.name) == ("shop", "web-0")
        assert pods.pod("uid-2") is None
        container = pods.container("containerd://" + "4f1a" + "0" * 60)
        assert container is not None and container.name == "app"
        api.add_pod(pod_object("late-0", "shop", "uid-3", {"worker": "ab" * 32}))
        assert api.wait_for(lambda _: pods.container("ab" * 32) is not None)
        info = pods.container_info("uid-3", "ab" * 32)
        assert info is not None
        assert (info.pod_namespace, info.pod_name, info.container_name) == (
            "shop", "late-0", "worker",
        )  # fmt: skip
        watch = [r for r in api.requests if r.query.get("watch")]
        assert watch and watch[0].query["fieldSelector"] == f"spec.nodeName={NODE}"
    finally:
        stop.set()


def test_pod_lookup_resumes_after_a_cut_and_relists_on_410(
    api: ks.KubeStandin, client: KubeClient
) -> None:
    pods, stop = _run_lookup(client)
    try:
        assert pods.synced.wait(5)
        assert api.wait_for(lambda s: any(r.query.get("watch") for r in s.requests))
        api.outage(0.3, "drop")
        time.sleep(0.4)
        api.add_pod(pod_object())
        assert api.wait_for(lambda _: pods.pod(POD_UID) is not None)

        def resumed(standin: ks.KubeStandin) -> bool:
            watches = [r for r in standin.requests if r.query.get("watch") and r.status == 200]
            return any(r.query.get("resourceVersion") not in (None, "", "0") for r in watches[1:])

        assert api.wait_for(resumed)
        # history compacted while the watch is cut: 410 → list again
        lists_before = len([r for r in api.requests if r.path == "/api/v1/pods"
                            and not r.query.get("watch")])  # fmt: skip
        api.outage(0.3, "drop")
        time.sleep(0.1)
        api.add_pod(pod_object("second", "shop", "uid-4", {"x": "cd" * 32}))
        api.compact()
        assert api.wait_for(lambda _: pods.pod("uid-4") is not None, timeout=10)
        lists_after = len([r for r in api.requests if r.path == "/api/v1/pods"
                           and not r.query.get("watch")])  # fmt: skip
        assert lists_after > lists_before
        api.delete_pod("shop", "web-0")
        time.sleep(0.2)
        assert pods.pod(POD_UID) is not None  # remembered for a while after deletion
    finally:
        stop.set()


# ----------------------------------------------------------------------------- real cluster


@pytest.mark.cluster
@pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs KUBECONFIG (a real cluster)")
def test_events_on_a_real_cluster() -> None:
    """Against a real cluster: a Node Event and its series, then cleaned up.

    Run with ``KUBECONFIG=~/.kube/config NODEDIAG_TEST_NODE=<a node> pytest -m cluster``."""
    source = config_source(Settings(), os.environ)
    assert source is not None
    client = connect(source)
    node = (
        os.environ.get("NODEDIAG_TEST_NODE")
        or next(iter(client.request("GET", "/api/v1/nodes")["items"]))["metadata"]["name"]
    )
    sink = EventSink(node, client, CollectorRegistry(), options=EventSinkOptions(flush_interval=1))
    finding = Finding("DNSProbeFailed", "warning", datetime.now(UTC), node, Subject("Node", node),
                      "nodediag cluster test: please ignore", {"server": "192.0.2.1"})  # fmt: skip
    for _ in range(3):
        sink.submit(finding)
    assert sink.flush(30) == 0
    ns = "default"
    path = f"/apis/events.k8s.io/v1/namespaces/{ns}/events"
    items = client.request("GET", path, query={"fieldSelector": f"regarding.name={node}"})["items"]
    mine = [e for e in items if e.get("note") == finding.message]
    try:
        assert len(mine) == 1
        assert mine[0]["series"]["count"] == 3
        assert mine[0]["reportingController"] == "nodediag.io/agent"
    finally:
        for event in mine:
            client.request("DELETE", f"{path}/{event['metadata']['name']}")


def test_idle_worker_sleeps_until_a_finding_comes(
    api: ks.KubeStandin, client: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing pending the worker does not poll (an idle agent costs no wake-ups), and
    a finding submitted while it sleeps is written at once."""
    sink = EventSink(NODE, client, CollectorRegistry())
    steps = 0
    real_step = sink.step

    def counted_step() -> float:
        nonlocal steps
        steps += 1
        return real_step()

    monkeypatch.setattr(sink, "step", counted_step)
    stop = threading.Event()
    worker = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    worker.start()
    try:
        time.sleep(2.0)
        assert steps <= 2  # discovery, then asleep
        submitted = time.monotonic()
        sink.submit(node_finding("DNSProbeFailed", server="10.43.0.10"))
        assert api.wait_for(lambda s: bool(s.events()), timeout=5)
        assert time.monotonic() - submitted < 0.5
    finally:
        stop.set()
        sink.wake()  # as start_kube's stop watcher does
        worker.join(10)
    assert not worker.is_alive()
