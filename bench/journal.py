"""A large kernel journal for throughput benchmarks, built without touching the system journal.

Kernel records are written in the Journal Export Format and converted into a journal file
by ``systemd-journal-remote`` (Debian package ``systemd-journal-remote``). The records are
realistic node noise (veth/bridge, netfilter LOG, audit, ext4, the recorded noise vector)
with a real OOM report (tests/vectors/oom) every ``oom_every`` records.

With ``--report-heavy`` the journal is an OOM storm instead: real reports of several kernels
and formats (``REPORT_HEAVY_VECTORS``: call traces, registers, memcg stats, Mem-Info and
per-node lines, task tables, pre-5.0 "Task in"/"Kill process" lines) back to back with only
``--gap`` noise records between two reports (~90 % report lines), the kind of log the
prefilter cannot skip by itself. It also measures the parser alone on the same messages:
``OomAssembler.feed`` over in-memory ``KernelRecord`` objects vs. a bare Python loop over them.

    sudo .venv/bin/python bench/journal.py --entries 1000000 [--keep DIR]
    sudo .venv/bin/python bench/journal.py --report-heavy --entries 200000 [--gap 10]

Every figure is the median of ``--rounds`` interleaved rounds (best in brackets): the
machine may be shared.
"""

from __future__ import annotations

import argparse
import itertools
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VECTORS = REPO / "tests/vectors/oom"
JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
# The same kernel records the agent reads: JournalSource matches both fields.
KERNEL_MATCH = ["_TRANSPORT=kernel", "SYSLOG_FACILITY=0"]
# The reports of a report-heavy journal, in turn (each vector's kills = its "Killed process"
# lines): 6.18 memcg v1 (call trace, registers, memcg stats, 2-row table); 5.13 global
# (Mem-Info, per-node and swap lines, 25-row table); 6.18 two kills (names with spaces and
# parentheses); 4.8 memcg, two kills (pre-5.0 "Task in …", "Kill process … sacrifice child",
# oom_reaper); 3.10 global (RHEL 7: "[<addr>]" call trace, legacy choice line).
REPORT_HEAVY_VECTORS = (
    "memcg_6_18_kubepods_this_machine.log",
    "global_5_13_ubuntu_oomanalyser.log",
    "memcg_6_18_two_kills_spaces_commas_this_machine.log",
    "legacy_4_8_docker_two_kills_cadvisor.log",
    "global_3_10_rhel7_oomanalyser.log",
)
REPORT_GAP = 10  # noise records between two reports of a report-heavy journal
# dmesg's "[uptime]" (and "[ T123]" caller id) prefix; a task-table row ("[ 1381]     0 …")
# has no decimal point, so it keeps its pid.
_DMESG_PREFIX = re.compile(r"^\[\s*\d+\.\d+\](?:\[\s*[TC]\d+\])? ?")


def _messages(path: Path) -> list[str]:
    return [_DMESG_PREFIX.sub("", line) for line in path.read_text().splitlines() if line]


def _noise() -> Iterator[str]:
    recorded = _messages(VECTORS / "noise.log")
    for n in itertools.count():
        veth = f"veth{n * 2654435761 % 0xFFFFFFFF:08x}"
        port = n % 60 + 1
        yield recorded[n % len(recorded)]
        yield f"cni0: port {port}({veth}) entered blocking state"
        yield f"cni0: port {port}({veth}) entered forwarding state"
        yield (
            f"IPVS: rr: TCP 10.96.{n % 256}.{n * 7 % 256}:443 - no destination available"
            if n % 5 == 0
            else f"IN=eth0 OUT= MAC=52:54:00:12:34:56:52:54:00:ab:cd:ef:08:00 "
            f"SRC=10.244.{n % 256}.{n * 13 % 256} DST=10.244.0.1 LEN=60 TOS=0x00 PREC=0x00 "
            f"TTL=64 ID={n % 65536} DF PROTO=TCP SPT={30000 + n % 30000} DPT=10250 WINDOW=64240 "
            "RES=0x00 SYN URGP=0"
        )
        yield (
            f'audit: type=1400 audit({1_700_000_000 + n}.{n % 1000:03d}:{n}): apparmor="DENIED" '
            f'operation="open" profile="cri-containerd.apparmor.d" name="/proc/{n % 4096}/mem" '
            f'pid={n % 4_000_000} comm="runc:[2:INIT]" requested_mask="r" denied_mask="r"'
        )
        yield f"EXT4-fs (dm-{n % 8}): mounted filesystem with ordered data mode. Quota mode: none."


