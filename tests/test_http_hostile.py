"""Issue 16: the metrics endpoint holds against hostile clients on loopback — hundreds of
idle connections, slowloris heads, clients that never read, garbage bytes, more /metrics
requests than handlers. The handler threads stay a fixed few, slow connections are closed
after their deadline, and /healthz answers throughout (bench/hostile.py measures the same at
10,000 connections, with RSS and latency)."""

from __future__ import annotations

import contextlib
import http.client
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge

from agent.http import HttpServer, Limits, make_app
from agent.http_wire import BadRequest, head_end, parse_head

DEADLINE = 1.0
"""The server's read and write deadline in these tests."""
PATIENCE = 20.0
"""How long a test waits for something that must happen (generous: a busy machine)."""


@pytest.fixture(autouse=True)
def enough_fds() -> None:
    """Client and server sides share this process: raise its own soft limit for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 and (hard == resource.RLIM_INFINITY or hard >= 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))


def big_registry(series: int = 3000) -> CollectorRegistry:
    """A /metrics answer of some hundreds of KB: more than the socket buffers take."""
    registry = CollectorRegistry()
    gauge = Gauge("nodediag_test_big", "filler", ["name"], registry=registry)
    for i in range(series):
        gauge.labels(name=f"series-{i:06d}-" + "x" * 100).set(i)
    return registry


class Served:
    def __init__(self, limits: Limits, app: Callable[..., Iterable[bytes]]) -> None:
        self.server = HttpServer("127.0.0.1", 0, app, limits=limits)
        self.port = self.server.port
        self.server.start()

    def get(self, path: str, timeout: float = 5) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=PATIENCE)


def limits(**changes: Any) -> Limits:
    base = {"read_timeout": DEADLINE, "write_timeout": DEADLINE, "handlers": 2}
    return Limits(**{**base, **changes})


@pytest.fixture
def served() -> Iterator[Served]:
    app = make_app(big_registry(), lambda: (True, "ok"), lambda: (True, "ready"))
    served = Served(limits(max_connections=1000), app)
    yield served
    served.server.stop()


def http_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("http")]


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (EOF or reset); False if it is still open at PATIENCE."""
    sock.settimeout(PATIENCE)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def test_hundreds_of_idle_connections_leave_threads_fixed_and_health_answering() -> None:
    app = make_app(big_registry(), lambda: (True, "ok"), lambda: (True, "ready"))
    served = Served(limits(max_connections=1000, read_timeout=5), app)
    try:
        before = http_threads()
        assert len(before) == 1 + 2, before  # the loop and two handlers
        idle = [served.connect() for _ in range(500)]
        status, body = served.get("/healthz")
        assert (status, body) == (200, b"ok\n")
        assert served.server.stats.open_now >= 400  # held, each without a thread
        assert served.get("/metrics")[0] == 200
        assert http_threads() == before
        for sock in idle:
            sock.close()
        # Closed by their clients: the server lets them go.
        deadline = time.monotonic() + PATIENCE
        while served.server.stats.open_now and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served.server.stats.open_now == 0
    finally:
        served.server.stop()


def test_slowloris_heads_are_closed_at_the_read_deadline(served: Served) -> None:
    slow = [served.connect() for _ in range(20)]
    started = time.monotonic()
    for sock in slow:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
    stop = threading.Event()

    def drip() -> None:  # one header byte every 100 ms: never a whole head
        while not stop.wait(0.1):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"X")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        assert served.get("/healthz")[0] == 200
        assert all(closed_by_server(sock) for sock in slow)
        assert time.monotonic() - started >= DEADLINE * 0.9  # not before the deadline
        assert served.server.stats.read_timeouts >= 20
    finally:
        stop.set()
        dripper.join()
        for sock in slow:
            sock.close()


BIG_ANSWER = b"x" * (16 << 20)
"""More than the kernel's socket buffers take (tcp_wmem max: 4 MiB)."""


