"""Fill the calling thread's network namespace's conntrack table with real entries.

``nf_conntrack_max`` is one global limit (read-only outside the initial namespace on this
kernel) checked against each namespace's own count, so a test namespace holding ``max``
entries is full while the host's table is not. Entries are made the way ``conntrack -I``
makes them — IPCTNL_MSG_CT_NEW over ctnetlink — but many per ``send`` (``conntrack -I`` costs
a process per entry). They are UDP, ASSURED|SEEN_REPLY, with a long timeout: the kernel may
not evict them early (``early_drop`` only takes unassured entries), so the next new flow is
dropped with "table full, dropping packet", as on a node full of live flows.
"""

from __future__ import annotations

import os
import socket
import struct

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_TIMEOUT = 1, 2, 3, 7
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 1 << 1, 1 << 2, 1 << 3
SERVER = "10.254.0.1"
PORTS = 60000
BATCH = 256


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    length = 4 + len(payload)
    pad = (4 - length % 4) % 4
    return struct.pack("=HH", length, kind | (NLA_F_NESTED if nested else 0)) + payload + bytes(pad)


def _tuple(kind: int, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    ip = _attr(CTA_TUPLE_IP, _attr(CTA_IP_V4_SRC, src) + _attr(CTA_IP_V4_DST, dst), True)
    proto = _attr(
        CTA_TUPLE_PROTO,
        _attr(CTA_PROTO_NUM, bytes([socket.IPPROTO_UDP]))
        + _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
        + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport)),
        True,
    )
    return _attr(kind, ip + proto, True)


def entry_message(index: int, seq: int, ack: bool) -> bytes:
    """One CT_NEW request: UDP client 10.<index>:port → SERVER:53, assured, 1 h timeout."""
    client = struct.pack("!I", (10 << 24) + (1 << 16) + index // PORTS)
    server = socket.inet_aton(SERVER)
    sport = 1024 + index % PORTS
    body = (
        bytes([socket.AF_INET, 0])
        + struct.pack("!H", 0)  # struct nfgenmsg
        + _tuple(CTA_TUPLE_ORIG, client, server, sport, 53)
        + _tuple(CTA_TUPLE_REPLY, server, client, 53, sport)
        + _attr(CTA_STATUS, struct.pack("!I", IPS_ASSURED | IPS_SEEN_REPLY | IPS_CONFIRMED))
        + _attr(CTA_TIMEOUT, struct.pack("!I", 3600))
    )
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | (NLM_F_ACK if ack else 0)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def _answers(data: bytes) -> list[tuple[int, int]]:
    """(request seq, errno) of each NLMSG_ERROR in ``data`` (errno 0 is an ACK)."""
    found, offset = [], 0
    while offset + 36 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, offset + 16)[0]
            seq = struct.unpack_from("=I", data, offset + 20 + 8)[0]  # the request's header
            found.append((seq, code))
        offset += max((length + 3) & ~3, 16)
    return found


def fill(entries: int) -> int:
    """Add ``entries`` entries in this thread's namespace; returns how many the kernel took
    (it refuses the rest with ENOMEM once the table is full)."""
    made = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12) as sock:  # NETLINK_NETFILTER
        sock.bind((0, 0))
        sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        for start in range(0, entries, BATCH):
            stop = min(start + BATCH, entries)
            batch = b"".join(entry_message(i, i, ack=i == stop - 1) for i in range(start, stop))
            sock.send(batch)
            answers: list[tuple[int, int]] = []
            while not answers or answers[-1][0] != stop - 1:  # the last request is answered last
                answers += _answers(sock.recv(1 << 20))
            refused = sum(1 for _, code in answers if code)
            made += stop - start - refused
            if refused:
                break
    return made


def main() -> None:  # pragma: no cover - manual use: python tests/conntrack_fill.py N
    import sys

    print(fill(int(sys.argv[1])), os.getpid())


if __name__ == "__main__":
    main()
