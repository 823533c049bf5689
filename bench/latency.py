"""Detection latency: real OOM kill → the counter rising on a running agent's /metrics.

    sudo .venv/bin/python bench/latency.py [--kills 50] [--source journal --source kmsg] [--events]

For every kill (tests/realkernel.py, paced under the kernel's OOM report ratelimit) it also
notes when observers in this process saw the victim's ``Killed process`` line:

- ``kmsg``: a /dev/kmsg reader (≈ when the kernel printed it);
- ``journal file``: a journal reader polling every 5 ms (≈ when journald wrote the entry);
- ``journal wakeup``: a journal reader blocked in ``wait()`` (inotify: journald announces
  writes at most every 250 ms);

so the table shows where the time goes. ``t0`` is the test seeing the victim exit; the
metric time is the first scrape (every 2 ms) showing the counter risen and this kill's
finding printed (other kills on the host raise the counter too). ``--events``: the agent
writes Events to ``tests/kube_standin.py``'s API stand-in (pods named by its pod watch, each
kill in a new pod), and the table adds kill → the Event at the stand-in.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

KILLED = re.compile(rb"Killed process (\d+) ")


def nearest_rank(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``q`` of all at or below."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


@dataclass
class Observers:
    """Threads noting when each victim pid's Killed line became visible to each reader."""

    journal_dir: Path | None
    seen: dict[str, dict[int, float]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        targets: list[tuple[str, Any]] = [("kmsg", self._kmsg)]
        if self.journal_dir is not None:
            targets += [
                ("journal file", self._journal_poll),
                ("journal wakeup", self._journal_wait),
            ]
        for name, target in targets:
            self.seen[name] = {}
            thread = threading.Thread(target=target, args=(self.seen[name],), daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=3)

    def _note(self, seen: dict[int, float], message: bytes) -> None:
        match = KILLED.search(message)
        if match is not None:
            seen.setdefault(int(match[1]), time.time())

    def _kmsg(self, seen: dict[int, float]) -> None:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(fd, 0, os.SEEK_END)
        import select

        poller = select.poll()
        poller.register(fd, select.POLLIN)
        try:
            while not self.stop.is_set():
                if not poller.poll(200):
                    continue
                while True:
                    try:
                        record = os.read(fd, 8192)
                    except BlockingIOError:
                        break
                    except BrokenPipeError:
                        continue
                    self._note(seen, record)
        finally:
            os.close(fd)

    def _reader(self) -> Any:
        from collectors.journal import open_reader

        reader = open_reader(self.journal_dir)
        reader.seek_tail()
        reader._previous()
        return reader

    def _journal_poll(self, seen: dict[int, float]) -> None:
        reader = self._reader()
        while not self.stop.is_set():
            while reader._next():
                self._note(seen, reader._get("MESSAGE"))
            time.sleep(0.005)
        reader.close()

    def _journal_wait(self, seen: dict[int, float]) -> None:
        reader = self._reader()
        while not self.stop.is_set():
            reader.wait(0.5)
            while reader._next():
                self._note(seen, reader._get("MESSAGE"))
        reader.close()


def _event_seen(standin: Any, pod_uid: str, deadline: float) -> float:
    """When the API stand-in first holds an Event regarding pod ``pod_uid`` (polled every
    2 ms; ``standin.events()`` copies under the stand-in's lock)."""
    while not any(e["regarding"].get("uid") == pod_uid for e in standin.events("bench")):
        if time.time() > deadline:
            raise TimeoutError(f"no Event for pod {pod_uid}")
        time.sleep(0.002)
    return time.time()


def measure(source: str, kills: int, journald: Any, events: bool) -> list[dict[str, float]]:
    import realkernel
    from agentproc import RunningAgent

    state = Path(tempfile.mkdtemp(prefix="nodediag-bench-"))
    args = ["--kernel-log", source, "--state-dir", str(state)]
    if source == "journal":
        args += ["--journal-path", str(journald.journal_dir)]
    standin = None
    if events:
        import kube_standin as ks
        from test_events import NODE, pod_object

        standin = ks.KubeStandin().start()
        standin.add_node(NODE)
        args += [
            "--kubeconfig", str(standin.write_kubeconfig(state / "kubeconfig")),
            "--node-name", NODE,
            "--containerd-socket", str(state / "no-containerd.sock"),
        ]  # fmt: skip
    else:
        args += ["--no-kube"]
    observers = Observers(journald.journal_dir)
    observers.start()
    agent = RunningAgent(args)
    rows: list[dict[str, float]] = []
    try:
        agent.wait_ready()
        for n in range(kills):
            before = agent.metric("nodediag_oom_kills_total")
            with realkernel.ThrowawayContainer() as container:
                if standin is not None:
                    # The pod watch names the pod (no containerd here): a new pod per kill,
                    # so each kill makes a new Event (a create, not a series update).
                    standin.add_pod(
                        pod_object(
                            f"bench-{n}",
                            "bench",
                            container.pod_uid,
                            {"app": container.container_id},
                        )
                    )
                    time.sleep(0.2)  # the watch delivers it
                outcome = container.oom_kill("child")
                # Other OOM kills on the host raise the counter too: wait for this one's
                # finding as well (printed right after the counter is raised).
                while agent.metric("nodediag_oom_kills_total") <= before or not agent.findings_for(
                    container.container_id
                ):
                    if time.time() - outcome.killed_at > 10:
                        raise TimeoutError(agent.log())
                    time.sleep(0.002)
                metric_at = time.time()
                if standin is not None:
                    event_at = _event_seen(standin, container.pod_uid, outcome.killed_at + 15)
            time.sleep(0.3)  # let the observers catch up
            row = {"t0": outcome.killed_at, "metric": metric_at}
            if standin is not None:
                row["event"] = event_at
            for name, seen in observers.seen.items():
                if outcome.victim_pid in seen:
                    row[name] = seen[outcome.victim_pid]
            rows.append(row)
    finally:
        agent.stop()
        observers.close()
        if standin is not None:
            standin.stop()
    return rows


def summarize(source: str, rows: list[dict[str, float]]) -> list[tuple[str, str, str, str]]:
    out = []
    names = ["kmsg", "journal file", "journal wakeup", "metric", "event"]
    for name in names:
        deltas = [r[name] - r["t0"] for r in rows if name in r]
        if not deltas:
            continue
        if name == "metric":
            what = f"kill → /metrics, {source} source, {len(rows)} kills"
        elif name == "event":
            what = f"kill → Event at the API stand-in, {source} source, {len(rows)} kills"
        else:
            what = f"  ({source} run) kill → {name} reader sees the line"
        out.append(
            (
                "latency",
                what,
                f"p50 {statistics.median(deltas) * 1000:.0f} ms, "
                f"p99 {nearest_rank(deltas, 0.99) * 1000:.0f} ms, max {max(deltas) * 1000:.0f} ms",
                "target p99 < 500 ms" if name == "metric" else "-",
            )
        )
    return out


def bench_latency(
    kills: int, sources: list[str], events: bool = False
) -> list[tuple[str, str, str, str]]:
    import realkernel

    journald = realkernel.ensure_journald()
    rows: list[tuple[str, str, str, str]] = []
    try:
        for source in sources:
            rows += summarize(source, measure(source, kills, journald, events))
    finally:
        if journald.started:
            journald.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--source", action="append", choices=["journal", "kmsg"])
    parser.add_argument(
        "--events",
        action="store_true",
        help="the agent writes Events to tests/kube_standin.py's API stand-in; also kill → Event",
    )
    args = parser.parse_args()
    for row in bench_latency(args.kills, args.source or ["journal", "kmsg"], args.events):
        print(" | ".join(row))


if __name__ == "__main__":
    main()