def big_answers(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [BIG_ANSWER if environ["PATH_INFO"] == "/metrics" else b"ok"]


def non_readers(served: Served, count: int) -> list[socket.socket]:
    """Clients that ask for /metrics with a small receive buffer and never read."""
    readers = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", served.port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        readers.append(sock)
    return readers


def test_clients_that_never_read_are_closed_at_the_write_deadline() -> None:
    body = BIG_ANSWER
    served = Served(limits(), big_answers)
    readers = non_readers(served, 3)
    try:
        deadline = time.monotonic() + PATIENCE
        while served.server.stats.write_timeouts < 3 and time.monotonic() < deadline:
            assert served.get("/healthz")[0] == 200
            time.sleep(0.1)
        assert served.server.stats.write_timeouts == 3
        assert served.server.stats.open_now == 0
        # What they get is cut short: the server closed them before the answer was all sent.
        for sock in readers:
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(1 << 20):
                    received += chunk
            assert received.startswith(b"HTTP/1.1 200 OK")
            assert len(received) < len(body)
    finally:
        for sock in readers:
            sock.close()
        served.server.stop()


def test_clients_that_never_read_cannot_hold_every_request_slot() -> None:
    served = Served(limits(max_requests=3, write_timeout=60), big_answers)
    readers = non_readers(served, 3)
    try:
        deadline = time.monotonic() + PATIENCE
        while served.server.stats.in_pool < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(1.5)  # past SLOW_READER: their answers have waited long enough
        status, answer = served.get("/metrics", timeout=PATIENCE)
        assert status == 200 and len(answer) == len(BIG_ANSWER)
        assert served.server.stats.write_timeouts >= 1
        assert served.server.stats.busy == 0
    finally:
        for sock in readers:
            sock.close()
        served.server.stop()


@pytest.mark.parametrize(
    "garbage",
    [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n",
     b"\x00" * 10 + b"\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n",
     b"GET /metrics HTTP/1.1\r\n bad-fold\r\n\r\n", b"GET /metrics HTTP/1.1\r\nNo Colon\r\n\r\n"],
)  # fmt: skip
def test_garbage_is_answered_400_and_closed(served: Served, garbage: bytes) -> None:
    with served.connect() as sock:
        sock.sendall(garbage)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert served.get("/healthz")[0] == 200


def test_a_huge_head_is_431(served: Served) -> None:
    with served.connect() as sock:
        with contextlib.suppress(OSError):  # the server may close before taking it all
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


def test_beyond_max_connections_the_oldest_unanswered_is_closed() -> None:
    app = make_app(CollectorRegistry(), lambda: (True, "ok"), lambda: (True, ""))
    served = Served(limits(max_connections=50, read_timeout=60), app)
    try:
        idle = [served.connect() for _ in range(300)]
        assert served.get("/healthz")[0] == 200  # the newest connection gets in
        assert served.server.stats.open_now <= 50
        assert served.server.stats.evicted >= 250
        assert closed_by_server(idle[0])  # long before its 60 s deadline
        for sock in idle:
            sock.close()
    finally:
        served.server.stop()


def test_in_a_flood_of_silent_connections_a_client_mid_request_is_kept() -> None:
    app = make_app(CollectorRegistry(), lambda: (True, "ok"), lambda: (True, ""))
    served = Served(limits(max_connections=50, read_timeout=60), app)
    try:
        client = served.connect()
        client.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a request, like a slow scraper
        deadline = time.monotonic() + PATIENCE
        loop = served.server._server
        while not loop._activity and time.monotonic() < deadline:  # the half request read
            time.sleep(0.02)
        flood = [served.connect() for _ in range(300)]
        assert served.get("/healthz")[0] == 200
        assert served.server.stats.evicted >= 250
        client.sendall(b"Host: x\r\n\r\n")
        client.settimeout(PATIENCE)
        assert client.recv(12) == b"HTTP/1.1 200"
        for sock in [client, *flood]:
            sock.close()
    finally:
        served.server.stop()


def test_health_answers_while_every_handler_is_busy_and_excess_metrics_get_503() -> None:
    release = threading.Event()
    metrics = make_app(CollectorRegistry(), lambda: (True, "ok"), lambda: (True, "ready"))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/metrics":
            release.wait(PATIENCE)  # a scrape that takes long
        answer: Iterable[bytes] = metrics(environ, start_response)
        return answer

    served = Served(limits(max_requests=5, write_timeout=PATIENCE), app)
    waiting = [served.connect() for _ in range(5)]
    try:
        for sock in waiting:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        deadline = time.monotonic() + PATIENCE
        while served.server.stats.in_pool < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.get("/healthz") == (200, b"ok\n")
        assert served.get("/readyz") == (200, b"ready\n")
        assert served.get("/metrics")[0] == 503  # a sixth: over max_requests
        assert http_threads().count("http") == 1 and len(http_threads()) == 3
        release.set()
        for sock in waiting:
            sock.settimeout(PATIENCE)
            assert sock.recv(12) == b"HTTP/1.1 200"
    finally:
        release.set()
        for sock in waiting:
            sock.close()
        served.server.stop()


def test_stop_closes_everything_at_once(served: Served) -> None:
    idle = [served.connect() for _ in range(50)]
    started = time.monotonic()
    served.server.stop()
    assert time.monotonic() - started < PATIENCE
    assert not http_threads()
    assert all(closed_by_server(sock) for sock in idle)
    for sock in idle:
        sock.close()


# ------------------------------------------------------------------ the wire format, pure


def test_head_end_finds_the_blank_line_across_reads() -> None:
    buffer = b"GET / HTTP/1.1\r\nHost: a\r\n\r"
    assert head_end(buffer) == -1
    buffer += b"\nrest"
    assert head_end(buffer, 20) == len(buffer) - 4
    assert head_end(b"GET / HTTP/1.0\n\n") == 16


def test_parse_head() -> None:
    request = parse_head(b"HEAD /metrics?name[]=x HTTP/1.1\r\nAccept: a\r\nX-A:  b \r\n\r\n")
    assert (request.method, request.path, request.query) == ("HEAD", "/metrics", "name[]=x")
    assert request.headers == (("Accept", "a"), ("X-A", "b"))
    for bad in (b"", b"GET /\r\n\r\n", b"GET  / HTTP/1.1\r\n\r\n", b"G(T / HTTP/1.1\r\n\r\n",
                b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 101 + b"\r\n"):  # fmt: skip
        with pytest.raises(BadRequest):
            parse_head(bad)


SERVER_WITH_FEW_FDS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from prometheus_client import CollectorRegistry
from agent.http import HttpServer, Limits, make_app
app = make_app(CollectorRegistry(), lambda: (True, "ok"), lambda: (True, ""))
server = HttpServer("127.0.0.1", 0, app, limits=Limits(read_timeout=60))
server.start()
print(server.port, flush=True)
sys.stdin.read()
print(server.stats.out_of_fds, server.stats.evicted, flush=True)
server.stop()
"""


def test_out_of_file_descriptors_the_oldest_unanswered_connection_makes_room() -> None:
    """A server process limited to 64 fds, 200 clients: it keeps accepting (closing the
    oldest idle connection for each new one) and /healthz still answers."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", SERVER_WITH_FEW_FDS],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=repo,
    )  # fmt: skip
    assert child.stdout is not None and child.stdin is not None
    try:
        port = int(child.stdout.readline())
        idle = [socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) for _ in range(200)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PATIENCE)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()
        assert closed_by_server(idle[0])
        for sock in idle:
            sock.close()
        child.stdin.close()
        out_of_fds, evicted = map(int, child.stdout.readline().split())
        assert out_of_fds > 0 and evicted > 0
        assert child.wait(PATIENCE) == 0, child.stderr.read() if child.stderr else ""
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
