"""A kubelet-shaped node for tests: containerd WITH its CRI plugin, and a small CRI client
that makes pod sandboxes and containers the way kubelet does.

containerd (:class:`CriContainerd`, a :class:`realcontainerd.Containerd` with the CRI
plugin on) runs on a private socket and root, inside a network namespace the fixture makes
(``ip netns add nodediag-cri-<hex>``; containerd is started with ``nsenter --net``, which,
unlike ``ip netns exec``, leaves /sys and its cgroup mounts alone). Pods use the node's
network (``NamespaceMode.NODE``), i.e. that namespace: no CNI is needed and nothing reaches
the machine's own network. The sandbox ("pause") image is made locally from
``busybox-static``, like the workload image.

:class:`CriClient` speaks ``runtime.v1.RuntimeService`` over gRPC with our own subset of
the CRI's ``api.proto`` (``tests/cri_api``). :meth:`CriClient.run_pod` lays a pod out as
kubelet's cgroupfs driver does: ``cgroup_parent`` ``<prefix>/kubepods[/<qos>]/pod<uid>``
(Guaranteed pods directly under ``kubepods``), the ``io.kubernetes.*`` labels kubelet
puts on sandboxes and containers, host network, a PID namespace per container, and
kubelet's ``oom_score_adj`` per QoS class. ``<prefix>`` is a throwaway
``/nodediag-test-<hex>`` cgroup, removed with the containerd.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import realcontainerd
import realkernel
from cri_api import api_pb2 as cri
from google.protobuf.message import Message
from realcontainerd import MiB, Qos

PAUSE_REF = "docker.io/library/nodediag-pause:test"
PAUSE_CMD = ("sleep", "2147483647")
SERVICE = "/runtime.v1.RuntimeService/"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
#: kubelet's oom_score_adj per QoS class (pkg/kubelet/qos/policy.go; Burstable varies with
#: the memory request, between 2 and 999)
OOM_SCORE_ADJ = {"guaranteed": -997, "burstable": 900, "besteffort": 1000}

Reply = TypeVar("Reply", bound=Message)


def missing_binaries() -> list[str]:
    import shutil

    return [*realcontainerd.missing_binaries(),
            *(name for name in ("ip", "nsenter") if shutil.which(name) is None)]  # fmt: skip


class CriContainerd(realcontainerd.Containerd):
    """containerd with its CRI plugin, started in its own network namespace (or in
    ``netns``, a test namespace the caller made and removes)."""

    disabled_plugins = tuple(p for p in realcontainerd.Containerd.disabled_plugins
                             if p != CRI_PLUGIN)  # fmt: skip

    def __init__(self, *, netns: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owns_netns = netns is None
        self.netns = netns or f"nodediag-cri-{secrets.token_hex(4)}"
        self.cgroup_prefix = f"nodediag-test-{secrets.token_hex(4)}"
        self.cgroup_prefixes.add(self.cgroup_prefix)
        self.pause_image = ""

    def command(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", *super().command()]

    def _config_text(self) -> str:
        cri_plugin = f'[plugins."{CRI_PLUGIN}"]'
        return (
            super()._config_text()
            + f"""
{cri_plugin}
  sandbox_image = {json.dumps(PAUSE_REF)}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  restrict_oom_score_adj = true  # not below containerd's own: without CAP_SYS_RESOURCE
  enable_selinux = false
  [plugins."{CRI_PLUGIN}".containerd]
    snapshotter = {json.dumps(self.snapshotter)}
    default_runtime_name = "runc"
    [plugins."{CRI_PLUGIN}".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."{CRI_PLUGIN}".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."{CRI_PLUGIN}".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {json.dumps(str(self.base / "cni"))}
"""
        )

    def __enter__(self) -> CriContainerd:
        if self.owns_netns:
            subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
            subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        try:
            super().__enter__()
            self._import_images()
        except BaseException:
            self._delete_netns()
            raise
        return self

    def _import_images(self) -> None:
        realcontainerd.import_busybox_image(self)
        tarball = realcontainerd.build_busybox_oci_tarball(
            self.base / "pause-oci.tar", PAUSE_REF, PAUSE_CMD
        )
        self.ctr("images", "import", "--snapshotter", self.snapshotter, str(tarball))
        self.pause_image = PAUSE_REF

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            self._delete_netns()

    def _delete_netns(self) -> None:
        if self.owns_netns:
            subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True)


# -- the CRI client ------------------------------------------------------------------------


class CriClient:
    """``runtime.v1.RuntimeService`` on ``socket``: what kubelet calls to run pods."""

    def __init__(self, cd: CriContainerd, timeout: float = 60) -> None:
        self.cd = cd
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{cd.socket}")

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request: Message, reply: type[Reply]) -> Reply:
        stub: grpc.UnaryUnaryMultiCallable[Message, Reply] = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        answer: Reply = stub(request, timeout=self.timeout)
        return answer

    def version(self) -> cri.VersionResponse:
        return self.call("Version", cri.VersionRequest(version="v1"), cri.VersionResponse)

    def run_pod(
        self, name: str, namespace: str = "default", qos: Qos = "burstable",
        uid: str | None = None,
    ) -> CriPod:  # fmt: skip
        """RunPodSandbox as kubelet makes it (see the module docstring)."""
        uid = uid or str(uuid.uuid4())
        parent = realcontainerd.pod_cgroup_parent(self.cd.cgroup_prefix, uid, qos)
        logs = self.cd.base / "pods" / f"{namespace}_{name}_{uid}"
        logs.mkdir(parents=True, exist_ok=True)
        config = cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace=namespace),
            log_directory=str(logs),
            labels=pod_labels(name, namespace, uid),
            linux=cri.LinuxPodSandboxConfig(
                cgroup_parent=parent,
                security_context=cri.LinuxSandboxSecurityContext(namespace_options=_namespaces()),
            ),
        )
        return self.run_sandbox(config, qos)

    def run_sandbox(self, config: cri.PodSandboxConfig, qos: Qos) -> CriPod:
        """RunPodSandbox with a ready-made ``config`` (e.g. from :mod:`podspec_cri`)."""
        answer = self.call(
            "RunPodSandbox", cri.RunPodSandboxRequest(config=config), cri.RunPodSandboxResponse
        )
        return CriPod(self, answer.pod_sandbox_id, config, qos)

    def container_status(self, container_id: str) -> cri.ContainerStatusResponse:
        request = cri.ContainerStatusRequest(container_id=container_id, verbose=True)
        return self.call("ContainerStatus", request, cri.ContainerStatusResponse)


def pod_labels(name: str, namespace: str, uid: str) -> dict[str, str]:
    return {realcontainerd.POD_NAME: name, realcontainerd.POD_NAMESPACE: namespace,
            realcontainerd.POD_UID: uid}  # fmt: skip


def _namespaces() -> cri.NamespaceOption:
    # hostNetwork: true; kubelet gives each container its own PID namespace
    return cri.NamespaceOption(network=cri.NODE, pid=cri.CONTAINER, ipc=cri.POD)


@dataclass
class CriPod:
    client: CriClient = field(repr=False)
    sandbox_id: str
    config: cri.PodSandboxConfig = field(repr=False)
    qos: Qos

    @property
    def name(self) -> str:
        return str(self.config.metadata.name)

    @property
    def namespace(self) -> str:
        return str(self.config.metadata.namespace)

    @property
    def uid(self) -> str:
        return str(self.config.metadata.uid)

    @property
    def cgroup_parent(self) -> str:
        return str(self.config.linux.cgroup_parent)

    def create_container(
        self,
        name: str,
        args: Sequence[str] = realcontainerd.DEFAULT_ARGS,
        *,
        memory_limit: int = 32 * MiB,
        attempt: int = 0,
        start: bool = True,
    ) -> CriContainer:
        """CreateContainer (+ StartContainer) as kubelet does: labels, log path, limits."""
        labels = {**pod_labels(self.name, self.namespace, self.uid),
                  realcontainerd.CONTAINER_NAME: name}  # fmt: skip
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=attempt),
            image=cri.ImageSpec(image=realcontainerd.IMAGE_REF),
            command=list(args),
            labels=labels,
            log_path=f"{name}/{attempt}.log",
            linux=cri.LinuxContainerConfig(
                resources=cri.LinuxContainerResources(
                    memory_limit_in_bytes=memory_limit, oom_score_adj=OOM_SCORE_ADJ[self.qos]
                ),
                security_context=cri.LinuxContainerSecurityContext(namespace_options=_namespaces()),
            ),
        )
        return self.create(config, start=start)

    def create(self, config: cri.ContainerConfig, *, start: bool = True) -> CriContainer:
        """CreateContainer (+ StartContainer) with a ready-made ``config``."""
        request = cri.CreateContainerRequest(
            pod_sandbox_id=self.sandbox_id, config=config, sandbox_config=self.config
        )
        created = self.client.call("CreateContainer", request, cri.CreateContainerResponse)
        container = CriContainer(
            self, created.container_id, config.metadata.name, config.metadata.attempt,
            config.linux.resources.memory_limit_in_bytes,
        )  # fmt: skip
        if start:
            container.start()
        return container

    def stop(self) -> None:
        request = cri.StopPodSandboxRequest(pod_sandbox_id=self.sandbox_id)
        self.client.call("StopPodSandbox", request, cri.StopPodSandboxResponse)

    def remove(self) -> None:
        """StopPodSandbox then RemovePodSandbox, as kubelet does when a pod is deleted."""
        self.stop()
        request = cri.RemovePodSandboxRequest(pod_sandbox_id=self.sandbox_id)
        self.client.call("RemovePodSandbox", request, cri.RemovePodSandboxResponse)

    def limit_pod_memory(self, limit: int) -> None:
        """A memory limit on the pod's own cgroup (kubelet sets one from the pod's limits):
        a kill there has ``oom_memcg`` = the pod, ``task_memcg`` = the container."""
        directory = realcontainerd.memory_cgroup_dir(self.cgroup_parent)
        name = "memory.limit_in_bytes" if (directory / "memory.limit_in_bytes").exists() \
            else "memory.max"  # fmt: skip
        (directory / name).write_text(str(limit))


@dataclass
class CriContainer:
    pod: CriPod = field(repr=False)
    id: str
    name: str
    attempt: int
    memory_limit: int

    def start(self) -> None:
        request = cri.StartContainerRequest(container_id=self.id)
        self.pod.client.call("StartContainer", request, cri.StartContainerResponse)

    def status(self) -> cri.ContainerStatus:
        return self.pod.client.container_status(self.id).status

    def stop(self, timeout: int) -> None:
        """StopContainer: SIGTERM, SIGKILL after ``timeout`` seconds (kubelet passes the
        pod's grace period)."""
        request = cri.StopContainerRequest(container_id=self.id, timeout=timeout)
        self.pod.client.call("StopContainer", request, cri.StopContainerResponse)

    @property
    def init_pid(self) -> int:
        info = json.loads(self.pod.client.container_status(self.id).info["info"])
        return int(info["pid"])

    @property
    def cgroup_path(self) -> str:
        return f"{self.pod.cgroup_parent}/{self.id}"

    def oom_kill_count(self) -> int:
        return realcontainerd.oom_kill_count(self.cgroup_path)

    def go(self, timeout: float = 30) -> int:
        """Touch ``/tmp/go`` in the container (its processes wait for it, see
        :func:`child_hog_args` / :func:`realcontainerd.oom_init_args`) and wait until the
        kernel counted an OOM kill in its cgroup, or (a kill in the pod's cgroup) in the
        pod's; returns the victim-side counter. Paced like every test OOM kill."""
        pod_cgroup = self.pod.cgroup_parent
        with realkernel.oom_ratelimit_slot():
            before = self.oom_kill_count(), realcontainerd.oom_kill_count(pod_cgroup)
            Path(f"/proc/{self.init_pid}/root/tmp/go").touch()
            deadline = time.monotonic() + timeout
            while True:
                now = self.oom_kill_count(), realcontainerd.oom_kill_count(pod_cgroup)
                if now[0] > before[0] or now[1] > before[1]:
                    return now[0]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no OOM kill in {self.cgroup_path} after {timeout}s")
                time.sleep(0.01)

    def wait_state(self, state: int, timeout: float = 20) -> cri.ContainerStatus:
        deadline = time.monotonic() + timeout
        while (status := self.status()).state != state:
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {self.name} is {status.state}, not {state}")
            time.sleep(0.02)
        return status


def child_hog_args(memory_limit: int, factor: int = 4) -> list[str]:
    """A container whose init (``sh``) waits for ``/tmp/go``, runs a memory hog as a child
    (the kernel kills it), and lives on."""
    return [
        "sh", "-c",
        "while [ ! -e /tmp/go ]; do sleep 0.01; done; "
        f"dd if=/dev/zero of=/dev/null bs={factor * memory_limit} count=1; "
        "exec sleep 3600",
    ]  # fmt: skip


@contextlib.contextmanager
def kubelet_node() -> Iterator[tuple[CriContainerd, CriClient]]:
    """A started CRI containerd (images imported) and a client; all removed afterwards."""
    with CriContainerd() as cd:
        client = CriClient(cd)
        try:
            client.version()
            yield cd, client
        finally:
            client.close()
