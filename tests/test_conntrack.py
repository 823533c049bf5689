"""Conntrack collector: stat parsing and kernel-log vectors (unit), then real kernel state in
network namespaces the tests create: flows counted against ``conntrack -S`` / ``-C``, and a
table filled to the kernel's own limit so that a real packet is dropped and the kernel itself
logs "table full"."""

from __future__ import annotations

import errno
import shutil
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import conntrack_fill
import pytest
import realkernel
from nodenet import NodeNetns, throwaway_netns
from prometheus_client import CollectorRegistry

from agent.kernel_watch import KernelWatch
from agent.metrics import Metrics
from agent.oom_findings import OomFindings
from collectors.conntrack import (
    INITIAL_NETNS,
    ConntrackCollector,
    ConntrackReading,
    LogEvents,
    TableFullLog,
    findings_from_log,
    judge,
    parse_stat,
    table_full_events,
    table_full_netns,
)
from collectors.dns_probe import run_in_netns
from collectors.finding import Finding
from collectors.kmsg import KmsgSource
from collectors.logfile import parse_kernel_log_text
from collectors.records import KernelRecord

# /proc/net/stat/nf_conntrack of kernel 6.18, two CPUs (recorded on the test machine with a
# full table: entries 0x40000 = 262144, one drop on CPU 0)
STAT_6_18 = """\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00040000  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00032700 00000000 00000001 00000000 00000000  00000000 00000000 00000000 00000000
00040000  00000003 00000000 00000000 00000000 00000000 00000000 00000000 0000d900 00000002 00000000 00000000 00000000  00000000 00000000 00000000 00000000
"""  # noqa: E501

# Kernel 4.9 (Debian 9): "searched" and "delete_list" columns, no clashres/chainlength
STAT_4_9 = """\
entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000010  00000000 0000001a 00000000 00000002 00000c2e 00000000 00000000 00000000 00000005 00000000 00000004 00000000  00000000 00000000 00000000 00000000
00000010  00000000 00000003 00000000 00000000 00000001 00000000 00000000 00000000 00000007 00000000 00000001 00000000  00000000 00000000 00000000 00000000
"""  # noqa: E501

# The kernel's own format strings (net/netfilter/nf_conntrack_core.c, __nf_conntrack_alloc;
# pr_fmt adds "nf_conntrack: "), as /dev/kmsg, dmesg and journalctl -k show them.
TABLE_FULL_LINES = {
    # 6.17+: the initial namespace, and any other one by its inode number
    "nf_conntrack: nf_conntrack: table full, dropping packet": INITIAL_NETNS,
    "nf_conntrack: nf_conntrack: table full in netns 4026532247, dropping packet": 4026532247,
    # 4.x-6.16 printed the first form everywhere; 2.6.32 (RHEL 6) ended with a full stop
    "nf_conntrack: table full, dropping packet.": INITIAL_NETNS,
    "nf_conntrack: table full, dropping packet": INITIAL_NETNS,
    "ip_conntrack: table full, dropping packet.": INITIAL_NETNS,
}
NOT_TABLE_FULL = [
    "net_ratelimit: 3939 callbacks suppressed",
    "nf_conntrack: default automatic helper assignment has been turned off",
    "nf_conntrack version 0.5.0 (65536 buckets, 262144 max)",
    "xt_hashlimit: table full, dropping packet",  # not conntrack
    "EXT4-fs: the table full, dropping packet would be odd but is not conntrack's",
]


def test_parse_stat_by_header_sums_cpus() -> None:
    stats = parse_stat(STAT_6_18)
    assert stats is not None
    assert stats.cpus == 2
    assert stats.entries == 262144  # not summed: every row carries the namespace's count
    assert stats.get("drop") == 1
    assert stats.get("insert_failed") == 2
    assert stats.get("clashres") == 3
    assert stats.get("insert") == 0x32700 + 0xD900 == 262144
    old = parse_stat(STAT_4_9)
    assert old is not None
    assert (old.get("insert_failed"), old.get("early_drop"), old.get("ignore")) == (12, 5, 0xC2F)
    assert old.get("clashres") is None


