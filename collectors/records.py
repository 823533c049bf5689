"""The record type every kernel log source yields."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class KernelRecord:
    """One kernel log record (one line of kernel output).

    ``time`` is the wall-clock time (timezone-aware) when the source knows it;
    ``uptime`` is the kernel's own timestamp, seconds since boot, when known;
    ``position`` is where the source can resume after this record (a journal
    cursor, ``<boot id>:<seq>`` for /dev/kmsg, ``line <n>`` for files);
    ``year_inferred``: the line's time stamp had no year (syslog, ``journalctl -o short``),
    so the year of ``time`` was inferred.
    """

    message: str
    time: datetime | None = None
    uptime: float | None = None
    position: str | None = None
    year_inferred: bool = False
