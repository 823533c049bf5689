"""A native nft table read over netlink, lazily: its chains' heads (hooks, priorities,
policies) come from ``nft -j list chains``; a chain's rules are fetched when an analysis
first asks for the chain (one ``NFT_MSG_GETRULE`` dump of that chain), a named set's elements
when a rule first needs them, an anonymous set's when a rule that holds it is decoded. The
rules become the same ``NftRule``s ``parse_nft_json`` makes from ``nft -j`` output.

Why: nft 1.0.6 fetches the elements of every set of a table for any command that touches
it, and kube-proxy's nftables mode holds one anonymous verdict map per Service: with 10,000
Services any nft command on its table costs about 2.7 s of CPU, while the flows need a few
dozen chains. A chain, set or element this reader does not understand (or a netlink error)
raises ``NetlinkFallback``: the caller then reads the table with ``nft -j`` (never a guess).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from collectors.netfilter.model import Chain, Table
from collectors.netfilter.nft import NFT_FAMILY_LABEL, chain_from_json, rule_from_json
from collectors.netfilter.nft_netlink_rules import decode_rule
from collectors.netfilter.nft_netlink_sets import SetHead, decode_elements, decode_set_head
from collectors.netfilter.nft_netlink_state import SetInfo
from collectors.netfilter.nft_netlink_types import NetlinkFallback, NotUnderstood
from collectors.netfilter.nft_socket import NftDumps


class _Reader:
    """The netlink reads of one table, each done once."""

    def __init__(self, dumps: NftDumps, family: str, table: str, reads: list[str]) -> None:
        self.dumps = dumps
        self.family = family
        self.table = table
        self.heads: dict[str, SetHead] = {}
        self.anonymous: dict[str, tuple[Any, ...]] = {}
        #: The chains and sets read, in order (what a run cost).
        self.read = reads

    def fail(self, why: str) -> NetlinkFallback:
        return NetlinkFallback(self.family, self.table, why)

    def head(self, name: str) -> SetHead:
        if name not in self.heads:
            try:
                found = self.dumps.set_head(self.family, self.table, name)
                if len(found) != 1:
                    raise self.fail(f"set {name}: {len(found)} answers")
                self.heads[name] = decode_set_head(found[0])
            except (OSError, NotUnderstood) as error:
                raise self.fail(f"set {name}: {error}") from error
        return self.heads[name]

    def elements(self, name: str) -> list[Any]:
        head = self.head(name)
        self.read.append(f"{self.family} {self.table} set {name}")
        try:
            return decode_elements(head, self.dumps.elements(self.family, self.table, name))
        except (OSError, NotUnderstood) as error:
            raise self.fail(f"elements of set {name}: {error}") from error

    def set_info(self, name: str) -> SetInfo:
        head = self.head(name)
        if not head.anonymous:
            return head.info()
        if name not in self.anonymous:
            self.anonymous[name] = tuple(self.elements(name))
        return head.info(self.anonymous[name])

    def rules(self, name: str) -> list[dict[str, Any]]:
        self.read.append(f"{self.family} {self.table} chain {name}")
        try:
            found = self.dumps.rules(self.family, self.table, name)
            return [decode_rule(data, self.set_info) for data in found]
        except (OSError, NotUnderstood) as error:
            raise self.fail(f"chain {name}: {error}") from error


class NetlinkSets(dict[str, list[Any]]):
    """A table's named sets and maps, each read when first asked for."""

    def __init__(self, reader: _Reader) -> None:
        super().__init__()
        self._reader = reader

    def __missing__(self, name: str) -> list[Any]:
        elements = self._reader.elements(name)
        self[name] = elements
        return elements

    def get(self, name: str, default: Any = None) -> Any:
        return self[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None


class NetlinkChains(dict[str, Chain]):
    """A table's chains: the heads known, the rules read when a chain is first asked for.
    Iterating reads them all (the analyses ask by name, and for the base chains)."""

    def __init__(self, reader: _Reader, heads: Mapping[str, Chain], sets: NetlinkSets) -> None:
        super().__init__()
        self._reader = reader
        self._heads = dict(heads)
        self._sets = sets

    def __missing__(self, name: str) -> Chain:
        head = self._heads.get(name)
        if head is None:
            raise KeyError(name)
        chain = Chain(head.name, head.policy, hook=head.hook, handle=head.handle)
        chain.priority, chain.type = head.priority, head.type
        for position, body in enumerate(self._reader.rules(name), 1):
            chain.rules.append(rule_from_json(body, position, self._sets))
        self[name] = chain
        return chain

    def get(self, name: str, default: Chain | None = None) -> Chain | None:  # type: ignore[override]
        return self[name] if name in self._heads else default

    def __contains__(self, name: object) -> bool:
        return name in self._heads

    def hooked(self) -> list[Chain]:
        """The base chains (read now)."""
        return [self[name] for name, head in self._heads.items() if head.hook is not None]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._heads))

    def __len__(self) -> int:
        return len(self._heads)

    def values(self) -> Any:
        return [self[name] for name in self._heads]

    def items(self) -> Any:
        return [(name, self[name]) for name in self._heads]


def netlink_table(
    family: str,
    name: str,
    chains: list[Mapping[str, Any]],
    dumps: NftDumps,
    reads: list[str] | None = None,
) -> Table:
    """The table ``family`` (nft's keyword) ``name`` whose chains ``nft -j list chains``
    showed (``chains``: their JSON objects), read through ``dumps``; each chain and set read
    is appended to ``reads`` ("ip kube-proxy chain services")."""
    reader = _Reader(dumps, family, name, reads if reads is not None else [])
    table = Table(NFT_FAMILY_LABEL.get(family, family), "nft", name)
    sets = NetlinkSets(reader)
    heads = {str(c.get("name", "")): chain_from_json(c) for c in chains}
    table.chains = NetlinkChains(reader, heads, sets)
    table.sets = sets
    return table
