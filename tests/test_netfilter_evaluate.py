"""The DNS flow evaluator (collectors/netfilter/evaluate.py) on rule-set vectors: netfilter's
semantics (hook order across tables and backends, policies, jump/goto/RETURN, conntrack
states, marks, NOTRACK, Service DNAT, undecidable matches) and the recorded vectors in
tests/vectors/firewall. The kernel-checked twins of these verdicts are the lab's netns tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_firewall import _JSON, _TOKENS
from test_firewall import recorded as recorded_rulesets

from collectors.netfilter.evaluate import FlowVerdict, evaluate
from collectors.netfilter.flows import Flow, NodeFacts, OverlayLink, Packet, dns_flows, node_routes
from collectors.netfilter.ipset import parse_ipset_save
from collectors.netfilter.iptables import parse_iptables_save
from collectors.netfilter.model import Ruleset
from collectors.netfilter.nft import parse_nft_json

VECTORS = Path(__file__).parent / "vectors" / "firewall"

FACTS = NodeFacts(
    cluster_dns=("10.43.0.10",),
    pod_cidrs=("10.42.0.0/24",),
    cluster_cidrs=("10.42.0.0/16",),
    node_addresses=("192.168.1.10",),
    pod_interfaces=("cni0",),
    uplink="eth0",
    overlay=(OverlayLink("flannel.1", "vxlan", 8472),),
    upstream_dns=("1.1.1.1",),
)


def facts(**changes: Any) -> NodeFacts:
    return replace(FACTS, **changes)


def filter_table(
    *rules: str, policies: dict[str, str] | None = None, chains: Sequence[str] = ()
) -> str:
    policies = {"INPUT": "ACCEPT", "FORWARD": "ACCEPT", "OUTPUT": "ACCEPT", **(policies or {})}
    heads = [f":{name} {policy} [0:0]" for name, policy in policies.items()]
    heads += [f":{c} - [0:0]" for c in chains]
    return "\n".join(["*filter", *heads, *rules, "COMMIT", ""])


def table(name: str, base: Sequence[str], *rules: str, chains: Sequence[str] = ()) -> str:
    heads = [f":{c} ACCEPT [0:0]" for c in base] + [f":{c} - [0:0]" for c in chains]
    return "\n".join([f"*{name}", *heads, *rules, "COMMIT", ""])


def verdicts(
    texts: Sequence[str], node: NodeFacts = FACTS, nft: str | None = None
) -> dict[str, FlowVerdict]:
    rulesets: list[Ruleset] = [parse_iptables_save("".join(texts))] if texts else []
    if nft is not None:
        rulesets.append(parse_nft_json(nft))
    return {v.flow.name: v for v in evaluate(rulesets, dns_flows(node))}


def outcome(found: dict[str, FlowVerdict]) -> dict[str, str]:
    return {name: v.verdict for name, v in found.items()}


ALL_PASS = {
    "pod-dns-udp": "pass",
    "pod-dns-tcp": "pass",
    "host-dns-udp": "pass",
    "host-dns-tcp": "pass",
    "dns-replies": "pass",
    "overlay-vxlan": "pass",
    "dns-upstream-udp": "pass",
    "dns-upstream-tcp": "pass",
}


# --------------------------------------------------------------------------- policies, order


def test_no_rules_every_flow_passes() -> None:
    assert outcome(verdicts([])) == ALL_PASS


def test_forward_drop_policy_stops_pod_flows_and_names_the_policy() -> None:
    found = verdicts([filter_table(policies={"FORWARD": "DROP"})])
    assert found["pod-dns-udp"].verdict == "drop"
    stop = found["pod-dns-udp"].stopped_by
    assert (
        stop is not None and stop.is_policy and stop.chain == "FORWARD" and stop.hook == "forward"
    )
    assert stop.target == "policy DROP" and "-P FORWARD ACCEPT" in stop.fix
    assert found["host-dns-udp"].verdict == "pass"
    assert found["dns-upstream-udp"].verdict == "drop"  # pods -> upstream is forwarded too


def test_established_accept_lets_replies_through_a_drop_policy() -> None:
    rules = filter_table(
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A OUTPUT -p udp --dport 53 -j ACCEPT",
        "-A OUTPUT -p tcp --dport 53 -j ACCEPT",
        policies={"INPUT": "DROP"},
    )
    found = verdicts([rules])
    assert found["host-dns-udp"].verdict == "pass"
    assert found["dns-replies"].verdict == "pass"
    assert found["overlay-vxlan"].verdict == "drop"


def test_replies_dropped_without_an_established_rule() -> None:
    rules = filter_table("-A INPUT -p udp --sport 53 -j DROP")
    found = verdicts([rules])
    assert found["host-dns-udp"].verdict == "pass"
    assert found["dns-replies"].verdict == "drop"


def test_accept_in_one_table_does_not_save_from_a_drop_in_another() -> None:
    nft = nft_doc(
        chain("inet", "mine", "input", "input", 10),
        rule("inet", "mine", "input", [dport("udp", 8472), {"drop": None}], handle=7),
    )
    accept_all = filter_table("-A INPUT -j ACCEPT")
    found = verdicts([accept_all], nft=nft)
    assert found["overlay-vxlan"].verdict == "drop"
    stop = found["overlay-vxlan"].stopped_by
    assert stop is not None and stop.backend == "nft" and stop.table == "mine"
    assert stop.fix == "`nft delete rule inet mine input handle 7`"


def test_nft_chains_run_by_priority_a_mark_set_earlier_is_seen() -> None:
    nft = nft_doc(
        chain("inet", "t", "late", "input", 10),
        chain("inet", "t", "early", "input", -10),
        rule("inet", "t", "early", [mangle_mark(0x10)]),
        rule("inet", "t", "late", [mark_is(0x10), {"drop": None}]),
    )
    assert verdicts([], nft=nft)["overlay-vxlan"].verdict == "drop"
    swapped = nft.replace('"prio": 10', '"prio": -20')
    assert verdicts([], nft=swapped)["overlay-vxlan"].verdict == "pass"


def test_mark_from_mangle_reaches_filter() -> None:
    rules = [
        table("mangle", ["PREROUTING"], "-A PREROUTING -i cni0 -j MARK --set-xmark 0x4000/0x4000"),
        filter_table("-A FORWARD -m mark --mark 0x4000/0x4000 -j DROP"),
    ]
    found = verdicts(rules)
    assert found["pod-dns-udp"].verdict == "drop"
    assert found["overlay-vxlan"].verdict == "pass"


# --------------------------------------------------------------------------- chains


def test_jump_goto_return_and_dead_rules() -> None:
    rules = filter_table(
        "-A FORWARD -j A",
        "-A FORWARD -p udp -j DROP",
        "-A A -g B",
        "-A A -p tcp -j DROP",  # dead for everything: the goto above is unconditional
        "-A B -p udp -j RETURN",
        "-A B -j ACCEPT",
        "-A B -j DROP",  # dead: after an unconditional ACCEPT
        chains=("A", "B"),
    )
    found = verdicts([rules])
    # udp: B returns to FORWARD's next rule (goto skipped A), which drops udp.
    assert found["pod-dns-udp"].verdict == "drop"
    stop = found["pod-dns-udp"].stopped_by
    assert stop is not None and (stop.chain, stop.position) == ("FORWARD", 2)
    # tcp: B accepts; the DROPs after it and after the goto are never reached.
    assert found["pod-dns-tcp"].verdict == "pass"


def test_interface_wildcards() -> None:
    rules = filter_table("-A FORWARD -i cali+ -p udp --dport 53 -j DROP")
    assert verdicts([rules])["pod-dns-udp"].verdict == "pass"  # pods arrive on cni0
    calico = facts(pod_interfaces=("cali+",))
    assert verdicts([rules], calico)["pod-dns-udp"].verdict == "drop"
    one_pod = filter_table("-A FORWARD -i cali1234 -p udp --dport 53 -j DROP")
    assert verdicts([one_pod], calico)["pod-dns-udp"].verdict == "may-drop"


def test_ports_ranges_and_multiport() -> None:
    ranged = filter_table("-A OUTPUT -p udp -m udp --dport 50:60 -j REJECT")
    assert verdicts([ranged])["host-dns-udp"].verdict == "drop"
    multi = filter_table("-A OUTPUT -p tcp -m multiport --dports 80,443,5000:6000 -j DROP")
    assert verdicts([multi])["host-dns-tcp"].verdict == "pass"
    negated = filter_table("-A OUTPUT -p tcp -m tcp ! --dport 53 -j DROP")
    assert verdicts([negated])["host-dns-tcp"].verdict == "pass"


def test_invalid_only_drop_never_drops_and_untracked_is_not_established() -> None:
    invalid = filter_table("-A FORWARD -m conntrack --ctstate INVALID -j DROP")
    assert outcome(verdicts([invalid])) == ALL_PASS
    notrack = [
        table("raw", ["PREROUTING", "OUTPUT"], "-A PREROUTING -p udp --dport 53 -j NOTRACK"),
        filter_table(
            "-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-A FORWARD -m conntrack --ctstate NEW -j ACCEPT",
            policies={"FORWARD": "DROP"},
        ),
    ]
    found = verdicts(notrack)
    assert found["pod-dns-udp"].verdict == "drop"  # untracked: neither NEW nor ESTABLISHED
    assert found["pod-dns-tcp"].verdict == "pass"


def test_untracked_packets_have_no_ct_status() -> None:
    """firewalld's `ct status dnat accept` never matches a NOTRACK'd packet (no connection:
    the ct expression fails): NodeLocal DNSCache's queries meet the zone's reject for certain."""
    raw = table("raw", ["PREROUTING", "OUTPUT"], "-A PREROUTING -p udp --dport 53 -j NOTRACK")
    status = {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}
    nft = nft_doc(
        chain("inet", "fw", "forward", "forward"),
        rule("inet", "fw", "forward", [status, {"accept": None}], handle=3),
        rule("inet", "fw", "forward", [{"reject": None}], handle=4),
    )
    found = verdicts([raw], nft=nft)
    for flow in ("pod-dns-udp", "pod-dns-tcp"):  # untracked, and tracked but not DNATed
        assert found[flow].verdict == "drop" and found[flow].undecided == (), flow


def test_raw_table_sees_no_conntrack_state_yet() -> None:
    raw = table("raw", ["PREROUTING", "OUTPUT"], "-A PREROUTING -m state --state NEW -j DROP")
    assert verdicts([raw])["pod-dns-udp"].verdict == "pass"  # before conntrack: INVALID


def test_addrtype_local() -> None:
    rules = filter_table("-A INPUT -m addrtype --dst-type LOCAL -p udp --dport 8472 -j DROP")
    assert verdicts([rules])["overlay-vxlan"].verdict == "drop"
    other = filter_table("-A INPUT -m addrtype ! --dst-type LOCAL -j DROP")
    assert verdicts([other])["overlay-vxlan"].verdict == "pass"


def test_undecidable_match_before_a_drop_is_may_drop_never_pass() -> None:
    rules = filter_table(
        "-A OUTPUT -p udp -m set --match-set blocked dst -j DROP",
        "-A OUTPUT -p tcp -m recent --rcheck --seconds 60 -j ACCEPT",
        "-A OUTPUT -p tcp -j DROP",
    )
    found = verdicts([rules])
    assert found["host-dns-udp"].verdict == "may-drop"
    assert found["host-dns-udp"].stopped_by is not None
    assert not found["host-dns-udp"].stopped_by.certain
    assert any("set" in note for note in found["host-dns-udp"].undecided)
    assert found["host-dns-tcp"].verdict == "may-drop"


def test_inert_rules_with_unknown_matches_are_skipped() -> None:
    rules = filter_table('-A OUTPUT -m limit --limit 3/min -j LOG --log-prefix "x "')
    assert outcome(verdicts([rules])) == ALL_PASS


def test_unknown_target_may_drop() -> None:
    rules = filter_table("-A OUTPUT -p udp -j SOMETHINGNEW --flag")
    assert verdicts([rules])["host-dns-udp"].verdict == "may-drop"


# --------------------------------------------------------------------------- Service DNAT


KUBE_NAT = table(
    "nat",
    ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
    "-A PREROUTING -j KUBE-SERVICES",
    "-A OUTPUT -j KUBE-SERVICES",
    "-A KUBE-SERVICES -d 10.43.0.10/32 -p udp -m udp --dport 53 -j KUBE-SVC-DNS",
    "-A KUBE-SERVICES -d 10.43.0.10/32 -p tcp -m tcp --dport 53 -j KUBE-SVC-DNS",
    "-A KUBE-SVC-DNS -m statistic --mode random --probability 0.5 -j KUBE-SEP-A",
    "-A KUBE-SVC-DNS -j KUBE-SEP-B",
    "-A KUBE-SEP-A -p udp -m udp -j DNAT --to-destination 10.42.0.5:53",
    "-A KUBE-SEP-A -p tcp -m tcp -j DNAT --to-destination 10.42.0.5:53",
    "-A KUBE-SEP-B -p udp -m udp -j DNAT --to-destination 10.42.7.9:53",
    "-A KUBE-SEP-B -p tcp -m tcp -j DNAT --to-destination 10.42.7.9:53",
    chains=("KUBE-SERVICES", "KUBE-SVC-DNS", "KUBE-SEP-A", "KUBE-SEP-B"),
)


def test_service_dnat_changes_destination_for_forward() -> None:
    to_service = filter_table("-A FORWARD -d 10.43.0.10/32 -j DROP")
    assert verdicts([KUBE_NAT, to_service])["pod-dns-udp"].verdict == "pass"
    remote = filter_table("-A FORWARD -o flannel.1 -p udp -j DROP")
    found = verdicts([KUBE_NAT, remote])
    assert found["pod-dns-udp"].verdict == "may-drop"  # one endpoint of two is remote
    assert found["pod-dns-tcp"].verdict == "pass"
    both = filter_table("-A FORWARD -d 10.42.0.0/16 -p udp -j DROP")
    assert verdicts([KUBE_NAT, both])["pod-dns-udp"].verdict == "drop"


def test_service_dnat_in_output_for_host_network() -> None:
    rules = filter_table("-A OUTPUT -d 10.42.7.9/32 -j REJECT")
    found = verdicts([KUBE_NAT, rules])
    assert found["host-dns-udp"].verdict == "may-drop"


def test_no_endpoints_reject_iptables_mode_is_marked() -> None:
    rules = filter_table(
        "-A FORWARD -m conntrack --ctstate NEW -j KUBE-SERVICES",
        '-A KUBE-SERVICES -d 10.43.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns '
        'has no endpoints" -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable',
        chains=("KUBE-SERVICES",),
    )
    found = verdicts([rules])
    stop = found["pod-dns-udp"].stopped_by
    assert found["pod-dns-udp"].verdict == "drop"
    assert stop is not None and stop.no_endpoints and stop.owner == "kube-proxy"


# --------------------------------------------------------------------------- nft helpers


def nft_doc(*items: dict[str, object], sets: Sequence[dict[str, object]] = ()) -> str:
    tables = {(i["chain"]["family"], i["chain"]["table"]) for i in items if "chain" in i}  # type: ignore[index]
    head = [{"table": {"family": f, "name": n, "handle": 1}} for f, n in sorted(tables)]
    return json.dumps(
        {
            "nftables": [
                *head,
                *sets,
                *[i for i in items if "chain" in i],
                *[i for i in items if "rule" in i],
            ]
        }
    )


def chain(
    family: str,
    tbl: str,
    name: str,
    hook: str | None = None,
    prio: int = 0,
    policy: str = "accept",
    kind: str = "filter",
) -> dict[str, object]:
    body: dict[str, object] = {"family": family, "table": tbl, "name": name, "handle": 1}
    if hook is not None:
        body.update({"type": kind, "hook": hook, "prio": prio, "policy": policy})
    return {"chain": body}


def rule(
    family: str,
    tbl: str,
    name: str,
    expr: list[object],
    handle: int = 9,
    comment: str | None = None,
) -> dict[str, object]:
    body: dict[str, object] = {
        "family": family,
        "table": tbl,
        "chain": name,
        "handle": handle,
        "expr": expr,
    }
    if comment:
        body["comment"] = comment
    return {"rule": body}


def dport(proto: str, port: object) -> dict[str, object]:
    return {
        "match": {
            "op": "==",
            "left": {"payload": {"protocol": proto, "field": "dport"}},
            "right": port,
        }
    }


def mangle_mark(value: int) -> dict[str, object]:
    return {"mangle": {"key": {"meta": {"key": "mark"}}, "value": value}}


def mark_is(value: int) -> dict[str, object]:
    return {
        "match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, value]}, "right": value}
    }


def kube_proxy_nft(endpoints: Sequence[str], no_endpoints: bool = False) -> str:
    """A trimmed kube-proxy nftables-mode table (Kubernetes 1.31+ layout)."""
    key = {
        "concat": [
            {"payload": {"protocol": "ip", "field": "daddr"}},
            {"meta": {"key": "l4proto"}},
            {"payload": {"protocol": "th", "field": "dport"}},
        ]
    }
    items: list[dict[str, object]] = [
        chain("ip", "kube-proxy", "nat-prerouting", "prerouting", -100, kind="nat"),
        chain("ip", "kube-proxy", "nat-output", "output", -100, kind="nat"),
        chain("ip", "kube-proxy", "filter-forward", "forward", 0),
        chain("ip", "kube-proxy", "filter-output", "output", 0),
        chain("ip", "kube-proxy", "services"),
        chain("ip", "kube-proxy", "service-endpoints-check"),
        chain("ip", "kube-proxy", "cluster-ips-check"),
        chain("ip", "kube-proxy", "reject-chain"),
        chain("ip", "kube-proxy", "service-NWBZK7IH-kube-system/kube-dns/udp/dns"),
        rule("ip", "kube-proxy", "nat-prerouting", [{"jump": {"target": "services"}}]),
        rule("ip", "kube-proxy", "nat-output", [{"jump": {"target": "services"}}]),
        rule("ip", "kube-proxy", "services", [{"vmap": {"key": key, "data": "@service-ips"}}]),
        rule(
            "ip",
            "kube-proxy",
            "filter-forward",
            [ct_new(), {"jump": {"target": "service-endpoints-check"}}],
        ),
        rule(
            "ip",
            "kube-proxy",
            "filter-forward",
            [ct_new(), {"jump": {"target": "cluster-ips-check"}}],
        ),
        rule(
            "ip",
            "kube-proxy",
            "filter-output",
            [ct_new(), {"jump": {"target": "service-endpoints-check"}}],
        ),
        rule(
            "ip",
            "kube-proxy",
            "filter-output",
            [ct_new(), {"jump": {"target": "cluster-ips-check"}}],
        ),
        rule(
            "ip",
            "kube-proxy",
            "service-endpoints-check",
            [{"vmap": {"key": key, "data": "@no-endpoint-services"}}],
        ),
        rule(
            "ip",
            "kube-proxy",
            "cluster-ips-check",
            [
                {
                    "match": {
                        "op": "==",
                        "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                        "right": "@cluster-ips",
                    }
                },
                {"reject": None},
            ],
            handle=31,
        ),
        rule("ip", "kube-proxy", "reject-chain", [{"reject": None}], handle=40),
    ]
    for n, endpoint in enumerate(endpoints):
        name = f"endpoint-{n}"
        items.append(chain("ip", "kube-proxy", name))
        items.append(rule("ip", "kube-proxy", name, [{"dnat": {"addr": endpoint, "port": 53}}]))
    if endpoints:
        pick = [[n, {"goto": {"target": f"endpoint-{n}"}}] for n in range(len(endpoints))]
        items.append(
            rule(
                "ip",
                "kube-proxy",
                "service-NWBZK7IH-kube-system/kube-dns/udp/dns",
                [
                    {
                        "vmap": {
                            "key": {
                                "numgen": {"mode": "random", "mod": len(endpoints), "offset": 0}
                            },
                            "data": {"set": pick},
                        }
                    }
                ],
            )
        )
    service = [
        [
            {"concat": ["10.43.0.10", p, 53]},
            {"goto": {"target": "service-NWBZK7IH-kube-system/kube-dns/udp/dns"}},
        ]
        for p in ("udp", "tcp")
    ]
    rejects = [
        [{"concat": ["10.43.0.10", p, 53]}, {"goto": {"target": "reject-chain"}}]
        for p in ("udp", "tcp")
    ]
    sets: list[dict[str, object]] = [
        {
            "map": {
                "family": "ip",
                "table": "kube-proxy",
                "name": "service-ips",
                "elem": [] if no_endpoints else service,
            }
        },
        {
            "map": {
                "family": "ip",
                "table": "kube-proxy",
                "name": "no-endpoint-services",
                "elem": rejects if no_endpoints else [],
            }
        },
        {
            "set": {
                "family": "ip",
                "table": "kube-proxy",
                "name": "cluster-ips",
                "elem": ["10.43.0.10"],
            }
        },
    ]
    return nft_doc(*items, sets=sets)


def ct_new() -> dict[str, object]:
    return {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}


def test_kube_proxy_nftables_mode_dnat_and_cluster_ip_check() -> None:
    found = verdicts([], nft=kube_proxy_nft(["10.42.0.5", "10.42.7.9"]))
    assert outcome(found) == ALL_PASS  # DNATed before filter-forward's cluster-ips-check


def test_kube_proxy_nftables_mode_no_endpoints_is_reported_as_such() -> None:
    found = verdicts([], nft=kube_proxy_nft([], no_endpoints=True))
    for name in ("pod-dns-udp", "pod-dns-tcp", "host-dns-udp"):
        stop = found[name].stopped_by
        assert found[name].verdict == "drop", name
        assert stop is not None and stop.no_endpoints and stop.chain == "reject-chain"
        assert stop.owner == "kube-proxy"


def test_kube_proxy_nftables_mode_random_endpoint_to_a_dropping_path() -> None:
    rules = filter_table("-A FORWARD -d 10.42.7.9/32 -j DROP")
    found = verdicts([rules], nft=kube_proxy_nft(["10.42.0.5", "10.42.7.9"]))
    assert found["pod-dns-udp"].verdict == "may-drop"
    assert any("random" in note for note in found["pod-dns-udp"].undecided)


def test_nft_named_set_members() -> None:
    sets: list[dict[str, object]] = [
        {
            "set": {
                "family": "inet",
                "table": "fw",
                "name": "blocked",
                "elem": [53, {"range": [100, 200]}],
            }
        }
    ]
    expr = [
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "udp", "field": "dport"}},
                "right": "@blocked",
            }
        },
        {"drop": None},
    ]
    nft = nft_doc(
        chain("inet", "fw", "out", "output", 0), rule("inet", "fw", "out", expr), sets=sets
    )
    found = verdicts([], nft=nft)
    assert found["host-dns-udp"].verdict == "drop"
    assert found["host-dns-tcp"].verdict == "pass"


def test_nft_drop_policy_and_inet_family_covers_ipv4() -> None:
    nft = nft_doc(
        chain("inet", "filter", "input", "input", 0, policy="drop"),
        rule(
            "inet",
            "filter",
            "input",
            [
                {
                    "match": {
                        "op": "==",
                        "left": {"ct": {"key": "state"}},
                        "right": {"set": ["established", "related"]},
                    }
                },
                {"accept": None},
            ],
        ),
    )
    found = verdicts([], nft=nft)
    assert found["overlay-vxlan"].verdict == "drop"
    stop = found["overlay-vxlan"].stopped_by
    assert stop is not None and stop.is_policy and "policy accept" in stop.fix
    assert found["dns-replies"].verdict == "pass"


# --------------------------------------------------------------------------- flows and facts


def test_unknown_inputs_are_said_not_guessed() -> None:
    found = {v.flow.name: v for v in evaluate([], dns_flows(NodeFacts()))}
    assert found["pod-dns-udp"].verdict == "unknown"
    assert "cluster DNS" in found["pod-dns-udp"].reason
    no_pods = {v.flow.name: v for v in evaluate([], dns_flows(facts(pod_cidrs=())))}
    assert (
        no_pods["pod-dns-udp"].verdict == "unknown"
        and "--pod-cidr" in no_pods["pod-dns-udp"].reason
    )
    assert no_pods["host-dns-udp"].verdict == "pass"


def test_overlay_flows_follow_the_links() -> None:
    links = (
        OverlayLink("vxlan.calico", "vxlan", 4789),
        OverlayLink("tunl0", "ipip"),
        OverlayLink("wg0", "wireguard", 51820),
    )
    flows = {f.name: f for f in dns_flows(facts(overlay=links))}
    assert flows["overlay-vxlan"].packets[0].dport == 4789
    assert flows["overlay-ipip"].packets[0].l4proto == 4
    assert flows["overlay-wireguard"].packets[0].dport == 51820
    assert "overlay-ipip" not in {f.name for f in dns_flows(FACTS)}
    rules = filter_table(
        "-A INPUT -p 4 -j DROP",
        "-A INPUT -p udp --dport 51820 -j ACCEPT",
        policies={"INPUT": "ACCEPT"},
    )
    found = {v.flow.name: v for v in evaluate([parse_iptables_save(rules)], list(flows.values()))}
    assert found["overlay-ipip"].verdict == "drop"
    assert found["overlay-wireguard"].verdict == "pass"


def test_ipip_is_protocol_4_not_the_protocol_named_ipip() -> None:
    """iptables and nft name protocol 4 "ipencap" and 94 "ipip" (/etc/protocols): an accept
    of "ipip" lets no IP-in-IP packet in (the netns lab's kernel showed it); firewalld's fix
    names the protocol by number."""
    flows = [f for f in dns_flows(facts(overlay=(OverlayLink("tunl0", "ipip"),)))]
    for accepted, verdict in (("ipip", "drop"), ("ipencap", "pass"), ("4", "pass")):
        rules = filter_table(f"-A INPUT -p {accepted} -j ACCEPT", policies={"INPUT": "DROP"})
        found = {v.flow.name: v for v in evaluate([parse_iptables_save(rules)], flows)}
        assert found["overlay-ipip"].verdict == verdict, accepted
    firewalld = (VECTORS / "lab_tunnels_firewalld.nft.json").read_text()
    found = {v.flow.name: v for v in evaluate([parse_nft_json(firewalld)], flows)}
    stop = found["overlay-ipip"].stopped_by
    assert stop is not None and "--add-protocol=4`" in stop.fix


def test_overlay_packets_travel_in_their_underlay_family() -> None:
    """Dual stack over an IPv4 vxlan link: no IPv6 overlay-vxlan flow, and the IPv6 answers
    from another node arrive inside IPv4 UDP 8472, which IPv4's INPUT judges."""
    dual = facts(
        cluster_dns=("10.43.0.10", "fd43::a"),
        pod_cidrs=("10.42.0.0/24", "fd42::/64"),
        cluster_cidrs=("10.42.0.0/16", "fd42::/56"),
        node_addresses=("192.168.1.10", "fd99::1"),
        overlay=(OverlayLink("flannel.1", "vxlan", 8472, "ipv4"),),
        dns_endpoints=("10.42.1.2", "fd42:0:0:1::2"),
    )
    flows = dns_flows(dual)
    assert ("overlay-vxlan", "ipv6") not in {(f.name, f.family) for f in flows}
    unknown = replace(dual, overlay=(OverlayLink("flannel.1", "vxlan", 8472),))
    assert ("overlay-vxlan", "ipv6") in {(f.name, f.family) for f in dns_flows(unknown)}
    rules = filter_table(
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        policies={"INPUT": "DROP"},
    )
    dnat = "-d fd43::a/128 -j DNAT --to-destination [fd42:0:0:1::2]:53"
    service = table("nat", ["PREROUTING", "OUTPUT"], f"-A PREROUTING {dnat}", f"-A OUTPUT {dnat}")
    rulesets = [parse_iptables_save(rules), parse_iptables_save(service, family="ipv6")]
    found = {(v.flow.name, v.flow.family): v for v in evaluate(rulesets, flows)}
    replies = found[("dns-replies", "ipv6")]
    assert replies.verdict == "drop" and replies.stopped_by is not None
    assert (replies.stopped_by.family, replies.stopped_by.chain) == ("ipv4", "INPUT")


def test_pods_of_a_family_ride_the_overlay_link_of_that_family() -> None:
    """Calico dual stack: IPv4 pods over vxlan.calico, IPv6 pods over vxlan-v6.calico."""
    links = (
        OverlayLink("vxlan.calico", "vxlan", 4789, "ipv4"),
        OverlayLink("vxlan-v6.calico", "vxlan", 4789, "ipv6"),
    )
    dual = facts(overlay=links, cluster_cidrs=("10.42.0.0/16", "fd42::/56"))
    for family, network, dev in (
        ("ipv4", "10.42.0.0/16", "vxlan.calico"),
        ("ipv6", "fd42::/56", "vxlan-v6.calico"),
    ):
        routes = {(r.network, r.dev) for r in node_routes(dual, family)}  # type: ignore[arg-type]
        assert (network, dev) in routes


def test_rpfilter_lookup_options_do_not_make_it_undecided() -> None:
    """firewalld's IPv6 reverse path filter (iptables backend) lets the flows through."""
    dual = facts(cluster_dns=("fd43::a",), node_addresses=("fd99::1",), pod_cidrs=("fd42::/64",))
    mangle = table(
        "mangle", ["PREROUTING"], "-A PREROUTING -m rpfilter --validmark --invert -j DROP"
    )
    found = evaluate([parse_iptables_save(mangle, family="ipv6")], dns_flows(dual))
    pod = {v.flow.name: v for v in found}["pod-dns-udp"]
    assert pod.verdict == "pass" and pod.undecided == ()


def test_ipv6_extension_header_matches_never_match_dns_packets() -> None:
    """ufw6 drops type 0 routing headers: a DNS packet has none."""
    dual = facts(cluster_dns=("fd43::a",), node_addresses=("fd99::1",))
    rules = filter_table("-A OUTPUT -m rt --rt-type 0 -j DROP", "-A OUTPUT -m frag -j DROP")
    found = evaluate([parse_iptables_save(rules, family="ipv6")], dns_flows(dual))
    host = {v.flow.name: v.verdict for v in found}
    assert host["host-dns-udp"] == host["host-dns-tcp"] == "pass"


def test_routes_from_facts() -> None:
    routes = node_routes(facts(local_dns_cache=("169.254.20.10",)), "ipv4")
    local = {r.network for r in routes if r.local}
    assert local == {"192.168.1.10/32", "169.254.20.10/32"}
    assert ("10.42.0.0/24", "cni0") in {(r.network, r.dev) for r in routes}
    assert ("10.42.0.0/16", "flannel.1") in {(r.network, r.dev) for r in routes}


def test_hand_built_flow_for_the_lab() -> None:
    flow = Flow(
        "custom",
        "ipv4",
        (Packet("ipv4", "in", "10.0.0.2", "10.0.1.2", "udp", 53, 4000, iif="veth0"),),
    )
    rules = filter_table("-A FORWARD -i veth0 -p udp --dport 53 -j DROP")
    (verdict,) = evaluate([parse_iptables_save(rules)], [flow])
    assert verdict.verdict == "drop"


# --------------------------------------------------------------------------- recorded vectors


def recorded(scenario: str, nft: bool = False) -> list[Ruleset]:
    return [r for r in recorded_rulesets(scenario) if nft or r.backend != "nft"]


RKE2_FACTS = facts(local_dns_cache=("169.254.20.10", "10.43.0.10"))
#: scenario -> the flows that do not pass on an RKE2 node with NodeLocal DNSCache.
RECORDED: dict[str, dict[str, str]] = {
    "clean_rke2": {},
    "fault_output_drop": {"host-dns-udp": "drop"},
    "fault_all_to_dns": {"host-dns-udp": "drop", "host-dns-tcp": "drop"},
    "fault_multiport": {"host-dns-udp": "drop", "dns-upstream-udp": "drop"},
    "fault_negated_dst": {"host-dns-udp": "drop", "dns-upstream-udp": "drop"},
    "fault_negations": {"host-dns-tcp": "drop", "dns-upstream-tcp": "drop"},
    "fault_proto_number": {"host-dns-tcp": "drop", "dns-upstream-tcp": "drop"},
    "fault_ufw": {"dns-upstream-udp": "drop", "dns-upstream-tcp": "drop"},
    # NodeLocal's INPUT accepts come before HARDEN-IN; FLANNEL-FWD accepts pods before the
    # FORWARD reject; NOTRACK keeps DNS out of kube-proxy's ctstate NEW jumps.
    "fault_custom_reject": {},
    "fault_range": {},
    "fault_no_endpoints": {},
}


@pytest.mark.parametrize("scenario", sorted(RECORDED))
@pytest.mark.parametrize("with_nft", [False, True])
def test_recorded_vectors(scenario: str, with_nft: bool) -> None:
    found = {
        v.flow.name: v.verdict
        for v in evaluate(recorded(scenario, with_nft), dns_flows(RKE2_FACTS))
    }
    expected = {**{k: v for k, v in ALL_PASS.items()}, **RECORDED[scenario]}
    assert found == expected


@pytest.mark.parametrize("scenario", sorted(RECORDED))
def test_lazily_parsed_nat_gives_the_same_verdicts(scenario: str) -> None:
    text = (VECTORS / f"{scenario}.iptables-save").read_text()
    flows = dns_flows(RKE2_FACTS)
    eager = evaluate([parse_iptables_save(text)], flows)
    lazy = evaluate([parse_iptables_save(text, lazy=("nat",))], flows)
    assert [(v.verdict, v.stopped_by) for v in lazy] == [(v.verdict, v.stopped_by) for v in eager]


def test_recorded_native_nft_table_and_legacy() -> None:
    native = {
        v.flow.name: v for v in evaluate(recorded("fault_native", nft=True), dns_flows(RKE2_FACTS))
    }
    blocked = {n: v for n, v in native.items() if v.verdict != "pass"}
    assert blocked, "the native nft table's drop is seen"
    assert all(v.stopped_by is not None and v.stopped_by.backend == "nft" for v in blocked.values())
    legacy = {v.flow.name: v for v in evaluate(recorded("fault_legacy"), dns_flows(RKE2_FACTS))}
    assert any(
        v.stopped_by is not None and v.stopped_by.backend == "iptables-legacy"
        for v in legacy.values()
    )


# --------------------------------------------------------------------------- overlay encapsulation


PEERED = facts(peer_nodes=("192.168.1.20",))


def test_query_to_a_remote_endpoint_leaves_as_vxlan_through_output() -> None:
    output = filter_table("-A OUTPUT -p udp --dport 8472 -j DROP")
    found = verdicts([KUBE_NAT, output], PEERED)
    assert found["pod-dns-udp"].verdict == "may-drop"  # the endpoint on the peer node
    stop = found["pod-dns-udp"].stopped_by
    assert stop is not None and stop.hook == "output" and stop.chain == "OUTPUT"
    assert any("encapsulated by flannel.1" in step for step in found["pod-dns-udp"].path)


def test_answers_from_a_remote_endpoint_arrive_as_a_new_vxlan_flow() -> None:
    rules = filter_table(
        "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A INPUT -p tcp --dport 22 -j ACCEPT",
        policies={"INPUT": "DROP"},
    )
    found = verdicts([KUBE_NAT, rules], PEERED)
    assert found["overlay-vxlan"].verdict == "drop"
    assert found["pod-dns-udp"].verdict == "pass"
    assert found["dns-replies"].verdict == "may-drop"  # the remote endpoint's answers


def test_ct_status_dnat_is_known_on_the_original_direction() -> None:
    status = {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}
    nft = nft_doc(
        chain("inet", "fw", "fwd", "forward", 10, policy="drop"),
        rule("inet", "fw", "fwd", [status, {"accept": None}]),
    )
    plain = verdicts([], nft=nft)
    assert plain["dns-upstream-udp"].verdict == "drop"  # no DNAT on the way out: decided
    assert not plain["dns-upstream-udp"].undecided
    assert verdicts([KUBE_NAT], nft=nft)["pod-dns-udp"].verdict == "pass"  # DNATed


# --------------------------------------------------------------------------- ipsets

IPSET_SAVE = """create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536
add KUBE-CLUSTER-IP 10.43.0.10,tcp:53
add KUBE-CLUSTER-IP 10.43.0.10,udp:53
create cali40all-ipam-pools hash:net family inet hashsize 1024 maxelem 65536
add cali40all-ipam-pools 10.42.0.0/16
create pools list:set size 8
add pools cali40all-ipam-pools
"""


def with_ipsets(rules: str, ipset_text: str = IPSET_SAVE) -> dict[str, FlowVerdict]:
    rulesets = [
        parse_iptables_save(rules),
        Ruleset(backend="ipset", ipsets=dict(parse_ipset_save(ipset_text))),
    ]
    return {v.flow.name: v for v in evaluate(rulesets, dns_flows(FACTS))}


def test_ipset_members_decide_set_matches() -> None:
    rules = filter_table(
        "-A FORWARD -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
        "-A FORWARD -m set --match-set pools src -p udp -j DROP",
        "-A OUTPUT -m set ! --match-set cali40all-ipam-pools dst -p tcp -j DROP",
    )
    found = with_ipsets(rules)
    assert found["pod-dns-udp"].verdict == "pass"  # 10.43.0.10,udp:53 is in the set
    assert found["dns-upstream-udp"].verdict == "drop"  # from the pool (list:set), to 1.1.1.1
    assert found["dns-upstream-tcp"].verdict == "pass"  # forwarded: OUTPUT not crossed
    assert found["host-dns-tcp"].verdict == "drop"  # 10.43.0.10 is not in the pool
    assert not found["host-dns-tcp"].undecided


def test_a_set_the_dump_does_not_show_cannot_be_decided() -> None:
    rules = filter_table("-A OUTPUT -m set --match-set unseen dst -j DROP")
    assert with_ipsets(rules)["host-dns-udp"].verdict == "may-drop"


# --------------------------------------------------------------------------- never raises

HOOKS = ("input", "forward", "output", "prerouting", "postrouting")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_TOKENS, max_size=14).map(" ".join), max_size=20))
def test_evaluator_never_raises_on_iptables_junk(lines: list[str]) -> None:
    rules = [line if line.startswith("-A ") else f"-A OUTPUT {line}" for line in lines]
    text = filter_table(*rules, chains=("X",)) + table("nat", ["PREROUTING", "OUTPUT"], *rules)
    rulesets = [parse_iptables_save(text), parse_iptables_save(text, lazy=("nat",))]
    evaluate(rulesets, dns_flows(FACTS))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_JSON, max_size=6))
def test_evaluator_never_raises_on_nft_junk(exprs: list[object]) -> None:
    chains = [chain("inet", "t", f"c{i}", hook) for i, hook in enumerate(HOOKS)]
    rules = [
        rule("inet", "t", f"c{i % len(HOOKS)}", e if isinstance(e, list) else [e])
        for i, e in enumerate(exprs)
    ]
    evaluate([parse_nft_json(nft_doc(*chains, *rules))], dns_flows(FACTS))
