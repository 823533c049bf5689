"""kube-proxy's nftables-mode table read piece by piece. Pure.

``table ip kube-proxy`` holds a chain or two per Service and endpoint (tens of thousands on a
big cluster) and maps keyed by every Service; the DNS flows need its base chains, the
``service-ips`` / ``no-endpoint-services`` maps and the DNS Service's own chains. So its chain
names come from ``nft -j list chains``; its base chains are read at once
(``nft -j list chain FAMILY TABLE CHAIN``), every other chain and every named set or map when
the flow evaluator first needs it (``nft -j list set|map FAMILY TABLE NAME``). A chain or set
that cannot be read is as if absent: a jump to it, or a lookup in it, is undecided, so the
flow may be dropped there (never a silent pass).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from collectors.netfilter.model import Chain, Table
from collectors.netfilter.nft import NFT_FAMILY_LABEL, parse_nft_json

#: nft tables read piece by piece (ip and ip6 families).
PIECEWISE_TABLES = frozenset({"kube-proxy"})


def listed_tables(listing: str) -> dict[tuple[str, str], list[tuple[str, bool]]]:
    """``nft -j list chains`` output: each (nft family, table) with its chains, each as
    (name, is a base chain). ValueError when it is not such JSON."""
    tables: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for item in json.loads(listing or "{}").get("nftables", []):
        chain = item.get("chain") if isinstance(item, dict) else None
        if isinstance(chain, dict):
            key = (str(chain.get("family")), str(chain.get("table")))
            tables.setdefault(key, []).append((str(chain.get("name")), bool(chain.get("hook"))))
    return tables


def table_items(text: str, family: str, name: str) -> list[Any]:
    """The items of one table in ``nft -j list …`` output (without metainfo)."""
    items = json.loads(text or "{}").get("nftables", [])
    return [
        item
        for item in items
        if isinstance(item, dict)
        and any(
            isinstance(body, dict)
            and body.get("family") == family
            and body.get("name" if kind == "table" else "table") == name
            for kind, body in item.items()
        )
    ]


def chain_from_json(text: str, family: str, table: Table, name: str) -> Chain | None:
    """Chain ``name`` of ``table`` from ``nft -j list chain`` output; its rules look up
    ``table.sets``. None when the output does not hold it."""
    items = [{"table": {"family": family, "name": table.name}}]
    items += [i for i in table_items(text, family, table.name) if "table" not in i]
    parsed = parse_nft_json(json.dumps({"nftables": items}))
    found = parsed.tables[0].chains.get(name) if parsed.tables else None
    if found is not None:
        for rule in found.rules:
            rule.sets = table.sets  # type: ignore[attr-defined]
    return found


def elements_from_json(text: str, family: str, table: str, name: str) -> list[Any] | None:
    """The elements of set or map ``name`` from ``nft -j list set|map`` output."""
    for item in table_items(text, family, table):
        for kind in ("set", "map"):
            body = item.get(kind)
            if isinstance(body, dict) and body.get("name") == name:
                elements = body.get("elem")
                return elements if isinstance(elements, list) else []
    return None


class FetchedNftChains(dict[str, Chain]):
    """A table's chains, each read when first asked for (``fetch(name)``: the chain, or None
    when it could not be read). ``base_names`` are the base chains; iterating reads every
    chain."""

    def __init__(
        self, names: Sequence[tuple[str, bool]], fetch: Callable[[str], Chain | None]
    ) -> None:
        super().__init__()
        self._names = {name: base for name, base in names}
        self._fetch = fetch

    def __missing__(self, name: str) -> Chain:
        if name not in self._names:
            raise KeyError(name)
        found = self._fetch(name)
        if found is None:
            del self._names[name]
            raise KeyError(name)
        self[name] = found
        return found

    def get(self, name: str, default: Chain | None = None) -> Chain | None:  # type: ignore[override]
        try:
            return self[name]
        except KeyError:
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def base_names(self) -> list[str]:
        return [name for name, base in self._names.items() if base]

    def _all(self) -> None:
        for name in list(self._names):
            self.get(name)

    def __iter__(self) -> Iterator[str]:
        self._all()
        return dict.__iter__(self)

    def __len__(self) -> int:
        return len(self._names)

    def values(self) -> Any:
        self._all()
        return dict.values(self)

    def items(self) -> Any:
        self._all()
        return dict.items(self)


class FetchedSets(dict[str, list[Any]]):
    """A table's named sets and maps, each read when first looked up (``fetch(name)``: its
    elements, or None when it could not be read: then it is as if absent, an undecided
    lookup)."""

    def __init__(self, fetch: Callable[[str], list[Any] | None]) -> None:
        super().__init__()
        self._fetch = fetch
        self._missing: set[str] = set()

    def __missing__(self, name: str) -> list[Any]:
        if name in self._missing:
            raise KeyError(name)
        found = self._fetch(name)
        if found is None:
            self._missing.add(name)
            raise KeyError(name)
        self[name] = found
        return found

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except KeyError:
            return False
        return True


def piecewise_table(
    family: str,
    name: str,
    chains: Sequence[tuple[str, bool]],
    read_chain: Callable[[Table, str], Chain | None],
    read_set: Callable[[str], list[Any] | None],
) -> Table:
    """A table whose chains and sets are read when first needed."""
    table = Table(NFT_FAMILY_LABEL.get(family, family), "nft", name)
    table.sets = FetchedSets(read_set)
    table.chains = FetchedNftChains(chains, lambda chain: read_chain(table, chain))
    return table
