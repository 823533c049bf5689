"""A live DNS probe from the host network to each cluster DNS server, over UDP and TCP.

Pure part: the DNS wire format of one A query and the header of its response (RFC 1035
4.1.1-4.1.2; nothing else is needed to tell whether a server answered).

I/O part: :class:`DnsProbeCollector`. Each outcome is classified by what the kernel said:

- ``ok``: any DNS response with our id (even NXDOMAIN or SERVFAIL: the server answered);
- ``local_rule``: an immediate ``EPERM`` on send/connect (what an ``OUTPUT … DROP`` gives),
  or an ICMP unreachable generated *by this node* (what an ``OUTPUT … REJECT`` gives: the
  ICMP's offender address, read from the socket error queue, is one of our own addresses);
- ``refused``: an ICMP unreachable or TCP reset from *another* host (the server's host is
  reachable but nothing listens on the port, or a rule beyond this node rejects it), or
  from this node when the server is one of its own addresses (NodeLocal DNSCache, a
  hostNetwork DNS server) and sock_diag shows nothing listening on its port 53;
- ``timeout``: no answer before the deadline: the packet was lost beyond this node;
- ``error``: anything else (no route, a malformed answer, …).

Linux TCP swallows the ``EPERM`` of a locally dropped SYN and retransmits until the connect
times out, so a local DROP of TCP port 53 shows as ``timeout`` on the TCP probe; the UDP probe
and the firewall collector's ``DNSDropRule`` findings are what attribute it.

Network namespaces: with ``netns`` set, each socket is created by a short-lived thread that
entered the namespace (``setns(2)`` changes only the calling thread's namespace) and then
exits; a socket stays in the namespace it was created in, so the collector's own thread
uses it without ever leaving its namespace. :func:`run_in_netns` is that helper.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

from prometheus_client import CollectorRegistry, Gauge, Histogram

from collectors.finding import Finding
from collectors.pyroute2_import import pyroute2_imports
from collectors.registry import CollectorError, SourceLog

log = logging.getLogger(__name__)

DEFAULT_NAME = "kubernetes.default.svc.cluster.local"
DNS_PORT = 53
QTYPE_A = 1
QCLASS_IN = 1
HEADER = struct.Struct("!HHHHHH")
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
UDP_UNCONNECTED = 7  # TCP_CLOSE: the state sock_diag reports for a bound UDP socket
TCP_LISTEN = 10

Protocol = Literal["udp", "tcp"]
Outcome = Literal["ok", "local_rule", "refused", "timeout", "error"]
PROTOCOLS: tuple[Protocol, ...] = ("udp", "tcp")

T = TypeVar("T")


class DnsFormatError(ValueError):
    """Bytes that are not a DNS message (or a name that cannot be encoded)."""


# ---------------------------------------------------------------------------- wire format


@dataclass(frozen=True, slots=True)
class DnsHeader:
    """The fixed 12-byte header of a DNS message."""

    id: int
    is_response: bool
    opcode: int
    rcode: int
    truncated: bool
    questions: int
    answers: int
    authority: int
    additional: int

    @property
    def rcode_name(self) -> str:
        return RCODES.get(self.rcode, f"RCODE{self.rcode}")


def encode_name(name: str) -> bytes:
    """``a.b.c`` as length-prefixed labels ending in the root label (no compression)."""
    labels = [label for label in name.rstrip(".").split(".")] if name.strip(".") else []
    out = bytearray()
    for label in labels:
        try:
            raw = label.encode("ascii")
        except UnicodeEncodeError as error:
            raise DnsFormatError(f"non-ASCII label in {name!r}") from error
        if not 1 <= len(raw) <= 63:
            raise DnsFormatError(f"label {label!r} of {name!r} must be 1-63 bytes")
        out += bytes([len(raw)]) + raw
    out += b"\x00"
    if len(out) > 255:
        raise DnsFormatError(f"{name!r} is longer than 255 bytes encoded")
    return bytes(out)


def build_query(name: str, query_id: int) -> bytes:
    """A standard recursive query (RD set) for the A record of ``name``."""
    if not 0 <= query_id <= 0xFFFF:
        raise ValueError(f"query id {query_id} out of range")
    header = HEADER.pack(query_id, 0x0100, 1, 0, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", QTYPE_A, QCLASS_IN)


def new_query_id() -> int:
    """A random 16-bit id (unpredictable, so a stale or spoofed answer does not match)."""
    return secrets.randbelow(0x10000)


def parse_header(data: bytes) -> DnsHeader:
    """The header of a DNS message; DnsFormatError when ``data`` is too short."""
    if len(data) < HEADER.size:
        raise DnsFormatError(f"{len(data)} bytes is shorter than a DNS header")
    query_id, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    return DnsHeader(
        id=query_id,
        is_response=bool(flags & 0x8000),
        opcode=(flags >> 11) & 0xF,
        rcode=flags & 0xF,
        truncated=bool(flags & 0x0200),
        questions=qd,
        answers=an,
        authority=ns,
        additional=ar,
    )


def is_answer_to(header: DnsHeader, query_id: int) -> bool:
    return header.is_response and header.id == query_id


# ---------------------------------------------------------------------- network namespaces


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def netns_path(netns: str) -> Path:
    """``/run/netns/<name>`` for a name as ``ip netns`` uses it, or the path as given."""
    return Path(netns) if "/" in netns else NETNS_RUN_DIR / netns


def run_in_netns(netns: str | None, func: Callable[[], T]) -> T:
    """``func()`` in network namespace ``netns`` (``None``: here, in this thread).

    Runs in a short-lived thread that enters the namespace and then ends, so the caller's
    thread never changes namespace. Sockets ``func`` creates stay in ``netns``. Never
    creates a namespace: a missing one is an OSError."""
    if netns is None:
        return func()
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result.append(func())
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


# ------------------------------------------------------------------------------- probing


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One query to one server over one protocol."""

    server: str
    protocol: Protocol
    outcome: Outcome
    seconds: float
    rcode: str | None = None
    answers: int | None = None
    error: str | None = None
    """errno name (``EPERM``, ``ECONNREFUSED``, …) or a short description."""
    offender: str | None = None
    """Source address of the ICMP error, when there was one."""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


