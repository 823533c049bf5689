"""Kubernetes attribution (pod uid, QoS class, container id) from a cgroup path.

Understands the kubelet's two cgroup drivers::

    cgroupfs  /kubepods[/burstable|/besteffort]/pod<uid>/<container id>
    systemd   /kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid with _>.slice
                  /<cri-containerd|crio|docker>-<container id>.scope

Paths are not anchored at the start: nested hosts (kind, k3d, CI runners) add prefixes,
and the last ``kubepods`` level is the one that counts. A kubelet started with
``--cgroup-root=/kubelet`` (kind) names its systemd slices ``kubelet-kubepods…``; that
prefix is accepted too. Pure functions: they never raise, they return ``None``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

QosClass = Literal["guaranteed", "burstable", "besteffort"]
Driver = Literal["cgroupfs", "systemd"]

_CONTAINER_RE = re.compile(
    r"(?:(?P<prefix>cri-containerd|crio-conmon|crio|docker|libpod-conmon|libpod)-)?"
    r"(?P<id>[0-9a-f]{64})(?:\.scope)?"
)
# crio-conmon-<id>.scope holds CRI-O's conmon monitor, not the container's processes; it
# is still attributed to that container (same id, runtime "crio"): conmon exists only for
# it, and an OOM there is the container's pod paying for it.
_RUNTIME_BY_PREFIX = {
    "cri-containerd": "containerd",
    "crio": "crio",
    "crio-conmon": "crio",
    "docker": "docker",
}
_SYSTEMD_ROOT_RE = re.compile(r"(?:.+-)?kubepods\.slice")
_SYSTEMD_QOS_RE = re.compile(r"(?:.+-)?kubepods-(?:burstable|besteffort)\.slice")
_SYSTEMD_POD_RE = re.compile(
    r"(?:.+-)?kubepods(?:-(?P<qos>burstable|besteffort))?-pod(?P<uid>[0-9a-fA-F_]+)\.slice"
)
_CGROUPFS_POD_RE = re.compile(r"pod(?P<uid>[0-9a-fA-F-]+)")
_QOS_BY_NAME: dict[str, QosClass] = {"burstable": "burstable", "besteffort": "besteffort"}
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# Static (mirror) pods: the uid is a hash of the manifest, 32 hex digits without dashes.
_STATIC_UID_RE = re.compile(r"[0-9a-fA-F]{32}")


@dataclass(frozen=True, slots=True)
class PodCgroup:
    """Where a cgroup sits in the kubelet's hierarchy."""

    pod_uid: str
    """Normalised with dashes (systemd's ``_`` turned back into ``-``)."""
    qos: QosClass
    container_id: str | None
    """The 64-hex id; ``None`` when the path ends at the pod (or below it in an unknown way)."""
    runtime: str | None
    """``containerd``, ``crio`` or ``docker`` when the path says which; else ``None``."""
    driver: Driver


def parse_pod_cgroup(path: str) -> PodCgroup | None:
    """Pod and container of a cgroup path; ``None`` for anything not inside a pod."""
    levels = [level for level in path.split("/") if level]
    for index in reversed(range(len(levels))):
        if levels[index] == "kubepods":
            return _parse_cgroupfs(levels[index + 1 :])
        if _SYSTEMD_ROOT_RE.fullmatch(levels[index]):
            return _parse_systemd(levels[index + 1 :])
    return None


def container_id_from_cgroup(path: str) -> str | None:
    """The 64-hex id of the innermost container level of ``path``, inside kubepods or not.

    Knows bare ids (cgroupfs), ``cri-containerd-``, ``crio-``, ``crio-conmon-``, ``docker-``
    and ``libpod-`` prefixes, with or without ``.scope``.
    """
    for level in reversed([level for level in path.split("/") if level]):
        match = _CONTAINER_RE.fullmatch(level)
        if match is not None:
            return match["id"]
    return None


@lru_cache(maxsize=4096)
def container_cgroup(memcg: str) -> str | None:
    """The container-level prefix of a memory cgroup path (nested cgroups inside a
    container belong to it); ``None`` outside a container."""
    levels = memcg.split("/")
    for end in range(1, len(levels) + 1):
        prefix = "/".join(levels[:end])
        pod = parse_pod_cgroup(prefix) if "kubepods" in prefix else None
        if pod is not None and pod.container_id is not None:
            return prefix
    return None


def _parse_cgroupfs(levels: list[str]) -> PodCgroup | None:
    qos: QosClass = "guaranteed"
    if levels and levels[0] in _QOS_BY_NAME:
        qos = _QOS_BY_NAME[levels[0]]
        levels = levels[1:]
    pod = _CGROUPFS_POD_RE.fullmatch(levels[0]) if levels else None
    uid = _pod_uid(pod["uid"]) if pod else None
    if uid is None:
        return None
    return _pod_cgroup(uid, qos, levels[1:], "cgroupfs")


def _parse_systemd(levels: list[str]) -> PodCgroup | None:
    if levels and _SYSTEMD_QOS_RE.fullmatch(levels[0]):
        levels = levels[1:]
    pod = _SYSTEMD_POD_RE.fullmatch(levels[0]) if levels else None
    uid = _pod_uid(pod["uid"].replace("_", "-")) if pod else None
    if pod is None or uid is None:
        return None
    qos = _QOS_BY_NAME.get(pod["qos"] or "", "guaranteed")
    return _pod_cgroup(uid, qos, levels[1:], "systemd")


def _pod_cgroup(uid: str, qos: QosClass, below_pod: list[str], driver: Driver) -> PodCgroup:
    container = _CONTAINER_RE.fullmatch(below_pod[0]) if below_pod else None
    if container is None:
        return PodCgroup(uid, qos, None, None, driver)
    runtime = _RUNTIME_BY_PREFIX.get(container["prefix"] or "")
    return PodCgroup(uid, qos, container["id"], runtime, driver)


def _pod_uid(candidate: str) -> str | None:
    if _UUID_RE.fullmatch(candidate) or _STATIC_UID_RE.fullmatch(candidate):
        return candidate
    return None
