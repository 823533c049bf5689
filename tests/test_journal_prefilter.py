"""JournalSource on real journal files made by systemd-journal-remote from export format.

Needs ``/lib/systemd/systemd-journal-remote`` (Debian package ``systemd-journal-remote``).
The prefilter of ``JournalSource.records`` must not change what the assembler finds, and
``wait`` (which steps onto a new entry itself) must lose no record and move no position.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import realkernel

from collectors.journal import JournalSource
from collectors.oom import OomAssembler, OomKill

JOURNAL_REMOTE = Path("/lib/systemd/systemd-journal-remote")
VECTORS = Path(__file__).parent / "vectors/oom"
_PREFIX = re.compile(r"^\[\s*\d+\.\d+\](?:\[\s*[TC]\d+\])? ?")
NOISE = [
    "cni0: port 3(veth1c2d3e4f) entered forwarding state",
    "IN=eth0 OUT= SRC=10.244.1.7 DST=10.244.0.1 LEN=60 PROTO=TCP SPT=40000 DPT=10250 SYN",
    "memory: usage 1kB, limit 2kB, failcnt 0",  # report-shaped, but no report is open
    "[ 1234]     0  1234    12345      100    65536        0             0 stray",
    'audit: type=1400 apparmor="DENIED" operation="open" name="/proc/1/mem" comm="bloom"',
]


def _vector(name: str) -> list[str]:
    return [_PREFIX.sub("", line) for line in (VECTORS / name).read_text().splitlines()]


def _messages() -> list[str]:
    out: list[str] = []
    for name in sorted(p.name for p in VECTORS.glob("*.log") if p.name != "noise.log"):
        out += NOISE * 20
        for line in _vector(name):
            out += [line, NOISE[len(out) % len(NOISE)]] if len(out) % 7 == 0 else [line]
    return out + NOISE


def _export(messages: list[str], *, facility: Callable[[int], str] = lambda _: "0") -> bytes:
    boot = uuid.uuid4().hex
    chunks = []
    for n, message in enumerate(messages):
        chunks.append(
            f"__REALTIME_TIMESTAMP={1_700_000_000_000_000 + n * 10}\n"
            f"__MONOTONIC_TIMESTAMP={1_000_000 + n * 10}\n_BOOT_ID={boot}\n"
            f"_TRANSPORT=kernel\nSYSLOG_FACILITY={facility(n)}\n"
            f"_SOURCE_MONOTONIC_TIMESTAMP={1_000_000 + n * 10 - 3}\nMESSAGE={message}\n\n"
        )
    return "".join(chunks).encode()


def _journal(directory: Path, export: bytes) -> Path:
    if not JOURNAL_REMOTE.exists():
        realkernel.skip_or_fail(f"no {JOURNAL_REMOTE} (Debian package systemd-journal-remote)")
    output = directory / "test.journal"
    subprocess.run(
        [str(JOURNAL_REMOTE), f"--output={output}", "--split-mode=none", "-"],
        input=export,
        check=True,
        capture_output=True,
    )
    return output


def _prefilter(assembler: OomAssembler) -> Callable[[], tuple[bytes, ...] | None]:
    keywords = (b"oom", b"Kill")
    return lambda: None if assembler.reading_report else keywords


def _read(path: Path, *, prefilter: bool) -> tuple[list[OomKill], JournalSource, int]:
    source = JournalSource(path)
    source._reader.seek_head()
    assembler = OomAssembler()
    kills: list[OomKill] = []
    handed_out = 0
    for record in source.records(_prefilter(assembler) if prefilter else None):
        handed_out += 1
        kills += assembler.feed(record)
    kills += assembler.flush(final=True)
    return kills, source, handed_out


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[str]]]:
    messages = _messages()
    yield _journal(tmp_path_factory.mktemp("journal"), _export(messages)), messages


def test_prefilter_finds_the_same_kills(journal: tuple[Path, list[str]]) -> None:
    path, messages = journal
    plain, plain_source, plain_count = _read(path, prefilter=False)
    filtered, source, count = _read(path, prefilter=True)
    assert len(plain) >= 10
    assert filtered == plain  # victims, memcgs, tables, times, uptimes and cursors alike
    assert plain_count == len(messages) and plain_source.skipped == 0
    assert count + source.skipped == len(messages)
    assert source.skipped > len(messages) // 3
    # After the last record (skipped or not) the position is the journal's last entry.
    assert source.position() == plain_source.position()
    assert source._reader.test_cursor(source.position())


def test_records_carry_time_and_kernel_uptime(journal: tuple[Path, list[str]]) -> None:
    path, messages = journal
    source = JournalSource(path)
    source._reader.seek_head()
    first = next(source.records())
    assert first.message == messages[0]
    assert first.uptime == pytest.approx((1_000_000 - 3) / 1e6)
    assert first.time is not None and first.time.timestamp() == pytest.approx(1_700_000_000)


def test_wait_keeps_the_entry_it_finds_for_records(tmp_path: Path) -> None:
    path = _journal(tmp_path, _export(["one", "two", "three"]))
    source = JournalSource(path)
    source._reader.seek_head()
    source.wait(5)  # an entry is there: returns at once, having stepped onto it
    assert source.position() is None  # nothing handed out yet
    records = source.records()
    assert next(records).message == "one"
    position = source.position()
    source.wait(5)
    assert source.position() == position  # stepping onto "two" did not move the position
    assert [r.message for r in records] == ["two", "three"]
    source.wait(0.05)  # nothing new: times out
    assert list(source.records()) == []


def test_forged_facility_is_not_read(tmp_path: Path) -> None:
    messages = ["kernel one", "forged", "kernel two"]
    path = _journal(tmp_path, _export(messages, facility=lambda n: "1" if n == 1 else "0"))
    source = JournalSource(path)
    source._reader.seek_head()
    assert [r.message for r in source.records()] == ["kernel one", "kernel two"]


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_caught_up_reader_is_reopened_at_its_cursor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After many entries the reader is reopened when caught up: its file mappings go, the
    position stays, nothing is read twice or lost."""
    import collectors.journal as journal_module

    messages = [f"line {n} " + "x" * 400 for n in range(20_000)]
    path = _journal(tmp_path, _export(messages))
    monkeypatch.setattr(journal_module, "REOPEN_AFTER", 5_000)
    source = JournalSource(path)
    source._reader.seek_head()
    records = source.records()
    first = [next(records).message for _ in range(4_000)]
    source.wait(0.01)  # 4,000 visited: below the threshold, an entry is there
    assert source.reopened == 0
    rest = [r.message for r in records]
    mapped = _rss_file_kib()
    position = source.position()
    source.wait(0.01)  # caught up with 20,000 visited: reopened
    assert source.reopened == 1
    assert source.position() == position
    assert _rss_file_kib() < mapped - 4_000  # the ~9 MB of entries read are unmapped
    assert first + rest == messages
    assert list(source.records()) == []


