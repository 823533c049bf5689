"""Hostile clients against the metrics endpoint (issue 16): RSS, threads, file descriptors
and scrape latency of the server while they last and at rest, against an idle baseline
measured in the same run.

    .venv/bin/python bench/hostile.py [--phase-seconds 15] [--idle 10000] [--tls]

The server is the agent's own ``HttpServer``/``make_app`` with its default limits, in a child
process (``--serve``) with 300 pods' OOM series and the periodic collectors' metrics (as
bench/footprint.py's scrape part): its ``/proc/PID/status`` VmRSS and Threads and
``/proc/PID/fd`` are sampled every 0.25 s. The hostile clients run in a second child process
(its own RLIMIT_NOFILE raised to the hard limit, for the client side only). This process
scrapes ``/metrics`` and ``/healthz`` over fresh connections every 0.2 s and times them.

Phases, each ``--phase-seconds`` long, in order:
- idle: no hostile client (the baseline);
- idle-10k: ``--idle`` connections opened once and held (the server keeps 512, closes the rest);
- flood-10k: the same, each reopened as soon as the server closes it (a reconnect flood);
- slowloris: 1,000 connections sending one header byte every second, reopened when closed;
- slow-readers: 200 connections asking for /metrics with a 4 KiB receive buffer and never
  reading, reopened every 12 s;
- garbage: 8 connections at a time sending 4 KiB of random bytes, reopened when closed;
- all: every client above at once;
- rest: the clients gone, after the server's deadlines.
Target: scrapes answered in < 100 ms and RSS within 5 MiB of idle while they run."""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PHASES = ("idle", "idle-10k", "flood-10k", "slowloris", "slow-readers", "garbage", "all", "rest")


# ---------------------------------------------------------------------- the server (child)


def serve(web_config: str | None) -> None:
    from prometheus_client import disable_created_metrics

    from agent.http import HttpServer, make_app
    from agent.metrics import Metrics
    from agent.periodic import ClusterDnsSource, build_collectors
    from agent.settings import Settings
    from agent.web_config import WebConfig
    from collectors.finding import Finding, Subject

    disable_created_metrics()  # type: ignore[no-untyped-call]
    settings = Settings(no_kube=True, cluster_dns=("127.0.0.1",), listen=("127.0.0.1", 0))
    metrics = Metrics()
    build_collectors(settings, metrics, ClusterDnsSource(settings))
    for i in range(300):
        subject = Subject("Pod", f"workload-{i:03d}-x{i:04d}", f"team-{i % 12}", uid=f"u{i}")
        finding = Finding(
            reason="InvisibleOOMKill",
            severity="warning",
            time=None,
            node="bench",
            subject=subject,
            message="bench",
            details={"scope": "invisible"},
        )
        metrics.record_finding(finding)
    config = WebConfig(Path(web_config)) if web_config else None
    app = make_app(metrics.registry, lambda: (True, "ok"), lambda: (True, "ready"))
    server = HttpServer("127.0.0.1", 0, app, web_config=config)
    server.start()
    print(server.port, flush=True)
    sys.stdin.read()  # until the parent closes it
    server.stop()


# ---------------------------------------------------------------------- hostile clients (child)


