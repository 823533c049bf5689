"""nf_tables netlink answers recorded and played back (tests/vectors/firewall/netlink): the
``NftDumps`` of ``collectors.netfilter.nft_socket`` without a kernel."""

from __future__ import annotations

import json
from pathlib import Path

from collectors.netfilter.nft_socket import NftDumps


class Recorded:
    """Answers saved by ``Recorder`` (a JSON file: request key → hex of each message)."""

    def __init__(self, path: Path) -> None:
        self.answers: dict[str, list[str]] = json.loads(path.read_text())
        self.asked: list[str] = []

    def _get(self, *key: str) -> list[bytes]:
        name = " ".join(key)
        self.asked.append(name)
        if name not in self.answers:
            raise OSError(2, f"not recorded: {name}")
        return [bytes.fromhex(h) for h in self.answers[name]]

    def rules(self, family: str, table: str, chain: str) -> list[bytes]:
        return self._get("rules", family, table, chain)

    def set_head(self, family: str, table: str, name: str) -> list[bytes]:
        return self._get("set", family, table, name)

    def elements(self, family: str, table: str, name: str) -> list[bytes]:
        return self._get("elements", family, table, name)

    def chain(self, family: str, table: str, name: str) -> list[bytes]:
        return self._get("chain", family, table, name)

    def generation(self) -> int:
        return 1  # recorded answers do not change

    def close(self) -> None:
        pass


class Recorder:
    """Records what ``dumps`` answers, for ``Recorded``."""

    def __init__(self, dumps: NftDumps) -> None:
        self.dumps = dumps
        self.answers: dict[str, list[str]] = {}

    def _keep(self, key: str, found: list[bytes]) -> list[bytes]:
        self.answers[key] = [m.hex() for m in found]
        return found

    def rules(self, family: str, table: str, chain: str) -> list[bytes]:
        return self._keep(f"rules {family} {table} {chain}", self.dumps.rules(family, table, chain))

    def set_head(self, family: str, table: str, name: str) -> list[bytes]:
        return self._keep(f"set {family} {table} {name}", self.dumps.set_head(family, table, name))

    def elements(self, family: str, table: str, name: str) -> list[bytes]:
        found = self.dumps.elements(family, table, name)
        return self._keep(f"elements {family} {table} {name}", found)

    def chain(self, family: str, table: str, name: str) -> list[bytes]:
        found = self.dumps.chain(family, table, name)
        return self._keep(f"chain {family} {table} {name}", found)

    def generation(self) -> int:
        return self.dumps.generation()

    def close(self) -> None:
        self.dumps.close()
