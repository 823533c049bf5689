"""containerd lookups for findings: failures are counted, and logged once, not per record."""

from __future__ import annotations

import logging
from pathlib import Path

from agent.metrics import Metrics
from agent.settings import Settings
from collectors.containerd import ContainerdClient, ContainerdUnavailable, ContainerInfo, TaskInfo

log = logging.getLogger(__name__)


def containerd_client(settings: Settings) -> ContainerdClient:
    return ContainerdClient([settings.resolve(s) for s in settings.containerd_sockets])


class ContainerLookup:
    """Names and task state of containers; ``None`` answers when containerd cannot tell."""

    def __init__(self, client: ContainerdClient, metrics: Metrics | None = None) -> None:
        self.client = client
        self.metrics = metrics
        self._down_reason: str | None = None

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
        try:
            task = self.client.task(container_id)
        except ContainerdUnavailable as error:
            self._unreachable(str(error))
            return None
        self._reachable()
        return task

    @property
    def down_reason(self) -> str | None:
        """Why containerd did not answer the last lookup; None when it did (or none yet)."""
        return self._down_reason

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
