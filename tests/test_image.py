"""The image as shipped, run as the DaemonSet runs it (see ``imagelab``): built by
scripts/build-image, started by containerd + runc under the securityContext, mounts and
environment read from the rendered ``daemonset/`` manifests, in a node network the test made.
Every collector must work there and say so."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imagelab
import podspec
import pytest
import realcontainerd
import realkernel
from test_deploy import pod_spec, rendered

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def node(image: imagelab.Image) -> Iterator[imagelab.Node]:
    with imagelab.Node() as lab:
        realcontainerd.import_oci_archive(lab.containerd, image.archive, image.ref)
        lab.plant_faults()
        yield lab


@pytest.fixture(scope="module")
def agent(
    node: imagelab.Node,
    image: imagelab.Image,
    journald: realkernel.JournaldHandle,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[imagelab.Agent]:
    running = imagelab.start_agent(node, image, tmp_path_factory.mktemp("agent"))
    try:
        running.wait_ready()
        yield running
    finally:
        print(running.log()[-5000:])
        running.container.remove()


def test_probes_answer_from_the_node_network(agent: imagelab.Agent) -> None:
    for kind in ("livenessProbe", "readinessProbe"):
        status, body = agent.get(agent.run.probes[kind].path)
        assert status == 200, (kind, body)


def test_journal_oom_kill_is_found_and_named(agent: imagelab.Agent, node: imagelab.Node) -> None:
    victim = realcontainerd.run_container(
        node.containerd, pod="shop-web-0", namespace="shop", name="app", memory_limit=32 << 20
    )
    try:
        oom = victim.oom_kill_child()
        finding = agent.wait_finding(details__pid=oom.victim_pid)
        assert finding["reason"] == "InvisibleOOMKill"
        assert finding["subject"]["name"] == "shop-web-0"
        assert finding["subject"]["namespace"] == "shop"
        assert finding["subject"]["container"] == "app"
        assert finding["node"] == node.name
        labels = (("container", "app"), ("namespace", "shop"), ("pod", "shop-web-0"),
                  ("scope", "invisible"))  # fmt: skip
        kills = ("nodediag_oom_kills_total", labels)
        assert agent.wait_samples(lambda s: kills in s)[kills] == 1
    finally:
        victim.remove()


def test_the_kernel_confines_the_agent_as_the_manifest_says(
    agent: imagelab.Agent, node: imagelab.Node
) -> None:
    """The kernel is the oracle: what the process really has, against what the rendered
    manifest asks for."""
    pid = agent.container.init_pid
    status = imagelab.proc_status(pid)
    assert podspec.cap_names(int(status["CapBnd"], 16)) == agent.run.capabilities
    assert podspec.cap_names(int(status["CapEff"], 16)) == agent.run.capabilities
    assert status["NoNewPrivs"] == ("1" if agent.run.no_new_privs else "0")
    assert status["Seccomp"] == ("2" if agent.run.seccomp else "0")
    assert (status["Uid"].split()[0], status["Gid"].split()[0]) == ("0", "0")
    same = os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{node.netns}").st_ino
    assert same, "hostNetwork: the agent is not in the node's network namespace"
    assert os.stat(f"/proc/{pid}/ns/pid").st_ino == os.stat("/proc/self/ns/pid").st_ino
    mounts = imagelab.mount_options(pid)
    assert "ro" in mounts["/"], "readOnlyRootFilesystem"
    container = pod_spec(rendered("base"))["containers"][0]
    for mount in container["volumeMounts"]:
        wanted = "ro" if mount.get("readOnly") else "rw"
        assert wanted in mounts[mount["mountPath"]], mount
    limit = realcontainerd.memory_cgroup_dir(agent.container.cgroup_path)
    limit_file = next(p for p in (limit / "memory.limit_in_bytes", limit / "memory.max")
                      if p.exists())  # fmt: skip
    assert int(limit_file.read_text()) == agent.run.memory_limit


def test_every_collector_succeeds_and_prometheus_scrapes_it(agent: imagelab.Agent) -> None:
    samples = agent.wait_samples(
        lambda s: set(imagelab.PERIODIC) | {"kernel_log"} <= set(imagelab.collector_success(s))
    )
    assert imagelab.failures(samples) == {}


@pytest.mark.parametrize(
    ("backend", "address"),
    [("iptables-legacy", imagelab.LEGACY_DROP), ("iptables-nft", imagelab.NFT_DROP),
     ("nft", imagelab.NATIVE_DROP)],
)  # fmt: skip
def test_dns_drop_found_in_every_firewall_backend(
    agent: imagelab.Agent, backend: str, address: str
) -> None:
    # The native nft table's drop says the firewall collector has run (all backends at once).
    agent.wait_finding(timeout=90, reason="DNSDropRule", details__backend="nft")
    try:
        finding = agent.wait_finding(timeout=5, reason="DNSDropRule", details__backend=backend)
    except TimeoutError:
        if backend == "iptables-legacy" and "CAP_NET_RAW" not in agent.run.capabilities:
            pytest.xfail(
                "the DaemonSet adds no CAP_NET_RAW: iptables-legacy-save cannot read the "
                "legacy tables without it"
            )
        raise
    assert address in finding["details"]["rule"], finding
    assert finding["node"] == agent.node.name


def test_vxlan_offload_and_dns_probe_from_the_node_network(agent: imagelab.Agent) -> None:
    offload = ("nodediag_vxlan_tx_checksum_offload", (("interface", imagelab.VXLAN),))
    probe = (
        "nodediag_dns_probe_success",
        (("protocol", "udp"), ("server", imagelab.CLUSTER_DNS)),
    )
    samples = agent.wait_samples(lambda s: offload in s and probe in s)
    assert samples[offload] == 1
    assert samples[probe] == 1
    finding = agent.wait_finding(reason="VXLANChecksumOffload")
    assert finding["details"]["interface"] == imagelab.VXLAN


@contextlib.contextmanager
def _kill_in_pod(node: imagelab.Node, pod: str) -> Iterator[realcontainerd.ContainerOom]:
    """A real OOM kill of a child process in a running container of pod ``shop/<pod>``; the
    container keeps running (as the pod would) until the block ends."""
    victim = realcontainerd.run_container(
        node.containerd, pod=pod, namespace="shop", name="app", memory_limit=32 << 20
    )
    try:
        yield victim.oom_kill_child()
    finally:
        victim.remove()


def test_containerd_restart_is_followed_over_the_mounted_socket_directory(
    agent: imagelab.Agent, node: imagelab.Node
) -> None:
    """containerd makes a new socket when it restarts: the agent sees it through the
    mounted directory and still names the pods of later kills."""
    node.containerd.stop()
    node.containerd.start()
    assert agent.container.status() == "RUNNING"
    pod = f"after-restart-{os.urandom(3).hex()}"
    with _kill_in_pod(node, pod) as oom:
        finding = agent.wait_finding(details__pid=oom.victim_pid)
    assert (finding["reason"], finding["subject"]["name"]) == ("InvisibleOOMKill", pod)


def _oom_findings(agent: imagelab.Agent, pod: str) -> list[dict[str, Any]]:
    return [f for f in agent.findings() if f["subject"].get("name") == pod]


def test_sigterm_saves_the_position_and_the_next_container_resumes_exactly(
    agent: imagelab.Agent,
    node: imagelab.Node,
    image: imagelab.Image,
    tmp_path: Path,
) -> None:
    """Last in this module: it stops the module's agent. A kill before SIGTERM is reported
    by the first container only; a kill while no agent runs is reported by the next one,
    once."""
    before, during = (f"{name}-{os.urandom(3).hex()}" for name in ("before", "during"))
    with contextlib.ExitStack() as pods:
        seen = pods.enter_context(_kill_in_pod(node, before))
        agent.wait_finding(details__pid=seen.victim_pid)
        status, seconds = agent.terminate()
        assert status == 0, agent.log()[-3000:]
        assert seconds < agent.run.termination_grace_seconds
        missed = pods.enter_context(_kill_in_pod(node, during))
        successor = imagelab.start_agent(node, image, tmp_path)
        try:
            successor.wait_ready()
            finding = successor.wait_finding(details__pid=missed.victim_pid)
            assert (finding["reason"], finding["subject"]["name"]) == ("InvisibleOOMKill", during)
            time.sleep(2)  # anything reported twice would be printed by now
            assert len(_oom_findings(successor, during)) == 1
            assert _oom_findings(successor, before) == []
            assert len(_oom_findings(agent, before)) == 1
            assert _oom_findings(agent, during) == []
        finally:
            print(successor.log()[-5000:])
            successor.container.remove()


def test_kmsg_component_reads_dev_kmsg_privileged(image: imagelab.Image, tmp_path: Path) -> None:
    """components/kmsg: privileged, NODEDIAG_KERNEL_LOG=kmsg; the OOM kill comes from
    /dev/kmsg (no journald needed), on a node of its own."""
    with imagelab.Node() as node:
        realcontainerd.import_oci_archive(node.containerd, image.archive, image.ref)
        agent = imagelab.start_agent(node, image, tmp_path, variant="kmsg")
        try:
            assert agent.run.privileged and agent.run.env["NODEDIAG_KERNEL_LOG"] == "kmsg"
            agent.wait_ready()
            pod = f"kmsg-{os.urandom(3).hex()}"
            with _kill_in_pod(node, pod) as oom:
                finding = agent.wait_finding(details__pid=oom.victim_pid)
            assert (finding["reason"], finding["subject"]["name"]) == ("InvisibleOOMKill", pod)
            samples = agent.samples()
            assert samples[("nodediag_kernel_log_records_total", (("source", "kmsg"),))] > 0
        finally:
            print(agent.log()[-5000:])
            agent.container.remove()


def test_a_manifest_change_that_breaks_a_collector_fails_these_checks(
    image: imagelab.Image, tmp_path: Path
) -> None:
    """The check above is not a formality: the DaemonSet without NET_RAW (the legacy
    iptables-save tools open a raw socket) runs, and the same check names what broke."""
    spec = pod_spec(rendered("base"))
    capabilities = spec["containers"][0]["securityContext"]["capabilities"]
    capabilities["add"] = [c for c in capabilities["add"] if c != "NET_RAW"]
    with imagelab.Node() as node:
        realcontainerd.import_oci_archive(node.containerd, image.archive, image.ref)
        node.plant_faults()
        agent = imagelab.start_agent(node, image, tmp_path, spec=spec)
        try:
            agent.wait_ready()
            samples = agent.wait_samples(
                lambda s: set(imagelab.PERIODIC) <= set(imagelab.collector_success(s))
            )
            failed = imagelab.failures(samples)
            assert [name for name in failed if "legacy" in name], failed
        finally:
            agent.container.remove()
