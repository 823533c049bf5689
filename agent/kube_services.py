"""Starting the Kubernetes side of ``nodediag run``: the Event sink and the pod watch on
supervised threads, and the fan-out of findings to every sink."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from agent.events import EventSink, EventSinkOptions
from agent.kube import Api, Connection, config_source
from agent.pod_lookup import PodLookup
from agent.settings import Settings
from agent.supervise import Supervisor
from collectors.finding import Finding

log = logging.getLogger(__name__)


@dataclass
class KubeServices:
    """What ``nodediag run`` gets when a cluster is configured."""

    submit: Callable[[Finding], None]
    sink: EventSink
    pods: PodLookup
    threads: list[threading.Thread]
    client: Callable[[], Api] | None = None
    """The connection's client (made on first use), for the other readers of the API."""

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def start_kube(
    settings: Settings,
    registry: CollectorRegistry | None,
    stop: threading.Event,
    supervisor: Supervisor | None = None,
) -> KubeServices | None:
    """The event sink and the pod lookup on their own threads (restarted by ``supervisor``
    when they fail); ``None`` with ``--no-kube`` or when no cluster is configured. A cluster
    that does not answer yet is retried in the background (findings are held for it, within
    the sink's bounds)."""
    source = config_source(settings)
    if source is None:
        if not settings.no_kube:
            log.info(
                "no Kubernetes config (not in a pod, no --kubeconfig, no $KUBECONFIG): "
                "findings go to the log and /metrics only"
            )
        return None
    supervisor = supervisor or Supervisor(registry, stop)
    connection = Connection(source)
    pods = PodLookup(settings.node_name, connection.client)
    sink = EventSink(
        settings.node_name,
        connection.client,
        registry,
        pods=pods,
        options=EventSinkOptions.from_env(),
    )
    log.info("Kubernetes Events via %s", source)
    threads = [supervisor.start("events", sink.run), supervisor.start("pod-watch", pods.run)]

    def wake_on_stop() -> None:
        stop.wait()
        sink.wake()

    threading.Thread(target=wake_on_stop, name="events-stop", daemon=True).start()
    return KubeServices(sink.submit, sink, pods, threads[:1], connection.client)


def start_event_sink(
    settings: Settings, registry: CollectorRegistry | None, stop: threading.Event
) -> Callable[[Finding], None] | None:
    """Just the sink's ``submit`` (see :func:`start_kube`)."""
    services = start_kube(settings, registry, stop)
    return services.submit if services else None


def fan_out(*sinks: Callable[[Finding], None]) -> Callable[[Finding], None]:
    """One sink that hands each finding to all ``sinks``; one failing does not stop the rest."""

    def send(finding: Finding) -> None:
        for sink in sinks:
            try:
                sink(finding)
            except Exception:
                log.exception("a finding sink failed")

    return send
