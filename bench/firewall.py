"""Benchmark: the firewall collector on a kube-proxy-shaped rule set, next to the time the
tools themselves take to print it.

    sudo .venv/bin/python bench/firewall.py [--services N]

Generates a kube-proxy (iptables mode) rule set with N ClusterIP Services of 3 endpoints each
(11 rules per Service, nearly all in the nat table) on top of the RKE2 node's rules, loads
it into a throwaway network namespace per backend (iptables-nft, iptables-legacy), and times
``iptables-save -c`` alone, ``nft -j list ruleset`` alone, parsing + analysis alone on the
saved text, and the collector's full run (every tool it runs, parsing, analysis, metrics).

kube-proxy's nftables mode (``--backend nftables`` alone): the same Services as ``table ip
kube-proxy`` (an ``nft -f`` script), the collector's full run before (that table read whole
with nft) and after (read over netlink, only the chains and sets the analyses reach).

The DNS flow evaluator: every flow of ``dns_flows`` on the same rule set in kube-proxy's
iptables mode (the saved text, nat parsed lazily) and in its nftables mode (a generated
``nft -j list ruleset`` of ``table ip kube-proxy`` with the same Services), as parse time
and evaluation time; ``--evaluator-only`` skips the network namespaces (no root needed).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from kube_proxy_nft import kube_proxy_nft_script, service_specs  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from test_firewall_netns import Netns, kube_proxy_rules  # noqa: E402
from test_netfilter_evaluate import FACTS as EVALUATOR_FACTS  # noqa: E402

from collectors.firewall_collector import FirewallCollector  # noqa: E402
from collectors.netfilter.dns_rules import dns_rule_hits  # noqa: E402
from collectors.netfilter.evaluate import evaluate  # noqa: E402
from collectors.netfilter.flows import dns_flows  # noqa: E402
from collectors.netfilter.iptables import parse_iptables_save  # noqa: E402
from collectors.netfilter.model import DROP_TABLES  # noqa: E402
from collectors.netfilter.nft import parse_nft_json  # noqa: E402
from collectors.netfilter.nft_socket import NftNetlink  # noqa: E402
from collectors.registry import ToolNotFound  # noqa: E402

CLUSTER_DNS = ("10.43.0.10", "169.254.20.10")
FACTS = replace(EVALUATOR_FACTS, local_dns_cache=("169.254.20.10",))


def timed(action: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench_backend(
    backend: str, rules: str, repeat: int, tools_alone: bool
) -> list[tuple[str, str, str]]:
    restore = "iptables-restore" if backend == "iptables-nft" else "iptables-legacy-restore"
    save = ["iptables-save", "-c"] if backend == "iptables-nft" else ["iptables-legacy-save", "-c"]
    rows: list[tuple[str, str, str]] = []
    with Netns() as ns:
        started = time.perf_counter()
        ns.run([restore], stdin=rules)
        rows.append((backend, f"{restore} (load, once)", f"{time.perf_counter() - started:.2f}"))
        text = ns.run(save)
        count = text.count("\n-A ") + text.count("] -A ")
        rows.append((backend, f"rules in {save[0]}", f"{count}"))
        if tools_alone:
            rows.extend(tool_rows(backend, ns, save, text, repeat))
        rows.extend(collector_rows(backend, ns, repeat))
    return rows


def nft_mode_rows(services: int, repeat: int) -> list[tuple[str, str, str]]:
    """kube-proxy's nftables mode loaded by the real nft: the collector's full run before
    (``nft_netlink=None``: the table read whole with ``nft -j list ruleset``) and after (its
    chains and sets read over netlink as the analyses reach them), in the same namespace; the
    verdicts of both must be the same."""
    mode = "nftables mode"
    with Netns() as ns:
        started = time.perf_counter()
        ns.run(["nft", "-f", "/dev/stdin"], stdin=kube_proxy_nft_script(services))
        rows = [(mode, "nft -f (load, once)", f"{time.perf_counter() - started:.2f}")]
        listing = ns.run(["nft", "-j", "list", "chains"])
        rows.append((mode, "chains in the table", str(listing.count('"chain"'))))
        verdicts: dict[str, list[tuple[str, str]]] = {}
        for when in ("before", "after"):
            found, verdicts[when] = nft_mode_run(ns, when, repeat)
            rows.extend((mode, what, value) for what, value in found)
        same = verdicts["before"] == verdicts["after"]
        rows.append((mode, "verdicts after == before", f"{same} ({len(verdicts['after'])} flows)"))
        return rows


def nft_mode_run(
    ns: Netns, when: str, repeat: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """One collector's rows (measure, value) and its verdicts."""
    calls: list[str] = []
    opened: list[NftNetlink] = []
    netlink = opening(ns, opened)
    collector = FirewallCollector(
        "bench",
        lambda: CLUSTER_DNS,
        CollectorRegistry(),
        runner=counting(ns.runner, calls),
        facts=lambda: FACTS,
        nft_netlink=netlink if when == "after" else None,
    )
    cpu, wall = cpu_and_wall(collector.collect, repeat)
    rows = [
        (f"collector full run {when}: CPU s (agent + children)", f"{cpu:.2f}"),
        (f"collector full run {when}: wall s", f"{wall:.2f}"),
        (f"collector {when}: % of one core per 60 s", f"{cpu / 60 * 100:.2f}"),
        (f"collector {when}: commands run", str(len(calls) // repeat)),
        (f"collector {when}: netlink requests", str(sum(d.requests for d in opened) // repeat)),
    ]
    if when == "after":
        chains = sum(" chain " in r for r in collector.netlink_reads)
        sets = len(collector.netlink_reads) - chains
        rows.append(("collector after: chains / sets read (per run)", f"{chains} / {sets}"))
    return rows, [(v.flow.name, v.verdict) for v in collector.last_verdicts]


def tool_rows(
    backend: str, ns: Netns, save: list[str], text: str, repeat: int
) -> list[tuple[str, str, str]]:
    """The tools alone (wall s) and our parse + port-53 analysis of the saved text."""
    rows = [(backend, f"{' '.join(save)} alone", f"{timed(lambda: ns.run(save), repeat):.2f}")]
    nft = ["nft", "-j", "list", "ruleset"]
    rows.append((backend, "nft -j list ruleset alone", f"{timed(lambda: ns.run(nft), repeat):.2f}"))

    def analyse() -> None:
        ruleset = parse_iptables_save(text, tables=DROP_TABLES)
        dns_rule_hits([ruleset], CLUSTER_DNS)

    rows.append((backend, "parse + analyse (saved text)", f"{timed(analyse, repeat):.3f}"))
    return rows


def iptables_nft_hidden(argv: Sequence[str]) -> bool:
    """The earlier read: without iptables-nft, ``iptables-save -c`` whole."""
    return argv[0] in ("iptables-nft", "ip6tables-nft")


def collector_rows(
    backend: str,
    ns: Netns,
    repeat: int,
    hide: Callable[[Sequence[str]], bool] = iptables_nft_hidden,
) -> list[tuple[str, str, str]]:
    """The collector's full run (with the DNS flows), CPU of the agent and its children and
    wall time: before (the commands ``hide`` names fail: the earlier, whole read) and after
    (read piece by piece), in the same namespace; the verdicts of both must be the same."""

    def hidden(argv: Sequence[str]) -> str:
        if hide(argv):
            raise ToolNotFound(f"{argv[0]} hidden (the earlier read)")
        return ns.runner(argv)

    rows: list[tuple[str, str, str]] = []
    verdicts: dict[str, list[tuple[str, str]]] = {}
    for when, runner in (("before", hidden), ("after", ns.runner)):
        calls: list[str] = []
        opened: list[NftNetlink] = []
        collector = FirewallCollector(
            "bench",
            lambda: CLUSTER_DNS,
            CollectorRegistry(),
            runner=counting(runner, calls),
            facts=lambda: FACTS,
            nft_netlink=opening(ns, opened),  # the ruleset's generation in ns
        )
        cpu, wall = cpu_and_wall(collector.collect, repeat)
        verdicts[when] = [(v.flow.name, v.verdict) for v in collector.last_verdicts]
        commands = len(calls) // repeat
        requests = sum(d.requests for d in opened) // repeat
        rows.append((backend, f"collector full run {when}: CPU s (agent + children)", f"{cpu:.2f}"))
        rows.append((backend, f"collector full run {when}: wall s", f"{wall:.2f}"))
        rows.append((backend, f"collector {when}: % of one core per 60 s", f"{cpu / 60 * 100:.2f}"))
        rows.append((backend, f"collector {when}: commands run", str(commands)))
        rows.append((backend, f"collector {when}: netlink requests", str(requests)))
    same = verdicts["before"] == verdicts["after"]
    rows.append((backend, "verdicts after == before", f"{same} ({len(verdicts['after'])} flows)"))
    return rows


def opening(ns: Netns, opened: list[NftNetlink]) -> Callable[[], NftNetlink]:
    """Opens nf_tables over netlink in ``ns``, each connection kept in ``opened``."""

    def netlink() -> NftNetlink:
        opened.append(NftNetlink(ns.name))
        return opened[-1]

    return netlink


def counting(
    runner: Callable[[Sequence[str]], str], calls: list[str]
) -> Callable[[Sequence[str]], str]:
    def run(argv: Sequence[str]) -> str:
        calls.append(" ".join(argv))
        return runner(argv)

    return run


def cpu_and_wall(action: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median CPU seconds (this process and its children: the tools) and wall seconds."""
    cpus, walls = [], []
    for _ in range(repeat):
        before = _rusage()
        started = time.perf_counter()
        action()
        walls.append(time.perf_counter() - started)
        cpus.append(_rusage() - before)
    return statistics.median(cpus), statistics.median(walls)


def _rusage() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def cpu_timed(action: Callable[[], object], repeat: int) -> float:
    """Median CPU seconds of this process (our own time, whatever else the machine runs)."""
    samples = []
    for _ in range(repeat):
        started = time.process_time()
        action()
        samples.append(time.process_time() - started)
    return statistics.median(samples)


def evaluator_rows(iptables_text: str, services: int, repeat: int) -> list[tuple[str, str, str]]:
    """CPU seconds to parse the rules and to evaluate all DNS flows, kube-proxy iptables and
    nftables modes."""
    flows = dns_flows(FACTS)
    nft_text = kube_proxy_nft_json(services)

    def port_53_only() -> None:
        dns_rule_hits([parse_iptables_save(iptables_text, tables=DROP_TABLES)], CLUSTER_DNS)

    baseline = f"{cpu_timed(port_53_only, repeat):.3f}"
    rows = [("iptables mode", "baseline: parse + port-53 analysis (nat skipped), CPU s", baseline)]
    for mode, parse in (
        ("iptables mode", lambda: parse_iptables_save(iptables_text, lazy=("nat",))),
        ("nftables mode", lambda: parse_nft_json(nft_text)),
    ):
        rows.append(
            (mode, "parse, CPU s (nat lazily; nft: whole JSON)", f"{cpu_timed(parse, repeat):.3f}")
        )
        if mode == "nftables mode":
            decode = cpu_timed(lambda: json.loads(nft_text), repeat)
            rows.append((mode, "  of which json.loads, CPU s", f"{decode:.3f}"))
        # A fresh parse for each run: the lazily parsed chains are not reused across runs.
        samples = []
        for _ in range(repeat):
            rulesets = [parse()]
            started = time.process_time()
            verdicts = evaluate(rulesets, flows)
            samples.append(time.process_time() - started)
        rows.append(
            (mode, f"evaluate all {len(flows)} flows, CPU s", f"{statistics.median(samples):.3f}")
        )
        blocked = [v.flow.name for v in verdicts if v.verdict != "pass"]
        rows.append((mode, "flows not passing (expected: none)", str(len(blocked))))
        rows.extend(stacked_rows(mode, parse, flows, repeat))
    return rows


#: Stops stacked on every flow's way, on top of kube-proxy's rules: a drop of DNS and of the
#: overlay, then each hook's policy (the flows stopped are walked again past their stops).
STACKED_NFT = json.dumps(
    {
        "nftables": [
            {"table": {"family": "inet", "name": "stacked", "handle": 1}},
            *(
                {
                    "chain": {
                        "family": "inet",
                        "table": "stacked",
                        "name": hook,
                        "handle": n,
                        "type": "filter",
                        "hook": hook,
                        "prio": 10,
                        "policy": "drop",
                    }
                }
                for n, hook in enumerate(("input", "forward", "output"), 2)
            ),
            *(
                {
                    "rule": {
                        "family": "inet",
                        "table": "stacked",
                        "chain": hook,
                        "handle": 10 + n,
                        "expr": [
                            {
                                "match": {
                                    "op": "==",
                                    "left": {"payload": {"protocol": "udp", "field": "dport"}},
                                    "right": {"set": [53, 8472]},
                                }
                            },
                            {"drop": None},
                        ],
                    }
                }
                for n, hook in enumerate(("input", "forward", "output"))
            ),
        ]
    }
)


def stacked_rows(
    mode: str, parse: Callable[[], object], flows: Sequence[object], repeat: int
) -> list[tuple[str, str, str]]:
    """The same evaluation with stops stacked on the flows' ways (each stopped flow is
    walked again to name its further stops)."""
    samples = []
    for _ in range(repeat):
        rulesets = [parse(), parse_nft_json(STACKED_NFT)]
        started = time.process_time()
        verdicts = evaluate(rulesets, flows)  # type: ignore[arg-type]
        samples.append(time.process_time() - started)
    further = sum(len(v.also_stopped_by) for v in verdicts)
    stopped = sum(1 for v in verdicts if v.verdict != "pass")
    return [
        (mode, "evaluate all flows, stops stacked, CPU s", f"{statistics.median(samples):.3f}"),
        (mode, "  flows stopped / further stops named", f"{stopped} / {further}"),
    ]


def kube_proxy_nft_json(services: int, endpoints: int = 3) -> str:
    """``nft -j list ruleset`` of kube-proxy's nftables mode (Kubernetes 1.31+ layout) with
    ``services`` TCP Services of ``endpoints`` endpoints and the kube-dns Service."""
    table = {"family": "ip", "table": "kube-proxy"}
    items: list[dict[str, object]] = [{"table": {"family": "ip", "name": "kube-proxy"}}]
    rules: list[dict[str, object]] = []

    def chain(name: str, hook: str | None = None, prio: int = 0, kind: str = "filter") -> None:
        body: dict[str, object] = {**table, "name": name}
        if hook:
            body.update({"type": kind, "hook": hook, "prio": prio, "policy": "accept"})
        items.append({"chain": body})

    def rule(name: str, *expr: object) -> None:
        rules.append(
            {"rule": {**table, "chain": name, "handle": len(rules) + 1, "expr": list(expr)}}
        )

    def match(left: object, right: object, op: str = "==") -> dict[str, object]:
        return {"match": {"op": op, "left": left, "right": right}}

    daddr = {"payload": {"protocol": "ip", "field": "daddr"}}
    saddr = {"payload": {"protocol": "ip", "field": "saddr"}}
    key = {
        "concat": [
            daddr,
            {"meta": {"key": "l4proto"}},
            {"payload": {"protocol": "th", "field": "dport"}},
        ]
    }
    new = match({"ct": {"key": "state"}}, "new", "in")
    for name, hook, prio, kind in (
        ("nat-prerouting", "prerouting", -100, "nat"),
        ("nat-output", "output", -100, "nat"),
        ("nat-postrouting", "postrouting", 100, "nat"),
        ("filter-forward", "forward", 0, "filter"),
        ("filter-input", "input", 0, "filter"),
        ("filter-output", "output", 0, "filter"),
    ):
        chain(name, hook, prio, kind)
    for name in (
        "services",
        "service-endpoints-check",
        "cluster-ips-check",
        "reject-chain",
        "mark-for-masquerade",
        "masquerading",
    ):
        chain(name)
    rule("nat-prerouting", {"jump": {"target": "services"}})
    rule("nat-output", {"jump": {"target": "services"}})
    rule("nat-postrouting", {"jump": {"target": "masquerading"}})
    for base in ("filter-forward", "filter-output", "filter-input"):
        rule(base, new, {"jump": {"target": "service-endpoints-check"}})
    rule("filter-forward", new, {"jump": {"target": "cluster-ips-check"}})
    rule("filter-output", new, {"jump": {"target": "cluster-ips-check"}})
    rule("services", {"vmap": {"key": key, "data": "@service-ips"}})
    rule("service-endpoints-check", {"vmap": {"key": key, "data": "@no-endpoint-services"}})
    rule("cluster-ips-check", match(daddr, "@cluster-ips"), {"reject": None})
    rule(
        "cluster-ips-check",
        match(daddr, {"prefix": {"addr": "10.43.0.0", "len": 16}}),
        {"drop": None},
    )
    rule("reject-chain", {"reject": None})
    mark = {"meta": {"key": "mark"}}
    rule("mark-for-masquerade", {"mangle": {"key": mark, "value": {"|": [mark, 16384]}}})
    rule("masquerading", match({"&": [mark, 16384]}, 0), {"return": None})
    rule("masquerading", {"masquerade": None})
    service_ips: list[object] = []
    cluster_ips: list[object] = []
    for n, (ip, proto, port, name) in enumerate(service_specs(services, "/")):
        service = f"service-{n:08X}-{name}/{proto}/{port}"
        chain(service)
        service_ips.append([{"concat": [ip, proto, port]}, {"goto": {"target": service}}])
        cluster_ips.append(ip)
        rule(
            service,
            match(daddr, ip),
            match({"payload": {"protocol": proto, "field": "dport"}}, port),
            match(saddr, {"prefix": {"addr": "10.42.0.0", "len": 16}}, "!="),
            {"jump": {"target": "mark-for-masquerade"}},
        )
        picks = []
        for e in range(endpoints):
            pod = f"10.42.{(n * endpoints + e) // 250 % 256}.{(n * endpoints + e) % 250 + 2}"
            endpoint = f"endpoint-{n:08X}{e:02X}-{name}/{proto}/{port}__{pod}/{port}"
            chain(endpoint)
            rule(endpoint, match(saddr, pod), {"jump": {"target": "mark-for-masquerade"}})
            rule(
                endpoint,
                match({"meta": {"key": "l4proto"}}, proto),
                {"dnat": {"addr": pod, "port": port}},
            )
            picks.append([e, {"goto": {"target": endpoint}}])
        numgen = {"numgen": {"mode": "random", "mod": endpoints, "offset": 0}}
        rule(service, {"vmap": {"key": numgen, "data": {"set": picks}}})
    items.append({"map": {**table, "name": "service-ips", "elem": service_ips}})
    items.append({"map": {**table, "name": "no-endpoint-services", "elem": []}})
    items.append({"set": {**table, "name": "cluster-ips", "elem": sorted(set(cluster_ips))}})
    return json.dumps({"nftables": [*items, *rules]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--backend", action="append", choices=["iptables-nft", "iptables-legacy", "nftables"]
    )
    parser.add_argument("--evaluator-only", action="store_true", help="no network namespaces")
    parser.add_argument(
        "--tools-alone", action="store_true", help="also time iptables-save and nft alone"
    )
    args = parser.parse_args()
    rules = kube_proxy_rules(args.services)
    rows: list[tuple[str, str, str]] = []
    if not args.evaluator_only:
        for backend in args.backend or ["iptables-nft", "iptables-legacy", "nftables"]:
            if backend == "nftables":
                rows.extend(nft_mode_rows(args.services, args.repeat))
            else:
                rows.extend(bench_backend(backend, rules, args.repeat, args.tools_alone))
    rows.extend(evaluator_rows(rules, args.services, args.repeat))
    print(f"kube-proxy-shaped rule set, {args.services} Services (median of {args.repeat})")
    width = max(len(r[1]) for r in rows)
    print(f"{'backend':<16} {'measure':<{width}} {'seconds / count':>15}")
    for backend, what, value in rows:
        print(f"{backend:<16} {what:<{width}} {value:>15}")


if __name__ == "__main__":
    main()
