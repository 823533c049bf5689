"""Record the firewall test vectors: load each scenario of tests/test_firewall_netns.py into a
throwaway network namespace, send a few DNS packets inside it (so counters are not all
zero), and save what the real tools print:

    sudo .venv/bin/python tests/vectors/firewall/record.py

writes ``<scenario>.iptables-save`` (``iptables-save -c``), ``.ip6tables-save``,
``.iptables-legacy-save`` (when the legacy backend has rules) and ``.nft.json``
(``nft -j list ruleset``) next to this file. Recorded with Debian 12's iptables 1.8.9 and
nftables 1.0.6.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from test_firewall_netns import SCENARIOS, Netns  # noqa: E402

OUTPUTS = {
    "iptables-save": ["iptables-save", "-c"],
    "ip6tables-save": ["ip6tables-save", "-c"],
    "iptables-legacy-save": ["iptables-legacy-save", "-c"],
    "nft.json": ["nft", "-j", "list", "ruleset"],
}


def record(name: str) -> None:
    with Netns() as ns:
        cluster_dns = ns.load_scenario(name)
        for ip in cluster_dns:
            ns.send(ip, count=3)
        ns.send("10.0.0.1", count=2, proto="tcp")
        for suffix, argv in OUTPUTS.items():
            text = ns.run(argv)
            if suffix != "nft.json" and "-A " not in text:
                continue
            (HERE / f"{name}.{suffix}").write_text(text if text.endswith("\n") else text + "\n")


def main() -> None:
    for name in sys.argv[1:] or sorted(SCENARIOS):
        record(name)
        print("recorded", name)


if __name__ == "__main__":
    main()
