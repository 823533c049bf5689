"""Native nft tables read over netlink (``collectors.netfilter.nft_netlink_*``), with nft itself
as the oracle: real rule sets (kube-proxy's nftables mode small and large, with and without
kube-dns endpoints; the nftables configs of tests/vectors/firewall/src; firewalld's nftables
backend table; a file of the statement shapes the reader decodes) are loaded into throwaway
network namespaces, and

- every chain's rules read over netlink equal what ``nft -j list table`` prints for them
  (statements, handles, comments, counters), every named set's elements too. No normalisation
  is needed for these rule sets: the reader folds protocol dependencies, merges ``>= <=``
  into ranges, prints IPv6 addresses with inet_ntop and sorts set elements as nft does;
- the firewall collector reading the big tables over netlink gives the verdicts, stops
  (table, chain, handle, position, rule, counters, owner, fix) and findings of the collector
  reading everything with nft;
- a table holding something the reader does not decode (Alpine's config: nft merged two ip6
  header matches into one 2-byte compare) is read with nft, and the source says why.

Recorded netlink answers (tests/vectors/firewall/netlink, ``record_netlink.py``) run the same
comparisons without root."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from kube_proxy_nft import kube_proxy_nft_script
from nft_recorded import Recorded
from prometheus_client import CollectorRegistry
from test_firewall_netns import Netns, kube_proxy_rules
from test_netfilter_evaluate import FACTS as EVALUATOR_FACTS

from collectors.finding import Finding
from collectors.firewall_collector import FirewallCollector
from collectors.netfilter.evaluate import FlowVerdict
from collectors.netfilter.model import Table
from collectors.netfilter.nft import NftRule
from collectors.netfilter.nft_netlink_table import netlink_table
from collectors.netfilter.nft_netlink_types import NetlinkFallback
from collectors.netfilter.nft_socket import NftDumps, NftNetlink
from collectors.registry import Runner, ToolNotFound

VECTORS = Path(__file__).parent / "vectors" / "firewall"
SRC = VECTORS / "src"
RECORDED = VECTORS / "netlink"
FACTS = replace(EVALUATOR_FACTS, local_dns_cache=("169.254.20.10",))
CLUSTER_DNS = ("10.43.0.10", "169.254.20.10")


def firewalld_table() -> str:
    """firewalld's own table (``inet firewalld``) from the lab's recorded ruleset, as the
    JSON ``nft -j -f`` loads."""
    document = json.loads((VECTORS / "lab_firewalld_nft.nft.json").read_text())
    items = []
    for item in document["nftables"]:
        ((kind, body),) = item.items()
        owner = body.get("table", body.get("name"))
        if kind != "metainfo" and body.get("family") == "inet" and owner == "firewalld":
            items.append({kind: {k: v for k, v in body.items() if k != "handle"}})
    return json.dumps({"nftables": items})


#: name -> (nft -f scripts or, for ".json", nft -j -f documents), loaded in order.
RULE_SETS: dict[str, tuple[str, ...]] = {
    "kube_proxy_20": (kube_proxy_nft_script(20),),
    "kube_proxy_20_no_dns_endpoints": (kube_proxy_nft_script(20, dns_endpoints=()),),
    "lab_kube_proxy": ((SRC / "lab_kube_proxy.nft").read_text(),),
    "lab_kube_proxy_no_endpoints": (
        (SRC / "lab_kube_proxy.nft").read_text(),
        (SRC / "lab_kube_proxy_no_endpoints.nft").read_text(),
    ),
    "fault_native": ((SRC / "fault_native.nft").read_text(),),
    "native_clean": ((SRC / "native_clean.nft").read_text(),),
    "lab_debian_workstation": ((SRC / "lab_debian_workstation.nft").read_text(),),
    "lab_alpine": ((SRC / "lab_alpine.nft").read_text(),),
    "netlink_shapes": ((SRC / "netlink_shapes.nft").read_text(),),
    "firewalld_nft": ("json:" + firewalld_table(),),
}
#: Tables the reader gives up on, and why.
GIVES_UP = {"lab_alpine": ("inet", "filter", "ip6 header field at 6 (2 bytes)")}


def load(ns: Netns, scripts: Sequence[str]) -> None:
    for script in scripts:
        if script.startswith("json:"):
            ns.run(["nft", "-j", "-f", "/dev/stdin"], stdin=script[len("json:") :])
        else:
            ns.run(["nft", "-f", "/dev/stdin"], stdin=script)


# --------------------------------------------------------------------------- comparisons


def listed_tables(listing: str) -> dict[tuple[str, str], list[Any]]:
    tables: dict[tuple[str, str], list[Any]] = {}
    for item in json.loads(listing)["nftables"]:
        chain = item.get("chain")
        if chain:
            tables.setdefault((chain["family"], chain["table"]), []).append(chain)
    return tables


def nft_view(document: str) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """The rules of each chain and the elements of each named set in ``nft -j`` output."""
    rules: dict[str, list[Any]] = {}
    sets: dict[str, list[Any]] = {}
    for item in json.loads(document)["nftables"]:
        if "chain" in item:
            rules.setdefault(item["chain"]["name"], [])
        if "rule" in item:
            rules.setdefault(item["rule"]["chain"], []).append(item["rule"])
        for kind in ("set", "map"):
            if kind in item:
                sets[item[kind]["name"]] = item[kind].get("elem", [])
    return rules, sets


def netlink_view(
    table: Table, family: str, names: Sequence[str], set_names: Sequence[str]
) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    rules: dict[str, list[Any]] = {}
    for name in names:
        rules[name] = []
        for rule in table.chains[name].rules:
            assert isinstance(rule, NftRule)
            body: dict[str, Any] = {
                "family": family,
                "table": table.name,
                "chain": name,
                "handle": rule.handle,
                "expr": list(rule.expr),
            }
            if rule.comment is not None:
                body["comment"] = rule.comment
            rules[name].append(body)
    return rules, {name: table.sets[name] for name in set_names}


def assert_same_as_nft(ns: Netns, dumps: NftDumps, expected_failure: Any = None) -> int:
    """Each table read over netlink equals nft's JSON for it; the tables compared."""
    compared = 0
    for (family, name), chains in listed_tables(ns.runner(["nft", "-j", "list", "chains"])).items():
        rules, sets = nft_view(ns.runner(["nft", "-j", "list", "table", family, name]))
        table = netlink_table(family, name, chains, dumps)
        if expected_failure is not None and (family, name) == expected_failure[:2]:
            with pytest.raises(NetlinkFallback, match=re.escape(expected_failure[2])):
                netlink_view(table, family, list(rules), list(sets))
            continue
        assert netlink_view(table, family, list(rules), list(sets)) == (rules, sets)
        compared += 1
    return compared


