"""Drive a kernel log source through the OOM assembler into findings, resuming exactly.

The resume position is saved only where every record up to it is either reported or
irrelevant and none belongs to a report still being read: where the assembler is idle,
or (when a new report releases a held-back kill) the last record before that report.
A restart then re-reads a cut report from its start: nothing is skipped, and a kill
reported before the save is not reported again. A busy log leaves the saved position a
little behind the last reported kill: the keys of the last ``RECENT_KILLS`` reported kills
are saved (without fsync) after each one, and a restart skips those it re-reads, so a
SIGKILL can repeat at most the one kill whose report was printed but not yet recorded.

In live mode, post-baseline memcg kills are counted per container from the memory
cgroups' ``oom_kill`` counters as well as from the log (``agent.oom_counters``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.metrics import Metrics
from agent.oom_counters import OomCounterLedger
from agent.oom_findings import OomFindings
from agent.settings import Settings
from agent.state import StateFile
from collectors.cgroup_path import container_cgroup
from collectors.finding import Finding
from collectors.journal import JournalSource, find_journal, has_kernel_entries
from collectors.kernel_log import KernelLogError, KernelLogSource, RecordObserver
from collectors.kmsg import KmsgSource
from collectors.memcg import read_oom_kill_counter, read_oom_kill_counters
from collectors.oom import OomAssembler, OomKill

log = logging.getLogger(__name__)

SAVE_INTERVAL = 1.0
# Reading every memory cgroup's oom_kill counter costs a walk of the hierarchy: twice a
# second while kills come in, twice a minute when the node is quiet (kills whose records
# were lost still get counted then).
RECONCILE_ACTIVE = 0.5
RECONCILE_QUIET = 30.0
# Counter rises with no kill in the log for this long: the log source is probably dead.
SILENT_LOG_SECONDS = 60.0
ACTIVE_AFTER_KILL = 30.0
HEADERLESS_BATCH = 500
# Kills of the backlog read at a start, judged together (a later kill of a container shows
# it survived an earlier one): at most this many at a time.
BACKLOG_BATCH = 500
BACKLOG_TASK_ROWS = 100_000  # and at most this many task-table rows (~10 MB)
RECENT_KILLS = 512
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
    recent: tuple[str, ...] = ()

    @classmethod
    def load(cls, state: StateFile, source: str) -> ResumePoint | None:
        data = state.load()
        position = data.get("position")
        if data.get("source") == source and isinstance(position, str):
            recent = data.get("recent")
            if not isinstance(recent, list) or not all(isinstance(k, str) for k in recent):
                recent = []
            return cls(source, position, tuple(recent))
        if position is not None and data.get("source") == source:
            log.warning(
                "ignoring state file %s: position %r is not a string; reading this boot's "
                "kernel log from its start",
                state.path,
                position,
            )
        return None


MEMCG_COUNTERS = "memory-cgroup-counters"
"""The kernel_log collector's source of exact kill counts (see agent/oom_counters.py)."""


