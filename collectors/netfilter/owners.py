"""Who owns the rule or chain policy that stops a DNS flow, and how to let the flow through in
that owner's own terms. Decided from table names, chain names (the stopping chain and the
chains jumped through to reach it) and comments. Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from collectors.netfilter.model import Chain, Rule, Table

NFT_FAMILY_KEYWORD = {"ipv4": "ip", "ipv6": "ip6"}

_CHAIN_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ufw", ("ufw-", "ufw6-")),
    ("docker", ("DOCKER",)),
    ("kube-proxy", ("KUBE-",)),
    ("flannel", ("FLANNEL-",)),
    ("calico", ("cali-", "cali:")),
    ("cilium", ("CILIUM_", "cilium-")),
    ("firewalld", ("IN_", "OUT_", "FWDI_", "FWDO_", "FWD_", "PRE_", "POST_", "filter_IN_")),
    ("firewalld", ("filter_FWD", "filter_OUT_", "nat_PRE_", "nat_POST_", "mangle_PRE_")),
    ("firewalld", ("raw_PRE_",)),
)
_FIREWALLD_CHAINS = frozenset(
    {
        "INPUT_direct",
        "FORWARD_direct",
        "OUTPUT_direct",
        "PREROUTING_direct",
        "POSTROUTING_direct",
        "INPUT_ZONES",
        "FORWARD_IN_ZONES",
        "FORWARD_OUT_ZONES",
        "OUTPUT_POLICIES",
    }
)
_TABLE_OWNERS = {"firewalld": "firewalld", "kube-proxy": "kube-proxy", "cilium": "cilium"}


_FIREWALLD_ZONE = re.compile(
    r"^(?:filter_|nat_|mangle_|raw_)?(?:IN|FWD|FWDI|FWDO|FWD_IN|FWD_OUT|OUT|PRE|POST)_"
    r"(?!policy_|ZONES|POLICIES)(.+?)(?:_pre|_log|_deny|_allow|_post)?$"
)


@dataclass(frozen=True, slots=True)
class Hook:
    """Where the stop happened: the hook, the flow's interfaces and port, and the chains the
    packet went through on the way (for a firewalld zone), for the fix."""

    name: str
    iif: str | None
    oif: str | None
    l4: str
    dport: int | None
    visited: tuple[str, ...] = ()


def policy_owner(table: Table, chain: Chain) -> str | None:
    """Who set a base chain's policy: the tool whose chains the base chain jumps to (ufw sets
    INPUT/FORWARD/OUTPUT's policies; Docker sets FORWARD's to DROP)."""
    owner = owner_of(table, [chain.name], None)
    if owner is not None:
        return owner
    targets = [rule.quick_target[0] or "" for rule in chain.rules]
    found = {_chain_owner(t) for t in targets} - {None}
    for preferred in ("ufw", "firewalld", "docker"):
        if preferred in found:
            return preferred
    return None


def firewalld_zone(chains: Sequence[str]) -> str | None:
    """The firewalld zone of the deepest zone chain walked (``filter_IN_public_allow`` …)."""
    for name in reversed(chains):
        match = _FIREWALLD_ZONE.match(name)
        if match:
            return match[1]
    return None


def owner_of(table: Table, chains: Sequence[str], comment: str | None) -> str | None:
    """The tool that made the rule: ``chains`` from the base chain to the stopping one (the
    deepest decides). None: hand-written (or unknown)."""
    if table.backend == "nft":
        for name, table_owner in _TABLE_OWNERS.items():
            if table.name == name or table.name.startswith(name + "-"):
                return table_owner
        if table.name.startswith("cali"):
            return "calico"
    for chain in reversed(chains):
        owner = _chain_owner(chain)
        if owner is not None:
            return owner
    if comment and ("kube-proxy" in comment or "has no endpoints" in comment):
        return "kube-proxy"
    return None


def _chain_owner(name: str) -> str | None:
    if name in _FIREWALLD_CHAINS or name.endswith("_direct"):
        return "firewalld"
    for owner, prefixes in _CHAIN_PREFIXES:
        if name.startswith(prefixes):
            return owner
    return None


def fix_accepts(owner: str | None, chain: str) -> bool:
    """Whether the owner's fix for a rule's stop accepts the flow (ufw's, firewalld's and
    Docker's: an allow, which ends the base chain) rather than removing the rule (the
    packet then goes on with the next rule)."""
    if owner == "ufw":
        return not chain.startswith(("ufw-user-", "ufw6-user-"))
    return owner in ("firewalld", "docker")


def fix_for(
    owner: str | None,
    table: Table,
    chain: Chain,
    rule: Rule | None,
    where: Hook,
) -> str:
    """The fix in the owner's terms (a command or a config line, with why when needed)."""
    if owner == "ufw":
        return _ufw_fix(chain, rule, where)
    if owner == "firewalld":
        return _firewalld_fix(where)
    if owner == "docker" and rule is None:
        tool = iptables_tool(table)
        return (
            f"Docker sets {chain.name}'s policy to DROP: `{tool} -I DOCKER-USER "
            f"{_match_args(where)} -j ACCEPT` (DOCKER-USER is kept across Docker restarts), "
            f"or `{tool} -P {chain.name} ACCEPT`"
        )
    if owner == "docker":
        return (
            f"Docker's {chain.name} chain stops it: allow the flow in DOCKER-USER (e.g. "
            f"`iptables -I DOCKER-USER {_match_args(where)} -j ACCEPT`), or run Docker with "
            '`"iptables": false` on a Kubernetes node'
        )
    if owner == "kube-proxy":
        return (
            "kube-proxy's own rule: check the DNS Service and its endpoints "
            "(`kubectl -n kube-system get svc,endpointslices -l k8s-app=kube-dns`)"
        )
    if owner in ("flannel", "calico", "cilium"):
        return (
            f"{owner}'s own rule: check {owner}'s configuration (network policy, "
            "pod CIDR) rather than editing the rule"
        )
    return _delete_or_policy(table, chain, rule)


