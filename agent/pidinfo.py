"""``nodediag pid PID``: which pod and container a host process belongs to."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from agent.containers import ContainerLookup
from agent.settings import Settings
from collectors.cgroup_path import container_id_from_cgroup, parse_pod_cgroup


class NoSuchProcess(Exception):
    """The pid does not exist (or its /proc entry cannot be read)."""


@dataclass(frozen=True, slots=True)
class ProcessPlace:
    """Where a host process lives; container fields are ``None`` outside containers."""

    pid: int
    cgroup: str | None
    in_container: bool
    container_id: str | None = None
    pod_uid: str | None = None
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    init_pid: int | None = None
    image: str | None = None
    task_status: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cgroup_of(text: str) -> str | None:
    """The cgroup path from /proc/<pid>/cgroup: the one naming a container, else the memory
    controller's (v1), else the unified one (v2)."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if container_id_from_cgroup(path):
            return path
        for controller in controllers.split(",") if controllers else [""]:
            paths.setdefault(controller, path)
    return paths.get("memory") or paths.get("")


def locate(settings: Settings, pid: int, containers: ContainerLookup) -> ProcessPlace:
    path = settings.resolve(f"/proc/{pid}/cgroup")
    try:
        cgroup = cgroup_of(path.read_text())
    except FileNotFoundError as error:
        raise NoSuchProcess(f"no process {pid} (no {path})") from error
    container_id = container_id_from_cgroup(cgroup) if cgroup else None
    if container_id is None:
        return ProcessPlace(pid=pid, cgroup=cgroup, in_container=False)
    pod = parse_pod_cgroup(cgroup) if cgroup else None
    info = containers.container(container_id)
    task = containers.task(container_id) if info is not None else None
    return ProcessPlace(
        pid=pid,
        cgroup=cgroup,
        in_container=True,
        container_id=container_id,
        pod_uid=(info.pod_uid if info and info.pod_uid else (pod.pod_uid if pod else None)),
        namespace=info.pod_namespace if info else None,
        pod=info.pod_name if info else None,
        container=info.container_name if info else None,
        init_pid=task.pid if task else None,
        image=info.image if info else None,
        task_status=task.status if task else None,
    )


def describe(place: ProcessPlace) -> str:
    if not place.in_container:
        return f"process {place.pid} is not in a container (cgroup {place.cgroup or '?'})\n"
    unknown = "unknown (containerd did not answer)"
    pod = f"{place.namespace}/{place.pod}" if place.pod else unknown
    rows = [
        ("pod", pod),
        ("pod uid", place.pod_uid or "unknown"),
        ("container", place.container or unknown),
        ("container id", place.container_id or "unknown"),
        ("init pid", str(place.init_pid) if place.init_pid else unknown),
        ("image", place.image or unknown),
        ("cgroup", place.cgroup or "unknown"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"process {place.pid} is in a container:"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines) + "\n"
