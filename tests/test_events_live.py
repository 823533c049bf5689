"""End to end: the real ``nodediag run`` writes Events to the API stand-in (through a
kubeconfig) for real OOM kills in throwaway kubepods-style cgroups read from /dev/kmsg.

containerd is absent here (the socket does not exist), so the pod's name and the
container's come from the agent's pod watch: the stand-in holds a Pod with the throwaway
container's pod uid and container id in ``status.containerStatuses``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import kube_standin as ks
import pytest
import realkernel
from agentproc import RunningAgent
from test_events import NODE, pod_object

pytestmark = pytest.mark.root

MakeContainer = Callable[..., realkernel.ThrowawayContainer]


def resume_at_newest_kmsg_record(state_dir: Path) -> None:
    """Save a kmsg position at the newest record, so the agent reports only the kills the
    test makes: this boot's earlier test kills are judged from the log too, and their
    Events would count in the per-reason metrics the tests read."""
    newest = None
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:  # records overwritten while reading: go on
                continue
            newest = int(record.split(b",", 2)[1])
    finally:
        os.close(fd)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    position = {"source": "kmsg", "position": f"{boot_id}:{newest}"}
    (state_dir / "kernel-log.json").write_text(json.dumps(position))


def standin_agent_args(api: ks.KubeStandin, tmp_path: Path) -> list[str]:
    """``run`` arguments: Events to ``api``, kills from /dev/kmsg made after this call, no
    containerd, and a DNS probe of 127.0.0.1 that fails (a Node finding)."""
    resume_at_newest_kmsg_record(tmp_path / "state")
    return [
        "--kubeconfig", str(api.write_kubeconfig(tmp_path / "kubeconfig")),
        "--kernel-log", "kmsg",
        "--state-dir", str(tmp_path / "state"),
        "--node-name", NODE,
        "--containerd-socket", str(tmp_path / "no-containerd.sock"),
        "--cluster-dns", "127.0.0.1",
        "--dns-probe-name", "kubernetes.default.svc.cluster.local",
    ]  # fmt: skip


@pytest.fixture
def api() -> Iterator[ks.KubeStandin]:
    with ks.running() as standin:
        standin.add_node(NODE)
        yield standin


@pytest.fixture
def agent(
    api: ks.KubeStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunningAgent]:
    monkeypatch.setenv("NODEDIAG_EVENT_FLUSH_INTERVAL", "0.5")
    monkeypatch.setenv("NODEDIAG_EVENT_BACKOFF_CAP", "2")
    running = RunningAgent(standin_agent_args(api, tmp_path))
    running.wait_ready()
    # Ready means the kernel log is caught up, not that the pod watch runs: kills made
    # before it does would be reported without the pod's name.
    assert api.wait_for(_pod_watch_open, timeout=15), running.log()
    yield running
    assert running.stop() == 0, running.log()


def _pod_watch_open(api: ks.KubeStandin) -> bool:
    return any(r.query.get("watch") in ("true", "1") for r in api.requests_matching("GET", "/pods"))


def _pod_for(api: ks.KubeStandin, container: realkernel.ThrowawayContainer, name: str) -> None:
    api.add_pod(pod_object(name, "shop", container.pod_uid, {"app": container.container_id}))


def _pod_events(api: ks.KubeStandin, uid: str) -> list[ks.JSON]:
    return [e for e in api.events("shop") if e["regarding"].get("uid") == uid]


def test_oom_kills_make_one_event_on_the_pod_named_by_the_watch(
    api: ks.KubeStandin, agent: RunningAgent, throwaway_container: MakeContainer
) -> None:
    container = throwaway_container()
    _pod_for(api, container, "web-0")
    time.sleep(0.3)  # the agent's pod watch sees the pod
    kills = [container.oom_kill("child") for _ in range(3)]

    finding = agent.wait_finding(container.container_id)
    assert finding["subject"]["name"] == "web-0"  # from the pod watch: containerd is absent
    assert finding["subject"]["namespace"] == "shop"
    assert finding["subject"]["container"] == "app"
    assert finding["reason"] == "InvisibleOOMKill"

    def counted(standin: ks.KubeStandin) -> bool:
        events = _pod_events(standin, container.pod_uid)
        return len(events) == 1 and events[0].get("series", {}).get("count") == len(kills)

    assert api.wait_for(counted, timeout=15), (api.events(), agent.log())
    event = _pod_events(api, container.pod_uid)[0]
    assert event["regarding"] == {
        "apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "web-0",
        "uid": container.pod_uid,
    }  # fmt: skip
    assert event["reportingInstance"] == f"nodediag-{NODE}"
    assert f"pid {kills[0].victim_pid}" in event["note"]
    writes = api.requests_matching(path=r"/namespaces/shop/events")
    assert 1 <= len(writes) <= len(kills)
    labels = {"reason": "InvisibleOOMKill", "result": "created"}
    assert api.wait_for(lambda _: agent.metric("nodediag_events_total", **labels) == 1)


def test_node_finding_goes_on_the_node_while_kills_come_in(
    api: ks.KubeStandin, agent: RunningAgent, throwaway_container: MakeContainer
) -> None:
    """The DNS probe of 127.0.0.1 fails (nothing answers there): a Node Event, prompt even
    while a pod's kills are being reported."""
    container = throwaway_container()
    _pod_for(api, container, "storm-0")
    for _ in range(3):
        container.oom_kill("child")
    assert api.wait_for(
        lambda s: any(e["reason"] == "DNSProbeFailed" for e in s.events("default")), timeout=20
    ), agent.log()
    node_event = next(e for e in api.events("default") if e["reason"] == "DNSProbeFailed")
    assert node_event["regarding"]["kind"] == "Node"
    assert node_event["regarding"]["name"] == NODE
    assert node_event["type"] == "Warning"


def test_outage_loses_nothing(
    api: ks.KubeStandin, agent: RunningAgent, throwaway_container: MakeContainer
) -> None:
    """A shortened outage (3 s of 500s, then 3 s of dropped connections) with kills during it:
    after recovery the Event and its count are complete."""
    container = throwaway_container()
    _pod_for(api, container, "api-0")
    time.sleep(0.3)
    api.outage(3, 500)
    api.outage(3, "drop", start_in=3)
    started = time.monotonic()
    kills = 0
    while time.monotonic() - started < 5:
        container.oom_kill("child")
        kills += 1
    if time.monotonic() - started < 5.5:  # the outage still lasts (a loaded machine may be late)
        assert _pod_events(api, container.pod_uid) == []

    def complete(standin: ks.KubeStandin) -> bool:
        events = _pod_events(standin, container.pod_uid)
        return len(events) == 1 and events[0].get("series", {}).get("count", 1) == kills

    assert api.wait_for(complete, timeout=20), (api.events(), agent.log())
    faults = [r for r in api.requests if r.fault == "outage"]
    assert faults, "the agent tried during the outage"
    assert agent.metric("nodediag_events_total", result="failed") >= 1
    assert agent.metric("nodediag_events_total", result="dropped") == 0
