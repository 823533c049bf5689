"""Count OOM kills per container exactly, from the memory cgroups' own ``oom_kill`` counters.

The kernel rate-limits the OOM report (header, task table, ``oom-kill:`` summary) to 10
per 5 s host-wide; beyond that it prints only ``Memory cgroup out of memory: Killed process
N (comm) …`` — no memory cgroup. And /dev/kmsg can overrun and lose records outright. The
kernel's per-memcg counters (v1 ``memory.oom_control``, v2 ``memory.events.local``:
``oom_kill N``) see every kill. This ledger combines both.

Per container cgroup ``c`` (post-baseline kills only):

- ``logged(c)``: kills of ``c`` read from the log (a report naming ``c``, or a header-less
  kill attributed to ``c`` below);
- ``delta(c)``: the counter now minus the counter at the baseline;
- ``counted(c)``: what ``nodediag_oom_kills_total`` holds for ``c``.

**Invariant**: ``counted(c) = max(min(logged(c), delta(c)), delta(c) read >= grace ago)``.
Each term is a lower bound of the kills ``c`` really had since the baseline (a log record
is one kill — capped by the counter read right after it, for a report the assembler might
have read as two; the counter is raised by the kernel just before it prints ``Killed
process``), so ``counted`` never exceeds the truth: no kill is counted twice, whether its
record comes before or after the counter is read, late, or never (lost to an overrun). As
soon as the counter has been read ``grace`` seconds after the kill, ``counted`` reaches the
truth: every kill counted once. The metric's increments are the rises of that maximum: a
log record raises it (with the report's own labels: scope, pod, container) when it runs
ahead of the counter; a counter rise (looked at ``grace`` seconds late, so the report's
labels win when it comes) raises it with scope ``unknown`` when it runs ahead of the log.
So the sum of ``nodediag_oom_kills_total`` over a container's series equals its counter's
rise, and over all series the kills of the node (plus those outside containers, counted
from their records as before).

A header-less kill is attributed from a counter snapshot taken after its record was read
(so its own increment is in it): the containers whose ``delta - logged`` is positive are
the candidates. Exactly one: it is that container's kill. Several: the finding stays
unattributed and names the candidates; the count is still exact per container (the
counters, above). None: the kill happened in a memory cgroup the counters do not cover
(outside kubepods, or already removed) and is counted from its record alone.

Kills before the baseline (the first snapshot, taken at start) are in no delta: they are
attributed from their headers only and counted from their records, as without counters.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from collectors.oom import OomKill

GONE_KEEP_SECONDS = 600.0


@dataclass(frozen=True, slots=True)
class HeaderlessVerdict:
    """Where a header-less kill belongs: ``memcg`` when exactly one container fits."""

    memcg: str | None
    candidates: tuple[str, ...]
    counted: bool
    """Whether the kill's record raised the metric (else the counters count it)."""


class OomCounterLedger:
    """Per-container kill accounting; ``read_all`` walks every container's counter."""

    def __init__(
        self,
        read_all: Callable[[], dict[str, int]],
        read_one: Callable[[str], int | None] = lambda path: None,
        grace: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._read_all = read_all
        self._read_one = read_one
        self.grace = grace
        self._clock = clock
        self._wall = wall
        self.baseline: dict[str, int] = {}
        self.baseline_time: float | None = None
        self.logged: dict[str, int] = {}
        self.counted: dict[str, int] = {}
        self._gone: dict[str, float] = {}
        self._history: deque[tuple[float, dict[str, int]]] = deque()

    def start(self) -> None:
        """Take the baseline; kills logged before this moment are not in any delta."""
        self.baseline_time = self._wall()
        self.baseline = self._read_all()

    def before_baseline(self, kill: OomKill) -> bool:
        if self.baseline_time is None:
            return True
        return kill.time is None or kill.time.timestamp() < self.baseline_time

    def _delta_of(self, path: str, value: int | None) -> int | None:
        if value is None:
            return None
        delta = value - self.baseline.get(path, 0)
        if delta < 0:  # a new cgroup under an old name: start over
            self.baseline[path] = value
            delta = 0
        return delta

    def _raise_by_log(self, path: str, delta: int | None) -> bool:
        """One more log record for ``path``: whether the metric rises (see the invariant).
        ``delta``: the counter's rise read after the record (``None``: unreadable)."""
        logged = self.logged[path] = self.logged.get(path, 0) + 1
        if delta is not None and logged > delta:
            return False  # more records than kills (a report split in two): never overcount
        if logged > self.counted.get(path, 0):
            self.counted[path] = logged
            return True
        return False

    def claim(self, path: str, kills: int = 1) -> int:
        """A post-baseline report naming container cgroup ``path`` that stands for ``kills``
        kills (a ``memory.oom.group`` kill: one per ``Killed process`` line, as the kernel
        counts them): how many of them the metric counts now."""
        delta = self._delta_of(path, self._read_one(path))
        return sum(self._raise_by_log(path, delta) for _ in range(kills))

    def headerless(self, count: int = 1) -> list[HeaderlessVerdict]:
        """Verdicts for ``count`` post-baseline memcg kills without a memory cgroup, in log
        order, all read before this call: one counter snapshot serves them all."""
        snapshot = self._read_all()
        self._history.append((self._clock(), snapshot))
        deltas = {path: self._delta_of(path, value) or 0 for path, value in snapshot.items()}
        verdicts = []
        for _ in range(count):
            unaccounted = sorted(
                path for path, delta in deltas.items() if delta > self.logged.get(path, 0)
            )
            if len(unaccounted) == 1:
                path = unaccounted[0]
                counted = self._raise_by_log(path, deltas[path])
                verdicts.append(HeaderlessVerdict(path, (path,), counted))
            elif not unaccounted:
                verdicts.append(HeaderlessVerdict(None, (), True))
            else:
                verdicts.append(HeaderlessVerdict(None, tuple(unaccounted), False))
        return verdicts

    def reconcile(self) -> dict[str, int]:
        """Counter rises the log has not shown for ``grace`` seconds: ``{path: increment}``."""
        now = self._clock()
        self._history.append((now, self._read_all()))
        old: dict[str, int] | None = None
        while self._history and self._history[0][0] <= now - self.grace:
            old = self._history.popleft()[1]
        if old is not None:
            self._history.appendleft((now - self.grace, old))  # still the newest old one
        rises: dict[str, int] = {}
        for path, value in (old or {}).items():
            delta = self._delta_of(path, value) or 0
            counted = self.counted.get(path, 0)
            if delta > counted:
                rises[path] = delta - counted
                self.counted[path] = delta
        self._forget_gone(now, self._history[-1][1])
        return rises

    def _forget_gone(self, now: float, current: dict[str, int]) -> None:
        """Bounded memory: cgroups removed for ``GONE_KEEP_SECONDS`` are forgotten."""
        for path in list(self.counted.keys() | self.logged.keys() | self.baseline.keys()):
            if path in current:
                self._gone.pop(path, None)
            elif now - self._gone.setdefault(path, now) > GONE_KEEP_SECONDS:
                for table in (self.counted, self.logged, self.baseline, self._gone):
                    table.pop(path, None)