def test_parse_stat_skips_what_it_does_not_understand() -> None:
    header = STAT_6_18.splitlines()[0]
    row = STAT_6_18.splitlines()[1]
    text = "\n".join([header, row, "0000zz00 " + row[9:], row.rsplit(" ", 1)[0], ""])
    stats = parse_stat(text)
    assert stats is not None and stats.cpus == 1 and stats.get("drop") == 1
    assert parse_stat("") is None
    assert parse_stat(row) is None  # no header row: not guessed by position
    headless = parse_stat(header)
    assert headless is not None and headless.cpus == 0 and headless.get("drop") is None


@pytest.mark.parametrize("line", sorted(TABLE_FULL_LINES))
def test_table_full_vectors(line: str) -> None:
    assert table_full_netns(line) == TABLE_FULL_LINES[line]


@pytest.mark.parametrize("line", NOT_TABLE_FULL)
def test_other_lines_are_not_table_full(line: str) -> None:
    assert table_full_netns(line) is None


def test_table_full_in_every_kernel_log_shape() -> None:
    """dmesg, dmesg -T, journalctl -k and raw /dev/kmsg lines of the same message."""
    text = "\n".join(
        [
            "[  432.063680] nf_conntrack: nf_conntrack: table full in netns 4026532247,"
            " dropping packet",
            "[Mon Nov 30 08:40:01 2026] nf_conntrack: nf_conntrack: table full, dropping packet",
            "Nov 30 08:40:02 node-1 kernel: nf_conntrack: table full, dropping packet",
            "4,1234,432063680,-;nf_conntrack: nf_conntrack: table full, dropping packet",
            "[  433.000000] net_ratelimit: 12 callbacks suppressed",
        ]
    )
    for line in text.splitlines():
        records = list(parse_kernel_log_text([line], year=2026))
        expected = 0 if "ratelimit" in line else 1
        assert table_full_events(records).count == expected, line
    events = table_full_events(parse_kernel_log_text(text.splitlines(), year=2026))
    assert events.count == 4
    assert events.namespaces == (4026532247, INITIAL_NETNS)


def test_log_take_resets_and_keeps_first_and_last() -> None:
    log = TableFullLog()
    t0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    for i in range(3):
        log.feed(KernelRecord("nf_conntrack: table full, dropping packet", t0 + timedelta(i)))
    log.feed(KernelRecord("something else", t0))
    events = log.take()
    assert (events.count, events.first, events.last) == (3, t0, t0 + timedelta(2))
    assert log.take() == LogEvents()


def test_judge_first_reading_counts_totals_then_rises() -> None:
    stats = parse_stat(STAT_6_18)
    reading = ConntrackReading(100, 262144, stats)
    first = judge(reading, None, LogEvents())
    assert first.table_full == ["drop"] and first.drops == 1 and first.insert_failed == 2
    again = judge(reading, stats, LogEvents())
    assert again.table_full == [] and again.insert_failed == 0
    full = judge(ConntrackReading(262144, 262144, stats), stats, LogEvents(count=2))
    assert full.table_full == ["at_max", "kernel_log"]
    old = parse_stat(STAT_4_9)
    # counters that went down (a reboot, another namespace) count from zero
    assert judge(ConntrackReading(1, 10, stats), old, LogEvents()).insert_failed == 2


def test_findings_from_log_alone() -> None:
    assert findings_from_log("n", LogEvents(), "x") == []
    t = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
    [finding] = findings_from_log("node-1", LogEvents(3, t, t, (INITIAL_NETNS, 77)), "dmesg.txt")
    assert finding.reason == "ConntrackTableFull"
    assert finding.subject.kind == "Node" and finding.subject.name == "node-1"
    assert finding.details["evidence"] == ["kernel_log"]
    assert "node's network namespace" in finding.message and "77" in finding.message
    assert finding.details["fix"].startswith("sysctl -w net.netfilter.nf_conntrack_max=")


