"""Fuzz the ``nft -j list ruleset`` parser and the DNS-drop analysis (collectors/netfilter/),
the way ``nodediag analyze --nft-json FILE`` and the firewall collector use them.

Input: JSON text. Seeds: tests/vectors/firewall/*.nft.json, whole and cut into one document
per table (small documents mutate faster). A structure-aware mutator edits the parsed
document most of the time (byte mutations of JSON mostly give invalid JSON).

Invariants (by design, see the module doc of collectors/netfilter/):
- nothing raises (``parse_nft_json`` is documented as never raising: bad JSON gives an empty
  ruleset with a warning, odd objects are skipped);
- every hit is a rule of the input: a ``rule`` object of a ``table`` object of the input,
  at its position in its chain, with its handle;
- its verdict is DROP or REJECT (directly or through a verdict map entry that covers port
  53) and the rule can match UDP or TCP to port 53;
- the jump path starts at a chain with a hook, has no loop and ends at the rule's chain;
- the fix of a rule no firewall manager owns is the ``nft delete rule`` of that handle.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from typing import Any

import _common
import atheris
from fuzz_firewall import CLUSTER_DNS, NODE, table_of

_common.enable_hooks(atheris)
with atheris.instrument_imports(include=["collectors"]):
    from collectors.firewall_collector import findings_from_files
    from collectors.netfilter.dns_rules import DnsRuleHit, dns_rule_hits
    from collectors.netfilter.model import Ruleset
    from collectors.netfilter.nft import parse_nft_json


def check_nft_hit(ruleset: Ruleset, hit: DnsRuleHit) -> None:
    assert hit.backend == "nft" and hit.target in ("DROP", "REJECT"), hit
    table = table_of(ruleset, hit)
    rule = table.chains[hit.chain].rules[hit.position - 1]
    assert rule.handle == hit.handle, (hit, rule)
    match = rule.match
    assert match.admits_port(53), (hit, match)
    if match.port_vmap:
        assert any(
            verdict == hit.target and any(lo <= 53 <= hi for lo, hi in ports)
            for ports, verdict, _jump in match.port_vmap
        ), (hit, match)
    else:
        assert match.target is not None and match.target.upper() == hit.target, (hit, match)
    assert hit.protocols and set(hit.protocols) <= match.protocols & {"udp", "tcp"}, hit
    if hit.manager is None:
        handle = hit.handle if hit.handle is not None else "<handle>"
        assert hit.fix.startswith("nft delete rule "), hit
        assert hit.fix.endswith(f" {hit.table} {hit.chain} handle {handle}"), hit


def test_one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    ruleset = parse_nft_json(text)
    assert ruleset.backend == "nft"
    for hit in dns_rule_hits([ruleset], CLUSTER_DNS):
        check_nft_hit(ruleset, hit)
    for finding in findings_from_files(None, text, CLUSTER_DNS, NODE):
        finding.to_json()


# Values a mutation may put anywhere in the document: the shapes collectors/netfilter/
# looks for, and the odd ones it must survive.
_VALUES: list[Any] = [
    53,
    "53",
    "domain",
    0,
    -1,
    65536,
    2**64,
    1.5,
    True,
    None,
    "",
    "udp",
    "tcp",
    "th",
    "sctp",
    "dport",
    "sport",
    "daddr",
    "saddr",
    "protocol",
    "l4proto",
    "iifname",
    "drop",
    "reject",
    "accept",
    "==",
    "!=",
    "in",
    "<",
    ">=",
    "@s",
    "10.43.0.10",
    "10.43.0.0/16",
    "fd00::a",
    "input",
    "output",
    "filter",
    "ip",
    "ip6",
    "inet",
    [],
    {},
    [53, {"drop": None}],
    {"set": [53, {"range": [50, 60]}]},
    {"range": [60, 50]},
    {"range": ["10.0.0.1", "fd00::1"]},
    {"prefix": {"addr": "10.43.0.0", "len": 16}},
    {"elem": {"val": 53}},
    {"payload": {"protocol": "udp", "field": "dport"}},
    {"meta": {"key": "l4proto"}},
    {"jump": {"target": "c"}},
    {"drop": None},
]


def _slots(node: Any, found: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key or index) of the document, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((node, key))
            _slots(value, found)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.append((node, index))
            _slots(value, found)
    return found


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """Structure-aware mutation: mostly edit the parsed JSON document (replace, delete or copy
    a value; rename a key), else libFuzzer's byte mutation (which finds the syntax errors)."""
    rng = random.Random(seed)
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        document = None
    slots = _slots(document, []) if rng.random() < 0.8 else []
    if not slots:
        return bytes(atheris.Mutate(data, max_size))
    for _ in range(rng.randint(1, 4)):
        container, key = rng.choice(slots)
        action = rng.random()
        if action < 0.5:
            donor = rng.choice(slots)
            new = donor[0][donor[1]] if rng.random() < 0.3 else rng.choice(_VALUES)
            container[key] = copy.deepcopy(new)
        elif action < 0.7 and isinstance(container, list):
            container.insert(key, copy.deepcopy(container[key]))
        elif action < 0.85 and isinstance(container, dict):
            container[rng.choice([k for k in _VALUES if isinstance(k, str)])] = container.pop(key)
        else:
            del container[key]
        slots = _slots(document, [])
        if not slots:
            break
    mutated = json.dumps(document).encode()
    return mutated if len(mutated) <= max_size else bytes(atheris.Mutate(data, max_size))


