"""Fuzz the ``iptables-save -c`` parser and the DNS-drop analysis (collectors/netfilter/),
the way ``nodediag analyze --iptables-save FILE`` and the firewall collector use them.

Input: ``iptables-save``/``ip6tables-save`` text (either backend, concatenated outputs).
Seeds: tests/vectors/firewall/*-save, the rule sets in tests/vectors/firewall/src, and each
table of the recorded outputs on its own.

Invariants (by design, see the module doc of collectors/netfilter/):
- nothing raises (``parse_iptables_save``, ``parse_iptables_rule``, ``tokenize`` are
  documented as never raising; the analysis and the findings have no error path);
- every hit is a rule of the input: its text is a ``-A <chain> …`` line of the input, at the
  position it has in its chain, in a table where DROP/REJECT can exist (not nat);
- the rule's own target is DROP or REJECT, it can match UDP or TCP to port 53, and a rule
  without a port of its own hits the cluster DNS or is reached through a jump (which may
  have restricted the traffic to port 53);
- the jump path starts at a base chain, has no loop and ends at the rule's chain, and each
  step is a jump of the chain before it;
- ``kind`` is ``no_endpoints`` exactly when the comment is kube-proxy's "has no endpoints".
"""

from __future__ import annotations

import itertools
import re
import sys

import _common
import atheris

_common.enable_hooks(atheris)
with atheris.instrument_imports(include=["collectors"]):
    from collectors.firewall_collector import findings_from_files
    from collectors.netfilter.dns_rules import DnsRuleHit, dns_rule_hits
    from collectors.netfilter.iptables import nat_marks, parse_iptables_rule, parse_iptables_save
    from collectors.netfilter.model import DROP_TABLES, Ruleset, Table

CLUSTER_DNS = ("10.43.0.10", "169.254.20.10", "fd00:10:96::a")
NODE = "fuzz-node"


def table_of(ruleset: Ruleset, hit: DnsRuleHit) -> Table:
    """The table of ``ruleset`` that holds the hit's rule at the hit's position, reached
    through the hit's jump path (concatenated outputs may hold a table twice)."""
    for table in ruleset.tables:
        if (table.family, table.backend, table.name) != (hit.family, hit.backend, hit.table):
            continue
        chain = table.chains.get(hit.chain)
        rules = chain.rules if chain is not None else []
        at_position = len(rules) >= hit.position >= 1 and rules[hit.position - 1].text
        if at_position == hit.rule_text and has_path(table, hit):
            return table
    raise AssertionError(f"hit names no rule of the input, or no path to it: {hit}")


def has_path(table: Table, hit: DnsRuleHit) -> bool:
    """The jump path starts at a base chain, has no loop, ends at the rule's chain, and each
    step is a jump (or a verdict map's jump) of the chain before it."""
    path = hit.jump_path
    if not path or path[-1] != hit.chain or len(set(path)) != len(path):
        return False
    if any(name not in table.chains for name in path):
        return False
    if table.chains[path[0]] not in table.base_chains():
        return False
    return all(
        any(
            r.match.target == target or any(jump == target for *_, jump in r.match.port_vmap)
            for r in table.chains[source].rules
        )
        for source, target in itertools.pairwise(path)
    )


def check_iptables_hit(text: str, ruleset: Ruleset, hit: DnsRuleHit) -> None:
    assert hit.rule_text in text and hit.rule_text.startswith(f"-A {hit.chain} "), hit
    assert hit.table in DROP_TABLES, hit
    assert hit.packets >= 0 and hit.bytes >= 0
    table_of(ruleset, hit)
    match = parse_iptables_rule(hit.rule_text)
    assert match.target is not None and match.target.upper() == hit.target, (hit, match)
    assert hit.target in ("DROP", "REJECT"), hit
    assert match.admits_port(53), (hit, match)
    assert hit.protocols and set(hit.protocols) <= match.protocols & {"udp", "tcp"}, hit
    assert hit.hits_cluster_dns or match.dports is not None or len(hit.jump_path) > 1, hit
    assert hit.comment == match.comment
    no_endpoints = re.search("has no (local )?endpoints", hit.comment or "") is not None
    assert (hit.kind == "no_endpoints") == no_endpoints, hit


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")  # as the CLI reads the file
    for tables in (None, DROP_TABLES):
        ruleset = parse_iptables_save(text, tables=tables)
        for table in ruleset.tables:
            for chain in table.chains.values():
                for rule in chain.rules:
                    _ = rule.match
        for hit in dns_rule_hits([ruleset], CLUSTER_DNS):
            check_iptables_hit(text, ruleset, hit)
    for finding in findings_from_files(text, None, CLUSTER_DNS, NODE):
        assert finding.reason in ("DNSDropRule", "DNSNoEndpointsReject"), finding
        finding.to_json()
    nat_marks(text)


def _tables(text: bytes) -> list[bytes]:
    """Each ``*table … COMMIT`` block of an iptables-save output on its own."""
    blocks: list[bytes] = []
    block: list[bytes] | None = None
    for line in text.splitlines(keepends=True):
        if line.startswith(b"*"):
            block = []
        if block is not None:
            block.append(line)
            if line.rstrip() == b"COMMIT":
                blocks.append(b"".join(block))
                block = None
    return blocks


def seeds() -> list[bytes]:
    outputs = _common.vector_bytes("firewall/*-save")
    sources = _common.vector_bytes("firewall/src/*.rules*") + _common.vector_bytes(
        "firewall/src/*.legacy"
    )
    blocks = {block for output in outputs for block in _tables(output)}
    return outputs + sources + sorted(blocks)


DICTIONARY = [
    b"*filter\n",
    b"*raw\n",
    b"*mangle\n",
    b"*nat\n",
    b"COMMIT\n",
    b":INPUT ACCEPT [0:0]\n",
    b":OUTPUT DROP [1:2]\n",
    b"[12:345] ",
    b"-A OUTPUT ",
    b"-A INPUT ",
    b"-j DROP",
    b"-j REJECT",
    b"-g ",
    b"-j ",
    b" -p udp",
    b" -p tcp",
    b" ! ",
    b" -d 10.43.0.10/32",
    b" -d fd00::/8",
    b" -s ",
    b" -m multiport --dports ",
    b" --dport 53",
    b" --dport 50:60",
    b" --ports ",
    b" --sport ",
    b' -m comment --comment "kube-system/kube-dns:dns has no endpoints"',
    b"# Generated by iptables-save v1.8.9 (nf_tables) on",
    b"# Generated by ip6tables-save v1.8.9 (legacy) on",
    b"domain",
]


if __name__ == "__main__":
    atheris.Setup(_common.libfuzzer_argv("firewall", seeds(), DICTIONARY), test_one_input)
    atheris.Fuzz()
    sys.exit(0)
