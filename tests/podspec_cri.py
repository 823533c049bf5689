"""A rendered pod spec, translated to what the kubelet sends containerd's CRI plugin: a
``PodSandboxConfig`` and a ``ContainerConfig`` (``tests/cri_api``), from the same reading of
the manifest as the ``ctr run`` translator (:func:`podspec.read_pod`).

What the kubelet adds of its own is here too: the sandbox's metadata and ``io.kubernetes.*``
labels, the pod's cgroup parent for its QoS class (cgroupfs driver), the service-account
volume (``token``, ``ca.crt``, ``namespace``, read-only at
``/var/run/secrets/kubernetes.io/serviceaccount``; the test makes the directory),
``KUBERNETES_SERVICE_HOST``/``_PORT`` and the rest of the ``kubernetes`` Service's variables,
``/dev/termination-log``, the DNS config of ``ClusterFirstWithHostNet``, ``oom_score_adj``
(``system-node-critical`` pods get -997) and the tmpfs of a ``medium: Memory`` emptyDir,
mounted on the node before the container starts (:attr:`CriPodSpec.tmpfs`).

Not modelled: the pod cgroup's own limits (the kubelet writes them; containerd does not),
probes (the test probes, see :attr:`CriPodSpec.probes`) and image pulls (the test imports the
image). Anything else in the manifest raises :class:`podspec.Unsupported` naming the field;
what the kubelet refuses raises :class:`podspec.PodStartError`.

Import as ``import podspec_cri``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import podspec
import realcontainerd
from cri_api import api_pb2 as cri
from podspec import Obj, PodRead, Unsupported

SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
TERMINATION_LOG = "/dev/termination-log"
#: pkg/kubelet/qos/policy.go
GUARANTEED_OOM_SCORE_ADJ, BESTEFFORT_OOM_SCORE_ADJ = -997, 1000
_PROPAGATION = {
    None: cri.PROPAGATION_PRIVATE,
    "None": cri.PROPAGATION_PRIVATE,
    "HostToContainer": cri.PROPAGATION_HOST_TO_CONTAINER,
    "Bidirectional": cri.PROPAGATION_BIDIRECTIONAL,
}
_SECCOMP = {
    "RuntimeDefault": cri.SecurityProfile.RuntimeDefault,
    "Unconfined": cri.SecurityProfile.Unconfined,
}
#: pod fields only this translator models (the service-account volume is its work)
_POD_FIELDS = frozenset({"automountServiceAccountToken"})


@dataclass(frozen=True)
class PodPlacement:
    """Who the pod is and where the kubelet puts it on the node."""

    name: str
    namespace: str
    uid: str
    node_name: str
    node_ip: str
    cgroup_prefix: str  # the throwaway top cgroup kubepods/ sits under
    pod_dir: Path  # the kubelet's /var/lib/kubelet/pods/<uid> (emptyDirs, termination log)
    log_directory: Path  # /var/log/pods/<ns>_<name>_<uid>
    memory_capacity: int  # the node's memory, for a Burstable pod's oom_score_adj
    labels: Mapping[str, str] = field(default_factory=dict)  # the pod's own (its template's)


@dataclass(frozen=True)
class ClusterView:
    """What the kubelet knows of the cluster: the API server's Service endpoint (kubelet
    injects it as ``KUBERNETES_SERVICE_*``), the service account's projected files and
    the cluster DNS."""

    api_host: str
    api_port: int
    service_account_dir: Path
    cluster_dns: tuple[str, ...]
    cluster_domain: str = "cluster.local"


@dataclass
class CriPodSpec:
    sandbox: cri.PodSandboxConfig
    container: cri.ContainerConfig
    read: PodRead
    env: dict[str, str]
    tmpfs: dict[Path, int | None] = field(default_factory=dict)
    """Directories the kubelet mounts a tmpfs on (with its size) before the container starts."""

    @property
    def ports(self) -> dict[str, int]:
        return self.read.ports

    @property
    def probes(self) -> dict[str, podspec.HttpProbe]:
        return self.read.probes


def translate(
    pod: Obj,
    *,
    image: str,
    placement: PodPlacement,
    cluster: ClusterView,
    host_path: Callable[[str], Path],
) -> CriPodSpec:
    """The pod's sandbox and its only container, as the kubelet would ask for them.
    ``host_path`` maps a manifest hostPath to the path used here (type-checked, created
    where the type says, as the kubelet does)."""
    read = podspec.read_pod(pod, _POD_FIELDS)
    podspec.check_refused(read.context)
    container = read.container
    env = {**service_environment(cluster), **podspec.environment(container,
           downward_fields(pod, placement))}  # fmt: skip
    tmpfs: dict[Path, int | None] = {}
    mounts = _volume_mounts(read, placement, host_path, tmpfs)
    mounts += _kubelet_mounts(pod, placement, cluster)
    config = cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=container["name"], attempt=0),
        image=cri.ImageSpec(image=image),
        command=[podspec.expand(a, env) for a in container.get("command", [])],
        args=[podspec.expand(a, env) for a in container.get("args", [])],
        working_dir=container.get("workingDir", ""),
        envs=[cri.KeyValue(key=k, value=v) for k, v in env.items()],
        mounts=mounts,
        labels={**_identity_labels(placement), realcontainerd.CONTAINER_NAME: container["name"]},
        log_path=f"{container['name']}/0.log",
        linux=cri.LinuxContainerConfig(
            resources=_resources(read, placement),
            security_context=_container_security(read),
        ),
    )
    return CriPodSpec(_sandbox(read, placement, cluster), config, read, env, tmpfs)


def downward_fields(pod: Obj, placement: PodPlacement) -> dict[str, str]:
    """The ``fieldRef`` paths a hostNetwork pod can read, with their values."""
    return {
        "spec.nodeName": placement.node_name,
        "spec.serviceAccountName": pod.get("serviceAccountName", "default"),
        "metadata.name": placement.name,
        "metadata.namespace": placement.namespace,
        "metadata.uid": placement.uid,
        "status.podIP": placement.node_ip,
        "status.hostIP": placement.node_ip,
    }


def service_environment(cluster: ClusterView) -> dict[str, str]:
    """The ``kubernetes`` Service's variables the kubelet gives every container."""
    host, port = cluster.api_host, cluster.api_port
    prefix = f"KUBERNETES_PORT_{port}_TCP"
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": str(port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
        prefix: f"tcp://{host}:{port}",
        f"{prefix}_PROTO": "tcp",
        f"{prefix}_PORT": str(port),
        f"{prefix}_ADDR": host,
    }


