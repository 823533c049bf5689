"""Inputs that made a parser raise, found by the atheris harnesses in fuzz/ (see its README),
or next to such a finding in the same code. Each test feeds the recorded input and checks
the documented outcome: no exception, and the input treated as bad (skipped, ``None``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from collectors.cluster_dns import discover
from collectors.firewall_collector import findings_from_files
from collectors.kmsg import parse_kmsg_record
from collectors.memcg import parse_oom_kill_counter, read_oom_kill_counters
from collectors.netfilter.dns_rules import dns_rule_hits
from collectors.netfilter.iptables import parse_iptables_rule, parse_iptables_save

# --- collectors/cluster_dns.py -----------------------------------------------------------

# fuzz_kubelet_config: selector 0x10 (etc/rancher/k3s/config.yaml), then this content.
# UnicodeDecodeError escaped _load_yaml (it caught only OSError and yaml.YAMLError).
K3S_CONFIG_NOT_UTF8 = b"- just\xfc\n- a list\n"


def _write(root: Path, relative: str, content: bytes) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_config_that_is_not_utf8_is_no_answer(tmp_path: Path) -> None:
    _write(tmp_path, "etc/rancher/k3s/config.yaml", K3S_CONFIG_NOT_UTF8)
    assert discover(tmp_path).source == "none"
    # The next source still answers.
    _write(tmp_path, "proc/100/cmdline", b"/usr/bin/kubelet\0--cluster-dns=10.43.0.10\0")
    found = discover(tmp_path)
    assert (found.servers, found.source) == (("10.43.0.10",), "kubelet --cluster-dns flag")


@pytest.mark.parametrize(
    "content",
    [
        # Scalars PyYAML resolves (timestamp, int) but cannot build: ValueError, not YAMLError.
        b"clusterDNS: 2026-02-30\n",
        b"clusterDNS: [10.96.0.10]\nstarted: 2026-13-01 25:00:00\n",
        b"clusterDNS: " + b"1" * 5000 + b"\n",
        # Nesting deeper than the recursion limit: RecursionError.
        b"clusterDNS: " + b"[" * 5000 + b"\n",
    ],
    ids=["impossible-date", "impossible-timestamp", "int-over-digit-limit", "deep-nesting"],
)
def test_kubelet_config_yaml_that_cannot_be_built_is_no_answer(
    tmp_path: Path, content: bytes
) -> None:
    _write(tmp_path, "var/lib/kubelet/config.yaml", content)
    assert discover(tmp_path).source == "none"


# --- collectors/netfilter/ ---------------------------------------------------------------

# fuzz_firewall (-max_len=1024): this rule line of a recorded iptables-save output, with
# "²" put before the port. "²".isdigit() is true but int("²") raises: ValueError escaped
# parse_iptables_rule (documented "never raises") and so dns_rule_hits and the CLI.
SUPERSCRIPT_PORT_RULE = "-A OUTPUT -p udp -m udp ! --dport \u00b253 -j DROP"


def test_port_with_a_digit_int_refuses_is_no_port() -> None:
    match = parse_iptables_rule(SUPERSCRIPT_PORT_RULE)
    assert match.dports == () and match.dports_negated
    assert parse_iptables_rule("-A OUTPUT -p udp --dport 53:\u00b2 -j DROP").dports == ()
    text = f"*filter\n:OUTPUT ACCEPT [0:0]\n{SUPERSCRIPT_PORT_RULE}\nCOMMIT\n"
    dns_rule_hits([parse_iptables_save(text)], ["10.43.0.10"])
    findings_from_files(text, None, ["10.43.0.10"], "node")


def test_numbers_over_the_digit_limit_do_not_raise() -> None:
    """Found reviewing the code of the crash above: int() refuses more than 4300 digits."""
    huge = "1" * 5000
    assert parse_iptables_rule(f"-A OUTPUT -p udp --dport {huge} -j DROP").dports == ()
    text = (
        f"*filter\n:OUTPUT ACCEPT [{huge}:0]\n[{huge}:1] -A OUTPUT -p udp --dport 53 -j DROP\n"
        "COMMIT\n"
    )
    ruleset = parse_iptables_save(text)
    output = ruleset.tables[0].chains["OUTPUT"]
    assert (output.policy, output.packets, output.rules) == ("ACCEPT", 0, [])


# --- collectors/kmsg.py and collectors/memcg.py (found reviewing the same pattern) --------


def test_kmsg_header_number_over_the_digit_limit_is_no_record() -> None:
    assert parse_kmsg_record(b"1" * 5000 + b",1,1,-;message") is None
    assert parse_kmsg_record(b"6," + b"1" * 21 + b",1,-;message") is None
    record = parse_kmsg_record(b"6,18446744073709551615,1,-;message")  # the largest u64
    assert record is not None and record.seq == 2**64 - 1


@pytest.mark.parametrize("value", ["\u00b2", "1" * 5000], ids=["superscript-two", "5000-digits"])
def test_oom_kill_counter_that_int_refuses_is_none(tmp_path: Path, value: str) -> None:
    text = f"low 0\nhigh 0\nmax 0\noom 1\noom_kill {value}\n"
    assert parse_oom_kill_counter(text) is None
    container = (
        tmp_path
        / "kubepods/burstable/pod11112222-3333-4444-5555-666677778888"
        / ("0123456789abcdef" * 4)
    )
    container.mkdir(parents=True)
    (container / "memory.events").write_text(text)
    assert read_oom_kill_counters(tmp_path) == {}
