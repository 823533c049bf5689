"""The image as shipped, run as the DaemonSet runs it (see ``imagelab``): built by
scripts/build-image, started by containerd + runc under the securityContext, mounts and
environment read from the rendered ``daemonset/`` manifests, in a node network the test made.
Every collector must work there and say so."""

from __future__ import annotations

from collections.abc import Iterator

import imagelab
import pytest
import realcontainerd
import realkernel

pytestmark = pytest.mark.root


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> imagelab.Image:
    imagelab.require_tools()
    return imagelab.build_image(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module")
def node(image: imagelab.Image) -> Iterator[imagelab.Node]:
    with imagelab.Node() as lab:
        realcontainerd.import_oci_archive(lab.containerd, image.archive, image.ref)
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
    finally:
        victim.remove()
