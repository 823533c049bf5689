"""iptables-nft's tables read piece by piece. Pure.

``iptables-save`` of a kube-proxy-sized iptables-nft rule set takes a minute of CPU, and so
does ``iptables-save -t filter`` (it fetches every table's rules to print one); nearly all
the rules are kube-proxy's nat rules, of which the DNS flows need a few chains. So the
collector learns the tables and their chains from ``nft -j list chains`` (chain names
only: cheap), reads each non-nat table with ``iptables-nft -t TABLE -S -v`` and the nat
table one chain at a time, when the flow evaluator first follows a jump into it
(``iptables-nft -t nat -S CHAIN -v``). iptables-nft takes no xtables lock (only the legacy
tools do). ``-S -v`` prints rules in ``iptables-save`` syntax with the counters as
``-c PACKETS BYTES``; ``spec_to_save`` turns them into ``iptables-save -c`` lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from collectors.netfilter.iptables import LazyChains, gather_line
from collectors.netfilter.model import BASE_CHAINS, XTABLES_TABLES, Chain

# The counters ``-S -v`` puts before the target (or at the end of a rule without one).
_SPEC_COUNTERS = re.compile(r" -c (\d{1,20}) (\d{1,20})(?=$| -[jg] )")
NFT_FAMILIES = {"ipv4": "ip", "ipv6": "ip6"}


def spec_to_save(text: str) -> list[str]:
    """``iptables -S -v`` output as ``iptables-save -c`` lines (chain heads and rules)."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("-P "):
            parts = line.split()
            counted = len(parts) >= 6 and parts[3] == "-c"
            counters = f"[{parts[4]}:{parts[5]}]" if counted else "[0:0]"
            if len(parts) >= 3:
                lines.append(f":{parts[1]} {parts[2]} {counters}")
        elif line.startswith("-N "):
            lines.append(f":{line[3:].strip()} - [0:0]")
        elif line.startswith("-A "):
            found = list(_SPEC_COUNTERS.finditer(line))
            if found:
                last = found[-1]
                line = f"[{last[1]}:{last[2]}] {line[: last.start()]}{line[last.end() :]}"
            lines.append(line)
    return lines


def save_text(table: str, spec: str) -> str:
    """``iptables -t TABLE -S -v`` output as one table of ``iptables-save -c`` text."""
    return "\n".join([f"*{table}", *spec_to_save(spec), "COMMIT", ""])


def xtables_chains(listing: str | list[Any], family: str) -> dict[str, list[str]]:
    """The iptables-nft tables of ``family`` (ipv4/ipv6) in ``nft -j list chains`` output
    (its text, or its ``nftables`` items), each with its chain names: tables named like
    iptables' whose base chains are named after their hooks (``INPUT`` on input), as
    iptables-nft makes them. ValueError when the text is not such JSON."""
    items = json.loads(listing or "{}").get("nftables", []) if isinstance(listing, str) else listing
    nft_family = NFT_FAMILIES[family]
    chains: dict[str, list[str]] = {}
    foreign: set[str] = set()
    for item in items:
        chain: Any = item.get("chain") if isinstance(item, dict) else None
        if not isinstance(chain, dict) or chain.get("family") != nft_family:
            continue
        table = str(chain.get("table"))
        name = str(chain.get("name"))
        hook = chain.get("hook")
        if table not in XTABLES_TABLES or (hook and name != str(hook).upper()):
            foreign.add(table)
        chains.setdefault(table, []).append(name)
    return {table: names for table, names in chains.items() if table not in foreign}


class FetchedChains(LazyChains):
    """The chains of a table, each read when first asked for: ``fetch(name)`` returns the
    chain's ``iptables-save -c`` lines (head and rules), or None when it could not be read.
    A chain that could not be read is as if absent: a jump to it is a target the evaluator
    cannot follow, so the packet may be dropped there (never a silent pass)."""

    def __init__(self, names: Iterable[str], fetch: Callable[[str], Sequence[str] | None]):
        super().__init__({}, {name: f":{name} - [0:0]" for name in names})
        self._fetch = fetch
        self._fetched: set[str] = set()

    def __missing__(self, name: str) -> Chain:
        if name in self._heads and name not in self._fetched:
            self._fetched.add(name)
            lines = self._fetch(name)
            if lines is None:
                del self._heads[name]
                raise KeyError(name)
            for line in lines:
                gather_line(line, self._lines, self._heads)
        return super().__missing__(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def base_names(self) -> list[str]:
        return [name for name in BASE_CHAINS if name in self._heads]
