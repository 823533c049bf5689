"""HTTP/1.x on the wire, pure: a request head in, a WSGI environ out; a WSGI answer in, the
bytes of a ``Connection: close`` response out. The server (agent/http_server.py) does the I/O."""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

WsgiApp = Callable[..., Iterable[bytes]]

MAX_HEAD = 16 * 1024
"""A request head (request line and headers) longer than this is answered 431."""
MAX_HEADERS = 100
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(r"^HTTP/1\.[01]$")


class BadRequest(ValueError):
    """The head is not an HTTP/1.x request."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    version: str
    headers: tuple[tuple[str, str], ...]


def head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Index just past the blank line ending the head, or -1 while it is incomplete."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        found = buffer.find(separator, max(0, start - len(separator) + 1))
        if found >= 0:
            return found + len(separator)
    return -1


def parse_head(head: bytes | bytearray) -> Request:
    lines = [line.rstrip("\r") for line in bytes(head).decode("latin-1").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise BadRequest("empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _VERSION.match(parts[2]):
        raise BadRequest(f"bad request line {lines[0][:80]!r}")
    method, target, version = parts
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest("too many headers")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            raise BadRequest(f"bad header line {line[:80]!r}")
        headers.append((name, value.strip(" \t")))
    path, _, query = target.partition("?")
    return Request(method, path, query, version, tuple(headers))


def environ_for(
    request: Request, server: tuple[str, int], peer: str, scheme: str
) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(request.path, "iso-8859-1"),
        "QUERY_STRING": request.query,
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "SERVER_PROTOCOL": request.version,
        "REMOTE_ADDR": peer,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in request.headers:
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def run_app(app: WsgiApp, environ: dict[str, Any]) -> bytes:
    """Call the app and return its whole answer as one ``Connection: close`` response."""
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started[:] = [(status, headers)]
        return lambda data: None  # the legacy write() callable: our apps do not use it

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    status, headers = started[0]
    if environ["REQUEST_METHOD"] != "HEAD" or data:
        headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
        headers.append(("Content-Length", str(len(data))))
    return response_bytes(status, headers, b"" if environ["REQUEST_METHOD"] == "HEAD" else data)


def response_bytes(status: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Date: {formatdate(usegmt=True)}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def simple_response(status: HTTPStatus, *extra: tuple[str, str]) -> bytes:
    """A short plain-text answer the server gives on its own (400, 431, 503)."""
    body = f"{status.phrase}\n".encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    return response_bytes(f"{status.value} {status.phrase}", [*headers, *extra], body)
