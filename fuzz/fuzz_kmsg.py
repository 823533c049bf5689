"""Fuzz the raw /dev/kmsg record parser (collectors/kmsg.py ``parse_kmsg_record``).

Input: the bytes one ``read()`` of /dev/kmsg returns: ``prio,seq,usec,flags[,…];message``
and optional `` KEY=value`` lines. Seeds: the records of tests/vectors/oom_kmsg.log.

Invariants (by design, see the module and the kmsg format):
- nothing raises; the result is ``None`` unless the input starts with a record header;
- facility and level are the header's prio split (prio >> 3, prio & 7); seq and usec are
  the header's numbers; only the first line of the body is the message;
- the record's first line as text, parsed by the support-bundle parser
  (collectors/logfile.py) as /dev/kmsg text, has the same seq, uptime, kernel/userspace
  facility and (without ``\\x`` escapes) message.
"""

from __future__ import annotations

import re
import sys

import _common
import atheris

_common.enable_hooks(atheris)
with atheris.instrument_imports(include=["collectors"]):
    from collectors.kmsg import parse_kmsg_record
    from collectors.logfile import parse_kernel_log_text

# prio fits 32 bits, seq and usec 64 bits: at most 10 and 20 digits.
_HEADER = re.compile(rb"([0-9]{1,10}),([0-9]{1,20}),([0-9]{1,20}),[^;]*;")
_PRINTABLE = re.compile(rb"[\x20-\x7e]*")


def test_one_input(data: bytes) -> None:
    record = parse_kmsg_record(data)
    header = _HEADER.match(data)
    if header is None:
        assert record is None, (data, record)
        return
    assert record is not None, data
    prio, seq, usec = (int(group) for group in header.groups())
    assert (record.facility, record.level) == (prio >> 3, prio & 7), (record, prio)
    assert (record.seq, record.usec) == (seq, usec), record
    body = data[header.end() :].split(b"\n", 1)[0]
    assert len(record.message) <= len(body), record
    if "\n" in record.message:  # only from an escaped \x0a
        assert b"\\x0a" in body.lower(), record
    # The same record (its first line) in a support bundle's /dev/kmsg text.
    first = data.split(b"\n", 1)[0]
    in_first = header.end() <= len(first)  # "[^;]*" of the flags may run past a newline
    if in_first and _PRINTABLE.fullmatch(first) and max(map(len, header.groups())) <= 10:
        found = list(parse_kernel_log_text([first.decode()]))
        line = found[0] if found else None
        if prio >> 3 == 0:
            assert line is not None and line.position == f"seq {seq}", (line, record)
            assert line.uptime == usec / 1e6, (line, record)
            if b"\\x" not in body:
                assert line.message == record.message, (line, record)
        else:
            assert line is None, line  # userspace facilities are skipped


def seeds() -> list[bytes]:
    records: list[bytes] = []
    for text in _common.vector_bytes("oom_kmsg.log"):
        for line in text.splitlines(keepends=True):
            if line.startswith(b" ") and records:
                records[-1] += line
            else:
                records.append(line)
    records += [b"4,1,2,-;tab\\x09here", b"14,7,8,-,caller=T1;from userspace\n KEY=v\n"]
    return records


DICTIONARY = [
    b",-;",
    b",c;",
    b",caller=T1796;",
    b"\\x0a",
    b"\\x09",
    b"\n SUBSYSTEM=",
    b"\n DEVICE=",
]


if __name__ == "__main__":
    atheris.Setup(_common.libfuzzer_argv("kmsg", seeds(), DICTIONARY), test_one_input)
    atheris.Fuzz()
    sys.exit(0)
