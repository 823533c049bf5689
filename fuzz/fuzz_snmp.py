"""Fuzz the ``/proc/net/snmp`` parser (collectors/vxlan.py ``parse_snmp``,
``udp_in_csum_errors``).

Input: ``/proc/net/snmp`` text. Seeds: this machine's /proc/net/snmp (when readable), the
kernel 6.18 and 3.10 samples of tests/test_vxlan.py and a reordered-fields sample.

Invariants (by design, see ``parse_snmp``'s docstring):
- nothing raises; lines that do not pair up are skipped;
- every protocol in the result comes from a header line followed by a values line with the
  same prefix, the fields matched by name: the result equals the pairing of some such two
  consecutive lines of the input;
- ``udp_in_csum_errors`` is the ``Udp`` table's ``InCsumErrors`` (``None`` without one).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from pathlib import Path

import _common
import atheris

_common.enable_hooks(atheris)
with atheris.instrument_imports(include=["collectors"]):
    from collectors.vxlan import parse_snmp, udp_in_csum_errors


def _pairs(lines: list[str], prefix: str) -> list[dict[str, int]]:
    """The tables consecutive ``prefix:`` header and values lines of ``lines`` would give."""
    found = []
    for header, values in itertools.pairwise(lines):
        if header.partition(":")[0] != prefix or values.partition(":")[0] != prefix:
            continue
        names, numbers = header.partition(":")[2].split(), values.partition(":")[2].split()
        try:
            found.append(dict(zip(names, map(int, numbers), strict=True)))
        except ValueError:
            continue
    return found


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    table = parse_snmp(text)
    lines = text.splitlines()
    for prefix, fields in table.items():
        assert all(isinstance(value, int) for value in fields.values()), (prefix, fields)
        assert fields in _pairs(lines, prefix), (prefix, fields)
    assert udp_in_csum_errors(text) == table.get("Udp", {}).get("InCsumErrors")


SNMP_6_18 = (
    "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors "
    "IgnoredMulti MemErrors\n"
    "Udp: 122 0 57 123 0 0 42 0 0\n"
    "UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors "
    "IgnoredMulti MemErrors\n"
    "UdpLite: 0 0 0 0 0 0 7 0 0\n"
)
SNMP_3_10 = (
    "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\nUdp: 50 1 0 51 0 0\n"
)


def seeds() -> list[bytes]:
    found = [SNMP_6_18.encode(), SNMP_3_10.encode(), b"Udp: InCsumErrors InDatagrams\nUdp: 9 100\n"]
    with contextlib.suppress(OSError):  # this machine's counters, when it has them
        found.append(Path("/proc/net/snmp").read_bytes())
    return found


DICTIONARY = [b"Udp: ", b"UdpLite: ", b"Ip: ", b"InCsumErrors", b"InDatagrams", b"-1", b"\n"]


if __name__ == "__main__":
    atheris.Setup(_common.libfuzzer_argv("snmp", seeds(), DICTIONARY), test_one_input)
    atheris.Fuzz()
    sys.exit(0)
