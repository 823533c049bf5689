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
from collections.abc import Callable, Mapping, Sequence
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
    merged = {k: v for k, v in pod.get("securityContext", {}).items() if k in _SECURITY_FIELDS}
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
            env[entry["name"]] = _expand(str(entry["value"]), env)
            continue
        source = entry.get("valueFrom", {})
        ref = source.get("fieldRef", {}).get("fieldPath")
        if set(source) != {"fieldRef"} or ref not in downward:
            raise Unsupported(f"env {entry['name']}: valueFrom {source}")
        env[entry["name"]] = downward[ref]
    return env


def _expand(value: str, env: Mapping[str, str]) -> str:
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


def mounts(pod: Obj, container: Obj, host_path: Callable[[str], Path], scratch: Path) -> list[str]:
    """``--mount`` options for every volumeMount: hostPath volumes at ``host_path(path)``
    (type-checked, created where the type says), emptyDirs as a tmpfs (``medium: Memory``,
    with its ``sizeLimit``) or a fresh directory under ``scratch``."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    options: list[str] = []
    for mount in container.get("volumeMounts", []):
        unknown = set(mount) - {"name", "mountPath", "readOnly", "mountPropagation"}
        if unknown:
            raise Unsupported(f"volumeMount {mount['name']}: {sorted(unknown)}")
        volume = volumes[mount["name"]]
        ro = "ro" if mount.get("readOnly") else "rw"
        propagation = _PROPAGATION[mount.get("mountPropagation")]
        if "hostPath" in volume:
            source = host_path(volume["hostPath"]["path"])
            check_host_path(source, volume["hostPath"].get("type", ""))
            spec = f"type=bind,src={source},options=rbind:{ro}:{propagation}"
        elif "emptyDir" in volume:
            spec = _empty_dir(volume, scratch, ro)
        else:
            raise Unsupported(f"volume {volume['name']}: {sorted(set(volume) - {'name'})}")
        options += ["--mount", f"{spec},dst={mount['mountPath']}"]
    return options


def _empty_dir(volume: Obj, scratch: Path, ro: str) -> str:
    empty = volume["emptyDir"] or {}
    if empty.get("medium") == "Memory":
        size = f":size={quantity(empty['sizeLimit'])}" if "sizeLimit" in empty else ""
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
    unknown = set(pod) - _POD_FIELDS
    if unknown:
        raise Unsupported(f"pod spec fields {sorted(unknown)}")
    [container] = pod["containers"]
    unknown = set(container) - _CONTAINER_FIELDS
    if unknown:
        raise Unsupported(f"container fields {sorted(unknown)}")
    context = security_context(pod, container)
    options = _security_options(context)
    options += _namespace_options(pod, network_namespace)
    options += mounts(pod, container, host_path, scratch)
    env = environment(container, downward)
    for name, value in env.items():
        options += ["--env", f"{name}={value}"]
    if "workingDir" in container:
        options += ["--cwd", container["workingDir"]]
    limits = container.get("resources", {}).get("limits", {})
    unknown = set(limits) - {"memory", "cpu"}
    if unknown:
        raise Unsupported(f"resource limits {sorted(unknown)}")
    if "cpu" in limits:
        period = 100_000
        quota = _millicores(limits["cpu"]) * period // 1000
        options += ["--cpu-period", str(period), "--cpu-quota", str(quota)]
    requests = {**limits, **container.get("resources", {}).get("requests", {})}
    if "cpu" in requests:  # the kubelet's shares: 1024 per CPU, at least 2
        options += ["--cpu-shares", str(max(2, _millicores(requests["cpu"]) * 1024 // 1000))]
    ports = {p.get("name", str(p["containerPort"])): p["containerPort"] for p in
             container.get("ports", [])}  # fmt: skip
    return CtrRun(
        options=options,
        argv=_argv(container, entrypoint, cmd, env),
        env=env,
        memory_limit=quantity(limits["memory"]) if "memory" in limits else 0,
        qos=_qos(limits, requests),
        capabilities=capabilities(context),
        no_new_privs=context.get("allowPrivilegeEscalation") is False,
        seccomp=_seccomp(pod, context),
        privileged=bool(context.get("privileged")),
        ports=ports,
        probes=_probes(container, ports),
        termination_grace_seconds=float(pod.get("terminationGracePeriodSeconds", 30)),
    )


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


def _security_options(context: Obj) -> list[str]:
    uid, gid = context.get("runAsUser"), context.get("runAsGroup")
    if context.get("runAsNonRoot") and not uid:
        raise PodStartError("runAsNonRoot with uid 0 (or no runAsUser): the kubelet refuses")
    if uid not in (None, 0) or gid not in (None, 0):
        # ctr run has no --user: the image's user (root) is all it can run as.
        raise Unsupported(f"runAsUser {uid} / runAsGroup {gid}: only 0 is expressible")
    options: list[str] = []
    if context.get("privileged"):
        if context.get("allowPrivilegeEscalation") is False:
            raise PodStartError("privileged with allowPrivilegeEscalation false")
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


def _seccomp(pod: Obj, context: Obj) -> bool:
    profile = context.get("seccompProfile") or pod.get("securityContext", {}).get(
        "seccompProfile", {"type": "Unconfined"}
    )
    if profile["type"] not in ("RuntimeDefault", "Unconfined"):
        raise Unsupported(f"seccompProfile {profile}")
    # containerd's CRI applies no seccomp profile to privileged containers.
    return profile["type"] == "RuntimeDefault" and not context.get("privileged")


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
    return [_expand(a, env) for a in argv]


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
