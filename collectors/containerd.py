"""containerd over its unix socket (gRPC), in the CRI namespace ``k8s.io``.

Reads container labels (the CRI's pod name/namespace/uid and container name), task
state (init pid, status), and follows TaskStart events (each task's init pid as it starts,
kept by the agent for kills reported after the task is gone). Short timeouts; container
metadata is cached (a container's labels never change), task state is always asked afresh.
A failed call drops the channel, so the next one reconnects: containerd restarting costs
one failed lookup, not more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collectors.containerd_api import containers_pb2, events_pb2, tasks_pb2

if TYPE_CHECKING:
    import grpc

log = logging.getLogger(__name__)

NAMESPACE = "k8s.io"
POD_NAME = "io.kubernetes.pod.name"
POD_NAMESPACE = "io.kubernetes.pod.namespace"
POD_UID = "io.kubernetes.pod.uid"
CONTAINER_NAME = "io.kubernetes.container.name"
GET_CONTAINER = "/containerd.services.containers.v1.Containers/Get"
GET_TASK = "/containerd.services.tasks.v1.Tasks/Get"
LIST_PIDS = "/containerd.services.tasks.v1.Tasks/ListPids"
SUBSCRIBE = "/containerd.services.events.v1.Events/Subscribe"
TASK_START_TOPIC = "/tasks/start"


class ContainerdUnavailable(Exception):
    """No containerd socket answered (the message says which sockets and why)."""


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """A container's identity as containerd stores it (CRI labels)."""

    id: str
    image: str
    labels: dict[str, str]

    @property
    def pod_name(self) -> str | None:
        return self.labels.get(POD_NAME)

    @property
    def pod_namespace(self) -> str | None:
        return self.labels.get(POD_NAMESPACE)

    @property
    def pod_uid(self) -> str | None:
        return self.labels.get(POD_UID)

    @property
    def container_name(self) -> str | None:
        return self.labels.get(CONTAINER_NAME)


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A container's task: its init process (host pid) and status (RUNNING, STOPPED, …)."""

    pid: int
    status: str
    exit_status: int


def _status_name(value: int) -> str:
    try:
        return str(tasks_pb2.Status.Name(value))
    except ValueError:
        return "UNKNOWN"


class TaskStarts:
    """A subscription to containerd's TaskStart events: iterate for (container id, init
    host pid); :meth:`cancel` ends it from another thread."""

    def __init__(self, call: Any, socket: Path) -> None:
        self._call = call
        self.socket = socket
        self.cancelled = False

    def __iter__(self) -> Iterator[tuple[str, int]]:
        import grpc

        try:
            for envelope in self._call:
                start = events_pb2.TaskStart.FromString(envelope.event.value)
                yield start.container_id, start.pid
        except grpc.RpcError as error:
            if self.cancelled:
                return
            raise ContainerdUnavailable(
                f"containerd events at {self.socket}: {error.code().name}: {error.details()}"
            ) from error

    def cancel(self) -> None:
        self.cancelled = True
        self._call.cancel()


