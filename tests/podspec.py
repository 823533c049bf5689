"""A rendered pod spec, translated to the ``ctr run`` options that make containerd + runc run
its container the way the kubelet and containerd's CRI plugin would: capabilities,
no_new_privs, seccomp, read-only root, user (uid/gid 0 only: ctr run has no --user), host
namespaces, hostPath volumes (with their ``type`` checks and creation), memory-backed
emptyDirs, environment (``fieldRef`` too), memory limit, CPU shares, QoS cgroup, command
and args.

Not modelled: the service account token the kubelet mounts (the agent then finds no
cluster and reports to its log and /metrics only) and the /etc/hosts, /etc/hostname and
/etc/resolv.conf files the kubelet writes for the container.

Strict on purpose: a field the translator does not know raises :class:`Unsupported` instead
of being ignored, so a manifest change always reaches a test that runs it. What the kubelet
would refuse (a missing ``Directory``, ``runAsNonRoot`` with uid 0) raises
:class:`PodStartError`.

Import as ``import podspec``.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Obj = dict[str, Any]
Qos = Literal["guaranteed", "burstable", "besteffort"]

#: The capabilities containerd gives a container unless told otherwise (containerd's
#: ``oci.populateDefaultUnixSpec``; the CRI plugin starts from the same set).
RUNTIME_DEFAULT_CAPABILITIES = frozenset(
    "CAP_" + name
    for name in (
        "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
    )
)  # fmt: skip

# Pod fields translated below, or that change nothing one container on one node can show
# (scheduling, priority, tolerations; dnsPolicy: the agent resolves nothing by name).
_POD_FIELDS = {
    "serviceAccountName", "dnsPolicy", "priorityClassName", "tolerations", "nodeSelector",
    "affinity", "terminationGracePeriodSeconds", "containers", "volumes", "hostNetwork",
    "hostPID", "hostIPC", "securityContext",
}  # fmt: skip
_CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "args", "command", "env", "ports", "livenessProbe",
    "readinessProbe", "startupProbe", "resources", "securityContext", "volumeMounts",
    "workingDir",
}  # fmt: skip
_SECURITY_FIELDS = {
    "runAsUser", "runAsGroup", "runAsNonRoot", "readOnlyRootFilesystem",
    "allowPrivilegeEscalation", "seccompProfile", "capabilities", "privileged",
}  # fmt: skip
#: The pod-level securityContext fields modelled (fsGroup, sysctls, … are not).
_POD_SECURITY_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile"}
_PROPAGATION = {None: "rprivate", "None": "rprivate", "HostToContainer": "rslave",
                "Bidirectional": "rshared"}  # fmt: skip
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
          "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}  # fmt: skip


class Unsupported(ValueError):
    """The spec uses something this translator cannot express (so the test cannot run it)."""


class PodStartError(RuntimeError):
    """The kubelet would not start this pod (e.g. a hostPath type check fails)."""


@dataclass(frozen=True)
class HttpProbe:
    path: str
    port: int


@dataclass
class CtrRun:
    """What ``ctr run`` needs: ``options`` go before the image ref, ``argv`` after the id."""

    options: list[str]
    argv: list[str]
    env: dict[str, str]
    memory_limit: int
    qos: Qos  # where the kubelet puts the pod's cgroup
    capabilities: frozenset[str]  # the container's bounding set, CAP_ names
    no_new_privs: bool
    seccomp: bool
    privileged: bool
    ports: dict[str, int] = field(default_factory=dict)
    probes: dict[str, HttpProbe] = field(default_factory=dict)
    termination_grace_seconds: float = 30


def quantity(text: str | int) -> int:
    """A Kubernetes resource quantity (``128Mi``, ``64M``, ``1G``) in bytes."""
    match = _QUANTITY.match(str(text))
    if not match:
        raise Unsupported(f"resource quantity {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _millicores(text: str | int) -> int:
    value = str(text)
    return int(value[:-1]) if value.endswith("m") else int(float(value) * 1000)


def security_context(pod: Obj, container: Obj) -> Obj:
    """The container's effective securityContext (container fields over pod fields)."""
    unknown = set(pod.get("securityContext", {})) - _POD_SECURITY_FIELDS
    if unknown:
        raise Unsupported(f"pod securityContext fields {sorted(unknown)}")
    merged = dict(pod.get("securityContext", {}))
    merged.update(container.get("securityContext", {}))
    unknown = set(merged) - _SECURITY_FIELDS
    if unknown:
        raise Unsupported(f"securityContext fields {sorted(unknown)}")
    return merged


