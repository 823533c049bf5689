"""The agent's own pod on a kubelet-shaped node: the rendered DaemonSet translated to the
``PodSandboxConfig`` + ``ContainerConfig`` the kubelet would send (:mod:`podspec_cri`), run
by containerd's CRI plugin from the image as shipped, in the node lab of :mod:`imagelab`
(hostNetwork: the node's test namespace; hostPID: this machine's).

The API stand-in serves HTTPS on the other side of the node's link (the peer namespace,
port 443, a test CA), knows only the service account's projected token and authorizes
each request against the RBAC rendered from ``daemonset/``. The agent finds it as a pod
does: ``KUBERNETES_SERVICE_HOST``/``_PORT`` and the service-account volume. Workload pods
are made through the same CRI; their OOM kills must come back as Events whose verdict is
what the CRI's ContainerStatus says and whose names are the sandbox's, readable with
Debian's kubectl from the peer namespace.
"""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagelab
import kube_standin as ks
import podspec
import podspec_cri
import psutil
import pytest
import realcontainerd
import realcri
import realkernel
import realkubectl
from cri_api import api_pb2 as cri
from standin_auth import ADMIN, Rbac, service_account_user
from standin_tls import TlsFiles, make_tls
from test_deploy import pod_spec, rendered, the
from test_events import pod_object
from test_incluster import rotate_token, service_account_dir
from test_kubelet_node import cri_verdict, kill_child, kill_init

API_PORT = 443
ADMIN_TOKEN = f"admin-{secrets.token_hex(8)}"
FIRST_TOKEN, SECOND_TOKEN = (f"sa-{secrets.token_hex(16)}" for _ in range(2))
LIMIT = 32 * realcontainerd.MiB
POD_CIDR = "10.42.7.0/24"  # the Node object's spec.podCIDRs: the node itself shows none


def daemonset_identity() -> tuple[str, str]:
    """(namespace, service account) of the shipped DaemonSet's pods."""
    daemonset = the(rendered("base"), "DaemonSet")
    return daemonset["metadata"]["namespace"], pod_spec(rendered("base"))["serviceAccountName"]


# ----------------------------------------------------------------------------- the translator


def _placement(tmp_path: Path) -> podspec_cri.PodPlacement:
    return podspec_cri.PodPlacement(
        name="nodediag-x1", namespace="nodediag", uid="uid-1", node_name="worker-1",
        node_ip="10.0.0.5", cgroup_prefix="nodediag-test-x", pod_dir=tmp_path / "pod",
        log_directory=tmp_path / "logs", memory_capacity=8 << 30,
    )  # fmt: skip


def _cluster(tmp_path: Path) -> podspec_cri.ClusterView:
    account = tmp_path / "account"
    account.mkdir(exist_ok=True)
    for name in ("token", "ca.crt", "namespace"):
        (account / name).write_text("x")
    return podspec_cri.ClusterView("10.96.0.1", 443, account, ("10.43.0.10",))


def _translate(tmp_path: Path, spec: dict[str, Any] | None = None) -> podspec_cri.CriPodSpec:
    def host_path(path: str) -> Path:
        made = tmp_path / "host" / path.lstrip("/")
        if path in ("/proc", "/sys/fs/cgroup", "/var/log"):
            made.mkdir(parents=True, exist_ok=True)
        elif path in ("/etc/machine-id", "/etc/resolv.conf"):
            made.parent.mkdir(parents=True, exist_ok=True)
            made.touch()
        return made

    return podspec_cri.translate(
        spec or pod_spec(rendered("base")), image="localhost/nodediag:test",
        placement=_placement(tmp_path), cluster=_cluster(tmp_path), host_path=host_path,
    )  # fmt: skip


