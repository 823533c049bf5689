"""``nodediag run``: follow the kernel log, serve metrics and health, report findings."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from prometheus_client import disable_created_metrics

from agent.containers import ContainerLookup, containerd_client
from agent.http import HttpServer, make_app
from agent.kernel_watch import STATE_FILE, KernelWatch, open_source
from agent.kube_services import fan_out, start_kube
from agent.metrics import Metrics
from agent.node_pod_cidr import NodePodCidrReader
from agent.oom_findings import LiveEvidence, OomFindings
from agent.periodic import ClusterDnsSource, PeriodicCollectors, build_collectors
from agent.settings import Settings
from agent.state import StateFile
from agent.supervise import Supervisor
from agent.web_config import WebConfig
from collectors.conntrack import TableFullLog
from collectors.finding import Finding
from collectors.memcg import MemcgProbe

log = logging.getLogger(__name__)

STALL_SECONDS = 30.0
EXPIRE_SECONDS = 600.0
"""How often OOM series of pods gone from the node are looked for (they expire after 24 h)."""


def log_finding(finding: Finding) -> None:
    """Findings go to stdout as JSON lines (the log), one per line, flushed at once."""
    sys.stdout.write(finding.to_json() + "\n")
    sys.stdout.flush()


def run(settings: Settings, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    # No `_created` series: half the /metrics lines, and DESIGN.md names none.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = Metrics()
    source = open_source(settings)
    live = LiveEvidence(MemcgProbe(settings.host_root), settings.live_evidence_window)
    containers = ContainerLookup(containerd_client(settings), metrics)
    supervisor = Supervisor(metrics.registry, stop)
    kube = start_kube(settings, metrics.registry, stop, supervisor)  # None: --no-kube or no cluster
    report = fan_out(log_finding, kube.submit) if kube else log_finding
    table_full = TableFullLog()  # conntrack's messages, for the conntrack collector
    watch = KernelWatch(
        source,
        OomFindings(settings.node_name, live, containers, kube.pods if kube else None),
        report,
        metrics,
        StateFile(settings.state_dir / STATE_FILE),
        observers=[table_full],
    )
    resume = watch.resume_point()
    source.start(resume=resume)
    log.info(
        "node %s: %s",
        settings.node_name,
        f"resuming the {source.name} log after {resume}"
        if resume
        else f"no saved position: reading the {source.name} log from this boot's start",
    )
    if settings.no_kube:
        log.info("--no-kube: findings go to the log and /metrics only")

    def ready() -> tuple[bool, str]:
        return watch.caught_up, "caught up" if watch.caught_up else "catching up on the kernel log"

    web_config = WebConfig(settings.web_config_file) if settings.web_config_file else None
    app = make_app(metrics.registry, health_check(watch, supervisor), ready)
    server = HttpServer(*settings.listen, app, web_config=web_config)
    server.start()
    scheme = "https" if web_config and web_config.tls else "http"
    log.info("serving /metrics, /healthz, /readyz on %s://%s:%d", scheme, settings.listen[0],
             server.port)  # fmt: skip
    _stop_on_signals(stop)
    supervisor.start("containerd-events", containers.follow_task_starts)
    client = kube.client if kube else None
    node_object = NodePodCidrReader(settings.node_name, client) if client else None
    _start_periodic(settings, metrics, supervisor, report, table_full, node_object)
    pods = kube.pods if kube else None
    alive = (lambda uid: pods.pod(uid) is not None) if pods is not None else None
    _start_expiry(metrics, supervisor, alive)
    try:
        watch.follow(stop, settings.idle_flush_seconds)
    finally:
        stop.set()
        server.stop()
        source.close()
        for thread in supervisor.threads():
            thread.join(timeout=10)
        if kube:
            kube.join(timeout=10)  # the event sink's final flush
    log.info("stopped")
    return 0


def health_check(watch: KernelWatch, supervisor: Supervisor) -> Callable[[], tuple[bool, str]]:
    """``/healthz``: the kernel log loop turns, and no worker thread keeps failing."""

    def healthy() -> tuple[bool, str]:
        stalled = time.monotonic() - watch.last_loop
        threads_ok, threads = supervisor.health()
        ok = stalled < STALL_SECONDS and threads_ok
        return ok, f"kernel log loop ran {stalled:.1f}s ago; {threads}"

    return healthy


def _start_periodic(
    settings: Settings,
    metrics: Metrics,
    supervisor: Supervisor,
    report: Callable[[Finding], None] = log_finding,
    table_full: TableFullLog | None = None,
    node_object: NodePodCidrReader | None = None,
) -> None:
    collectors = build_collectors(
        settings, metrics, ClusterDnsSource(settings), table_full, node_object
    )
    periodic = PeriodicCollectors(collectors, metrics, report)
    supervisor.start("collectors", lambda stop: periodic.loop(stop, settings.collect_interval))
    if settings.fix_vxlan_offload:
        from collectors.vxlan import VxlanCollector

        vxlan = next(c for c in collectors if isinstance(c, VxlanCollector))
        supervisor.start("vxlan-fix", vxlan.watch_links)


def _start_expiry(
    metrics: Metrics, supervisor: Supervisor, alive: Callable[[str], bool] | None
) -> None:
    def loop(stop: threading.Event) -> None:
        while not stop.wait(EXPIRE_SECONDS):
            dropped = metrics.expire_oom_series(alive)
            if dropped:
                log.info("dropped %d OOM series of pods gone from the node", dropped)

    supervisor.start("series-expiry", loop)


def _stop_on_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
