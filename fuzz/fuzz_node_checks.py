"""Fuzz the node checks' parsers: ``collectors/conntrack.py`` ``parse_stat`` and
``table_full_netns``; ``collectors/cluster_dns.py`` ``nameservers`` and
``k3s_valid_resolv_conf``.

Input: a first byte choosing the parser (mod 3), then ``/proc/net/stat/nf_conntrack`` text,
kernel messages (one per line) or resolv.conf text. Seeds: the stat files and kernel-log
vectors of tests/test_conntrack.py, this machine's stat file and /etc/resolv.conf, the
resolv.conf shapes of tests/test_resolver.py.

Invariants (by design, see the functions' docstrings):
- nothing raises;
- stat: ``None`` exactly when the first non-blank line's first word is not ``entries``; the
  CPU rows used are at most the rows; with one used, the totals are the header's names
  (``entries`` aside), every one a non-negative int;
- table full: a namespace number only for a line holding "table full" and "dropping packet";
- nameservers: every one a valid IP from a ``nameserver`` line; a file K3s takes as valid
  has at least one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import sys
from pathlib import Path

import _common
import atheris

_common.enable_hooks(atheris)
with atheris.instrument_imports(include=["collectors"]):
    from collectors.cluster_dns import k3s_valid_resolv_conf, nameservers
    from collectors.conntrack import parse_stat, table_full_netns


def check_stat(text: str) -> None:
    stats = parse_stat(text)
    rows = [line.split() for line in text.splitlines() if line.strip()]
    assert (stats is None) == (not rows or rows[0][:1] != ["entries"]), text[:200]
    if stats is None:
        return
    assert 0 <= stats.cpus <= len(rows) - 1
    if stats.cpus:
        assert list(stats.totals) == rows[0][1:] or len(set(rows[0])) < len(rows[0])
        assert all(isinstance(v, int) and v >= 0 for v in stats.totals.values())
        assert stats.entries is not None and stats.entries >= 0


def check_table_full(text: str) -> None:
    for line in text.splitlines():
        netns = table_full_netns(line)
        if netns is not None:
            assert netns >= 0 and "table full" in line and "dropping packet" in line, line


def check_resolv_conf(text: str) -> None:
    servers = nameservers(text)
    lines = [line.split() for line in text.splitlines()]
    assert len(servers) <= sum(1 for w in lines if w[:1] == ["nameserver"])
    for server in servers:
        ipaddress.ip_address(server)
    if k3s_valid_resolv_conf(text):
        assert servers, text[:200]


CHECKS = (check_stat, check_table_full, check_resolv_conf)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    CHECKS[data[0] % len(CHECKS)](data[1:].decode("utf-8", "replace"))


STAT = (
    "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop "
    "early_drop icmp_error  expect_new expect_create expect_delete search_restart\n"
    "00040000  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00032700 "
    "00000000 00000001 00000000 00000000  00000000 00000000 00000000 00000000\n"
)
MESSAGES = (
    "nf_conntrack: nf_conntrack: table full, dropping packet\n"
    "nf_conntrack: nf_conntrack: table full in netns 4026532247, dropping packet\n"
    "ip_conntrack: table full, dropping packet.\n"
    "net_ratelimit: 3939 callbacks suppressed\n"
)
RESOLV = (
    "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n",
    "nameserver 192.168.1.1\nnameserver 2001:db8::53\nnameserver fe80::1%eth0\n",
)


def seeds() -> list[bytes]:
    found = [b"\x00" + STAT.encode(), b"\x01" + MESSAGES.encode()]
    found += [b"\x02" + text.encode() for text in RESOLV]
    with contextlib.suppress(OSError):  # this machine's, when readable
        found.append(b"\x00" + Path("/proc/net/stat/nf_conntrack").read_bytes())
    with contextlib.suppress(OSError):
        found.append(b"\x02" + Path("/etc/resolv.conf").read_bytes())
    return found


DICTIONARY = [
    b"entries",
    b"insert_failed",
    b"nf_conntrack: ",
    b"table full",
    b" in netns ",
    b", dropping packet",
    b"nameserver ",
    b"127.0.0.53",
    b"::1",
    b"%",
]


if __name__ == "__main__":
    atheris.Setup(_common.libfuzzer_argv("node_checks", seeds(), DICTIONARY), test_one_input)
    atheris.Fuzz()
    sys.exit(0)
