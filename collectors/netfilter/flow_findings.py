"""Findings from flow verdicts (``collectors.netfilter.evaluate``). Pure.

How they relate to the port-53 rule findings (``collectors.netfilter.dns_rules``):

- ``DNSDropRule`` names a rule that drops DNS by name (port 53, the DNS IP), whether or not a
  flow of this node reaches it. When such a rule is also what stops a flow, the flow is not
  reported a second time: the ``DNSDropRule`` finding lists the flows it stops in
  ``details.flows``.
- ``DNSNoEndpointsReject`` stays kube-proxy's reject of a DNS Service without endpoints, in
  both modes: a flow stopped by it (iptables ``"… has no endpoints"``, or the nftables mode's
  ``no-endpoint-services`` map) adds no ``DNSFlowBlocked``; in nftables mode, where the
  port-53 analysis does not read kube-proxy's table, the verdict makes that finding.
- ``DNSFlowBlocked`` is everything else that stops, or may stop, a flow: chain policies,
  catch-alls, rules on other ports (the overlay), ``may-drop`` verdicts. One per flow and
  family. It names the first stop and, in ``details.also_stopped_by``, the stops that still
  stop the flow once the first lets it through, with every fix needed. A flow whose first stop
  is a ``DNSDropRule`` rule or kube-proxy's no-endpoints reject but which further stops also
  stop gets one too: fixing that rule alone would not let it through.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from collectors.finding import Finding
from collectors.netfilter.dns_rules import DnsRuleHit
from collectors.netfilter.evaluate import FlowVerdict, Stop

FLOW_TEXT = {
    "pod-dns-udp": "pods → cluster DNS (UDP 53)",
    "pod-dns-tcp": "pods → cluster DNS (TCP 53)",
    "host-dns-udp": "host network → cluster DNS (UDP 53)",
    "host-dns-tcp": "host network → cluster DNS (TCP 53)",
    "dns-replies": "DNS answers back to pods and the host",
    "overlay-vxlan": "VXLAN overlay from other nodes",
    "overlay-ipip": "IP-in-IP overlay from other nodes",
    "overlay-wireguard": "WireGuard overlay from other nodes",
    "dns-upstream-udp": "DNS servers → upstream nameservers (UDP 53)",
    "dns-upstream-tcp": "DNS servers → upstream nameservers (TCP 53)",
}


def _rule_key(
    backend: str, family: str, table: str, chain: str, position: int | None
) -> tuple[Any, ...]:
    return (backend, family, table, chain, position)


def flow_findings(
    verdicts: Sequence[FlowVerdict], hits: Sequence[DnsRuleHit], node: str
) -> tuple[list[Finding], dict[tuple[Any, ...], list[str]]]:
    """The ``DNSFlowBlocked`` (and nftables-mode ``DNSNoEndpointsReject``) findings, and for
    each port-53 rule (``DnsRuleHit`` key) the flows it stops, for ``details.flows``."""
    named = {_rule_key(h.backend, h.family, h.table, h.chain, h.position): h for h in hits}
    stopped_by_named: dict[tuple[Any, ...], list[str]] = {}
    findings: list[Finding] = []
    no_endpoints: dict[tuple[Any, ...], Finding] = {}
    for verdict in verdicts:
        stop = verdict.stopped_by
        if verdict.verdict not in ("drop", "may-drop") or stop is None:
            continue
        key = _rule_key(stop.backend, stop.family, stop.table, stop.chain, stop.position)
        label = f"{verdict.flow.name}/{verdict.flow.family}"
        if stop.rule is not None and key in named:
            stopped_by_named.setdefault(key, []).append(label)
        elif stop.no_endpoints:
            if key in no_endpoints:  # one finding per rule, naming every flow it stops
                no_endpoints[key].details["flows"].append(label)
            else:
                no_endpoints[key] = _no_endpoints(stop, verdict, node)
                findings.append(no_endpoints[key])
        else:
            findings.append(_blocked(verdict, stop, node))
            continue
        if verdict.also_stopped_by:
            findings.append(_blocked(verdict, stop, node))
    return findings, stopped_by_named


def with_flows(
    finding: Finding, hit: DnsRuleHit, stopped: dict[tuple[Any, ...], list[str]]
) -> Finding:
    """A ``DNSDropRule``/``DNSNoEndpointsReject`` finding with the flows its rule stops."""
    key = _rule_key(hit.backend, hit.family, hit.table, hit.chain, hit.position)
    flows = sorted(stopped.get(key, []))
    return Finding(
        finding.reason,
        finding.severity,
        finding.time,
        finding.node,
        finding.subject,
        finding.message + (f"; it stops {', '.join(flows)}" if flows else ""),
        {**finding.details, "flows": flows},
    )


def _where(stop: Stop) -> str:
    if stop.is_policy:
        return f"the {stop.target} of {stop.backend} {stop.family} {stop.table} {stop.chain}"
    return (
        f"rule {stop.position if stop.position is not None else stop.handle} of {stop.backend} "
        f"{stop.family} table {stop.table} chain {stop.chain} ({stop.rule})"
    )


def _blocked(verdict: FlowVerdict, stop: Stop, node: str) -> Finding:
    flow = verdict.flow
    certain = verdict.verdict == "drop"
    what = FLOW_TEXT.get(flow.name, flow.name)
    how = "is dropped" if certain else "may be dropped"
    owner = f" (owner: {stop.owner})" if stop.owner else " (hand-written or unknown owner)"
    why = (
        ""
        if certain
        else f"; undecided on the way: {', '.join(verdict.undecided[:3])}"
        if verdict.undecided
        else "; not every way through is stopped"
    )
    message = (
        f"{what} ({flow.family}) {how} by {_where(stop)} on {stop.hook}{owner}, "
        f"{stop.packets} packets counted{why}{_then_also(verdict.also_stopped_by)}; "
        f"{_fixes(stop, verdict.also_stopped_by)}"
    )
    details: dict[str, Any] = {
        "flow": flow.name,
        "family": flow.family,
        "certain": certain,
        "hook": stop.hook,
        **_rule_details(stop),
        "policy": stop.is_policy,
        "owner": stop.owner,
        "path": list(verdict.path),
        "undecided": list(verdict.undecided),
        "also_stopped_by": [_stop_details(s) for s in verdict.also_stopped_by],
    }
    return Finding.on_node("DNSFlowBlocked", node, message, details)


def _owner_text(stop: Stop) -> str:
    return f"owner: {stop.owner}" if stop.owner else "hand-written or unknown owner"


def _then_also(further: Sequence[Stop]) -> str:
    """The stops met once the first one lets the packets through, in order."""
    return "".join(
        f"; then also {'' if s.certain else 'possibly '}by {_where(s)} on {s.hook} "
        f"({_owner_text(s)}, {s.packets} packets counted)"
        for s in further
    )


def _fixes(first: Stop, further: Sequence[Stop]) -> str:
    fixes = list(dict.fromkeys(s.fix for s in (first, *further) if s.fix))
    if len(fixes) <= 1:
        return f"fix: {fixes[0] if fixes else first.fix}"
    numbered = " ".join(f"({i}) {fix}" for i, fix in enumerate(fixes, 1))
    return f"fixes, all {len(fixes)} needed: {numbered}"


def _stop_details(stop: Stop) -> dict[str, Any]:
    """A further stop, in the first stop's fields."""
    return {
        "family": stop.family,
        "hook": stop.hook,
        **_rule_details(stop),
        "policy": stop.is_policy,
        "owner": stop.owner,
        "certain": stop.certain,
    }


def _rule_details(stop: Stop) -> dict[str, Any]:
    return {
        "backend": stop.backend,
        "table": stop.table,
        "chain": stop.chain,
        "position": stop.position,
        "handle": stop.handle,
        "rule": stop.rule,
        "target": stop.target,
        "comment": stop.comment,
        "packets": stop.packets,
        "bytes": stop.bytes,
        "fix": stop.fix,
    }


def _no_endpoints(stop: Stop, verdict: FlowVerdict, node: str) -> Finding:
    message = (
        f"kube-proxy rejects DNS because the DNS Service has no endpoints: {_where(stop)}, "
        f"{stop.packets} packets; CoreDNS has no ready pods"
    )
    details: dict[str, Any] = {
        "family": stop.family,
        **_rule_details(stop),
        "jump_path": list(verdict.path),
        "kind": "no_endpoints",
        "manager": "kube-proxy",
        "flows": [f"{verdict.flow.name}/{verdict.flow.family}"],
    }
    return Finding.on_node("DNSNoEndpointsReject", node, message, details, severity="info")
