"""Findings on stdout: JSON lines, or a report a person reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from collectors.finding import Finding

EXIT_CLEAN, EXIT_WARNINGS, EXIT_FAILED = 0, 1, 2


def exit_code(findings: Sequence[Finding]) -> int:
    """1: warning findings (a fault to fix, even if something else could not be checked);
    else 2 when something could not be checked (``error`` findings); else 0: everything
    was checked and nothing is wrong."""
    if any(f.severity == "warning" for f in findings):
        return EXIT_WARNINGS
    if any(f.severity == "error" for f in findings):
        return EXIT_FAILED
    return EXIT_CLEAN


def write_json_lines(findings: Sequence[Finding], out: TextIO) -> None:
    for finding in findings:
        out.write(finding.to_json() + "\n")


def write_report(findings: Sequence[Finding], out: TextIO, *, title: str) -> None:
    """The faults found, then what could not be checked (never "No faults found" then)."""
    faults = [f for f in findings if f.severity != "error"]
    unchecked = [f for f in findings if f.severity == "error"]
    warnings = sum(1 for f in faults if f.severity == "warning")
    counts = f"{len(faults)} finding(s), {warnings} warning(s)"
    if unchecked:
        counts += f", {len(unchecked)} thing(s) not checked"
    out.write(f"{title}: {counts}\n")
    if unchecked:
        out.write("\nCOULD NOT CHECK (a fault there would not show here):\n")
        out.writelines(f"  - {_unchecked(f)}\n" for f in unchecked)
    if not faults:
        out.write(
            "\nNo faults found in what could be checked.\n" if unchecked else "No faults found.\n"
        )
    for finding in faults:
        out.write("\n" + _describe(finding))


def _unchecked(finding: Finding) -> str:
    details = finding.details
    what = details.get("source") or f"the {details.get('collector')} collector"
    return f"{what} ({details.get('collector')}): {details.get('error')}"


def _describe(finding: Finding) -> str:
    when = finding.time.isoformat(timespec="seconds") if finding.time else "time unknown"
    lines = [f"{finding.severity.upper()} {finding.reason} at {when} on {_subject(finding)}"]
    lines.append(f"  {finding.message}")
    basis = finding.details.get("basis")
    if basis:
        lines.append(f"  evidence: {basis}")
    memcg = finding.details.get("memcg")
    if memcg:
        lines.append(f"  memory cgroup: {memcg}")
    return "\n".join(lines) + "\n"


def _subject(finding: Finding) -> str:
    subject = finding.subject
    if subject.kind == "Node":
        return f"node {subject.name}"
    pod = f"{subject.namespace}/{subject.name}" if subject.name else f"uid {subject.uid}"
    container = subject.container or (subject.container_id or "")[:12] or "?"
    return f"pod {pod} container {container}"
