"""A native nft table read over netlink, lazily: ``nft -j list chains`` says which chains it
has and which are base chains; a chain is read when an analysis first asks for it (its head,
``NFT_MSG_GETCHAIN``, and its rules, one ``NFT_MSG_GETRULE`` dump of that chain), a named
set's elements when a rule first needs them, an anonymous set's when a rule that holds it is
decoded. The rules become the same ``NftRule``s ``parse_nft_json`` makes from ``nft -j``
output. The caller compares the ruleset's generation before and after (the reads are not
one snapshot, as nft's are).

Why: nft 1.0.6 fetches the elements of every set of a table for any command that touches
it, and kube-proxy's nftables mode holds one anonymous verdict map per Service: with 10,000
Services any nft command on its table costs about 2.7 s of CPU, while the flows need a few
dozen chains. A chain, set or element this reader does not understand (or a netlink error)
raises ``NetlinkFallback``: the caller then reads the table with ``nft -j`` (never a guess).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import Any

from pyroute2.netlink.exceptions import NetlinkDecodeError  # type: ignore[import-untyped]

from collectors.netfilter.model import Chain, OnDemand, Table
from collectors.netfilter.nft import NFT_FAMILY_LABEL, chain_from_json, rule_from_json
from collectors.netfilter.nft_netlink_rules import decode_chain, decode_rule
from collectors.netfilter.nft_netlink_sets import SetHead, decode_elements, decode_set_head
from collectors.netfilter.nft_netlink_state import SetInfo
from collectors.netfilter.nft_netlink_types import NetlinkFallback, NotUnderstood
from collectors.netfilter.nft_socket import NftDumps

#: What reading or decoding one chain or set may raise: the table is then read with nft
#: (pyroute2 raises struct.error, IndexError… on a message it cannot parse).
_FAILURES = (
    OSError,
    NotUnderstood,
    ValueError,
    IndexError,
    TypeError,
    AttributeError,
    struct.error,
    NetlinkDecodeError,
)


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
        self.sets: Mapping[str, list[Any]] = {}

    def fail(self, why: str) -> NetlinkFallback:
        return NetlinkFallback(self.family, self.table, why)

    def head(self, name: str) -> SetHead:
        if name not in self.heads:
            try:
                found = self.dumps.set_head(self.family, self.table, name)
                if len(found) != 1:
                    raise self.fail(f"set {name}: {len(found)} answers")
                self.heads[name] = decode_set_head(found[0])
            except FileNotFoundError as error:
                raise KeyError(name) from error
            except _FAILURES as error:
                raise self.fail(f"set {name}: {error}") from error
        return self.heads[name]

    def elements(self, name: str) -> list[Any]:
        head = self.head(name)
        self.read.append(f"{self.family} {self.table} set {name}")
        try:
            return decode_elements(head, self.dumps.elements(self.family, self.table, name))
        except _FAILURES as error:
            raise self.fail(f"elements of set {name}: {error}") from error

    def set_info(self, name: str) -> SetInfo:
        head = self.head(name)
        if not head.anonymous:
            return head.info()
        if name not in self.anonymous:
            self.anonymous[name] = tuple(self.elements(name))
        return head.info(self.anonymous[name])

    def chain(self, name: str) -> dict[str, Any] | None:
        """The chain's head as nft prints it (None: no such chain now)."""
        try:
            found = self.dumps.chain(self.family, self.table, name)
            if len(found) != 1:
                raise self.fail(f"chain {name}: {len(found)} answers")
            return decode_chain(found[0])
        except FileNotFoundError:
            return None
        except _FAILURES as error:
            raise self.fail(f"chain {name}: {error}") from error

    def rules(self, name: str) -> list[dict[str, Any]]:
        self.read.append(f"{self.family} {self.table} chain {name}")
        try:
            found = self.dumps.rules(self.family, self.table, name)
            return [decode_rule(data, self.set_info) for data in found]
        except KeyError as error:
            raise self.fail(f"chain {name}: no set {error}") from error
        except _FAILURES as error:
            raise self.fail(f"chain {name}: {error}") from error


class NetlinkSets(OnDemand[list[Any]]):
    """A table's named sets and maps, each read when first asked for (KeyError: none such)."""

    def __init__(self, reader: _Reader) -> None:
        super().__init__()
        self._reader = reader

    def __missing__(self, name: str) -> list[Any]:
        elements = self._reader.elements(name)
        self[name] = elements
        return elements

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None


class NetlinkChains(OnDemand[Chain]):
    """A table's chains, each read when first asked for: its head (hook, priority, policy)
    and its rules, at that moment (a chain created after ``nft -j list chains`` is found
    too; one listed but deleted since makes the table read with nft). Iterating reads them
    all (the analyses ask by name, and for the base chains)."""

    def __init__(self, reader: _Reader, listed: Mapping[str, bool]) -> None:
        super().__init__()
        self._reader = reader
        #: The chains ``nft -j list chains`` showed: whether each is a base chain.
        self._listed = dict(listed)
        self._absent: set[str] = set()

    def __missing__(self, name: str) -> Chain:
        head = None if name in self._absent else self._reader.chain(name)
        if head is None and name in self._listed:
            raise self._reader.fail(f"chain {name} is gone (the rules changed)")
        if head is None:
            self._absent.add(name)
            raise KeyError(name)
        chain = chain_from_json(head)
        for position, body in enumerate(self._reader.rules(name), 1):
            chain.rules.append(rule_from_json(body, position, self._reader.sets))
        self[name] = chain
        return chain

    def __contains__(self, name: object) -> bool:
        # A listed chain is not read to answer this: a verdict map of 10,000 Services names
        # 10,000 chains, and the evaluator asks about each before it follows a few.
        return name in self._listed or (isinstance(name, str) and self.get(name) is not None)

    def hooked(self) -> list[Chain]:
        """The base chains (read now)."""
        found = (self.get(name) for name, base in self._listed.items() if base)
        return [chain for chain in found if chain is not None and chain.hook is not None]

    def __iter__(self) -> Iterator[str]:
        return iter([name for name in self._listed if name in self])

    def __len__(self) -> int:
        return len(list(iter(self)))


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
    table.sets = reader.sets = NetlinkSets(reader)
    listed = {str(c.get("name", "")): bool(c.get("hook")) for c in chains}
    table.chains = NetlinkChains(reader, listed)
    return table
