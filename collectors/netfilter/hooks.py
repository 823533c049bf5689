"""Where rules run: the base chains of every table on a hook, in priority order (iptables
tables at the kernel's fixed priorities, nft chains at their declared ones), and the cheap
destination index of long iptables chains. Pure."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from collectors.netfilter.model import Chain, Table
from collectors.netfilter.steps import Address

#: iptables tables' priorities on each hook (the kernel's NF_IP_PRI_*).
XTABLES_PRIORITY = {
    "raw": {"prerouting": -300, "output": -300},
    "mangle": dict.fromkeys(("prerouting", "input", "forward", "output", "postrouting"), -150),
    "nat": {"prerouting": -100, "output": -100, "input": 100, "postrouting": 100},
    "filter": {"input": 0, "forward": 0, "output": 0},
    "security": {"input": 50, "forward": 50, "output": 50},
}
CONNTRACK_PRIORITY = -200

_HOST_DST = re.compile(r"(?:^|\s)(!\s+)?(?:-d|--destination|--dst)\s+([0-9A-Fa-f.:]+)(/\d+)?\s")


@dataclass(frozen=True, slots=True)
class BaseChain:
    """A base chain on one hook; ``nat``: it sees only a new connection's first packet."""

    priority: int
    table: Table
    chain: Chain
    hook: str
    nat: bool


def base_chain(table: Table, chain: Chain, hook: str) -> BaseChain | None:
    if table.backend == "nft":
        if chain.hook != hook:
            return None
        declared = chain.priority if chain.priority is not None else 0
        return BaseChain(declared, table, chain, hook, chain.type == "nat")
    if chain.name.lower() != hook:
        return None
    priority = XTABLES_PRIORITY.get(table.name, {}).get(hook)
    if priority is None:
        return None
    return BaseChain(priority, table, chain, hook, table.name == "nat")


def label(table: Table) -> str:
    return f"{table.backend} {table.family} {table.name}"


def host_destination(text: str) -> Address | None:
    """The single destination host a rule requires (``-d 10.43.0.10/32``), or None."""
    quote = text.find('"')
    match = _HOST_DST.search(text if quote < 0 else text[:quote])
    if match is None or match[1]:
        return None
    suffix = match[3]
    try:
        address = ipaddress.ip_address(match[2])
    except ValueError:
        return None
    full = "/32" if address.version == 4 else "/128"
    return address if suffix in (None, full) else None
