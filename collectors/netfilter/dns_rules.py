"""Firewall rules that drop DNS by name: the rules that DROP/REJECT port-53 traffic
(``DNSDropRule``) and kube-proxy's no-endpoints rejects (``DNSNoEndpointsReject``), found in
the rule model (``collectors.netfilter.model``). Pure (the I/O is in
``collectors.firewall_collector``).

What counts as a DNS drop (``DnsRuleHit.kind == "drop"``):

- the rule's verdict is DROP or REJECT (nft ``drop``/``reject``, also through a verdict map on
  the destination port), in a chain reached from a base chain (INPUT, OUTPUT, FORWARD,
  PREROUTING, POSTROUTING; nft chains with a hook) through ``-j``/``-g``/``jump``/``goto``
  rules that themselves can pass DNS traffic (the jump path is recorded);
- it can match UDP or TCP (``-p`` absent/``all``/``udp``/``tcp``/``17``/``6``, ``! -p icmp``…);
- its destination port (``--dport``, ``-m multiport --dports/--ports``, nft ``udp/tcp/th
  dport``, ranges, lists, sets, negation) admits 53, or a jump on the way already restricted
  the traffic to port 53; or the rule has no port at all but names a destination (``-d``,
  ``ip daddr``) that covers a cluster DNS IP: dropping everything to the DNS Service drops DNS.
  A rule with neither port nor such a destination (``-p udp -j DROP``, a catch-all, a DROP
  policy) is a blanket rule, not a DNS rule, and is not reported.

kube-proxy's ``"… has no endpoints"`` REJECT is ``kind == "no_endpoints"``
(``DNSNoEndpointsReject``, info). NOTRACK/``CT --notrack``, ACCEPT, DNAT, MARK, RETURN and LOG
rules are never drops, whatever port they name. DROP/REJECT cannot exist in the nat table
(iptables refuses them), so the nat table is never tokenised: with kube-proxy it holds nearly
all of a node's rules.

iptables-nft tables are also visible to ``nft -j list ruleset`` (``table ip filter`` …). A nft
table is taken for iptables-nft's own when it holds ``xt`` expressions, or when it has an
xtables name (filter/nat/mangle/raw/security) in family ip/ip6 and every base chain carries
the xtables name of its hook (``INPUT`` for ``hook input`` …). Such a table is skipped when an
``iptables-save`` output of the nf_tables backend for the same family and table is among the
inputs (that form gives positions, comments and an exact ``iptables -D`` spec); without one it
is analysed from the nft JSON, so nothing is lost and nothing is counted twice.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from collectors.finding import Finding, Severity
from collectors.netfilter.iptables_steps import compile_iptables
from collectors.netfilter.model import (
    ALL_PROTOS,
    DNS_PORT,
    DNS_PROTOS,
    DROP_TABLES,
    Chain,
    IpNetwork,
    Match,
    PortRanges,
    Rule,
    Ruleset,
    Table,
    distinct_tables,
)
from collectors.netfilter.nft_steps import NftCompiler
from collectors.netfilter.owners import iptables_tool
from collectors.netfilter.steps import Effect, Verdict

Kind = Literal["drop", "no_endpoints"]

_VERDICTS = {"DROP", "REJECT"}
NO_ENDPOINTS = ("has no endpoints", "has no local endpoints")
NFT_FAMILY_KEYWORD = {"ipv4": "ip", "ipv6": "ip6"}
_MAX_PATH_VISITS = 20_000


@dataclass(frozen=True, slots=True)
class _Context:
    """What the jumps on the way to a chain already required of the traffic."""

    protocols: frozenset[str] = ALL_PROTOS
    port53: bool = False
    dst: tuple[tuple[tuple[IpNetwork, ...], bool], ...] = ()


@dataclass(frozen=True, slots=True)
class DnsRuleHit:
    """A rule that drops/rejects DNS, where it is, how traffic gets there and how to remove it."""

    family: str
    backend: str
    table: str
    chain: str
    position: int
    rule_text: str
    target: str
    jump_path: tuple[str, ...]
    packets: int
    bytes: int
    hits_cluster_dns: bool
    kind: Kind
    manager: str | None
    fix: str
    handle: int | None = None
    protocols: tuple[str, ...] = ()
    comment: str | None = None

    @property
    def identity(self) -> tuple[str, str, str, str, str]:
        """Stays the same while the rule exists, whatever is inserted before it."""
        return (self.backend, self.family, self.table, self.chain, self.rule_text)

    @property
    def reason(self) -> str:
        return "DNSDropRule" if self.kind == "drop" else "DNSNoEndpointsReject"

    def to_finding(self, node: str) -> Finding:
        where = f"{self.backend} {self.family} table {self.table} chain {self.chain}"
        path = " -> ".join(self.jump_path)
        counters = f"{self.packets} packets, {self.bytes} bytes"
        if self.kind == "no_endpoints":
            message = (
                f"kube-proxy rejects DNS because the DNS Service has no endpoints: rule "
                f"{self.position} of {where} ({self.rule_text}), reached via {path}, "
                f"{counters}; CoreDNS has no ready pods"
            )
        else:
            dns = " including the cluster DNS IP" if self.hits_cluster_dns else ""
            message = (
                f"firewall rule drops DNS{dns}: rule {self.position} of {where} "
                f"({self.rule_text}), reached via {path}, {counters}; fix: {self.fix}"
            )
        details: dict[str, Any] = {
            "family": self.family,
            "backend": self.backend,
            "table": self.table,
            "chain": self.chain,
            "position": self.position,
            "handle": self.handle,
            "rule": self.rule_text,
            "target": self.target,
            "jump_path": list(self.jump_path),
            "packets": self.packets,
            "bytes": self.bytes,
            "hits_cluster_dns": self.hits_cluster_dns,
            "kind": self.kind,
            "manager": self.manager,
            "fix": self.fix,
            "protocols": list(self.protocols),
            "comment": self.comment,
        }
        severity: Severity = "warning" if self.kind == "drop" else "info"
        return Finding.on_node(self.reason, node, message, details, severity=severity)


def _ip_version(family: str) -> frozenset[int]:
    if family == "ipv4":
        return frozenset({4})
    if family == "ipv6":
        return frozenset({6})
    if family in ("inet", "bridge", "netdev"):
        return frozenset({4, 6})
    return frozenset()


def _admits_ip(nets: tuple[IpNetwork, ...] | None, negated: bool, ip: Any) -> bool:
    if nets is None:
        return True
    inside = any(ip.version == net.version and ip in net for net in nets)
    return not inside if negated else inside


def _specific(nets: tuple[IpNetwork, ...] | None, negated: bool) -> bool:
    return nets is not None and not negated and all(net.prefixlen > 0 for net in nets)


def _narrow(context: _Context, match: Match) -> _Context:
    dst = context.dst
    if match.dst is not None:
        dst = (*dst, (match.dst, match.dst_negated))
    port53 = context.port53 or (match.dports is not None and match.admits_port(DNS_PORT))
    return _Context(context.protocols & match.protocols, port53, dst)


def _passes_dns(context: _Context, match: Match) -> bool:
    """Whether DNS traffic can match this rule (ignoring what the rule does with it)."""
    if not (context.protocols & match.protocols & DNS_PROTOS):
        return False
    return match.admits_port(DNS_PORT)


def _manager(table: Table, chains: Iterable[str]) -> str | None:
    if table.backend == "nft" and table.name == "firewalld":
        return "firewalld"
    for name in chains:
        if name.startswith(("ufw-", "ufw6-")):
            return "ufw"
        if name.endswith("_direct") or name.startswith(
            ("IN_", "OUT_", "FWDI_", "FWDO_", "FWD_", "PRE_", "POST_", "filter_IN_", "filter_FWD")
        ):
            return "firewalld"
    return None


def _fix(table: Table, rule: Rule, manager: str | None) -> str:
    if manager == "ufw":
        if rule.chain.startswith(("ufw-user-", "ufw6-user-")):
            return (
                "remove it in ufw: `ufw status numbered`, then `ufw delete <number>` of the "
                "rule that denies port 53 (iptables changes are undone by `ufw reload`)"
            )
        return (
            "remove it in ufw: it comes from /etc/ufw/before.rules, after.rules or their "
            "*6.rules; edit the file and run `ufw reload`"
        )
    if manager == "firewalld":
        if rule.chain.endswith("_direct"):
            return (
                "remove it in firewalld: `firewall-cmd --permanent --direct --get-all-rules`, "
                "`firewall-cmd --permanent --direct --remove-rule …` for this rule, then "
                "`firewall-cmd --reload`"
            )
        return (
            "remove it in firewalld: find the zone/policy/rich rule that blocks port 53 "
            "(`firewall-cmd --list-all-zones`), remove it with `--permanent`, then "
            "`firewall-cmd --reload`"
        )
    if table.backend == "nft":
        keyword = NFT_FAMILY_KEYWORD.get(table.family, table.family)
        handle = rule.handle if rule.handle is not None else "<handle>"
        return f"nft delete rule {keyword} {table.name} {rule.chain} handle {handle}"
    tool = iptables_tool(table)
    spec = rule.text[3:] if rule.text.startswith("-A ") else rule.text
    return f"{tool} -t {table.name} -D {spec}"


def _tables_to_analyse(rulesets: Iterable[Ruleset]) -> list[Table]:
    chosen: list[Table] = []
    for table in distinct_tables(rulesets):
        if table.backend == "nft":
            if table.family in ("ipv4", "ipv6") and table.name == "kube-proxy":
                continue  # kube-proxy's nftables mode: its own rules, not foreign drops
        elif table.name not in DROP_TABLES or not table.parsed:
            continue
        chosen.append(table)
    return chosen


def dns_rule_hits(rulesets: Iterable[Ruleset], cluster_dns: Sequence[str]) -> list[DnsRuleHit]:
    """Every rule that drops or rejects DNS (see the module doc), each once, in table and
    chain order. ``cluster_dns`` are the cluster DNS Service IPs (and NodeLocal DNSCache's)."""
    dns_ips = []
    for text in cluster_dns:
        try:
            dns_ips.append(ipaddress.ip_address(text))
        except ValueError:
            continue
    hits: list[DnsRuleHit] = []
    for table in _tables_to_analyse(rulesets):
        hits.extend(_table_hits(table, dns_ips))
    return hits


def _table_hits(table: Table, dns_ips: Sequence[Any]) -> Iterator[DnsRuleHit]:
    versions = _ip_version(table.family)
    ips = [ip for ip in dns_ips if ip.version in versions]
    seen: set[int] = set()
    visited: set[tuple[str, _Context]] = set()
    queue: deque[tuple[Chain, tuple[str, ...], _Context]] = deque(
        (chain, (chain.name,), _Context()) for chain in table.base_chains()
    )
    visits = 0
    while queue and visits < _MAX_PATH_VISITS:
        chain, path, context = queue.popleft()
        if (chain.name, context) in visited:
            continue
        visited.add((chain.name, context))
        visits += 1
        for rule in chain.rules:
            target, _ = rule.quick_target
            if target is None:
                continue
            for hit in _rule_hits(table, rule, target, path, context, ips, queue):
                if id(rule) not in seen:
                    seen.add(id(rule))
                    yield hit
            if ends_chain(table, rule):
                break  # the rules after it are dead: never reported


def _rule_hits(
    table: Table,
    rule: Rule,
    target: str,
    path: tuple[str, ...],
    context: _Context,
    ips: Sequence[Any],
    queue: deque[tuple[Chain, tuple[str, ...], _Context]],
) -> Iterator[DnsRuleHit]:
    """The hit of one rule, if any; the chains it jumps to are queued."""
    jump = table.chains.get(target) if target not in _VERDICTS else None
    is_verdict = target.upper() in _VERDICTS
    if jump is None and not is_verdict and not (rule.parsed and rule.parsed.port_vmap):
        return  # ACCEPT, NOTRACK, DNAT, MARK, LOG…: the cheap majority
    match = rule.match
    if not match.target or not _passes_dns(context, match):
        return
    for verdict, ports in _verdicts(match, match.target):
        if verdict in _VERDICTS:
            hit = _hit(table, rule, match, verdict, ports, path, context, ips)
            if hit is not None:
                yield hit
        else:
            child = table.chains.get(verdict)
            if child is not None and child.name not in path:
                narrowed = _narrow(context, match)
                if ports is not None and any(lo <= DNS_PORT <= hi for lo, hi in ports):
                    narrowed = _Context(narrowed.protocols, True, narrowed.dst)
                queue.append((child, (*path, child.name), narrowed))


def _verdicts(match: Match, target: str) -> Iterator[tuple[str, PortRanges | None]]:
    if match.port_vmap:
        for ports, verdict, jump in match.port_vmap:
            if any(lo <= DNS_PORT <= hi for lo, hi in ports):
                yield (jump if jump else verdict), ports
        return
    yield (target.upper() if target.upper() in _VERDICTS else target), None


def _hit(
    table: Table,
    rule: Rule,
    match: Match,
    verdict: str,
    vmap_ports: PortRanges | None,
    path: tuple[str, ...],
    context: _Context,
    ips: Sequence[Any],
) -> DnsRuleHit | None:
    dst = list(context.dst)
    if match.dst is not None:
        dst.append((match.dst, match.dst_negated))
    covers = [ip for ip in ips if all(_admits_ip(nets, neg, ip) for nets, neg in dst)]
    specific = any(_specific(nets, neg) for nets, neg in dst)
    port_given = vmap_ports is not None or match.dports is not None or context.port53
    if not port_given and not (specific and covers):
        return None  # a blanket rule (no port, no DNS destination): not a DNS rule
    comment = match.comment
    no_endpoints = comment is not None and any(text in comment for text in NO_ENDPOINTS)
    manager = None if no_endpoints else _manager(table, (*path, rule.chain))
    return DnsRuleHit(
        family=table.family,
        backend=table.backend,
        table=table.name,
        chain=rule.chain,
        position=rule.position,
        rule_text=rule.describe(),
        target=verdict,
        jump_path=path,
        packets=rule.packets,
        bytes=rule.bytes,
        hits_cluster_dns=bool(covers),
        kind="no_endpoints" if no_endpoints else "drop",
        manager=manager,
        fix=_fix(table, rule, manager),
        handle=rule.handle,
        protocols=tuple(sorted(context.protocols & match.protocols & DNS_PROTOS)),
        comment=comment,
    )


_CHAIN_ENDS = frozenset({"accept", "drop", "reject", "return", "goto"})


def ends_chain(table: Table, rule: Rule) -> bool:
    """Whether ``rule`` ends its chain for every packet (a verdict without a match): the
    rules after it are dead."""
    target, goto = rule.quick_target
    if not goto and (target or "").upper() not in ("ACCEPT", "DROP", "REJECT", "RETURN"):
        return False
    if table.backend == "nft":
        compiled = NftCompiler(table.family, table.sets).compile(rule.expr)
    else:
        compiled = compile_iptables(rule.text)
    steps = compiled.steps
    return (
        bool(steps)
        and all(isinstance(s, Effect) for s in steps[:-1])
        and isinstance(steps[-1], Verdict)
        and steps[-1].kind in _CHAIN_ENDS
        and steps[-1].effect is None
    )
