"""Kernel records from ``/dev/kmsg``: one record per ``read()``, ``EPIPE`` on overrun."""

from __future__ import annotations

import errno
import os
import re
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from collectors.kernel_log import KernelLogError
from collectors.records import KernelRecord

KERNEL_FACILITY = 0
READ_SIZE = 16384
# Bounded like collectors/logfile.py's: a longer number is no header (and could exceed
# int()'s digit limit).
_HEADER = re.compile(rb"^(?P<prio>\d{1,10}),(?P<seq>\d{1,20}),(?P<usec>\d{1,20}),[^;]*;")
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


@dataclass(frozen=True, slots=True)
class KmsgRecord:
    """One raw /dev/kmsg record: ``prio,seq,usec,flags[,…];message`` (+ `` KEY=value`` lines)."""

    facility: int
    level: int
    seq: int
    usec: int
    message: str


def parse_kmsg_record(raw: bytes) -> KmsgRecord | None:
    """Parse one record as read from /dev/kmsg; ``None`` when it is not of that form."""
    match = _HEADER.match(raw)
    if match is None:
        return None
    body = raw[match.end() :].split(b"\n", 1)[0]
    prio = int(match["prio"])
    return KmsgRecord(
        facility=prio >> 3,
        level=prio & 7,
        seq=int(match["seq"]),
        usec=int(match["usec"]),
        message=_unescape(body.decode("utf-8", "replace")),
    )


def _unescape(message: str) -> str:
    # The kernel writes non-printable bytes as \xNN.
    if "\\x" not in message:
        return message
    return _ESCAPE.sub(lambda m: chr(int(m[1], 16)), message)


def boot_offset() -> float:
    """Wall-clock time of boot as the kernel's printk clock sees it (seconds)."""
    return time.time() - time.monotonic()


class KmsgSource:
    """Follows /dev/kmsg; the position is ``<boot id>:<seq>`` of the last record read."""

    name = "kmsg"

    def __init__(
        self,
        path: Path = Path("/dev/kmsg"),
        boot_id_path: Path = Path("/proc/sys/kernel/random/boot_id"),
        boot_time: Callable[[], float] = boot_offset,
        open_device: Callable[[Path, int], int] = os.open,
    ) -> None:
        self.path = path
        self.lost_records = 0
        self.skipped = 0  # every record is handed out: the prefilter is not used here
        try:
            self.boot_id = boot_id_path.read_text().strip()
            self._fd = open_device(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as error:
            raise KernelLogError(f"cannot open {error.filename}: {error.strerror}") from error
        self._boot_time = boot_time()
        self._last_seq: int | None = None
        self._skip_through = -1
        self._since_usec: int | None = None

    def start(self, *, resume: str | None = None, since: datetime | None = None) -> None:
        """Skip what was read before ``resume`` (same boot only), or records before ``since``."""
        if resume is not None:
            boot_id, _, seq = resume.rpartition(":")
            if boot_id == self.boot_id and seq.isdigit():
                self._skip_through = int(seq)
                self._last_seq = int(seq)
        elif since is not None:
            self._since_usec = int((since.timestamp() - self._boot_time) * 1e6)

    def records(
        self, prefilter: Callable[[], tuple[bytes, ...] | None] | None = None
    ) -> Iterator[KernelRecord]:
        # Every /dev/kmsg read returns one record anyway: nothing to save by skipping.
        while (raw := self._read()) is not None:
            record = parse_kmsg_record(raw)
            if record is None or record.seq <= self._skip_through:
                continue
            self._count_gap(record.seq)
            self._last_seq = record.seq
            if record.facility != KERNEL_FACILITY:
                continue
            if self._since_usec is not None and record.usec < self._since_usec:
                continue
            uptime = record.usec / 1e6
            yield KernelRecord(
                message=record.message,
                time=_wall_time(self._boot_time + uptime),
                uptime=uptime,
                position=f"{self.boot_id}:{record.seq}",
            )

    def _read(self) -> bytes | None:
        while True:
            try:
                return os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                return None
            except OSError as error:
                if error.errno == errno.EPIPE:
                    continue  # overwritten records: the seq gap of the next read counts them
                if error.errno == errno.EINTR:
                    continue
                raise KernelLogError(f"reading {self.path}: {error.strerror}") from error

    def _count_gap(self, seq: int) -> None:
        if self._last_seq is not None and seq > self._last_seq + 1:
            self.lost_records += seq - self._last_seq - 1

    def position(self) -> str | None:
        return None if self._last_seq is None else f"{self.boot_id}:{self._last_seq}"

    def wait(self, timeout: float) -> None:
        select.select([self._fd], [], [], timeout)

    def close(self) -> None:
        os.close(self._fd)


def _wall_time(seconds: float) -> datetime | None:
    """The wall-clock time, or ``None`` for a timestamp no datetime can hold (a damaged
    record's ``usec``)."""
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        return None