def verdict_summary(verdicts: Sequence[FlowVerdict]) -> list[tuple[Any, ...]]:
    return [(v.flow.name, str(v.flow.family), v.verdict, v.stopped_by, v.path, v.undecided)
            for v in verdicts]  # fmt: skip


def finding_summary(findings: Sequence[Finding]) -> list[tuple[str, str, str]]:
    return sorted((f.reason, f.message, json.dumps(f.details, sort_keys=True)) for f in findings)


def collector(
    ns: Netns, netlink: bool, opened: list[NftNetlink] | None = None
) -> tuple[FirewallCollector, list[Finding]]:
    def opener() -> NftDumps:
        found = NftNetlink(ns.name)
        if opened is not None:
            opened.append(found)
        return found

    run = FirewallCollector(
        "node-1",
        lambda: CLUSTER_DNS,
        CollectorRegistry(),
        runner=ns.runner,
        facts=lambda: FACTS,
        nft_netlink=opener if netlink else None,
        netlink_min_chains=0,
    )
    return run, run.collect()


# --------------------------------------------------------------------------- real kernel


@pytest.fixture
def netns() -> Iterator[Netns]:
    with Netns() as ns:
        yield ns


@pytest.mark.root
@pytest.mark.parametrize("name", sorted(RULE_SETS))
def test_netlink_read_equals_nft(netns: Netns, name: str) -> None:
    load(netns, RULE_SETS[name])
    dumps = NftNetlink(netns.name)
    try:
        compared = assert_same_as_nft(netns, dumps, GIVES_UP.get(name))
        assert compared >= (0 if name in GIVES_UP else 1)
    finally:
        dumps.close()
    by_nft, nft_findings = collector(netns, netlink=False)
    by_netlink, netlink_findings = collector(netns, netlink=True)
    assert verdict_summary(by_netlink.last_verdicts) == verdict_summary(by_nft.last_verdicts)
    assert finding_summary(netlink_findings) == finding_summary(nft_findings)
    sources = {r.source: r for r in by_netlink.sources.results()}
    if name in GIVES_UP:
        family, table, why = GIVES_UP[name]
        assert sources["nft-netlink"].status == "skipped"
        assert f"table {family} {table}" in (sources["nft-netlink"].detail or "")
        assert why in (sources["nft-netlink"].detail or "")
    else:
        assert sources["nft-netlink"].status == "ok"