def test_reopen_resumes_after_skipped_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import collectors.journal as journal_module

    monkeypatch.setattr(journal_module, "REOPEN_AFTER", 10)
    path = _journal(tmp_path, _export([f"noise {n}" for n in range(30)] + ["oom-kill: last"]))
    source = JournalSource(path)
    source._reader.seek_head()
    assert [r.message for r in source.records(lambda: (b"oom",))] == ["oom-kill: last"]
    assert source.skipped == 30
    source.wait(0.01)
    assert source.reopened == 1
    assert list(source.records()) == []


def test_resume_at_a_vacuumed_entry_reads_the_next_file_from_its_first_entry(
    tmp_path: Path,
) -> None:
    """The state file's cursor names an entry whose file was deleted (rotated and vacuumed):
    reading resumes at the first entry still there, which is not lost, and the position
    stays the old cursor until a record is handed out."""
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = JournalSource(_journal(tmp_path / "old", _export(["e1", "e2", "e3"])))
    old._reader.seek_head()
    assert [r.message for r in old.records()] == ["e1", "e2", "e3"]
    cursor = old.position()
    assert cursor is not None
    later = _export(["f1", "f2", "f3"]).replace(b"=1700000000", b"=1700000001")
    source = JournalSource(_journal(tmp_path / "new", later))
    source.start(resume=cursor)
    assert source.position() == cursor
    assert [r.message for r in source.records()] == ["f1", "f2", "f3"]