class Pool:
    """``size`` client sockets of one kind, each reopened when the server closes it."""

    def __init__(self, port: int, size: int, first: bytes, drip: bytes, lifetime: float,
                 reads: bool, rcvbuf: int = 0, reopen: bool = True) -> None:  # fmt: skip
        self.port, self.size, self.first, self.drip = port, size, first, drip
        self.lifetime, self.reads, self.rcvbuf, self.reopen = lifetime, reads, rcvbuf, reopen
        self.born: dict[socket.socket, float] = {}
        self.opened = 0

    def open(self, selector: selectors.BaseSelector) -> None:
        while len(self.born) < self.size and (self.reopen or self.opened < self.size):
            self.opened += 1
            sock = socket.socket()
            if self.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            except OSError:
                sock.close()
                return  # out of ports or fds for now
            self.born[sock] = time.monotonic()
            if self.reads:
                selector.register(sock, selectors.EVENT_READ, self)
            if self.first:
                with contextlib.suppress(OSError):
                    sock.send(self.first)

    def close(self, sock: socket.socket, selector: selectors.BaseSelector) -> None:
        if self.reads:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(sock)
        self.born.pop(sock, None)
        sock.close()

    def tick(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for sock, born in list(self.born.items()):
            if self.lifetime and now - born > self.lifetime:
                self.close(sock, selector)
            elif self.drip:
                with contextlib.suppress(OSError):
                    sock.send(self.drip)


def pools_for(phase: str, port: int, idle: int) -> list[Pool]:
    garbage = os.urandom(4096)
    kinds = {
        "idle-10k": [Pool(port, idle, b"", b"", 0, reads=True, reopen=False)],
        "flood-10k": [Pool(port, idle, b"", b"", 0, reads=True)],
        "slowloris": [Pool(port, 1000, b"GET /metrics HTTP/1.1\r\n", b"X", 0, reads=True)],
        "slow-readers": [
            Pool(port, 200, b"GET /metrics HTTP/1.1\r\n\r\n", b"", 12, reads=False, rcvbuf=4096)
        ],
        "garbage": [Pool(port, 8, garbage, b"", 0, reads=True)],
    }
    if phase == "all":
        return [pool for name in ("flood-10k", "slowloris", "slow-readers", "garbage")
                for pool in pools_for(name, port, idle)]  # fmt: skip
    return kinds.get(phase, [])


def hostile(phase: str, port: int, idle: int, stop: Any) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    selector = selectors.DefaultSelector()
    pools = pools_for(phase, port, idle)
    last_tick = 0.0
    while not stop.is_set():
        for pool in pools:
            pool.open(selector)
        for key, _ in selector.select(0.1) if selector.get_map() else []:
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                key.data.close(sock, selector)
        if not selector.get_map():
            time.sleep(0.1)
        if time.monotonic() - last_tick >= 1:
            last_tick = time.monotonic()
            for pool in pools:
                pool.tick(selector)


# ---------------------------------------------------------------------- measuring (parent)


def proc_status(pid: int) -> tuple[float, int, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    rss = int(fields["VmRSS"].split()[0]) / 1024
    return rss, int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


ERRORS: dict[str, int] = {}


def timed_get(url: str, context: ssl.SSLContext | None) -> float | None:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            response.read()
    except OSError as error:
        reason = getattr(error, "reason", error)
        name = f"{url.rpartition('/')[2]}: {type(reason).__name__} {str(reason)[:60]}"
        ERRORS[name] = ERRORS.get(name, 0) + 1
        return None
    return (time.perf_counter() - started) * 1000


def measure(seconds: float, pid: int, base: str, context: ssl.SSLContext | None) -> dict[str, Any]:
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            samples.append(proc_status(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    cpu_before, started = cpu_seconds(pid), time.monotonic()
    sampler.start()
    scrapes: list[float | None] = []
    health: list[float | None] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        scrapes.append(timed_get(base + "/metrics", context))
        health.append(timed_get(base + "/healthz", context))
        time.sleep(0.2)
    done.set()
    sampler.join()
    cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - started) * 100
    return {"samples": samples, "scrapes": scrapes, "health": health, "cpu": cpu}


def ms(values: list[float | None]) -> tuple[str, str, str]:
    ok = sorted(v for v in values if v is not None)
    if not ok:
        return "-", "-", "-"
    p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))]
    return f"{statistics.median(ok):.1f}", f"{p99:.1f}", f"{ok[-1]:.1f}"


def run(args: argparse.Namespace) -> None:
    context, web_config, scheme = None, None, "http"
    if args.tls:
        from testca import make_test_ca

        certs = make_test_ca(Path(tempfile.mkdtemp(prefix="nodediag-bench-ca-")))
        web_config = Path(certs.ca.parent / "web.yml")
        web_config.write_text(f"tls_server_config:\n  cert_file: {certs.server_cert}\n"
                              f"  key_file: {certs.server_key}\n")  # fmt: skip
        context = ssl.create_default_context(cafile=certs.ca)
        scheme = "https"
    command = [sys.executable, __file__, "--serve"]
    if web_config:
        command += ["--web-config", str(web_config)]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdin is not None
    port = int(server.stdout.readline())
    base = f"{scheme}://127.0.0.1:{port}"
    for _ in range(20):  # warm up: first scrapes allocate what every later one reuses
        timed_get(base + "/metrics", context)
    rows = []
    try:
        for phase in PHASES:
            stop = multiprocessing.Event()
            clients = multiprocessing.Process(target=hostile, args=(phase, port, args.idle, stop))
            clients.start()
            if phase != "idle":
                time.sleep(2)  # let the clients connect
            if phase == "rest":
                time.sleep(12)  # past the server's read and write deadlines
            rows.append((phase, measure(args.phase_seconds, server.pid, base, context)))
            stop.set()
            clients.join(30)
    finally:
        server.stdin.close()
        server.wait(30)
    print_table(rows, args)


def print_table(rows: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> None:
    idle_rss = max(s[0] for s in rows[0][1]["samples"])
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    mode = "TLS" if args.tls else "HTTP"
    print(f"hostile clients, {args.phase_seconds:.0f} s a phase, {mode}; idle RSS "
          f"{idle_rss:.1f} MiB; {os.cpu_count()} CPUs, load {load} at the end")  # fmt: skip
    header = ("phase", "RSS max MiB", "vs idle", "threads", "fds max", "server CPU %",
              "scrape p50/p99/max ms",
              "healthz p50/max ms", "failed")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for phase, result in rows:
        samples = result["samples"]
        rss = max(s[0] for s in samples)
        threads = "/".join(sorted({str(s[1]) for s in samples}))
        failed = result["scrapes"].count(None) + result["health"].count(None)
        total = len(result["scrapes"]) + len(result["health"])
        p50, p99, top = ms(result["scrapes"])
        h50, _, htop = ms(result["health"])
        print(f"| {phase} | {rss:.1f} | {rss - idle_rss:+.1f} | {threads} | "
              f"{max(s[2] for s in samples)} | {result['cpu']:.0f} | {p50} / {p99} / {top} | "
              f"{h50} / {htop} | "
              f"{failed}/{total} |")  # fmt: skip
    for name, count in ERRORS.items():
        print(f"failed: {count} x {name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase-seconds", type=float, default=15)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--tls", action="store_true", help="the server speaks TLS (test CA)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--web-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.web_config)
    else:
        run(args)


if __name__ == "__main__":
    main()
