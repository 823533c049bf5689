"""Connection tracking: a full table drops new flows; insert races lose UDP DNS queries.

Evidence, read from the node's network namespace:

- ``nf_conntrack_count`` and ``nf_conntrack_max`` (``/proc/sys/net/netfilter``): entries now
  and the limit. The count is per network namespace; the limit is one global value (read-only
  in other namespaces on this kernel), checked against each namespace's count.
- ``/proc/net/stat/nf_conntrack``: one row of hex counters per CPU under a header row (the
  columns differ between kernels, so they are read by name). ``drop``: packets dropped
  because no entry could be made (table full); ``early_drop``: unreplied entries evicted to
  make room (the table was at its limit); ``insert_failed``: entries that lost the race to
  be inserted — the UDP race behind 5-second DNS timeouts, when a resolver sends the A and
  AAAA queries from one socket at once and one of them is dropped.
- The kernel log: ``nf_conntrack: table full, dropping packet`` (``net_warn_ratelimited``
  in ``__nf_conntrack_alloc``; with ``pr_fmt`` adding the module name, kernels since 4.x
  print ``nf_conntrack: nf_conntrack: table full, dropping packet``; 2.6 kernels ended it
  with a full stop, and ``ip_conntrack:`` before nf_conntrack existed). Kernels since 6.17
  name any namespace but the initial one: ``… table full in netns <inode>, dropping packet``
  (a pod's own table; the initial namespace is the node's). Messages are rate limited:
  their number is a lower bound.

Pure part: :func:`parse_stat`, :func:`is_table_full`, :func:`judge`. I/O:
:class:`ConntrackCollector` (``proc`` and ``netns`` injectable) and :class:`TableFullLog`,
which the kernel-log readers feed.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from collectors.dns_probe import run_in_netns
from collectors.finding import Finding
from collectors.kernel_counter import KernelCounter, KernelGauge
from collectors.records import KernelRecord
from collectors.registry import SourceLog

TABLE_FULL_WORDS: tuple[bytes, ...] = (b"table full",)
"""What a kernel log source must let through for :class:`TableFullLog` (a prefilter)."""
_TABLE_FULL = re.compile(
    r"\b(?:nf|ip)_conntrack: (?:nf_conntrack: )?table full(?: in netns (?P<netns>[0-9]{1,20}))?,"
    r" dropping packet"
)
_HEX_WORD = re.compile(r"[0-9a-fA-F]{1,16}")
SYSCTL_DIR = "sys/net/netfilter"
STAT_FILE = "thread-self/net/stat/nf_conntrack"
"""Under ``proc``: ``thread-self`` so a reader in another namespace's thread reads that one."""
PERSIST_FILE = "/etc/sysctl.d/90-conntrack.conf"


# ------------------------------------------------------------------------------ pure part


INITIAL_NETNS = 0
"""Stands for the initial network namespace (the node's), which the message does not name."""


def table_full_netns(message: str) -> int | None:
    """For conntrack's "table full, dropping packet": the network namespace's inode number it
    names (:data:`INITIAL_NETNS` when it names none); ``None`` for any other message."""
    if "table full" not in message:
        return None
    match = _TABLE_FULL.search(message)
    if match is None:
        return None
    return int(match["netns"]) if match["netns"] else INITIAL_NETNS


@dataclass(frozen=True, slots=True)
class ConntrackStats:
    """``/proc/net/stat/nf_conntrack``: per-CPU counters summed over the CPUs."""

    cpus: int
    totals: dict[str, int]
    """Counter name → sum over CPUs (``entries`` excluded: it is not per CPU)."""
    entries: int | None

    def get(self, name: str) -> int | None:
        return self.totals.get(name)


