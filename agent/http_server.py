"""A bounded HTTP/1.1 server: one thread multiplexes every connection (``selectors``), a
fixed pool of handler threads runs the slow requests; nothing grows with the number of clients.

- Connections cost a socket and a small record, no thread (with TLS, no TLS state either
  until their first bytes arrive). At most ``max_connections`` are held; a new one beyond
  that closes an unanswered one (``_evict_one``: idle ones first, then the quiet longest).
- A request head must arrive (TLS handshake included) within ``read_timeout`` seconds of the
  connection, and the answer must be taken by the client within ``write_timeout`` seconds,
  else the connection is closed.
- Requests for the ``pooled`` paths (``/metrics``) go to ``handlers`` threads; at most
  ``max_requests`` of them are queued, running or being written at once; when all are taken a
  new one takes the slot of an answer not read for a second, else gets 503. Every
  other path (``/healthz``, ``/readyz``, 404s) is answered by the loop itself at once, so the
  kubelet's probes are answered whatever ``/metrics`` is doing.
- Out of file descriptors (EMFILE/ENFILE), a connection is closed the same way to make room;
  with none to close the listener pauses for a moment (logged, at most once a minute).
- One request per connection (``Connection: close``)."""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from agent.http_wire import (
    MAX_HEAD,
    BadRequest,
    WsgiApp,
    environ_for,
    head_end,
    parse_head,
    run_app,
    simple_response,
)

log = logging.getLogger(__name__)

IDLE_POLL = 60.0
"""Longest sleep of the loop when no deadline is near (it is woken for stop and answers)."""
ACCEPTS_PER_ROUND = 256
"""Fewer than ``max_connections``: a new connection is read before it can be evicted."""
PAUSE_WHEN_OUT_OF_FDS = 0.1
SLOW_READER = 1.0
"""Seconds after which a client still taking its ``/metrics`` answer may lose it to a new
request when every request slot is taken (a scraper reads its answer in milliseconds)."""
SILENT_GRACE = 1.0
"""Seconds after which a connection that has sent nothing is idle, not a client being slow."""
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
_RECV = 4096
_SEND = 64 * 1024


@dataclass(frozen=True)
class Limits:
    handlers: int = 4
    """Threads answering ``/metrics`` (the prometheus_client exposition: CPU-bound)."""
    max_requests: int = 40
    """``/metrics`` requests queued, running or being written at once (node_exporter's
    ``--web.max-requests``); more are answered 503."""
    max_connections: int = 512
    """Connections held at once; a new one beyond closes the oldest not yet answered."""
    read_timeout: float = 10.0
    """Seconds from accept to a complete request head (TLS handshake included)."""
    write_timeout: float = 10.0
    """Seconds for the client to take the whole answer."""


DEFAULT_LIMITS = Limits()


@dataclass
class Stats:
    """What the server did to clients, for tests, the bench and the debug log."""

    accepted: int = 0
    answered: int = 0
    read_timeouts: int = 0
    write_timeouts: int = 0
    evicted: int = 0
    busy: int = 0
    bad: int = 0
    tls_failures: int = 0
    out_of_fds: int = 0
    open_now: int = 0
    """Connections held now."""
    in_pool: int = 0
    """``/metrics`` requests queued, running or being written now."""


class _Conn:
    __slots__ = ("closed", "deadline", "fd", "handshaken", "head", "out", "peer", "pooled",
                 "round", "sent", "sock", "tls")  # fmt: skip

    def __init__(
        self, sock: socket.socket, peer: str, deadline: float, tls: ssl.SSLContext | None, turn: int
    ) -> None:
        self.sock = sock
        self.round = turn
        """The loop round that accepted it: it is not evicted before the next round read it."""
        self.fd = sock.fileno()
        """The key in the server's tables, whatever happens to the socket object."""
        self.closed = False
        self.peer = peer
        self.deadline = deadline
        self.tls = tls
        """The context to wrap the socket in when its first bytes arrive (then None): a
        connection that sends nothing costs no TLS state."""
        self.handshaken = tls is None
        self.head = bytearray()
        self.out = b""
        self.sent = 0
        self.pooled = False


