"""What the node checks cost: one run of each collector on a node-shaped namespace, the
kernel-log reader with the conntrack observer's keyword added to its prefilter, and the
memory the netlink reads add.

    sudo .venv/bin/python bench/node_checks.py [--rounds 7] [--entries 300000] [--pods 60]

Collectors run against a throwaway network namespace holding ``--pods`` veth pairs on a
bridge, two vxlan links and a conntrack table of ``--pods`` x 1,000 real entries; the
baseline is the existing ``vxlan`` collector on the same namespace. The journal figures are
rounds of ``JournalSource(D).records(prefilter) + OomAssembler`` on the noise journal of
``bench/journal.py``, with the OOM assembler's prefilter alone (baseline) and with the
conntrack keyword added as ``KernelWatch`` adds it. Medians of interleaved rounds [best].
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def node_namespace(pods: int) -> str:
    name = f"nodediag-bench-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    ip("-n", name, "link", "add", "cni0", "type", "bridge")
    for i in range(pods):
        ip("-n", name, "link", "add", f"veth{i}", "type", "veth", "peer", "name", f"p{i}")
        ip("-n", name, "link", "set", f"veth{i}", "master", "cni0")
    ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "uplink")
    ip("-n", name, "addr", "add", "192.0.2.1/24", "dev", "eth0")
    ip("-n", name, "link", "set", "eth0", "up")
    ip("-n", name, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport", "8472",
       "dev", "eth0")  # fmt: skip
    ip("-n", name, "link", "add", "vxlan.calico", "type", "vxlan", "id", "4096", "dstport",
       "4789", "remote", "192.0.2.9")  # fmt: skip
    return name


def timed(func: Callable[[], object], rounds: int) -> tuple[float, float]:
    values = []
    for _ in range(rounds):
        started = time.perf_counter()
        func()
        values.append(time.perf_counter() - started)
    return statistics.median(values), min(values)


def bench_collectors(pods: int, rounds: int) -> list[tuple[str, str, str]]:
    import conntrack_fill
    from prometheus_client import CollectorRegistry

    from collectors.conntrack import ConntrackCollector
    from collectors.dns_probe import run_in_netns
    from collectors.node_sysctl import NodeSysctlCollector
    from collectors.overlay_mtu import OverlayMtuCollector
    from collectors.vxlan import VxlanCollector

    name = node_namespace(pods)
    try:
        entries = run_in_netns(name, lambda: conntrack_fill.fill(pods * 1000))
        registry = CollectorRegistry()
        collectors = {
            "vxlan (baseline)": VxlanCollector("n", registry, netns=name),
            f"conntrack ({entries:,} entries)": ConntrackCollector("n", registry, netns=name),
            "node_sysctl": NodeSysctlCollector("n", registry, netns=name),
            "overlay_mtu": OverlayMtuCollector("n", registry, netns=name),
        }
        for collector in collectors.values():
            collector.collect()  # imports, first netlink socket
        timings = {label: timed(c.collect, rounds) for label, c in collectors.items()}
        base = timings["vxlan (baseline)"][0]
        rows = []
        for label, (median, best) in timings.items():
            rows.append(
                (label, f"{median * 1000:.1f} ms [{best * 1000:.1f}]", f"{median / base:.2f}")
            )
        return rows
    finally:
        ip("netns", "del", name)


def bench_journal(entries: int, rounds: int) -> list[tuple[str, str, str]]:
    import journal as journal_bench

    from collectors.conntrack import TABLE_FULL_WORDS
    from collectors.journal import JournalSource
    from collectors.oom import OomAssembler

    directory = Path(tempfile.mkdtemp(prefix="nodediag-bench-nc-"))
    try:
        messages, _ = journal_bench.kernel_messages(entries)
        path = journal_bench.make_journal(directory, messages)

        def read(extra: tuple[bytes, ...]) -> float:
            source = JournalSource(path)
            source._reader.seek_head()
            assembler = OomAssembler()
            combined: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}

            def prefilter() -> tuple[bytes, ...] | None:
                words = assembler.prefilter()
                if words is None or not extra:
                    return words
                return combined.setdefault(words, words + extra)

            started = time.perf_counter()
            for record in source.records(prefilter):
                assembler.feed(record)
            source.close()
            return time.perf_counter() - started

        plain, with_ct = [], []
        for _ in range(rounds):
            plain.append(read(()))
            with_ct.append(read(TABLE_FULL_WORDS))
        base = statistics.median(plain)
        rows = []
        for label, values in (("OOM prefilter (baseline)", plain), ("+ b'table full'", with_ct)):
            median = statistics.median(values)
            rows.append(
                (
                    f"journal, {len(messages):,} noise entries: {label}",
                    f"{len(messages) / median:,.0f} entries/s [{len(messages) / min(values):,.0f}]",
                    f"{median / base:.2f}",
                )
            )
        return rows
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def rss_after(code: str) -> int:
    """Peak RSS (KiB, VmHWM: ru_maxrss would keep the forking parent's) of a fresh
    interpreter running ``code``."""
    script = f"import sys; sys.path[:0] = {[str(REPO)]!r}\n{code}\n" + (
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


def bench_memory() -> list[tuple[str, str, str]]:
    setup = (
        "from prometheus_client import CollectorRegistry\n"
        "from collectors.conntrack import ConntrackCollector\n"
        "from collectors.resolver import ResolverCollector\n"
        "r = CollectorRegistry()\n"
    )
    base = rss_after(
        setup + "ConntrackCollector('n', r).collect(); ResolverCollector('n', r).collect()"
    )
    links = rss_after(
        setup + "from collectors.node_sysctl import NodeSysctlCollector\n"
        "NodeSysctlCollector('n', r).collect()"
    )
    return [
        (
            "peak RSS: conntrack + resolver collectors, one run (baseline)",
            f"{base / 1024:.1f} MiB",
            "1.00",
        ),
        (
            "peak RSS: + node_sysctl (pyroute2 netlink reads)",
            f"{links / 1024:.1f} MiB",
            f"{links / base:.2f}",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--entries", type=int, default=300_000)
    parser.add_argument("--pods", type=int, default=60)
    args = parser.parse_args()
    rows = bench_collectors(args.pods, args.rounds)
    rows += bench_journal(args.entries, args.rounds)
    rows += bench_memory()
    print("| what | measured | time (or RSS) ratio to baseline |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