class ContainerdClient:
    """Looks containers up on the first socket of ``sockets`` that exists and answers."""

    def __init__(
        self,
        sockets: Sequence[Path],
        *,
        namespace: str = NAMESPACE,
        timeout: float = 1.0,
        cache_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sockets = list(sockets)
        self.namespace = namespace
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._channels: dict[Path, grpc.Channel] = {}
        self._cache: dict[str, tuple[float, ContainerInfo | None]] = {}
        self._home: dict[str, Path] = {}  # container id -> the socket that knows it

    def container(self, container_id: str) -> ContainerInfo | None:
        """The container, or ``None`` when no containerd knows it."""
        now = self._clock()
        cached = self._cache.get(container_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        info = self._fetch_container(container_id)
        # Containers are immutable; a miss may be one being created: remember it briefly.
        ttl = self.cache_seconds if info is not None else min(5.0, self.cache_seconds)
        if len(self._cache) > 4096:
            self._expire(now)
        self._cache[container_id] = (now + ttl, info)
        return info

    def task(self, container_id: str) -> TaskInfo | None:
        """The container's task now, or ``None`` when it has none (never started, deleted)."""
        request = tasks_pb2.GetRequest(container_id=container_id)
        response = self._call_any(GET_TASK, request, tasks_pb2.GetResponse.FromString, container_id)
        if response is None:
            return None
        process = response.process
        return TaskInfo(process.pid, _status_name(process.status), process.exit_status)

    def pids(self, container_id: str) -> list[int]:
        """Host pids of the task's processes (empty when it has no task)."""
        request = tasks_pb2.ListPidsRequest(container_id=container_id)
        response = self._call_any(
            LIST_PIDS, request, tasks_pb2.ListPidsResponse.FromString, container_id
        )
        return [p.pid for p in response.processes] if response is not None else []

    def task_starts(self) -> TaskStarts:
        """Subscribe to TaskStart events of our namespace on the first existing socket."""
        existing = [s for s in self.sockets if s.exists()]
        if not existing:
            listed = ", ".join(str(s) for s in self.sockets)
            raise ContainerdUnavailable(f"no containerd socket at {listed}")
        socket = existing[0]
        stub: grpc.UnaryStreamMultiCallable[Any, Any] = self._channel(socket).unary_stream(
            SUBSCRIBE,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=events_pb2.Envelope.FromString,
        )
        topic = f'topic=="{TASK_START_TOPIC}",namespace=="{self.namespace}"'
        request = events_pb2.SubscribeRequest(filters=[topic])
        return TaskStarts(stub(request), socket)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def _fetch_container(self, container_id: str) -> ContainerInfo | None:
        request = containers_pb2.GetContainerRequest(id=container_id)
        response = self._call_any(
            GET_CONTAINER, request, containers_pb2.GetContainerResponse.FromString, container_id
        )
        if response is None:
            return None
        c = response.container
        return ContainerInfo(id=c.id, image=c.image, labels=dict(c.labels))

    def _expire(self, now: float) -> None:
        for key in [k for k, (until, _) in self._cache.items() if until <= now]:
            del self._cache[key]

    def _call_any(
        self, method: str, request: Any, parse: Callable[[bytes], Any], container_id: str
    ) -> Any:
        """Ask the socket that knows the container, else each existing socket in turn.

        ``None`` when every reachable one answers NOT_FOUND; ContainerdUnavailable when
        none is reachable.
        """
        home = self._home.get(container_id)
        candidates = [home] if home is not None else [s for s in self.sockets if s.exists()]
        if not candidates:
            listed = ", ".join(str(s) for s in self.sockets)
            raise ContainerdUnavailable(f"no containerd socket at {listed}")
        errors: list[str] = []
        for socket in candidates:
            try:
                response = self._call(socket, method, request, parse)
            except ContainerdUnavailable as error:
                errors.append(str(error))
                continue
            if response is not None:
                self._home[container_id] = socket
                return response
        if len(errors) == len(candidates):
            self._home.pop(container_id, None)
            raise ContainerdUnavailable("; ".join(errors))
        return None

    def _call(self, socket: Path, method: str, request: Any, parse: Callable[[bytes], Any]) -> Any:
        """One unary call; ``None`` for NOT_FOUND; a failed call drops the channel."""
        import grpc

        stub: grpc.UnaryUnaryMultiCallable[Any, Any] = self._channel(socket).unary_unary(
            method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=parse
        )
        try:
            return stub(
                request,
                timeout=self.timeout,
                metadata=(("containerd-namespace", self.namespace),),
            )
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return None
            with self._lock:
                channel = self._channels.pop(socket, None)
            if channel is not None:
                channel.close()
            raise ContainerdUnavailable(
                f"containerd at {socket}: {code.name}: {error.details()}"
            ) from error

    def _channel(self, socket: Path) -> grpc.Channel:
        import grpc

        with self._lock:
            channel = self._channels.get(socket)
            if channel is None:
                # Resolved here so that a symlinked socket works too.
                channel = grpc.insecure_channel(f"unix://{socket.resolve()}")
                self._channels[socket] = channel
            return channel
