"""Does a flow pass this node's rules? Each packet of a flow is walked through every base chain
of every table of every backend (iptables-legacy, iptables-nft, native nft tables of any name,
kube-proxy's included) on each hook of its path, in hook-priority order:

- the path: a packet arriving on an interface crosses PREROUTING, then INPUT when its
  destination (after PREROUTING's DNAT) is the node's own, else FORWARD and POSTROUTING; a
  packet the host sends crosses OUTPUT, is routed again (OUTPUT's DNAT), then POSTROUTING;
- on a hook, base chains run by priority (iptables tables: raw -300, conntrack -200, mangle
  -150, nat -100 (DNAT) / 100 (SNAT), filter 0, security 50; nft chains by their declared
  priority). DROP/REJECT in any of them is final; ACCEPT ends only that base chain; a chain's
  policy is a verdict; nat chains see only the first packet of a tracked connection;
- in a chain: jump, goto, RETURN, implicit return at the end of a user chain; marks set by
  MARK/CONNMARK/``meta mark set`` are seen by later rules; NOTRACK makes the packet untracked
  (it then skips nat); DNAT changes the destination for the later hooks.

A match the evaluator cannot decide (an ipset, ``-m recent``, a random endpoint choice…) is
followed both ways; the packet's verdict is ``drop`` when every way is stopped, ``pass`` when
none is, ``may-drop`` otherwise. Rules after an unconditional verdict are never reached, so
never reported.

A stopped flow's packet is walked a second time past its stops (``past_stops``), to name
what still stops it once the first stop is fixed (``FlowVerdict.also_stopped_by``): past a
rule, on with the next rule of its chain (the rule deleted), or, when its owner's fix is an
allow (ufw, firewalld, Docker), with the hook's next base chain; past a policy, with the
hook's next base chain; past a possible stop, on as its other way goes. Nothing is said past
kube-proxy's no-endpoints reject (endpoints would change the packets' way). The verdict is the
first walk's. Pure.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from collectors.netfilter.flows import Flow, Packet, Tunnel
from collectors.netfilter.hooks import (
    CONNTRACK_PRIORITY,
    BaseChain,
    base_chain,
    host_destination,
    label,
)
from collectors.netfilter.iptables_steps import compile_iptables
from collectors.netfilter.model import Chain, Rule, Ruleset, Table, distinct_tables
from collectors.netfilter.nft_steps import NftCompiler
from collectors.netfilter.owners import Hook, fix_accepts, fix_for, owner_of, policy_owner
from collectors.netfilter.paths import (
    Routes,
    initial_state,
    outer_packet,
    parse_routes,
    proto_name,
    reply_packet,
    route,
)
from collectors.netfilter.steps import (
    Address,
    Compiled,
    Effect,
    Lookup,
    State,
    Test,
    Verdict,
)
from collectors.netfilter.verdicts import (
    MAX_FURTHER_STOPS,
    Branch,
    End,
    further_stops,
    make_stop,
    packet_verdict,
    worst,
)
from collectors.netfilter.verdicts import FlowVerdict as FlowVerdict
from collectors.netfilter.verdicts import Outcome as Outcome
from collectors.netfilter.verdicts import Stop as Stop

NO_ENDPOINTS_MAPS = frozenset({"no-endpoint-services", "no-endpoint-nodeports"})
NO_ENDPOINTS_COMMENTS = ("has no endpoints", "has no local endpoints")
MAX_BRANCHES = 512
MAX_STEPS = 400_000
MAX_DEPTH = 64
#: Chains at least this long get a destination index (kube-proxy's KUBE-SERVICES).
INDEX_MIN_RULES = 64


@dataclass(slots=True)
class _Budget:
    """The walk's limits; ``pass_stops``: how many stops a branch is let through (0 unless
    the walk looks past stops)."""

    branches: int = 1
    steps: int = 0
    pass_stops: int = 0

    def exhausted(self) -> bool:
        return self.branches > MAX_BRANCHES or self.steps > MAX_STEPS


@dataclass(frozen=True, slots=True)
class _Next:
    """A rule's result: ``kind`` next (go on), accept, drop, return, jump, goto, or maybe (a
    stop that may happen: an unknown target, a queue)."""

    kind: str
    branch: Branch
    verdict: Verdict | None = None


class Evaluator:
    """The node's rules, ready to walk packets through (compiled rules are cached)."""

    def __init__(self, rulesets: Sequence[Ruleset]) -> None:
        self.tables = [t for t in distinct_tables(rulesets) if t.family in ("ipv4", "ipv6", "inet")]
        self.unread = tuple(
            f"{t.backend} {t.family} table {t.name} (not read)" for t in self.tables if not t.parsed
        )
        self.ipsets = {name: found for rs in rulesets for name, found in rs.ipsets.items()}
        self._hooks: dict[tuple[str, str], list[BaseChain]] = {}
        self._compiled: dict[int, Compiled] = {}
        self._nft: dict[int, NftCompiler] = {}
        self._host_dst: dict[int, list[Address | None]] = {}
        self._order: dict[tuple[int, Address], list[int]] = {}

    # ------------------------------------------------------------------ public

    def flow(self, flow: Flow) -> FlowVerdict:
        if flow.unknown is not None or not flow.packets:
            return FlowVerdict(flow, "unknown", reason=flow.unknown or "no packets")
        routes = parse_routes(flow.routes)
        tunnels = {t.dev: t for t in flow.tunnels}
        verdicts: list[FlowVerdict] = []
        walked: list[tuple[Packet, list[End] | None]] = []
        for packet in flow.packets:
            ends = list(self.packet(packet, routes, tunnels))
            queries = None
            if packet.replies:
                queries, ends = ends, self._replies(ends, routes, tunnels)
                if not ends:
                    continue  # the query is stopped: its own flow reports it
            verdicts.append(packet_verdict(flow, ends))
            walked.append((packet, queries))
        if not verdicts:
            return FlowVerdict(flow, "unknown", reason="no query gets through to be answered")
        i = worst(verdicts)
        undecided = tuple(dict.fromkeys(n for v in verdicts for n in v.undecided))
        found = replace(verdicts[i], undecided=undecided)
        if found.stopped_by is None:
            return found
        packet, queries = walked[i]
        if queries is None:
            ends = list(self.packet(packet, routes, tunnels, past_stops=True))
        else:
            ends = self._replies(queries, routes, tunnels, past_stops=True)
        return replace(found, also_stopped_by=further_stops(found.stopped_by, ends))

    def packet(
        self,
        packet: Packet,
        routes: Routes,
        tunnels: Mapping[str, Tunnel] | None = None,
        past_stops: bool = False,
    ) -> Iterator[End]:
        """Every way ``packet`` can go; through an overlay link, the encapsulated packet the
        node receives (before) or sends (after) must pass too. ``past_stops``: each way is let
        through up to :data:`MAX_FURTHER_STOPS` stops (``Branch.past``) before one ends it."""
        tunnels = tunnels or {}
        arriving = tunnels.get(packet.iif or "") if packet.origin == "in" else None
        pasts: list[tuple[Stop, ...]] = [()]
        if arriving is not None:
            outer_ends = list(self._one(outer_packet(arriving, incoming=True), routes, past_stops))
            yield from (e for e in outer_ends if e.stop is not None)
            pasts = list(dict.fromkeys(e.branch.past for e in outer_ends if e.stop is None))
            if not pasts:
                return
        for inner in self._one(packet, routes, past_stops):
            for before in pasts:
                end = inner if not before else _after_stops(inner, before)
                leaving = tunnels.get(end.branch.state.oif or "")
                if end.stop is not None or leaving is None or end.branch.state.to_local:
                    yield end
                    continue
                yield from self._encapsulated(end, leaving, routes, past_stops)

    def _encapsulated(
        self, end: End, leaving: Tunnel, routes: Routes, past_stops: bool
    ) -> Iterator[End]:
        for outer in self._one(outer_packet(leaving, incoming=False), routes, past_stops):
            path = (*end.branch.path, f"encapsulated by {leaving.dev}", *outer.branch.path)
            undecided = (*end.branch.undecided, *outer.branch.undecided)
            past = (*end.branch.past, *outer.branch.past)
            # The inner packet's state stays the branch's (its answer comes back to it).
            branch = replace(end.branch, path=path, undecided=undecided, past=past)
            yield End(branch, outer.stop)

    def _one(self, packet: Packet, routes: Routes, past_stops: bool = False) -> Iterator[End]:
        state = initial_state(packet, routes)
        budget = _Budget(pass_stops=MAX_FURTHER_STOPS if past_stops else 0)
        branch = Branch(state)
        if packet.origin == "local":
            hooks = ("route-out", "output", "reroute", "postrouting")
            yield from self._path(branch, hooks, routes, budget)
        else:
            yield from self._path(branch, ("prerouting", "route"), routes, budget)

    # ------------------------------------------------------------------ path and hooks

    def _path(
        self, branch: Branch, hooks: tuple[str, ...], routes: Routes, budget: _Budget
    ) -> Iterator[End]:
        if not hooks:
            state = branch.state
            if state.to_local and state.iif is None:
                # Sent by the host to itself: back in through the loopback (NAT is bound).
                state = replace(state, iif="lo", oif=None, nat_done=True)
                yield from self._path(
                    replace(branch, state=state), ("prerouting", "input"), routes, budget
                )
            else:
                yield End(branch)
            return
        hook, rest = hooks[0], hooks[1:]
        if hook in ("route", "route-out", "reroute"):
            state = route(branch.state, routes)
            if hook == "route":
                rest = ("input",) if state.to_local else ("forward", "postrouting")
            yield from self._path(replace(branch, state=state), rest, routes, budget)
            return
        chains = self._base_chains(branch.state.family, hook)
        for end in self._chains(branch, chains, 0, budget):
            if end.stop is not None:
                yield end
            else:
                state = replace(end.branch.state, before_conntrack=False)
                yield from self._path(replace(end.branch, state=state), rest, routes, budget)

    def _chains(
        self, branch: Branch, chains: list[BaseChain], i: int, budget: _Budget
    ) -> Iterator[End]:
        while i < len(chains):
            base = chains[i]
            state = branch.state
            if base.nat and (state.ct != "new" or state.reply or state.nat_done):
                i += 1
                continue
            before = base.priority < CONNTRACK_PRIORITY and base.hook in ("prerouting", "output")
            state = replace(state, hook=base.hook, before_conntrack=before)
            entry = f"{base.hook}: {label(base.table)} {base.chain.name}"
            start = replace(branch, state=state, path=(*branch.path, entry), via_map=None)
            ends = list(self._walk(base, base.chain, 0, (), start, budget, 0))
            if len(ends) == 1 and ends[0].stop is None:
                branch = ends[0].branch
                i += 1
                continue
            for end in ends:
                if end.stop is not None:
                    yield end
                else:
                    yield from self._chains(end.branch, chains, i + 1, budget)
            return
        yield End(branch)

    def _base_chains(self, family: str, hook: str) -> list[BaseChain]:
        key = (family, hook)
        if key not in self._hooks:
            found: list[BaseChain] = []
            for table in self.tables:
                if table.family not in (family, "inet"):
                    continue
                for chain in table.base_chains():
                    base = base_chain(table, chain, hook)
                    if base is not None:
                        found.append(base)
            found.sort(key=lambda b: b.priority)
            self._hooks[key] = found
        return self._hooks[key]

    # ------------------------------------------------------------------ chains

    def _walk(
        self,
        base: BaseChain,
        chain: Chain,
        start: int,
        stack: tuple[tuple[Chain, int], ...],
        branch: Branch,
        budget: _Budget,
        depth: int,
    ) -> Iterator[End]:
        if depth > MAX_DEPTH or budget.exhausted():
            yield End(branch, self._limit_stop(base, chain))
            return
        order = self._rule_order(base.table, chain, branch.state)
        pos = bisect.bisect_left(order, start)
        while pos < len(order):
            index = order[pos]
            rule = chain.rules[index]
            budget.steps += 1
            results = self._rule(base.table, rule, branch)
            if len(results) == 1 and results[0].kind == "next":
                branch = results[0].branch
                pos += 1
                continue
            budget.branches += len(results) - 1
            for result in results:
                yield from self._after(base, chain, index, rule, stack, result, budget, depth)
            return
        yield from self._end_of_chain(base, chain, stack, branch, budget, depth)

    def _after(
        self,
        base: BaseChain,
        chain: Chain,
        index: int,
        rule: Rule,
        stack: tuple[tuple[Chain, int], ...],
        result: _Next,
        budget: _Budget,
        depth: int,
    ) -> Iterator[End]:
        branch = result.branch
        kind = result.kind
        if kind == "next":
            yield from self._walk(base, chain, index + 1, stack, branch, budget, depth)
        elif kind == "accept":
            yield End(branch)
        elif kind in ("drop", "maybe"):
            active = [base.chain.name, *(c.name for c, _ in stack), chain.name]
            stop = self._rule_stop(base, chain, rule, result, branch, active)
            if len(branch.past) >= budget.pass_stops or stop.no_endpoints:
                # Past kube-proxy's no-endpoints reject the Service's endpoints would change
                # the packets' way: nothing to say beyond it.
                yield End(branch, stop)
            elif fix_accepts(stop.owner, chain.name) or (
                result.verdict is not None and result.verdict.kind == "queue"
            ):
                # As its owner's fix (an allow) or the queue's program would: the base chain
                # accepts.
                yield End(replace(branch, past=(*branch.past, stop)))
            else:  # as if the rule were gone: on with the next rule
                branch = replace(branch, past=(*branch.past, stop))
                yield from self._walk(base, chain, index + 1, stack, branch, budget, depth)
        elif kind == "return":
            yield from self._end_of_chain(base, chain, stack, branch, budget, depth, returned=True)
        else:  # jump or goto
            assert result.verdict is not None and result.verdict.chain is not None
            name = result.verdict.chain
            if depth + 1 > MAX_DEPTH or budget.exhausted():
                # _walk stops there: do not read the chain (a table read lazily over netlink
                # would fetch each of a verdict map's thousands of targets).
                target = Chain(name)
            else:
                target = base.table.chains[name]
            branch = replace(branch, path=(*branch.path, target.name))
            if kind == "jump":
                stack = (*stack, (chain, index + 1))
            yield from self._walk(base, target, 0, stack, branch, budget, depth + 1)

    def _end_of_chain(
        self,
        base: BaseChain,
        chain: Chain,
        stack: tuple[tuple[Chain, int], ...],
        branch: Branch,
        budget: _Budget,
        depth: int,
        returned: bool = False,
    ) -> Iterator[End]:
        if stack:
            caller, resume = stack[-1]
            branch = replace(branch, path=(*branch.path, f"<- {caller.name}"))
            yield from self._walk(base, caller, resume, stack[:-1], branch, budget, depth - 1)
            return
        policy = (base.chain.policy or "ACCEPT").upper()
        if policy not in ("DROP", "REJECT"):
            yield End(branch)
        elif len(branch.past) >= budget.pass_stops:
            yield End(branch, self._policy_stop(base, branch))
        else:  # as if the policy accepted: on with the hook's next base chain
            yield End(replace(branch, past=(*branch.past, self._policy_stop(base, branch))))

    # ------------------------------------------------------------------ rules

    def _rule(self, table: Table, rule: Rule, branch: Branch) -> list[_Next]:
        compiled = self._compile(table, rule)
        if compiled.inert:
            return [_Next("next", branch)]
        return self._steps(table, compiled, 0, branch)

    def _steps(self, table: Table, compiled: Compiled, i: int, branch: Branch) -> list[_Next]:
        steps = compiled.steps
        while i < len(steps):
            step = steps[i]
            if isinstance(step, Test):
                answer = step.test(branch.state)
                if answer is False:
                    return [_Next("next", branch)]
                if answer is None:
                    note = step.text or "a match"
                    forked = replace(branch, undecided=(*branch.undecided, note))
                    return [_Next("next", forked), *self._steps(table, compiled, i + 1, forked)]
            elif isinstance(step, Effect):
                branch = replace(branch, state=step.apply(branch.state))
            elif isinstance(step, Lookup):
                return self._lookup(table, step, branch)
            else:
                return self._verdict(table, step, branch)
            i += 1
        return [_Next("next", branch)]

    def _lookup(self, table: Table, step: Lookup, branch: Branch) -> list[_Next]:
        chosen = step.choose(branch.state)
        if chosen is None:
            return [_Next("next", branch)]
        if isinstance(chosen, Verdict):
            return self._verdict(table, chosen, branch)
        note = f"{step.text} (random choice)" if step.random else step.text
        forked = replace(branch, undecided=(*branch.undecided, note))
        results = [r for v in chosen for r in self._verdict(table, v, forked)]
        # A random number always finds its element; an undecided key may find none.
        return results if step.random else [_Next("next", forked), *results]

    def _verdict(self, table: Table, verdict: Verdict, branch: Branch) -> list[_Next]:
        if verdict.via_map is not None:
            branch = replace(branch, via_map=verdict.via_map)
        kind = verdict.kind
        if verdict.effect is not None:
            branch = replace(branch, state=verdict.effect(branch.state))
        if kind in ("jump", "goto") and verdict.chain in table.chains:
            return [_Next(kind, branch, verdict)]
        if kind in ("drop", "reject"):
            return [_Next("drop", branch, verdict)]
        if kind in ("jump", "goto", "queue", "unknown"):
            # A target we do not know (or a program, for queue) may stop the packet or not.
            note = f"target {verdict.text or verdict.chain}"
            forked = replace(branch, undecided=(*branch.undecided, note))
            after = "accept" if kind == "queue" else "next"
            return [_Next("maybe", forked, verdict), _Next(after, forked)]
        return [_Next(kind, branch, verdict)]

    def _compile(self, table: Table, rule: Rule) -> Compiled:
        key = id(rule)
        compiled = self._compiled.get(key)
        if compiled is None:
            if table.backend == "nft":
                compiler = self._nft.get(id(table))
                if compiler is None:
                    compiler = self._nft[id(table)] = NftCompiler(table.family, table.sets)
                compiled = compiler.compile(rule.expr)
            else:
                compiled = compile_iptables(rule.text, self.ipsets)
            self._compiled[key] = compiled
        return compiled

    def _rule_order(self, table: Table, chain: Chain, state: State) -> list[int] | range:
        """The rules of ``chain`` that can match ``state``'s destination: all of them, except
        in long iptables chains, where a rule naming another single destination host is left
        out without being parsed."""
        if table.backend == "nft" or len(chain.rules) < INDEX_MIN_RULES:
            return range(len(chain.rules))
        hosts = self._host_dst.get(id(chain))
        if hosts is None:
            hosts = self._host_dst[id(chain)] = [host_destination(r.text) for r in chain.rules]
        key = (id(chain), state.daddr)
        order = self._order.get(key)
        if order is None:
            order = [i for i, h in enumerate(hosts) if h is None or h == state.daddr]
            self._order[key] = order
        return order

    # ------------------------------------------------------------------ stops

    def _rule_stop(
        self,
        base: BaseChain,
        chain: Chain,
        rule: Rule,
        result: _Next,
        branch: Branch,
        active: list[str],
    ) -> Stop:
        """``active``: the chains from the base chain to the stopping one (jumps not yet
        returned from)."""
        table = base.table
        comment = rule.match.comment
        owner = owner_of(table, active, comment)
        no_endpoints = branch.via_map in NO_ENDPOINTS_MAPS or any(
            c in (comment or "") for c in NO_ENDPOINTS_COMMENTS
        )
        if no_endpoints:
            owner = "kube-proxy"
        verdict = result.verdict
        target = verdict.text if verdict is not None and verdict.text else "DROP"
        return make_stop(
            base,
            chain,
            rule,
            target,
            (rule.packets, rule.bytes),
            owner=owner,
            fix=fix_for(owner, table, chain, rule, _hook_of(branch)),
            comment=comment,
            no_endpoints=no_endpoints,
            certain=result.kind == "drop",
        )

    def _policy_stop(self, base: BaseChain, branch: Branch) -> Stop:
        table, chain = base.table, base.chain
        owner = policy_owner(table, chain)
        return make_stop(
            base,
            chain,
            None,
            f"policy {(chain.policy or '').upper()}",
            (chain.packets, chain.bytes),
            owner=owner,
            fix=fix_for(owner, table, chain, None, _hook_of(branch)),
        )

    def _limit_stop(self, base: BaseChain, chain: Chain) -> Stop:
        target = "evaluation limit (too many undecided matches or jumps)"
        return make_stop(base, chain, None, target, (0, 0), certain=False)

    def _replies(
        self,
        ends: list[End],
        routes: Routes,
        tunnels: Mapping[str, Tunnel],
        past_stops: bool = False,
    ) -> list[End]:
        replies: list[End] = []
        for end in ends:
            if end.stop is not None:
                continue  # the query itself is stopped: its own flow says so
            answer = reply_packet(end.branch.state)
            for reply in self.packet(answer, routes, tunnels, past_stops):
                undecided = (*end.branch.undecided, *reply.branch.undecided)
                replies.append(replace(reply, branch=replace(reply.branch, undecided=undecided)))
        return replies


def evaluate(rulesets: Sequence[Ruleset], flows: Sequence[Flow]) -> list[FlowVerdict]:
    """One verdict per flow, in order."""
    evaluator = Evaluator(rulesets)
    return [evaluator.flow(flow) for flow in flows]


# --------------------------------------------------------------------------- helpers


def _after_stops(end: End, before: tuple[Stop, ...]) -> End:
    """``end`` of an inner packet whose outer packet was let through the stops ``before``."""
    return replace(end, branch=replace(end.branch, past=(*before, *end.branch.past)))


def _hook_of(branch: Branch) -> Hook:
    state = branch.state
    visited = tuple(entry.rsplit(" ", 1)[-1] for entry in branch.path)
    return Hook(state.hook, state.iif, state.oif, str(proto_name(state.l4)), state.dport, visited)
