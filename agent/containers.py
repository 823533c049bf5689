"""containerd lookups for findings: failures are counted, and logged once, not per record.

Each task's init pid is also learnt as the task starts (containerd's TaskStart events), so
a kill reported after its container was already deleted (a pod removed right after the
kill) still tells whether the victim was the init.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

from agent.kube import ReconnectBackoff
from agent.metrics import Metrics
from agent.settings import Settings
from collectors.containerd import (
    ContainerdClient,
    ContainerdUnavailable,
    ContainerInfo,
    TaskInfo,
    TaskStarts,
)

log = logging.getLogger(__name__)

INIT_PIDS_KEPT = 8192
"""Init pids remembered (the most recent task starts)."""
GONE = "DELETED"
"""The status of a task known only from its start event: containerd has deleted it."""
UNASKED = "UNKNOWN"
"""The status of a task known only from its start event while containerd does not answer."""


def containerd_client(settings: Settings) -> ContainerdClient:
    return ContainerdClient([settings.resolve(s) for s in settings.containerd_sockets])


class ContainerLookup:
    """Names and task state of containers; ``None`` answers when containerd cannot tell."""

    def __init__(self, client: ContainerdClient, metrics: Metrics | None = None) -> None:
        self.client = client
        self.metrics = metrics
        self._down_reason: str | None = None
        self._init_pids: OrderedDict[str, int] = OrderedDict()
        self._init_lock = threading.Lock()
        self._subscription: TaskStarts | None = None
        self._cancel_started = False
        self._task_events_error: str | None = None

    def container(self, container_id: str) -> ContainerInfo | None:
        try:
            info = self.client.container(container_id)
        except ContainerdUnavailable as error:
            self._unreachable(str(error))
            return None
        self._reachable()
        if info is None:
            self._count("not_found")
            log.debug("containerd does not know container %s (already removed?)", container_id)
        return info

    def task(self, container_id: str) -> TaskInfo | None:
        """The task now; when containerd no longer has it, its init pid from its start."""
        try:
            task = self.client.task(container_id)
        except ContainerdUnavailable as error:
            self._unreachable(str(error))
            return self.started_task(container_id, UNASKED)
        self._reachable()
        return task if task is not None else self.started_task(container_id)

    def started_task(self, container_id: str, status: str = GONE) -> TaskInfo | None:
        """The task as its start event showed it, without asking containerd (``status``:
        deleted, or unknown while containerd does not answer); ``None`` when no start of it
        was seen."""
        with self._init_lock:
            pid = self._init_pids.get(container_id)
        return TaskInfo(pid, status, 0) if pid is not None else None

    @property
    def down_reason(self) -> str | None:
        """Why containerd did not answer the last lookup; None when it did (or none yet)."""
        return self._down_reason

    def remember_start(self, container_id: str, pid: int) -> None:
        with self._init_lock:
            self._init_pids[container_id] = pid
            self._init_pids.move_to_end(container_id)
            while len(self._init_pids) > INIT_PIDS_KEPT:
                self._init_pids.popitem(last=False)

    def follow_task_starts(self, stop: threading.Event) -> None:
        """Remember each task's init pid as it starts, until ``stop`` (for a worker thread):
        resubscribes with backoff when containerd restarts or is not there yet."""
        backoff = ReconnectBackoff()
        if not self._cancel_started:  # once: a restarted worker re-enters here
            self._cancel_started = True
            threading.Thread(target=self._cancel_on, args=(stop,), daemon=True).start()
        while not stop.is_set():
            try:
                self._subscription = self.client.task_starts()
                if stop.is_set():
                    break
                self._task_events_failed(None)
                for container_id, pid in self._subscription:
                    self.remember_start(container_id, pid)
            except ContainerdUnavailable as error:
                self._task_events_failed(str(error))
            stop.wait(backoff.next())

    def _task_events_failed(self, error: str | None) -> None:
        """Said once per change: without task events an init pid is not known once
        containerd has deleted its container (verdicts then rest on other evidence)."""
        if error is not None and self._task_events_error is None:
            log.warning(
                "containerd task events not followed (%s): init pids of containers deleted"
                " before a kill is judged are not known; retrying",
                error,
            )
        elif error is None and self._task_events_error is not None:
            log.info("containerd task events followed again")
        self._task_events_error = error

    def _cancel_on(self, stop: threading.Event) -> None:
        stop.wait()
        if self._subscription is not None:
            self._subscription.cancel()

    def _unreachable(self, reason: str) -> None:
        self._count("unreachable")
        if self._down_reason is None:
            log.warning(
                "containerd unreachable (%s): findings carry pod uid and container id only "
                "until it answers again",
                reason,
            )
        self._down_reason = reason

    def _reachable(self) -> None:
        if self._down_reason is not None:
            log.info("containerd answers again at %s", self._socket())
        self._down_reason = None

    def _socket(self) -> Path | str:
        existing = [s for s in self.client.sockets if s.exists()]
        return existing[0] if existing else "?"

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.containerd_lookup_failures.labels(reason=reason).inc()