class _ProbeFailed(Exception):
    def __init__(self, outcome: Outcome, error: str, offender: str | None = None) -> None:
        super().__init__(error)
        self.outcome: Outcome = outcome
        self.error = error
        self.offender = offender


SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)


def parse_error_queue_offender(cmsg_level: int, cmsg_type: int, data: bytes) -> str | None:
    """The offender address of an ICMP error from a ``MSG_ERRQUEUE`` control message."""
    if (cmsg_level, cmsg_type) not in (
        (socket.IPPROTO_IP, IP_RECVERR),
        (socket.IPPROTO_IPV6, IPV6_RECVERR),
    ):
        return None
    if len(data) < _EXTENDED_ERR.size + 8:
        return None
    origin = data[4]
    if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
        return None
    address = data[_EXTENDED_ERR.size :]
    family = struct.unpack_from("=H", address)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, address[4:8])
    if family == socket.AF_INET6 and len(address) >= 24:
        return socket.inet_ntop(socket.AF_INET6, address[8:24])
    return None


def _errno_name(code: int | None) -> str:
    return errno.errorcode.get(code or 0, f"errno {code}")


class DnsProbe:
    """Sends the queries; sockets are made by ``make_socket`` (in a namespace for tests)."""

    def __init__(self, name: str, timeout: float, netns: str | None = None) -> None:
        self.name = name
        self.timeout = timeout
        self.netns = netns

    def _socket(self, family: int, kind: int) -> socket.socket:
        return run_in_netns(self.netns, lambda: socket.socket(family, kind))

    def _is_local_address(self, address: str, family: int) -> bool:
        """Whether ``address`` belongs to this node (in the probe's namespace)."""

        def try_bind() -> bool:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind((address, 0))
                except OSError as error:
                    return error.errno != errno.EADDRNOTAVAIL
                return True

        return run_in_netns(self.netns, try_bind)

    def probe(self, server: str, protocol: Protocol) -> ProbeResult:
        family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
        query_id = new_query_id()
        query = build_query(self.name, query_id)
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
            with self._socket(family, kind) as sock:
                if family == socket.AF_INET:
                    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
                try:
                    if protocol == "udp":
                        header = self._exchange_udp(sock, server, query, query_id, deadline)
                    else:
                        header = self._exchange_tcp(sock, server, query, query_id, deadline)
                except OSError as error:
                    raise self._classify(sock, error, server, protocol) from error
        except _ProbeFailed as failed:
            return ProbeResult(
                server,
                protocol,
                failed.outcome,
                time.monotonic() - started,
                error=failed.error,
                offender=failed.offender,
            )
        except (OSError, DnsFormatError) as error:
            return ProbeResult(
                server, protocol, "error", time.monotonic() - started, error=str(error)
            )
        return ProbeResult(
            server,
            protocol,
            "ok",
            time.monotonic() - started,
            rcode=header.rcode_name,
            answers=header.answers,
        )

    @staticmethod
    def _remaining(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer before the deadline")
        return left

    def _exchange_udp(
        self, sock: socket.socket, server: str, query: bytes, query_id: int, deadline: float
    ) -> DnsHeader:
        sock.settimeout(self._remaining(deadline))
        sock.connect((server, DNS_PORT))
        sock.send(query)
        while True:
            sock.settimeout(self._remaining(deadline))
            data = sock.recv(4096)
            try:
                header = parse_header(data)
            except DnsFormatError:
                continue  # not ours; keep waiting
            if is_answer_to(header, query_id):
                return header

    def _exchange_tcp(
        self, sock: socket.socket, server: str, query: bytes, query_id: int, deadline: float
    ) -> DnsHeader:
        sock.settimeout(self._remaining(deadline))
        sock.connect((server, DNS_PORT))
        sock.settimeout(self._remaining(deadline))
        sock.sendall(struct.pack("!H", len(query)) + query)
        length = struct.unpack("!H", self._read_exactly(sock, 2, deadline))[0]
        header = parse_header(self._read_exactly(sock, length, deadline))
        if not is_answer_to(header, query_id):
            raise DnsFormatError(f"answer with id {header.id}, expected {query_id}")
        return header

    def _read_exactly(self, sock: socket.socket, size: int, deadline: float) -> bytes:
        data = bytearray()
        while len(data) < size:
            sock.settimeout(self._remaining(deadline))
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise DnsFormatError("connection closed before a full answer")
            data += chunk
        return bytes(data)

    def _classify(
        self, sock: socket.socket, error: OSError, server: str, protocol: Protocol
    ) -> _ProbeFailed:
        if isinstance(error, TimeoutError):
            return _ProbeFailed("timeout", "no answer")
        code = error.errno
        name = _errno_name(code)
        if code in (errno.EPERM, errno.EACCES):
            return _ProbeFailed("local_rule", name)
        if code in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            offender = self._icmp_offender(sock)
            if offender is not None:
                return self._classify_icmp(name, offender, server, protocol)
            if code == errno.ECONNREFUSED:
                return _ProbeFailed("refused", name)  # a TCP reset from the server's host
        return _ProbeFailed("error", name)

    def _classify_icmp(
        self, name: str, offender: str, server: str, protocol: Protocol
    ) -> _ProbeFailed:
        """An ICMP error from this node is a local rule, except when the server is this
        node's own address (NodeLocal DNSCache, a hostNetwork DNS server) and nothing
        listens on its port: the kernel's port unreachable then says the server is down."""
        family = socket.AF_INET6 if ipaddress.ip_address(server).version == 6 else socket.AF_INET
        if not self._is_local_address(offender, family):
            return _ProbeFailed("refused", name, offender)
        if offender == server and not self._listening(server, protocol):
            return _ProbeFailed("refused", f"{name}: nothing listens on port 53", offender)
        return _ProbeFailed("local_rule", name, offender)

    def _listening(self, server: str, protocol: Protocol) -> bool:
        """Whether a socket of this node (in the probe's namespace) listens on ``server``
        port 53, or on the wildcard address, read from the kernel with sock_diag."""
        wildcard = {"0.0.0.0", "::"}
        kind = socket.IPPROTO_UDP if protocol == "udp" else socket.IPPROTO_TCP
        state = UDP_UNCONNECTED if protocol == "udp" else TCP_LISTEN

        def bound() -> set[str]:
            with pyroute2_imports():
                from pyroute2 import DiagSocket  # type: ignore[import-untyped]

            with DiagSocket() as diag:
                diag.bind()
                return {
                    str(m["idiag_src"])
                    for family in (socket.AF_INET, socket.AF_INET6)
                    for m in diag.get_sock_stats(family=family, protocol=kind, states=1 << state)
                    if m["idiag_sport"] == DNS_PORT
                }

        canonical = str(ipaddress.ip_address(server))
        return bool(run_in_netns(self.netns, bound) & ({canonical} | wildcard))

    @staticmethod
    def _icmp_offender(sock: socket.socket) -> str | None:
        """The sender of the ICMP error the kernel queued on the socket, if any."""
        try:
            sock.setblocking(False)  # with a timeout set, Python would first poll for input
            _, ancillary, _, _ = sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
        except OSError:
            return None
        for level, kind, data in ancillary:
            offender = parse_error_queue_offender(level, kind, data)
            if offender is not None:
                return offender
        return None


# ------------------------------------------------------------------------------ collector

MEANING: dict[Outcome, str] = {
    "ok": "the server answered",
    "local_rule": "a local firewall rule on this node rejected or dropped it"
    " (see DNSDropRule findings)",
    "refused": "the server's host (or a hop beyond this node) refused it:"
    " nothing answers DNS there, or a remote rule rejects it",
    "timeout": "it timed out beyond this node (lost on the way to the server or back,"
    " e.g. the VXLAN checksum problem, a remote firewall, or a dead DNS pod)",
    "error": "the probe failed for another reason",
}


class DnsProbeCollector:
    """Probes each cluster DNS server over UDP and TCP; ``DNSProbeFailed`` for each failure.

    ``servers`` may raise CollectorError (the cluster DNS is unknown): source
    ``cluster-dns`` failed, nothing probed. No server at all is the same failure."""

    name = "dns_probe"

    def __init__(
        self,
        node: str,
        servers: Callable[[], Sequence[str]],
        registry: CollectorRegistry,
        *,
        name: str = DEFAULT_NAME,
        timeout: float = 2.0,
        netns: str | None = None,
    ) -> None:
        encode_name(name)  # fail early on a name that cannot be queried
        self.node = node
        self.servers = servers
        self.query_name = name
        self.probe = DnsProbe(name, timeout, netns)
        self.success = Gauge(
            "nodediag_dns_probe_success",
            "1 if the DNS server answered the probe from the host network, else 0.",
            ["server", "protocol"],
            registry=registry,
        )
        self.duration = Histogram(
            "nodediag_dns_probe_duration_seconds",
            "Time until the DNS probe got an answer or failed.",
            ["server", "protocol"],
            registry=registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0),
        )
        self._series: set[tuple[str, str]] = set()
        self.sources = SourceLog()

    def _servers(self) -> list[str]:
        try:
            servers = list(dict.fromkeys(self.servers()))
        except CollectorError as error:
            self.sources.failed("cluster-dns", str(error))
            return []
        if servers:
            self.sources.ok("cluster-dns")
        else:
            self.sources.failed("cluster-dns", "no cluster DNS server to probe")
        return servers

    def collect(self) -> list[Finding]:
        self.sources.start()
        servers = self._servers()
        findings: list[Finding] = []
        seen: set[tuple[str, str]] = set()
        for server in servers:
            for protocol in PROTOCOLS:
                result = self.probe.probe(server, protocol)
                labels = (server, protocol)
                seen.add(labels)
                self.success.labels(*labels).set(1 if result.ok else 0)
                self.duration.labels(*labels).observe(result.seconds)
                if not result.ok:
                    findings.append(self._finding(result))
        for stale in self._series - seen:  # servers no longer configured
            self.success.remove(*stale)
            self.duration.remove(*stale)
        self._series = seen
        return findings

    def _finding(self, result: ProbeResult) -> Finding:
        how = f" ({result.error}" + (f" from {result.offender})" if result.offender else ")")
        message = (
            f"DNS query for {self.query_name} to {result.server} over {result.protocol.upper()}"
            f" failed: {result.outcome}{how if result.error else ''} after"
            f" {result.seconds:.3f}s: {MEANING[result.outcome]}"
        )
        return Finding.on_node(
            "DNSProbeFailed",
            self.node,
            message,
            time=datetime.now(UTC),
            details={
                "server": result.server,
                "protocol": result.protocol,
                "outcome": result.outcome,
                "meaning": MEANING[result.outcome],
                "error": result.error,
                "offender": result.offender,
                "seconds": round(result.seconds, 6),
                "query": self.query_name,
            },
        )
