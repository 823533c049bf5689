"""A local Kubernetes API server stand-in for tests (no real API server can be installed here).

``KubeStandin`` is a threaded ``http.server`` on 127.0.0.1 (random free port) that speaks the
API paths the agent uses, validates every request body against the official Kubernetes JSON
schemas shipped by the ``kubernetes-validate`` package (strict variant: unknown fields are
errors) and enforces the server-side Event rules the schemas cannot express. It answers like
the API server: ``Status`` objects, one global ``resourceVersion`` counter, ``generateName``,
``uid``/``creationTimestamp``, 201/200/404/409/422, list + watch with ``fieldSelector``.

Served paths (``events.k8s.io/v1`` can be switched off with ``serve_events_v1=False``; then
its discovery and resource paths answer 404 like a server that does not serve the group):

- discovery: ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/events.k8s.io``,
  ``/apis/events.k8s.io/v1``
- Events, both groups, over one store (as on a real server, an Event written through one group
  is readable through the other): ``POST/GET(list, watch)`` on ``…/namespaces/NS/events``,
  ``GET/PATCH/PUT/DELETE`` on ``…/namespaces/NS/events/NAME``, cluster-wide list ``…/events``
- pods: ``GET`` list/watch on ``/api/v1/pods`` and ``/api/v1/namespaces/NS/pods``, ``GET`` one
- nodes: ``GET`` list/one on ``/api/v1/nodes``

Event rules (beyond the JSON schema), with where the real server has them. The server validates
the *internal* Event type, so error paths use core/v1 names even for events.k8s.io/v1 requests
(``message`` for ``note``, ``involvedObject`` for ``regarding``, ``reportingComponent``
shown as ``reportingController``) — just like a real API server does:

- kubernetes ``pkg/apis/core/validation/events.go`` ``legacyValidateEvent`` (both groups):
  when ``eventTime`` is set: ``reportingController`` required and a qualified name,
  ``reportingInstance`` required and ≤ 128, ``action`` required and ≤ 128, ``reason`` required
  and ≤ 128, ``message``/``note`` ≤ 1024 bytes, and an Event about a cluster-scoped object
  (empty ``involvedObject.namespace``, e.g. a Node) only in ``default`` or ``kube-system``;
  when ``eventTime`` is unset (old core/v1 style): ``involvedObject.namespace`` must equal the
  Event's namespace (or be empty with the Event in ``default``); namespace a DNS-1123 name.
- same file, ``ValidateEventCreate`` (events.k8s.io/v1 only): ``eventTime`` required, ``type``
  in Normal/Warning, ``deprecatedFirstTimestamp``/``deprecatedLastTimestamp``/
  ``deprecatedCount``/``deprecatedSource`` unset, ``metadata`` valid (name a DNS subdomain),
  and ``validateV1EventSeries``: ``series.count`` ≥ 2, ``series.lastObservedTime`` required.
- same file, ``ValidateEventUpdate`` (PATCH/PUT via events.k8s.io/v1): series re-validated when
  changed; ``regarding``, ``reason``, ``note``, ``type``, ``eventTime``, ``action``,
  ``related``, ``reportingController``, ``reportingInstance`` and the deprecated fields are
  immutable ("field is immutable").
- ``staging/src/k8s.io/apiserver/pkg/registry/rest/create.go``
  ``EnsureObjectNamespaceMatchesRequestNamespace``: ``metadata.namespace`` must equal the URL
  namespace (empty is filled in) — **400 BadRequest**, not 422, as on the real server.
- ``staging/src/k8s.io/apimachinery/pkg/apis/meta/v1/micro_time.go``: MicroTime fields
  (``eventTime``, ``series.lastObservedTime``) are parsed with layout
  ``2006-01-02T15:04:05.000000Z07:00`` — exactly 6 fractional digits (Python's
  ``isoformat()`` of a datetime with ``microsecond == 0`` has none and is rejected) — a decode
  error, **400 BadRequest**.
- stand-in only (``extra_rules=True``, not a real-server rule): ``regarding``/``involvedObject``
  must name an object (``kind`` and ``name``) — nodediag must always say what a finding is about.

Unknown fields: the real server (≥ 1.23, default ``fieldValidation=Warn``) drops them and adds a
``Warning`` header; with ``?fieldValidation=Strict`` it answers 400. The stand-in rejects them by
default with 422 naming the field (``unknown_fields="reject"``) so a typo in the agent fails a
test; ``unknown_fields="warn"`` mimics the real default. ``?fieldValidation=Strict`` → 400.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from standin_auth import Rbac, User, forbidden_message, request_info
from standin_events import EventsEndpoint, _map_event_selector
from standin_http import _Handler, _Server
from standin_query import (
    _EVENT_FIELDS,
    _NODE_FIELDS,
    _POD_FIELDS,
    _field_value,
    _labels_match,
    _parse_field_selector,
    _parse_label_selector,
)
from standin_tables import event_table, wants_table
from standin_tls import TlsFiles
from standin_validation import (
    _MODIFIED,
    DEFAULT_TOKEN,
    DEFAULT_USER,
    EVENTS_GROUP,
    EVENTS_V1,
    JSON,
    ApiError,
    SchemaValidator,
    _bad_request,
    _field_path,
    _not_found,
    _not_found_path,
    event_to_core,
    micro_time,
    now_rfc3339,
    status_object,
)

from collectors.dns_probe import run_in_netns

__all__ = [
    "DEFAULT_TOKEN",
    "EVENTS_GROUP",
    "JSON",
    "ApiError",
    "KubeStandin",
    "RecordedRequest",
    "micro_time",
    "running",
]

# --------------------------------------------------------------------------- request log / faults


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    status: int | None  # None: connection dropped without an answer
    body: Any  # parsed JSON request body, or None
    time: float  # time.time() when the request arrived
    content_type: str = ""
    fault: str | None = None  # "drop", "status", "outage", "forbid" when injected
    response: Any = None  # parsed JSON answer (None for watch streams / drops)
    user: str | None = None  # who the bearer token named (None: not authenticated)


@dataclass
class _Fault:
    status: int | None  # None: drop the connection
    remaining: int
    method: str | None
    path: re.Pattern[str] | None
    retry_after: int | None
    message: str | None

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method:
            return False
        return not (self.path and not self.path.search(path))


@dataclass
class _Outage:
    start: float
    end: float
    status: int | None
    retry_after: int | None


@dataclass
class _History:
    entries: list[tuple[int, str, JSON, JSON | None]] = field(default_factory=list)
    floor: int = 0  # watches from a resourceVersion below this get 410 Gone


ResourceKind = Literal["events", "pods", "nodes"]


@dataclass(frozen=True)
class _Route:
    group: str  # "" for core
    resource: ResourceKind
    namespace: str | None
    name: str | None


_ROUTE_RE = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/v1)"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<res>events|pods|nodes)(?:/(?P<name>[^/]+))?/?$"
)


# --------------------------------------------------------------------------- the stand-in


class KubeStandin(EventsEndpoint):
    """In-process Kubernetes API stand-in; see the module docstring."""

    def __init__(
        self,
        *,
        serve_events_v1: bool = True,
        kubernetes_version: str = "1.37",
        token: str | None = DEFAULT_TOKEN,
        user: str = DEFAULT_USER,
        unknown_fields: Literal["reject", "warn"] = "reject",
        extra_rules: bool = True,
        tls: TlsFiles | None = None,
        rbac: Rbac | None = None,
        users: dict[str, User] | None = None,
    ) -> None:
        self.serve_events_v1 = serve_events_v1
        self.token = token
        self.user = user
        self.tls = tls
        """Serve HTTPS with this certificate (clients verify it with ``tls.ca_cert``)."""
        self.rbac = rbac
        """Authorize every request against these roles and bindings (403 otherwise)."""
        self.users: dict[str, User] | None = dict(users) if users is not None else None
        """Bearer token → user; ``None``: the single ``token`` of ``user``."""
        self.unknown_fields = unknown_fields
        self.extra_rules = extra_rules
        self.schemas = SchemaValidator(kubernetes_version)
        minor = kubernetes_version.lstrip("v").split(".")[1]
        self.git_version = f"v1.{minor}.0-standin"
        self._cond = threading.Condition()
        self._rv = 0
        self._events: dict[tuple[str, str], JSON] = {}  # internal (core/v1-named)
        self._pods: dict[tuple[str, str], JSON] = {}
        self._nodes: dict[str, JSON] = {}
        self._history: dict[str, _History] = {r: _History() for r in ("events", "pods", "nodes")}
        self._requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._outages: list[_Outage] = []
        self._forbidden: list[tuple[str, str, str, str | None]] = []
        self._stopping = False
        self.watch_event_limit: int | None = None
        """End each watch stream after this many events (a proxy with a short idle timeout)."""
        self._server: _Server | None = None
        self.host = "127.0.0.1"
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(
        self, port: int = 0, *, host: str = "127.0.0.1", netns: str | None = None
    ) -> KubeStandin:
        """Serve on ``host``:``port`` (0: any free port), the listening socket made in network
        namespace ``netns`` (a test's; ``None``: this one). After :meth:`stop`, starting
        again on the old port with the same stored objects is an API server restart."""
        with self._cond:
            self._stopping = False
        self.host = host
        server = run_in_netns(netns, lambda: _Server((host, port), _Handler))
        server.standin = self
        server.tls_context = self.tls.server_context() if self.tls else None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="kube-standin",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.close_all_connections()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> KubeStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def write_kubeconfig(
        self, path: str | Path, *, namespace: str = "default", token: str | None = None
    ) -> Path:
        """A kubeconfig (bearer ``token``, default the stand-in's; the CA when serving
        HTTPS) the official client and kubectl accept."""
        path = Path(path)
        if token is None:
            token = self.token
        user: JSON = {"token": token} if token else {}
        cluster: JSON = {"server": self.url}
        if self.tls:
            cluster["certificate-authority"] = str(self.tls.ca_cert)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": cluster}],
            "users": [{"name": "standin", "user": user}],
            "contexts": [
                {
                    "name": "standin",
                    "context": {"cluster": "standin", "user": "standin", "namespace": namespace},
                }
            ],
            "current-context": "standin",
            "preferences": {},
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return path

    # ----------------------------------------------------------------- state API

    def events(self, namespace: str | None = None, *, group: str = EVENTS_GROUP) -> list[JSON]:
        """Stored Events (copies), oldest first, in ``group``'s shape (``""`` for core/v1)."""
        with self._cond:
            items = [
                e for (ns, _), e in self._events.items() if namespace is None or ns == namespace
            ]
            return [self._event_out(e, group) for e in items]

    def event(self, namespace: str, name: str, *, group: str = EVENTS_GROUP) -> JSON | None:
        with self._cond:
            ev = self._events.get((namespace, name))
            return None if ev is None else self._event_out(ev, group)

    def delete_event(self, namespace: str, name: str) -> None:
        with self._cond:
            ev = self._events.pop((namespace, name))
            self._record_change("events", "DELETED", self._tombstone(ev), ev)

    def add_pod(self, pod: JSON) -> JSON:
        """Store a Pod (schema-validated; server fields filled in) and emit ADDED."""
        return self._add_object("pods", pod)

    def update_pod(self, pod: JSON) -> JSON:
        """Replace a stored Pod (matched by namespace/name) and emit MODIFIED."""
        meta = pod.get("metadata") or {}
        key = (str(meta.get("namespace") or "default"), str(meta["name"]))
        with self._cond:
            old = self._pods[key]
            new = copy.deepcopy(pod)
            new.setdefault("apiVersion", "v1")
            new.setdefault("kind", "Pod")
            nmeta = new.setdefault("metadata", {})
            nmeta["namespace"] = key[0]
            for kept in ("uid", "creationTimestamp"):
                nmeta[kept] = old["metadata"][kept]
            self._schema_check_local(new)
            nmeta["resourceVersion"] = str(self._next_rv())
            self._pods[key] = new
            self._record_change("pods", "MODIFIED", new, old)
            return copy.deepcopy(new)

    def delete_pod(self, namespace: str, name: str) -> JSON:
        """Remove a Pod and emit DELETED (with a fresh resourceVersion, as the server does)."""
        with self._cond:
            old = self._pods.pop((namespace, name))
            gone = self._tombstone(old)
            self._record_change("pods", "DELETED", gone, old)
            return copy.deepcopy(gone)

    def pods(self) -> list[JSON]:
        with self._cond:
            return [copy.deepcopy(p) for p in self._pods.values()]

    def add_node(self, node: JSON | str) -> JSON:
        """Store a Node (a name is enough)."""
        if isinstance(node, str):
            node = {"metadata": {"name": node}}
        return self._add_object("nodes", node)

    def compact(self) -> None:
        """Forget watch history: a watch from an older resourceVersion now gets 410 Expired."""
        with self._cond:
            for hist in self._history.values():
                hist.entries.clear()
                hist.floor = self._rv + 1

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    # ----------------------------------------------------------------- faults

    def fail_next(
        self,
        status: int,
        count: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        retry_after: int | None = None,
        message: str | None = None,
    ) -> None:
        """The next ``count`` requests (matching ``method`` and the regex ``path`` when given)
        answer ``status`` (429, 500, 503, 409, 403, …) with the Status the real server sends.
        ``retry_after`` adds ``Retry-After`` (default 1 for 429)."""
        if status == 429 and retry_after is None:
            retry_after = 1
        with self._cond:
            self._faults.append(
                _Fault(
                    status,
                    count,
                    method,
                    re.compile(path) if path else None,
                    retry_after,
                    message,
                )
            )

    def drop_next(
        self, count: int = 1, *, method: str | None = None, path: str | None = None
    ) -> None:
        """The next ``count`` matching requests get their connection closed, no answer."""
        with self._cond:
            self._faults.append(
                _Fault(None, count, method, re.compile(path) if path else None, None, None)
            )

    def outage(
        self,
        seconds: float,
        status: int | Literal["drop"] = 503,
        *,
        start_in: float = 0.0,
        retry_after: int | None = None,
    ) -> None:
        """Every request in [now+start_in, now+start_in+seconds) fails (``"drop"``: connection
        closed). Open watch streams are cut when an outage begins. Outages can be queued."""
        start = time.monotonic() + start_in
        with self._cond:
            self._outages.append(
                _Outage(start, start + seconds, None if status == "drop" else status, retry_after)
            )
            self._cond.notify_all()

    def forbid(
        self, verb: str, resource: str, group: str = "", namespace: str | None = None
    ) -> None:
        """Persistent RBAC denial: ``verb`` (create, patch, update, get, list, watch, delete) on
        ``resource`` in ``group`` (``""`` core) → 403 Forbidden until ``clear_faults()``."""
        with self._cond:
            self._forbidden.append((verb, resource, group, namespace))

    def clear_faults(self) -> None:
        with self._cond:
            self._faults.clear()
            self._outages.clear()
            self._forbidden.clear()

    # ----------------------------------------------------------------- request log

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._requests)

    def requests_matching(
        self, method: str | None = None, path: str | None = None
    ) -> list[RecordedRequest]:
        """Logged requests whose method equals ``method`` and whose path matches regex ``path``."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (path is None or re.search(path, r.path))
        ]

    def clear_requests(self) -> None:
        with self._cond:
            self._requests.clear()

    def wait_for(self, predicate: Callable[[KubeStandin], bool], timeout: float = 10.0) -> bool:
        """Poll ``predicate(self)`` until true or ``timeout`` (for asserting on async agents)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            time.sleep(0.02)
        return predicate(self)

    # ----------------------------------------------------------------- internals

    def _tombstone(self, obj: JSON) -> JSON:
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        return gone

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _record_change(self, resource: str, kind: str, obj: JSON, old: JSON | None) -> None:
        rv = int(obj["metadata"]["resourceVersion"])
        self._history[resource].entries.append((rv, kind, copy.deepcopy(obj), copy.deepcopy(old)))
        self._cond.notify_all()

    def _schema_check_local(self, obj: JSON) -> None:
        errors = self.schemas.errors(obj)
        if errors:
            raise ValueError(
                "; ".join(f"{_field_path(e.absolute_path)}: {e.message}" for e in errors)
            )

    def _add_object(self, resource: Literal["pods", "nodes"], obj: JSON) -> JSON:
        new = copy.deepcopy(obj)
        new.setdefault("apiVersion", "v1")
        new.setdefault("kind", "Pod" if resource == "pods" else "Node")
        meta = new.setdefault("metadata", {})
        with self._cond:
            if resource == "pods":
                meta.setdefault("namespace", "default")
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_rfc3339())
            self._schema_check_local(new)
            meta["resourceVersion"] = str(self._next_rv())
            if resource == "pods":
                key = (meta["namespace"], meta["name"])
                if key in self._pods:
                    raise ValueError(f"pod {key} exists")
                self._pods[key] = new
            else:
                self._nodes[meta["name"]] = new
            self._record_change(resource, "ADDED", new, None)
            return copy.deepcopy(new)

    def _log(self, rec: RecordedRequest) -> None:
        with self._cond:
            self._requests.append(rec)

    def _outage_now(self) -> _Outage | None:
        now = time.monotonic()
        for o in self._outages:
            if o.start <= now < o.end:
                return o
        return None

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._cond:
            for f in self._faults:
                if f.remaining > 0 and f.matches(method, path):
                    f.remaining -= 1
                    if f.remaining == 0:
                        self._faults.remove(f)
                    return f
        return None

    # ----------------------------------------------------------------- HTTP dispatch

    def handle(self, req: _Handler) -> None:
        parsed = urllib.parse.urlsplit(req.path)
        path = parsed.path
        query = {
            k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()
        }
        method = req.command
        arrived = time.time()
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        ctype = (req.headers.get("Content-Type") or "").split(";")[0].strip()
        body: Any = None
        body_error: str | None = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                body_error = f"couldn't get version/kind; json parse error: {exc}"

        user: User | None = None

        def log(status: int | None, fault: str | None = None, response: Any = None) -> None:
            name = user.name if user else None
            self._log(RecordedRequest(method, path, query, status, body, arrived, ctype, fault,
                                      response, name))  # fmt: skip

        with self._cond:
            outage = self._outage_now()
        fault = None if outage else self._take_fault(method, path)
        if outage is not None or fault is not None:
            status = outage.status if outage else fault.status  # type: ignore[union-attr]
            if status is None:
                log(None, "outage" if outage else "drop")
                req.drop()
                return
            retry_after = outage.retry_after if outage else fault.retry_after  # type: ignore[union-attr]
            message = None if outage else fault.message  # type: ignore[union-attr]
            err = self._fault_error(status, method, path, query, retry_after, message)
            log(status, "outage" if outage else "status", err.body)
            req.send_json(status, err.body, err.headers)
            return

        try:
            user = self._authenticate(req)
            self._authorize(method, path, query, user)
            route = self._route(path)
            if route is not None:
                self._check_rbac(method, route, query)
            if body_error is not None:
                raise _bad_request(body_error)
            if route is not None and query.get("watch") in ("1", "true") and method == "GET":
                log(200, response=None)
                self._serve_watch(req, route, query)
                return
            status, answer, headers = self._dispatch(method, path, route, query, body, ctype)
            if method == "GET" and wants_table(req.headers.get("Accept") or ""):
                answer = self._as_table(answer)
        except ApiError as err:
            log(err.code, "forbid" if err.code == 403 else None, err.body)
            req.send_json(err.code, err.body, err.headers)
            return
        log(status, response=answer)
        req.send_json(status, answer, headers)

    @staticmethod
    def _as_table(answer: JSON) -> JSON:
        """Events as kube-apiserver prints them (other kinds stay objects: kubectl then
        prints them itself)."""
        kind = answer.get("kind")
        if kind not in ("Event", "EventList"):
            return answer
        items = answer["items"] if kind == "EventList" else [answer]
        internal = [event_to_core(e) if "note" in e or "regarding" in e else e for e in items]
        version = str((answer.get("metadata") or {}).get("resourceVersion") or "")
        return event_table(internal, version, dt.datetime.now(dt.UTC))

    def add_user(self, token: str, user: User) -> None:
        """Accept ``token`` for ``user`` (a new projected token, an admin for kubectl)."""
        with self._cond:
            self.users = {**(self.users or {}), token: user}

    def revoke(self, token: str) -> None:
        """``token`` is no longer accepted (401), as an expired projected token."""
        with self._cond:
            if self.users is not None:
                self.users.pop(token, None)

    def _authenticate(self, req: _Handler) -> User:
        header = req.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        with self._cond:
            if self.users is not None:
                user = self.users.get(token) if scheme.lower() == "bearer" else None
            elif self.token is None or header == f"Bearer {self.token}":
                user = User(self.user, ("system:authenticated",))
            else:
                user = None
        if user is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return user

    def _authorize(self, method: str, path: str, query: dict[str, str], user: User) -> None:
        if self.rbac is None:
            return
        info = request_info(method, path, query)
        if not self.rbac.allowed(user, info):
            message, details = forbidden_message(user, info)
            raise ApiError(403, "Forbidden", message, details)

    def _route(self, path: str) -> _Route | None:
        m = _ROUTE_RE.match(path)
        if not m:
            return None
        group = m.group("group") or ""
        res = m.group("res")
        if group not in ("", EVENTS_GROUP) or (group == EVENTS_GROUP and res != "events"):
            return None
        if group == EVENTS_GROUP and not self.serve_events_v1:
            return None
        if path.startswith("/apis/") and group == "":
            return None
        if res == "nodes" and m.group("ns"):
            return None
        resource: ResourceKind = (
            "events" if res == "events" else "pods" if res == "pods" else "nodes"
        )
        return _Route(group, resource, m.group("ns"), m.group("name"))

    @staticmethod
    def _verb(method: str, route: _Route | None, query: dict[str, str]) -> str:
        if method == "GET":
            if route is not None and route.name:
                return "get"
            return "watch" if query.get("watch") in ("1", "true") else "list"
        return {
            "POST": "create",
            "PATCH": "patch",
            "PUT": "update",
            "DELETE": "delete" if route is not None and route.name else "deletecollection",
        }.get(method, method.lower())

    def _forbidden_error(self, verb: str, route: _Route | None, path: str) -> ApiError:
        if route is None:
            return ApiError(
                403,
                "Forbidden",
                f'forbidden: User "{self.user}" cannot {verb} path "{path}"',
                {},
            )
        qualified = f"{route.resource}.{route.group}" if route.group else route.resource
        subject = f'{qualified} "{route.name}"' if route.name else qualified
        scope = (
            f'in the namespace "{route.namespace}"' if route.namespace else "at the cluster scope"
        )
        details: JSON = {"kind": route.resource}
        if route.name:
            details["name"] = route.name
        if route.group:
            details["group"] = route.group
        return ApiError(
            403,
            "Forbidden",
            f'{subject} is forbidden: User "{self.user}" cannot {verb} resource '
            f'"{route.resource}" in API group "{route.group}" {scope}',
            details,
        )

    def _check_rbac(self, method: str, route: _Route, query: dict[str, str]) -> None:
        verb = self._verb(method, route, query)
        with self._cond:
            denied = any(
                v == verb
                and r == route.resource
                and g == route.group
                and ns in (None, route.namespace)
                for v, r, g, ns in self._forbidden
            )
        if denied:
            raise self._forbidden_error(verb, route, "")

    def _fault_error(
        self,
        status: int,
        method: str,
        path: str,
        query: dict[str, str],
        retry_after: int | None,
        message: str | None,
    ) -> ApiError:
        route = self._route(path)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        if status == 403:
            return self._forbidden_error(self._verb(method, route, query), route, path)
        if status == 429:
            msg = message or "Too many requests, please try again later."
            details: JSON = {"causes": [{"message": msg}], "retryAfterSeconds": retry_after or 1}
            return ApiError(429, "TooManyRequests", msg, details, headers)
        if status == 409:
            what = (
                f"{route.resource}.{route.group}"
                if route and route.group
                else (route.resource if route else "object")
            )
            name = route.name if route and route.name else ""
            msg = message or (f'Operation cannot be fulfilled on {what} "{name}": {_MODIFIED}')
            return ApiError(
                409,
                "Conflict",
                msg,
                {"name": name, "kind": route.resource if route else ""},
                headers,
            )
        if status == 503:
            return ApiError(
                503,
                "ServiceUnavailable",
                message or "the server is currently unable to handle the request",
                None,
                headers,
            )
        if status == 504:
            return ApiError(
                504,
                "Timeout",
                message or "the server was unable to return a response in the time allotted",
                None,
                headers,
            )
        if status == 500:
            msg = message or "stand-in injected fault"
            return ApiError(
                500,
                "InternalError",
                f"Internal error occurred: {msg}",
                {"causes": [{"message": msg}]},
                headers,
            )
        return ApiError(
            status, "Unknown", message or f"stand-in injected HTTP {status}", None, headers
        )

    def _dispatch(
        self,
        method: str,
        path: str,
        route: _Route | None,
        query: dict[str, str],
        body: Any,
        ctype: str,
    ) -> tuple[int, JSON, dict[str, str]]:
        if route is None:
            if method != "GET":
                raise _not_found_path()
            return 200, self._discovery(path), {}
        if route.resource == "events":
            return self._events_endpoint(method, route, query, body, ctype)
        if method != "GET":
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        with self._cond:
            if route.resource == "pods":
                if route.name:
                    pod = self._pods.get((route.namespace or "", route.name))
                    if pod is None:
                        raise _not_found("pods", "", route.name)
                    return 200, copy.deepcopy(pod), {}
                items = [p for (ns, _), p in self._pods.items() if route.namespace in (None, ns)]
                return 200, self._list("PodList", "v1", items, query, _POD_FIELDS), {}
            if route.name:
                node = self._nodes.get(route.name)
                if node is None:
                    raise _not_found("nodes", "", route.name)
                return 200, copy.deepcopy(node), {}
            return (
                200,
                self._list("NodeList", "v1", list(self._nodes.values()), query, _NODE_FIELDS),
                {},
            )

    def _list(
        self,
        kind: str,
        api_version: str,
        items: list[JSON],
        query: dict[str, str],
        fields: set[str],
    ) -> JSON:
        fsel = _parse_field_selector(query.get("fieldSelector", ""), fields)
        lsel = _parse_label_selector(query.get("labelSelector", ""))
        out = [
            copy.deepcopy(i)
            for i in items
            if all((_field_value(i, k) == v) != neg for k, neg, v in fsel)
            and _labels_match(i, lsel)
        ]
        return {
            "kind": kind,
            "apiVersion": api_version,
            "metadata": {"resourceVersion": str(self._rv)},
            "items": out,
        }

    # ----------------------------------------------------------------- discovery

    def _discovery(self, path: str) -> JSON:
        path = path.rstrip("/") or "/"
        if path == "/version":
            minor = self.git_version.split(".")[1]
            return {
                "major": "1",
                "minor": minor,
                "gitVersion": self.git_version,
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                ],
            }
        if path == "/api/v1":
            return _resource_list(
                "v1",
                [
                    (
                        "events",
                        "Event",
                        True,
                        ["create", "delete", "get", "list", "patch", "update", "watch"],
                    ),
                    ("nodes", "Node", False, ["get", "list", "watch"]),
                    ("pods", "Pod", True, ["get", "list", "watch"]),
                ],
            )
        group = {
            "name": EVENTS_GROUP,
            "versions": [{"groupVersion": EVENTS_V1, "version": "v1"}],
            "preferredVersion": {"groupVersion": EVENTS_V1, "version": "v1"},
        }
        if path == "/apis":
            groups = [group] if self.serve_events_v1 else []
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        if self.serve_events_v1 and path == f"/apis/{EVENTS_GROUP}":
            return {"kind": "APIGroup", "apiVersion": "v1", **group}
        if self.serve_events_v1 and path == f"/apis/{EVENTS_V1}":
            return _resource_list(
                EVENTS_V1,
                [
                    (
                        "events",
                        "Event",
                        True,
                        ["create", "delete", "get", "list", "patch", "update", "watch"],
                    )
                ],
            )
        raise _not_found_path()

    def _serve_watch(self, req: _Handler, route: _Route, query: dict[str, str]) -> None:
        resource = route.resource
        fields = {"pods": _POD_FIELDS, "nodes": _NODE_FIELDS, "events": _EVENT_FIELDS}[resource]
        selector = query.get("fieldSelector", "")
        if resource == "events" and route.group:
            selector = _map_event_selector(selector)
        fsel = _parse_field_selector(selector, fields)
        lsel = _parse_label_selector(query.get("labelSelector", ""))
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        deadline = time.monotonic() + timeout if timeout else None

        def in_scope(obj: JSON) -> bool:
            ns = (obj.get("metadata") or {}).get("namespace")
            return route.namespace in (None, ns)

        def matches(obj: JSON | None) -> bool:
            if obj is None or not in_scope(obj):
                return False
            return all((_field_value(obj, k) == v) != neg for k, neg, v in fsel) and _labels_match(
                obj, lsel
            )

        def shape(obj: JSON) -> JSON:
            return self._event_out(obj, route.group) if resource == "events" else copy.deepcopy(obj)

        rv_text = query.get("resourceVersion", "")
        pending: list[JSON] = []
        with self._cond:
            hist = self._history[resource]
            if rv_text in ("", "0"):
                store: list[JSON] = (
                    list(self._pods.values())
                    if resource == "pods"
                    else list(self._nodes.values())
                    if resource == "nodes"
                    else list(self._events.values())
                )
                pending = [{"type": "ADDED", "object": shape(o)} for o in store if matches(o)]
                position = self._rv
            else:
                try:
                    position = int(rv_text)
                except ValueError:
                    raise _bad_request(f'invalid resource version "{rv_text}"') from None
                if position < hist.floor - 1:
                    gone = status_object(
                        410, "Expired", f"too old resource version: {position} ({hist.floor - 1})"
                    )
                    pending = [{"type": "ERROR", "object": gone}]
                    position = -1

        req.start_chunked()
        sent = 0
        try:
            for event in pending:
                req.write_chunk(event)
            if position < 0:
                req.end_chunked()
                return
            while True:
                with self._cond:
                    while True:
                        if self._stopping or self._outage_now() is not None:
                            req.drop()
                            return
                        if deadline is not None and time.monotonic() >= deadline:
                            break
                        fresh = [e for e in self._history[resource].entries if e[0] > position]
                        if fresh:
                            break
                        self._cond.wait(0.1)
                    if not fresh:
                        break
                    out: list[JSON] = []
                    for rv, kind, obj, old in fresh:
                        position = rv
                        now_in, was_in = matches(obj), matches(old)
                        if kind == "ADDED" and now_in:
                            out.append({"type": "ADDED", "object": shape(obj)})
                        elif kind == "DELETED" and (now_in or was_in):
                            out.append({"type": "DELETED", "object": shape(obj)})
                        elif kind == "MODIFIED":
                            if now_in and was_in:
                                out.append({"type": "MODIFIED", "object": shape(obj)})
                            elif now_in:
                                out.append({"type": "ADDED", "object": shape(obj)})
                            elif was_in:
                                out.append({"type": "DELETED", "object": shape(obj)})
                for event in out:
                    req.write_chunk(event)
                    sent += 1
                    if self.watch_event_limit is not None and sent >= self.watch_event_limit:
                        req.end_chunked()
                        return
            req.end_chunked()
        except OSError:
            return


def _resource_list(group_version: str, resources: list[tuple[str, str, bool, list[str]]]) -> JSON:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {
                "name": name,
                "singularName": kind.lower(),
                "namespaced": namespaced,
                "kind": kind,
                "verbs": verbs,
            }
            for name, kind, namespaced, verbs in resources
        ],
    }


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[KubeStandin]:
    """``with running() as api:`` — a started stand-in, stopped afterwards."""
    standin = KubeStandin(**kwargs).start()
    try:
        yield standin
    finally:
        standin.stop()
