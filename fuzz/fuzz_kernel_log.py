"""Fuzz the kernel log text parser (collectors/logfile.py) and ``nodediag analyze``'s kernel
log path behind it: file → records → OOM assembler → findings.

Input: the bytes of a support-bundle kernel log (``dmesg``, ``dmesg -T``/``-x``,
``journalctl -k`` in its short forms, raw ``/dev/kmsg`` text). Seeds: tests/vectors/*.log.
The bytes are parsed as text (``parse_kernel_log_text``, with and without a year) and as a
file (``read_kernel_log_file``, which decodes and cuts lines itself).

Invariants (by design of the parser, see its module doc):
- nothing raises (the module doc: "never raises on malformed text");
- at most one record per input line, each record's message is text of its line;
- a record's position is ``line N`` (N a line of the input) or ``seq N``; a time has a zone;
- the OOM kills and findings obey fuzz_oom's invariants for the records' messages.
"""

from __future__ import annotations

import io
import os
import sys

import _common
import atheris
from fuzz_oom import check_kills, findings

_common.enable_hooks(atheris)
with atheris.instrument_imports(include=["collectors", "agent"]):
    from collectors.logfile import (
        MAX_LINE_LENGTH,
        detect_format,
        parse_kernel_log_text,
        read_kernel_log_file,
    )
    from collectors.oom import OomAssembler, OomKill
    from collectors.records import KernelRecord


LOG_FILE = _common.workdir("kernel_log") / "kernel.log"
FORMATS = {"kmsg", "dmesg", "dmesg-T", "journal-short", "journal-iso", "plain"}


def check_records(text: str, records: list[KernelRecord], *, exact: bool) -> None:
    """``exact``: ``text`` is the whole input, so every message must be found in it."""
    lines = text.count("\n") + 1
    assert len(records) <= lines, (len(records), lines)
    for record in records:
        assert isinstance(record.message, str)
        if exact:
            assert record.message in text, record
        assert record.position is not None
        kind, _, number = record.position.partition(" ")
        assert kind in ("line", "seq") and number.isdigit(), record
        if kind == "line":
            assert 1 <= int(number) <= lines, (record, lines)
        assert record.time is None or record.time.tzinfo is not None, record
        assert record.uptime is None or record.uptime >= 0, record


def assemble(records: list[KernelRecord]) -> list[OomKill]:
    assembler = OomAssembler()
    kills: list[OomKill] = []
    for record in records:
        kills.extend(assembler.feed(record))
    kills.extend(assembler.flush(final=True))
    assert assembler.idle
    return kills


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    lines = list(io.StringIO(text, newline="\n"))  # split at "\n" only, like the file
    assert detect_format(lines[:20]) in FORMATS
    for year in (None, 2026):
        records = list(parse_kernel_log_text(lines, year=year))
        check_records(text, records, exact=True)
    LOG_FILE.write_bytes(data)
    os.utime(LOG_FILE, (1_795_000_000, 1_795_000_000))  # a fixed mtime: reproducible years
    records = list(read_kernel_log_file(LOG_FILE))
    # Lines longer than the limit are cut in bytes, maybe inside a character.
    check_records(text, records, exact=len(data) < MAX_LINE_LENGTH)
    kills = assemble(records)
    check_kills([r.message for r in records], kills)
    findings(kills)


DICTIONARY = [
    b"6,1,1,-;",
    b"kern  :warn  : ",
    b"[  426.176037] ",
    b"[Wed Nov 25 07:41:49 2026] ",
    b"Nov 25 07:41:49 node kernel: ",
    b"2026-11-25T07:41:49+0000 node kernel: ",
    b"2026-11-25T07:41:49.123456+00:00 node kernel: ",
    b"Wed 2026-11-25 07:41:49 UTC node kernel: ",
    b"1795592509.236982 node kernel: ",
    b"-- Boot 3d12 --",
    b" SUBSYSTEM=",
    b"\xef\xbb\xbf",
]


if __name__ == "__main__":
    seeds = _common.vector_bytes("*.log") + _common.vector_bytes("oom/*.log")
    atheris.Setup(_common.libfuzzer_argv("kernel_log", seeds, DICTIONARY), test_one_input)
    atheris.Fuzz()
    sys.exit(0)
