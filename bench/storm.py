"""OOM storm benchmark (issue 7, item 5): 1,000 real OOM kills in ~10 s across 20 throwaway
kubepods-style memory cgroups, read by a running ``nodediag run --kernel-log kmsg``.

    sudo .venv/bin/python bench/storm.py [--containers 20] [--kills-per-container 50]

Prints a table: kills (the cgroups' oom_kill counters), counted (the agent's
``nodediag_oom_kills_total`` rise), findings and how many the counters attributed, agent
RSS before/after, records lost by /dev/kmsg, time from the storm's end until every kill is
counted. Second row: the same storm while the agent is stopped (SIGSTOP), so /dev/kmsg's
ring buffer wraps and records are lost. API calls per finding: n/a (``--no-kube``; the
Events sink aggregates per object, measured by the events benchmark).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import stormkit  # noqa: E402
from agentproc import RunningAgent  # noqa: E402


def run(containers: int, per_container: int, *, overrun: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as state, stormkit.exclusive_oom():
        agent = RunningAgent(["--kernel-log", "kmsg", "--no-kube", "--state-dir", state])
        try:
            agent.wait_ready()
            before = stormkit.wait_quiet(agent)
            lost_before = agent.metric("nodediag_kernel_log_lost_records_total")
            with stormkit.Storm(n=containers, per_container=per_container) as storm:
                rss_before = stormkit.rss_kib(agent.proc.pid)
                since = time.time()
                if overrun:
                    os.kill(agent.proc.pid, signal.SIGSTOP)
                storm.start()
                try:
                    result = storm.wait()
                finally:
                    if overrun:
                        os.kill(agent.proc.pid, signal.SIGCONT)
                ended = time.monotonic()
                deadline = ended + 30
                while agent.metric("nodediag_oom_kills_total") - before < result.kills:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                caught_up = time.monotonic() - ended
                time.sleep(2)
                counted = agent.metric("nodediag_oom_kills_total") - before
                findings = [
                    f
                    for f in agent.findings
                    if f["details"].get("comm") == "dd"
                    and datetime.fromisoformat(f["time"]).timestamp() >= since
                ]
                attributed = sum(1 for f in findings if f["subject"].get("container_id"))
                by_counter = sum(1 for f in findings if f["details"].get("memcg_source"))
                return {
                    "mode": "kmsg, agent stopped (overrun)" if overrun else "kmsg",
                    "kills": result.kills,
                    "storm_s": result.seconds,
                    "counted": int(counted),
                    "findings": len(findings),
                    "attributed": attributed,
                    "by_counter": by_counter,
                    "rss_before": rss_before,
                    "rss_after": stormkit.rss_kib(agent.proc.pid),
                    "lost": int(
                        agent.metric("nodediag_kernel_log_lost_records_total") - lost_before
                    ),
                    "caught_up_s": caught_up,
                    "alive": agent.proc.poll() is None,
                }
        finally:
            agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=20)
    parser.add_argument("--kills-per-container", type=int, default=50)
    args = parser.parse_args()
    rows = [
        run(args.containers, args.kills_per_container, overrun=False),
        run(args.containers, args.kills_per_container, overrun=True),
    ]
    header = (
        "| mode | kills (counters) | storm s | counted | exact | findings | with container "
        "(of which by counter) | RSS before→after KiB | lost records | counted within s | "
        "alive |"
    )
    print(header)
    print("|" + "---|" * 11)
    for r in rows:
        print(
            f"| {r['mode']} | {r['kills']} | {r['storm_s']:.1f} | {r['counted']} | "
            f"{'yes' if r['counted'] == r['kills'] else 'NO'} | {r['findings']} | "
            f"{r['attributed']} ({r['by_counter']}) | {r['rss_before']}→{r['rss_after']} | "
            f"{r['lost']} | {r['caught_up_s']:.2f} | {'yes' if r['alive'] else 'NO'} |"
        )


if __name__ == "__main__":
    main()