def test_collector_on_a_fixture_proc(tmp_path: Path) -> None:
    netfilter = tmp_path / "sys" / "net" / "netfilter"
    netfilter.mkdir(parents=True)
    (netfilter / "nf_conntrack_count").write_text("262144\n")
    (netfilter / "nf_conntrack_max").write_text("262144\n")
    stat = tmp_path / "thread-self" / "net" / "stat"
    stat.mkdir(parents=True)
    (stat / "nf_conntrack").write_text(STAT_6_18)
    registry = CollectorRegistry()
    log = TableFullLog()
    log.feed(KernelRecord("nf_conntrack: nf_conntrack: table full, dropping packet"))
    collector = ConntrackCollector("node-1", registry, proc=tmp_path, log=log)
    full, races = collector.collect()
    assert full.reason == "ConntrackTableFull"
    assert full.details["evidence"] == ["at_max", "drop", "kernel_log"]
    assert races.reason == "ConntrackInsertFailures"
    assert races.details["counters"]["insert_failed"] == 2
    assert registry.get_sample_value("nodediag_conntrack_entries") == 262144
    assert registry.get_sample_value("nodediag_conntrack_insert_failed_total") == 2
    (netfilter / "nf_conntrack_count").write_text("10\n")
    assert collector.collect() == []  # nothing new since the last run
    (stat / "nf_conntrack").write_text("garbage\n")
    collector.sources.start()
    assert collector.collect() == []
    failed = {r.source: r.status for r in collector.sources.results()}
    assert failed == {"nf_conntrack_count": "ok", "nf_conntrack_max": "ok", "stat": "failed"}
    assert registry.get_sample_value("nodediag_conntrack_drops_total") is None  # not stale


def test_collector_without_conntrack_loaded(tmp_path: Path) -> None:
    collector = ConntrackCollector("n", CollectorRegistry(), proc=tmp_path)
    assert collector.collect() == []
    assert {r.status for r in collector.sources.results()} == {"skipped"}


# ------------------------------------------------------------------ real kernel (root)


def conntrack_tool() -> None:
    if shutil.which("conntrack") is None:
        realkernel.skip_or_fail("conntrack not found (Debian conntrack)")
    if shutil.which("nft") is None:
        realkernel.skip_or_fail("nft not found (Debian nftables)")


def track_output(ns: NodeNetns) -> None:
    """A rule that uses conntrack, so the kernel tracks this namespace's packets."""
    ns.run(
        "nft",
        "add table ip nodediag; add chain ip nodediag out"
        " { type filter hook output priority 0; }; add rule ip nodediag out ct state new counter",
    )


def send_udp(ns: NodeNetns, port: int) -> int:
    """One UDP datagram to 127.0.0.1:port from inside the namespace; the errno (0: sent)."""

    def send() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(b"x", ("127.0.0.1", port))
            except OSError as error:
                return error.errno or -1
            return 0

    return run_in_netns(ns.name, send)


def conntrack_stats(ns: NodeNetns) -> dict[str, int]:
    """``conntrack -S`` summed over CPUs (ctnetlink, not the proc file we parse)."""
    totals: dict[str, int] = {}
    for line in ns.run("conntrack", "-S").splitlines():
        for word in line.split()[1:]:
            name, _, value = word.partition("=")
            if value.isdigit():
                totals[name] = totals.get(name, 0) + int(value)
    return totals


@pytest.mark.root
def test_real_flows_match_conntrack_tool() -> None:
    conntrack_tool()
    with throwaway_netns() as ns:
        track_output(ns)
        for port in range(40000, 40025):
            assert send_udp(ns, port) == 0
        registry = CollectorRegistry()
        collector = ConntrackCollector("node-1", registry, netns=ns.name)
        assert collector.collect() == []
        count = int(ns.run("conntrack", "-C").strip())
        assert count >= 25  # the UDP flows (and the ICMP port-unreachable replies' flows)
        assert registry.get_sample_value("nodediag_conntrack_entries") == count
        host_max = int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
        assert registry.get_sample_value("nodediag_conntrack_max") == host_max
        reading = collector.read()
        assert reading is not None and reading.stats is not None
        tool = conntrack_stats(ns)
        for name in ("insert", "insert_failed", "drop", "early_drop", "found", "invalid"):
            if name in tool and reading.stats.get(name) is not None:
                assert reading.stats.get(name) == tool[name], name


