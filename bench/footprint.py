"""Footprint of ``nodediag run``: import cost per library, idle RSS/CPU, ``/metrics`` scrape time.

    .venv/bin/python bench/footprint.py [--duration 600] [--warmup 20] \
        [--only imports,idle,load,scrape] [--containers 300] [--kills-per-minute 100]

Prints one table per part (issue 7, benchmark 4). Targets: RSS ≤ 64 MiB, idle CPU ≤ 2
millicores, scrape ≤ 20 ms.

- **imports**: each entry point in a fresh interpreter; VmRSS (``/proc/self/status``) and wall
  time before and after the import, so the cost is on top of the bare interpreter.
- **idle**: the real ``python -m agent run`` in a subprocess (``--no-kube``, and with a kubeconfig
  pointing at ``tests/kube_standin.py``'s API stand-in, run in this process); after ``--warmup``
  seconds, RSS is sampled every second for ``--duration`` seconds and CPU is the process's
  utime+stime delta over that window (``/proc/PID/stat``), in millicores.
- **load**: the same two runs while ``--containers`` throwaway kubepods-style memory cgroups
  (created before the agents start, so they are known to the counter walk) are OOM-killed at a
  steady ``--kills-per-minute`` (``tests/stormkit.py``, staggered); "kills / counted" is the
  cgroups' ``oom_kill`` counter rise vs the rise of the agent's ``nodediag_oom_kills_total``.
- **scrape**: 300 containers' ``nodediag_oom_kills_total`` series (real ``Finding`` objects fed
  through ``Metrics.record_finding``, one pod per container) plus every periodic collector's
  registered metrics, served by the agent's own ``HttpServer``/``make_app`` on 127.0.0.1; the
  time of a full ``GET /metrics`` over a fresh connection (urllib), p50/p99 of 200 scrapes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

MiB = 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")

IMPORTS = [
    ("(bare interpreter)", ""),
    ("prometheus_client", "import prometheus_client"),
    (
        "prometheus_client (as used)",
        "from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app",
    ),
    ("pyroute2 (package: IPRoute)", "from pyroute2 import IPRoute"),
    ("pyroute2.ethtool.Ethtool", "from pyroute2.ethtool import Ethtool"),
    ("pyroute2.iproute.linux.IPRoute", "from pyroute2.iproute.linux import IPRoute"),
    ("pyroute2.ethtool.ioctl.IoctlEthtool", "from pyroute2.ethtool.ioctl import IoctlEthtool"),
    ("pyroute2.netlink.rtnl.marshal", "from pyroute2.netlink.rtnl.marshal import MarshalRtnl"),
    ("grpc", "import grpc"),
    ("kubernetes.client", "import kubernetes.client"),
    (
        "kubernetes (as used: ApiClient, config)",
        "from kubernetes.client import ApiClient, "
        "Configuration; from kubernetes.config import load_incluster_config, load_kube_config",
    ),
    ("urllib3", "import urllib3"),
    ("systemd.journal", "import systemd.journal"),
    ("yaml", "import yaml"),
    ("agent.daemon (what `run` imports at start)", "import agent.cli, agent.daemon"),
    (
        "agent.daemon + collectors",
        "import agent.daemon, collectors.vxlan, "
        "collectors.dns_probe, collectors.firewall_collector",
    ),
]

PROBE = r"""
import sys, time
sys.path.insert(0, {repo!r})
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
before = rss(); t = time.perf_counter()
{stmt}
took = time.perf_counter() - t
print(before, rss(), took, len([m for m in sys.modules if m.startswith('pyroute2')]))
"""


def import_costs() -> list[tuple[str, float, float, float, int]]:
    rows = []
    for label, stmt in IMPORTS:
        out = subprocess.run(
            [sys.executable, "-c", PROBE.format(repo=str(REPO), stmt=stmt or "pass")],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout.split()
        before, after, took, pyroute2_mods = int(out[0]), int(out[1]), float(out[2]), int(out[3])
        rows.append((label, after / MiB, (after - before) / MiB, took * 1000, pyroute2_mods))
    return rows


def _rss(pid: int, field: str = "VmRSS") -> int:
    """VmRSS, or RssAnon (without file pages such as the journal files sd-journal maps)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime; ``children``: plus the reaped children's (iptables-save, nft, ...)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])
    return (own + (int(fields[13]) + int(fields[14]) if children else 0)) / TICK