def oom_score_adj(read: PodRead, memory_capacity: int) -> int:
    """The kubelet's ``GetContainerOOMScoreAdjust``: node-critical pods and Guaranteed
    ones -997, BestEffort 1000, Burstable by its memory request (3..999)."""
    if read.pod.get("priorityClassName") == "system-node-critical" or read.qos == "guaranteed":
        return GUARANTEED_OOM_SCORE_ADJ
    if read.qos == "besteffort":
        return BESTEFFORT_OOM_SCORE_ADJ
    requests = {**read.container.get("resources", {}).get("limits", {}),
                **read.container.get("resources", {}).get("requests", {})}  # fmt: skip
    request = podspec.quantity(requests["memory"]) if "memory" in requests else 0
    score = 1000 - 1000 * request // memory_capacity
    score = max(score, 1000 + GUARANTEED_OOM_SCORE_ADJ)
    return score - 1 if score == BESTEFFORT_OOM_SCORE_ADJ else score


def _identity_labels(placement: PodPlacement) -> dict[str, str]:
    return {realcontainerd.POD_NAME: placement.name,
            realcontainerd.POD_NAMESPACE: placement.namespace,
            realcontainerd.POD_UID: placement.uid}  # fmt: skip


def _namespaces(pod: Obj) -> cri.NamespaceOption:
    if not pod.get("hostNetwork"):
        raise Unsupported("hostNetwork: a pod network (only hostNetwork: true is modelled)")
    return cri.NamespaceOption(
        network=cri.NODE,
        pid=cri.NODE if pod.get("hostPID") else cri.CONTAINER,
        ipc=cri.NODE if pod.get("hostIPC") else cri.POD,
    )


def _sandbox(read: PodRead, placement: PodPlacement, cluster: ClusterView) -> cri.PodSandboxConfig:
    pod = read.pod
    pod_context = pod.get("securityContext", {})
    context = cri.LinuxSandboxSecurityContext(
        namespace_options=_namespaces(pod),
        privileged=bool(read.context.get("privileged")),
    )
    if "runAsUser" in pod_context:
        context.run_as_user.value = pod_context["runAsUser"]
    if "runAsGroup" in pod_context:
        context.run_as_group.value = pod_context["runAsGroup"]
    # the sandbox's own profile is the pod's (none: Unconfined), never a container's
    context.seccomp.profile_type = _SECCOMP[podspec.seccomp_type(pod, {})]
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(
            name=placement.name, uid=placement.uid, namespace=placement.namespace, attempt=0
        ),
        # no hostname: kubelet sets none for hostNetwork pods (the node's UTS namespace)
        log_directory=str(placement.log_directory),
        dns_config=_dns_config(pod, placement, cluster),
        labels={**placement.labels, **_identity_labels(placement)},
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent=realcontainerd.pod_cgroup_parent(
                placement.cgroup_prefix, placement.uid, read.qos
            ),
            security_context=context,
        ),
    )