@pytest.mark.root
@pytest.mark.parametrize("dns_endpoints", [("10.42.0.5", "10.42.7.9"), ()])
def test_large_kube_proxy_reads_only_the_flows_chains(
    netns: Netns, dns_endpoints: tuple[str, ...]
) -> None:
    """2,000 Services (8,000 chains): the same verdicts as nft's whole read, a few dozen
    chains and sets read; without kube-dns endpoints the reject stays kube-proxy's own
    (DNSNoEndpointsReject), with the counter the kernel kept (a counter added to
    kube-proxy's reject, and one at the top of filter-output)."""
    counted = (
        "flush chain ip kube-proxy reject-chain\n"
        "add rule ip kube-proxy reject-chain counter reject\n"
        "insert rule ip kube-proxy filter-output counter\n"
    )
    load(netns, (kube_proxy_nft_script(2000, dns_endpoints=dns_endpoints), counted))
    # A packet to the DNS Service from the node: counted by the rules on its way.
    netns.send("10.43.0.10")
    by_nft, nft_findings = collector(netns, netlink=False)
    opened: list[NftNetlink] = []
    by_netlink, netlink_findings = collector(netns, netlink=True, opened=opened)
    assert verdict_summary(by_netlink.last_verdicts) == verdict_summary(by_nft.last_verdicts)
    assert finding_summary(netlink_findings) == finding_summary(nft_findings)
    assert 0 < len(by_netlink.netlink_reads) < 60
    assert sum(d.requests for d in opened) < 80
    if not dns_endpoints:
        reasons = {f.reason for f in netlink_findings}
        assert "DNSNoEndpointsReject" in reasons
        stops = [v.stopped_by for v in by_netlink.last_verdicts if v.stopped_by is not None]
        rejects = [s for s in stops if s.no_endpoints]
        assert rejects and all(s.chain == "reject-chain" for s in rejects)
        assert any(s.packets > 0 for s in rejects)  # the packet sent above
    top = by_netlink.netlink.tables[("ip", "kube-proxy")].chains["filter-output"].rules[0]
    assert top.packets > 0 and top.expr[0]["counter"]["packets"] == top.packets


