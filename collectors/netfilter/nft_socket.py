"""The netlink edge of the nft reader: requests to nf_tables on a ``NETLINK_NETFILTER`` socket
(encoded with pyroute2's message classes), the answers as the raw bytes of each message. Only
reads: one chain's head, a rule dump of one chain, one set's head, one set's elements, the
ruleset's generation."""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, Protocol

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST  # type: ignore[import-untyped]
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES  # type: ignore[import-untyped]
from pyroute2.netlink.nfnetlink.nftsocket import (  # type: ignore[import-untyped]
    NFT_MSG_GETCHAIN,
    NFT_MSG_GETGEN,
    NFT_MSG_GETRULE,
    NFT_MSG_GETSET,
    NFT_MSG_GETSETELEM,
    nft_chain_msg,
    nft_gen_msg,
    nft_rule_msg,
    nft_set_elem_list_msg,
    nft_set_msg,
)

from collectors.dns_probe import run_in_netns

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NFPROTO = {"unspec": 0, "inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}
_HEADER = struct.Struct("=IHHII")


class NftDumps(Protocol):
    """What the nft reader asks the kernel (``family`` is nft's: ip, ip6, inet…); each answer
    is the list of the messages' bytes. OSError when the kernel refuses (ENOENT: no such
    chain or set)."""

    def rules(self, family: str, table: str, chain: str) -> list[bytes]: ...

    def set_head(self, family: str, table: str, name: str) -> list[bytes]: ...

    def elements(self, family: str, table: str, name: str) -> list[bytes]: ...

    def chain(self, family: str, table: str, name: str) -> list[bytes]: ...

    def generation(self) -> int:
        """The ruleset's generation: it changes with every change of any table."""
        ...

    def close(self) -> None: ...


class NftNetlink:
    """nf_tables over a netlink socket of this thread's network namespace, or of ``netns``
    (a name under /run/netns: tests). ``requests`` counts the requests sent."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._socket: socket.socket | None = None
        self._sequence = 0
        self.requests = 0

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def rules(self, family: str, table: str, chain: str) -> list[bytes]:
        attrs = [("NFTA_RULE_TABLE", table), ("NFTA_RULE_CHAIN", chain)]
        return self._ask(nft_rule_msg, NFT_MSG_GETRULE, family, attrs, dump=True)

    def set_head(self, family: str, table: str, name: str) -> list[bytes]:
        attrs = [("NFTA_SET_TABLE", table), ("NFTA_SET_NAME", name)]
        return self._ask(nft_set_msg, NFT_MSG_GETSET, family, attrs, dump=False)

    def elements(self, family: str, table: str, name: str) -> list[bytes]:
        attrs = [("NFTA_SET_ELEM_LIST_TABLE", table), ("NFTA_SET_ELEM_LIST_SET", name)]
        return self._ask(nft_set_elem_list_msg, NFT_MSG_GETSETELEM, family, attrs, dump=True)

    def chain(self, family: str, table: str, name: str) -> list[bytes]:
        attrs = [("NFTA_CHAIN_TABLE", table), ("NFTA_CHAIN_NAME", name)]
        return self._ask(nft_chain_msg, NFT_MSG_GETCHAIN, family, attrs, dump=False)

    def generation(self) -> int:
        found = self._ask(nft_gen_msg, NFT_MSG_GETGEN, "unspec", [], dump=False)
        msg = nft_gen_msg(found[0])
        msg.decode()
        return int(msg.get_attr("NFTA_GEN_ID"))

    def _ask(
        self, kind: Any, command: int, family: str, attrs: list[tuple[str, str]], dump: bool
    ) -> list[bytes]:
        if self._socket is None:
            self._socket = run_in_netns(self._netns, _open)
        self._sequence += 1
        self.requests += 1
        msg = kind()
        msg["nfgen_family"] = NFPROTO[family]
        msg["attrs"] = attrs
        msg["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | command
        msg["header"]["flags"] = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        msg["header"]["sequence_number"] = self._sequence
        msg.encode()
        self._socket.send(msg.data)
        return self._answers(dump)

    def _answers(self, dump: bool) -> list[bytes]:
        assert self._socket is not None
        found: list[bytes] = []
        while True:
            data = self._socket.recv(1 << 20)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _flags, sequence, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise OSError("netlink: a message shorter than its header")
                message = data[offset : offset + length]
                offset += (length + 3) & ~3
                if sequence != self._sequence:
                    continue  # an answer to an earlier request that was given up
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", message, _HEADER.size)
                    if code == 0:
                        return found
                    raise OSError(-code, f"nf_tables: {os.strerror(-code)}")
                found.append(message)
                if not dump:
                    return found


def _open() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    return sock