def kernel_messages(entries: int, oom_every: int = 10_000) -> tuple[list[str], int]:
    """``entries`` kernel messages and how many OOM reports (one kill each) are among them."""
    report = _messages(VECTORS / "memcg_6_18_kubepods_this_machine.log")
    noise = _noise()
    out: list[str] = []
    reports = 0
    while len(out) < entries:
        out.extend(itertools.islice(noise, oom_every - len(report)))
        if len(out) + len(report) <= entries:
            out.extend(report)
            reports += 1
    return out[:entries], reports


def report_heavy_messages(entries: int, gap: int = REPORT_GAP) -> tuple[list[str], int]:
    """``entries`` kernel messages of an OOM storm and how many kills are among them.

    The reports of ``REPORT_HEAVY_VECTORS`` in turn, ``gap`` noise records after each; the
    last report is left out if it does not fit whole.
    """
    reports = [_messages(VECTORS / name) for name in REPORT_HEAVY_VECTORS]
    kills_of = [sum("Killed process" in m for m in report) for report in reports]
    noise = _noise()
    out: list[str] = []
    kills = 0
    for report, report_kills in itertools.cycle(zip(reports, kills_of, strict=True)):
        if len(out) + len(report) > entries:
            break
        out.extend(report)
        kills += report_kills
        out.extend(itertools.islice(noise, min(gap, entries - len(out))))
    out.extend(itertools.islice(noise, entries - len(out)))
    return out, kills


def export_format(messages: list[str], boot_id: str, *, start_usec: int) -> Iterator[bytes]:
    """The messages as kernel entries in the Journal Export Format (text fields only)."""
    realtime = start_usec
    monotonic = 5_000_000_000
    for message in messages:
        realtime += 37
        monotonic += 37
        yield (
            f"__REALTIME_TIMESTAMP={realtime}\n__MONOTONIC_TIMESTAMP={monotonic}\n"
            f"_BOOT_ID={boot_id}\n_TRANSPORT=kernel\nSYSLOG_FACILITY=0\nPRIORITY=6\n"
            f"_SOURCE_MONOTONIC_TIMESTAMP={monotonic - 11}\nMESSAGE={message}\n\n"
        ).encode()


