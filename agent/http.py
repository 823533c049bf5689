"""``/metrics``, ``/healthz`` and ``/readyz``: the WSGI app, served by a bounded server
(agent/http_server.py: a fixed number of threads, deadlines, optional TLS and basic auth).

Only ``GET`` and ``HEAD`` of those three paths are served: any other method is 405 (with
``Allow``), any other path 404; a ``HEAD`` answer carries the headers and no body."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app

from agent.http_server import DEFAULT_LIMITS, IDLE_POLL, BoundedHttpServer, Limits, Stats
from agent.web_config import WebConfig

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
Check = Callable[[], tuple[bool, str]]

__all__ = ["IDLE_POLL", "HttpServer", "Limits", "make_app"]

PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
METHODS = ("GET", "HEAD")
TEXT = ("Content-Type", "text/plain; charset=utf-8")


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
    """Serves the app on a daemon thread; ``port`` is the bound port (useful with port 0).

    With a web configuration, answers go over TLS and ``/metrics`` asks for the configured
    basic-auth users or client certificate; ``/healthz`` and ``/readyz`` ask for neither (the
    kubelet's probes can present neither)."""

    def __init__(
        self,
        host: str,
        port: int,
        app: Callable[..., Any],
        *,
        limits: Limits = DEFAULT_LIMITS,
        web_config: WebConfig | None = None,
    ) -> None:
        if web_config is not None:
            app = web_config.guard(app)
        self._server = BoundedHttpServer(
            host,
            port,
            app,
            limits=limits,
            tls=web_config.tls_context if web_config else lambda: None,
        )
        self.port = self._server.address[1]
        self._thread = self._server.thread

    @property
    def stats(self) -> Stats:
        """What the server did to clients (timeouts, evictions, 503s); read-only use."""
        return self._server.stats

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()