def _wait_up(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("agent did not come up")


def _kills_counted(port: int) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "nodediag_oom_kills_total"
    )


def _steady_count(port: int, quiet: float = 3.0, timeout: float = 300.0) -> float:
    """The kill counter once it stopped moving (the journal backlog is read)."""
    deadline = time.monotonic() + timeout
    last, since = _kills_counted(port), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.5)
        value = _kills_counted(port)
        if value != last:
            last, since = value, time.monotonic()
    return last


def idle_runs(
    duration: float, warmup: float, kube: bool, storm: Any = None
) -> list[tuple[str, ...]]:
    """Both runs at once (separate processes; CPU is per process). ``storm``: an entered
    ``stormkit.Storm`` (its containers exist before the agents start), started after the
    warm-up."""
    import realkernel
    from agentproc import free_port

    # The agents read the journal (their default source): without a journald nothing new
    # reaches it and the run measures nothing.
    journald = realkernel.ensure_journald()
    tmp = Path(tempfile.mkdtemp(prefix="nodediag-footprint-"))
    standin = None
    runs: dict[str, list[str]] = {"run --no-kube": ["--no-kube"]}
    if kube:
        import kube_standin as ks

        standin = ks.KubeStandin().start()
        standin.add_node(platform.node())
        runs["run + Events (API stand-in)"] = [
            "--kubeconfig",
            str(standin.write_kubeconfig(tmp / "kubeconfig")),
        ]
    procs: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
    for name, extra in runs.items():
        port = free_port()
        state = tmp / f"state-{port}"
        cmd = [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state),
            "--cluster-dns",
            "127.0.0.1",
            *extra,
        ]
        with open(tmp / f"{port}.log", "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        procs[name] = (proc, port, " ".join(cmd[1:]))
    rows: list[tuple[str, ...]] = []
    try:
        for _proc, port, _ in procs.values():
            _wait_up(port)
        time.sleep(warmup)
        counted0 = {n: _steady_count(port) for n, (_, port, _) in procs.items()}
        if storm is not None:
            storm.start()
        start = {
            n: (_cpu_seconds(p.pid), _cpu_seconds(p.pid, True), time.monotonic())
            for n, (p, _, _) in procs.items()
        }
        samples: dict[str, list[int]] = {n: [] for n in procs}
        anon: dict[str, list[int]] = {n: [] for n in procs}
        end = time.monotonic() + duration
        while time.monotonic() < end:
            for n, (p, _, _) in procs.items():
                samples[n].append(_rss(p.pid))
                anon[n].append(_rss(p.pid, "RssAnon"))
            time.sleep(1.0)
        kills = 0
        if storm is not None:
            storm.stop()  # the kills end with the window
            kills = sum(storm.deltas().values())
            time.sleep(5)  # the last kills reach /metrics
        for n, (p, port, command) in procs.items():
            cpu0, all0, t0 = start[n]
            elapsed = time.monotonic() - t0
            millicores = (_cpu_seconds(p.pid) - cpu0) / elapsed * 1000
            with_children = (_cpu_seconds(p.pid, True) - all0) / elapsed * 1000
            counted = _kills_counted(port) - counted0[n]
            s = samples[n]
            rows.append(
                (
                    n,
                    f"{duration:.0f} s",
                    f"{statistics.median(s) / MiB:.1f}",
                    f"{max(s) / MiB:.1f}",
                    f"{statistics.median(anon[n]) / MiB:.1f}",
                    f"{millicores:.2f}",
                    f"{with_children:.2f}",
                    f"{kills} / {counted:.0f}",
                    command,
                )
            )
    finally:
        for proc, _, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
        if standin is not None:
            standin.stop()
        journald.stop()  # only if this run started it
    return rows


def load_storm(containers: int, per_minute: float, duration: float) -> Any:
    """``containers`` throwaway kubepods-style memory cgroups, each killed every
    ``containers / per_minute`` minutes, staggered: a steady ``per_minute`` kills/min."""
    import stormkit

    period = containers / per_minute * 60
    return stormkit.Storm(
        n=containers,
        per_container=int(duration // period) + 1,
        gap=period,
        stagger=period,
    )


def scrape(
    containers: int = 300, scrapes: int = 200, created: bool = False
) -> tuple[int, int, float, float, float]:
    from prometheus_client import disable_created_metrics

    from agent.http import HttpServer, make_app
    from agent.metrics import Metrics
    from agent.periodic import ClusterDnsSource, build_collectors
    from agent.settings import Settings
    from collectors.finding import Finding, Subject

    if not created:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # as agent.daemon.run does
    settings = Settings(no_kube=True, cluster_dns=("127.0.0.1",), listen=("127.0.0.1", 0))
    metrics = Metrics()
    build_collectors(settings, metrics, ClusterDnsSource(settings))
    scopes = ["invisible", "container", "unknown"]
    for i in range(containers):
        pod = f"workload-{i:03d}-7c9d8b6f4d-x{i:04d}"
        finding = Finding(
            reason="InvisibleOOMKill",
            severity="warning",
            time=None,
            node="bench",
            subject=Subject("Pod", pod, f"team-{i % 12}", uid=f"uid-{i}", container=f"app-{i % 3}"),
            message="bench",
            details={"scope": scopes[i % 3]},
        )
        for _ in range(1 + i % 4):
            metrics.record_finding(finding)
    server = HttpServer(
        "127.0.0.1", 0, make_app(metrics.registry, lambda: (True, ""), lambda: (True, ""))
    )
    server.start()
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        body = urllib.request.urlopen(url).read()
        times = []
        for _ in range(scrapes):
            t = time.perf_counter()
            urllib.request.urlopen(url).read()
            times.append((time.perf_counter() - t) * 1000)
    finally:
        server.stop()
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    times.sort()
    return series, len(body), times[len(times) // 2], times[int(len(times) * 0.99) - 1], max(times)


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="idle window (s)")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds before measuring")
    parser.add_argument("--only", default="imports,scrape,idle,load")
    parser.add_argument("--no-kube-run", action="store_true", help="skip the stand-in run")
    parser.add_argument(
        "--containers", type=int, default=300, help="load: throwaway containers known"
    )
    parser.add_argument("--kills-per-minute", type=float, default=100.0, help="load")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"kernel {platform.release()}, Python {platform.python_version()}\n"
    )
    if "imports" in parts:
        rows: list[tuple[str, ...]] = [
            (label, f"{total:.1f}", f"{cost:+.1f}", f"{ms:.0f}", str(n))
            for label, total, cost, ms, n in import_costs()
        ]
        print("Import cost, fresh interpreter each:")
        print(table(("import", "RSS MiB", "Δ MiB", "ms", "pyroute2 modules"), rows) + "\n")
    if "scrape" in parts:
        rows = []
        for created in (True, False):  # True first: disabling `_created` is process-wide
            series, size, p50, p99, worst = scrape(created=created)
            what = "with _created (before)" if created else "no _created (agent)"
            rows.append((what, str(series), str(size), f"{p50:.2f}", f"{p99:.2f}", f"{worst:.2f}"))
        print(
            "/metrics with 300 containers' OOM series (in-process agent HTTP server), target 20 ms:"
        )
        print(table(("exposition", "lines", "bytes", "p50 ms", "p99 ms", "max ms"), rows) + "\n")
    header = (
        "run",
        "window",
        "RSS median MiB",
        "RSS max MiB",
        "RssAnon MiB",
        "CPU mc",
        "+ children mc",
        "kills / counted",
        "command",
    )
    if "idle" in parts:
        idle = idle_runs(args.duration, args.warmup, kube=not args.no_kube_run)
        print(
            f"Idle footprint (after {args.warmup:.0f} s warm-up; targets RSS ≤ 64 MiB, "
            "CPU ≤ 2 millicores):"
        )
        print(table(header, idle) + "\n")
    if "load" in parts:
        with load_storm(args.containers, args.kills_per_minute, args.duration) as storm:
            loaded = idle_runs(args.duration, args.warmup, not args.no_kube_run, storm)
        print(
            f"Under load: {args.kills_per_minute:.0f} OOM kills/min spread over "
            f"{args.containers} throwaway containers (after {args.warmup:.0f} s warm-up):"
        )
        print(table(header, loaded))


if __name__ == "__main__":
    main()
