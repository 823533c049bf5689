"""Does a flow pass this node's rules? Walks each packet of a flow through every base chain of
every table of every backend on each hook of its path, in hook-priority order. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from collectors.netfilter.flows import Flow
from collectors.netfilter.model import Ruleset

Verdict = Literal["pass", "drop", "may-drop", "unknown"]


@dataclass(frozen=True, slots=True)
class Stop:
    """The rule or chain policy that stops a packet. ``position`` is the rule's 1-based place in
    its chain (``None`` for a policy), ``handle`` its nft handle; ``rule`` its text (``None`` for
    a policy); ``target`` DROP/REJECT (nft drop/reject, or the policy); ``owner`` ufw,
    firewalld, docker, kube-proxy, flannel, calico, cilium or None (hand-written);
    ``fix`` how to let the flow through in the owner's own terms."""

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

    @property
    def is_policy(self) -> bool:
        return self.rule is None


@dataclass(frozen=True, slots=True)
class FlowVerdict:
    """``verdict``: ``pass``; ``drop`` (every way the packets can take is stopped);
    ``may-drop`` (some way is stopped, or a match on the way could not be decided:
    ``undecided`` names them); ``unknown`` (the flow's inputs are unknown: ``reason``).
    ``stopped_by`` is the first stop found; ``path`` the chains walked to it (or to the end)."""

    flow: Flow
    verdict: Verdict
    stopped_by: Stop | None = None
    path: tuple[str, ...] = ()
    undecided: tuple[str, ...] = ()
    reason: str = ""


def evaluate(rulesets: Sequence[Ruleset], flows: Sequence[Flow]) -> list[FlowVerdict]:
    """One verdict per flow, in order."""
    raise NotImplementedError
