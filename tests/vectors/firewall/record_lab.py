"""Record the netns lab's vectors: build the lab (tests/netlab.py), load each scenario of
tests/netlab_scenarios.py into the node's namespace with the real tools, send the DNS queries
of every flow, and save what the kernel did and what the real tools print:

    sudo .venv/bin/python tests/vectors/firewall/record_lab.py [SCENARIO ...]

writes ``<scenario>.observed.json`` (per flow: the kernel's verdict, the evidence, the
drop/reject counters that rose) and ``<scenario>.iptables-save`` (``iptables-save -c``),
``.ip6tables-save``, ``.iptables-legacy-save``, ``.ip6tables-legacy-save``, ``.nft.json``
(``nft -j list ruleset``), taken after the packets, next to this file. Recorded with Debian
12's iptables 1.8.9, nftables 1.0.6, ufw 0.36.2, firewalld 1.3.3.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from netlab import lab, observations_json  # noqa: E402
from netlab_scenarios import SCENARIOS, load  # noqa: E402


def main() -> None:
    names = sys.argv[1:] or list(SCENARIOS)
    with tempfile.TemporaryDirectory(prefix="nodediag-lab-") as work, lab(Path(work)) as made:
        for name in names:
            made.reset(SCENARIOS[name].features)
            load(SCENARIOS[name], made.node, Path(work))
            observed = observations_json(made.observe())
            for suffix, text in made.dumps().items():
                (HERE / f"{name}.{suffix}").write_text(text)
            (HERE / f"{name}.observed.json").write_text(observed)
            print("recorded", name)


if __name__ == "__main__":
    main()