_TLS_HANDSHAKE = b"\x16"
"""The content type of the record that opens every TLS connection."""
_LISTENER = object()
_WAKER = object()


class BoundedHttpServer:
    """Serves a WSGI app; ``tls`` gives the SSL context to use now (None: plain HTTP)."""

    def __init__(
        self,
        host: str,
        port: int,
        app: WsgiApp,
        *,
        pooled: frozenset[str] = frozenset({"/metrics"}),
        limits: Limits = DEFAULT_LIMITS,
        tls: Callable[[], ssl.SSLContext | None] = lambda: None,
    ) -> None:
        self._app = app
        self._pooled = pooled
        self.limits = limits
        self._tls = tls
        self.stats = Stats()
        self._listener = _listen(host, port)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._waker_r, self._waker_w = socket.socketpair()
        for sock in (self._listener, self._waker_r, self._waker_w):
            sock.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._waker_r, selectors.EVENT_READ, _WAKER)
        self._reading: dict[int, _Conn] = {}  # accept order = deadline order
        # The unanswered again, split for eviction: those that have sent nothing (accept order)
        # and those that have (least recently active first).
        self._silent: dict[int, _Conn] = {}
        self._activity: collections.OrderedDict[int, _Conn] = collections.OrderedDict()
        self._writing: dict[int, _Conn] = {}  # answer order = deadline order
        self._jobs: queue.SimpleQueue[tuple[_Conn, dict[str, Any]] | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[_Conn, bytes]] = collections.deque()
        self._paused_until = 0.0
        self._round = 0
        self._last_fd_warning = -1e9
        self._stopping = False
        self._workers = [
            threading.Thread(target=self._work, name=f"http-handler-{i}", daemon=True)
            for i in range(limits.handlers)
        ]
        self.thread = threading.Thread(target=self._loop, name="http", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        for worker in self._workers:
            worker.start()
        self.thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self.thread.is_alive():
            self.thread.join(5)
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            if worker.is_alive():
                worker.join(1)
        self._close_all()

    def _close_all(self) -> None:
        for conn in [*self._reading.values(), *self._writing.values()]:
            self._close(conn)
        self._selector.close()
        for sock in (self._listener, self._waker_r, self._waker_w):
            sock.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (already woken) or closed
            self._waker_w.send(b"\0")

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while not self._stopping:
            try:
                events = self._selector.select(self._next_timeout())
            except OSError:  # closed under us at stop
                return
            self._round += 1
            accept = False
            for key, _ in events:
                if key.data is _LISTENER:
                    accept = True  # after the others: last round's newcomers are read first
                elif key.data is _WAKER:
                    self._drain_waker()
                elif key.data.closed:
                    continue  # closed earlier in this round
                elif key.data.out:
                    self._send(key.data)
                else:
                    self._receive(key.data)
            if accept:
                self._accept()
            self._take_answers()
            self._expire(time.monotonic())

    def _next_timeout(self) -> float:
        deadlines = [
            conns[next(iter(conns))].deadline for conns in (self._reading, self._writing) if conns
        ]
        if self._paused_until:
            deadlines.append(self._paused_until)
        if not deadlines:
            return IDLE_POLL
        return max(0.0, min(deadlines) - time.monotonic())

    def _expire(self, now: float) -> None:
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        for conns, what in ((self._reading, "read"), (self._writing, "write")):
            while conns:
                conn = conns[next(iter(conns))]
                if conn.deadline > now:
                    break
                if what == "read":
                    self.stats.read_timeouts += 1
                else:
                    self.stats.write_timeouts += 1
                log.debug("http: %s timed out (%s)", conn.peer, what)
                self._close(conn)

    # ------------------------------------------------------------------ accepting

    def _accept(self) -> None:
        for _ in range(min(ACCEPTS_PER_ROUND, max(1, self.limits.max_connections // 2))):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._out_of_fds(error)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            self.stats.accepted += 1
            self._admit(sock, str(peer[0]))

    def _admit(self, sock: socket.socket, peer: str) -> None:
        if self.stats.open_now >= self.limits.max_connections and not self._evict_one():
            sock.close()
            return
        sock.setblocking(False)
        deadline = time.monotonic() + self.limits.read_timeout
        conn = _Conn(sock, peer, deadline, self._tls(), self._round)
        self._reading[conn.fd] = conn
        self._silent[conn.fd] = conn
        self.stats.open_now += 1
        self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict_one(self) -> bool:
        """Make room for a newcomer by closing an unanswered connection, never one accepted in
        this round (the loop has not read it yet):

        - the oldest that has sent nothing, if silent for SILENT_GRACE seconds or if silent
          ones are the majority (a connection flood: whoever has sent bytes is kept, e.g. a
          scraper in the middle of a TLS handshake);
        - else the one quiet the longest among those that have sent bytes (slowloris): a
          young silent one may be a scraper not yet scheduled to send its request."""
        silent = self._first(self._silent)
        if silent is not None and (
            silent.deadline - self.limits.read_timeout <= time.monotonic() - SILENT_GRACE
            or 2 * len(self._silent) >= len(self._reading)
        ):
            return self._evict(silent)
        chosen = self._first(self._activity) or silent
        return self._evict(chosen) if chosen is not None else False

    def _first(self, conns: dict[int, _Conn]) -> _Conn | None:
        if not conns:
            return None
        oldest = conns[next(iter(conns))]
        return oldest if oldest.round < self._round else None

    def _evict(self, conn: _Conn) -> bool:
        self.stats.evicted += 1
        self._close(conn)
        return True

    def _out_of_fds(self, error: OSError) -> None:
        self.stats.out_of_fds += 1
        now = time.monotonic()
        if now - self._last_fd_warning >= 60:
            self._last_fd_warning = now
            log.warning(
                "http: cannot accept a connection (%s); closing the oldest unanswered one",
                error.strerror,
            )
        if not self._evict_one():
            self._selector.unregister(self._listener)
            self._paused_until = now + PAUSE_WHEN_OUT_OF_FDS

    # ------------------------------------------------------------------ reading a request

    def _receive(self, conn: _Conn) -> None:
        if self._silent.pop(conn.fd, None) is not None:
            self._activity[conn.fd] = conn
        elif conn.fd in self._activity:
            self._activity.move_to_end(conn.fd)
        if conn.tls is not None and not self._wrap(conn, conn.tls):
            return
        try:
            if not conn.handshaken:
                assert isinstance(conn.sock, ssl.SSLSocket)
                conn.sock.do_handshake()
                conn.handshaken = True
            while len(conn.head) <= MAX_HEAD:
                data = conn.sock.recv(_RECV)
                if not data:
                    self._close(conn)  # the client went away
                    return
                start = len(conn.head)
                conn.head += data
                end = head_end(conn.head, start)
                if end >= 0:
                    self._dispatch(conn, bytes(conn.head[:end]))
                    return
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
            return
        except (BlockingIOError, ssl.SSLWantReadError):
            self._want(conn, selectors.EVENT_READ)
            return
        except ssl.SSLError as error:
            self.stats.tls_failures += 1
            log.debug("http: TLS with %s failed: %s", conn.peer, error)
            self._close(conn)
            return
        except OSError:
            self._close(conn)
            return
        self._answer(conn, simple_response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE))

    def _wrap(self, conn: _Conn, context: ssl.SSLContext) -> bool:
        """Wrap a TLS connection's socket once its first byte is there, if that byte starts a
        TLS handshake record (plain HTTP or garbage costs no TLS state)."""
        try:
            first = conn.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            first = b""
        if first != _TLS_HANDSHAKE:
            if first:
                self.stats.tls_failures += 1
            self._close(conn)
            return False
        conn.tls = None
        self._selector.unregister(conn.sock)
        try:
            conn.sock = context.wrap_socket(
                conn.sock, server_side=True, do_handshake_on_connect=False
            )
        except (OSError, ValueError):
            self._close(conn)
            return False
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        return True

    def _dispatch(self, conn: _Conn, head: bytes) -> None:
        try:
            request = parse_head(head)
        except BadRequest as error:
            self.stats.bad += 1
            log.debug("http: %s: %s", conn.peer, error)
            self._answer(conn, simple_response(HTTPStatus.BAD_REQUEST))
            return
        scheme = "https" if isinstance(conn.sock, ssl.SSLSocket) else "http"
        environ = environ_for(request, self.address, conn.peer, scheme)
        if isinstance(conn.sock, ssl.SSLSocket):
            environ["nodediag.client_cert"] = bool(conn.sock.getpeercert())
        if environ["PATH_INFO"] not in self._pooled:
            self._answer(conn, self._run(environ))
            return
        if self.stats.in_pool >= self.limits.max_requests and not self._drop_slow_reader():
            self.stats.busy += 1
            busy = simple_response(HTTPStatus.SERVICE_UNAVAILABLE, ("Retry-After", "1"))
            self._answer(conn, busy)
            return
        del self._reading[conn.fd]
        self._activity.pop(conn.fd, None)
        self._silent.pop(conn.fd, None)
        self._selector.unregister(conn.sock)
        conn.pooled = True
        self.stats.in_pool += 1
        self._jobs.put((conn, environ))

    def _drop_slow_reader(self) -> bool:
        """Close the ``/metrics`` answer longest in writing if its client has not taken it for
        SLOW_READER seconds: clients that do not read must not hold every request slot."""
        cutoff = time.monotonic() - SLOW_READER + self.limits.write_timeout
        for conn in self._writing.values():
            if conn.deadline > cutoff:
                return False  # answer order: the rest are younger
            if conn.pooled:
                self.stats.write_timeouts += 1
                self._close(conn)
                return True
        return False

    def _run(self, environ: dict[str, Any]) -> bytes:
        try:
            return run_app(self._app, environ)
        except Exception:
            log.exception("http: answering %s failed", environ.get("PATH_INFO"))
            return simple_response(HTTPStatus.INTERNAL_SERVER_ERROR)

    # ------------------------------------------------------------------ the handler pool

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            conn, environ = job
            self._done.append((conn, self._run(environ)))
            self._wake()

    def _drain_waker(self) -> None:
        try:
            while self._waker_r.recv(4096):
                pass
        except OSError:
            pass

    def _take_answers(self) -> None:
        while self._done:
            conn, answer = self._done.popleft()
            self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
            self._start_writing(conn, answer)

    # ------------------------------------------------------------------ writing the answer

    def _answer(self, conn: _Conn, answer: bytes) -> None:
        del self._reading[conn.fd]
        self._activity.pop(conn.fd, None)
        self._silent.pop(conn.fd, None)
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._start_writing(conn, answer)

    def _start_writing(self, conn: _Conn, answer: bytes) -> None:
        self.stats.answered += 1
        conn.head = bytearray()
        conn.out = answer
        conn.deadline = time.monotonic() + self.limits.write_timeout
        self._writing[conn.fd] = conn
        self._send(conn)

    def _send(self, conn: _Conn) -> None:
        try:
            while conn.sent < len(conn.out):
                conn.sent += conn.sock.send(conn.out[conn.sent : conn.sent + _SEND])
        except (BlockingIOError, ssl.SSLWantWriteError):
            self._want(conn, selectors.EVENT_WRITE)
            return
        except ssl.SSLWantReadError:  # TLS may need the peer's bytes to go on writing
            self._want(conn, selectors.EVENT_READ)
            return
        except OSError:
            pass  # the client went away
        else:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        self._close(conn)

    def _want(self, conn: _Conn, events: int) -> None:
        """Wait for ``events`` on the connection (TLS may swap reading and writing)."""
        if self._selector.get_key(conn.sock).events != events:
            self._selector.modify(conn.sock, events, conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        for table in (self._reading, self._silent, self._activity, self._writing):
            table.pop(conn.fd, None)
        if conn.pooled:
            conn.pooled = False
            self.stats.in_pool -= 1
        # A pooled connection is not registered while a handler works on it.
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        self.stats.open_now -= 1


def _listen(host: str, port: int) -> socket.socket:
    family, _, _, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
