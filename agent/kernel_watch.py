"""Drive a kernel log source through the OOM assembler into findings, resuming exactly.

The resume position is saved only where every record up to it is either reported or
irrelevant and none belongs to a report still being read: where the assembler is idle,
or (when a new report releases a held-back kill) the last record before that report.
A restart then re-reads a cut report from its start: nothing is skipped, and a kill
reported before the save is not reported again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.metrics import Metrics
from agent.oom_findings import OomFindings
from agent.settings import Settings
from agent.state import StateFile
from collectors.finding import Finding
from collectors.journal import JournalSource, find_journal, has_kernel_entries
from collectors.kernel_log import KernelLogError, KernelLogSource
from collectors.kmsg import KmsgSource
from collectors.oom import OomAssembler, OomKill

log = logging.getLogger(__name__)

SAVE_INTERVAL = 1.0
Sink = Callable[[Finding], None]
STATE_FILE = "kernel-log.json"


def open_source(settings: Settings) -> JournalSource | KmsgSource:
    """The kernel log ``--kernel-log`` asks for; ``auto`` prefers a journal with kernel entries."""
    choice = settings.kernel_log
    if choice in ("auto", "journal"):
        path = find_journal(settings.host_root, settings.journal_path)
        usable = path is not None or (settings.host_root == Path("/") and has_kernel_entries(None))
        if choice == "journal" or usable:
            if not usable:
                raise KernelLogError(
                    f"--kernel-log journal: no journal with kernel entries under "
                    f"{settings.journal_path or settings.host_root} (is journald running?)"
                )
            source = JournalSource(path)
            log.info("reading the kernel log from the journal %s", path or "(local)")
            return source
    log.info("reading the kernel log from %s", settings.kmsg_path)
    return KmsgSource(
        settings.kmsg_path, boot_id_path=settings.resolve("/proc/sys/kernel/random/boot_id")
    )


@dataclass
class ResumePoint:
    """What the state file says: the source it was written for and where to resume."""

    source: str
    position: str

    @classmethod
    def load(cls, state: StateFile, source: str) -> ResumePoint | None:
        data = state.load()
        if data.get("source") == source and isinstance(data.get("position"), str):
            return cls(source, data["position"])
        return None


class KernelWatch:
    """Reads one source; kills become findings handed to ``sink``."""

    def __init__(
        self,
        source: KernelLogSource,
        findings: OomFindings,
        sink: Sink,
        metrics: Metrics,
        state: StateFile | None = None,
    ) -> None:
        self.source = source
        self.findings = findings
        self.sink = sink
        self.metrics = metrics
        self.state = state
        self.assembler = OomAssembler()
        self.last_loop = time.monotonic()
        self.caught_up = False
        self._last_save = 0.0
        self._unsaved = False
        # Position of the last record read while a kill was held back but no report was
        # open: safe to save once the held kill is reported.
        self._quiet_position: str | None = None
        self._held_since: float | None = None
        metrics.start_source(source.name)

    def resume_point(self) -> str | None:
        if self.state is None:
            return None
        point = ResumePoint.load(self.state, self.source.name)
        return point.position if point else None

    def drain(self, hold: float = 0.1, stop: threading.Event | None = None) -> int:
        """Read what is available now and report completed kills; return the record count.

        A finished kill is held back until the log is quiet, or for at most ``hold`` seconds
        of a busy log, in case a ``memory.oom.group`` line follows it. Returns early (every
        10,000 records, at a record boundary) once ``stop`` is set.
        """
        started = time.perf_counter()
        count = 0
        for record in self.source.records():
            count += 1
            kills = self.assembler.feed(record)
            if kills:
                self._report(kills)
            self._track_position(bool(kills))
            if self._held_since is not None and time.monotonic() - self._held_since > hold:
                self.flush()  # a busy log never goes quiet: report a held kill anyway
            if stop is not None and count % 10_000 == 0 and stop.is_set():
                break
        self.metrics.add_records(self.source.name, count)
        self.metrics.set_lost(self.source.name, self.source.lost_records)
        if count:
            self.metrics.collector_duration.labels(collector="kernel_log").set(
                time.perf_counter() - started
            )
        return count

    def _track_position(self, reported: bool) -> None:
        assembler = self.assembler
        if assembler.reading_report or assembler.idle:
            self._held_since = None
        elif self._held_since is None:
            self._held_since = time.monotonic()
        if assembler.idle:
            self._quiet_position = None
            self._unsaved = True
            if reported or time.monotonic() - self._last_save >= SAVE_INTERVAL:
                self.save()
        elif not assembler.reading_report:
            # Only while a kill is held back (a few records): cursors cost a lookup each.
            self._quiet_position = self.source.position()
        elif reported and self._quiet_position is not None:
            self._write_position(self._quiet_position)
            self._quiet_position = None

    def flush(self, *, final: bool = False) -> None:
        self._held_since = None
        kills = self.assembler.flush(final=final)
        if kills:
            self._report(kills)
        if self.assembler.idle:
            self._unsaved = True
            self.save()

    def _report(self, kills: list[OomKill]) -> None:
        for kill in kills:
            finding = self.findings.finding(kill)
            self.metrics.record_finding(finding)
            self.sink(finding)

    def save(self) -> None:
        if self.state is None or not self._unsaved:
            return
        self._write_position(self.source.position())
        self._unsaved = False

    def _write_position(self, position: str | None) -> None:
        if self.state is not None and position is not None:
            self.state.save({"source": self.source.name, "position": position})
        self._last_save = time.monotonic()

    def follow(self, stop: threading.Event, idle_flush: float) -> None:
        """Read until ``stop`` is set; a held-back kill is reported once the log is quiet."""
        success = self.metrics.collector_success.labels(collector="kernel_log")
        while not stop.is_set():
            self.last_loop = time.monotonic()
            try:
                self._step(idle_flush, stop)
                success.set(1)
            except (KernelLogError, OSError) as error:
                success.set(0)
                log.error("kernel log: %s; retrying in 5 s", error)
                stop.wait(5)
        self.flush()

    def _step(self, idle_flush: float, stop: threading.Event) -> None:
        if self.drain(idle_flush, stop):
            return
        self.caught_up = True
        if self.assembler.idle:
            self.save()
            self.source.wait(1.0)
            return
        self.source.wait(idle_flush)
        if not self.drain(idle_flush, stop):
            self.flush()