class KernelWatch:
    """Reads one source; kills become findings handed to ``sink``."""

    def __init__(
        self,
        source: KernelLogSource,
        findings: OomFindings,
        sink: Sink,
        metrics: Metrics,
        state: StateFile | None = None,
        counters: OomCounterLedger | None = None,
        observers: Sequence[RecordObserver] = (),
    ) -> None:
        self.source = source
        self.observers = tuple(observers)
        self._extra_words = tuple(w for o in self.observers for w in o.keywords)
        self._prefilters: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
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
        self._counters_error: str | None = None
        try:
            self.counters = counters if counters is not None else _live_ledger(findings)
        except OSError as error:  # no baseline: the log alone counts kills
            self.counters = None
            self._counters_read(error)
        else:
            if self.counters is not None:
                self._counters_read(None)
        self._last_reconcile = 0.0
        self._last_kill = float("-inf")
        self._started = time.monotonic()
        self._silence_logged = False
        # Kills reported since (about) the last saved position, saved with it: after a
        # crash, the kills re-read from that position and reported before are skipped.
        self._recent: deque[str] = deque(maxlen=RECENT_KILLS)
        self._saved_position: str | None = None
        self._reported_before: frozenset[str] = frozenset()
        # Header-less kills read but not yet attributed: one counter walk serves a batch.
        self._headerless: list[OomKill] = []
        # Kills of the backlog (read before catching up) not yet reported: judged together
        # from the log, as `analyze` judges a file, at the end of each read.
        self._backlog: list[OomKill] = []
        self._backlog_rows = 0
        self._not_understood_logged = 0

    def resume_point(self) -> str | None:
        if self.state is None:
            return None
        point = ResumePoint.load(self.state, self.source.name)
        if point is None:
            return None
        self._reported_before = frozenset(point.recent)
        self._recent.extend(point.recent)
        self._saved_position = point.position
        return point.position

    def drain(self, hold: float = 0.1, stop: threading.Event | None = None) -> int:
        """Read what is available now and report completed kills; return the record count.

        A finished kill is held back until the log is quiet, or for at most ``hold`` seconds
        of a busy log, in case a ``memory.oom.group`` line follows it. Returns early (every
        10,000 records, at a record boundary) once ``stop`` is set.
        """
        started = time.perf_counter()
        count = 0
        skipped_before = self.source.skipped
        for record in self.source.records(self._prefilter):
            count += 1
            for observer in self.observers:
                observer.feed(record)
            kills = self.assembler.feed(record)
            if kills:
                self._report(kills)
            self._track_position(bool(kills))
            if self._held_since is not None and time.monotonic() - self._held_since > hold:
                # A busy log never goes quiet: report a held kill anyway (the backlog's
                # kills at the end of this read).
                self.flush(backlog=False)
            if stop is not None and count % 10_000 == 0 and stop.is_set():
                break
        if self._headerless or self._backlog:
            self._attribute_headerless()
            if self.assembler.idle:
                self.save()
        self._say_not_understood()
        skipped = self.source.skipped - skipped_before
        self.metrics.add_records(self.source.name, count + skipped)
        self.metrics.set_lost(self.source.name, self.source.lost_records)
        if count:
            self.metrics.collector_duration.labels(collector="kernel_log").set(
                time.perf_counter() - started
            )
        return count

    def _say_not_understood(self) -> None:
        """Log lines worded like OOM report lines the assembler skipped: the first one,
        then each time their count reaches ten times the count logged last."""
        count = self.assembler.not_understood
        if count == 0 or count < 10 * self._not_understood_logged:
            return
        self._not_understood_logged = count
        first = next((p for p in self.assembler.not_understood_positions if p), None)
        log.warning(
            "%d %s line(s) worded like OOM report lines were not understood and skipped%s",
            count,
            self.source.name,
            f" (the first at {first})" if first else "",
        )

    def _prefilter(self) -> tuple[bytes, ...] | None:
        """The assembler's words plus the observers' (the same tuple object while the
        assembler's words stay the same: sources compare them by identity)."""
        words = self.assembler.prefilter()
        if words is None or not self._extra_words:
            return words
        combined = self._prefilters.get(words)
        if combined is None:
            combined = self._prefilters[words] = words + self._extra_words
        return combined

    def _track_position(self, reported: bool) -> None:
        assembler = self.assembler
        if assembler.reading_report or assembler.idle:
            self._held_since = None
        elif self._held_since is None:
            self._held_since = time.monotonic()
        if assembler.idle:
            self._quiet_position = None
            self._unsaved = True
            if self._headerless or self._backlog:
                return  # saved once they are reported (one counter walk / judgement per batch)
            if reported or time.monotonic() - self._last_save >= SAVE_INTERVAL:
                self.save()
        elif not assembler.reading_report:
            # Only while a kill is held back (a few records): cursors cost a lookup each.
            self._quiet_position = self.source.position()
        elif reported and self._quiet_position is not None:
            self._write_position(self._quiet_position)
            self._quiet_position = None

    def flush(self, *, final: bool = False, backlog: bool = True) -> None:
        """Report held kills; with ``backlog`` also the backlog's kills read so far."""
        self._held_since = None
        kills = self.assembler.flush(final=final)
        if kills:
            self._report(kills)
        if self._backlog and not backlog:
            return
        self._attribute_headerless()
        if self.assembler.idle:
            self._unsaved = True
            self.save()

    def _report(self, kills: list[OomKill]) -> None:
        self._last_kill = time.monotonic()
        if self._silence_logged:
            log.info("the %s shows OOM kills again", self.source.name)
            self._silence_logged = False
        for kill in kills:
            ledger = self.counters
            if ledger is None or kill.is_global or ledger.before_baseline(kill):
                if self.caught_up or kill.is_global:  # a global kill is judged alone
                    self._emit(kill, self.findings.finding(kill), count=kill.killed_lines)
                    continue
                self._backlog.append(kill)
                self._backlog_rows += len(kill.tasks or ())
                if len(self._backlog) >= BACKLOG_BATCH or self._backlog_rows > BACKLOG_TASK_ROWS:
                    self._report_backlog()
                continue
            memcg = kill.group_memcg or kill.task_memcg
            if memcg is None:
                self._headerless.append(kill)
                if len(self._headerless) >= HEADERLESS_BATCH:
                    self._attribute_headerless()
                continue
            finding = self.findings.finding(kill)
            container = container_cgroup(memcg)
            count = kill.killed_lines
            if container is not None:
                count = ledger.claim(container, kill.killed_lines)
            self._emit(kill, finding, count=count)

    def _emit(self, kill: OomKill, finding: Finding, *, count: int) -> None:
        """Report ``finding``; ``count``: the kills it adds to the metric (0: none, the
        memory cgroups' counters already counted them)."""
        key = kill_key(kill)
        if key in self._reported_before:
            return  # reported (and counted) by the run before a crash: not again
        if count:
            self.metrics.record_finding(finding, count)
        self.sink(finding)
        self._recent.append(key)
        if self.state is not None:
            # Not fsynced: survives the agent's crash (the page cache does), which is what
            # it is for; a machine crash loses /dev/kmsg anyway.
            self.state.save(self._state_data(self._saved_position), durable=False)

    def _state_data(self, position: str | None) -> dict[str, object]:
        return {"source": self.source.name, "position": position, "recent": list(self._recent)}

    def _report_backlog(self) -> None:
        """Report the backlog's kills, each judged with the others of its container (live
        evidence, where there is any, still comes first)."""
        kills, self._backlog = self._backlog, []
        self._backlog_rows = 0
        for kill, finding in zip(kills, self.findings.for_log(kills), strict=True):
            self._emit(kill, finding, count=kill.killed_lines)

    def _attribute_headerless(self) -> None:
        """Attribute the pending header-less kills from one walk of the counters (taken
        now, after their records were read, so their own increments are in it); report
        the backlog's kills read so far."""
        self._report_backlog()
        kills, self._headerless = self._headerless, []
        if not kills or self.counters is None:
            return
        try:
            verdicts = self.counters.headerless(len(kills))
        except OSError as error:
            self._counters_read(error)
            for kill in kills:
                self._emit(kill, self.findings.finding(kill), count=True)
            return
        self._counters_read(None)
        for kill, verdict in zip(kills, verdicts, strict=True):
            finding = self.findings.finding(
                kill,
                counter_memcg=verdict.memcg,
                candidates=verdict.candidates if verdict.memcg is None else (),
            )
            self._emit(kill, finding, count=verdict.counted)

    def reconcile(self) -> None:
        """Count kills the counters show and the log does not (rate-limited or lost)."""
        if self.counters is None:
            return
        self._last_reconcile = time.monotonic()
        try:
            rises = self.counters.reconcile()
        except OSError as error:
            self._counters_read(error)
            return
        self._counters_read(None)
        for memcg, increment in rises.items():
            self.metrics.count_oom("unknown", self.findings.subject_for(memcg), increment)
        if rises:
            self._warn_if_log_silent(sum(rises.values()))

    def _counters_read(self, error: OSError | None) -> None:
        """``nodediag_collector_source_success{collector="kernel_log",source=
        "memory-cgroup-counters"}``; a failure is logged once until the counters read again."""
        self.metrics.collector_source_success.labels(
            collector="kernel_log", source=MEMCG_COUNTERS
        ).set(0 if error else 1)
        text = None if error is None else str(error)
        if text and text != self._counters_error:
            log.error(
                "reading memory cgroup oom_kill counters: %s (kills the log loses or "
                "rate-limits are not counted until they can be read)",
                text,
            )
        elif self._counters_error and not text:
            log.info("memory cgroup oom_kill counters can be read again")
        self._counters_error = text

    def _warn_if_log_silent(self, kills: int) -> None:
        """Once per silence: the counters saw kills the log has not shown for a while (the
        journal is not being written, e.g. journald stopped)."""
        since = max(self._last_kill, self._started)
        silent = time.monotonic() - since
        if silent < SILENT_LOG_SECONDS or self._silence_logged:
            return
        self._silence_logged = True
        log.warning(
            "%d OOM kill(s) counted from memory cgroup counters, but the %s has shown no kill "
            "for %.0f s: is it still being written (systemd-journald running)? Kills stay "
            'counted (scope "unknown"); victims and pods come only from the log '
            "(--kernel-log kmsg reads the kernel directly)",
            kills,
            self.source.name,
            silent,
        )

    def save(self) -> None:
        if self.state is None or not self._unsaved:
            return
        self._write_position(self.source.position())
        self._unsaved = False

    def _write_position(self, position: str | None) -> None:
        self._attribute_headerless()  # nothing read before a saved position stays unreported
        if self.state is not None and position is not None:
            self._saved_position = position
            self.state.save(self._state_data(position))
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
        now = time.monotonic()
        active = now - self._last_kill < ACTIVE_AFTER_KILL
        if now - self._last_reconcile >= (RECONCILE_ACTIVE if active else RECONCILE_QUIET):
            self.reconcile()
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


def _live_ledger(findings: OomFindings) -> OomCounterLedger | None:
    """Live mode (the node itself is readable): a ledger with its baseline taken now."""
    if findings.live is None:
        return None
    hierarchy = findings.live.probe.hierarchy
    ledger = OomCounterLedger(
        lambda: read_oom_kill_counters(hierarchy),
        lambda path: read_oom_kill_counter(hierarchy, path),
    )
    ledger.start()
    return ledger


def kill_key(kill: OomKill) -> str:
    """A kill's identity across restarts (same boot): victim pid and kernel timestamp (the
    wall-clock time a source derives from it may differ by microseconds between runs)."""
    if kill.uptime is not None:
        return f"{kill.victim.pid}@{kill.uptime}"
    return f"{kill.victim.pid}@{kill.time.isoformat() if kill.time else ''}"
