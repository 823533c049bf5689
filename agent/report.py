"""Findings on stdout: JSON lines, or a report a person reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from collectors.finding import Finding


def exit_code(findings: Sequence[Finding]) -> int:
    """0: no warning findings; 1: warning findings (2, the agent failed, is the CLI's)."""
    return 1 if any(f.severity == "warning" for f in findings) else 0


def write_json_lines(findings: Sequence[Finding], out: TextIO) -> None:
    for finding in findings:
        out.write(finding.to_json() + "\n")


def write_report(findings: Sequence[Finding], out: TextIO, *, title: str) -> None:
    warnings = sum(1 for f in findings if f.severity == "warning")
    out.write(f"{title}: {len(findings)} finding(s), {warnings} warning(s)\n")
    if not findings:
        out.write("No faults found.\n")
    for finding in findings:
        out.write("\n" + _describe(finding))


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