@pytest.mark.root
def test_next_to_iptables_nft_tables(netns: Netns) -> None:
    """kube-proxy's nftables table beside iptables-nft tables (the RKE2 base and kube-proxy's
    iptables rules): the iptables-nft ones are read piece by piece, the nft one over
    netlink; the same verdicts as nft's read."""
    netns.run(["iptables-restore"], stdin=kube_proxy_rules(30))
    load(netns, (kube_proxy_nft_script(30, dns_endpoints=()),))
    by_nft, nft_findings = collector(netns, netlink=False)
    by_netlink, netlink_findings = collector(netns, netlink=True)
    assert verdict_summary(by_netlink.last_verdicts) == verdict_summary(by_nft.last_verdicts)
    assert finding_summary(netlink_findings) == finding_summary(nft_findings)
    assert {r.source for r in by_netlink.sources.results()} >= {"iptables-nft", "nft-netlink"}
    assert any(r.startswith("ip kube-proxy chain") for r in by_netlink.netlink_reads)


# --------------------------------------------------------------------------- recorded


def recorded_cases() -> list[str]:
    answers = [p for p in RECORDED.glob("*.json") if ".nft." not in p.name]
    return sorted(p.name.removesuffix(".json") for p in answers)


@pytest.mark.parametrize("case", recorded_cases())
def test_recorded_netlink_answers_decode_to_nfts_json(case: str) -> None:
    """Each recorded chain and set decodes to what nft printed for it then."""
    saved = json.loads((RECORDED / f"{case}.nft.json").read_text())
    dumps = Recorded(RECORDED / f"{case}.json")
    gives_up = GIVES_UP.get(case)
    for key, document in saved["tables"].items():
        family, name = key.split(" ", 1)
        rules, sets = nft_view(json.dumps(document))
        table = netlink_table(family, name, saved["chains"][key], dumps)
        read_chains = [c for c in rules if f"rules {family} {name} {c}" in dumps.answers]
        read_sets = [s for s in sets if f"elements {family} {name} {s}" in dumps.answers]
        assert read_chains
        if gives_up is not None and (family, name) == gives_up[:2]:
            with pytest.raises(NetlinkFallback, match=re.escape(gives_up[2])):
                netlink_view(table, family, read_chains, read_sets)
            continue
        got = netlink_view(table, family, read_chains, read_sets)
        assert got == ({c: rules[c] for c in read_chains}, {s: sets[s] for s in read_sets})


def recorded_runner(case: str, asked: list[str]) -> Runner:
    """nft as it answered when ``case`` was recorded (the other tools are not installed)."""
    saved = json.loads((RECORDED / f"{case}.nft.json").read_text())
    listing = {"nftables": [{"chain": c} for cs in saved["chains"].values() for c in cs]}
    whole = {"nftables": [i for d in saved["tables"].values() for i in d["nftables"]]}

    def runner(argv: Sequence[str]) -> str:
        asked.append(" ".join(argv))
        if list(argv) == ["nft", "-j", "list", "chains"]:
            return json.dumps(listing)
        if list(argv[:4]) == ["nft", "-j", "list", "table"]:
            return json.dumps(saved["tables"][f"{argv[4]} {argv[5]}"])
        if list(argv) == ["nft", "-j", "list", "ruleset"]:
            return json.dumps(whole)
        raise ToolNotFound(f"{argv[0]} not found")

    return runner


def recorded_collector(
    case: str, asked: list[str], dumps: type[Recorded] | None = Recorded
) -> FirewallCollector:
    """The firewall collector on ``case``'s recorded nft output and netlink answers
    (``dumps`` None: nft alone)."""
    answers = RECORDED / f"{case}.json"
    return FirewallCollector(
        "node-1",
        lambda: CLUSTER_DNS,
        CollectorRegistry(),
        runner=recorded_runner(case, asked),
        facts=lambda: FACTS,
        nft_netlink=None if dumps is None else (lambda: dumps(answers)),
        netlink_min_chains=0,
    )


def test_a_recorded_kube_proxy_table_gives_nfts_verdicts_without_root() -> None:
    """The collector on the recorded kube-proxy answers: the same verdicts as parsing nft's
    JSON of the whole table."""
    runs = []
    for dumps in (None, Recorded):
        found = recorded_collector("kube_proxy_20_no_dns_endpoints", [], dumps)
        findings = found.collect()
        runs.append((verdict_summary(found.last_verdicts), finding_summary(findings)))
    assert runs[0] == runs[1]
    assert "DNSNoEndpointsReject" in {f[0] for f in runs[1][1]}


