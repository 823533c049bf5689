"""One-shot diagnosis: ``scan`` (this node, live) and ``analyze`` (a support bundle, offline)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from agent.containers import ContainerLookup, containerd_client
from agent.metrics import Metrics
from agent.oom_findings import LiveEvidence, OomFindings
from agent.periodic import ClusterDnsSource, PeriodicCollectors, build_collectors
from agent.settings import Settings
from collectors.conntrack import TableFullLog, findings_from_log
from collectors.finding import Finding
from collectors.kernel_log import KernelLogSource, RecordObserver
from collectors.logfile import LogReading, read_kernel_log_file
from collectors.memcg import MemcgProbe
from collectors.oom import OomAssembler, OomKill
from collectors.records import KernelRecord
from collectors.registry import collector_failed

log = logging.getLogger(__name__)

PROGRESS_EVERY = 5.0


def assemble(
    records: Iterable[KernelRecord], what: str, observers: Sequence[RecordObserver] = ()
) -> list[OomKill]:
    """All kills in ``records`` (cut-off reports included), logging progress on long input;
    each record is also handed to the ``observers``."""
    assembler = OomAssembler()
    kills: list[OomKill] = []
    count = 0
    next_progress = time.monotonic() + PROGRESS_EVERY
    for record in records:
        count += 1
        for observer in observers:
            observer.feed(record)
        kills.extend(assembler.feed(record))
        if count % 10_000 == 0 and time.monotonic() >= next_progress:
            log.info("%s: %d records read, %d OOM kills so far", what, count, len(kills))
            next_progress = time.monotonic() + PROGRESS_EVERY
    kills.extend(assembler.flush(final=True))
    log.info("%s: %d records read, %d OOM kills", what, count, len(kills))
    if assembler.not_understood:
        log.warning(
            "%s: %d OOM report line(s) not understood, skipped (%s)",
            what,
            assembler.not_understood,
            _listed(assembler.not_understood_positions, assembler.not_understood),
        )
    return kills


def _listed(positions: Sequence[str | None], count: int) -> str:
    shown = ", ".join(str(p) for p in positions)
    return shown + (", …" if count > len(positions) else "")


def scan(
    settings: Settings, source: KernelLogSource, since: datetime | None, metrics: Metrics
) -> list[Finding]:
    periodic = PeriodicCollectors(
        build_collectors(settings, metrics, ClusterDnsSource(settings)), metrics
    )
    node_findings: list[Finding] = []
    for run in periodic.run_once():
        node_findings += run.findings + run.failures(settings.node_name)
    source.start(since=since)
    table_full = TableFullLog()
    kills = assemble(source.records(), f"{source.name} kernel log", [table_full])
    live = LiveEvidence(MemcgProbe(settings.host_root), settings.live_evidence_window)
    containers = ContainerLookup(containerd_client(settings))
    oom = OomFindings(settings.node_name, live, containers).for_log(kills)
    if containers.down_reason is not None:  # the kills are there, their pod names are not
        why = f"{containers.down_reason}: OOM findings carry pod uid and container id only"
        node_findings.append(collector_failed(settings.node_name, "kernel_log", "containerd", why))
    log_findings = findings_from_log(settings.node_name, table_full.take(), "the kernel log")
    return oom + log_findings + node_findings


def analyze(
    settings: Settings,
    kernel_log: Path | None,
    iptables_save: Path | None = None,
    nft_json: Path | None = None,
    pod_cidrs: Sequence[str] = (),
    *,
    year: int | None = None,
) -> list[Finding]:
    """``year``: of the first year-less time stamp (syslog, ``journalctl -o short``)."""
    findings: list[Finding] = []
    if kernel_log is not None:
        reading = LogReading()
        table_full = TableFullLog()
        kills = assemble(
            read_kernel_log_file(kernel_log, year=year, reading=reading),
            str(kernel_log),
            [table_full],
        )
        _say_what_was_not_read(kernel_log, reading)
        findings += OomFindings(settings.node_name, live=None).for_log(kills)
        findings += findings_from_log(settings.node_name, table_full.take(), str(kernel_log))
    if iptables_save is not None or nft_json is not None:
        from collectors.firewall_collector import findings_from_files
        from collectors.node_facts import dump_facts

        iptables_text, nft_text = _read_text(iptables_save), _read_text(nft_json)
        facts = dump_facts(iptables_text, nft_text, settings.cluster_dns, pod_cidrs)
        findings += findings_from_files(
            iptables_text, nft_text, facts.cluster_dns, settings.node_name, facts
        )
    return findings


def _say_what_was_not_read(path: Path, reading: LogReading) -> None:
    if reading.not_understood:
        lines = [f"line {n}" for n in reading.not_understood_lines]
        log.warning(
            "%s: %d line(s) in no log format understood, skipped (%s)",
            path,
            reading.not_understood,
            _listed(lines, reading.not_understood),
        )
    if reading.year_source is not None and reading.year_source != "--year":
        log.info(
            "%s: its time stamps have no year; %s (findings say year_inferred; "
            "--year YYYY sets it)",
            path,
            reading.year_source,
        )


def _read_text(path: Path | None) -> str | None:
    return path.read_text(errors="replace") if path is not None else None
