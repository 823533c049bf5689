"""The API down for five minutes under the real ``nodediag run`` (default Event settings):
100 s of 503s, 100 s of dropped connections, then 100 s with the API server stopped
(connection refused), real OOM kills in every phase. Afterwards every finding is in an
Event's count, nothing was dropped, the agent never stopped, and the outage was logged
once (and its end once), not once per retry."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from pathlib import Path

import kube_standin as ks
import pytest
import realkernel
from agentproc import RunningAgent
from test_events import NODE, pod_object
from test_events_live import standin_agent_args

pytestmark = pytest.mark.root

MakeContainer = Callable[..., realkernel.ThrowawayContainer]
# seconds; three phases make the five minutes (shorter only to debug the test itself)
PHASE = float(os.environ.get("NODEDIAG_TEST_OUTAGE_PHASE", "100"))
KILLS_PER_PHASE = 2


def _event_counts(api: ks.KubeStandin, pod_uid: str) -> collections.Counter[str]:
    """Reason → the sum of the counts of the Events on the pod, or on the Node for DNS
    (other OOM kills on the host, outside the test's pod, are left out)."""
    counts: collections.Counter[str] = collections.Counter()
    for event in api.events():
        regarding = event["regarding"]
        if regarding.get("uid") == pod_uid or event["reason"] == "DNSProbeFailed":
            counts[event["reason"]] += event.get("series", {}).get("count", 1)
    return counts


def _finding_counts(agent: RunningAgent, pod_uid: str) -> collections.Counter[str]:
    return collections.Counter(
        f["reason"]
        for f in agent.findings
        if f["subject"].get("uid") == pod_uid or f["reason"] == "DNSProbeFailed"
    )


def _kill_during(container: realkernel.ThrowawayContainer, seconds: float) -> int:
    """``KILLS_PER_PHASE`` kills spread over ``seconds``; returns when they are over."""
    end = time.monotonic() + seconds
    for n in range(KILLS_PER_PHASE):
        container.oom_kill("child")
        time.sleep(max(0.0, (end - time.monotonic()) / (KILLS_PER_PHASE - n) - 1))
    time.sleep(max(0.0, end - time.monotonic()))
    return KILLS_PER_PHASE


def test_five_minute_api_outage_loses_no_event(
    throwaway_container: MakeContainer, tmp_path: Path
) -> None:
    api = ks.KubeStandin().start()
    api.add_node(NODE)
    agent = RunningAgent(standin_agent_args(api, tmp_path))
    try:
        agent.wait_ready()
        container = throwaway_container()
        api.add_pod(
            pod_object("outage-0", "shop", container.pod_uid, {"app": container.container_id})
        )
        container.oom_kill("child")
        assert api.wait_for(lambda s: bool(s.events("shop")), timeout=30), agent.log()
        kills = 1

        api.outage(PHASE, 503)
        kills += _kill_during(container, PHASE)
        api.outage(PHASE, "drop")
        kills += _kill_during(container, PHASE)
        port = api.port
        api.stop()
        kills += _kill_during(container, PHASE)
        api.start(port)

        uid = container.pod_uid

        def complete(standin: ks.KubeStandin) -> bool:
            return _event_counts(standin, uid) == _finding_counts(agent, uid)

        assert api.wait_for(complete, timeout=120), (
            _event_counts(api, uid),
            _finding_counts(agent, uid),
            agent.log(),
        )
        assert _event_counts(api, uid)["InvisibleOOMKill"] == kills
        assert agent.proc.poll() is None
        assert agent.metric("nodediag_events_total", result="failed") >= 1
        assert agent.metric("nodediag_events_total", result="dropped") == 0
        log = agent.log_lines
        assert sum("Kubernetes API failing" in line for line in log) == 1, log
        assert sum("Kubernetes API answers again" in line for line in log) == 1, log
        assert sum("pod watch on node" in line and "failed" in line for line in log) == 1, log
    finally:
        assert agent.stop() == 0, agent.log()
        api.stop()
    assert "Traceback" not in "\n".join(agent.log_lines)