def test_the_rendered_daemonset_as_the_kubelet_asks_for_it(tmp_path: Path) -> None:
    spec = _translate(tmp_path)
    sandbox, container = spec.sandbox, spec.container
    assert (sandbox.metadata.name, sandbox.metadata.namespace) == ("nodediag-x1", "nodediag")
    assert sandbox.linux.security_context.seccomp.profile_type == cri.SecurityProfile.Unconfined
    assert sandbox.linux.cgroup_parent == "/nodediag-test-x/kubepods/burstable/poduid-1"
    hosts = sandbox.linux.security_context.namespace_options
    assert (hosts.network, hosts.pid) == (cri.NODE, cri.NODE)
    assert list(sandbox.dns_config.servers) == ["10.43.0.10"]  # ClusterFirstWithHostNet
    security = container.linux.security_context
    assert list(security.capabilities.drop_capabilities) == ["ALL"]
    assert list(security.capabilities.add_capabilities) == ["NET_ADMIN", "NET_RAW"]
    assert security.no_new_privs and security.readonly_rootfs
    assert security.seccomp.profile_type == cri.SecurityProfile.RuntimeDefault
    assert security.HasField("run_as_user") and security.run_as_user.value == 0
    resources = container.linux.resources
    assert (resources.memory_limit_in_bytes, resources.cpu_shares) == (128 << 20, 10)
    assert resources.oom_score_adj == -997  # system-node-critical
    assert list(container.args) == ["run"] and not container.command
    assert spec.env["NODE_NAME"] == "worker-1"
    assert spec.env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert spec.env["KUBERNETES_SERVICE_PORT"] == "443"
    mounts = {m.container_path: m for m in container.mounts}
    account = mounts[podspec_cri.SERVICE_ACCOUNT_PATH]
    assert account.readonly and account.host_path == str(tmp_path / "account")
    assert mounts["/host/proc"].readonly and not mounts["/var/lib/nodediag"].readonly
    assert {m.propagation for m in container.mounts} == {cri.PROPAGATION_PRIVATE}
    [(tmp, size)] = spec.tmpfs.items()
    assert mounts["/tmp"].host_path == str(tmp) and size == 16 << 20
    assert (tmp_path / "host/var/lib/nodediag").is_dir()  # DirectoryOrCreate


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda s: s.update(shareProcessNamespace=True), "shareProcessNamespace"),
        (lambda s: s["containers"][0].update(stdin=True), "stdin"),
        (lambda s: s["volumes"].append({"name": "cm", "configMap": {"name": "x"}}), None),
        (lambda s: s["containers"][0]["volumeMounts"].append({"name": "cm", "mountPath": "/c",
                                                              "subPath": "a"}), "subPath"),
        (lambda s: s["containers"][0]["securityContext"].update(
            seccompProfile={"type": "Localhost", "localhostProfile": "p"}), "Localhost"),
        (lambda s: s.update(dnsPolicy="None"), "dnsPolicy"),
        (lambda s: s.update(securityContext={"fsGroup": 2000}), "fsGroup"),
        (lambda s: s.update(hostNetwork=False), "hostNetwork"),
    ],
)  # fmt: skip
def test_what_it_does_not_know_is_refused_by_name(
    tmp_path: Path, change: Any, named: str | None
) -> None:
    spec = copy.deepcopy(pod_spec(rendered("base")))
    change(spec)
    if named is None:  # a volume no container mounts is still an unknown volume kind
        spec["containers"][0]["volumeMounts"].append({"name": "cm", "mountPath": "/c"})
        named = "configMap"
    with pytest.raises(podspec.Unsupported, match=named):
        _translate(tmp_path, spec)


def test_no_service_account_volume_when_automount_is_off(tmp_path: Path) -> None:
    spec = copy.deepcopy(pod_spec(rendered("base")))
    spec["automountServiceAccountToken"] = False
    paths = [m.container_path for m in _translate(tmp_path, spec).container.mounts]
    assert podspec_cri.SERVICE_ACCOUNT_PATH not in paths
    assert podspec_cri.TERMINATION_LOG in paths


def test_mount_propagation(tmp_path: Path) -> None:
    spec = copy.deepcopy(pod_spec(rendered("base")))
    spec["containers"][0]["volumeMounts"][0]["mountPropagation"] = "HostToContainer"
    path = spec["containers"][0]["volumeMounts"][0]["mountPath"]
    [mount] = [m for m in _translate(tmp_path, spec).container.mounts if m.container_path == path]
    assert mount.propagation == cri.PROPAGATION_HOST_TO_CONTAINER


def test_oom_score_adj_by_qos(tmp_path: Path) -> None:
    spec = copy.deepcopy(pod_spec(rendered("base")))
    del spec["priorityClassName"]
    read = podspec.read_pod(spec)
    assert podspec_cri.oom_score_adj(read, 8 << 30) == 1000 - 1000 * (64 << 20) // (8 << 30)
    del spec["containers"][0]["resources"]
    assert podspec_cri.oom_score_adj(podspec.read_pod(spec), 8 << 30) == 1000


