"""The pods on this node, from one API watch: names by pod UID, containers by container ID.

A second source next to containerd (which may be unreachable or not know a removed
container), and where Events get the Pod's name, namespace and UID for ``regarding``.
One ``list`` + ``watch`` of ``/api/v1/pods?fieldSelector=spec.nodeName=<node>``, the way
client-go's reflector does it: the first list with ``resourceVersion=0`` (served from the API
server's watch cache), watches with a random ``timeoutSeconds`` in [300, 600) and bookmarks;
after a watch ends or fails, the next one resumes from its last ``resourceVersion`` once the
:class:`~agent.kube.ReconnectBackoff` delay has passed (~1 s after a healthy watch, growing to
[30, 60) s when the server keeps ending them early); a 410 Gone lists again, consistently
(no ``resourceVersion``). Steady state: one watch request per 5 to 10 minutes per node.
Deleted pods are remembered for a while: an OOM kill is often reported as its pod goes.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.kube import JSON, Api, KubeError, KubeUnreachable, ReconnectBackoff
from collectors.containerd import CONTAINER_NAME, POD_NAME, POD_NAMESPACE, POD_UID, ContainerInfo

log = logging.getLogger(__name__)

WATCH_SECONDS = 300
"""The shortest watch asked for; each asks for WATCH_SECONDS·(1 + random) (client-go's
minWatchTimeout), so the watches of many nodes do not end in step."""
DELETED_TTL = 600.0


@dataclass(frozen=True, slots=True)
class PodRef:
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class ContainerRef:
    pod: PodRef
    name: str
    image: str | None


def strip_runtime(container_id: str) -> str:
    """``containerd://4f1a…`` → ``4f1a…`` (any ``<runtime>://`` prefix)."""
    return container_id.split("://", 1)[-1]


def _containers(pod: JSON, ref: PodRef) -> dict[str, ContainerRef]:
    status = pod.get("status") or {}
    found: dict[str, ContainerRef] = {}
    for group in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for entry in status.get(group) or []:
            container = ContainerRef(ref, str(entry.get("name")), entry.get("image"))
            # The container before the last restart keeps its id in lastState.
            previous = ((entry.get("lastState") or {}).get("terminated") or {}).get("containerID")
            for cid in (previous, entry.get("containerID")):
                if cid:
                    found[strip_runtime(str(cid))] = container
    return found


class PodLookup:
    """Pods of ``node`` as the API shows them; answers ``None`` for what it does not know."""

    def __init__(
        self,
        node: str,
        api: Callable[[], Api],
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        deleted_ttl: float = DELETED_TTL,
    ) -> None:
        self.node = node
        self._api = api
        self._clock = clock
        self._rand = rand
        self.deleted_ttl = deleted_ttl
        self.synced = threading.Event()
        self._lock = threading.Lock()
        self._pods: dict[str, PodRef] = {}  # uid → pod
        self._containers: dict[str, ContainerRef] = {}  # container id → container
        self._by_pod: dict[str, set[str]] = {}  # uid → its container ids
        self._deleted: dict[str, float] = {}  # uid → when it was deleted
        self._failing = False

    # ----------------------------------------------------------------- lookups

    def pod(self, uid: str) -> PodRef | None:
        with self._lock:
            return self._pods.get(uid)

    def container(self, container_id: str) -> ContainerRef | None:
        with self._lock:
            return self._containers.get(strip_runtime(container_id))

    def container_info(self, pod_uid: str | None, container_id: str | None) -> ContainerInfo | None:
        """What containerd would have said (CRI labels), for ``OomFindings``."""
        container = self.container(container_id) if container_id else None
        pod = container.pod if container else self.pod(pod_uid) if pod_uid else None
        if pod is None:
            return None
        labels = {POD_NAME: pod.name, POD_NAMESPACE: pod.namespace, POD_UID: pod.uid}
        if container is not None:
            labels[CONTAINER_NAME] = container.name
        image = container.image if container and container.image else ""
        return ContainerInfo(id=container_id or "", image=image, labels=labels)

    # ----------------------------------------------------------------- the watch

    @property
    def _query(self) -> dict[str, str]:
        return {"fieldSelector": f"spec.nodeName={self.node}"}

    def run(self, stop: threading.Event) -> None:
        """List, then watch until ``stop``; every new request after the backoff delay."""
        version: str | None = None
        consistent = False  # after a 410, list from etcd, not the watch cache
        backoff = ReconnectBackoff(clock=self._clock, rand=self._rand)
        while not stop.is_set():
            try:
                api = self._api()
                if version is None:
                    version = self._list(api, consistent)
                    self._recovered()
                version = self._watch(api, version, stop)
                consistent = version is None
            except KubeError as error:
                if error.status == 410:
                    version, consistent = None, True
                else:
                    self._failed(error)
            except (KubeUnreachable, ValueError) as error:
                if stop.is_set():  # the watch was cut short to stop
                    break
                self._failed(error)
            stop.wait(backoff.next())

    def _list(self, api: Api, consistent: bool) -> str:
        query = self._query if consistent else {**self._query, "resourceVersion": "0"}
        answer = api.request("GET", "/api/v1/pods", query=query)
        pods = [p for p in answer.get("items") or [] if isinstance(p, dict)]
        with self._lock:
            alive = set()
            for pod in pods:
                alive.add(self._put(pod))
            for uid in list(self._pods):
                if uid not in alive and uid not in self._deleted:
                    self._deleted[uid] = self._clock()
        self.synced.set()
        log.debug("pod lookup: %d pods on node %s", len(pods), self.node)
        return str((answer.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, api: Api, version: str, stop: threading.Event) -> str | None:
        """Follow the watch; the version to resume from, ``None`` to list again."""
        seconds = int(WATCH_SECONDS * (1 + self._rand()))
        query = {
            **self._query,
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        for event in api.watch("/api/v1/pods", query, timeout=seconds + 30, stop=stop):
            kind = event.get("type")
            obj: Any = event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    return None
                raise KubeError(int(obj.get("code") or 500), obj)
            self._recovered()
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            with self._lock:
                if kind in ("ADDED", "MODIFIED"):
                    self._put(obj)
                elif kind == "DELETED":
                    uid = str((obj.get("metadata") or {}).get("uid") or "")
                    self._deleted[uid] = self._clock()
                self._expire()
            if stop.is_set():
                break
        return version

    def _put(self, pod: JSON) -> str:
        meta = pod.get("metadata") or {}
        ref = PodRef(str(meta.get("namespace") or ""), str(meta.get("name") or ""),
                     str(meta.get("uid") or ""))  # fmt: skip
        self._pods[ref.uid] = ref
        self._deleted.pop(ref.uid, None)
        containers = _containers(pod, ref)
        self._containers.update(containers)
        self._by_pod.setdefault(ref.uid, set()).update(containers)
        return ref.uid

    def _expire(self) -> None:
        now = self._clock()
        for uid, when in list(self._deleted.items()):
            if now - when > self.deleted_ttl:
                del self._deleted[uid]
                self._pods.pop(uid, None)
                for cid in self._by_pod.pop(uid, set()):
                    self._containers.pop(cid, None)

    def _failed(self, error: Exception) -> None:
        if not self._failing:
            forbidden = isinstance(error, KubeError) and error.status == 403
            log.warning(
                "pod watch on node %s failed (%s)%s; retrying in the background",
                self.node,
                error,
                " — the agent needs get/list/watch on pods" if forbidden else "",
            )
        else:
            log.debug("pod watch still failing: %s", error)
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("pod watch on node %s works again", self.node)
        self._failing = False
