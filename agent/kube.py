"""The Kubernetes API connection: config discovery and a small JSON-over-HTTP client.

Config, first match wins (the order of DESIGN.md's CLI contract): ``--kubeconfig``; the
in-cluster service account (``KUBERNETES_SERVICE_HOST`` and its token file); ``$KUBECONFIG``.
``--no-kube`` turns all of it off.

The official ``kubernetes`` package is imported lazily, only here and only when a cluster is
configured: it costs ~22 MiB RSS (its package ``__init__`` pulls in the config loaders,
``dynamic`` — which imports ``kubernetes_validate`` and ``jsonschema`` — ``stream``,
``informer``, pydantic, …). We use its config loaders (token refresh, exec plugins, client
certificates) and its ``ApiClient`` transport, but never its typed API classes or pydantic
models: bodies are plain dicts, answers plain JSON, so no model schemas are ever built.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from agent.settings import Settings

log = logging.getLogger(__name__)

JSON = dict[str, Any]
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
REQUEST_TIMEOUT = 10.0


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

    def watch(self, path: str, query: Mapping[str, str], *, timeout: float) -> Iterator[JSON]: ...


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
    if env.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT_TOKEN.exists():
        return KubeConfigSource("in-cluster")
    if env.get("KUBECONFIG"):
        # Like kubectl, a list of files: the first one that exists.
        paths = [Path(p) for p in env["KUBECONFIG"].split(os.pathsep) if p]
        existing = [p for p in paths if p.exists()]
        return KubeConfigSource("kubeconfig", (existing or paths)[0]) if paths else None
    return None


class KubeClient:
    """JSON requests through the official client's ``ApiClient`` (auth, TLS, proxies)."""

    def __init__(self, api_client: Any, source: KubeConfigSource) -> None:
        self._client = api_client
        self.source = source

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
        serialized = self._client.param_serialize(
            method=method, resource_path=path, header_params=headers, auth_settings=["BearerToken"]
        )
        _, url, header_params, _, _ = serialized
        if query:
            url += "?" + urlencode(query, quote_via=quote)
        try:
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
        import urllib3

        response = self._send(method, path, query, body, content_type, timeout)
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

    def watch(self, path: str, query: Mapping[str, str], *, timeout: float) -> Iterator[JSON]:
        """Stream a watch: one decoded watch event per line until the server ends it."""
        import urllib3

        response = self._send("GET", path, {**query, "watch": "1"}, None, "application/json",
                              (5.0, timeout))  # fmt: skip
        try:
            if not 200 <= response.status < 300:
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
            response.release_conn()
            response.close()


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


def connect(source: KubeConfigSource) -> KubeClient:
    """Load the config (``kubernetes`` is imported here, lazily). Raises ``KubeUnreachable``
    when the config cannot be loaded (missing file, no token yet, …)."""
    from kubernetes.client import ApiClient, Configuration
    from kubernetes.config import ConfigException, load_incluster_config, load_kube_config

    configuration = Configuration()
    try:
        if source.kind == "in-cluster":
            load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        else:
            load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(source.path),
                client_configuration=configuration,
                persist_config=False,
            )
    except (ConfigException, OSError, ValueError, TypeError, KeyError) as error:
        raise KubeUnreachable(f"cannot load the {source} config: {error}") from error
    configuration.retries = False  # our callers retry, with backoff
    return KubeClient(ApiClient(configuration), source)


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
