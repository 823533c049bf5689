"""Which native nft tables of a collector run are read over netlink, and their reading: the
connection (opened when first needed: pyroute2 is loaded only then; one per run), the
ruleset's generation the reads started at (iptables-nft's piecewise reads are checked
against it too), the tables made (``nft_netlink_table``) and what they read. The collector
decides what to do when this says no (nft reads the table)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from collectors.netfilter.model import Table
from collectors.pyroute2_import import pyroute2_imports

if TYPE_CHECKING:
    from collectors.netfilter.nft_socket import NftDumps

TableKey = tuple[str, str]
"""(nft family keyword, table name)."""


class NetlinkTables:
    """``opener`` connects to nf_tables (None: never read over netlink); tables of
    ``min_chains`` chains or more are read over netlink."""

    def __init__(self, opener: Callable[[], NftDumps] | None, min_chains: int) -> None:
        self.opener = opener
        self.min_chains = min_chains
        self.dumps: NftDumps | None = None
        self.generation = 0
        #: Why the generation could not be noted in this read (None: noted, or not yet).
        self.error: OSError | None = None
        self._noted = False
        self.enabled = True
        self.tables: dict[TableKey, Table] = {}
        #: What the run read ("ip kube-proxy chain services", "… set …").
        self.reads: list[str] = []

    def start(self, enabled: bool) -> None:
        """A new read of the rules (``enabled``: big tables may go over netlink)."""
        self.enabled = enabled
        self.tables = {}
        self.error = None
        self._noted = False

    def choose(
        self, listed: Sequence[Any], covered: Collection[TableKey]
    ) -> dict[TableKey, list[Any]]:
        """The tables to read over netlink, each with its chains' objects from the items of
        ``nft -j list chains`` (``listed``); ``covered`` are read otherwise."""
        tables: dict[TableKey, list[Any]] = {}
        for item in listed:
            chain = item.get("chain") if isinstance(item, dict) else None
            if isinstance(chain, dict):
                key = (str(chain.get("family")), str(chain.get("table")))
                tables.setdefault(key, []).append(chain)
        return {
            key: chains
            for key, chains in tables.items()
            if key not in covered and len(chains) >= self.min_chains
        }

    def note(self) -> None:
        """Connect (once per run) and note the ruleset's generation, once per read; when
        nf_tables cannot be asked (no CAP_NET_ADMIN…) the error is kept in ``error``."""
        if self._noted:
            return
        self._noted = True
        try:
            if self.dumps is None and self.opener is not None:
                self.dumps = self.opener()
            if self.dumps is None:
                raise OSError("no nf_tables connection")
            self.generation = self.dumps.generation()
        except OSError as error:
            self.error = error
            self.close()

    def open(self) -> None:
        """``note`` (when not yet done in this read); OSError when nf_tables cannot be asked."""
        self.note()
        if self.error is not None:
            raise self.error

    def make(self, chosen: dict[TableKey, list[Any]]) -> list[Table]:
        """The chosen tables, read lazily (``open`` first)."""
        with pyroute2_imports():
            from collectors.netfilter.nft_netlink_table import netlink_table

        assert self.dumps is not None
        self.reads = []
        for (family, name), chains in chosen.items():
            table = netlink_table(family, name, chains, self.dumps, self.reads)
            self.tables[(family, name)] = table
        return list(self.tables.values())

    def unchanged(self) -> bool:
        """Whether the ruleset's generation is still the one the reads started at; OSError
        when it cannot be asked now (that is no change of the rules)."""
        if self.dumps is None:
            raise OSError("no nf_tables connection")
        return bool(self.dumps.generation() == self.generation)

    def close(self) -> None:
        if self.dumps is not None:
            self.dumps.close()
            self.dumps = None
