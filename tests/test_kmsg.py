"""/dev/kmsg records: parsing, and the source on a record-per-read socket standing in for
the device (the real device is read in tests/test_agent_live.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from collectors.kmsg import KmsgSource, parse_kmsg_record

BOOT = "b55f8258-ecd0-47fc-a01f-7202ea386096"


def test_parse_record_with_dictionary_lines() -> None:
    raw = b"6,1234,37449785,-,caller=T1796;Memory cgroup out of memory: Killed\n SUBSYSTEM=x\n"
    record = parse_kmsg_record(raw)
    assert record is not None
    assert (record.facility, record.level, record.seq, record.usec) == (0, 6, 1234, 37449785)
    assert record.message == "Memory cgroup out of memory: Killed"


def test_parse_unescapes_and_rejects_garbage() -> None:
    record = parse_kmsg_record(b"4,1,2,-;tab\\x09here")
    assert record is not None and record.message == "tab\there"
    assert parse_kmsg_record(b"not a record") is None
    assert parse_kmsg_record(b"") is None
    assert parse_kmsg_record(b"\xff\xfe;;;") is None


@pytest.fixture
def device(tmp_path: Path) -> Iterator[tuple[socket.socket, KmsgSource]]:
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reader.setblocking(False)
    boot_id = tmp_path / "boot_id"
    boot_id.write_text(BOOT + "\n")
    source = KmsgSource(
        tmp_path / "kmsg",
        boot_id_path=boot_id,
        boot_time=lambda: 1_700_000_000.0,
        open_device=lambda _path, _flags: reader.fileno(),
    )
    yield writer, source
    reader.close()
    writer.close()


def test_source_yields_kernel_records_and_counts_gaps(
    device: tuple[socket.socket, KmsgSource],
) -> None:
    writer, source = device
    for raw in (b"6,10,1000000,-;one", b"14,11,1000001,-;from userspace", b"6,15,2000000,-;two"):
        writer.send(raw)
    source.start()
    records = list(source.records())
    assert [r.message for r in records] == ["one", "two"]
    assert records[1].uptime == 2.0
    assert records[1].time is not None and records[1].time.timestamp() == 1_700_000_002.0
    assert records[1].position == f"{BOOT}:15"
    assert source.lost_records == 3  # seq 12, 13, 14 were overwritten
    assert source.position() == f"{BOOT}:15"


def test_resume_skips_what_was_read_in_the_same_boot(
    device: tuple[socket.socket, KmsgSource],
) -> None:
    writer, source = device
    for seq in (1, 2, 3):
        writer.send(f"6,{seq},{seq},-;r{seq}".encode())
    source.start(resume=f"{BOOT}:2")
    assert [r.message for r in source.records()] == ["r3"]
    assert source.lost_records == 0


def test_resume_from_another_boot_reads_everything(
    device: tuple[socket.socket, KmsgSource],
) -> None:
    writer, source = device
    writer.send(b"6,1,1,-;r1")
    source.start(resume="old-boot:900")
    assert [r.message for r in source.records()] == ["r1"]


def test_record_with_a_time_no_datetime_holds_has_no_wall_time(
    device: tuple[socket.socket, KmsgSource],
) -> None:
    writer, source = device
    writer.send(b"6,1,99999999999999999999,-;damaged usec")
    writer.send(b"6,2,1000000,-;next")
    source.start()
    records = list(source.records())
    assert [r.message for r in records] == ["damaged usec", "next"]
    assert records[0].time is None and records[1].time is not None
