"""Benchmarks: prints a table of throughput and latency, each against a baseline measured
in the same run.

    sudo .venv/bin/python bench/run.py [--kills N] [--lines N]

1. parser: the OOM assembler on in-memory kernel lines (noise with an OOM report every
   10,000 lines) vs. a bare Python loop over the same records (the floor of any per-line
   work in Python);
2. journal: the agent's journald source + assembler over the local journal's kernel entries
   vs. ``journalctl -k -o cat`` writing them to /dev/null;
3. latency: real OOM kills (throwaway cgroups, tests/realkernel.py) → the counter rising on
   a running ``nodediag run``'s /metrics, for the journal and the kmsg source (needs root);
4. enrichment: building one OOM finding with containerd lookups (a real containerd + runc,
   tests/realcontainerd.py: container labels uncached and cached, task state) vs. without.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from collectors.journal import JournalSource, find_journal  # noqa: E402
from collectors.oom import OomAssembler  # noqa: E402
from collectors.records import KernelRecord  # noqa: E402

VECTORS = REPO / "tests/vectors/oom"


def _messages(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        out.append(line.split("] ", 1)[1] if line.startswith("[") and "] " in line else line)
    return out


def synthetic_log(lines: int) -> list[KernelRecord]:
    noise = itertools.cycle(_messages(VECTORS / "noise.log"))
    report = _messages(VECTORS / "memcg_6_18_kubepods_this_machine.log")
    records: list[KernelRecord] = []
    while len(records) < lines:
        records.extend(KernelRecord(next(noise)) for _ in range(10_000))
        records.extend(KernelRecord(m) for m in report)
    return records[:lines]


def bench_parser(lines: int) -> list[tuple[str, str, str, str]]:
    records = synthetic_log(lines)
    started = time.perf_counter()
    total = 0
    for record in records:
        total += len(record.message)
    floor = time.perf_counter() - started
    assembler = OomAssembler()
    started = time.perf_counter()
    kills = 0
    for record in records:
        kills += len(assembler.feed(record))
    kills += len(assembler.flush(final=True))
    parse = time.perf_counter() - started
    return [
        ("parser", "bare loop over records (baseline)", f"{lines / floor:,.0f} lines/s", "1.00"),
        (
            "parser",
            f"OomAssembler.feed ({kills} kills)",
            f"{lines / parse:,.0f} lines/s",
            f"{floor / parse:.2f}",
        ),
    ]


def bench_journal() -> list[tuple[str, str, str, str]]:
    path = find_journal(Path("/"), None)
    started = time.perf_counter()
    subprocess.run(
        ["journalctl", "-k", "-o", "cat", "--no-pager"], stdout=subprocess.DEVNULL, check=True
    )
    baseline = time.perf_counter() - started
    source = JournalSource(path)
    source.start()
    source._reader.seek_head()  # all boots, as journalctl -k reads them
    assembler = OomAssembler()
    started = time.perf_counter()
    entries = 0
    for record in source.records():
        entries += 1
        assembler.feed(record)
    agent = time.perf_counter() - started
    source.close()
    return [
        (
            "journal",
            "journalctl -k -o cat > /dev/null (baseline)",
            f"{entries / baseline:,.0f} entries/s",
            "1.00",
        ),
        (
            "journal",
            f"JournalSource + assembler ({entries} kernel entries)",
            f"{entries / agent:,.0f} entries/s",
            f"{baseline / agent:.2f}",
        ),
    ]


def bench_latency(kills: int) -> list[tuple[str, str, str, str]]:
    import realkernel
    from agentproc import RunningAgent

    journald = realkernel.ensure_journald()
    rows = []
    try:
        for source in ("journal", "kmsg"):
            latencies = _latencies(RunningAgent, realkernel, source, journald, kills)
            p50 = statistics.median(latencies)
            p99 = sorted(latencies)[max(0, round(0.99 * len(latencies)) - 1)]  # nearest rank
            rows.append(
                (
                    "latency",
                    f"kill → /metrics, {source} source, {kills} kills",
                    f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                    f"max {max(latencies) * 1000:.0f} ms",
                    "-",
                )
            )
    finally:
        if journald.started:
            journald.stop()
    return rows


def _latencies(
    agent_cls: type, realkernel: object, source: str, journald: object, kills: int
) -> list[float]:
    args = ["--kernel-log", source, "--state-dir", tempfile.mkdtemp(prefix="nodediag-bench-")]
    if source == "journal":
        args += ["--journal-path", str(journald.journal_dir)]  # type: ignore[attr-defined]
    agent = agent_cls(args)
    latencies: list[float] = []
    try:
        agent.wait_ready()
        for _ in range(kills):
            before = agent.metric("nodediag_oom_kills_total")
            with realkernel.ThrowawayContainer() as container:  # type: ignore[attr-defined]
                outcome = container.oom_kill("child")
                while agent.metric("nodediag_oom_kills_total") <= before:
                    if time.time() - outcome.killed_at > 10:
                        raise TimeoutError(agent.log())
                    time.sleep(0.005)
                latencies.append(time.time() - outcome.killed_at)
    finally:
        agent.stop()
    return latencies


def bench_enrichment(rounds: int = 200) -> list[tuple[str, str, str, str]]:
    import realcontainerd

    from agent.containers import ContainerLookup
    from agent.oom_findings import OomFindings
    from collectors.containerd import ContainerdClient
    from collectors.oom import OomKill, OomVictim

    with realcontainerd.Containerd() as cd:
        realcontainerd.import_busybox_image(cd)
        container = realcontainerd.run_container(cd, memory_limit=0)
        kill = OomKill(
            victim=OomVictim(pid=999_999, comm="w"), time=None, uptime=None, position=None,
            constraint="CONSTRAINT_MEMCG", is_global=False,
            oom_memcg=container.cgroup_path, task_memcg=container.cgroup_path,
        )  # fmt: skip

        def per_finding(builder: OomFindings, fresh: Callable[[], None]) -> float:
            started = time.perf_counter()
            for _ in range(rounds):
                fresh()
                builder.finding(kill)
            return (time.perf_counter() - started) / rounds

        plain = per_finding(OomFindings("n", live=None), lambda: None)
        client = ContainerdClient([cd.socket])
        lookup = OomFindings("n", live=None, containers=ContainerLookup(client))
        cached = per_finding(lookup, lambda: None)
        cold = per_finding(lookup, client._cache.clear)
        client.close()
        container.remove()
    return [
        ("enrichment", "finding without containerd (baseline)", f"{plain * 1e6:,.0f} µs", "1.00"),
        (
            "enrichment",
            "+ containerd task lookup, labels cached",
            f"{cached * 1e6:,.0f} µs",
            f"{plain / cached:.3f}",
        ),
        (
            "enrichment",
            "+ containerd task and labels lookups",
            f"{cold * 1e6:,.0f} µs",
            f"{plain / cold:.3f}",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    rows = bench_parser(args.lines) + bench_journal()
    if not args.skip_latency:
        rows += bench_latency(args.kills) + bench_enrichment()
    header = ("bench", "what", "result", "ratio vs baseline")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
