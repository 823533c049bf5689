"""The lab's evidence of what the kernel dropped: the drop/reject counters of iptables rules
and policies, native nft rules that count, and ``nft monitor trace``'s stops (tests/netlab.py)."""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from collectors.dns_probe import run_in_netns

if TYPE_CHECKING:
    from netlab import Netns


def stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, and SIGKILL when it has not ended 10 s later. On a busy machine a killed
    firewalld was once seen to take longer than 10 s to end (in the kernel still)."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=60)


_IPT_POLICY = re.compile(r"^:(\S+) (ACCEPT|DROP) \[(\d+):\d+\]")
_IPT_RULE = re.compile(r"^\[(\d+):\d+\] -A (\S+) (.*)$")
_DROPPING = re.compile(r"-j (DROP|REJECT)\b")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def iptables_drop_counters(text: str, source: str) -> dict[str, int]:
    """``iptables-save -c`` text -> {"source table chain rule-or-policy": packets} for every
    DROP/REJECT rule and DROP policy."""
    counters: dict[str, int] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif match := _IPT_POLICY.match(line):
            chain, policy, packets = match.groups()
            if policy == "DROP":
                counters[f"{source} {table} {chain} policy DROP"] = int(packets)
        elif (match := _IPT_RULE.match(line)) and _DROPPING.search(
            _QUOTED.sub('""', match.group(3))
        ):
            packets, chain, rule = match.groups()
            key = f"{source} {table} {chain} {rule}"
            counters[key] = counters.get(key, 0) + int(packets)
    return counters


def _nft_expr_verdict(expr: Sequence[dict[str, object]]) -> str | None:
    for statement in expr:
        for verdict in ("drop", "reject"):
            if verdict in statement:
                return verdict
    return None


def nft_drop_counters(ruleset: dict[str, object], skip: set[tuple[str, str]]) -> dict[str, int]:
    """``nft -j list ruleset`` -> counters of native nft drop/reject rules that count
    (``counter`` statement); the tables in ``skip`` (iptables-nft's: (family, name)) are read
    from iptables-save instead."""
    counters: dict[str, int] = {}
    items = ruleset.get("nftables", [])
    assert isinstance(items, list)
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        expr = rule.get("expr", [])
        verdict = _nft_expr_verdict(expr)
        counted = [s["counter"] for s in expr if isinstance(s, dict) and "counter" in s]
        if verdict is None or not counted or (rule["family"], rule["table"]) in skip:
            continue
        key = f"nft {rule['family']} {rule['table']} {rule['chain']} handle {rule['handle']}"
        counters[key] = int(counted[0]["packets"])
    return counters


def rose(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        key: after[key] - before.get(key, 0) for key in after if after[key] > before.get(key, 0)
    }


_TRACE_TABLE = """
table {family} nodediag_lab_trace {{
    chain pre {{ type filter hook prerouting priority -500; meta nftrace set 1; }}
    chain out {{ type filter hook output priority -500; meta nftrace set 1; }}
}}
"""
_TRACE_STOP = re.compile(
    r"^trace id \S+ (\S+) (\S+) (\S+) (?:rule .*# handle (\d+) \(verdict drop\)|policy drop)"
)


def trace_stops(lines: Sequence[str], skip: set[tuple[str, str]]) -> dict[str, int]:
    """``nft --handle monitor trace`` lines -> the drop/reject stops they show: {"nft FAMILY
    TABLE CHAIN handle N" or "nft FAMILY TABLE CHAIN policy drop": packets}, leaving out the
    tables in ``skip`` ((family, name))."""
    stops: dict[str, int] = {}
    for line in lines:
        match = _TRACE_STOP.match(line)
        if match is None or (match.group(1), match.group(2)) in skip:
            continue
        family, table, chain, handle = match.groups()
        key = f"nft {family} {table} {chain} " + (f"handle {handle}" if handle else "policy drop")
        stops[key] = stops.get(key, 0) + 1
    return stops


def _poke_loopback() -> None:
    # A rule may drop it (EPERM): it is traced all the same.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(b"", ("127.0.0.1", 9))


class Tracer:
    """``nft monitor trace`` in the node's namespace while a table there marks every IPv4
    packet (``family`` ``inet``: IPv6 too) for tracing: which nft rule or chain policy dropped
    (or rejected) each packet. It names the stops of native nft tables, which count nothing
    unless a rule says ``counter``; iptables' tables (``skip``) are read from their counters
    instead."""

    def __init__(self, node: Netns, skip: set[tuple[str, str]], family: str = "ip") -> None:
        self.node = node
        self.skip = skip
        self.family = family
        self.lines: list[str] = []
        node.run(["nft", "-f", "-"], stdin=_TRACE_TABLE.format(family=family))
        self.monitor = subprocess.Popen(
            ["ip", "netns", "exec", node.name, "nft", "--handle", "monitor", "trace"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self._wait_subscribed()
        except BaseException:
            self.close()
            raise

    def _wait_subscribed(self) -> None:
        """Pokes the node's loopback until the monitor shows a trace: then it listens."""
        deadline = time.monotonic() + 10
        while not self.lines:
            if self.monitor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nft monitor trace showed nothing")
            run_in_netns(self.node.name, _poke_loopback)
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.monitor.stdout is not None
        for line in self.monitor.stdout:
            self.lines.append(line)

    def stops(self, since: int) -> dict[str, int]:
        """The stops traced since line ``since`` (see :func:`trace_stops`)."""
        return trace_stops(self.lines[since:], self.skip)

    def close(self) -> None:
        stop(self.monitor)
        self.reader.join(timeout=5)
        self.node.run(["nft", "delete", "table", self.family, "nodediag_lab_trace"])


def iptables_tables(dumps: dict[str, str]) -> set[tuple[str, str]]:
    """(nft family, table) of the tables iptables-nft shows."""
    return {
        (family, table)
        for family, suffix in (("ip", "iptables-save"), ("ip6", "ip6tables-save"))
        for table in re.findall(r"^\*(\S+)", dumps[suffix], re.M)
    }
