"""Kernel records from journald (``_TRANSPORT=kernel``) through systemd-python."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from collections.abc import Callable, Iterator
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
# journald writes an entry to the file at once but tells readers (inotify) 250-500 ms later
# (a 250 ms post-change timer with sd-event's default 250 ms accuracy): ``wait`` also looks
# for new entries itself this often. A wakeup costs ~0.1 ms CPU here: ~1 millicore idle.
POLL_INTERVAL = 0.1
# sd-journal maps the journal files and keeps what it touched mapped: reading a boot's worth
# of entries leaves ~100 MiB of file pages in the agent's RSS. Once this many entries were
# stepped over since the reader was opened and it has caught up, ``wait`` reopens it at the
# same cursor, which unmaps them (measured: 103 MiB -> 3 MiB RssFile after 234,664 entries).
# A reopen costs ~0.3 ms; an OOM storm logs ~8,000 entries a minute.
REOPEN_AFTER = 2_000


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


def _split(
    keywords: tuple[bytes, ...] | None,
) -> tuple[bytes | None, bytes, Callable[[bytes], object] | None]:
    """(first, last, a search for the others) of a prefilter's keywords; ``first`` is
    ``None`` to read all."""
    if not keywords:  # None (every record matters), or nothing to look for: read all
        return None, b"", None
    return keywords[0], keywords[-1], _search(keywords[1:-1])


@functools.lru_cache(maxsize=16)
def _search(keywords: tuple[bytes, ...]) -> Callable[[bytes], object] | None:
    """One compiled search for any of ``keywords`` (cheaper than a loop of ``in`` tests
    from three keywords on); ``None`` for none."""
    if not keywords:
        return None
    return re.compile(b"|".join(re.escape(k) for k in keywords)).search


class JournalSource:
    """Follows kernel records in a journal; the position is a journal cursor."""

    name = "journal"

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lost_records = 0
        self.skipped = 0  # records the prefilter of ``records()`` left out
        self._reader = open_reader(path)
        self._visited = 0  # entries stepped over since the reader was opened
        self.reopened = 0
        self._cursor: str | None = None
        self._fresh_cursor = False
        # ``wait`` stepped onto a new entry: ``records`` hands it out first.
        self._peeked = False

    def start(self, *, resume: str | None = None, since: datetime | None = None) -> None:
        """Position the reader: after ``resume``, else at ``since``, else at this boot's start."""
        reader = self._reader
        self._peeked = False
        if resume is not None:
            reader.seek_cursor(resume)
            if reader._next() and not reader.test_cursor(resume):
                # The resume entry was vacuumed away: the one found is new; ``records``
                # hands it out first (stepping back from the first entry would not move).
                self._peeked = True
            self._cursor = resume
            self._fresh_cursor = True  # the position stays ``resume`` until a record is out
            return
        if since is not None:
            reader.seek_realtime(since)
            return
        reader.this_boot()
        reader.seek_head()

    def records(
        self, prefilter: Callable[[], tuple[bytes, ...] | None] | None = None
    ) -> Iterator[KernelRecord]:
        """Kernel records from the current position on.

        ``prefilter`` (the consumer's, e.g. the OOM assembler's) returns keywords, or ``None``
        (or an empty tuple) when every record matters: a record whose raw ``MESSAGE`` holds
        none of the keywords is skipped before anything else is fetched or decoded, and only
        counted in ``skipped``. It is asked again after every record handed out (the
        consumer's state changes only then). Most of the cost of reading a journal is per
        field fetched (and per Python call), so the time and uptime are fetched only for
        records handed out, and the cursor only when ``position()`` asks for it.
        """
        reader = self._reader
        next_entry = reader._next
        get = reader._get
        keywords = prefilter() if prefilter is not None else None
        first, last, middle = _split(keywords)
        skipped = handed_out = 0
        self._fresh_cursor = False
        found = self._peeked or next_entry()
        self._peeked = False
        try:
            while found:
                raw = get("MESSAGE")
                # Spelled out: this runs for every entry, a loop over the keywords costs
                # as much as fetching the message.
                if (
                    first is not None
                    and first not in raw
                    and last not in raw
                    and not (middle and middle(raw))
                ):
                    skipped += 1
                    found = next_entry()
                    continue
                message = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                when = datetime.fromtimestamp(reader._get_realtime() / 1e6, UTC)
                handed_out += 1
                yield KernelRecord(message=message, time=when, uptime=self._uptime())
                # position() may have fetched this record's cursor meanwhile.
                self._fresh_cursor = False
                if prefilter is not None and (now := prefilter()) is not keywords:
                    keywords = now
                    first, last, middle = _split(now)
                if self._peeked:  # wait() was called meanwhile and stepped onto an entry
                    self._peeked = False
                else:
                    found = next_entry()
        finally:
            self.skipped += skipped
            self._visited += skipped + handed_out

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
        """Return once a new record can be read, or after ``timeout`` seconds.

        journald's inotify wakeup comes 250-500 ms after the entry is in the file (it
        batches its change notifications), so between wakeups this looks for a new entry
        every ``POLL_INTERVAL``; one found is kept for ``records`` (``position()`` still
        names the last record handed out).
        """
        if self._peeked:
            return
        self.position()  # the cursor to report until ``records`` hands the new entry out
        if self._visited >= REOPEN_AFTER:
            if self._reader._next():
                self._peeked = True
                return
            self._reopen()
        reader = self._reader
        deadline = time.monotonic() + timeout
        while True:
            if reader._next():
                self._peeked = True
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            reader.wait(min(remaining, POLL_INTERVAL))

    def _reopen(self) -> None:
        """A fresh reader at the current cursor (drops the old one's file mappings)."""
        cursor = self._cursor
        if cursor is None:
            return
        try:
            fresh = open_reader(self.path)
        except KernelLogError as error:
            log.warning("%s; keeping the open reader", error)
            self._visited = 0
            return
        self._reader.close()
        self._reader = fresh
        self._visited = 0
        self.reopened += 1
        self.start(resume=cursor)

    def close(self) -> None:
        self._reader.close()