# ----------------------------------------------------------------------------- the node


def cri_log_text(raw: str) -> str:
    """A CRI container log (``<time> <stream> <P|F> <text>`` lines) as the text written."""
    parts: list[str] = []
    for line in raw.splitlines():
        fields = line.split(" ", 3)
        if len(fields) >= 3:
            text = fields[3] if len(fields) == 4 else ""
            parts.append(text + "\n" if fields[2] == "F" else text)
    return "".join(parts)


@dataclass
class PodAgent(imagelab.AgentView):
    """The agent's container, made through the CRI."""

    node: imagelab.Node
    spec: podspec_cri.CriPodSpec
    container: realcri.CriContainer
    service_account: Path

    @property
    def log_path(self) -> Path:
        return Path(self.spec.sandbox.log_directory) / self.spec.container.log_path

    def log(self) -> str:
        try:
            return cri_log_text(self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def state(self) -> str:
        return cri.ContainerState.Name(self.container.status().state).removeprefix("CONTAINER_")

    @property
    def ports(self) -> dict[str, int]:
        return self.spec.ports

    @property
    def probes(self) -> dict[str, podspec.HttpProbe]:
        return self.spec.probes


@pytest.fixture(scope="module")
def node(image: imagelab.Image) -> Iterator[imagelab.Node]:
    missing = realcri.missing_binaries()
    if missing:
        realkernel.skip_or_fail(f"not installed: {', '.join(missing)}")
    with imagelab.Node(cri=True) as lab:
        # Cilium's health endpoint veth: a pod link before any pod; no route shows the pod CIDR.
        lab.run(["ip", "link", "add", "lxc_health", "type", "veth", "peer", "name", "health0"])
        realcontainerd.import_oci_archive(lab.containerd, image.archive, image.ref)
        yield lab


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"), host=imagelab.PEER_IP)


@pytest.fixture(scope="module")
def api(node: imagelab.Node, tls: TlsFiles) -> Iterator[ks.KubeStandin]:
    """HTTPS on the peer's address, port 443, bound inside the peer namespace."""
    namespace, account = daemonset_identity()
    users = {FIRST_TOKEN: service_account_user(namespace, account), ADMIN_TOKEN: ADMIN}
    standin = ks.KubeStandin(tls=tls, rbac=Rbac.of(rendered("base")), users=users)
    standin.start(API_PORT, host=imagelab.PEER_IP, netns=node.dns_netns)
    try:
        standin.add_node({"metadata": {"name": node.name},
                          "spec": {"podCIDR": POD_CIDR, "podCIDRs": [POD_CIDR]}})  # fmt: skip
        yield standin
    finally:
        standin.stop()


@contextlib.contextmanager
def kubelet_tmpfs(directories: dict[Path, int | None]) -> Iterator[None]:
    """The tmpfs the kubelet mounts for each ``medium: Memory`` emptyDir."""
    mounted: list[Path] = []
    try:
        for directory, size in directories.items():
            options = "mode=0777" + (f",size={size}" if size else "")
            subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                           check=True, capture_output=True)  # fmt: skip
            mounted.append(directory)
        yield
    finally:
        for directory in reversed(mounted):
            subprocess.run(["umount", "--lazy", str(directory)], check=False)


