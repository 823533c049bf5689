"""Owners of the rule or policy that stops a DNS flow, and the fix in the owner's terms
(collectors/netfilter/owners.py), on a rule set recorded from the real ufw 0.36.2 (``ufw
enable`` and ``ufw allow 22/tcp`` in a throwaway network namespace with a private copy of
/etc/ufw: tests/vectors/firewall/ufw_default.*) and on Docker-, firewalld- and hand-made
rule sets."""

from __future__ import annotations

from pathlib import Path

from test_netfilter_evaluate import FACTS, chain, filter_table, nft_doc, rule, verdicts

from collectors.netfilter.evaluate import evaluate
from collectors.netfilter.flows import dns_flows
from collectors.netfilter.iptables import parse_iptables_save
from collectors.netfilter.owners import firewalld_zone

VECTORS = Path(__file__).parent / "vectors" / "firewall"


def test_recorded_ufw_defaults_stop_pods_and_the_overlay_with_ufw_fixes() -> None:
    rulesets = [
        parse_iptables_save((VECTORS / f"ufw_default.{suffix}").read_text())
        for suffix in ("iptables-save", "ip6tables-save")
    ]
    found = {v.flow.name: v for v in evaluate(rulesets, dns_flows(FACTS))}
    assert {n: v.verdict for n, v in found.items()} == {
        "pod-dns-udp": "drop",
        "pod-dns-tcp": "drop",
        "host-dns-udp": "pass",
        "host-dns-tcp": "pass",
        "dns-replies": "pass",
        "overlay-vxlan": "drop",
        "dns-upstream-udp": "drop",
        "dns-upstream-tcp": "drop",
    }
    pods = found["pod-dns-udp"].stopped_by
    assert pods is not None and pods.is_policy and pods.owner == "ufw"
    assert (
        'DEFAULT_FORWARD_POLICY="ACCEPT"' in pods.fix and "ufw route allow in on cni0" in pods.fix
    )
    overlay = found["overlay-vxlan"].stopped_by
    assert overlay is not None and (overlay.chain, overlay.owner) == ("INPUT", "ufw")
    assert overlay.fix == "`ufw allow in on eth0 to any port 8472 proto udp`"
    assert not found["overlay-vxlan"].undecided  # ufw's LOG rules with -m limit are inert


def test_docker_forward_policy_is_dockers_with_a_docker_user_fix() -> None:
    rules = filter_table(
        "-A FORWARD -j DOCKER-USER",
        "-A FORWARD -j DOCKER-ISOLATION-STAGE-1",
        "-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A FORWARD -o docker0 -j DOCKER",
        "-A FORWARD -i docker0 ! -o docker0 -j ACCEPT",
        "-A DOCKER-USER -j RETURN",
        "-A DOCKER-ISOLATION-STAGE-1 -j RETURN",
        policies={"FORWARD": "DROP"},
        chains=("DOCKER", "DOCKER-USER", "DOCKER-ISOLATION-STAGE-1"),
    )
    stop = verdicts([rules])["pod-dns-udp"].stopped_by
    assert stop is not None and stop.owner == "docker" and stop.is_policy
    assert "iptables -I DOCKER-USER -i cni0" in stop.fix
    assert "-P FORWARD ACCEPT" in stop.fix


def test_firewalld_nft_zone_reject_names_the_zone_and_port() -> None:
    def jump(target: str, goto: bool = False) -> dict[str, object]:
        return {"goto" if goto else "jump": {"target": target}}

    nft = nft_doc(
        chain("inet", "firewalld", "filter_INPUT", "input", 10),
        chain("inet", "firewalld", "filter_INPUT_ZONES"),
        chain("inet", "firewalld", "filter_IN_public"),
        chain("inet", "firewalld", "filter_IN_public_allow"),
        rule("inet", "firewalld", "filter_INPUT", [jump("filter_INPUT_ZONES")]),
        rule(
            "inet",
            "firewalld",
            "filter_INPUT",
            [{"reject": {"type": "icmpx", "expr": "admin-prohibited"}}],
            handle=12,
        ),
        rule("inet", "firewalld", "filter_INPUT_ZONES", [jump("filter_IN_public", goto=True)]),
        rule("inet", "firewalld", "filter_IN_public", [jump("filter_IN_public_allow")]),
    )
    stop = verdicts([], nft=nft)["overlay-vxlan"].stopped_by
    assert stop is not None and stop.owner == "firewalld" and stop.handle == 12
    assert stop.fix.startswith("`firewall-cmd --permanent --zone=public --add-port=8472/udp`")


def test_firewalld_zone_from_chain_names() -> None:
    assert (
        firewalld_zone(["INPUT", "INPUT_ZONES", "IN_internal", "IN_internal_allow"]) == "internal"
    )
    assert firewalld_zone(["filter_INPUT", "filter_IN_public_deny", "filter_INPUT"]) == "public"
    assert firewalld_zone(["filter_IN_policy_allow-host-ipv6"]) is None


def test_hand_written_rules_get_delete_commands() -> None:
    rules = filter_table(
        "-A OUTPUT -p udp --dport 53 -j DROP", "-A OUTPUT -p tcp --dport 53 -j DROP"
    )
    found = verdicts([rules])
    stop = found["host-dns-tcp"].stopped_by
    assert stop is not None and stop.owner is None
    assert stop.fix == "`iptables -t filter -D OUTPUT 2`"


def test_cni_and_kube_proxy_owners() -> None:
    rules = filter_table(
        "-A FORWARD -j cali-FORWARD",
        "-A cali-FORWARD -p udp -j DROP",
        "-A FORWARD -j KUBE-FORWARD",
        "-A KUBE-FORWARD -p tcp -j DROP",
        chains=("cali-FORWARD", "KUBE-FORWARD"),
    )
    found = verdicts([rules])
    udp, tcp = found["pod-dns-udp"].stopped_by, found["pod-dns-tcp"].stopped_by
    assert udp is not None and udp.owner == "calico" and "calico" in udp.fix
    assert tcp is not None and tcp.owner == "kube-proxy"