def _dns_config(pod: Obj, placement: PodPlacement, cluster: ClusterView) -> cri.DNSConfig | None:
    """``ClusterFirstWithHostNet``: the cluster DNS with the pod's search path; ``Default``
    (and ``ClusterFirst`` on the host network): none, the runtime gives the node's file."""
    policy = pod.get("dnsPolicy", "ClusterFirst")
    if policy == "Default" or (policy == "ClusterFirst" and pod.get("hostNetwork")):
        return None
    if policy not in ("ClusterFirst", "ClusterFirstWithHostNet"):
        raise Unsupported(f"dnsPolicy {policy}")
    domain = cluster.cluster_domain
    return cri.DNSConfig(
        servers=list(cluster.cluster_dns),
        searches=[f"{placement.namespace}.svc.{domain}", f"svc.{domain}", domain],
        options=["ndots:5"],
    )


def _container_security(read: PodRead) -> cri.LinuxContainerSecurityContext:
    context = read.context
    caps = context.get("capabilities", {})
    unknown = set(caps) - {"add", "drop"}
    if unknown:
        raise Unsupported(f"securityContext.capabilities {sorted(unknown)}")
    security = cri.LinuxContainerSecurityContext(
        capabilities=cri.Capability(
            add_capabilities=list(caps.get("add", [])),
            drop_capabilities=list(caps.get("drop", [])),
        ),
        privileged=bool(context.get("privileged")),
        namespace_options=_namespaces(read.pod),
        readonly_rootfs=bool(context.get("readOnlyRootFilesystem")),
        no_new_privs=read.no_new_privs and not context.get("privileged"),
        seccomp=cri.SecurityProfile(profile_type=_SECCOMP[podspec.seccomp_type(read.pod, context)]),
    )
    if "runAsUser" in context:
        security.run_as_user.value = context["runAsUser"]
    if "runAsGroup" in context:
        security.run_as_group.value = context["runAsGroup"]
    return security


def _resources(read: PodRead, placement: PodPlacement) -> cri.LinuxContainerResources:
    resources = cri.LinuxContainerResources(
        memory_limit_in_bytes=read.memory_limit,
        cpu_shares=read.cpu_shares or 2,  # the kubelet's minimum when nothing is requested
        oom_score_adj=oom_score_adj(read, placement.memory_capacity),
    )
    if read.cpu_quota:
        resources.cpu_period, resources.cpu_quota = podspec.CPU_PERIOD, read.cpu_quota
    return resources


def _volume_mounts(
    read: PodRead,
    placement: PodPlacement,
    host_path: Callable[[str], Path],
    tmpfs: dict[Path, int | None],
) -> list[cri.Mount]:
    """hostPath volumes (type-checked) and emptyDirs (a directory in the pod's directory,
    on a tmpfs the kubelet mounts for ``medium: Memory``: added to ``tmpfs``)."""
    mounts: list[cri.Mount] = []
    for mount, volume in podspec.volume_mounts(read.pod, read.container):
        if "hostPath" in volume:
            source = podspec.host_path_source(volume, host_path)
        else:
            source = placement.pod_dir / "volumes/kubernetes.io~empty-dir" / volume["name"]
            source.mkdir(mode=0o777, parents=True, exist_ok=True)
            in_memory, limit = podspec.memory_medium(volume)
            if in_memory:
                tmpfs[source] = limit
        mounts.append(
            cri.Mount(
                container_path=mount["mountPath"],
                host_path=str(source),
                readonly=bool(mount.get("readOnly")),
                propagation=_PROPAGATION[mount.get("mountPropagation")],
            )
        )
    return mounts


def _kubelet_mounts(pod: Obj, placement: PodPlacement, cluster: ClusterView) -> list[cri.Mount]:
    """The service-account volume (unless ``automountServiceAccountToken: false``) and the
    termination-message file."""
    termination = placement.pod_dir / "containers" / pod["containers"][0]["name"] / "term"
    termination.parent.mkdir(parents=True, exist_ok=True)
    termination.touch(mode=0o666)
    mounts = [cri.Mount(container_path=TERMINATION_LOG, host_path=str(termination))]
    if pod.get("automountServiceAccountToken", True):
        missing = [n for n in ("token", "ca.crt", "namespace")
                   if not (cluster.service_account_dir / n).is_file()]  # fmt: skip
        if missing:
            raise podspec.PodStartError(f"service-account volume lacks {missing}")
        mounts.append(
            cri.Mount(
                container_path=SERVICE_ACCOUNT_PATH,
                host_path=str(cluster.service_account_dir),
                readonly=True,
            )
        )
    return mounts