def capabilities(context: Obj) -> frozenset[str]:
    """The bounding set CRI gives: everything when privileged; else the runtime's default
    set, minus ``drop`` (``ALL`` empties it), plus ``add``."""
    if context.get("privileged"):
        return frozenset(_all_capabilities())
    caps = context.get("capabilities", {})
    drop = {_cap(c) for c in caps.get("drop", [])}
    add = {_cap(c) for c in caps.get("add", [])}
    base = frozenset() if "CAP_ALL" in drop else RUNTIME_DEFAULT_CAPABILITIES - drop
    if "CAP_ALL" in add:
        return frozenset(_all_capabilities())
    return frozenset(base | add)


def _cap(name: str) -> str:
    name = name.upper()
    return name if name.startswith("CAP_") else "CAP_" + name


def _all_capabilities() -> list[str]:
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    names = _CAP_NAMES[: last + 1]
    return ["CAP_" + n for n in names]


#: Capability names by bit number (linux/capability.h).
_CAP_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
    "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip


def cap_names(mask: int) -> frozenset[str]:
    """``CapBnd``-style bit mask -> CAP_ names."""
    return frozenset("CAP_" + n for bit, n in enumerate(_CAP_NAMES) if mask >> bit & 1)


def environment(container: Obj, downward: Mapping[str, str]) -> dict[str, str]:
    """``env`` with ``fieldRef``s resolved from ``downward`` (``spec.nodeName`` -> value) and
    ``$(VAR)`` references expanded as the kubelet expands them."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = expand(str(entry["value"]), env)
            continue
        source = entry.get("valueFrom", {})
        ref = source.get("fieldRef", {}).get("fieldPath")
        if set(source) != {"fieldRef"} or ref not in downward:
            raise Unsupported(f"env {entry['name']}: valueFrom {source}")
        env[entry["name"]] = downward[ref]
    return env


def expand(value: str, env: Mapping[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), value)


def check_host_path(path: Path, kind: str) -> None:
    """The kubelet's hostPath ``type`` semantics: check, or create what ``…OrCreate`` says."""
    if kind == "DirectoryOrCreate":
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    elif kind == "FileOrCreate" and not path.exists():
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.touch(mode=0o644)
    wanted = {
        "Directory": stat.S_ISDIR, "DirectoryOrCreate": stat.S_ISDIR,
        "File": stat.S_ISREG, "FileOrCreate": stat.S_ISREG,
        "Socket": stat.S_ISSOCK, "CharDevice": stat.S_ISCHR, "BlockDevice": stat.S_ISBLK,
    }  # fmt: skip
    if kind in ("", None):
        return
    if kind not in wanted:
        raise Unsupported(f"hostPath type {kind}")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise PodStartError(f"hostPath type check failed: {path} is not a {kind}") from None
    if not wanted[kind](mode):
        raise PodStartError(f"hostPath type check failed: {path} is not a {kind}")