@pytest.fixture(scope="module")
def client(node: imagelab.Node) -> Iterator[realcri.CriClient]:
    assert isinstance(node.containerd, realcri.CriContainerd)
    made = realcri.CriClient(node.containerd)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def agent(
    node: imagelab.Node,
    image: imagelab.Image,
    api: ks.KubeStandin,
    tls: TlsFiles,
    client: realcri.CriClient,
    journald: realkernel.JournaldHandle,
) -> Iterator[PodAgent]:
    namespace, _ = daemonset_identity()
    uid = str(uuid.uuid4())
    name = f"nodediag-{secrets.token_hex(3)}"
    pod_dir = node.host_path(f"/var/lib/kubelet/pods/{uid}")
    account = service_account_dir(
        pod_dir / "volumes/kubernetes.io~projected/kube-api-access-x1", tls, FIRST_TOKEN
    )
    assert isinstance(node.containerd, realcri.CriContainerd)
    placement = podspec_cri.PodPlacement(
        name=name, namespace=namespace, uid=uid, node_name=node.name, node_ip=imagelab.NODE_IP,
        cgroup_prefix=node.containerd.cgroup_prefix, pod_dir=pod_dir,
        log_directory=node.host_path(f"/var/log/pods/{namespace}_{name}_{uid}"),
        memory_capacity=psutil.virtual_memory().total,
        labels=the(rendered("base"), "DaemonSet")["spec"]["template"]["metadata"]["labels"],
    )  # fmt: skip
    cluster = podspec_cri.ClusterView(imagelab.PEER_IP, API_PORT, account, (imagelab.CLUSTER_DNS,))
    spec = podspec_cri.translate(
        pod_spec(rendered("base")), image=image.ref, placement=placement, cluster=cluster,
        host_path=node.host_path,
    )  # fmt: skip
    Path(spec.sandbox.log_directory).mkdir(parents=True, exist_ok=True)
    with kubelet_tmpfs(spec.tmpfs):
        pod = client.run_sandbox(spec.sandbox, spec.read.qos)
        running: PodAgent | None = None
        try:
            running = PodAgent(node, spec, pod.create(spec.container), account)
            running.wait_ready()
            yield running
        finally:
            if running is not None:  # the agent's own messages, not its findings
                messages = [line for line in running.log().splitlines()
                            if not line.startswith("{")]  # fmt: skip
                print("\n".join(messages)[-5000:])
            pod.remove()


# ----------------------------------------------------------------------------- the agent's pod


def test_the_kernel_confines_the_agent_pod_as_the_manifest_says(
    agent: PodAgent, node: imagelab.Node
) -> None:
    pid = agent.container.init_pid
    status = imagelab.proc_status(pid)
    wanted = podspec.capabilities(agent.spec.read.context)
    assert wanted == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert podspec.cap_names(int(status["CapEff"], 16)) == wanted
    assert podspec.cap_names(int(status["CapBnd"], 16)) == wanted
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
    assert status["Uid"].split()[0] == "0"
    node_network = Path(f"/run/netns/{node.netns}").stat().st_ino
    assert Path(f"/proc/{pid}/ns/net").stat().st_ino == node_network
    assert Path(f"/proc/{pid}/ns/pid").stat().st_ino == Path("/proc/self/ns/pid").stat().st_ino
    mounts = imagelab.mount_options(pid)
    assert "ro" in mounts["/"], "readOnlyRootFilesystem"
    assert "ro" in mounts[resolved(pid, podspec_cri.SERVICE_ACCOUNT_PATH)]
    for mount in agent.spec.read.container["volumeMounts"]:
        assert ("ro" if mount.get("readOnly") else "rw") in mounts[mount["mountPath"]], mount
    root = Path(f"/proc/{pid}/root")
    account = root / resolved(pid, podspec_cri.SERVICE_ACCOUNT_PATH).lstrip("/")
    assert (account / "token").read_text().strip() == FIRST_TOKEN
    assert (account / "namespace").read_text() == agent.spec.sandbox.metadata.namespace
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item
    )  # fmt: skip
    assert environ["KUBERNETES_SERVICE_HOST"] == imagelab.PEER_IP
    assert environ["KUBERNETES_SERVICE_PORT"] == str(API_PORT)
    assert environ["NODE_NAME"] == node.name
    # containerd (restrict_oom_score_adj) raises what kubelet asks to its own score at least
    assert node.containerd.pid is not None
    floor = int(Path(f"/proc/{node.containerd.pid}/oom_score_adj").read_text())
    wanted_adj = max(agent.spec.container.linux.resources.oom_score_adj, floor)
    assert int(Path(f"/proc/{pid}/oom_score_adj").read_text()) == wanted_adj
    cgroup = f"{agent.spec.sandbox.linux.cgroup_parent}/{agent.container.id}"
    assert cgroup in Path(f"/proc/{pid}/cgroup").read_text()
    limit = realcontainerd.memory_cgroup_dir(cgroup)
    limit_file = next(p for p in (limit / "memory.limit_in_bytes", limit / "memory.max")
                      if p.exists())  # fmt: skip
    assert int(limit_file.read_text()) == agent.spec.read.memory_limit


