"""Assemble the kernel's multi-line OOM reports into one ``OomKill`` per kill.

Pure: records in, ``OomKill`` out. Every format of DESIGN.md is understood and none
is chosen by kernel version; a line is recognised by its own shape:

- ``<comm> invoked oom-killer: gfp_mask=…, order=…, oom_score_adj=…`` opens a report;
- ``CPU: n [UID: u ]PID: p Comm: c …`` gives the trigger's pid;
- ``memory: usage …kB, limit …kB`` and the ``Tasks state`` table belong to the open report;
- ``oom-kill:constraint=…,task_memcg=…,task=…,pid=…,uid=…`` (4.19+/5.x) names the victim;
- ``Task in /a killed as a result of limit of /b`` and ``… Kill process N (c) score S or
  sacrifice child`` are the pre-5.0 forms;
- ``[Memory cgroup out of memory: |Out of memory: ]Killed process N (c) total-vm:…`` ends it;
- ``Tasks in /g are going to be killed due to memory.oom.group set`` turns the kill just
  ended into a group kill; the ``Killed process`` lines after it are its members.

A finished kill is held back until the next OOM line shows it is not a group kill, or
until the caller flushes (end of input, or the live reader found the log idle).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import datetime

from collectors.oom_tasks import MAX_TASK_ROWS, TableLayout, TaskRow
from collectors.records import KernelRecord

MAX_OPEN_REPORTS = 8
MAX_GROUP_VICTIMS = 10_000
# No printk record is longer than 1024 characters (PRINTKRB_RECORD_MAX; LOG_LINE_MAX before
# 5.10). Longer "records" come from garbage input, and some patterns below are quadratic in
# the line length (a 70 000-character line with "Killed process" in it took minutes).
MAX_MESSAGE_CHARS = 2048
# The lines of one report are printed within moments (under oom_lock); a report line
# further than this from an open report's start belongs to another report (a paste that
# cut the other report's header).
MAX_REPORT_SECONDS = 60.0
# A process name (task->comm) has at most TASK_COMM_LEN - 1 = 15 bytes: a longer
# "name" before "invoked oom-killer:" is a line with a prefix not understood. (A raw
# /dev/kmsg dump shows a byte outside printable ASCII as "\xNN".)
MAX_COMM_CHARS = 15
_KMSG_ESCAPE = re.compile(r"\\x[0-9a-fA-F]{2}")
KEPT_NOT_UNDERSTOOD = 5


@dataclass(frozen=True, slots=True)
class OomVictim:
    """A process the kernel killed, with the figures of its ``Killed process`` line."""

    pid: int
    comm: str
    uid: int | None = None
    total_vm_kb: int | None = None
    anon_rss_kb: int | None = None
    file_rss_kb: int | None = None
    shmem_rss_kb: int | None = None
    oom_score_adj: int | None = None


@dataclass(frozen=True, slots=True)
class OomKill:
    """One OOM kill (or one ``memory.oom.group`` kill) as the kernel reported it."""

    victim: OomVictim
    time: datetime | None
    uptime: float | None
    position: str | None
    constraint: str | None
    is_global: bool
    oom_memcg: str | None
    task_memcg: str | None
    trigger_comm: str | None = None
    trigger_pid: int | None = None
    gfp_mask: str | None = None
    order: int | None = None
    memcg_usage_kb: int | None = None
    memcg_limit_kb: int | None = None
    tasks: tuple[TaskRow, ...] | None = None
    group_memcg: str | None = None
    group_victims: tuple[OomVictim, ...] = ()
    killed_lines: int = 1
    """The ``Killed process`` lines this kill stands for: a ``memory.oom.group`` kill has
    one per member (6.1 prints the chosen victim again among them). The kernel's per-memcg
    ``oom_kill`` counter counts each of them."""
    complete: bool = True
    year_inferred: bool = False  # the year of ``time`` was not in the log line

    @property
    def is_group(self) -> bool:
        return self.group_memcg is not None


_TRIGGER = re.compile(
    r"(?P<comm>.+?) invoked oom-killer: gfp_mask=(?P<gfp>0x[0-9a-fA-F]+)"
    r"(?:\([^)]*\))?,(?: nodemask=\S+,)? order=(?P<order>-?\d+), oom_score_adj=(?P<adj>-?\d+)"
)
_CPU_LINE = re.compile(r"^CPU: \d+ (?:UID: \d+ )?PID: (?P<pid>\d+) Comm: ")
_MEMCG_USAGE = re.compile(r"^memory: usage (?P<usage>\d+)kB, limit (?P<limit>\d+)kB")
_SUMMARY_HEAD = re.compile(r"oom-kill:constraint=(?P<constraint>[A-Z_]+),")
# Parsed from the end: cpuset, mems_allowed and cgroup paths may hold commas.
_SUMMARY_TAIL = re.compile(
    r",(?:oom_memcg=(?P<oom_memcg>.*?)|(?P<global>global_oom)),task_memcg=(?P<task_memcg>.*),"
    r"task=(?P<task>.*),pid=(?P<pid>\d+),uid=(?P<uid>\d+)\s*$"
)
_KILLED = re.compile(
    r"(?:(?P<prefix>[^:]*[Oo]ut of memory[^:]*): )?Killed process (?P<pid>\d+) \((?P<comm>.*)\)"
    r"(?P<tail>[^()]*)$"
)
# "key:value" fields; RHEL 7's 3.10 prints the uid as ", UID 1000," (space, not colon).
_TAIL_FIELD = re.compile(r"(?P<key>[A-Za-z_-]+)(?::|(?<=UID) )(?P<value>-?\d+)(?:kB)?")
_LEGACY_TASK_IN = re.compile(
    r"^Task in (?P<task>/.*) killed as a result of limit of (?P<limit>/.*)$"
)
_LEGACY_CHOICE = re.compile(
    r"(?P<prefix>[^:]*[Oo]ut of memory[^:]*): Kill process (?P<pid>\d+) \((?P<comm>.*)\) score"
)
_GROUP = re.compile(
    r"Tasks in (?P<memcg>/.*?) are going to be killed due to memory\.oom\.group set"
)
_TABLE_TITLE = "Tasks state (memory values in pages):"
# A task table line (with ``match``): a row "[  1234]  <values>", or the header "[  pid  ] <names>".
_TABLE_LINE = re.compile(r"\[\s*(?:(?P<pid>\d+)\]\s+(?P<rest>.*)|pid\s*\](?P<columns>.*))$")

# Which lines matter, cheapest test first. A line that starts, ends or extends a kill holds
# "oom" ("invoked oom-killer:", "oom-kill:constraint=", "memory.oom.group") or "Kill"
# ("Killed process", pre-5.0 "Kill process"). Any other line can only be part of an open
# report's body, and of those only lines with these first characters change the report:
# "CPU: " (trigger pid), "memory: usage " (memcg usage and limit), "Task in /" (pre-5.0
# memcgs), "Tasks state" (table title) and "[" (table header and rows). The report's other
# lines (call trace, registers, memcg stats, Mem-Info, per-node and zone lines) are skipped.
_BODY_HEADS = "[CmT"
# ``prefilter``: with no report open only the kill words matter; with one open, also the
# words of the body lines above ("Task" covers "Task in /" and "Tasks state").
_IDLE_PREFILTER = (b"oom", b"Kill")
_REPORT_PREFILTER = (b"[", b"CPU: ", b"memory: usage ", b"Task", b"Kill", b"oom")


@dataclass(slots=True)
class _Report:
    """An OOM report still being read."""

    time: datetime | None = None
    uptime: float | None = None
    trigger_comm: str | None = None
    trigger_pid: int | None = None
    gfp_mask: str | None = None
    order: int | None = None
    constraint: str | None = None
    is_global: bool | None = None
    oom_memcg: str | None = None
    task_memcg: str | None = None
    summary_victim: OomVictim | None = None
    memcg_usage_kb: int | None = None
    memcg_limit_kb: int | None = None
    table_layout: TableLayout | None = None  # of the task table header read last
    tasks: list[TaskRow] | None = None
    has_summary: bool = False
    has_body: bool = False  # printed its stack / meminfo / task table
    has_header: bool = False  # its "invoked oom-killer:" line was read
    position: str | None = None
    year_inferred: bool = False

    @classmethod
    def opened_by(cls, record: KernelRecord) -> _Report:
        return cls(
            time=record.time,
            uptime=record.uptime,
            position=record.position,
            year_inferred=record.year_inferred,
        )

    def finish(self, victim: OomVictim | None, record: KernelRecord | None) -> OomKill | None:
        chosen = _merge_victims(self.summary_victim, victim)
        if chosen is None:
            return None
        from_record = record is not None and record.time is not None
        # Without its header a report that printed more than the Killed line (summary,
        # body) was cut; a lone Killed line is all the kernel prints when it ratelimits.
        cut = not self.has_header and (self.has_summary or self.has_body)
        return OomKill(
            victim=chosen,
            time=record.time if record and record.time else self.time,
            uptime=record.uptime if record and record.uptime is not None else self.uptime,
            position=record.position if record else self.position,
            constraint=self.constraint,
            is_global=bool(self.is_global),
            oom_memcg=self.oom_memcg,
            task_memcg=self.task_memcg,
            trigger_comm=self.trigger_comm,
            trigger_pid=self.trigger_pid,
            gfp_mask=self.gfp_mask,
            order=self.order,
            memcg_usage_kb=self.memcg_usage_kb,
            memcg_limit_kb=self.memcg_limit_kb,
            tasks=tuple(self.tasks) if self.tasks is not None else None,
            complete=victim is not None and not cut,
            year_inferred=record.year_inferred if record and from_record else self.year_inferred,
        )

    def near(self, record: KernelRecord) -> bool:
        """Whether ``record`` can belong to this report by its time stamps (``True`` when
        they cannot tell)."""
        if self.uptime is not None and record.uptime is not None:
            return abs(record.uptime - self.uptime) <= MAX_REPORT_SECONDS
        if self.time is not None and record.time is not None:
            return abs((record.time - self.time).total_seconds()) <= MAX_REPORT_SECONDS
        return True


def _is_comm(text: str) -> bool:
    return len(text) <= MAX_COMM_CHARS or len(_KMSG_ESCAPE.sub("?", text)) <= MAX_COMM_CHARS


def _merge_victims(summary: OomVictim | None, killed: OomVictim | None) -> OomVictim | None:
    if killed is None:
        return summary
    if summary is None or summary.pid != killed.pid or killed.uid is not None:
        return killed
    return replace(killed, uid=summary.uid)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def parse_killed_line(message: str) -> tuple[OomVictim, bool | None] | None:
    """Parse a ``Killed process`` line: the victim and whether the kill was global.

    The second item is ``None`` when the line has no ``…out of memory:`` prefix
    (pre-5.0 kernels), so the line alone cannot tell.
    """
    match = _KILLED.match(message)
    if match is None:
        return None
    fields = {key: int(value) for key, value in _TAIL_FIELD.findall(match["tail"])}
    victim = OomVictim(
        pid=int(match["pid"]),
        comm=match["comm"],
        uid=fields.get("UID"),
        total_vm_kb=fields.get("total-vm"),
        anon_rss_kb=fields.get("anon-rss"),
        file_rss_kb=fields.get("file-rss"),
        shmem_rss_kb=fields.get("shmem-rss"),
        oom_score_adj=fields.get("oom_score_adj"),
    )
    prefix = match["prefix"]
    is_global = None if prefix is None else not prefix.startswith("Memory cgroup")
    return victim, is_global


@dataclass(slots=True)
class _Group:
    memcg: str
    kill: OomKill | None = None
    victims: list[OomVictim] = field(default_factory=list)
    lines: int = 0

    def add(self, victim: OomVictim, record: KernelRecord) -> None:
        self.lines += 1
        if self.kill is None:
            self.kill = _Report(time=record.time, uptime=record.uptime).finish(victim, record)
        if len(self.victims) < MAX_GROUP_VICTIMS and all(v.pid != victim.pid for v in self.victims):
            self.victims.append(victim)

    def build(self) -> OomKill | None:
        if self.kill is None:
            return None
        return replace(
            self.kill,
            group_memcg=self.memcg,
            group_victims=tuple(self.victims),
            killed_lines=max(1, self.lines),
        )


class OomAssembler:
    """Feed kernel records in order; collect the ``OomKill`` objects they complete.

    ``idle`` is true when no report is open and no kill is held back: a position
    persisted then is a safe place to resume reading from.
    """

    def __init__(self) -> None:
        self._open: deque[_Report] = deque()
        self._held: OomKill | None = None
        self._group: _Group | None = None
        self.not_understood = 0
        """Lines worded like a report's trigger, summary, group or Killed line that do not
        have its shape (a prefix not understood, a line cut short): skipped."""
        self.not_understood_positions: list[str | None] = []
        """The positions of the first ``KEPT_NOT_UNDERSTOOD`` of them."""

    def _skip(self, record: KernelRecord) -> None:
        self.not_understood += 1
        if len(self.not_understood_positions) < KEPT_NOT_UNDERSTOOD:
            self.not_understood_positions.append(record.position)

    @property
    def idle(self) -> bool:
        return not self._open and self._held is None and self._group is None

    def prefilter(self) -> tuple[bytes, ...] | None:
        """Words a raw record must contain to matter now (``None``: every record matters).

        The same rule as ``feed``'s fast path, for sources that can skip records before
        decoding them: with no report open only lines with "oom" or "Kill" matter; with one
        open also the report lines that change it ("CPU: ", "memory: usage ", "Task", "["),
        not its call trace, registers, memcg stats or Mem-Info lines.
        """
        return _REPORT_PREFILTER if self._open else _IDLE_PREFILTER

    @property
    def reading_report(self) -> bool:
        """Whether a report is open (its lines so far must be read again on resume)."""
        return bool(self._open)

    def feed(self, record: KernelRecord) -> list[OomKill]:
        message = record.message
        # Fast path for the bulk of the log, and of a report: only a line that can start a
        # report, end one or extend a held kill holds "oom" (trigger, summary and group
        # lines) or "Kill" ("Killed process", pre-5.0 "Kill process"); any other line is at
        # most a body line of the open report, which matters only by its first character.
        # A line longer than MAX_MESSAGE_CHARS cannot be a kernel record: it is ignored
        # like any other noise.
        if "oom" not in message and "Kill" not in message:
            if self._open and message[:1] in _BODY_HEADS and len(message) <= MAX_MESSAGE_CHARS:
                _on_body_line(self._open[-1], message)
            return []
        if len(message) > MAX_MESSAGE_CHARS:
            return []
        done: list[OomKill] = []
        if "Killed process" in message:
            self._on_killed(record, done)
        elif "are going to be killed due to memory.oom.group" in message:
            self._on_group(record, done)
        elif "invoked oom-killer:" in message:
            self._release(done)
            self._on_trigger(record, done)
        elif "oom-kill:constraint=" in message:
            self._release(done)
            self._on_summary(record, done)
        else:
            self._on_report_line(record, done)
        return done

    def flush(self, *, final: bool = False) -> list[OomKill]:
        """Emit held kills; with ``final`` (end of input) also cut-off reports naming a victim."""
        done: list[OomKill] = []
        self._release(done)
        if final:
            while self._open:
                kill = self._open.popleft().finish(None, None)
                if kill is not None:
                    done.append(kill)
        return done

    def _release(self, done: list[OomKill]) -> None:
        if self._group is not None:
            group_kill = self._group.build()
            if group_kill is not None:
                done.append(group_kill)
            self._group = None
        if self._held is not None:
            done.append(self._held)
            self._held = None

    def _open_report(self, record: KernelRecord, done: list[OomKill]) -> _Report:
        report = _Report.opened_by(record)
        self._open.append(report)
        if len(self._open) > MAX_OPEN_REPORTS:
            stale = self._open.popleft().finish(None, None)
            if stale is not None:
                done.append(stale)
        return report

    def _on_trigger(self, record: KernelRecord, done: list[OomKill]) -> None:
        match = _TRIGGER.match(record.message)
        if match is None or not _is_comm(match["comm"]):
            self._skip(record)
            return
        self._close_abandoned(done)
        self._close_distant(record, done)
        report = self._open_report(record, done)
        report.has_header = True
        report.trigger_comm = match["comm"].strip() or None
        report.gfp_mask = match["gfp"]
        report.order = int(match["order"])

    def _close_abandoned(self, done: list[OomKill]) -> None:
        """Close reports that printed their body but will never end.

        The kernel prints one report at a time (under oom_lock), so a new trigger after a
        report's body means that report was cut off (or ended in "no killable
        processes"); kept open it would take the next report's summary and victims.
        A report with only its trigger line may still be interleaved with this one.
        """
        for report in [r for r in self._open if r.has_body and not r.has_summary]:
            self._open.remove(report)
            kill = report.finish(None, None)
            if kill is not None:
                done.append(kill)

    def _close_distant(self, record: KernelRecord, done: list[OomKill]) -> None:
        """Close open reports too far in time from ``record`` to be its report's (their
        end was cut off): kept open they would lend this report their header."""
        for report in [r for r in self._open if not r.near(record)]:
            self._open.remove(report)
            kill = report.finish(None, None)
            if kill is not None:
                done.append(kill)

    def _on_summary(self, record: KernelRecord, done: list[OomKill]) -> None:
        head = _SUMMARY_HEAD.match(record.message)
        tail = _SUMMARY_TAIL.search(record.message)
        if head is None or tail is None:
            self._skip(record)
            return
        self._close_distant(record, done)
        report = next((r for r in self._open if not r.has_summary), None)
        if report is None:
            report = self._open_report(record, done)
        report.has_summary = True
        report.constraint = head["constraint"]
        # The kernel prints "global_oom" exactly when the OOM is not a memcg OOM, else
        # "oom_memcg=<path>". Do not derive this from the constraint: 5.0 kernels printed
        # CONSTRAINT_NONE for memcg OOMs (oc->constraint was never set, fixed in 5.1 by
        # 432b1de0de02 "mm/oom_kill.c: fix uninitialized oc->constraint").
        report.is_global = tail["global"] is not None
        report.oom_memcg = tail["oom_memcg"]
        report.task_memcg = tail["task_memcg"]
        report.summary_victim = OomVictim(
            pid=int(tail["pid"]), comm=tail["task"], uid=_int_or_none(tail["uid"])
        )

    def _on_report_line(self, record: KernelRecord, done: list[OomKill]) -> None:
        """A line with "oom" or "Kill" that is none of the trigger, summary, group or
        Killed lines: a pre-5.0 choice line, else a body line (e.g. ``oom_kill_process``
        in the call trace, a table header with ``oom_score_adj``, a task named "oom…")."""
        message = record.message
        # "Kill process " is a literal of _LEGACY_CHOICE: the (slow) search only if it is in.
        if "Kill process " in message:
            legacy = _LEGACY_CHOICE.match(message)
            if legacy is not None:
                self._on_legacy_choice(legacy, record, done)
                return
        if self._open:
            _on_body_line(self._open[-1], message)

    def _on_legacy_choice(
        self, match: re.Match[str], record: KernelRecord, done: list[OomKill]
    ) -> None:
        self._close_distant(record, done)
        report = next((r for r in self._open if not r.has_summary), None)
        if report is None:
            if any(
                r.summary_victim and r.summary_victim.pid == int(match["pid"]) for r in self._open
            ):
                return  # the report of this choice already has its summary line
            # Pre-5.0 kernels ratelimit only the header (dump_header): this line and the
            # "Killed process" line after it are all there is. Open a report so the kill
            # keeps what this line tells (memcg or global); it yields a kill only if a
            # "Killed process" line follows.
            report = self._open_report(record, done)
        is_global = not match["prefix"].startswith("Memory cgroup")
        if report.is_global is None:
            report.is_global = is_global
        if report.constraint is None:
            report.constraint = "CONSTRAINT_NONE" if is_global else "CONSTRAINT_MEMCG"

    def _on_killed(self, record: KernelRecord, done: list[OomKill]) -> None:
        parsed = parse_killed_line(record.message)
        if parsed is None:
            self._skip(record)
            return
        victim, line_is_global = parsed
        self._close_distant(record, done)
        report = self._report_for_victim(victim.pid)
        if report is None and self._group is not None:
            self._group.add(victim, record)
            return
        self._release(done)
        if report is None:
            report = _Report.opened_by(record)
        if report.is_global is None and line_is_global is not None:
            report.is_global = line_is_global
            report.constraint = "CONSTRAINT_NONE" if line_is_global else "CONSTRAINT_MEMCG"
        self._held = report.finish(victim, record)

    def _report_for_victim(self, pid: int) -> _Report | None:
        """The open report this victim ends: the one whose summary names it, else the oldest
        without a summary victim (pre-5.0 reports, where a child may be sacrificed)."""
        chosen = next(
            (r for r in self._open if r.summary_victim and r.summary_victim.pid == pid), None
        )
        if chosen is None:
            chosen = next((r for r in self._open if r.summary_victim is None), None)
        if chosen is not None:
            self._open.remove(chosen)
        return chosen

    def _on_group(self, record: KernelRecord, done: list[OomKill]) -> None:
        match = _GROUP.match(record.message)
        if match is None:
            self._skip(record)
            return
        held = self._held
        self._held = None
        self._release(done)
        # Without a held kill (already flushed, or never seen) the first member starts it.
        self._group = _Group(memcg=match["memcg"])
        if held is not None:
            self._group.kill = held
            self._group.victims.append(held.victim)
            self._group.lines = 1


def _on_body_line(report: _Report, message: str) -> None:
    """A line of ``report``'s body, dispatched on its first character (the prefixes are
    distinct, so a line that fails its own pattern matches none of the others either)."""
    head = message[:1]
    if head == "[":
        _on_table_line(report, message)
    elif head == "C":
        if message.startswith("CPU: ") and (cpu := _CPU_LINE.match(message)) is not None:
            report.has_body = True
            if report.trigger_pid is None:
                report.trigger_pid = int(cpu["pid"])
    elif head == "m":
        if (
            message.startswith("memory: usage ")
            and (usage := _MEMCG_USAGE.match(message)) is not None
        ):
            report.has_body = True
            report.memcg_usage_kb = int(usage["usage"])
            report.memcg_limit_kb = int(usage["limit"])
    elif head == "T":
        if (
            message.startswith("Task in /")
            and (task_in := _LEGACY_TASK_IN.match(message)) is not None
        ):
            report.task_memcg = task_in["task"]
            report.oom_memcg = task_in["limit"]
            report.constraint = report.constraint or "CONSTRAINT_MEMCG"
            report.is_global = False
        elif message.startswith(_TABLE_TITLE):
            report.has_body = True
            report.tasks = []


def _on_table_line(report: _Report, message: str) -> None:
    """A line starting with "[": a task table row or header (else nothing)."""
    line = _TABLE_LINE.match(message)
    if line is None:
        return
    pid, rest, columns = line.groups()
    if rest is None:  # the header
        report.table_layout = TableLayout.of(columns.split())
        if report.tasks is None:
            report.tasks = []
        return
    tasks = report.tasks
    layout = report.table_layout
    if layout is None or tasks is None or len(tasks) >= MAX_TASK_ROWS:
        return
    row = layout.row(int(pid), rest)
    if row is not None:
        tasks.append(row)