def make_journal(directory: Path, messages: list[str]) -> Path:
    """Convert ``messages`` into journal files in ``directory`` with systemd-journal-remote.

    It rotates ``bench.journal`` like journald does (``bench@….journal``, 100,000 entries
    each here): read the directory, like the host's journal directory.
    """
    if not Path(JOURNAL_REMOTE).exists():
        raise SystemExit(f"{JOURNAL_REMOTE} missing: apt-get install systemd-journal-remote")
    output = directory / "bench.journal"
    for old in directory.glob("bench*.journal"):
        old.unlink()
    proc = subprocess.Popen(
        [JOURNAL_REMOTE, f"--output={output}", "--split-mode=none", "--compress=no", "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    boot_id = uuid.uuid4().hex
    start = int(time.time() * 1e6) - 37 * len(messages) - 1_000_000
    chunk: list[bytes] = []
    for entry in export_format(messages, boot_id, start_usec=start):
        chunk.append(entry)
        if len(chunk) == 10_000:
            proc.stdin.write(b"".join(chunk))
            chunk.clear()
    proc.stdin.write(b"".join(chunk))
    proc.stdin.close()
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait() != 0 or not output.exists():
        raise RuntimeError(f"systemd-journal-remote failed: {err.decode(errors='replace')}")
    return directory


def oom_prefilter(assembler: object) -> Callable[[], tuple[bytes, ...] | None]:
    """The assembler's own fast path as a ``JournalSource.records`` prefilter: with no report
    open, only a record with ``oom`` or ``Kill`` in it can start, end or extend a kill."""
    from collectors.oom import OomAssembler

    assert isinstance(assembler, OomAssembler)
    own = getattr(assembler, "prefilter", None)
    if callable(own):
        return own  # type: ignore[no-any-return]
    keywords = (b"oom", b"Kill")

    def prefilter() -> tuple[bytes, ...] | None:
        return None if assembler.reading_report else keywords

    return prefilter


def read_with_agent(path: Path, *, prefilter: bool = True) -> tuple[int, int, float, float]:
    """(entries, kills, seconds, CPU seconds): JournalSource + OomAssembler over the journal."""
    from collectors.journal import JournalSource
    from collectors.oom import OomAssembler

    source = JournalSource(path)
    source._reader.seek_head()  # every boot in it
    assembler = OomAssembler()
    wanted = oom_prefilter(assembler) if prefilter else None
    started = time.perf_counter()
    cpu = time.process_time()
    passed = 0
    kills = 0
    feed = assembler.feed
    for record in source.records(wanted):
        passed += 1
        kills += len(feed(record))
    kills += len(assembler.flush(final=True))
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    entries = passed + source.skipped
    source.close()
    return entries, kills, seconds, cpu


def read_messages_only(path: Path) -> float:
    """Seconds to step over every kernel entry and fetch its MESSAGE, nothing else: the floor
    of any reader in Python (sd-journal's own cost, about what journalctl's is in C)."""
    from collectors.journal import open_reader

    reader = open_reader(path)
    reader.seek_head()
    next_entry, get = reader._next, reader._get
    started = time.perf_counter()
    while next_entry():
        get("MESSAGE")
    seconds = time.perf_counter() - started
    reader.close()
    return seconds


def read_with_journalctl(path: Path) -> tuple[float, float]:
    """(seconds, CPU seconds) for journalctl printing the kernel entries to /dev/null."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        ["journalctl", f"--directory={path}", *KERNEL_MATCH, "-o", "cat", "--no-pager"],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def count_journalctl(path: Path) -> int:
    out = subprocess.run(
        ["journalctl", f"--directory={path}", *KERNEL_MATCH, "-o", "cat", "--no-pager"],
        stdout=subprocess.PIPE,
        check=True,
    ).stdout
    return out.count(b"\n")


def _median_best(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), min(values)


def bench_parser(
    messages: list[str], expected_kills: int, rounds: int = 5
) -> list[tuple[str, str, str, str]]:
    """``OomAssembler.feed`` over in-memory records vs. a bare Python loop over the same ones
    (the floor of any per-line work in Python); interleaved rounds, medians."""
    from collectors.oom import OomAssembler
    from collectors.records import KernelRecord

    records = [KernelRecord(m) for m in messages]
    lines = len(records)
    floors, parses = [], []
    kills = 0
    for _ in range(rounds):
        started = time.perf_counter()
        total = 0
        for record in records:
            total += len(record.message)
        floors.append(time.perf_counter() - started)
        assembler = OomAssembler()
        feed = assembler.feed
        started = time.perf_counter()
        kills = 0
        for record in records:
            kills += len(feed(record))
        kills += len(assembler.flush(final=True))
        parses.append(time.perf_counter() - started)
        if kills != expected_kills:
            raise RuntimeError(f"mismatch: {kills} kills parsed, {expected_kills} in the input")
    floor, floor_best = _median_best(floors)
    parse, parse_best = _median_best(parses)
    return [
        (
            "parser",
            f"bare loop over {lines:,} in-memory records (baseline)",
            f"{lines / floor:,.0f} lines/s [{lines / floor_best:,.0f}], "
            f"{floor / lines * 1e6:.3f} µs/line",
            "1.00",
        ),
        (
            "parser",
            f"OomAssembler.feed, same records ({kills} kills)",
            f"{lines / parse:,.0f} lines/s [{lines / parse_best:,.0f}], "
            f"{parse / lines * 1e6:.3f} µs/line",
            f"{floor / parse:.3f}",
        ),
    ]


def bench_journal_file(
    entries: int,
    keep: Path | None = None,
    rounds: int = 5,
    *,
    reuse: bool = False,
    report_heavy: bool = False,
    gap: int = REPORT_GAP,
) -> list[tuple[str, str, str, str]]:
    directory = keep or Path(tempfile.mkdtemp(prefix="nodediag-bench-journal-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if report_heavy:
            messages, reports = report_heavy_messages(entries, gap)
            kind = f"report-heavy (gap {gap})"
        else:
            messages, reports = kernel_messages(entries)
            kind = "noise"
        rows = bench_parser(messages, reports, rounds) if report_heavy else []
        # A journal in --keep is reused only if it was built with the same parameters.
        params = f"{kind} {entries}\n"
        marker = directory / "bench.params"
        started = time.perf_counter()
        if (
            reuse
            and any(directory.glob("bench*.journal"))
            and marker.exists()
            and marker.read_text() == params
        ):
            path = directory
        else:
            marker.unlink(missing_ok=True)
            path = make_journal(directory, messages)
            marker.write_text(params)
        built = time.perf_counter() - started
        del messages
        in_file = count_journalctl(path)
        # Interleaved rounds (the machine may be shared); the journal is in the page cache
        # for all of them.
        bases, runs, floors = [], [], []
        for _ in range(rounds):
            bases.append(read_with_journalctl(path))
            runs.append(read_with_agent(path))
            if report_heavy:
                floors.append(read_messages_only(path))
        base, base_best = _median_best([b[0] for b in bases])
        base_cpu = statistics.median(b[1] for b in bases)
        seen, kills = runs[0][:2]
        agent, agent_best = _median_best([r[2] for r in runs])
        agent_cpu = statistics.median(r[3] for r in runs)
        plain = read_with_agent(path, prefilter=False)
        if seen != in_file or kills != reports or plain[:2] != (in_file, reports):
            raise RuntimeError(
                f"mismatch: file {in_file} entries/{reports} kills, agent {seen}/{kills}, "
                f"unfiltered {plain[0]}/{plain[1]}"
            )
        size = sum(f.stat().st_size for f in path.glob("*.journal")) / 2**20
        rows += [
            (
                "journal",
                f"{kind}: journalctl -D D {' '.join(KERNEL_MATCH)} -o cat > /dev/null "
                f"(baseline; {in_file:,} entries, {size:.0f} MiB, built in {built:.0f} s)",
                f"{in_file / base:,.0f} entries/s [{in_file / base_best:,.0f}] "
                f"({base:.2f} s wall, {base_cpu:.2f} s CPU)",
                "1.00 (CPU 1.00)",
            ),
            (
                "journal",
                f"{kind}: JournalSource(D).records(prefilter) + OomAssembler ({kills} kills)",
                f"{in_file / agent:,.0f} entries/s [{in_file / agent_best:,.0f}] "
                f"({agent:.2f} s wall, {agent_cpu:.2f} s CPU)",
                f"{base / agent:.2f} (CPU {base_cpu / agent_cpu:.2f})",
            ),
            (
                "journal",
                f"{kind}: JournalSource(D).records() + OomAssembler, no prefilter (1 round)",
                f"{in_file / plain[2]:,.0f} entries/s ({plain[2]:.2f} s wall, "
                f"{plain[3]:.2f} s CPU)",
                f"{base / plain[2]:.2f} (CPU {base_cpu / plain[3]:.2f})",
            ),
        ]
        if floors:
            floor, floor_best = _median_best(floors)
            rows.append(
                (
                    "journal",
                    f"{kind}: reader._next() + _get('MESSAGE') only, no record built (floor)",
                    f"{in_file / floor:,.0f} entries/s [{in_file / floor_best:,.0f}] "
                    f"({floor:.2f} s wall)",
                    f"{base / floor:.2f}",
                )
            )
        return rows
    finally:
        if keep is None:
            shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    import sys

    sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="build (and keep) the journal in this directory")
    parser.add_argument("--reuse", action="store_true", help="reuse the journal in --keep")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--report-heavy",
        action="store_true",
        help="an OOM storm: reports back to back (REPORT_HEAVY_VECTORS), and the parser alone",
    )
    parser.add_argument(
        "--gap", type=int, default=REPORT_GAP, help="--report-heavy: noise records per report"
    )
    args = parser.parse_args()
    rows = bench_journal_file(
        args.entries,
        args.keep,
        args.rounds,
        reuse=args.reuse,
        report_heavy=args.report_heavy,
        gap=args.gap,
    )
    for row in rows:
        print(" | ".join(row))


if __name__ == "__main__":
    main()
