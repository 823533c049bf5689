"""Stops that stack up on a DNS flow's way (collectors/netfilter/evaluate.py, verdicts.py,
flow_findings.py): past the first stop, as if it had let the packets through, the evaluator
names every further stop, and the finding every fix needed. The kernel-checked twins are the
lab's ``lab_stacked_*`` scenarios (tests/test_netlab.py)."""

from __future__ import annotations

from collections.abc import Sequence

from test_netfilter_collector import collector, flow_ok
from test_netfilter_evaluate import (
    ALL_PASS,
    FACTS,
    chain,
    dport,
    filter_table,
    kube_proxy_nft,
    nft_doc,
    outcome,
    rule,
    verdicts,
)

from collectors.netfilter.evaluate import FlowVerdict
from collectors.netfilter.verdicts import MAX_FURTHER_STOPS, Stop

OVERLAY_DROP = "-A INPUT -p udp -m udp --dport 8472 -j DROP"


def further(found: FlowVerdict) -> list[tuple[str, str, int | None, bool]]:
    return [(s.table, s.chain, s.position, s.certain) for s in found.also_stopped_by]


def places(stops: Sequence[Stop]) -> list[tuple[str, str, str, int | None]]:
    return [
        (s.backend, s.table, s.chain, s.handle if s.backend == "nft" else s.position) for s in stops
    ]


def test_a_rule_drop_then_the_chain_policy() -> None:
    found = verdicts([filter_table(OVERLAY_DROP, policies={"INPUT": "DROP"})])
    overlay = found["overlay-vxlan"]
    assert overlay.verdict == "drop"
    assert overlay.stopped_by is not None and overlay.stopped_by.position == 1
    assert further(overlay) == [("filter", "INPUT", None, True)]
    assert overlay.also_stopped_by[0].is_policy
    assert "-P INPUT ACCEPT" in overlay.also_stopped_by[0].fix


def test_a_policy_drop_then_the_next_base_chain_of_the_hook_in_another_backend() -> None:
    nft = nft_doc(
        chain("inet", "mine", "input", "input", 10),
        rule("inet", "mine", "input", [dport("udp", 8472), {"drop": None}], handle=7),
    )
    found = verdicts([filter_table(policies={"INPUT": "DROP"})], nft=nft)
    overlay = found["overlay-vxlan"]
    assert overlay.stopped_by is not None and overlay.stopped_by.is_policy
    assert places(overlay.also_stopped_by) == [("nft", "mine", "input", 7)]
    assert overlay.also_stopped_by[0].fix == "`nft delete rule inet mine input handle 7`"


def test_a_drop_in_a_jumped_chain_goes_on_in_that_chain_then_in_the_caller() -> None:
    rules = filter_table(
        "-A INPUT -j HAND",
        "-A INPUT -p udp -m udp --dport 8472 -j REJECT",
        "-A HAND -p udp -j DROP",
        "-A HAND -p udp -m udp --dport 8472 -j DROP",
        "-A HAND -j RETURN",
        "-A HAND -p udp -j DROP",
        chains=("HAND",),
    )
    overlay = verdicts([rules])["overlay-vxlan"]
    assert overlay.stopped_by is not None
    assert (overlay.stopped_by.chain, overlay.stopped_by.position) == ("HAND", 1)
    # The rule after RETURN is never reached: not reported.
    assert further(overlay) == [("filter", "HAND", 2, True), ("filter", "INPUT", 2, True)]


def test_a_stop_in_a_later_hook() -> None:
    rules = filter_table("-A FORWARD -p udp -m udp --dport 53 -j DROP")
    mangle = "*mangle\n:POSTROUTING DROP [0:0]\nCOMMIT\n"
    pods = verdicts([rules, mangle])["pod-dns-udp"]
    assert pods.stopped_by is not None and pods.stopped_by.hook == "forward"
    assert [(s.table, s.chain, s.hook, s.is_policy) for s in pods.also_stopped_by] == [
        ("mangle", "POSTROUTING", "postrouting", True)
    ]


def test_an_undecidable_drop_is_looked_past_and_stays_possible() -> None:
    rules = filter_table(
        "-A OUTPUT -p udp -m set --match-set blocked dst -j HAND",
        "-A HAND -j DROP",
        "-A HAND -p udp -j REJECT",
        chains=("HAND",),
    )
    host = verdicts([rules])["host-dns-udp"]
    assert host.verdict == "may-drop"  # decided by the first stop, as before
    assert host.stopped_by is not None and not host.stopped_by.certain
    assert (host.stopped_by.chain, host.stopped_by.position) == ("HAND", 1)
    # Certain on the ways that reach the first stop; the verdict says those are possible.
    assert further(host) == [("filter", "HAND", 2, True)]


def test_a_further_stop_on_only_some_ways_is_possible() -> None:
    rules = filter_table(
        OVERLAY_DROP,
        "-A INPUT -p udp -m set --match-set peers src -j DROP",
    )
    overlay = verdicts([rules])["overlay-vxlan"]
    assert overlay.verdict == "drop"
    assert further(overlay) == [("filter", "INPUT", 2, False)]


def test_an_unknown_target_is_looked_past() -> None:
    rules = filter_table("-A OUTPUT -p udp -j SOMETHINGNEW --flag", "-A OUTPUT -p udp -j OTHERNEW")
    host = verdicts([rules])["host-dns-udp"]
    assert host.verdict == "may-drop" and host.stopped_by is not None
    assert host.stopped_by.position == 1
    assert further(host) == [("filter", "OUTPUT", 2, False)]


