"""A tiny authoritative DNS test host: answers A queries over UDP and TCP.

Run it inside a test's own network namespace, e.g.
``ip netns exec SRV python tests/dns_test_server.py --address 10.250.0.2 --ready FILE``.
It answers the A query for ``--zone-name`` with ``--answer`` and every other name with
NXDOMAIN; it writes ``FILE`` once both sockets listen and runs until killed.

Written independently of ``collectors.dns_probe`` so the probe is not tested against itself.
"""

from __future__ import annotations

import argparse
import socket
import struct
import threading
from pathlib import Path


def _question_end(message: bytes) -> int:
    """Offset just past the first question (name, QTYPE, QCLASS)."""
    offset = 12
    while message[offset] != 0:
        offset += 1 + message[offset]
    return offset + 1 + 4


def _name(message: bytes) -> str:
    labels, offset = [], 12
    while message[offset] != 0:
        length = message[offset]
        labels.append(message[offset + 1 : offset + 1 + length].decode("ascii"))
        offset += 1 + length
    return ".".join(labels).lower()


def answer(query: bytes, zone_name: str, address: str) -> bytes | None:
    if len(query) < 12:
        return None
    query_id, flags, qdcount = struct.unpack_from("!HHH", query)
    if flags & 0x8000 or qdcount != 1:
        return None
    end = _question_end(query)
    question = query[12:end]
    qtype, qclass = struct.unpack_from("!HH", query, end - 4)
    found = _name(query) == zone_name.rstrip(".").lower()
    # QR, opcode 0, AA, RD copied, RA; rcode NOERROR or NXDOMAIN
    response_flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | (0 if found else 3)
    records = b""
    if found and qtype == 1 and qclass == 1:
        # name as a pointer to the question (offset 12), A, IN, TTL 30, 4 bytes
        records = struct.pack("!HHHIH", 0xC00C, 1, 1, 30, 4) + socket.inet_aton(address)
    header = struct.pack("!HHHHHH", query_id, response_flags, 1, 1 if records else 0, 0, 0)
    return header + question + records


def _logged(log: Path | None, what: str) -> None:
    if log is not None:
        with log.open("a") as out:
            out.write(what + "\n")


def serve_udp(sock: socket.socket, zone_name: str, address: str, log: Path | None) -> None:
    while True:
        data, peer = sock.recvfrom(4096)
        _logged(log, f"udp {peer[0]}")
        response = answer(data, zone_name, address)
        if response is not None:
            sock.sendto(response, peer)


def serve_tcp_client(conn: socket.socket, zone_name: str, address: str) -> None:
    with conn:
        while True:
            prefix = conn.recv(2, socket.MSG_WAITALL)
            if len(prefix) < 2:
                return
            (length,) = struct.unpack("!H", prefix)
            data = conn.recv(length, socket.MSG_WAITALL)
            response = answer(data, zone_name, address)
            if response is None:
                return
            conn.sendall(struct.pack("!H", len(response)) + response)


def serve_tcp(sock: socket.socket, zone_name: str, address: str, log: Path | None) -> None:
    while True:
        conn, peer = sock.accept()
        _logged(log, f"tcp {peer[0]}")
        threading.Thread(
            target=serve_tcp_client, args=(conn, zone_name, address), daemon=True
        ).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True, help="address to listen on")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--zone-name", default="kubernetes.default.svc.cluster.local")
    parser.add_argument("--answer", default="10.43.0.1", help="the A record's address")
    parser.add_argument("--ready", type=Path, required=True, help="file written when listening")
    parser.add_argument(
        "--log", type=Path, help="a line per UDP query and per TCP connection accepted"
    )
    args = parser.parse_args()

    family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((args.address, args.port))
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((args.address, args.port))
    tcp.listen(16)
    serving = (tcp, args.zone_name, args.answer, args.log)
    threading.Thread(target=serve_tcp, args=serving, daemon=True).start()
    args.ready.write_text("ready\n")
    serve_udp(udp, args.zone_name, args.answer, args.log)


if __name__ == "__main__":
    main()
