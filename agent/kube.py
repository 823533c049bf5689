"""The Kubernetes API connection: config discovery and a small JSON-over-HTTP client.

Config, first match wins (the order of DESIGN.md's CLI contract): ``--kubeconfig``; the
in-cluster service account (``KUBERNETES_SERVICE_HOST`` and its token file); ``$KUBECONFIG``.
``--no-kube`` turns all of it off.

In-cluster, the service-account directory (``token``, ``ca.crt``; default
``/var/run/secrets/kubernetes.io/serviceaccount``, ``$NODEDIAG_SERVICE_ACCOUNT_DIR`` for
tests) is read here, not by the official ``load_incluster_config``: that one sends the token
file as it is, trailing newline included (an invalid header value: every request fails), and
reads a rotated token only once a minute. Kubelet replaces the projected token file as it
rotates the token; :class:`ServiceAccountToken` reads it again once a minute and at once after
a 401 (as client-go's cached token source does).

The official ``kubernetes`` package is imported lazily, only here and only when a cluster is
configured: it costs ~22 MiB RSS (its package ``__init__`` pulls in the config loaders,
``dynamic`` — which imports ``kubernetes_validate`` and ``jsonschema`` — ``stream``,
``informer``, pydantic, …). We use its config loaders (token refresh, exec plugins, client
certificates) and its ``ApiClient`` transport, but never its typed API classes or pydantic
models: bodies are plain dicts, answers plain JSON, so no model schemas are ever built.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from agent.settings import Settings

log = logging.getLogger(__name__)

JSON = dict[str, Any]
REQUEST_TIMEOUT = 10.0
TOKEN_REFRESH_SECONDS = 60.0


class KubeError(Exception):
    """The API server answered with a status other than 2xx."""

    def __init__(
        self, status: int, body: JSON | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        self.status = status
        self.body = body or {}
        self.headers = dict(headers or {})
        self.reason = str(self.body.get("reason") or "")
        self.message = str(self.body.get("message") or f"HTTP {status}")
        super().__init__(f"{status} {self.reason}: {self.message}".replace(" :", ":"))

    @property
    def retry_after(self) -> float | None:
        """Seconds from ``Retry-After`` (or ``details.retryAfterSeconds``), if given."""
        for key, value in self.headers.items():
            if key.lower() == "retry-after":
                try:
                    return max(0.0, float(value))
                except ValueError:
                    return None
        details = self.body.get("details")
        if isinstance(details, dict) and isinstance(details.get("retryAfterSeconds"), int):
            return float(details["retryAfterSeconds"])
        return None


class KubeUnreachable(Exception):
    """No answer: connection refused or dropped, timeout, TLS failure."""


class Api(Protocol):
    """What the event sink and the pod lookup need from the API server."""

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = REQUEST_TIMEOUT,
    ) -> JSON: ...

    def watch(
        self,
        path: str,
        query: Mapping[str, str],
        *,
        timeout: float,
        stop: threading.Event | None = None,
    ) -> Iterator[JSON]: ...


@dataclass(frozen=True)
class KubeConfigSource:
    """Where the connection comes from, for logs: ``in-cluster`` or a kubeconfig path."""

    kind: str
    path: Path | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind} {self.path}"


def config_source(
    settings: Settings, env: Mapping[str, str] | None = None
) -> KubeConfigSource | None:
    """Which config to use; ``None`` when ``--no-kube`` or nothing is configured."""
    env = os.environ if env is None else env
    if settings.no_kube:
        return None
    if settings.kubeconfig is not None:
        return KubeConfigSource("kubeconfig", settings.kubeconfig)
    token = settings.service_account_dir / "token"
    if env.get("KUBERNETES_SERVICE_HOST") and token.exists():
        return KubeConfigSource("in-cluster", settings.service_account_dir)
    if env.get("KUBECONFIG"):
        # Like kubectl, a list of files: the first one that exists.
        paths = [Path(p) for p in env["KUBECONFIG"].split(os.pathsep) if p]
        existing = [p for p in paths if p.exists()]
        return KubeConfigSource("kubeconfig", (existing or paths)[0]) if paths else None
    return None


class ServiceAccountToken:
    """The projected service-account token: surrounding whitespace is not part of it; read
    again every ``refresh`` seconds and after :meth:`reset` (a 401). A failed re-read keeps
    the token already held (kubelet swaps the file atomically; a read can still race it)."""

    def __init__(
        self,
        path: Path,
        refresh: float = TOKEN_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.refresh = refresh
        self._clock = clock
        self._token: str | None = None
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def get(self) -> str:
        """The token; ``KubeUnreachable`` when there is none (missing, empty, malformed)."""
        with self._lock:
            if self._clock() - self._read_at >= self.refresh:
                self._reload()
            assert self._token is not None
            return self._token

    def reset(self) -> bool:
        """Read the file again now; whether the token changed."""
        with self._lock:
            before = self._token
            self._reload()
            return self._token != before

    def _reload(self) -> None:
        try:
            token = self.path.read_text().strip()
            if not token or any(ch.isspace() or not ch.isprintable() for ch in token):
                raise ValueError("empty" if not token else "whitespace or control characters")
        except (OSError, ValueError) as error:
            if self._token is None:
                raise KubeUnreachable(f"service-account token {self.path}: {error}") from error
            log.debug("token %s not read again (%s): keeping the one held", self.path, error)
            return
        self._token = token
        self._read_at = self._clock()


class KubeClient:
    """JSON requests through the official client's ``ApiClient`` (auth, TLS, proxies)."""

    def __init__(
        self,
        api_client: Any,
        source: KubeConfigSource,
        token: ServiceAccountToken | None = None,
    ) -> None:
        self._client = api_client
        self.source = source
        self._token = token
        self._watches = _OpenWatches()

    @property
    def host(self) -> str:
        return str(self._client.configuration.host)

    def close(self) -> None:
        self._client.close()

    def _send(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Any,
        content_type: str,
        timeout: float | tuple[float, float],
    ) -> Any:
        import urllib3

        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            serialized = self._client.param_serialize(
                method=method,
                resource_path=path,
                header_params=headers,
                auth_settings=["BearerToken"],
            )
            _, url, header_params, _, _ = serialized
            if query:
                url += "?" + urlencode(query, quote_via=quote)
            return self._client.rest_client.pool_manager.request(
                method,
                url,
                body=json.dumps(body).encode() if body is not None else None,
                headers=header_params,
                timeout=urllib3.Timeout(connect=min(5.0, _first(timeout)), read=_last(timeout)),
                preload_content=False,
                retries=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeUnreachable(f"{method} {path}: {error}") from error
        except ValueError as error:
            # http.client refuses to send it (e.g. "Invalid header value"): the config is
            # at fault, not the server; retried like an unreachable server, said once.
            raise KubeUnreachable(f"{method} {path} not sent: {error}") from error

    def _unauthorized(self) -> bool:
        """A 401: read the token file again (kubelet may have rotated it); whether a
        different token is now held (worth one more try)."""
        if self._token is None:
            return False
        try:
            return self._token.reset()
        except KubeUnreachable:
            return False

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = REQUEST_TIMEOUT,
    ) -> JSON:
        response = self._send(method, path, query, body, content_type, timeout)
        if response.status == 401 and self._unauthorized():
            _discard(response)
            response = self._send(method, path, query, body, content_type, timeout)
        return self._answer(method, path, response)

    def _answer(self, method: str, path: str, response: Any) -> JSON:
        import urllib3

        try:
            data = response.data
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeUnreachable(f"{method} {path}: {error}") from error
        finally:
            response.release_conn()
        parsed = _parse(data)
        if not 200 <= response.status < 300:
            raise KubeError(response.status, parsed, response.headers)
        return parsed

    def watch(
        self,
        path: str,
        query: Mapping[str, str],
        *,
        timeout: float,
        stop: threading.Event | None = None,
    ) -> Iterator[JSON]:
        """Stream a watch: one decoded watch event per line until the server ends it, or
        ``stop`` is set (a quiet stream would otherwise hold the reader until its timeout)."""
        import urllib3

        response = self._send("GET", path, {**query, "watch": "1"}, None, "application/json",
                              (5.0, timeout))  # fmt: skip
        if stop is not None:
            self._watches.add(response, stop)
        try:
            if not 200 <= response.status < 300:
                if response.status == 401:
                    self._unauthorized()
                raise KubeError(response.status, _parse(response.data), response.headers)
            pending = b""
            for chunk in response.stream(65536, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeUnreachable(f"watch {path}: {error}") from error
        finally:
            self._watches.discard(response)
            response.release_conn()
            response.close()


class _OpenWatches:
    """The client's open watch responses, each shut for reading when its ``stop`` is set (a
    blocked read then returns at once): one thread per ``stop`` event, asleep until then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Any, threading.Event] = {}
        self._waiting: set[threading.Event] = set()

    def add(self, response: Any, stop: threading.Event) -> None:
        with self._lock:
            self._open[response] = stop
            if stop not in self._waiting:
                self._waiting.add(stop)
                threading.Thread(target=self._cut_on, args=(stop,), name="watch-stop",
                                 daemon=True).start()  # fmt: skip
        if stop.is_set():  # set before this watch was listed
            self._cut(stop)

    def discard(self, response: Any) -> None:
        with self._lock:
            self._open.pop(response, None)

    def _cut_on(self, stop: threading.Event) -> None:
        stop.wait()
        self._cut(stop)

    def _cut(self, stop: threading.Event) -> None:
        with self._lock:
            stopped = [response for response, event in self._open.items() if event is stop]
        for response in stopped:
            with contextlib.suppress(OSError, ValueError, RuntimeError):  # already closed
                response.shutdown()


def _discard(response: Any) -> None:
    import urllib3

    try:
        response.drain_conn()
    except (urllib3.exceptions.HTTPError, OSError):
        pass
    finally:
        response.release_conn()


def _first(timeout: float | tuple[float, float]) -> float:
    return timeout[0] if isinstance(timeout, tuple) else timeout


def _last(timeout: float | tuple[float, float]) -> float:
    return timeout[1] if isinstance(timeout, tuple) else timeout


def _parse(data: bytes) -> JSON:
    try:
        parsed = json.loads(data) if data else {}
    except ValueError:
        return {"message": data[:200].decode(errors="replace")}
    return parsed if isinstance(parsed, dict) else {"items": parsed}


def connect(source: KubeConfigSource, env: Mapping[str, str] | None = None) -> KubeClient:
    """Load the config (``kubernetes`` is imported here, lazily). Raises ``KubeUnreachable``
    when the config cannot be loaded (missing file, no token yet, …)."""
    from kubernetes.client import ApiClient, Configuration
    from kubernetes.config import ConfigException, load_kube_config

    configuration = Configuration()
    token: ServiceAccountToken | None = None
    try:
        if source.kind == "in-cluster":
            assert source.path is not None
            token = _in_cluster(configuration, source.path, os.environ if env is None else env)
        else:
            load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(source.path),
                client_configuration=configuration,
                persist_config=False,
            )
    except (ConfigException, OSError, ValueError, TypeError, KeyError) as error:
        raise KubeUnreachable(f"cannot load the {source} config: {error}") from error
    configuration.retries = False  # our callers retry, with backoff
    return KubeClient(ApiClient(configuration), source, token)


def _in_cluster(configuration: Any, directory: Path, env: Mapping[str, str]) -> ServiceAccountToken:
    """What ``load_incluster_config`` sets, from ``directory``, with a token read as kubelet
    rotates it."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeUnreachable("KUBERNETES_SERVICE_HOST or KUBERNETES_SERVICE_PORT is not set")
    ca = directory / "ca.crt"
    if not ca.is_file() or not ca.stat().st_size:
        raise KubeUnreachable(f"in-cluster config: {ca} is missing or empty")
    token = ServiceAccountToken(directory / "token")
    token.get()
    configuration.host = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    configuration.ssl_ca_cert = str(ca)
    configuration.api_key_prefix["BearerToken"] = "Bearer"

    def refresh(config: Any) -> None:
        config.api_key["BearerToken"] = token.get()

    refresh(configuration)
    configuration.refresh_api_key_hook = refresh
    return token


class Connection:
    """One client for the whole agent, made on first use; a failed config load is retried
    on the next call (the kubeconfig or the service-account token may appear later)."""

    def __init__(
        self,
        source: KubeConfigSource,
        connector: Callable[[KubeConfigSource], Api] | None = None,
    ) -> None:
        self.source = source
        self._connector = connector or connect
        self._client: Api | None = None
        self._lock = threading.Lock()

    def client(self) -> Api:
        """The client; ``KubeUnreachable`` when the config cannot be loaded (yet)."""
        with self._lock:
            if self._client is None:
                self._client = self._connector(self.source)
            return self._client

    def describe(self) -> str:
        host = getattr(self._client, "host", None)
        return f"{host} ({self.source})" if host else str(self.source)


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Exponential backoff with jitter: uniformly in [d/2, d], d = min(cap, base·2^attempt)."""
    delay = min(cap, base * float(2 ** min(attempt, 30)))
    return delay / 2 + rand() * delay / 2


class ReconnectBackoff:
    """client-go's reflector backoff (``wait.NewExponentialBackoffManager(800ms, 30s, 2min,
    2.0, 1.0)``): before each new list or watch, wait d + jitter·d, where d starts at
    ``base``, doubles each time up to ``cap``, and goes back to ``base`` when the previous
    wait began more than ``reset_after`` seconds ago (a watch that lasted that long was
    healthy). A watch the server ends at once is so retried in [30, 60) s at most, not at once.
    """

    def __init__(
        self,
        base: float = 0.8,
        cap: float = 30.0,
        reset_after: float = 120.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = lambda: 0.5,
    ) -> None:
        self.base = base
        self.cap = cap
        self.reset_after = reset_after
        self._clock = clock
        self._rand = rand
        self._delay = base
        self._last: float | None = None

    def next(self) -> float:
        now = self._clock()
        if self._last is None or now - self._last > self.reset_after:
            self._delay = self.base
        delay = self._delay
        self._delay = min(self.cap, self._delay * 2)
        self._last = now
        return delay + self._rand() * delay