def test_an_owner_fix_that_allows_ends_the_chain() -> None:
    """ufw's fix allows the flow in ufw's chains: the INPUT rules after them are not met;
    another table on the hook still is."""
    rules = filter_table(
        "-A INPUT -j ufw-before-input",
        OVERLAY_DROP,
        "-A ufw-before-input -p udp -m udp --dport 8472 -j DROP",
        chains=("ufw-before-input",),
    )
    nft = nft_doc(
        chain("inet", "mine", "input", "input", 10),
        rule("inet", "mine", "input", [dport("udp", 8472), {"drop": None}], handle=7),
    )
    overlay = verdicts([rules], nft=nft)["overlay-vxlan"]
    assert overlay.stopped_by is not None and overlay.stopped_by.owner == "ufw"
    assert places(overlay.also_stopped_by) == [("nft", "mine", "input", 7)]


def test_nothing_past_kube_proxys_no_endpoints_reject() -> None:
    found = verdicts([], nft=kube_proxy_nft([], no_endpoints=True))
    assert found["pod-dns-udp"].stopped_by is not None
    assert found["pod-dns-udp"].stopped_by.no_endpoints
    assert found["pod-dns-udp"].also_stopped_by == ()


def test_at_most_a_few_further_stops() -> None:
    drops = [
        f"-A OUTPUT -p udp -m udp --dport 53 -m comment --comment n{i} -j DROP" for i in range(9)
    ]
    host = verdicts([filter_table(*drops)])["host-dns-udp"]
    assert [s.position for s in host.also_stopped_by] == list(range(2, 2 + MAX_FURTHER_STOPS))


def test_passing_flows_are_unchanged() -> None:
    found = verdicts([filter_table("-A INPUT -p udp -m udp --dport 9999 -j DROP")])
    assert outcome(found) == ALL_PASS
    assert all(v.also_stopped_by == () for v in found.values())


def test_the_answers_are_looked_past_too() -> None:
    rules = filter_table("-A INPUT -p udp --sport 53 -j DROP", policies={"INPUT": "DROP"})
    replies = verdicts([rules])["dns-replies"]
    # The host's queries pass OUTPUT; their answers meet the rule, then the policy.
    assert replies.verdict == "drop" and replies.stopped_by is not None
    assert replies.stopped_by.position == 1
    assert [s.is_policy for s in replies.also_stopped_by] == [True]


# --------------------------------------------------------------------------- findings


def test_the_finding_names_every_stop_and_every_fix() -> None:
    rules = filter_table(OVERLAY_DROP, policies={"INPUT": "DROP"})
    found, registry = collector({"iptables-save": rules})
    blocked = [f for f in found.collect() if f.reason == "DNSFlowBlocked"]
    overlay = next(f for f in blocked if f.details["flow"] == "overlay-vxlan")
    details = overlay.details
    # The first stop's fields as before.
    assert (details["chain"], details["position"], details["policy"]) == ("INPUT", 1, False)
    assert details["fix"] == "`iptables -t filter -D INPUT 1`"
    assert details["also_stopped_by"] == [
        {
            "family": "ipv4",
            "hook": "input",
            "backend": "iptables",
            "table": "filter",
            "chain": "INPUT",
            "position": None,
            "handle": None,
            "rule": None,
            "target": "policy DROP",
            "comment": None,
            "packets": 0,
            "bytes": 0,
            "fix": "`iptables -t filter -P INPUT ACCEPT` (or accept the flow before it)",
            "policy": True,
            "owner": None,
            "certain": True,
        }
    ]
    assert "; then also by the policy DROP of iptables ipv4 filter INPUT on input" in (
        overlay.message
    )
    assert (
        "fixes, all 2 needed: (1) `iptables -t filter -D INPUT 1` (2) `iptables -t filter -P"
        in (overlay.message)
    )
    # One finding and one series per flow.
    assert len([f for f in blocked if f.details["flow"] == "overlay-vxlan"]) == 1
    assert flow_ok(registry, "overlay-vxlan") == 0
    single = next(f for f in blocked if f.details["flow"] == "dns-replies")
    assert single.details["also_stopped_by"] == [] and "then also" not in single.message


def test_a_flow_whose_first_stop_has_its_own_finding_is_still_blocked_further() -> None:
    rules = filter_table("-A OUTPUT -p udp -m udp --dport 53 -j DROP", policies={"OUTPUT": "DROP"})
    found, _ = collector({"iptables-save": rules}, FACTS)
    findings = found.collect()
    rule_finding = next(f for f in findings if f.reason == "DNSDropRule")
    assert "host-dns-udp/ipv4" in rule_finding.details["flows"]
    blocked = {f.details["flow"]: f for f in findings if f.reason == "DNSFlowBlocked"}
    # Deleting the port-53 rule alone would leave OUTPUT's policy: the flow says so.
    host = blocked["host-dns-udp"]
    assert host.details["position"] == 1
    assert [s["policy"] for s in host.details["also_stopped_by"]] == [True]
    assert "then also" in host.message


def test_a_single_stop_finding_is_as_before() -> None:
    found, _ = collector({"iptables-save": filter_table(policies={"FORWARD": "DROP"})})
    pods = next(
        f
        for f in found.collect()
        if f.reason == "DNSFlowBlocked" and f.details["flow"] == "pod-dns-udp"
    )
    assert pods.details["also_stopped_by"] == []
    assert "then also" not in pods.message
    assert pods.message.endswith(f"fix: {pods.details['fix']}")
