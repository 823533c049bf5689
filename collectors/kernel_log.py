"""What every kernel log source offers the agent's reading loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Protocol

from collectors.records import KernelRecord


class KernelLogError(Exception):
    """A kernel log source cannot be opened or read (the message says which and why)."""


class KernelLogSource(Protocol):
    """A kernel log the agent reads from a resume point and then follows."""

    name: str
    """Label for metrics and logs: ``journal`` or ``kmsg``."""

    lost_records: int
    """Records the source knows it missed (overwritten before they were read)."""

    skipped: int
    """Records read but left out by the consumer's prefilter (counted as read)."""

    def start(self, *, resume: str | None = None, since: datetime | None = None) -> None:
        """Position the source: after ``resume``, else at ``since``, else at this boot's start."""
        ...

    def records(
        self, prefilter: Callable[[], tuple[bytes, ...] | None] | None = None
    ) -> Iterator[KernelRecord]:
        """Yield the records available now, in order; return at the current end.

        A source may skip records that contain none of the words ``prefilter()`` returns
        (it returns ``None`` when every record matters); others ignore it.
        """
        ...

    def wait(self, timeout: float) -> None:
        """Block until new records may be there, or ``timeout`` seconds passed."""
        ...

    def position(self) -> str | None:
        """Where to resume after the last record yielded (``None`` before any)."""
        ...

    def close(self) -> None: ...


class RecordObserver(Protocol):
    """Something besides the OOM assembler that wants some kernel records (e.g. conntrack's
    "table full" messages): records holding one of ``keywords`` are handed to ``feed``."""

    keywords: tuple[bytes, ...]

    def feed(self, record: KernelRecord) -> None: ...
