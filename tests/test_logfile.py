"""Kernel log text from support bundles → records (collectors.logfile).

The ``tests/vectors/oom_*.log`` files are real output of one machine around one real
memory-cgroup OOM kill: ``dmesg``, ``dmesg -x``, ``dmesg -T``, ``journalctl -k -o
short|short-precise|short-iso|short-iso-precise|short-monotonic|short-full|short-unix``
(systemd 252) and a raw ``/dev/kmsg`` dump. short-full and short-unix count as journal-iso,
short-monotonic as dmesg. ``oom_journal_short_no_hostname.log`` (``--no-hostname``) and
``oom_syslog_no_hostname.log`` (syslog's "<date> kernel: [uptime] message") were made from
``oom_journal_short.log`` and ``oom_dmesg.log`` by dropping / adding those prefixes.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collectors.logfile import (
    MAX_LINE_LENGTH,
    LogReading,
    detect_format,
    parse_kernel_log_text,
    read_kernel_log_file,
)
from collectors.records import KernelRecord

VECTORS = Path(__file__).parent / "vectors"

TRIGGER = "python3 invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0"
KILLED = (
    "Memory cgroup out of memory: Killed process 1796 (python3) total-vm:221368kB,"
    " anon-rss:50816kB, file-rss:6716kB, shmem-rss:0kB, UID:0 pgtables:160kB oom_score_adj:0"
)
CONTAINER = "0123456789abcdef" * 4
MEMCG = f"/kubepods/burstable/pod11112222-3333-4444-5555-666677778888/{CONTAINER}"
TASK_ROW = (
    "[   1796]     0  1796    55342    14383    12704     1679         0   163840        0"
    "             0 python3"
)
JOURNAL_TIME = datetime(2026, 11, 25, 7, 41, 49, tzinfo=UTC)


def parse(text: str, *, year: int | None = None) -> list[KernelRecord]:
    return list(parse_kernel_log_text(text.splitlines(), year=year))


def messages(text: str) -> list[str]:
    return [record.message for record in parse(text)]


def read_vector(name: str) -> list[KernelRecord]:
    path = VECTORS / name
    return list(parse_kernel_log_text(path.read_text().splitlines(), year=2026))


def by_message(records: list[KernelRecord], prefix: str) -> KernelRecord:
    return next(record for record in records if record.message.startswith(prefix))


# --- the real vectors --------------------------------------------------------------------

VECTOR_FORMATS = [
    ("oom_dmesg.log", "dmesg", 85),
    ("oom_dmesg_x.log", "dmesg", 85),  # 86 lines, one syslog-facility record skipped
    ("oom_dmesg_T.log", "dmesg-T", 85),
    ("oom_journal_short.log", "journal-short", 85),
    ("oom_journal_short_precise.log", "journal-short", 85),
    ("oom_journal_short_iso.log", "journal-iso", 85),
    ("oom_journal_short_iso_precise.log", "journal-iso", 85),
    ("oom_journal_short_full.log", "journal-iso", 85),
    ("oom_journal_short_unix.log", "journal-iso", 85),
    ("oom_journal_short_no_hostname.log", "journal-short", 85),  # --no-hostname
    ("oom_syslog_no_hostname.log", "journal-short", 85),  # syslog, "kernel: [uptime] …"
    ("oom_journal_short_monotonic.log", "dmesg", 85),
    ("oom_kmsg.log", "kmsg", 89),  # 98 lines: 8 continuation lines, 1 userspace record
]


@pytest.mark.parametrize(("name", "expected_format", "expected_count"), VECTOR_FORMATS)
def test_vector_format_and_record_count(
    name: str, expected_format: str, expected_count: int
) -> None:
    lines = (VECTORS / name).read_text().splitlines()
    assert detect_format(lines[:20]) == expected_format
    assert len(read_vector(name)) == expected_count


@pytest.mark.parametrize("name", [name for name, _, _ in VECTOR_FORMATS])
def test_vector_oom_messages_come_out_unchanged(name: str) -> None:
    records = read_vector(name)
    found = [record.message for record in records]
    assert TRIGGER in found
    assert KILLED in found
    assert TASK_ROW in found  # "[   1796]" is a task table row, not a timestamp
    assert " <TASK>" in found  # the kernel's leading space is kept
    assert f"Memory cgroup stats for {MEMCG}:" in found
    oom_kill = by_message(records, "oom-kill:")
    assert f"task_memcg={MEMCG},task=python3,pid=1796,uid=0" in oom_kill.message
    assert by_message(records, "CPU: 1 UID: 0").message.endswith("PREEMPT(none) ")


@pytest.mark.parametrize(
    "name",
    ["oom_dmesg.log", "oom_dmesg_x.log", "oom_journal_short_monotonic.log", "oom_kmsg.log"],
)
def test_uptime_formats(name: str) -> None:
    records = read_vector(name)
    assert by_message(records, TRIGGER).uptime == pytest.approx(37.449169)
    assert by_message(records, KILLED).uptime == pytest.approx(37.449785)
    assert all(record.time is None for record in records)


def test_dmesg_positions_are_line_numbers() -> None:
    records = read_vector("oom_dmesg.log")
    assert [record.position for record in records[:3]] == ["line 1", "line 2", "line 3"]
    assert by_message(records, TRIGGER).position == "line 6"


def test_dmesg_t_has_utc_time_and_no_uptime() -> None:
    records = read_vector("oom_dmesg_T.log")
    trigger = by_message(records, TRIGGER)
    assert trigger.time == datetime(2026, 11, 25, 7, 41, 45, tzinfo=UTC)
    assert trigger.time is not None and trigger.time.tzinfo is UTC
    assert trigger.uptime is None


@pytest.mark.parametrize(
    ("name", "microsecond"),
    [
        ("oom_journal_short.log", 0),
        ("oom_journal_short_precise.log", 236982),
        ("oom_journal_short_iso.log", 0),
        ("oom_journal_short_iso_precise.log", 236982),
        ("oom_journal_short_full.log", 0),
        ("oom_journal_short_unix.log", 236982),
    ],
)
def test_journal_wall_clock_formats(name: str, microsecond: int) -> None:
    trigger = by_message(read_vector(name), TRIGGER)
    assert trigger.time == JOURNAL_TIME.replace(microsecond=microsecond)
    assert trigger.uptime is None
    assert trigger.position == "line 6"


def test_kmsg_vector() -> None:
    records = read_vector("oom_kmsg.log")
    assert records[0] == KernelRecord(
        "acpi PNP0A08:00: _OSC: OS supports [ExtendedConfig ASPM ClockPM Segments MSI HPX-Type3]",
        uptime=0.182302,
        position="seq 190",
    )
    assert not any("SUBSYSTEM=" in record.message for record in records)
    assert not any("systemd-journald" in record.message for record in records)
    assert by_message(records, KILLED).position == "seq 418"


# --- each format, line by line -----------------------------------------------------------


def test_kmsg_fields() -> None:
    text = "4,1234,37449169,-;message; with; semicolons\n6,1235,1,c,caller=T12;next"
    assert parse(text) == [
        KernelRecord("message; with; semicolons", uptime=37.449169, position="seq 1234"),
        KernelRecord("next", uptime=0.000001, position="seq 1235"),
    ]


def test_kmsg_skips_userspace_facilities_and_continuations() -> None:
    text = "\n".join(
        [
            "6,1,100,-;kernel one",
            " SUBSYSTEM=pci",
            " DEVICE=+pci:0000:00:01.0",
            "14,2,200,-;written by a user into /dev/kmsg",
            " SUBSYSTEM=ignored-too",
            "30,3,300,-;systemd[1]: daemon facility",
            "7,4,400,-;kernel two",
        ]
    )
    assert messages(text) == ["kernel one", "kernel two"]


def test_dmesg_line() -> None:
    assert parse("[   37.449169] python3 invoked oom-killer") == [
        KernelRecord("python3 invoked oom-killer", uptime=37.449169, position="line 1")
    ]


def test_dmesg_x_keeps_kernel_facility_only() -> None:
    text = (
        "kern  :warn  : [   37.449169] kernel message\n"
        "user  :notice: [   38.000000] logger wrote this\n"
        "kern  :info  : no timestamp (dmesg -x -t)\n"
        "kern  :err   : [Wed Nov 25 07:41:49 2026] with -T"
    )
    assert parse(text) == [
        KernelRecord("kernel message", uptime=37.449169, position="line 1"),
        KernelRecord("no timestamp (dmesg -x -t)", position="line 3"),
        KernelRecord("with -T", time=JOURNAL_TIME, position="line 4"),
    ]


def test_dmesg_t_single_digit_day() -> None:
    (record,) = parse("[Thu Nov  5 07:41:49 2026] msg")
    assert record.time == datetime(2026, 11, 5, 7, 41, 49, tzinfo=UTC)


def test_journal_short_uses_given_year_as_utc() -> None:
    (record,) = parse("Nov 25 07:41:49.123456 worker-1 kernel: msg", year=2025)
    assert record == KernelRecord(
        "msg", time=datetime(2025, 11, 25, 7, 41, 49, 123456, tzinfo=UTC), position="line 1"
    )


def test_journal_short_without_year_has_no_time() -> None:
    (record,) = parse("Nov 25 07:41:49 worker-1 kernel: msg")
    assert record == KernelRecord("msg", position="line 1")


def test_journal_short_year_rolls_over_at_new_year() -> None:
    text = (
        "Dec 31 23:59:59 h kernel: old\n"
        "Jan  1 00:00:01 h kernel: new\n"
        "Dec 31 23:59:58 h kernel: clock went back"
    )
    years = [record.time.year for record in parse(text, year=2025) if record.time]
    assert years == [2025, 2026, 2026]


def test_journal_short_impossible_date_keeps_the_record() -> None:
    (record,) = parse("Feb 30 07:41:49 h kernel: msg", year=2026)
    assert record == KernelRecord("msg", position="line 1")


def test_journal_iso_offsets() -> None:
    text = (
        "2026-11-25T07:41:49+0000 h kernel: a\n"
        "2026-11-25T08:41:49.5+01:00 h kernel: b\n"
        "2026-11-25T07:41:49Z h kernel: c"
    )
    times = [record.time for record in parse(text)]
    assert times == [JOURNAL_TIME, JOURNAL_TIME + timedelta(seconds=0.5), JOURNAL_TIME]
    assert times[1] is not None
    assert times[1].utcoffset() == timedelta(hours=1)


def test_journal_full_zone_names() -> None:
    text = (
        "Wed 2026-11-25 07:41:49 UTC h kernel: utc\n"
        "Wed 2026-11-25 08:41:49 +0100 h kernel: offset\n"
        "Wed 2026-11-25 08:41:49 CET h kernel: ambiguous name"
    )
    assert [record.time for record in parse(text)] == [JOURNAL_TIME, JOURNAL_TIME, None]


def test_journal_skips_markers_and_other_identifiers() -> None:
    text = "\n".join(
        [
            "-- Logs begin at Wed 2026-11-25 07:41:49 UTC, end at Wed 2026-11-25 08:00:00 UTC. --",
            "-- Boot 3d12b55f8258ecd047fca01f7202ea38 --",
            "Nov 25 07:41:49 h kernel: kept",
            "Nov 25 07:41:50 h systemd[1]: Started something.",
            "Nov 25 07:41:50 h systemd-journald[1880]: Journal started",
            "-- Reboot --",
            "-- No entries --",
        ]
    )
    assert parse(text, year=2026) == [KernelRecord("kept", time=JOURNAL_TIME, position="line 3")]


def test_journal_embedded_dmesg_stamp_becomes_uptime() -> None:
    (record,) = parse("Nov 25 07:41:49 h kernel: [   37.449169] python3 invoked", year=2026)
    assert record == KernelRecord(
        "python3 invoked", time=JOURNAL_TIME, uptime=37.449169, position="line 1"
    )


def test_journal_brackets_that_are_not_stamps_stay() -> None:
    text = "Nov 25 07:41:49 h kernel: [Firmware Bug]: TSC doesn't count\n"
    text += "2026-11-25T07:41:49+0000 h kernel: [  pid  ]   uid  tgid"
    assert messages(text) == ["[Firmware Bug]: TSC doesn't count", "[  pid  ]   uid  tgid"]


def test_short_monotonic_host_and_tag_are_removed() -> None:
    (record,) = parse("[   37.449169] worker-1 kernel: msg")
    assert record == KernelRecord("msg", uptime=37.449169, position="line 1")


def test_plain_lines_are_kept_as_they_are() -> None:
    text = "python3 invoked oom-killer: gfp_mask=0xcc0\n  indented line\n[not a stamp] x"
    assert parse(text) == [
        KernelRecord("python3 invoked oom-killer: gfp_mask=0xcc0", position="line 1"),
        KernelRecord("  indented line", position="line 2"),
        KernelRecord("[not a stamp] x", position="line 3"),
    ]


# --- detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("4,1234,37449169,-;message", "kmsg"),
        ("[   37.449169] message", "dmesg"),
        ("kern  :warn  : [   37.449169] msg", "dmesg"),
        ("[Wed Nov 25 07:41:49 2026] message", "dmesg-T"),
        ("Nov 25 07:41:49 hostname kernel: message", "journal-short"),
        ("Nov 25 07:41:49.123456 hostname kernel: message", "journal-short"),
        ("2026-11-25T07:41:49+0000 hostname kernel: message", "journal-iso"),
        ("2026-11-25T07:41:49.123456+00:00 hostname kernel: message", "journal-iso"),
        ("Wed 2026-11-25 07:41:49 UTC hostname kernel: message", "journal-iso"),
        ("1795592509.236982 hostname kernel: message", "journal-iso"),
        ("just some text", "plain"),
    ],
)
def test_detect_format(line: str, expected: str) -> None:
    assert detect_format([line]) == expected


def test_detect_skips_empty_lines_headers_and_continuations() -> None:
    sample = ["", "-- Boot 3d12 --", "   ", " SUBSYSTEM=pci", "Nov 25 07:41:49 h kernel: x"]
    assert detect_format(sample) == "journal-short"


def test_detect_takes_the_majority_and_ignores_plain_lines() -> None:
    sample = ["noise", "[ 1.000000] a", "6,1,0,-;b", "[ 2.000000] c", "more noise"]
    assert detect_format(sample) == "dmesg"


def test_detect_empty_sample_is_plain() -> None:
    assert detect_format([]) == "plain"
    assert detect_format(["", "\r\n"]) == "plain"


# --- mixed and damaged input -------------------------------------------------------------


def test_mixed_formats_fall_back_line_by_line() -> None:
    text = "\n".join(
        [
            "[   1.000000] dmesg",
            "6,7,2000000,-;kmsg",
            " SUBSYSTEM=dropped",
            "[Wed Nov 25 07:41:49 2026] dmesg -T",
            "Nov 25 07:41:49 h kernel: journal",
            "garbage \x00\x01 line",
        ]
    )
    reading = LogReading()
    assert list(parse_kernel_log_text(text.splitlines(), year=2026, reading=reading)) == [
        KernelRecord("dmesg", uptime=1.0, position="line 1"),
        KernelRecord("kmsg", uptime=2.0, position="seq 7"),
        KernelRecord("dmesg -T", time=JOURNAL_TIME, position="line 4"),
        KernelRecord("journal", time=JOURNAL_TIME, position="line 5"),
    ]
    assert (reading.not_understood, reading.not_understood_lines) == (1, [6])


def test_crlf_and_empty_lines() -> None:
    lines = ["[ 1.000000] a\r\n", "\r\n", "", "[ 2.000000] b\n"]
    assert [r.message for r in parse_kernel_log_text(lines)] == ["a", "b"]
    assert [r.position for r in parse_kernel_log_text(lines)] == ["line 1", "line 4"]


def test_long_line_is_truncated() -> None:
    (record,) = parse("[ 1.000000] " + "x" * (MAX_LINE_LENGTH * 3))
    assert record.uptime == 1.0
    assert len(record.message) == MAX_LINE_LENGTH - len("[ 1.000000] ")


def test_huge_numbers_do_not_raise() -> None:
    digits = "9" * 5000
    assert messages(f"{digits},1,1,-;x\n[ {digits}.5] y") == [
        f"{digits},1,1,-;x",
        f"[ {digits}.5] y",
    ]


# --- files -------------------------------------------------------------------------------


def set_mtime(path: Path, when: datetime) -> None:
    os.utime(path, (when.timestamp(), when.timestamp()))


def test_file_year_comes_from_mtime(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    path.write_text("Nov 25 07:41:49 h kernel: msg\n")
    set_mtime(path, datetime(2024, 12, 1, tzinfo=UTC))
    (record,) = read_kernel_log_file(path)
    assert record.time == datetime(2024, 11, 25, 7, 41, 49, tzinfo=UTC)


def test_file_spanning_new_year_dates_the_start_a_year_before_mtime(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    path.write_text("Dec 31 23:59:59 h kernel: old\nJan  1 00:00:01 h kernel: new\n")
    set_mtime(path, datetime(2026, 1, 2, tzinfo=UTC))
    times = [record.time for record in read_kernel_log_file(path)]
    assert times == [
        datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC),
    ]


def test_file_with_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "dmesg.log"
    path.write_bytes(b"[ 1.000000] bad \xff\xfe bytes\r\n[ 2.000000] caf\xc3\xa9\n")
    assert [record.message for record in read_kernel_log_file(path)] == [
        "bad \ufffd\ufffd bytes",
        "caf\u00e9",
    ]


def test_file_long_lines_are_cut_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "dmesg.log"
    long_line = b"[ 1.000000] " + b"y" * (MAX_LINE_LENGTH * 3)
    path.write_bytes(long_line + b"\n[ 2.000000] after\n" + b"z" * MAX_LINE_LENGTH + b"\n")
    reading = LogReading()
    records = list(read_kernel_log_file(path, reading=reading))
    assert [len(record.message.encode()) for record in records] == [
        MAX_LINE_LENGTH - len(b"[ 1.000000] "),
        len("after"),
    ]
    assert [record.position for record in records] == ["line 1", "line 2"]
    # The third line has no stamp in a dmesg file: not understood, skipped and counted.
    assert (reading.not_understood, reading.not_understood_lines) == (1, [3])


def test_vector_file_reads_like_text(tmp_path: Path) -> None:
    records = list(read_kernel_log_file(VECTORS / "oom_kmsg.log"))
    assert records == read_vector("oom_kmsg.log")


def test_non_utc_offsets_compare_equal_to_utc() -> None:
    (record,) = parse("2026-11-25T02:41:49-05:00 h kernel: m")
    assert record.time == JOURNAL_TIME
    assert record.time is not None
    assert record.time.utcoffset() == timezone(timedelta(hours=-5)).utcoffset(None)


# --- never raises ------------------------------------------------------------------------

LINE_STARTS = st.sampled_from(
    [
        "",
        " ",
        "4,1,1,-;",
        "46,1,1,-;",
        "[ 1.5] ",
        "[Wed Nov 25 07:41:49 2026] ",
        "[Sun Feb 31 99:99:99 0000] ",
        "kern  :warn  : ",
        "Nov 25 07:41:49 h kernel: ",
        "Feb 31 25:61:61.9 h kernel: [ 3.0] ",
        "2026-11-25T07:41:49+0000 h kernel: ",
        "9999-99-99T99:99:99+9999 h kernel: ",
        "Wed 2026-02-30 07:41:49 UTC h kernel: ",
        "99999999999.999999 h kernel: ",
        "-- ",
    ]
)


@given(st.lists(st.text()))
def test_never_raises_on_arbitrary_text(lines: list[str]) -> None:
    for record in parse_kernel_log_text(lines, year=2026):
        assert isinstance(record.message, str)


@given(st.lists(st.tuples(LINE_STARTS, st.text())), st.none() | st.integers(1, 9999))
def test_never_raises_on_almost_valid_lines(parts: list[tuple[str, str]], year: int | None) -> None:
    lines = [start + rest for start, rest in parts]
    records = list(parse_kernel_log_text(lines, year=year))
    assert len(records) <= len(lines)
    detect_format(lines)


# --- syslog without a host name, lines not understood, years -------------------------------


def test_syslog_without_hostname() -> None:
    text = (
        "Jan  5 15:19:27 kernel: [ 5864.708440] Memory cgroup out of memory: Killed process 1 (a)"
    )
    (record,) = parse(text, year=2015)
    assert record == KernelRecord(
        "Memory cgroup out of memory: Killed process 1 (a)",
        time=datetime(2015, 1, 5, 15, 19, 27, tzinfo=UTC),
        uptime=5864.70844,
        position="line 1",
    )


def test_no_hostname_report_lines_keep_their_colons() -> None:
    # "kernel: CPU: 1 …" is not host "kernel:" with identifier "CPU".
    text = "Jan  5 15:19:27 kernel: CPU: 1 PID: 7 Comm: a Not tainted\nJan  5 15:19:27 h kernel: x"
    assert messages(text) == ["CPU: 1 PID: 7 Comm: a Not tainted", "x"]


def test_line_not_understood_in_a_stamped_file_is_skipped_and_counted() -> None:
    text = "\n".join(
        ["Jan  5 15:19:27 h kernel: a"]
        + ["2015-01-05 15:19:27,123 h kernel: python3 invoked oom-killer: gfp_mask=0xcc0"] * 7
    )
    reading = LogReading()
    records = list(parse_kernel_log_text(text.splitlines(), year=2015, reading=reading))
    assert [r.message for r in records] == ["a"]
    assert (reading.not_understood, reading.not_understood_lines) == (7, [2, 3, 4, 5, 6])


def dated_file(tmp_path: Path, text: str, mtime: datetime) -> Path:
    path = tmp_path / "syslog"
    path.write_text(text)
    set_mtime(path, mtime)
    return path


def test_year_is_never_in_the_future(tmp_path: Path) -> None:
    # Read in February: a November stamp is last year's, not a date nine months ahead.
    path = dated_file(tmp_path, "Nov 25 07:41:49 h kernel: msg\n", datetime(2026, 2, 1, tzinfo=UTC))
    reading = LogReading()
    (record,) = read_kernel_log_file(path, reading=reading)
    assert record.time == datetime(2025, 11, 25, 7, 41, 49, tzinfo=UTC)
    assert record.year_inferred
    assert reading.year_source is not None and "mtime" in reading.year_source


def test_year_from_the_files_dated_lines(tmp_path: Path) -> None:
    text = (
        "[Mon Dec 28 10:00:00 2015] a\nDec 31 23:59:59 h kernel: b\nJan  5 15:19:27 h kernel: c\n"
    )
    path = dated_file(tmp_path, text, datetime(2026, 11, 30, tzinfo=UTC))
    reading = LogReading()
    times = [r.time for r in read_kernel_log_file(path, reading=reading)]
    assert times == [
        datetime(2015, 12, 28, 10, 0, tzinfo=UTC),
        datetime(2015, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2016, 1, 5, 15, 19, 27, tzinfo=UTC),
    ]
    assert reading.year_source == "inferred from the file's dated lines"


def test_given_year_is_not_inferred(tmp_path: Path) -> None:
    path = dated_file(tmp_path, "Jan  5 15:19:27 kernel: x\n", datetime(2026, 11, 30, tzinfo=UTC))
    (record,) = read_kernel_log_file(path, year=2015)
    assert record.time == datetime(2015, 1, 5, 15, 19, 27, tzinfo=UTC)
    assert not record.year_inferred


def test_stamps_with_a_year_are_not_inferred(tmp_path: Path) -> None:
    path = dated_file(tmp_path, "[ 1.000000] x\n", datetime(2026, 11, 30, tzinfo=UTC))
    reading = LogReading()
    (record,) = read_kernel_log_file(path, reading=reading)
    assert not record.year_inferred and reading.year_source is None
