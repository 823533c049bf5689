"""``nodediag run``: follow the kernel log, serve metrics and health, report findings."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from types import FrameType

from agent.containers import ContainerLookup, containerd_client
from agent.http import HttpServer, make_app
from agent.kernel_watch import STATE_FILE, KernelWatch, open_source
from agent.metrics import Metrics
from agent.oom_findings import LiveEvidence, OomFindings
from agent.settings import Settings
from agent.state import StateFile
from collectors.finding import Finding
from collectors.memcg import MemcgProbe

log = logging.getLogger(__name__)

STALL_SECONDS = 30.0


def log_finding(finding: Finding) -> None:
    """Findings go to stdout as JSON lines (the log), one per line, flushed at once."""
    sys.stdout.write(finding.to_json() + "\n")
    sys.stdout.flush()


def run(settings: Settings, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    metrics = Metrics()
    source = open_source(settings)
    live = LiveEvidence(MemcgProbe(settings.host_root), settings.live_evidence_window)
    containers = ContainerLookup(containerd_client(settings), metrics)
    watch = KernelWatch(
        source,
        OomFindings(settings.node_name, live, containers),
        log_finding,
        metrics,
        StateFile(settings.state_dir / STATE_FILE),
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

    def healthy() -> tuple[bool, str]:
        stalled = time.monotonic() - watch.last_loop
        return stalled < STALL_SECONDS, f"kernel log loop ran {stalled:.1f}s ago"

    def ready() -> tuple[bool, str]:
        return watch.caught_up, "caught up" if watch.caught_up else "catching up on the kernel log"

    server = HttpServer(*settings.listen, make_app(metrics.registry, healthy, ready))
    server.start()
    log.info("serving /metrics, /healthz, /readyz on %s:%d", settings.listen[0], server.port)
    _stop_on_signals(stop)
    try:
        watch.follow(stop, settings.idle_flush_seconds)
    finally:
        server.stop()
        source.close()
    log.info("stopped")
    return 0


def _stop_on_signals(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