@pytest.mark.root
def test_a_real_full_table_drops_and_the_kernel_says_so() -> None:
    """The namespace is filled to the global nf_conntrack_max (read-only in a namespace here)
    with assured entries; the next real packet is dropped by the kernel (EPERM at sendto,
    ``drop`` +1) and the kernel logs "table full in netns <inode>" — read from /dev/kmsg by
    the live kernel-log loop with the conntrack observer, as ``run`` does."""
    conntrack_tool()
    limit = int(Path("/proc/sys/net/netfilter/nf_conntrack_max").read_text())
    if limit > 1_100_000:
        pytest.skip(f"nf_conntrack_max {limit}: too many entries to fill in a test")
    with throwaway_netns() as ns:
        # The limit is the host's: read-only (0444) in a namespace, never written here.
        mode = ns.run("stat", "-c", "%a", "/proc/sys/net/netfilter/nf_conntrack_max")
        assert mode.strip() == "444"
        track_output(ns)
        made = run_in_netns(ns.name, lambda: conntrack_fill.fill(limit + 5))
        assert made == limit  # the kernel refused every entry past its limit
        table_full = TableFullLog()
        source = KmsgSource()
        source.start()
        oom: list[Finding] = []
        watch = KernelWatch(
            source, OomFindings("node-1", live=None), oom.append, Metrics(), observers=[table_full]
        )
        watch.drain()  # the log so far
        table_full.take()
        codes = [send_udp(ns, 9) for _ in range(3)]
        assert codes == [errno.EPERM] * 3  # netfilter dropped them
        watch.drain()
        # The message is rate limited host-wide (net_ratelimit: 10 per 5 s, shared with
        # every other net_warn_ratelimited): another drop a little later if none got out.
        deadline = time.monotonic() + 12
        while not table_full.pending and time.monotonic() < deadline:
            time.sleep(1)
            codes.append(send_udp(ns, 9))
            watch.drain()
        source.close()

        # The collector takes what the log loop fed, as in `run`.
        registry = CollectorRegistry()
        collector = ConntrackCollector("node-1", registry, netns=ns.name, log=table_full)
        [finding] = collector.collect()
        assert finding.reason == "ConntrackTableFull"
        assert finding.details["evidence"] == ["at_max", "drop", "kernel_log"]
        counters = finding.details["counters"]
        assert counters["kernel_log_messages"] >= 1
        assert counters["kernel_log_namespaces"] == [ns.inode]  # the kernel named this one
        # ... which is the namespace the collector read: the node's
        assert "in the node's network namespace" in finding.message
        assert set(codes) == {errno.EPERM}
        # one drop per datagram sent, by the kernel's own count (conntrack -S) and ours
        assert finding.details["counters"]["drop"] == conntrack_stats(ns)["drop"] == len(codes)
        assert registry.get_sample_value("nodediag_conntrack_entries") == limit
        assert (
            registry.get_sample_value("nodediag_conntrack_drops_total")
            == conntrack_stats(ns)["drop"]
        )


def test_analyze_reports_table_full_from_a_dmesg_file(tmp_path: Path) -> None:
    from agentproc import json_lines, nodediag

    log = tmp_path / "dmesg.txt"
    log.write_text(
        "[  100.000000] eth0: link up\n"
        "[  408.208657] nf_conntrack: nf_conntrack: table full, dropping packet\n"
        "[  413.208660] net_ratelimit: 3939 callbacks suppressed\n"
        "[  413.208663] nf_conntrack: nf_conntrack: table full, dropping packet\n"
    )
    result = nodediag("analyze", "--kernel-log", str(log), "--json", "--node-name", "node-1")
    assert result.returncode == 1, result.stderr
    [finding] = json_lines(result.stdout)
    assert finding["reason"] == "ConntrackTableFull"
    assert finding["details"]["counters"]["kernel_log_messages"] == 2
    assert finding["details"]["counters"]["kernel_log_namespaces"] == [0]  # the node's own
    assert finding["details"]["source"] == str(log)
    quiet = tmp_path / "quiet.txt"
    quiet.write_text("[  100.000000] eth0: link up\n")
    assert nodediag("analyze", "--kernel-log", str(quiet), "--json").returncode == 0
