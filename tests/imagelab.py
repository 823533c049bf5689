"""The image as shipped, run as the DaemonSet runs it: the image built by scripts/build-image,
a "node" made of network namespaces the test creates, a containerd whose socket sits where
the node's would (``/run/containerd`` under the node's root), and the agent's container
started by containerd + runc with the options :mod:`podspec` reads from the rendered
``daemonset/`` manifests.

The node: ``netns`` is the node's network (hostNetwork joins it: never this machine's own);
a second namespace ``dns_netns`` behind a veth pair is "the rest of the cluster": it holds
the cluster DNS server (10.43.0.10) and is where Prometheus scrapes from. Host paths the
agent only reads from the machine itself (``/proc``, ``/sys/fs/cgroup``, the journal
directories, ``/etc/machine-id``) are this machine's; every other hostPath (containerd's
socket directory, kubelet and distribution configs, the state dir, the xtables lock) lives
under the node's own root directory ``root``.

Import as ``import imagelab``.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import podspec
import realcontainerd
import realcri
import realkernel
from prometheus_client.parser import text_string_to_metric_families
from test_deploy import pod_spec, rendered

REPO = Path(__file__).resolve().parent.parent
IMAGE_REF = "localhost/nodediag:test"
NODE_IP = "10.250.0.1"
PEER_IP = "10.250.0.2"
CLUSTER_DNS = "10.43.0.10"
#: Where the planted DROP rules send DNS: one address per firewall backend.
LEGACY_DROP, NFT_DROP, NATIVE_DROP = "10.96.0.10", "10.96.0.11", "10.96.0.12"
VXLAN = "flannel.1"
DNS_SERVER = Path(__file__).parent / "dns_test_server.py"
#: hostPaths the agent reads from this machine itself (the node is this machine there).
SHARED_HOST_PATHS = ("/proc", "/sys/fs/cgroup", "/var/log", "/run/log", "/etc/machine-id")

Obj = dict[str, Any]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass(frozen=True)
class Image:
    archive: Path
    ref: str
    entrypoint: list[str]
    cmd: list[str]
    build_seconds: float


def build_image(directory: Path) -> Image:
    """scripts/build-image into an OCI archive under ``directory``."""
    archive = directory / "nodediag.oci.tar"
    t0 = time.monotonic()
    done = subprocess.run(
        [str(REPO / "scripts" / "build-image"), "--tag", IMAGE_REF, "--oci-archive", str(archive)],
        capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"scripts/build-image failed:\n{done.stderr[-4000:]}")
    config = image_config(archive)
    return Image(
        archive, IMAGE_REF, config.get("Entrypoint") or [], config.get("Cmd") or [],
        time.monotonic() - t0,
    )  # fmt: skip


def image_config(archive: Path) -> dict[str, Any]:
    """The image config (``Entrypoint``, ``Cmd``, ``Env``, …) of an OCI archive's image."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> Any:
            member = tar.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}")
            assert member is not None
            return json.load(member)

        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.load(index_file)
        manifest = blob(index["manifests"][0]["digest"])
        config: dict[str, Any] = blob(manifest["config"]["digest"])["config"]
        return config


