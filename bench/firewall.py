"""Benchmark: the firewall collector on a kube-proxy-shaped rule set, next to the time the
tools themselves take to print it.

    sudo .venv/bin/python bench/firewall.py [--services N]

Generates a kube-proxy (iptables mode) rule set with N ClusterIP Services of 3 endpoints each
(11 rules per Service, nearly all in the nat table) on top of the RKE2 node's rules, loads
it into a throwaway network namespace per backend (iptables-nft, iptables-legacy), and times
``iptables-save -c`` alone, ``nft -j list ruleset`` alone, parsing + analysis alone on the
saved text, and the collector's full run (every tool it runs, parsing, analysis, metrics).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry  # noqa: E402
from test_firewall_netns import Netns, kube_proxy_rules  # noqa: E402

from collectors.firewall_collector import FirewallCollector  # noqa: E402
from collectors.netfilter.dns_rules import dns_rule_hits  # noqa: E402
from collectors.netfilter.iptables import parse_iptables_save  # noqa: E402
from collectors.netfilter.model import DROP_TABLES  # noqa: E402

CLUSTER_DNS = ("10.43.0.10", "169.254.20.10")


def timed(action: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench_backend(backend: str, rules: str, repeat: int) -> list[tuple[str, str, str]]:
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
        rows.append(
            (backend, f"{' '.join(save)} alone", f"{timed(lambda: ns.run(save), repeat):.2f}")
        )
        nft = ["nft", "-j", "list", "ruleset"]
        rows.append(
            (backend, "nft -j list ruleset alone", f"{timed(lambda: ns.run(nft), repeat):.2f}")
        )

        def analyse() -> None:
            ruleset = parse_iptables_save(text, tables=DROP_TABLES)
            dns_rule_hits([ruleset], CLUSTER_DNS)

        rows.append((backend, "parse + analyse (saved text)", f"{timed(analyse, repeat):.3f}"))
        collector = FirewallCollector(
            "bench", lambda: CLUSTER_DNS, CollectorRegistry(), runner=ns.runner
        )
        rows.append(
            (backend, "collector full run (all tools)", f"{timed(collector.collect, repeat):.2f}")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", action="append", choices=["iptables-nft", "iptables-legacy"])
    args = parser.parse_args()
    rules = kube_proxy_rules(args.services)
    rows: list[tuple[str, str, str]] = []
    for backend in args.backend or ["iptables-nft", "iptables-legacy"]:
        rows.extend(bench_backend(backend, rules, args.repeat))
    print(f"kube-proxy-shaped rule set, {args.services} Services (median of {args.repeat})")
    width = max(len(r[1]) for r in rows)
    print(f"{'backend':<16} {'measure':<{width}} {'seconds / count':>15}")
    for backend, what, value in rows:
        print(f"{backend:<16} {what:<{width}} {value:>15}")


if __name__ == "__main__":
    main()
