"""Unit tests of the firewall parsers and DNS-drop analysis on recorded ``iptables-save -c`` /
``nft -j list ruleset`` output (tests/vectors/firewall, recorded by its record.py from the
rule sets in its src/ loaded into network namespaces), and of the collector with a fake
runner."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_firewall_netns import EXPECTED, SCENARIOS, Expected, kube_proxy_rules

from collectors.firewall_collector import FirewallCollector, findings_from_files
from collectors.netfilter.dns_rules import DnsRuleHit, dns_rule_hits
from collectors.netfilter.iptables import (
    nat_marks,
    parse_iptables_rule,
    parse_iptables_save,
    tokenize,
)
from collectors.netfilter.model import DROP_TABLES, Ruleset
from collectors.netfilter.nft import parse_nft_json
from collectors.registry import CollectorError, Runner, ToolNotFound

VECTORS = Path(__file__).parent / "vectors" / "firewall"
RKE2_DNS = ("10.43.0.10", "169.254.20.10")


def recorded(scenario: str) -> list[Ruleset]:
    rulesets: list[Ruleset] = []
    for suffix, backend, family in (
        ("iptables-save", None, "ipv4"),
        ("ip6tables-save", None, "ipv6"),
        ("iptables-legacy-save", "iptables-legacy", "ipv4"),
    ):
        path = VECTORS / f"{scenario}.{suffix}"
        if path.exists():
            rulesets.append(parse_iptables_save(path.read_text(), backend=backend, family=family))
    nft = VECTORS / f"{scenario}.nft.json"
    if nft.exists():
        rulesets.append(parse_nft_json(nft.read_text()))
    return rulesets


def summary(hit: DnsRuleHit) -> Expected:
    return (
        hit.reason,
        hit.backend,
        hit.family,
        hit.table,
        hit.chain,
        hit.position,
        hit.jump_path,
        hit.hits_cluster_dns,
        hit.manager,
    )


def hits_of(text: str, cluster_dns: Sequence[str] = RKE2_DNS) -> list[DnsRuleHit]:
    return dns_rule_hits([parse_iptables_save(text)], cluster_dns)


def filter_table(*rules: str, chains: Sequence[str] = ()) -> str:
    heads = [":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    heads += [f":{c} - [0:0]" for c in chains]
    return "\n".join(["*filter", *heads, *rules, "COMMIT", ""])


# --------------------------------------------------------------------------- recorded vectors


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_recorded_scenario_found_exactly_once(scenario: str) -> None:
    hits = dns_rule_hits(recorded(scenario), SCENARIOS[scenario][1])
    assert sorted(summary(h) for h in hits) == sorted(EXPECTED[scenario])


def test_every_scenario_has_recorded_vectors() -> None:
    for scenario in SCENARIOS:
        assert (VECTORS / f"{scenario}.nft.json").exists(), scenario
        assert (VECTORS / f"{scenario}.iptables-save").exists(), scenario


def test_recorded_counters_and_fix() -> None:
    (hit,) = dns_rule_hits(recorded("fault_output_drop"), RKE2_DNS)
    assert hit.rule_text == "-A OUTPUT -d 10.43.0.10/32 -p udp -m udp --dport 53 -j DROP"
    assert (hit.packets, hit.target, hit.protocols) == (3, "DROP", ("udp",))
    assert hit.bytes > 0
    assert (
        hit.fix
        == "iptables-nft -t filter -D OUTPUT -d 10.43.0.10/32 -p udp -m udp --dport 53 -j DROP"
    )

    (legacy,) = dns_rule_hits(recorded("fault_legacy"), RKE2_DNS)
    assert legacy.fix.startswith("iptables-legacy -t filter -D OUTPUT -d 10.43.0.10/32 -p tcp")

    (ip6,) = dns_rule_hits(recorded("fault_ip6"), ("10.96.0.10", "fd00:10:96::a"))
    assert ip6.fix.startswith("ip6tables-nft -t filter -D OUTPUT -d fd00:10:96::a/128 -p udp")


def test_recorded_custom_chain_reject() -> None:
    (hit,) = dns_rule_hits(recorded("fault_custom_reject"), RKE2_DNS)
    assert hit.packets == 2  # the two TCP connection attempts to the namespace's own address
    assert hit.target == "REJECT"
    assert hit.rule_text.endswith("-j REJECT --reject-with tcp-reset")


def test_recorded_native_nft() -> None:
    hits = dns_rule_hits(recorded("fault_native"), RKE2_DNS)
    by_chain = {h.chain: h for h in hits}
    out = by_chain["out"]
    assert out.rule_text == "ip daddr 10.43.0.10 udp dport { 53, 5353 } counter drop"
    assert out.packets == 3
    assert out.fix == f"nft delete rule inet hardening out handle {out.handle}"
    block = by_chain["dns_block"]
    assert block.target == "REJECT"
    assert block.rule_text == (
        "meta l4proto { tcp, udp } th dport @dns_ports counter reject with icmpx port-unreachable"
    )
    assert block.jump_path == ("in", "dns_block")
    assert block.packets == 0  # the TCP attempts came over lo: `iifname "lo" accept` first


def test_recorded_ufw_fix_names_ufw() -> None:
    hits = dns_rule_hits(recorded("fault_ufw"), RKE2_DNS)
    assert [h.protocols for h in hits] == [("tcp",), ("udp",)]
    assert all(h.fix.startswith("remove it in ufw") and "ufw delete" in h.fix for h in hits)
    finding = hits[1].to_finding("worker-1")
    assert "remove it in ufw" in finding.message


def test_recorded_no_endpoints_is_info() -> None:
    (hit,) = dns_rule_hits(recorded("fault_no_endpoints"), RKE2_DNS)
    finding = hit.to_finding("worker-1")
    assert (finding.reason, finding.severity) == ("DNSNoEndpointsReject", "info")
    assert hit.comment == "kube-system/rke2-coredns-rke2-coredns:udp-53 has no endpoints"


def test_negated_destination_does_not_hit_the_excluded_cluster_ip() -> None:
    (hit,) = dns_rule_hits(recorded("fault_negated_dst"), ("10.43.0.10",))
    assert not hit.hits_cluster_dns
    (hit,) = dns_rule_hits(recorded("fault_negated_dst"), RKE2_DNS)
    assert hit.hits_cluster_dns  # NodeLocal DNSCache's 169.254.20.10 is not excluded


def test_iptables_nft_tables_in_nft_json_alone() -> None:
    """Without iptables-save, the iptables-nft tables are read from nft -j (once)."""
    rulesets = [parse_nft_json((VECTORS / "fault_output_drop.nft.json").read_text())]
    assert all(t.xtables for t in rulesets[0].tables if t.family == "ipv4")
    assert not any(t.xtables for t in rulesets[0].tables if t.family == "inet")
    (hit,) = dns_rule_hits(rulesets, RKE2_DNS)
    assert (hit.backend, hit.family, hit.table, hit.chain, hit.position) == (
        "nft",
        "ipv4",
        "filter",
        "OUTPUT",
        1,
    )
    assert hit.rule_text == "ip daddr 10.43.0.10 udp dport 53 counter drop"


def test_findings_from_files_concatenated_bundle() -> None:
    text = (VECTORS / "fault_ip6.iptables-save").read_text() + (
        VECTORS / "fault_ip6.ip6tables-save"
    ).read_text()
    nft = (VECTORS / "fault_ip6.nft.json").read_text()
    findings = findings_from_files(text, nft, ["fd00:10:96::a", "10.96.0.10"], "worker-2")
    assert len(findings) == 1
    data = json.loads(findings[0].to_json())
    assert data["reason"] == "DNSDropRule" and data["severity"] == "warning"
    assert data["subject"] == {
        "kind": "Node",
        "name": "worker-2",
        "namespace": None,
        "uid": None,
        "container": None,
        "container_id": None,
    }
    details = data["details"]
    assert details["family"] == "ipv6" and details["backend"] == "iptables-nft"
    assert details["jump_path"] == ["OUTPUT"] and details["position"] == 1
    assert details["fix"] in data["message"]
    assert findings_from_files(None, None, [], "n") == []


def test_nat_marks_recorded() -> None:
    rke2 = (VECTORS / "clean_rke2.iptables-save").read_text()
    assert nat_marks(rke2) == {
        "kube_proxy_masquerade_mark": True,
        "flannel_postrouting_return": True,
    }
    kubeadm = (VECTORS / "clean_kubeadm.iptables-save").read_text()
    assert nat_marks(kubeadm) == {
        "kube_proxy_masquerade_mark": True,
        "flannel_postrouting_return": False,
    }
    # The same lines outside the nat table do not count.
    assert nat_marks(filter_table("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0")) == {
        "kube_proxy_masquerade_mark": False,
        "flannel_postrouting_return": False,
    }


def test_parser_positions_and_counters() -> None:
    ruleset = parse_iptables_save((VECTORS / "clean_rke2.iptables-save").read_text())
    assert ruleset.backend == "iptables-nft"
    filt = next(t for t in ruleset.tables if t.name == "filter")
    assert filt.family == "ipv4"
    output = filt.chains["OUTPUT"]
    assert output.policy == "ACCEPT" and output.packets > 0
    assert [r.position for r in output.rules] == list(range(1, len(output.rules) + 1))
    assert filt.chains["KUBE-SERVICES"].policy is None
    skipped = parse_iptables_save(
        (VECTORS / "clean_rke2.iptables-save").read_text(), tables=DROP_TABLES
    )
    nat = next(t for t in skipped.tables if t.name == "nat")
    assert not nat.parsed and not any(c.rules for c in nat.chains.values())
    legacy = parse_iptables_save((VECTORS / "fault_legacy.iptables-legacy-save").read_text())
    assert legacy.backend == "iptables-legacy"


# --------------------------------------------------------------------------- rule syntax


def test_tokenize_quotes() -> None:
    assert tokenize('-A X -m comment --comment "a \\"b\\" c" -j DROP') == [
        "-A",
        "X",
        "-m",
        "comment",
        "--comment",
        'a "b" c',
        "-j",
        "DROP",
    ]


@pytest.mark.parametrize(
    "rule",
    [
        "-A OUTPUT -p 17 -m udp --dport 53 -j DROP",
        "-A OUTPUT -p 6 -m tcp --dport 53 -j DROP",
        "-A OUTPUT -p all -m multiport --ports 53 -j DROP",
        "-A OUTPUT ! -p tcp -m multiport --dports 1000:2000,40:60 -j REJECT",
        "-A OUTPUT ! -p icmp --dport domain -j DROP",
        "-A OUTPUT -p ! tcp -m udp --destination-port 53 -j DROP",
        "-A OUTPUT -p udp -m udp --dport :60 -j DROP",
        "-A OUTPUT -p udp -m udp ! --dport 54:65535 -j DROP",
        "-A OUTPUT -d 10.43.0.0/16 -j DROP",
        "-A OUTPUT -o eth0 -d 10.43.0.10 -p udp -j REJECT",
        "-A OUTPUT -p udp -m udp --dport 53 -g DNSDROP",
    ],
)
def test_rules_that_drop_dns(rule: str) -> None:
    text = filter_table(rule, "-A DNSDROP -j DROP", chains=["DNSDROP"])
    hits = hits_of(text)
    assert len(hits) == 1, hits
    assert hits[0].hits_cluster_dns


@pytest.mark.parametrize(
    "rule",
    [
        "-A OUTPUT -p 1 --dport 53 -j DROP",
        "-A OUTPUT -p sctp -m sctp --dport 53 -j DROP",
        "-A OUTPUT ! -p all -j DROP",
        "-A OUTPUT -p udp -m udp ! --dport 53 -j DROP",
        "-A OUTPUT -p udp -m multiport ! --dports 50:60 -j DROP",
        "-A OUTPUT -p udp -m udp --sport 53 -j DROP",
        "-A OUTPUT -p udp -j DROP",
        "-A OUTPUT -j DROP",
        "-A OUTPUT -d 0.0.0.0/0 -j DROP",
        "-A OUTPUT ! -d 10.43.0.10/32 -j DROP",
        "-A OUTPUT -d 10.43.0.10/32 -p udp -m udp --dport 53 -j ACCEPT",
        "-A OUTPUT -d 10.43.0.10/32 -p udp -m udp --dport 53 -j NOTRACK",
        "-A OUTPUT -d 10.43.0.10/32 -p udp -m udp --dport 53 -j CT --notrack",
        "-A OUTPUT -d 10.43.0.10/32 -p udp -m udp --dport 53 -j DNAT --to-destination 1.2.3.4",
        "-A OUTPUT -d 10.43.0.10/32 -p udp -m udp --dport 53 -j MARK --set-xmark 0x1/0x1",
        '-A OUTPUT -p udp -m udp --dport 53 -j LOG --log-prefix "x -j DROP "',
        "-A OUTPUT -p tcp -m tcp --dport 22 -j DNSDROP",
        "-A UNREACHED -p udp -m udp --dport 53 -j DROP",
    ],
)
def test_rules_that_do_not_drop_dns(rule: str) -> None:
    text = filter_table(
        rule, "-A DNSDROP -p tcp -m tcp --dport 53 -j DROP", chains=["DNSDROP", "UNREACHED"]
    )
    assert hits_of(text) == []


def test_jump_context_narrows() -> None:
    # Reached only with UDP: a TCP drop in the chain never sees DNS.
    text = filter_table(
        "-A OUTPUT -p udp -m udp --dport 53 -j C1",
        "-A C1 -p tcp -j DROP",
        "-A C1 -j DROP",
        chains=["C1"],
    )
    (hit,) = hits_of(text)
    assert hit.rule_text == "-A C1 -j DROP" and hit.jump_path == ("OUTPUT", "C1")
    assert hit.protocols == ("udp",)


def test_two_paths_report_once_and_loops_end() -> None:
    text = filter_table(
        "-A INPUT -j C1",
        "-A OUTPUT -j C1",
        "-A C1 -j C2",
        "-A C2 -j C1",
        "-A C2 -p udp -m udp --dport 53 -j DROP",
        chains=["C1", "C2"],
    )
    (hit,) = hits_of(text)
    assert hit.jump_path == ("INPUT", "C1", "C2") and hit.position == 2


def test_raw_and_mangle_drops_count_nat_is_not_read() -> None:
    text = (
        "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        "[7:420] -A OUTPUT -p udp -m udp --dport 53 -j DROP\nCOMMIT\n"
        "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p udp -m udp --dport 53 -j DROP\nCOMMIT\n"
    )
    (hit,) = dns_rule_hits([parse_iptables_save(text, tables=DROP_TABLES)], RKE2_DNS)
    assert (hit.table, hit.packets, hit.backend) == ("raw", 7, "iptables")
    assert hit.fix.startswith("iptables -t raw -D OUTPUT ")


def test_firewalld_direct_rule() -> None:
    text = filter_table(
        "-A OUTPUT -j OUTPUT_direct",
        "-A OUTPUT_direct -p udp -m udp --dport 53 -j DROP",
        chains=["OUTPUT_direct"],
    )
    (hit,) = hits_of(text)
    assert hit.manager == "firewalld" and "firewall-cmd --permanent --direct" in hit.fix


def test_incompatible_table_warning_is_kept() -> None:
    text = "# Table `filter' is incompatible, use 'nft' tool.\n"
    assert parse_iptables_save(text).warnings == ["Table `filter' is incompatible, use 'nft' tool."]


def test_parse_iptables_rule_fields() -> None:
    match = parse_iptables_rule(
        '-A X -s 10.0.0.0/8 ! -d 10.43.0.10/32 -i eth0 ! -o lo -p udp -m comment --comment "hi" '
        "-m multiport --dports 53,1000:1010 --sport 5 -j REJECT --reject-with icmp-port-unreachable"
    )
    assert match.protocols == frozenset({"udp"})
    assert match.dports == ((53, 53), (1000, 1010)) and match.sports == ((5, 5),)
    assert match.dst_negated and not match.src_negated
    assert (match.in_interface, match.out_interface) == ("eth0", "!lo")
    assert (match.comment, match.target) == ("hi", "REJECT")
    assert match.target_args == ("--reject-with", "icmp-port-unreachable")


# --------------------------------------------------------------------------- nft JSON


def nft_doc(*rules: list[object], chains: Sequence[dict[str, object]] = (), **sets: object) -> str:
    items: list[object] = [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "t", "handle": 1}},
        {
            "chain": {
                "family": "inet",
                "table": "t",
                "name": "out",
                "handle": 1,
                "type": "filter",
                "hook": "output",
                "prio": 0,
                "policy": "accept",
            }
        },
    ]
    items += [{"chain": {"family": "inet", "table": "t", **c}} for c in chains]
    items += [
        {"set": {"family": "inet", "table": "t", "name": name, "elem": elem}}
        for name, elem in sets.items()
    ]
    for handle, expr in enumerate(rules, start=10):
        chain = "out"
        if expr and isinstance(expr[0], str):
            chain, expr = expr[0], expr[1:]
        items.append(
            {
                "rule": {
                    "family": "inet",
                    "table": "t",
                    "chain": chain,
                    "handle": handle,
                    "expr": expr,
                }
            }
        )
    return json.dumps({"nftables": items})


def dport(proto: str, right: object, op: str = "==") -> dict[str, object]:
    return {
        "match": {
            "op": op,
            "left": {"payload": {"protocol": proto, "field": "dport"}},
            "right": right,
        }
    }


def daddr(right: object, op: str = "==") -> dict[str, object]:
    return {
        "match": {
            "op": op,
            "left": {"payload": {"protocol": "ip", "field": "daddr"}},
            "right": right,
        }
    }


@pytest.mark.parametrize(
    ("expr", "found"),
    [
        ([dport("udp", 53), {"drop": None}], True),
        ([dport("th", {"set": [{"range": [50, 60]}, 853]}), {"reject": None}], True),
        ([dport("udp", 53, "!="), {"drop": None}], False),
        ([dport("tcp", {"set": [80, 443]}), {"drop": None}], False),
        ([dport("sctp", 53), {"drop": None}], False),
        ([dport("udp", 53), {"accept": None}], False),
        ([daddr({"prefix": {"addr": "10.43.0.0", "len": 16}}), {"drop": None}], True),
        ([daddr("10.43.0.10", "!="), {"drop": None}], False),
        ([daddr("10.43.0.10"), {"counter": {"packets": 9, "bytes": 900}}, {"drop": None}], True),
        ([dport("udp", "@ports"), {"drop": None}], True),
        (
            [
                {
                    "vmap": {
                        "key": {"payload": {"protocol": "udp", "field": "dport"}},
                        "data": {"set": [[53, {"drop": None}], [80, {"accept": None}]]},
                    }
                }
            ],
            True,
        ),
        (
            [
                {
                    "match": {
                        "op": "==",
                        "left": {"meta": {"key": "l4proto"}},
                        "right": {"set": ["icmp", "icmpv6"]},
                    }
                },
                {"drop": None},
            ],
            False,
        ),
    ],
)
def test_nft_rules(expr: list[object], found: bool) -> None:
    ruleset = parse_nft_json(nft_doc(expr, ports=[{"elem": {"val": 53}}, 853]))
    hits = dns_rule_hits([ruleset], ["10.43.0.10"])
    assert len(hits) == int(found), hits
    if found:
        assert hits[0].backend == "nft" and hits[0].fix.endswith("handle 10")


def test_nft_jump_and_firewalld_table() -> None:
    doc = json.loads(
        nft_doc(
            [{"jump": {"target": "sub"}}],
            ["sub", dport("tcp", 53), {"counter": {"packets": 4, "bytes": 240}}, {"drop": None}],
            chains=[{"name": "sub", "handle": 2}],
        )
    )
    (hit,) = dns_rule_hits([parse_nft_json(json.dumps(doc))], ["10.43.0.10"])
    assert (hit.chain, hit.jump_path, hit.packets, hit.position) == ("sub", ("out", "sub"), 4, 1)
    renamed = json.dumps(doc).replace('"table": "t"', '"table": "firewalld"')
    renamed = renamed.replace('"name": "t"', '"name": "firewalld"')
    (hit,) = dns_rule_hits([parse_nft_json(renamed)], ["10.43.0.10"])
    assert hit.manager == "firewalld" and hit.fix.startswith("remove it in firewalld")


# --------------------------------------------------------------------------- collector


def fake_runner(outputs: dict[str, str]) -> tuple[list[str], Runner]:
    calls: list[str] = []

    def runner(argv: Sequence[str]) -> str:
        calls.append(" ".join(argv))
        if argv[0] not in outputs:
            raise ToolNotFound(f"{argv[0]} not found")
        return outputs[argv[0]]

    return calls, runner


def test_collector_metrics_deltas_and_stale_gauges() -> None:
    rule = "-A OUTPUT -d 10.43.0.10/32 -p udp -m udp --dport 53 -j DROP"
    state = {"text": filter_table(f"[5:300] {rule}")}

    def runner(argv: Sequence[str]) -> str:
        if argv[0] == "iptables-save":
            return "# Generated by iptables-save v1.8.9 (nf_tables) on x\n" + state["text"]
        raise ToolNotFound(f"{argv[0]} not found")

    registry = CollectorRegistry()
    collector = FirewallCollector("n1", lambda: ["10.43.0.10"], registry, runner=runner)
    gauge = {"family": "ipv4", "table": "filter", "chain": "OUTPUT", "target": "DROP"}
    counter = {"family": "ipv4", "table": "filter", "chain": "OUTPUT"}

    def dropped() -> float | None:
        return registry.get_sample_value("nodediag_dns_dropped_packets_total", counter)

    assert len(collector.collect()) == 1
    assert registry.get_sample_value("nodediag_dns_drop_rules", gauge) == 1
    assert dropped() == 5
    state["text"] = filter_table(f"[9:540] {rule}")
    collector.collect()
    assert dropped() == 9
    state["text"] = filter_table("[2:120] -A OUTPUT -p tcp -j ACCEPT", f"[2:120] {rule}")
    collector.collect()  # re-created: counters restarted at 2
    assert dropped() == 11
    state["text"] = filter_table()
    assert collector.collect() == []
    assert registry.get_sample_value("nodediag_dns_drop_rules", gauge) is None
    assert dropped() == 11


def test_collector_skips_missing_tools_and_dedups_legacy() -> None:
    legacy = "# Generated by iptables-save v1.8.9 on x\n" + filter_table(
        "-A OUTPUT -p udp -m udp --dport 53 -j DROP"
    )
    calls, runner = fake_runner({"iptables-save": legacy, "iptables-legacy-save": legacy})
    collector = FirewallCollector("n1", lambda: [], CollectorRegistry(), runner=runner)
    (finding,) = collector.collect()
    assert finding.details["backend"] == "iptables-legacy"
    assert calls == [
        "nft -j list chains",  # iptables-nft's tables, to read them piece by piece
        "iptables-save -c",
        "ip6tables-save -c",
        "iptables-legacy-save -c",
        "ip6tables-legacy-save -c",
        "nft -j list ruleset",
    ]
    assert not any(" -t " in c or c.startswith("iptables -L") for c in calls)


def test_collector_fails_with_one_line_when_nothing_works() -> None:
    def denied(argv: Sequence[str]) -> str:
        raise CollectorError(
            f"{' '.join(argv)} exited with 1: Permission denied (you must be root)"
        )

    collector = FirewallCollector("n1", lambda: [], CollectorRegistry(), runner=denied)
    with pytest.raises(CollectorError) as error:
        collector.collect()
    assert "CAP_NET_ADMIN" in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------- robustness, speed

_TOKENS = st.sampled_from(
    [
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "!",
        "--dport",
        "53",
        "-j",
        "DROP",
        "-d",
        "10.43.0.10/32",
        "-m",
        "multiport",
        "--dports",
        "1:",
        ":",
        ",",
        '"',
        "\\",
        "-g",
        "X",
        "--comment",
        "[1:2]",
        "*filter",
        "COMMIT",
        ":X - [0:0]",
        "::",
        "/99",
        "-s",
        "fd00::/129",
        "REJECT",
        "-o",
        "",
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(st.text(max_size=80), st.lists(_TOKENS, max_size=14).map(" ".join)),
        max_size=30,
    )
)
def test_iptables_parser_never_raises(lines: list[str]) -> None:
    text = "*filter\n:OUTPUT ACCEPT [0:0]\n:X - [0:0]\n" + "\n".join(lines)
    ruleset = parse_iptables_save(text)
    for table in ruleset.tables:
        for chain in table.chains.values():
            for rule in chain.rules:
                _ = rule.match
    dns_rule_hits([ruleset], ["10.43.0.10", "fd00::a", "not-an-ip"])


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(["udp", "dport", "payload", "drop", "@s", "10.43.0.10", "out", "inet", "t"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "match",
                    "op",
                    "left",
                    "right",
                    "payload",
                    "protocol",
                    "field",
                    "set",
                    "range",
                    "prefix",
                    "addr",
                    "len",
                    "jump",
                    "target",
                    "vmap",
                    "key",
                    "data",
                    "counter",
                    "packets",
                    "elem",
                    "val",
                    "meta",
                    "drop",
                    "reject",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_JSON, max_size=6), st.text(max_size=40))
def test_nft_parser_never_raises(exprs: list[object], junk: str) -> None:
    for text in (nft_doc(exprs), nft_doc(*[[e] for e in exprs]), junk, json.dumps(exprs)):
        dns_rule_hits([parse_nft_json(text)], ["10.43.0.10"])


def test_large_kube_proxy_rule_set_is_fast() -> None:
    """~110,000 rules (10,000 Services) shaped like kube-proxy's, as iptables-save prints."""
    text = "\n".join(
        f"[0:0] {line}" if line.startswith("-A") else line
        for line in kube_proxy_rules(10_000).splitlines()
        if not line.startswith("#")
    )
    started = time.perf_counter()
    ruleset = parse_iptables_save(text, tables=DROP_TABLES)
    hits = dns_rule_hits([ruleset], RKE2_DNS)
    seconds = time.perf_counter() - started
    assert hits == []
    assert seconds < 2.0, seconds