def volume_mounts(pod: Obj, container: Obj) -> Iterator[tuple[Obj, Obj]]:
    """Each volumeMount with its volume; a mount field or volume kind not modelled raises."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        unknown = set(mount) - {"name", "mountPath", "readOnly", "mountPropagation"}
        if unknown:
            raise Unsupported(f"volumeMount {mount['name']}: {sorted(unknown)}")
        volume = volumes[mount["name"]]
        kinds = set(volume) - {"name"}
        if kinds not in ({"hostPath"}, {"emptyDir"}):
            raise Unsupported(f"volume {volume['name']}: {sorted(kinds)}")
        if mount.get("mountPropagation") not in _PROPAGATION:
            raise Unsupported(f"volumeMount {mount['name']}: {mount['mountPropagation']}")
        yield mount, volume


def host_path_source(volume: Obj, host_path: Callable[[str], Path]) -> Path:
    """A hostPath volume's path on the test's node, type-checked (created where the type
    says) as the kubelet does before it starts the container."""
    unknown = set(volume["hostPath"]) - {"path", "type"}
    if unknown:
        raise Unsupported(f"volume {volume['name']}: hostPath {sorted(unknown)}")
    source = host_path(volume["hostPath"]["path"])
    check_host_path(source, volume["hostPath"].get("type", ""))
    return source


def memory_medium(volume: Obj) -> tuple[bool, int | None]:
    """An emptyDir: (on tmpfs, its size limit in bytes)."""
    empty = volume["emptyDir"] or {}
    unknown = set(empty) - {"medium", "sizeLimit"}
    if unknown or empty.get("medium", "") not in ("", "Memory"):
        raise Unsupported(f"volume {volume['name']}: emptyDir {empty}")
    size = quantity(empty["sizeLimit"]) if "sizeLimit" in empty else None
    return empty.get("medium") == "Memory", size


def mounts(pod: Obj, container: Obj, host_path: Callable[[str], Path], scratch: Path) -> list[str]:
    """``--mount`` options for every volumeMount: hostPath volumes at ``host_path(path)``
    (type-checked, created where the type says), emptyDirs as a tmpfs (``medium: Memory``,
    with its ``sizeLimit``) or a fresh directory under ``scratch``."""
    options: list[str] = []
    for mount, volume in volume_mounts(pod, container):
        ro = "ro" if mount.get("readOnly") else "rw"
        propagation = _PROPAGATION[mount.get("mountPropagation")]
        if "hostPath" in volume:
            source = host_path_source(volume, host_path)
            spec = f"type=bind,src={source},options=rbind:{ro}:{propagation}"
        else:
            spec = _empty_dir(volume, scratch, ro)
        options += ["--mount", f"{spec},dst={mount['mountPath']}"]
    return options


def _empty_dir(volume: Obj, scratch: Path, ro: str) -> str:
    in_memory, limit = memory_medium(volume)
    if in_memory:
        size = f":size={limit}" if limit is not None else ""
        return f"type=tmpfs,src=tmpfs,options=nosuid:nodev:mode=777:{ro}{size}"
    directory = scratch / f"empty-dir-{volume['name']}"
    directory.mkdir(mode=0o777, parents=True, exist_ok=True)
    return f"type=bind,src={directory},options=rbind:{ro}"


def translate(
    pod: Obj,
    *,
    entrypoint: Sequence[str],
    cmd: Sequence[str],
    downward: Mapping[str, str],
    network_namespace: Path,
    host_path: Callable[[str], Path],
    scratch: Path,
) -> CtrRun:
    """The ``ctr run`` options for the pod's only container. ``entrypoint``/``cmd``: the
    image's; ``network_namespace``: what ``hostNetwork: true`` joins (the test's node);
    ``host_path`` maps a manifest hostPath to the path used here."""
    read = read_pod(pod)
    container, context = read.container, read.context
    options = _security_options(context)
    options += _namespace_options(pod, network_namespace)
    options += mounts(pod, container, host_path, scratch)
    env = environment(container, downward)
    for name, value in env.items():
        options += ["--env", f"{name}={value}"]
    if "workingDir" in container:
        options += ["--cwd", container["workingDir"]]
    if read.cpu_quota:
        options += ["--cpu-period", str(CPU_PERIOD), "--cpu-quota", str(read.cpu_quota)]
    if read.cpu_shares:
        options += ["--cpu-shares", str(read.cpu_shares)]
    return CtrRun(
        options=options,
        argv=_argv(container, entrypoint, cmd, env),
        env=env,
        memory_limit=read.memory_limit,
        qos=read.qos,
        capabilities=capabilities(context),
        no_new_privs=read.no_new_privs,
        seccomp=_seccomp(pod, context),
        privileged=bool(context.get("privileged")),
        ports=read.ports,
        probes=read.probes,
        termination_grace_seconds=read.termination_grace_seconds,
    )


CPU_PERIOD = 100_000  # the kubelet's CFS period (µs)


@dataclass(frozen=True)
class PodRead:
    """The pod's only container as the kubelet reads it: every field checked against what
    is modelled, the securityContext merged, resources in bytes, shares and quota."""

    pod: Obj
    container: Obj
    context: Obj
    memory_limit: int  # 0: none
    cpu_shares: int | None  # from the CPU request: 1024 per CPU, at least 2
    cpu_quota: int | None  # per CPU_PERIOD, from the CPU limit
    qos: Qos
    ports: dict[str, int]
    probes: dict[str, HttpProbe]

    @property
    def no_new_privs(self) -> bool:
        return self.context.get("allowPrivilegeEscalation") is False

    @property
    def termination_grace_seconds(self) -> float:
        return float(self.pod.get("terminationGracePeriodSeconds", 30))


def read_pod(pod: Obj, pod_fields: frozenset[str] = frozenset()) -> PodRead:
    """Check and read ``pod`` (``pod_fields``: more pod fields the caller models)."""
    unknown = set(pod) - _POD_FIELDS - pod_fields
    if unknown:
        raise Unsupported(f"pod spec fields {sorted(unknown)}")
    [container] = pod["containers"]
    unknown = set(container) - _CONTAINER_FIELDS
    if unknown:
        raise Unsupported(f"container fields {sorted(unknown)}")
    resources = container.get("resources", {})
    unknown = set(resources) - {"limits", "requests"}
    if unknown:
        raise Unsupported(f"resources {sorted(unknown)}")
    limits = resources.get("limits", {})
    requests = {**limits, **resources.get("requests", {})}
    unknown = (set(limits) | set(requests)) - {"memory", "cpu"}
    if unknown:
        raise Unsupported(f"resources {sorted(unknown)}")
    ports = {p.get("name", str(p["containerPort"])): p["containerPort"] for p in
             container.get("ports", [])}  # fmt: skip
    return PodRead(
        pod=pod,
        container=container,
        context=security_context(pod, container),
        memory_limit=quantity(limits["memory"]) if "memory" in limits else 0,
        cpu_shares=_shares(requests["cpu"]) if "cpu" in requests else None,
        cpu_quota=_millicores(limits["cpu"]) * CPU_PERIOD // 1000 if "cpu" in limits else None,
        qos=_qos(limits, requests),
        ports=ports,
        probes=_probes(container, ports),
    )


def _shares(cpu: str | int) -> int:
    return max(2, _millicores(cpu) * 1024 // 1000)


def _qos(limits: Mapping[str, Any], requests: Mapping[str, Any]) -> Qos:
    """The pod's QoS class, as the kubelet derives it from one container's resources."""
    if not requests:
        return "besteffort"
    same = set(requests) == set(limits) >= {"cpu", "memory"} and all(
        _amount(k, requests[k]) == _amount(k, limits[k]) for k in requests
    )
    return "guaranteed" if same else "burstable"


def _amount(resource: str, value: str | int) -> int:
    return _millicores(value) if resource == "cpu" else quantity(value)


def check_refused(context: Obj) -> None:
    """What the kubelet (or the API server's validation) refuses to start; the image's user
    is root (uid 0)."""
    if context.get("runAsNonRoot") and not context.get("runAsUser"):
        raise PodStartError("runAsNonRoot with uid 0 (or no runAsUser): the kubelet refuses")
    if context.get("privileged") and context.get("allowPrivilegeEscalation") is False:
        raise PodStartError("privileged with allowPrivilegeEscalation false")


def _security_options(context: Obj) -> list[str]:
    check_refused(context)
    uid, gid = context.get("runAsUser"), context.get("runAsGroup")
    if uid not in (None, 0) or gid not in (None, 0):
        # ctr run has no --user: the image's user (root) is all it can run as.
        raise Unsupported(f"runAsUser {uid} / runAsGroup {gid}: only 0 is expressible")
    options: list[str] = []
    if context.get("privileged"):
        options.append("--privileged")
    else:
        wanted = capabilities(context)
        options += [f"--cap-drop={c}" for c in sorted(RUNTIME_DEFAULT_CAPABILITIES - wanted)]
        options += [f"--cap-add={c}" for c in sorted(wanted - RUNTIME_DEFAULT_CAPABILITIES)]
    if context.get("readOnlyRootFilesystem"):
        options.append("--read-only")
    # ctr sets no_new_privs unless told; the kubelet sets it only for
    # allowPrivilegeEscalation: false.
    if context.get("allowPrivilegeEscalation") is not False:
        options.append("--allow-new-privs")
    if _seccomp({}, context):
        options.append("--seccomp")  # containerd's default profile, as CRI's RuntimeDefault
    return options


def seccomp_type(pod: Obj, context: Obj) -> Literal["RuntimeDefault", "Unconfined"]:
    """The container's seccomp profile (container over pod; none is Unconfined)."""
    profile = context.get("seccompProfile") or pod.get("securityContext", {}).get(
        "seccompProfile", {"type": "Unconfined"}
    )
    if profile["type"] not in ("RuntimeDefault", "Unconfined") or set(profile) != {"type"}:
        raise Unsupported(f"seccompProfile {profile}")
    kind: Literal["RuntimeDefault", "Unconfined"] = profile["type"]
    return kind


def _seccomp(pod: Obj, context: Obj) -> bool:
    # containerd's CRI applies no seccomp profile to privileged containers.
    return seccomp_type(pod, context) == "RuntimeDefault" and not context.get("privileged")


def _namespace_options(pod: Obj, network_namespace: Path) -> list[str]:
    if not pod.get("hostNetwork"):
        raise Unsupported("a pod network (only hostNetwork: true is modelled)")
    # The "host" PID and IPC namespaces are the test's own (pid 1 may live in another).
    options = ["--with-ns", f"network:{network_namespace}"]
    if pod.get("hostPID"):
        options += ["--with-ns", f"pid:/proc/{os.getpid()}/ns/pid"]
    if pod.get("hostIPC"):
        options += ["--with-ns", f"ipc:/proc/{os.getpid()}/ns/ipc"]
    return options


def _argv(container: Obj, entrypoint: Sequence[str], cmd: Sequence[str],
          env: Mapping[str, str]) -> list[str]:  # fmt: skip
    """Kubernetes' rule: ``command`` replaces the ENTRYPOINT (and drops CMD), ``args``
    replaces CMD; ``$(VAR)`` expands from the container's env."""
    if "command" in container:
        argv = list(container["command"]) + list(container.get("args", []))
    else:
        argv = list(entrypoint) + list(container.get("args", cmd))
    return [expand(a, env) for a in argv]


def _probes(container: Obj, ports: Mapping[str, int]) -> dict[str, HttpProbe]:
    probes: dict[str, HttpProbe] = {}
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container.get(kind)
        if probe is None:
            continue
        if "httpGet" not in probe:
            raise Unsupported(f"{kind}: only httpGet probes are modelled")
        port = probe["httpGet"]["port"]
        probes[kind] = HttpProbe(probe["httpGet"]["path"], ports[port] if isinstance(port, str)
                                 else int(port))  # fmt: skip
    return probes
