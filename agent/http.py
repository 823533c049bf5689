"""``/metrics``, ``/healthz`` and ``/readyz`` on one small threaded HTTP server.

Only ``GET`` and ``HEAD`` of those three paths are served: any other method is 405 (with
``Allow``), any other path 404; a ``HEAD`` answer carries the headers and no body."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
Check = Callable[[], tuple[bool, str]]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
METHODS = ("GET", "HEAD")
TEXT = ("Content-Type", "text/plain; charset=utf-8")
# serve_forever looks for a shutdown request only between two select() timeouts (0.5 s by
# default: two wake-ups a second on an idle agent); ``stop`` wakes it with a connection.
IDLE_POLL = 60.0


def make_app(registry: CollectorRegistry, healthy: Check, ready: Check) -> Callable[..., Any]:
    served = _routes(registry, healthy, ready)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path not in PATHS:
            start_response("404 Not Found", [TEXT])
            return [b"see /metrics, /healthz, /readyz\n"]
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in METHODS:
            start_response("405 Method Not Allowed", [TEXT, ("Allow", ", ".join(METHODS))])
            return [b"only GET and HEAD\n"]
        body: Iterable[bytes] = served(environ, start_response)
        if method == "HEAD":
            close = getattr(body, "close", None)
            if close is not None:
                close()
            return []
        return body

    return app


def _routes(registry: CollectorRegistry, healthy: Check, ready: Check) -> Callable[..., Any]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            ok, why = (healthy if path == "/healthz" else ready)()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [TEXT])
            return [(why + "\n").encode()]
        # prometheus_client answers GET only (HEAD would be a 405 there).
        result: Iterable[bytes] = metrics_app({**environ, "REQUEST_METHOD": "GET"}, start_response)
        return result

    return app


class HttpServer:
    """Serves the app on a daemon thread; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, host: str, port: int, app: Callable[..., Any]) -> None:
        self._server = make_server(
            host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self.port = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": IDLE_POLL},
            name="http",
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            stopper = threading.Thread(target=self._server.shutdown, daemon=True)
            stopper.start()
            while stopper.is_alive():
                self._poke()
                stopper.join(0.05)
        self._server.server_close()

    def _poke(self) -> None:
        """A connection that ends the server's select() at once."""
        host, port = self._server.server_address[:2]
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(str(host), str(host))
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=1).close()
