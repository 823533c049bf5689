"""What the flow evaluator (``collectors.netfilter.evaluate``) finds: the stop of a packet
(a rule or a chain policy), the ways a packet can go, and a flow's verdict from them. Pure.

Stops that stack up: when a flow is stopped, the evaluator walks its packets again, letting
each stop through as if it had passed (a rule: on with the next rule of its chain; a base
chain's policy: on with the hook's next base chain, then the next hook), and keeps the stops
each way passed (``Branch.past``). :func:`further_stops` reads from those ways what still
stops the flow once the first stop is fixed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from collectors.netfilter.flows import Flow
from collectors.netfilter.hooks import BaseChain
from collectors.netfilter.model import Chain, Rule
from collectors.netfilter.steps import State

Outcome = Literal["pass", "drop", "may-drop", "unknown"]

#: At most this many stops are named after the first one.
MAX_FURTHER_STOPS = 4


@dataclass(frozen=True, slots=True)
class Stop:
    """The rule or chain policy that stops a packet. ``position`` is the rule's 1-based place in
    its chain (``None`` for a policy), ``handle`` its nft handle; ``rule`` its text (``None`` for
    a policy); ``target`` DROP/REJECT (nft drop/reject, or the policy); ``owner`` ufw,
    firewalld, docker, kube-proxy, flannel, calico, cilium or None (hand-written); ``fix``
    how to let the flow through in the owner's own terms; ``no_endpoints``: kube-proxy's
    reject of a Service without endpoints (reported as ``DNSNoEndpointsReject``)."""

    family: str
    backend: str
    table: str
    chain: str
    hook: str
    position: int | None
    handle: int | None
    rule: str | None
    target: str
    packets: int
    bytes: int
    owner: str | None = None
    fix: str = ""
    comment: str | None = None
    no_endpoints: bool = False
    certain: bool = True

    @property
    def is_policy(self) -> bool:
        return self.rule is None

    @property
    def place(self) -> tuple[Any, ...]:
        """Where it is: the same rule or policy met by two packets has the same place."""
        return (self.family, self.backend, self.table, self.chain, self.hook, self.position)


@dataclass(frozen=True, slots=True)
class FlowVerdict:
    """``verdict``: ``pass``; ``drop`` (every way the packets can take is stopped);
    ``may-drop`` (some way is stopped, or could be: ``undecided`` names the matches that could
    not be decided); ``unknown`` (the flow's inputs are unknown: ``reason``). ``stopped_by``
    is the first stop found; ``path`` the chains walked to it; ``also_stopped_by`` the stops
    met further on the same way when ``stopped_by`` lets the packets through, in order (each
    ``certain`` when every such way meets it)."""

    flow: Flow
    verdict: Outcome
    stopped_by: Stop | None = None
    path: tuple[str, ...] = ()
    undecided: tuple[str, ...] = ()
    reason: str = ""
    also_stopped_by: tuple[Stop, ...] = ()


@dataclass(frozen=True, slots=True)
class Branch:
    """One way a packet can go: its state, the chains walked, the undecided matches taken;
    ``past``: the stops it was let through (only when the evaluator looks past stops)."""

    state: State
    path: tuple[str, ...] = ()
    undecided: tuple[str, ...] = ()
    via_map: str | None = None
    past: tuple[Stop, ...] = ()


@dataclass(frozen=True, slots=True)
class End:
    """How a branch left a base chain (or the whole path): ``stop`` None means it passed."""

    branch: Branch
    stop: Stop | None = None


def make_stop(
    base: BaseChain,
    chain: Chain,
    rule: Rule | None,
    target: str,
    counters: tuple[int, int],
    **more: Any,
) -> Stop:
    table = base.table
    return Stop(
        family=table.family,
        backend=table.backend,
        table=table.name,
        chain=chain.name,
        hook=base.hook,
        position=rule.position if rule is not None else None,
        handle=rule.handle if rule is not None else None,
        rule=rule.describe() if rule is not None else None,
        target=target,
        packets=counters[0],
        bytes=counters[1],
        **more,
    )


_RANK = {"drop": 0, "may-drop": 1, "unknown": 2, "pass": 3}


def worst(verdicts: list[FlowVerdict]) -> int:
    """A flow passes when each of its packets does; the worst packet's verdict (its index
    here) is the flow's."""
    return min(range(len(verdicts)), key=lambda i: _RANK[verdicts[i].verdict])


def packet_verdict(flow: Flow, ends: list[End]) -> FlowVerdict:
    if not ends:
        return FlowVerdict(flow, "unknown", reason="no packet of the flow could be walked")
    stops = [e for e in ends if e.stop is not None]
    undecided = tuple(dict.fromkeys(n for e in ends for n in e.branch.undecided))
    if not stops:
        return FlowVerdict(flow, "pass", undecided=undecided)
    first = next((e for e in stops if e.stop is not None and e.stop.certain), stops[0])
    assert first.stop is not None
    every = len(stops) == len(ends) and all(e.stop is not None and e.stop.certain for e in stops)
    verdict: Outcome = "drop" if every else "may-drop"
    stop = first.stop if every else replace(first.stop, certain=False)
    return FlowVerdict(flow, verdict, stop, first.branch.path, undecided)


def further_stops(first: Stop, ends: Iterable[End]) -> tuple[Stop, ...]:
    """The stops after ``first`` on the ways that were let through it (``ends`` of a walk
    past stops), in the order met, each once, at most :data:`MAX_FURTHER_STOPS`. A stop is
    ``certain`` when it is certain on every such way."""
    ways: list[list[Stop]] = []
    for end in ends:
        past = end.branch.past
        if past and past[0].place == first.place:
            ways.append([*past[1:], *((end.stop,) if end.stop is not None else ())])
    met: dict[tuple[Any, ...], Stop] = {}
    for way in ways:
        for stop in way:
            if stop.place != first.place:
                met.setdefault(stop.place, stop)
    found = []
    for place, stop in list(met.items())[:MAX_FURTHER_STOPS]:
        everywhere = all(any(s.place == place and s.certain for s in way) for way in ways)
        found.append(replace(stop, certain=stop.certain and everywhere))
    return tuple(found)