def parse_stat(text: str) -> ConntrackStats | None:
    """The stat file's counters by header name, summed over the CPU rows (hex values).

    ``None`` without a header row. A row whose width differs from the header's or that holds
    a non-hex word is skipped (not guessed at); ``cpus`` counts the rows used."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    hex_word = _HEX_WORD.fullmatch
    if not lines or lines[0][:1] != ["entries"]:
        return None
    names = lines[0]
    totals = dict.fromkeys(names[1:], 0)
    entries: int | None = None
    cpus = 0
    for words in lines[1:]:
        if len(words) != len(names) or not all(hex_word(word) for word in words):
            continue
        values = [int(word, 16) for word in words]
        cpus += 1
        # Every row carries the same (namespace-wide) entry count.
        entries = values[0] if entries is None else entries
        for name, value in zip(names[1:], values[1:], strict=True):
            totals[name] += value
    return ConntrackStats(cpus, totals if cpus else {}, entries)


@dataclass(frozen=True, slots=True)
class LogEvents:
    """Table-full messages the kernel log showed in some span."""

    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    namespaces: tuple[int, ...] = ()
    """The namespaces named (:data:`INITIAL_NETNS`: the node's), in order of appearance."""


@dataclass(frozen=True, slots=True)
class ConntrackReading:
    """One reading of the conntrack state (``None``: not read)."""

    count: int | None
    max: int | None
    stats: ConntrackStats | None
    netns_inode: int | None = None
    """The namespace read (the kernel names any but the initial one by this number)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one reading (against the previous one) says."""

    table_full: list[str] = field(default_factory=list)
    """Evidence the table was full: ``at_max``, ``drop``, ``early_drop``, ``kernel_log``."""
    insert_failed: int = 0
    """``insert_failed`` rise since the previous reading (the total at the first)."""
    drops: int = 0
    early_drops: int = 0


def _rise(now: ConntrackStats | None, before: ConntrackStats | None, name: str) -> int:
    """How much counter ``name`` rose since ``before`` (its total without one; a counter
    that went down — new namespace, reboot — counts from zero)."""
    value = now.get(name) if now is not None else None
    if value is None:
        return 0
    previous = before.get(name) if before is not None else None
    return value if previous is None or value < previous else value - previous


def judge(
    reading: ConntrackReading, previous: ConntrackStats | None, log_events: LogEvents
) -> Verdict:
    """Is the table full (now, or since the previous reading), and did inserts fail?"""
    drops = _rise(reading.stats, previous, "drop")
    early = _rise(reading.stats, previous, "early_drop")
    full: list[str] = []
    if reading.count is not None and reading.max and reading.count >= reading.max:
        full.append("at_max")
    if drops:
        full.append("drop")
    if early:
        full.append("early_drop")
    if log_events.count:
        full.append("kernel_log")
    return Verdict(full, _rise(reading.stats, previous, "insert_failed"), drops, early)


# ---------------------------------------------------------------------- kernel log evidence


class TableFullLog:
    """Counts conntrack's table-full messages a kernel log reader hands it (thread-safe:
    the kernel-log thread feeds, the collectors' thread takes)."""

    keywords: tuple[bytes, ...] = TABLE_FULL_WORDS

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._first: datetime | None = None
        self._last: datetime | None = None
        self._namespaces: dict[int, None] = {}

    def feed(self, record: KernelRecord) -> None:
        netns = table_full_netns(record.message)
        if netns is None:
            return
        with self._lock:
            self._count += 1
            self._namespaces[netns] = None
            if record.time is not None:
                self._first = self._first or record.time
                self._last = record.time

    @property
    def pending(self) -> int:
        """How many messages the next ``take`` returns."""
        with self._lock:
            return self._count

    def take(self) -> LogEvents:
        """The messages since the last ``take`` (and forget them)."""
        with self._lock:
            events = LogEvents(self._count, self._first, self._last, tuple(self._namespaces))
            self._count, self._first, self._last = 0, None, None
            self._namespaces = {}
            return events


def findings_from_log(node: str, events: LogEvents, where: str) -> list[Finding]:
    """``ConntrackTableFull`` from kernel log evidence alone (``analyze``, ``scan``)."""
    if not events.count:
        return []
    verdict = Verdict(["kernel_log"])
    return [table_full_finding(node, ConntrackReading(None, None, None), verdict, events, where)]


# ------------------------------------------------------------------------------ findings


def _when(events: LogEvents) -> str:
    if events.first is None or events.last is None:
        return ""
    first, last = (t.isoformat(timespec="seconds") for t in (events.first, events.last))
    return f" between {first} and {last}"


def _where(namespaces: tuple[int, ...], node_netns: int | None) -> str:
    mine = {INITIAL_NETNS, node_netns}
    parts = ["in the node's network namespace"] if mine & set(namespaces) else []
    others = [str(n) for n in namespaces if n not in mine]
    if others:
        parts.append(f"in network namespace(s) {', '.join(others)} (a pod's or container's own)")
    return " and ".join(parts)


def table_full_fix(current_max: int | None) -> dict[str, str]:
    target = max(2 * current_max, 262144) if current_max else 524288
    return {
        "fix": f"sysctl -w net.netfilter.nf_conntrack_max={target}",
        "fix_persistent": f"echo 'net.netfilter.nf_conntrack_max = {target}' > {PERSIST_FILE}",
        "fix_kube_proxy": (
            "kube-proxy sets nf_conntrack_max at start from conntrack.maxPerCore times the CPUs"
            " (default 32768, at least conntrack.min 131072): raise maxPerCore in its"
            " configuration, or set it to 0 to leave the sysctl to you"
        ),
    }


def table_full_finding(
    node: str,
    reading: ConntrackReading,
    verdict: Verdict,
    events: LogEvents,
    where: str,
    first: bool = True,
) -> Finding:
    """``first``: the counters' rise is their total since they started (the first reading)."""
    span = "since the counters started" if first else "since the last check"
    said: list[str] = []
    if "at_max" in verdict.table_full:
        said.append(f"{reading.count} entries of {reading.max} allowed")
    if verdict.drops:
        said.append(f"{verdict.drops} packet(s) dropped {span} because no entry could be made")
    if verdict.early_drops:
        said.append(f"{verdict.early_drops} unreplied flow(s) evicted {span} to make room")
    if events.count:
        said.append(
            f"{events.count} 'table full, dropping packet' kernel message(s){_when(events)}"
            f" {_where(events.namespaces, reading.netns_inode)} (rate limited: at least that"
            " many drops)"
        )
    fix = table_full_fix(reading.max)
    message = (
        f"The connection tracking table was full (from {where}): {'; '.join(said)}. New flows —"
        " DNS queries among them — are dropped while it is. Fix: "
        f"`{fix['fix']}`, persisted in {PERSIST_FILE}; on a kube-proxy node raise"
        " conntrack.maxPerCore in kube-proxy's configuration (it sets the limit at start)."
    )
    details: dict[str, Any] = {
        "evidence": verdict.table_full,
        "source": where,
        "counters": {
            "entries": reading.count,
            "max": reading.max,
            "drop": verdict.drops,
            "early_drop": verdict.early_drops,
            "kernel_log_messages": events.count,
            "kernel_log_namespaces": list(events.namespaces),
            "first_message": events.first.isoformat() if events.first else None,
            "last_message": events.last.isoformat() if events.last else None,
        },
        **fix,
    }
    return Finding.on_node("ConntrackTableFull", node, message, details, time=datetime.now(UTC))


def insert_failed_finding(
    node: str, verdict: Verdict, stats: ConntrackStats, first: bool
) -> Finding:
    span = (
        "since the counters started (boot or namespace creation)"
        if first
        else "since the last check"
    )
    message = (
        f"conntrack insert_failed rose by {verdict.insert_failed} {span}"
        f" (total {stats.get('insert_failed')} over {stats.cpus} CPUs): flows whose entry lost"
        " the race to be inserted were dropped. For UDP DNS this is the race behind"
        " 5-second lookup timeouts (A and AAAA sent at once from one socket, one of them"
        " dropped). Fix: NodeLocal DNSCache (its NOTRACK rules keep DNS out of conntrack),"
        " or `options single-request-reopen` (glibc) in the pods' dnsConfig."
    )
    details: dict[str, Any] = {
        "counters": {
            "insert_failed": verdict.insert_failed,
            "insert_failed_total": stats.get("insert_failed"),
            "clash_resolved_total": stats.get("clashres"),
            "cpus": stats.cpus,
            "since": "counters started" if first else "last check",
        },
        "fix": "NodeLocal DNSCache",
        "fix_pod": "dnsConfig: {options: [{name: single-request-reopen}]}",
    }
    return Finding.on_node(
        "ConntrackInsertFailures", node, message, details, time=datetime.now(UTC)
    )


# ----------------------------------------------------------------------------- collector


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


class ConntrackCollector:
    """Reads conntrack's count, limit and per-CPU counters; findings when the table was full
    or inserts failed since the previous run (at the first run: since the counters began)."""

    name = "conntrack"

    def __init__(
        self,
        node: str,
        registry: CollectorRegistry,
        *,
        proc: Path = Path("/proc"),
        netns: str | None = None,
        log: TableFullLog | None = None,
    ) -> None:
        self.node = node
        self.proc = proc
        self.netns = netns
        self.log = log
        self.sources = SourceLog()
        self._previous: ConntrackStats | None = None
        self.entries = KernelGauge(
            "nodediag_conntrack_entries",
            "Connection tracking entries in the node's network namespace (nf_conntrack_count).",
        )
        self.max = KernelGauge(
            "nodediag_conntrack_max", "Connection tracking entries allowed (nf_conntrack_max)."
        )
        self.drops = KernelCounter(
            "nodediag_conntrack_drops",
            "Packets conntrack dropped because no entry could be made (table full; kernel total).",
        )
        self.insert_failed = KernelCounter(
            "nodediag_conntrack_insert_failed",
            "Conntrack entries that lost the race to be inserted (kernel total over CPUs).",
        )
        for metric in (self.entries, self.max, self.drops, self.insert_failed):
            registry.register(metric)

    def read(self) -> ConntrackReading | None:
        """The reading, in the collector's namespace; ``None`` when conntrack is not loaded."""
        return run_in_netns(self.netns, self._read_here)

    def _read_here(self) -> ConntrackReading | None:
        sysctls = self.proc / SYSCTL_DIR
        if not (sysctls / "nf_conntrack_max").exists():
            for source in ("nf_conntrack_count", "nf_conntrack_max", "stat"):
                self.sources.skipped(source, "nf_conntrack is not loaded: nothing is tracked")
            return None
        count = self.sources.read(
            "nf_conntrack_count", lambda: _read_int(sysctls / "nf_conntrack_count")
        )
        limit = self.sources.read(
            "nf_conntrack_max", lambda: _read_int(sysctls / "nf_conntrack_max")
        )
        stats = self.sources.read("stat", self._read_stat)
        return ConntrackReading(count, limit, stats, self._netns_inode())

    def _netns_inode(self) -> int | None:
        try:
            return (self.proc / "thread-self" / "ns" / "net").stat().st_ino
        except OSError:
            return None

    def _read_stat(self) -> ConntrackStats:
        path = self.proc / STAT_FILE
        stats = parse_stat(path.read_text())
        if stats is None or not stats.cpus:
            raise OSError(f"{path}: no header row or no CPU row understood")
        return stats

    def collect(self) -> list[Finding]:
        reading = self.read()
        events = self.log.take() if self.log is not None else LogEvents()
        if reading is None:
            return findings_from_log(self.node, events, "the kernel log")
        self._export(reading)
        first = self._previous is None
        verdict = judge(reading, self._previous, events)
        if reading.stats is not None:
            self._previous = reading.stats
        findings: list[Finding] = []
        if verdict.table_full:
            findings.append(
                table_full_finding(
                    self.node, reading, verdict, events, "the node's counters", first
                )
            )
        if verdict.insert_failed and reading.stats is not None:
            findings.append(insert_failed_finding(self.node, verdict, reading.stats, first))
        return findings

    def _export(self, reading: ConntrackReading) -> None:
        self.entries.value = reading.count
        self.max.value = reading.max
        stats = reading.stats
        self.drops.value = stats.get("drop") if stats is not None else None
        self.insert_failed.value = stats.get("insert_failed") if stats is not None else None


def table_full_events(records: Iterable[KernelRecord]) -> LogEvents:
    """Table-full messages among ``records`` (for tests and one-shot reads)."""
    log = TableFullLog()
    for record in records:
        log.feed(record)
    return log.take()