def _per_table(raw: bytes) -> list[bytes]:
    """One document per table: the table object, its chains, sets, maps and rules."""
    items: list[Any] = json.loads(raw)["nftables"]
    documents: list[bytes] = []
    for item in items:
        table = item.get("table")
        if table is None:
            continue
        key = (table.get("family"), table.get("name"))
        members = [
            other
            for other in items
            for body in other.values()
            if isinstance(body, dict) and (body.get("family"), body.get("table")) == key
        ]
        documents.append(json.dumps({"nftables": [item, *members]}).encode())
    return documents


def seeds() -> list[bytes]:
    whole = _common.vector_bytes("firewall/*.nft.json")
    parts = {part for document in whole for part in _per_table(document)}
    return whole + sorted(parts)


DICTIONARY = [
    b'{"nftables": [',
    b'{"table": {"family": "inet", "name": "t", "handle": 1}}',
    b'{"chain": {"family": "inet", "table": "t", "name": "c", "hook": "output", "handle": 2}}',
    b'{"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 3, "expr": [',
    b'{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, '
    b'"right": 53}}',
    b'{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}',
    b'{"vmap": {"key": {"payload": {"protocol": "th", "field": "dport"}}, "data": ',
    b'{"set": [',
    b'{"range": [50, 60]}',
    b'{"prefix": {"addr": "10.43.0.0", "len": 16}}',
    b'{"elem": {"val": 53}}',
    b'{"counter": {"packets": 1, "bytes": 2}}',
    b'{"drop": null}',
    b'{"reject": {"type": "icmpx", "expr": "port-unreachable"}}',
    b'{"jump": {"target": "c2"}}',
    b'{"goto": {"target": "c2"}}',
    b'{"xt": {"type": "target", "name": "REJECT"}}',
    b'"op": "!="',
    b'"daddr"',
    b'"@s"',
    b'{"set": {"family": "inet", "table": "t", "name": "s", "elem": [53]}}',
    b'{"map": {"family": "inet", "table": "t", "name": "m", "elem": [[53, {"drop": null}]]}}',
]


if __name__ == "__main__":
    argv = _common.libfuzzer_argv("nft_json", seeds(), DICTIONARY)
    atheris.Setup(argv, test_one_input, custom_mutator=mutate)
    atheris.Fuzz()
    sys.exit(0)