def resolved(pid: int, path: str) -> str:
    """``path`` as the container sees it with its symlinks followed (the image's
    ``/var/run`` is a link to ``/run``: mountinfo names the mount under ``/run``)."""
    parts: list[str] = []
    pending = [p for p in path.split("/") if p]
    while pending:
        parts.append(pending.pop(0))
        on_host = Path(f"/proc/{pid}/root", *parts)
        if on_host.is_symlink():
            target = os.readlink(on_host)
            base = [] if target.startswith("/") else parts[:-1]
            pending = [p for p in target.split("/") if p] + pending
            parts = base
    return "/" + "/".join(parts)


def _agent_requests(api: ks.KubeStandin) -> list[ks.RecordedRequest]:
    return [r for r in api.requests if r.user != ADMIN.name]


def test_the_agent_reaches_the_api_with_its_service_account_only(
    agent: PodAgent, api: ks.KubeStandin
) -> None:
    namespace, account = daemonset_identity()
    assert api.wait_for(
        lambda s: any(r.query.get("watch") and r.status == 200 for r in _agent_requests(s)),
        timeout=30,
    ), agent.log()
    requests = _agent_requests(api)
    assert {r.user for r in requests} == {f"system:serviceaccount:{namespace}:{account}"}
    assert [r for r in requests if r.status in (401, 403)] == []


def _event(api: ks.KubeStandin, pod: realcri.CriPod, reason: str) -> ks.JSON | None:
    return next(
        (e for e in api.events(pod.namespace)
         if e["regarding"].get("uid") == pod.uid and e["reason"] == reason),
        None,
    )  # fmt: skip


def _assert_event_agrees(
    agent: PodAgent, api: ks.KubeStandin, container: realcri.CriContainer,
    status: cri.ContainerStatus,
) -> ks.JSON:  # fmt: skip
    """The finding and the Event agree with the CRI's status and the sandbox's metadata."""
    expected = cri_verdict(status)
    finding = agent.wait_finding(subject__container_id=container.id)
    assert finding["reason"] == expected, finding
    pod = container.pod
    subject = finding["subject"]
    assert (subject["namespace"], subject["name"], subject["uid"], subject["container"]) == (
        pod.namespace, pod.name, pod.uid, status.metadata.name
    )  # fmt: skip
    assert api.wait_for(lambda s: _event(s, pod, expected) is not None, timeout=30), (
        api.events(), agent.log()[-3000:]
    )  # fmt: skip
    event = _event(api, pod, expected)
    assert event is not None
    regarding = event["regarding"]
    assert (regarding["kind"], regarding["namespace"], regarding["name"]) == (
        "Pod", pod.namespace, pod.name
    )  # fmt: skip
    assert container.name in event["note"]
    return event


def _workload(
    client: realcri.CriClient, api: ks.KubeStandin, node: imagelab.Node, name: str,
    args: list[str],
) -> realcri.CriContainer:  # fmt: skip
    pod = client.run_pod(f"{name}-{secrets.token_hex(2)}", "shop")
    container = pod.create_container("app", args, memory_limit=LIMIT)
    listed = pod_object(pod.name, pod.namespace, pod.uid, {"app": container.id})
    listed["spec"]["nodeName"] = node.name
    api.add_pod(listed)
    return container


def test_child_and_init_kills_are_events_the_cri_agrees_with(
    agent: PodAgent, api: ks.KubeStandin, client: realcri.CriClient, node: imagelab.Node,
    tmp_path: Path,
) -> None:  # fmt: skip
    child = _workload(client, api, node, "web", realcri.child_hog_args(LIMIT))
    status = kill_child(child)
    assert status.state == cri.CONTAINER_RUNNING
    _assert_event_agrees(agent, api, child, status)
    init = _workload(client, api, node, "batch", realcontainerd.oom_init_args(LIMIT))
    status = kill_init(init)
    assert (status.reason, status.exit_code) == ("OOMKilled", 137)
    _assert_event_agrees(agent, api, init, status)
    assert [r for r in _agent_requests(api) if r.status in (401, 403)] == []

    kubectl = realkubectl.debian_kubectl()
    if kubectl is None:
        realkernel.skip_or_fail("Debian kubectl not unpacked (scripts/test does it)")
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", token=ADMIN_TOKEN)
    rows = realkubectl.table(
        realkubectl.run(kubectl, kubeconfig, "get", "events", "-A", netns=node.dns_netns)
    )
    shown = {(r["NAMESPACE"], r["REASON"], r["OBJECT"]) for r in rows}
    assert ("shop", "InvisibleOOMKill", f"pod/{child.pod.name}") in shown, rows
    assert ("shop", "ContainerOOMKill", f"pod/{init.pod.name}") in shown, rows
    described = realkubectl.run(kubectl, kubeconfig, "describe", "pod", child.pod.name,
                                "-n", "shop", netns=node.dns_netns)  # fmt: skip
    [row] = realkubectl.events_section(described)
    assert row.split()[:2] == ["Warning", "InvisibleOOMKill"], described
    assert f"in container app of pod shop/{child.pod.name}" in row