def _iface(name: str | None, unknown: str) -> str:
    """An interface for a command: ``unknown`` when the flow does not know it (``+``)."""
    return unknown if not name or name == "+" else name


def _match_args(where: Hook) -> str:
    parts = []
    if where.iif and where.iif != "+":
        parts.append(f"-i {where.iif}")
    if where.oif:
        parts.append(f"-o {where.oif}")
    if where.l4 in ("udp", "tcp"):
        parts.append(f"-p {where.l4}")
        if where.dport is not None:
            parts.append(f"--dport {where.dport}")
    return " ".join(parts)


def _ufw_fix(chain: Chain, rule: Rule | None, where: Hook) -> str:
    if rule is None and where.name == "forward":
        return (
            'set DEFAULT_FORWARD_POLICY="ACCEPT" in /etc/default/ufw and run `ufw reload`, or '
            f"allow the pod traffic: `ufw route allow in on {_iface(where.iif, '<pod interface>')}`"
        )
    if rule is None and where.name == "input":
        return f"`ufw allow in on {_iface(where.iif, '<interface>')}{_ufw_port(where)}`"
    if rule is None and where.name == "output":
        return f"`ufw allow out {_ufw_proto_port(where)}`".replace("  ", " ")
    if chain.name.startswith(("ufw-user-", "ufw6-user-")):
        return (
            "remove the ufw rule that denies it: `ufw status numbered`, then `ufw delete <n>` "
            "(iptables changes are undone by `ufw reload`)"
        )
    if where.name == "forward":
        return f"`ufw route allow in on {_iface(where.iif, '<pod interface>')}`"
    if where.name == "output":
        return f"`ufw allow out {_ufw_proto_port(where)}`"
    return f"`ufw allow in on {_iface(where.iif, '<interface>')}{_ufw_port(where)}`"


def _ufw_port(where: Hook) -> str:
    if where.l4 in ("udp", "tcp") and where.dport is not None:
        return f" to any port {where.dport} proto {where.l4}"
    return ""


def _ufw_proto_port(where: Hook) -> str:
    if where.l4 in ("udp", "tcp") and where.dport is not None:
        return f"{where.dport}/{where.l4}"
    return "on <interface>"


def _firewalld_fix(where: Hook) -> str:
    zone = firewalld_zone(where.visited) or f"<zone of {_iface(where.iif, 'the interface')}>"
    if where.name == "forward":
        return (
            "put the pod interface in a zone that accepts and forwards it: `firewall-cmd "
            f"--permanent --zone=trusted --add-interface={_iface(where.iif, '<pod interface>')}` "
            "(or a policy allowing the flow), then `firewall-cmd --reload`"
        )
    if where.name == "output":
        return (
            "firewalld blocks it on output (a policy from HOST or a direct rule): allow "
            f"{where.dport}/{where.l4} in that policy, then `firewall-cmd --reload`"
        )
    if where.l4 in ("udp", "tcp") and where.dport is not None:
        return (
            f"`firewall-cmd --permanent --zone={zone} --add-port={where.dport}/{where.l4}`, "
            "then `firewall-cmd --reload`"
        )
    # By number: firewalld's "ipip" is protocol 94, IP-in-IP's name differs by distribution.
    protocol = where.l4
    return (
        f"`firewall-cmd --permanent --zone={zone} --add-protocol={protocol}`, then "
        "`firewall-cmd --reload`"
    )


def _delete_or_policy(table: Table, chain: Chain, rule: Rule | None) -> str:
    if table.backend == "nft":
        keyword = NFT_FAMILY_KEYWORD.get(table.family, table.family)
        if rule is None:
            return (
                f"the chain's policy drops it: `nft 'chain {keyword} {table.name} {chain.name} "
                "{ policy accept; }'` or add an accept rule before the end of the chain"
            )
        handle = rule.handle if rule.handle is not None else "<handle>"
        return f"`nft delete rule {keyword} {table.name} {chain.name} handle {handle}`"
    tool = iptables_tool(table)
    if rule is None:
        return f"`{tool} -t {table.name} -P {chain.name} ACCEPT` (or accept the flow before it)"
    return f"`{tool} -t {table.name} -D {chain.name} {rule.position}`"


def iptables_tool(table: Table) -> str:
    """The command that edits ``table``: ip6tables for IPv6, -legacy/-nft for its backend."""
    tool = "ip6tables" if table.family == "ipv6" else "iptables"
    if table.backend == "iptables-legacy":
        return tool + "-legacy"
    if table.backend == "iptables-nft":
        return tool + "-nft"
    return tool
