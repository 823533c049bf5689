"""The agent's API-facing threads survive errors, tokens rotate, and watches back off.

- a worker loop that raises is logged once per different error, counted in
  ``nodediag_thread_errors_total{thread}``, restarted after a backoff; one that keeps failing
  makes the health check fail;
- the service-account token file is read as kubelet writes it (trailing newline) and again
  when it changes; a request that cannot be sent is an error the callers retry, not a crash;
- the pod watch against a server that ends every watch after its first event: the number of
  watch requests the stand-in sees in a bounded window stays within client-go's reflector
  backoff (the old code reconnected at once: 245 watches in 74 s).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import kube_standin as ks
import pytest
from prometheus_client import CollectorRegistry
from test_events import NODE, node_finding, pod_object, run_lookup

from agent.daemon import health_check
from agent.events import EventSink
from agent.http import HttpServer, make_app
from agent.kernel_watch import KernelWatch
from agent.kube import (
    KubeClient,
    KubeConfigSource,
    KubeUnreachable,
    ReconnectBackoff,
    ServiceAccountToken,
    connect,
)
from agent.pod_lookup import PodLookup
from agent.supervise import Supervisor


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def api() -> Iterator[ks.KubeStandin]:
    with ks.running() as standin:
        standin.add_node(NODE)
        yield standin


# ----------------------------------------------------------------------------- supervisor


def test_a_failing_loop_is_restarted_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    stop = threading.Event()
    supervisor = Supervisor(registry, stop, backoff_base=0.01, backoff_cap=0.02)
    runs = 0
    done = threading.Event()

    def loop(stop: threading.Event) -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise ValueError("Invalid header value b'Bearer abc\\n'")
        done.set()
        stop.wait()

    with caplog.at_level(logging.DEBUG, logger="agent.supervise"):
        thread = supervisor.start("events", loop)
        assert done.wait(5)
    assert thread.is_alive()
    assert registry.get_sample_value("nodediag_thread_errors_total", {"thread": "events"}) == 3
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "thread events failed" in errors[0].getMessage()
    assert supervisor.health()[0]  # 3 failures < max_failures
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_health_fails_when_a_loop_cannot_recover_and_recovers_after_a_stable_run() -> None:
    clock = Clock()
    stop = threading.Event()
    supervisor = Supervisor(
        None, stop, backoff_base=0.001, backoff_cap=0.001, max_failures=3, clock=clock
    )
    failing = threading.Event()
    failing.set()
    failures = 0

    def loop(stop: threading.Event) -> None:
        nonlocal failures
        if failing.is_set():
            failures += 1
            raise RuntimeError("boom")
        stop.wait()

    supervisor.start("pod-watch", loop)
    deadline = time.monotonic() + 5
    while failures < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    failing.clear()
    time.sleep(0.05)
    ok, why = supervisor.health()
    assert not ok and "pod-watch failed" in why and "RuntimeError: boom" in why
    clock.t += supervisor.stable_seconds  # it has now run long enough since its last restart
    assert supervisor.health()[0]
    stop.set()


def test_healthz_fails_when_a_worker_cannot_recover() -> None:
    """The daemon's /healthz check: healthy while the kernel log loop turns and workers run;
    503 once a worker failed ``max_failures`` times in a row (kubelet then restarts the
    pod), with the thread and its last error in the body."""
    stop = threading.Event()
    supervisor = Supervisor(None, stop, backoff_base=0.001, backoff_cap=0.001, max_failures=3)
    watch = cast(KernelWatch, SimpleNamespace(last_loop=time.monotonic()))
    app = make_app(CollectorRegistry(), health_check(watch, supervisor), lambda: (True, "ok"))
    server = HttpServer("127.0.0.1", 0, app)
    server.start()

    def waits(stop: threading.Event) -> None:
        stop.wait()

    def broken(stop: threading.Event) -> None:
        raise OSError("the sink's socket is gone")

    try:
        supervisor.start("events", waits)
        assert _get(server.port, "/healthz")[0] == 200
        supervisor.start("pod-watch", broken)
        deadline = time.monotonic() + 5
        while supervisor.health()[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        status, body = _get(server.port, "/healthz")
        assert status == 503
        assert "thread pod-watch failed" in body and "times in a row" in body
        assert "OSError: the sink's socket is gone" in body
    finally:
        stop.set()
        server.stop()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


# ----------------------------------------------------------------------------- the token


def test_token_is_stripped_reread_on_rotation_and_kept_when_unreadable(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "token"
    path.write_text("first\n")  # as written by hand or by a templating tool
    token = ServiceAccountToken(path, refresh=60, clock=clock)
    assert token.get() == "first"
    path.write_text("second\n")
    assert token.get() == "first"  # cached for a minute, like the official loader
    clock.t += 60
    assert token.get() == "second"
    path.write_text("third")
    assert token.reset() and token.get() == "third"  # after a 401: at once
    path.unlink()
    assert not token.reset() and token.get() == "third"
    with pytest.raises(KubeUnreachable, match="token"):
        ServiceAccountToken(path).get()
    path.write_text("two words\n")
    with pytest.raises(KubeUnreachable, match="whitespace"):
        ServiceAccountToken(path).get()


def test_a_request_that_cannot_be_sent_is_unreachable_not_a_crash(
    api: ks.KubeStandin, tmp_path: Path
) -> None:
    """A header http.client refuses (a token ending in a newline, through a kubeconfig that
    does not strip it) is a failed request the callers retry, not a ValueError."""
    api.token = "standin-token\n"
    kubeconfig = api.write_kubeconfig(tmp_path / "kc")
    api.token = "standin-token"
    client = connect(KubeConfigSource("kubeconfig", kubeconfig))
    try:
        with pytest.raises(KubeUnreachable, match="not sent"):
            client.request("GET", "/api/v1/nodes")
    finally:
        client.close()


def test_event_sink_thread_survives_an_unexpected_error(
    api: ks.KubeStandin, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    stop = threading.Event()
    client = connect(KubeConfigSource("kubeconfig", api.write_kubeconfig(tmp_path / "kc")))
    calls = 0

    def factory() -> KubeClient:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("a bug in the client")
        return client

    sink = EventSink(NODE, factory, registry)
    supervisor = Supervisor(registry, stop, backoff_base=0.01, backoff_cap=0.02)
    supervisor.start("events", sink.run)
    sink.submit(node_finding())
    try:
        assert api.wait_for(lambda s: len(s.events()) == 1)
        assert registry.get_sample_value("nodediag_thread_errors_total", {"thread": "events"}) == 2
    finally:
        stop.set()
        sink.wake()
        client.close()


# ----------------------------------------------------------------------------- watch backoff


def test_reconnect_backoff_is_client_gos_reflector_schedule() -> None:
    clock = Clock()
    backoff = ReconnectBackoff(clock=clock, rand=lambda: 0.0)
    delays = []
    for _ in range(8):
        delays.append(backoff.next())
        clock.t += delays[-1]
    assert delays == [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    clock.t += 121  # a healthy watch: more than 2 minutes since the last wait began
    assert backoff.next() == 0.8
    top = ReconnectBackoff(clock=clock, rand=lambda: 0.999)
    assert 1.59 < top.next() < 1.6  # jitter 1.0: [d, 2d)


WINDOW = 10.0


def test_pod_watch_cut_after_every_event_backs_off(api: ks.KubeStandin, tmp_path: Path) -> None:
    """A server (or proxy) that ends each watch right after its first event while pods keep
    changing: the watch requests in a 10 s window stay within the reflector schedule
    (≤ 4: at 0, then after at least 0.8, 1.6, 3.2 s; the next is due after 12 s)."""
    api.add_pod(pod_object())
    api.watch_event_limit = 1
    client = connect(KubeConfigSource("kubeconfig", api.write_kubeconfig(tmp_path / "kc")))
    pods = PodLookup(NODE, lambda: client)
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.wait(0.05):
            n += 1
            pod = pod_object()
            pod["metadata"]["labels"] = {"n": str(n)}
            api.update_pod(pod)

    threading.Thread(target=churn, daemon=True).start()
    threading.Thread(target=pods.run, args=(stop,), daemon=True).start()
    try:
        assert pods.synced.wait(5)
        start = time.time()
        time.sleep(WINDOW)
        end = time.time()
    finally:
        stop.set()
        client.close()
    watches = [
        r for r in api.requests_matching("GET", "^/api/v1/pods$")
        if r.query.get("watch") and start - 0.5 <= r.time <= end
    ]  # fmt: skip
    lists = [r for r in api.requests_matching("GET", "^/api/v1/pods$") if not r.query.get("watch")]
    assert 2 <= len(watches) <= 4, [round(r.time - start, 2) for r in watches]
    assert len(lists) == 1 and lists[0].query.get("resourceVersion") == "0"
    assert all(300 <= int(r.query["timeoutSeconds"]) < 600 for r in watches)
    resumed = [r.query.get("resourceVersion") for r in watches[1:]]
    assert all(rv not in (None, "", "0") for rv in resumed)  # never a relist, never from 0


@pytest.mark.parametrize("https", [False, True])
def test_a_quiet_pod_watch_ends_when_told_to_stop(
    https: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM with a watch open and no pod changing: the read blocked on the stream is cut
    at once, not when the watch times out (5 to 10 minutes; the daemon waited 10 s for this
    thread on every stop), and the cut is not logged as a failure."""
    from standin_tls import make_tls

    tls = make_tls(tmp_path / "tls") if https else None
    with ks.running(tls=tls) as standin:
        standin.add_pod(pod_object())
        client = connect(KubeConfigSource("kubeconfig", standin.write_kubeconfig(tmp_path / "kc")))
        pods, stop, thread = run_lookup(client)
        try:
            assert pods.synced.wait(5)
            assert standin.wait_for(lambda s: any(r.query.get("watch") for r in s.requests))
            time.sleep(0.3)  # the watch is open and quiet
            with caplog.at_level(logging.WARNING, logger="agent.pod_lookup"):
                stop.set()
                thread.join(timeout=5)
            assert not thread.is_alive(), "the pod watch went on reading after stop"
            assert caplog.records == []
        finally:
            stop.set()
            client.close()