def test_a_table_the_reader_cannot_decode_is_read_with_nft() -> None:
    """Alpine's recorded input chain (two ip6 header matches merged by nft): the collector
    reads that table with ``nft -j list table`` and says why."""
    asked: list[str] = []
    found = recorded_collector("lab_alpine", asked)
    found.collect()
    assert "nft -j list table inet filter" in asked
    source = {r.source: r for r in found.sources.results()}["nft-netlink"]
    assert source.status == "skipped"
    assert "ip6 header field at 6 (2 bytes)" in (source.detail or "")
    assert {v.verdict for v in found.last_verdicts} <= {"pass", "drop", "may-drop"}


class Changing(Recorded):
    """Recorded answers of a ruleset that changes under every read (kube-proxy writing)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.generations = 0

    def generation(self) -> int:
        self.generations += 1
        return self.generations


class Refusing(Recorded):
    def generation(self) -> int:
        raise PermissionError(1, "Operation not permitted")


@pytest.mark.parametrize("dumps", [Changing, Refusing])
def test_rules_changing_or_netlink_refused_read_with_nft(dumps: type[Recorded]) -> None:
    """The generation moves during every netlink read: after two tries the tables are read
    with nft (a snapshot); netlink refused: nft at once. Either way the source says so."""
    case = "kube_proxy_20_no_dns_endpoints"
    asked: list[str] = []
    found = recorded_collector(case, asked, dumps)
    findings = found.collect()
    assert "nft -j list ruleset" in asked
    source = {r.source: r for r in found.sources.results()}["nft-netlink"]
    assert source.status == "skipped"
    why = "changed while being read" if dumps is Changing else "Operation not permitted"
    assert why in (source.detail or "")
    assert "DNSNoEndpointsReject" in {f.reason for f in findings}
    assert found.netlink_reads == []


class Garbled(Recorded):
    """Recorded answers whose rule messages are cut short, or filled with noise."""

    def rules(self, family: str, table: str, chain: str) -> list[bytes]:
        found = super().rules(family, table, chain)
        return [m[:20] + bytes(range(256))[: len(m) - 20] for m in found]


def test_a_message_that_cannot_be_decoded_is_read_with_nft() -> None:
    asked: list[str] = []
    found = recorded_collector("kube_proxy_20_no_dns_endpoints", asked, Garbled)
    findings = found.collect()
    assert "nft -j list table ip kube-proxy" in asked
    source = {r.source: r for r in found.sources.results()}["nft-netlink"]
    assert source.status == "skipped" and "table ip kube-proxy: chain" in (source.detail or "")
    assert "DNSNoEndpointsReject" in {f.reason for f in findings}


def test_a_listed_chain_is_known_without_reading_it() -> None:
    """The evaluator asks whether each target of a verdict map is a chain (10,000 of them
    with 10,000 Services) before it follows a few: a listed chain is not read for that; a
    name not listed is asked for (a chain made since), and remembered as absent."""
    case = "kube_proxy_20_no_dns_endpoints"
    saved = json.loads((RECORDED / f"{case}.nft.json").read_text())
    dumps = Recorded(RECORDED / f"{case}.json")
    table = netlink_table("ip", "kube-proxy", saved["chains"]["ip kube-proxy"], dumps)
    listed = [c["name"] for c in saved["chains"]["ip kube-proxy"]]
    assert all(name in table.chains for name in listed)
    assert dumps.asked == []
    assert "no-such-chain" not in table.chains and "no-such-chain" not in table.chains
    assert dumps.asked == ["chain ip kube-proxy no-such-chain"]
    assert len(table.base_chains()) == 6