def test_the_agent_goes_on_after_kubelet_rotates_the_token(
    agent: PodAgent, api: ks.KubeStandin, client: realcri.CriClient, node: imagelab.Node
) -> None:
    """The token file is replaced as kubelet's AtomicWriter does (``..data`` swapped) and
    the old token revoked at once: the next kill's Event is written with the new one."""
    namespace, account = daemonset_identity()
    api.add_user(SECOND_TOKEN, service_account_user(namespace, account))
    rotate_token(agent.service_account, SECOND_TOKEN)
    api.revoke(FIRST_TOKEN)
    api.clear_requests()
    time.sleep(0.2)
    victim = _workload(client, api, node, "api", realcri.child_hog_args(LIMIT))
    _assert_event_agrees(agent, api, victim, kill_child(victim))
    statuses = [r.status for r in _agent_requests(api)]
    assert 403 not in statuses
    assert statuses.count(401) <= 2, statuses  # at most one per client, then the new token
    assert agent.get("/healthz")[0] == 200
    samples = agent.samples()
    nonzero = [(name, dict(labels)) for (name, labels), value in samples.items() if value]
    assert [s for s in nonzero if s[0] == "nodediag_thread_errors_total"] == []
    dropped = [s for s in nonzero if s[0] == "nodediag_events_total"
               and s[1]["result"] == "dropped"]  # fmt: skip
    assert dropped == []


def test_every_collector_succeeds_in_the_pod(agent: PodAgent) -> None:
    """Under the CRI's confinement too (its seccomp profile, masked /proc paths, the
    container's own /etc/resolv.conf from the pod's DNS config): nothing fails."""
    reported = set(imagelab.PERIODIC) | {"kernel_log"}
    samples = agent.wait_samples(lambda s: reported <= set(imagelab.collector_success(s)))
    assert imagelab.failures(samples) == {}, agent.log()[-3000:]
    for kind in ("livenessProbe", "readinessProbe"):  # as kubelet probes, from the node
        assert agent.get(agent.probes[kind].path)[0] == 200, kind


def test_the_pod_flows_use_the_node_objects_pod_cidr(agent: PodAgent) -> None:
    """The node shows no pod CIDR (no pod bridge, no CNI config): the agent reads its Node
    object's spec.podCIDRs (the shipped ClusterRole grants get on nodes) and evaluates the
    DNS flows from pods."""
    flows = ("pod-dns-udp", "pod-dns-tcp")

    def evaluated(samples: imagelab.Samples) -> bool:
        shown = {dict(labels).get("flow") for name, labels in samples
                 if name == "nodediag_dns_flow_ok"}  # fmt: skip
        return set(flows) <= shown

    samples = agent.wait_samples(evaluated)
    source = (("collector", "firewall"), ("source", "node-pod-cidr"))
    assert samples[("nodediag_collector_source_success", source)] == 1
    log = agent.log()
    assert f"pod CIDR {POD_CIDR} (from the Node object's spec.podCIDRs)" in log
    assert "pod CIDR is unknown" not in log


def test_kubelet_stops_the_agent_within_its_grace_period(agent: PodAgent) -> None:
    """Last here (it ends the module's agent): StopContainer with the pod's grace period,
    as kubelet stops a pod; SIGTERM saves the kernel-log position and exits 0."""
    grace = agent.spec.read.termination_grace_seconds
    t0 = time.monotonic()
    agent.container.stop(int(grace))
    seconds = time.monotonic() - t0
    status = agent.container.status()
    assert (cri.ContainerState.Name(status.state), status.exit_code) == ("CONTAINER_EXITED", 0)
    assert seconds < grace, agent.log()[-2000:]
    state = agent.node.host_path("/var/lib/nodediag")
    assert any(state.iterdir()), "no kernel-log position saved"
