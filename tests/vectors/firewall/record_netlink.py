"""Record netlink answers for tests/test_nft_netlink.py: load a few of its rule sets into a
throwaway network namespace, run the firewall collector reading every native table over
netlink (the DNS flows decide which chains and sets it reads), and save

- ``netlink/<case>.json``: each request it made and the bytes of each answer (hex);
- ``netlink/<case>.nft.json``: the chains ``nft -j list chains`` showed for each table, and
  ``nft -j list table`` of each table, to compare with.

    sudo .venv/bin/python tests/vectors/firewall/record_netlink.py

Recorded with nftables 1.0.6 on Linux 6.18.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from nft_recorded import Recorder  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from test_firewall_netns import Netns  # noqa: E402
from test_nft_netlink import CLUSTER_DNS, FACTS, RULE_SETS, listed_tables, load  # noqa: E402

from collectors.firewall_collector import FirewallCollector  # noqa: E402
from collectors.netfilter.nft_socket import NftNetlink  # noqa: E402

CASES = ("kube_proxy_20_no_dns_endpoints", "lab_alpine", "netlink_shapes", "firewalld_nft")


def record(case: str) -> None:
    with Netns() as ns:
        load(ns, RULE_SETS[case])
        recorder = Recorder(NftNetlink(ns.name))
        collector = FirewallCollector(
            "node-1",
            lambda: CLUSTER_DNS,
            CollectorRegistry(),
            runner=ns.runner,
            facts=lambda: FACTS,
            nft_netlink=lambda: recorder,
            netlink_min_chains=0,
        )
        collector.collect()
        tables = listed_tables(ns.runner(["nft", "-j", "list", "chains"]))
        saved = {
            "chains": {f"{f} {n}": chains for (f, n), chains in tables.items()},
            "tables": {
                f"{f} {n}": json.loads(ns.runner(["nft", "-j", "list", "table", f, n]))
                for f, n in tables
            },
        }
    out = HERE / "netlink"
    out.mkdir(exist_ok=True)
    (out / f"{case}.json").write_text(json.dumps(recorder.answers, indent=1) + "\n")
    (out / f"{case}.nft.json").write_text(json.dumps(saved, indent=1) + "\n")
    print(case, len(recorder.answers), "answers")


if __name__ == "__main__":
    for name in sys.argv[1:] or CASES:
        record(name)
