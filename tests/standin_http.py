"""The API stand-in's HTTP plumbing: a threaded server (HTTPS when given a TLS context)
that tracks its connections, and a handler that answers JSON and chunked watch streams."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import ssl
import threading
import uuid
from typing import TYPE_CHECKING, Any

from standin_validation import JSON

if TYPE_CHECKING:
    from kube_standin import KubeStandin

# --------------------------------------------------------------------------- HTTP plumbing


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    standin: KubeStandin
    tls_context: ssl.SSLContext | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (or failed the TLS handshake): nothing to report

    def __init__(self, addr: tuple[str, int], handler: type[_Handler]) -> None:
        super().__init__(addr, handler)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        if self.server.tls_context is not None:  # the handshake on this connection's thread
            self.request = self.server.tls_context.wrap_socket(self.request, server_side=True)
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        try:
            self.server.standin.handle(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

    def send_json(self, status: int, body: JSON, headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Audit-Id", str(uuid.uuid4()))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def drop(self) -> None:
        """Close the socket without answering."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def start_chunked(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True

    def write_chunk(self, obj: JSON) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_chunked(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
