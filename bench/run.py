"""Benchmarks: prints a table of throughput and latency, each against a baseline measured
in the same run.

    sudo .venv/bin/python bench/run.py [--kills N] [--lines N] [--entries N]

1. parser: the OOM assembler on in-memory kernel lines (noise with an OOM report every
   10,000 lines) vs. a bare Python loop over the same records (the floor of any per-line
   work in Python);
2. journal: the agent's journald source + assembler (with the assembler's prefilter) vs.
   ``journalctl -o cat`` writing the same kernel entries to /dev/null: over a generated
   journal of ``--entries`` kernel records (bench/journal.py, systemd-journal-remote), and
   over the local journal's kernel entries;
3. latency: real OOM kills (throwaway cgroups, tests/realkernel.py) → the counter rising on
   a running ``nodediag run``'s /metrics, for the journal and the kmsg source, with where
   the time goes (bench/latency.py; needs root);
4. enrichment: building one OOM finding with containerd lookups (a real containerd + runc,
   tests/realcontainerd.py: container labels uncached and cached, task state) vs. without.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bench.journal import bench_journal_file, oom_prefilter  # noqa: E402
from bench.latency import bench_latency  # noqa: E402
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
        ["journalctl", "_TRANSPORT=kernel", "SYSLOG_FACILITY=0", "-o", "cat", "--no-pager"],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    baseline = time.perf_counter() - started
    source = JournalSource(path)
    source.start()
    source._reader.seek_head()  # all boots, as journalctl reads them
    assembler = OomAssembler()
    started = time.perf_counter()
    entries = 0
    for record in source.records(oom_prefilter(assembler)):
        entries += 1
        assembler.feed(record)
    agent = time.perf_counter() - started
    entries += source.skipped
    source.close()
    return [
        (
            "journal",
            "local journal: journalctl _TRANSPORT=kernel SYSLOG_FACILITY=0 -o cat (baseline)",
            f"{entries / baseline:,.0f} entries/s",
            "1.00",
        ),
        (
            "journal",
            f"local journal: JournalSource + assembler ({entries} kernel entries)",
            f"{entries / agent:,.0f} entries/s",
            f"{baseline / agent:.2f}",
        ),
    ]


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
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    rows = bench_parser(args.lines) + bench_journal_file(args.entries) + bench_journal()
    if not args.skip_latency:
        rows += bench_latency(args.kills, ["journal", "kmsg"]) + bench_enrichment()
    header = ("bench", "what", "result", "ratio vs baseline")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
