"""Kernel records from journald (``_TRANSPORT=kernel``) through systemd-python."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from systemd import journal

from collectors.kernel_log import KernelLogError
from collectors.records import KernelRecord

log = logging.getLogger(__name__)

# Userspace may write to /dev/kmsg, but never with the kernel facility (0): matching on it
# keeps forged "kernel" lines out.
KERNEL_MATCHES = {"_TRANSPORT": "kernel", "SYSLOG_FACILITY": "0"}


def default_journal_dirs(host_root: Path) -> list[Path]:
    """The host's persistent and volatile journal directories, in that order."""
    return [host_root / "var/log/journal", host_root / "run/log/journal"]


def open_reader(path: Path | None) -> Any:
    """A reader on ``path`` (a journal directory or file), or the local journal for ``None``."""
    try:
        if path is not None and path.is_file():
            reader = journal.Reader(files=[str(path)])
        elif path is not None:
            if not path.is_dir():
                raise KernelLogError(f"--journal-path {path}: no such directory")
            reader = journal.Reader(path=str(path))
        else:
            reader = journal.Reader()
    except OSError as error:
        raise KernelLogError(f"cannot open journal {path or '(local)'}: {error}") from error
    reader.add_match(**KERNEL_MATCHES)
    return reader


def has_kernel_entries(path: Path | None) -> bool:
    """Whether the journal at ``path`` holds at least one kernel record."""
    try:
        reader = open_reader(path)
    except KernelLogError:
        return False
    try:
        reader.seek_head()
        return bool(reader._next())
    finally:
        reader.close()


def find_journal(host_root: Path, explicit: Path | None) -> Path | None:
    """The journal to read: ``explicit``, else the host's first journal with kernel entries.

    Returns ``None`` (meaning "the local journal") only when the host root is ``/``
    and the local journal has kernel entries.
    """
    if explicit is not None:
        return explicit
    for candidate in default_journal_dirs(host_root):
        if candidate.is_dir() and has_kernel_entries(candidate):
            return candidate
    return None


class JournalSource:
    """Follows kernel records in a journal; the position is a journal cursor."""

    name = "journal"

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lost_records = 0
        self._reader = open_reader(path)
        self._cursor: str | None = None
        self._fresh_cursor = False

    def start(self, *, resume: str | None = None, since: datetime | None = None) -> None:
        """Position the reader: after ``resume``, else at ``since``, else at this boot's start."""
        reader = self._reader
        if resume is not None:
            reader.seek_cursor(resume)
            if reader._next() and not reader.test_cursor(resume):
                # The resume entry was vacuumed away: the one found is new, read it again.
                reader._previous()
            self._cursor = resume
            return
        if since is not None:
            reader.seek_realtime(since)
            return
        reader.this_boot()
        reader.seek_head()

    def records(self) -> Iterator[KernelRecord]:
        reader = self._reader
        while reader._next():
            self._fresh_cursor = False
            raw = reader._get("MESSAGE")
            message = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            time = datetime.fromtimestamp(reader._get_realtime() / 1e6, UTC)
            yield KernelRecord(message=message, time=time, uptime=self._uptime())

    def _uptime(self) -> float | None:
        try:
            return int(self._reader._get("_SOURCE_MONOTONIC_TIMESTAMP")) / 1e6
        except (KeyError, ValueError):
            return None

    def position(self) -> str | None:
        # Cursors cost a lookup each: fetched only when a position is asked for.
        if not self._fresh_cursor:
            # Before any entry is read there is no cursor: keep the resume one.
            with contextlib.suppress(OSError):
                self._cursor = self._reader._get_cursor()
            self._fresh_cursor = True
        return self._cursor

    def wait(self, timeout: float) -> None:
        self._reader.wait(timeout)

    def close(self) -> None:
        self._reader.close()