def run_in(netns: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


_HTTP_GET = """
import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen(sys.argv[1], timeout=10)
    status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
sys.stdout.write(f"{status}\\n" + body.decode())
"""


@dataclass
class Node:
    """The node lab; see the module docstring. A context manager."""

    name: str = field(default_factory=lambda: f"node-{secrets.token_hex(3)}")
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    cri: bool = False
    """containerd with its CRI plugin, started in the node's network (as kubelet's is)."""

    def __post_init__(self) -> None:
        self.netns = f"nodediag-node-{self.tag}"
        self.dns_netns = f"nodediag-nodedns-{self.tag}"
        self.root = Path(f"/run/nodediag-node-{self.tag}")
        # Outside ``root``: its removal must never walk into the cgroup filesystem.
        self.node_cgroup = Path(f"/run/nodediag-node-{self.tag}-cgroup")
        self._cgroup_mounted = False
        base = self.root / "run" / "containerd"
        self.containerd = (
            realcri.CriContainerd(base=base, netns=self.netns)
            if self.cri
            else realcontainerd.Containerd(base=base)
        )
        self._dns_server: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Node:
        try:
            self._make_network()
            (self.root / "run").mkdir(parents=True)
            self._write_node_files()
            if self.cri:
                self._private_cgroup_mount()
            self.containerd.__enter__()
            if not self.containerd.image:  # the CRI containerd imports it itself
                realcontainerd.import_busybox_image(self.containerd)
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _make_network(self) -> None:
        for ns in (self.netns, self.dns_netns):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
        peer = f"nd{self.tag}p"
        commands = [
            [self.netns, "ip", "link", "set", "lo", "up"],
            [self.dns_netns, "ip", "link", "set", "lo", "up"],
            [self.netns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", peer],
            [self.netns, "ip", "link", "set", peer, "netns", self.dns_netns],
            [self.dns_netns, "ip", "link", "set", peer, "name", "eth0"],
            [self.netns, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0"],
            [self.dns_netns, "ip", "addr", "add", f"{PEER_IP}/24", "dev", "eth0"],
            [self.dns_netns, "ip", "addr", "add", f"{CLUSTER_DNS}/32", "dev", "lo"],
            [self.netns, "ip", "link", "set", "eth0", "up"],
            [self.dns_netns, "ip", "link", "set", "eth0", "up"],
            [self.netns, "ip", "route", "add", "10.43.0.0/16", "via", PEER_IP],
            [self.dns_netns, "ip", "route", "add", "default", "via", NODE_IP],
        ]
        for ns, *argv in commands:
            done = run_in(ns, argv)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} in {ns}: {done.stderr.strip()}")
        ready = self.root.parent / f".nodediag-node-{self.tag}-dns-ready"
        self._dns_server = subprocess.Popen(
            ["ip", "netns", "exec", self.dns_netns, sys.executable, str(DNS_SERVER),
             "--address", CLUSTER_DNS, "--ready", str(ready)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self._dns_server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the DNS test server did not start")
            time.sleep(0.05)
        ready.unlink()

    def plant_faults(self) -> None:
        """The node's DNS faults: a DNS DROP in each firewall backend (iptables-legacy,
        iptables-nft, a native nft table; to kubeadm's DNS IP, so the probe of the cluster
        DNS still passes) and a VXLAN link with tx checksum offload on."""
        for argv in (
            ["iptables-legacy", "-A", "OUTPUT", "-p", "udp", "-d", LEGACY_DROP, "--dport", "53",
             "-j", "DROP"],
            ["iptables-nft", "-A", "OUTPUT", "-p", "udp", "-d", NFT_DROP, "--dport", "53",
             "-j", "DROP"],
            ["nft", "add table inet nodediag_test; add chain inet nodediag_test out "
             "{ type filter hook output priority 0; }; add rule inet nodediag_test out "
             f"ip daddr {NATIVE_DROP} udp dport 53 counter drop"],
            ["ip", "link", "add", VXLAN, "type", "vxlan", "id", "1", "dstport", "8472",
             "local", NODE_IP, "dev", "eth0"],
            ["ethtool", "-K", VXLAN, "tx-checksum-ip-generic", "on"],
            ["ip", "link", "set", VXLAN, "up"],
        ):  # fmt: skip
            self.run(argv)

    def _write_node_files(self) -> None:
        """The node's kubelet config (cluster DNS) and resolver file (its upstream is the
        peer namespace)."""
        resolv = self.host_path("/etc/resolv.conf")
        resolv.parent.mkdir(parents=True)
        resolv.write_text(f"nameserver {PEER_IP}\n")
        config = self.host_path("/var/lib/kubelet/config.yaml")
        config.parent.mkdir(parents=True)
        config.write_text(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
            f"clusterDNS:\n- {CLUSTER_DNS}\nclusterDomain: cluster.local\n"
        )

    def _private_cgroup_mount(self) -> None:
        """The node's cgroup tree as a private mount (the kernel's default; only systemd
        makes mounts shared): containerd's CRI refuses ``mountPropagation:
        HostToContainer`` from it, so the DaemonSet must not ask for that. A bind of this
        machine's tree, whatever its propagation, leaves the machine's own mount alone."""
        self.node_cgroup.mkdir()
        subprocess.run(["mount", "--rbind", "/sys/fs/cgroup", str(self.node_cgroup)],
                       check=True, capture_output=True)  # fmt: skip
        self._cgroup_mounted = True
        subprocess.run(["mount", "--make-rprivate", str(self.node_cgroup)],
                       check=True, capture_output=True)  # fmt: skip

    def _unmount_node_cgroup(self) -> None:
        if self._cgroup_mounted:
            done = subprocess.run(["umount", "--recursive", "--lazy", str(self.node_cgroup)],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"umount {self.node_cgroup}: {done.stderr.strip()}")
            self._cgroup_mounted = False
        with contextlib.suppress(FileNotFoundError):
            self.node_cgroup.rmdir()  # never rmtree: it was a cgroup filesystem

    def cleanup(self) -> None:
        errors: list[str] = []
        try:
            self.containerd.cleanup()
        except Exception as e:  # the rest must go all the same
            errors.append(str(e))
        try:
            self._unmount_node_cgroup()
        except Exception as e:
            errors.append(str(e))
        if self._dns_server is not None:
            self._dns_server.kill()
            self._dns_server.wait()
        for ns in (self.netns, self.dns_netns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise RuntimeError("; ".join(errors))

    # -- what the agent's container sees --------------------------------------------

    def host_path(self, path: str) -> Path:
        """Where the manifest's hostPath ``path`` is on this test's node."""
        if self._cgroup_mounted and (
            path == "/sys/fs/cgroup" or path.startswith("/sys/fs/cgroup/")
        ):
            return self.node_cgroup / path.removeprefix("/sys/fs/cgroup").lstrip("/")
        if any(path == p or path.startswith(p + "/") for p in SHARED_HOST_PATHS):
            return Path(path)
        return self.root / path.lstrip("/")

    def run(self, argv: list[str]) -> str:
        done = run_in(self.netns, argv)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.netns}: {done.stderr.strip()}")
        return done.stdout

    def http_get(self, url: str, *, from_peer: bool = False) -> tuple[int, str]:
        """GET ``url`` from inside the node's network (as the kubelet probes) or, with
        ``from_peer``, from the other namespace (as Prometheus scrapes from its own pod)."""
        done = run_in(self.dns_netns if from_peer else self.netns,
                      [sys.executable, "-c", _HTTP_GET, url], timeout=30)  # fmt: skip
        if done.returncode != 0:
            raise ConnectionError(done.stderr.strip().splitlines()[-1:] or done.returncode)
        status, _, body = done.stdout.partition("\n")
        return int(status), body


def translate(node: Node, image: Image, spec: Obj, scratch: Path, pod: str) -> podspec.CtrRun:
    """The DaemonSet's pod ``spec`` as ``ctr run`` options on ``node``."""
    downward = {
        "spec.nodeName": node.name,
        "metadata.name": pod,
        "metadata.namespace": "nodediag",
        "status.podIP": NODE_IP,
        "status.hostIP": NODE_IP,
    }
    return podspec.translate(
        spec,
        entrypoint=image.entrypoint,
        cmd=image.cmd,
        downward=downward,
        network_namespace=Path("/run/netns") / node.netns,
        host_path=node.host_path,
        scratch=scratch,
    )


class AgentView(abc.ABC):
    """The agent's container on a :class:`Node`, however it was started: its log (findings
    are its JSON lines), its metrics port and probes."""

    node: Node

    @abc.abstractmethod
    def log(self) -> str:
        """What the agent wrote to stdout and stderr so far."""

    @abc.abstractmethod
    def state(self) -> str:
        """``RUNNING`` while the container runs."""

    @property
    @abc.abstractmethod
    def ports(self) -> dict[str, int]: ...

    @property
    @abc.abstractmethod
    def probes(self) -> dict[str, podspec.HttpProbe]: ...

    def findings(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    item = json.loads(line)
                    if isinstance(item, dict) and "reason" in item:
                        found.append(item)
        return found

    def url(self, path: str) -> str:
        return f"http://{NODE_IP}:{self.ports['metrics']}{path}"

    def get(self, path: str, *, from_peer: bool = False) -> tuple[int, str]:
        return self.node.http_get(self.url(path), from_peer=from_peer)

    def samples(self) -> Samples:
        status, text = self.get("/metrics", from_peer=True)
        assert status == 200, text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.state() != "RUNNING":
                raise RuntimeError(f"agent container {self.state()}:\n{self.log()}")
            try:
                status, _ = self.get(self.probes["readinessProbe"].path)
                if status == 200:
                    return
                last = status
            except ConnectionError as e:
                last = e
            time.sleep(0.5)
        raise TimeoutError(f"/readyz never answered 200 (last: {last}):\n{self.log()[-3000:]}")

    def wait_samples(self, done: Callable[[Samples], bool], timeout: float = 90) -> Samples:
        """Scrape (from the peer) until ``done(samples)``."""
        deadline = time.monotonic() + timeout
        samples: Samples = {}
        while time.monotonic() < deadline:
            samples = self.samples()
            if done(samples):
                return samples
            time.sleep(0.5)
        collectors = sorted(k for k in samples if "collector" in k[0])
        raise TimeoutError(f"metrics never settled: {collectors}")

    def wait_finding(self, timeout: float = 60, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for finding in self.findings():
                if _matches(finding, match):
                    return finding
            time.sleep(0.2)
        raise TimeoutError(f"no finding {match}:\n{self.log()[-3000:]}")


@dataclass
class Agent(AgentView):
    """The agent's container, started by ``ctr run`` from the translated DaemonSet."""

    node: Node
    run: podspec.CtrRun
    container: realcontainerd.RunningContainer

    @property
    def log_path(self) -> Path:
        return self.node.containerd.logs / f"{self.container.container_id}.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def state(self) -> str:
        return self.container.status()

    @property
    def ports(self) -> dict[str, int]:
        return self.run.ports

    @property
    def probes(self) -> dict[str, podspec.HttpProbe]:
        return self.run.probes

    def terminate(self) -> tuple[int, float]:
        """SIGTERM the agent as the kubelet stops a pod; returns (exit status, seconds)."""
        t0 = time.monotonic()
        self.node.containerd.ctr("tasks", "kill", "-s", "SIGTERM", self.container.container_id)
        self.container.wait_stopped(timeout=self.run.termination_grace_seconds + 5)
        seconds = time.monotonic() - t0
        return self.container.delete_task(), seconds


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` by field (``CapEff``, ``NoNewPrivs``, ``Seccomp``, …)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def mount_options(pid: int) -> dict[str, set[str]]:
    """Mount point (as the process sees it) -> its per-mount options (``ro``/``rw``, …)."""
    options: dict[str, set[str]] = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        options[fields[4].replace("\\040", " ")] = set(fields[5].split(","))
    return options


#: The collectors `nodediag run` runs (agent/periodic.py), and the kernel log loop.
PERIODIC = ("firewall", "vxlan", "dns_probe", "conntrack", "node_sysctl", "overlay_mtu", "resolver")


def collector_success(samples: Samples) -> dict[str, float]:
    """``nodediag_collector_success`` by collector."""
    return {
        dict(labels)["collector"]: value
        for (name, labels), value in samples.items()
        if name == "nodediag_collector_success"
    }


def failures(samples: Samples) -> dict[str, float]:
    """Collectors and collector sources whose success gauge is not 1, by name
    (``firewall``, ``firewall/iptables-legacy-save``, …)."""
    failed: dict[str, float] = {}
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name == "nodediag_collector_success" and value != 1:
            failed[label["collector"]] = value
        elif name == "nodediag_collector_source_success" and value != 1:
            failed[f"{label['collector']}/{label['source']}"] = value
    return failed


def _matches(finding: dict[str, Any], match: dict[str, Any]) -> bool:
    for key, wanted in match.items():
        value: Any = finding
        for part in key.split("__"):
            value = value.get(part) if isinstance(value, dict) else None
        if value != wanted:
            return False
    return True


def start_agent(
    node: Node, image: Image, scratch: Path, variant: str = "base", spec: Obj | None = None
) -> Agent:
    """The agent's container from the rendered ``variant`` (or a pod ``spec`` of the
    test's, e.g. a changed manifest)."""
    pod = f"nodediag-{secrets.token_hex(3)}"
    run = translate(node, image, spec or pod_spec(rendered(variant)), scratch, pod)
    container = realcontainerd.run_container(
        node.containerd,
        image.ref,
        pod=pod,
        namespace="nodediag",
        name="nodediag",
        pod_uid=str(uuid.uuid4()),
        memory_limit=run.memory_limit,
        qos=run.qos,
        args=run.argv,
        options=run.options,
    )
    return Agent(node, run, container)


def require_tools() -> None:
    if os.geteuid() != 0:
        realkernel.skip_or_fail("needs root")
    needed = ("buildah", "mmdebstrap", "ip", "iptables-legacy", "iptables-nft", "nft", "ethtool")
    missing = [t for t in needed if shutil.which(t) is None]
    missing += realcontainerd.missing_binaries()
    if missing:
        realkernel.skip_or_fail(f"not installed: {', '.join(missing)}")


@contextlib.contextmanager
def stopped(cd: realcontainerd.Containerd) -> Iterator[None]:
    cd.stop()
    try:
        yield
    finally:
        cd.start()
