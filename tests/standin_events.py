"""The API stand-in's Event endpoints (both groups over one store): create, get, list,
patch (merge, strategic merge, JSON patch), update and delete, with the server-side Event
rules of ``standin_validation``. A mixin of :class:`kube_standin.KubeStandin`, which holds
the store and its resourceVersion counter."""

from __future__ import annotations

import copy
import random
import re
import threading
import uuid
from typing import TYPE_CHECKING, Any, Literal

from standin_query import (
    _EVENT_FIELDS,
    _field_value,
    _labels_match,
    _parse_field_selector,
    _parse_label_selector,
    json_patch,
    merge_patch,
    strategic_merge_patch,
)
from standin_validation import (
    _MODIFIED,
    _NAME_SUFFIX_ALPHABET,
    _NS_MISMATCH,
    _V1_TO_CORE,
    EVENTS_GROUP,
    EVENTS_V1,
    JSON,
    ApiError,
    Cause,
    SchemaValidator,
    _already_exists,
    _bad_request,
    _dig,
    _field_path,
    _invalid,
    _invalid_error,
    _not_found,
    _required,
    _unknown_fields,
    check_event_times,
    event_to_core,
    event_to_v1,
    now_rfc3339,
    validate_event,
)

if TYPE_CHECKING:
    from kube_standin import _Route


class EventsEndpoint:
    """``…/events`` of ``""`` and ``events.k8s.io`` (the store keeps core/v1 names)."""

    _cond: threading.Condition
    _events: dict[tuple[str, str], JSON]
    _rv: int
    schemas: SchemaValidator
    unknown_fields: Literal["reject", "warn"]
    extra_rules: bool

    # provided by the store (KubeStandin)
    def _next_rv(self) -> int:
        raise NotImplementedError

    def _record_change(self, resource: str, kind: str, obj: JSON, old: JSON | None) -> None:
        raise NotImplementedError

    def _tombstone(self, obj: JSON) -> JSON:
        raise NotImplementedError

    def _event_out(self, ev: JSON, group: str) -> JSON:
        return event_to_v1(ev) if group == EVENTS_GROUP else copy.deepcopy(ev)

    def _events_endpoint(
        self, method: str, route: _Route, query: dict[str, str], body: Any, ctype: str
    ) -> tuple[int, JSON, dict[str, str]]:
        group = route.group
        api_version = EVENTS_V1 if group else "v1"
        headers: dict[str, str] = {}
        dry_run = query.get("dryRun") == "All"
        if method == "GET" and not route.name:
            with self._cond:
                items = [
                    self._event_out(e, group)
                    for (ns, _), e in self._events.items()
                    if route.namespace in (None, ns)
                ]
                # selectors use core/v1 field names (events.k8s.io/v1 ones are mapped)
                core_items = [event_to_core(i) if group else i for i in items]
                fsel = _parse_field_selector(
                    _map_event_selector(query.get("fieldSelector", ""))
                    if group
                    else query.get("fieldSelector", ""),
                    _EVENT_FIELDS,
                )
                lsel = _parse_label_selector(query.get("labelSelector", ""))
                keep = [
                    i
                    for i, c in zip(items, core_items, strict=True)
                    if all((_field_value(c, k) == v) != neg for k, neg, v in fsel)
                    and _labels_match(c, lsel)
                ]
                return (
                    200,
                    {
                        "kind": "EventList",
                        "apiVersion": api_version,
                        "metadata": {"resourceVersion": str(self._rv)},
                        "items": keep,
                    },
                    {},
                )
        if route.namespace is None:
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        ns = route.namespace
        if method == "GET":
            assert route.name is not None
            with self._cond:
                ev = self._events.get((ns, route.name))
                if ev is None:
                    raise _not_found("events", group, route.name)
                return 200, self._event_out(ev, group), {}
        if method == "DELETE":
            if not route.name:
                raise ApiError(
                    405, "MethodNotAllowed", "deletecollection is not served by the stand-in"
                )
            with self._cond:
                ev = self._events.get((ns, route.name))
                if ev is None:
                    raise _not_found("events", group, route.name)
                if not dry_run:
                    del self._events[(ns, route.name)]
                    self._record_change("events", "DELETED", self._tombstone(ev), ev)
                return 200, status_success(route.name, group), {}
        if method == "POST":
            if route.name:
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )
            obj = self._decode_object(body, ctype, api_version, query, headers, for_patch=False)
            meta = obj.setdefault("metadata", {})
            if meta.get("namespace") not in (None, "", ns):
                raise _bad_request(_NS_MISMATCH)
            meta["namespace"] = ns
            for server_field in (
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
                "managedFields",
                "selfLink",
            ):
                meta.pop(server_field, None)
            with self._cond:
                if not meta.get("name"):
                    if not meta.get("generateName"):
                        raise _invalid_error(
                            "Event",
                            group,
                            "",
                            [
                                Cause(
                                    "FieldValueRequired",
                                    "metadata.name",
                                    "Required value: name or generateName is required",
                                )
                            ],
                        )
                    while True:
                        candidate = meta["generateName"] + "".join(
                            random.choice(_NAME_SUFFIX_ALPHABET) for _ in range(5)
                        )
                        if (ns, candidate) not in self._events:
                            break
                    meta["name"] = candidate
                internal = event_to_core(obj) if group else obj
                check_event_times(internal, f'Event in version "{api_version}"')
                causes = validate_event(internal, group, None, extra_rules=self.extra_rules)
                if causes:
                    raise _invalid_error("Event", group, meta["name"], causes)
                key = (ns, meta["name"])
                if key in self._events:
                    raise _already_exists("events", group, meta["name"])
                if dry_run:
                    return 201, self._event_out(internal, group), headers
                imeta = internal["metadata"]
                imeta["uid"] = str(uuid.uuid4())
                imeta["creationTimestamp"] = now_rfc3339()
                imeta["resourceVersion"] = str(self._next_rv())
                self._events[key] = internal
                self._record_change("events", "ADDED", internal, None)
                return 201, self._event_out(internal, group), headers
        if method in ("PATCH", "PUT"):
            if not route.name:
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )
            return self._event_update(
                method, route, ns, route.name, body, ctype, query, headers, dry_run
            )
        raise ApiError(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )

    def _event_update(
        self,
        method: str,
        route: _Route,
        ns: str,
        name: str,
        body: Any,
        ctype: str,
        query: dict[str, str],
        headers: dict[str, str],
        dry_run: bool,
    ) -> tuple[int, JSON, dict[str, str]]:
        group = route.group
        api_version = EVENTS_V1 if group else "v1"
        with self._cond:
            old_internal = self._events.get((ns, name))
            created = False
            if method == "PATCH":
                if old_internal is None:
                    raise _not_found("events", group, name)
                current = self._event_out(old_internal, group)
                if body is None:
                    raise _bad_request("the body of the request was in an unknown format")
                if ctype == "application/json-patch+json":
                    patched = json_patch(current, body)
                elif ctype == "application/merge-patch+json":
                    patched = merge_patch(current, body)
                elif ctype == "application/strategic-merge-patch+json":
                    patched = strategic_merge_patch(current, body)
                else:
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types"
                        " include: application/json-patch+json, application/merge-patch+json, "
                        f"application/strategic-merge-patch+json (got {ctype!r})",
                    )
                if not isinstance(patched, dict):
                    raise _bad_request("patch result is not an object")
                want_rv = _dig(body, "metadata.resourceVersion") if isinstance(body, dict) else None
                obj = self._decode_object(
                    patched, "application/json", api_version, query, headers, for_patch=True
                )
            else:
                obj = self._decode_object(body, ctype, api_version, query, headers, for_patch=False)
                want_rv = _dig(obj, "metadata.resourceVersion")
                created = old_internal is None  # Events allow create on update
            meta = obj.setdefault("metadata", {})
            if meta.get("namespace") not in (None, "", ns):
                raise _bad_request(_NS_MISMATCH)
            meta["namespace"] = ns
            if meta.get("name") not in (None, name):
                raise _bad_request(
                    "the name of the object "
                    f"({meta.get('name')}) does not match the name on the URL ({name})"
                )
            meta["name"] = name
            if (
                old_internal is not None
                and want_rv
                and str(want_rv) != old_internal["metadata"]["resourceVersion"]
            ):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Operation cannot be fulfilled on events{'.' + group if group else ''}"
                    f' "{name}": {_MODIFIED}',
                    {"name": name, "kind": "events", **({"group": group} if group else {})},
                )
            internal = event_to_core(obj) if group else obj
            check_event_times(internal, f'Event in version "{api_version}"')
            causes = validate_event(
                internal, group, None if created else old_internal, extra_rules=self.extra_rules
            )
            if old_internal is not None:
                for immutable in ("uid", "creationTimestamp"):
                    if meta.get(immutable) not in (None, old_internal["metadata"][immutable]):
                        causes.append(
                            _invalid(
                                f"metadata.{immutable}", meta.get(immutable), "field is immutable"
                            )
                        )
            if causes:
                raise _invalid_error("Event", group, name, causes)
            imeta = internal["metadata"]
            if old_internal is not None:
                imeta["uid"] = old_internal["metadata"]["uid"]
                imeta["creationTimestamp"] = old_internal["metadata"]["creationTimestamp"]
            else:
                imeta["uid"] = str(uuid.uuid4())
                imeta["creationTimestamp"] = now_rfc3339()
            if dry_run:
                return (201 if created else 200), self._event_out(internal, group), headers
            imeta["resourceVersion"] = str(self._next_rv())
            self._events[(ns, name)] = internal
            self._record_change(
                "events", "ADDED" if created else "MODIFIED", internal, old_internal
            )
            return (201 if created else 200), self._event_out(internal, group), headers

    def _decode_object(
        self,
        body: Any,
        ctype: str,
        api_version: str,
        query: dict[str, str],
        headers: dict[str, str],
        *,
        for_patch: bool,
    ) -> JSON:
        """Decode + schema-validate a request object (like the server's strict decoder)."""
        if not for_patch and ctype not in ("application/json", ""):
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types"
                f" include: application/json (got {ctype!r})",
            )
        if not isinstance(body, dict):
            raise _bad_request("the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        kind = obj.setdefault("kind", "Event")
        version = obj.setdefault("apiVersion", api_version)
        if version != api_version:
            raise _bad_request(
                f"the API version in the data ({version}) does not match the expected API"
                f" version ({api_version})"
            )
        if kind != "Event":
            raise _bad_request(
                f"the kind in the data ({kind}) does not match the expected kind (Event)"
            )
        name = str(_dig(obj, "metadata.name") or _dig(obj, "metadata.generateName") or "")
        group = EVENTS_GROUP if api_version == EVENTS_V1 else ""
        strict = query.get("fieldValidation") == "Strict"
        for _ in range(50):
            errors = self.schemas.errors(obj)
            unknown = [f for e in errors for f in _unknown_fields(e)]
            if unknown and strict:
                raise _bad_request(
                    "strict decoding error: " + ", ".join(f'unknown field "{f}"' for f in unknown)
                )
            if unknown and self.unknown_fields == "warn":
                for f in unknown:
                    _drop_field(obj, f)
                warn = headers.get("Warning", "")
                extra = ", ".join(f'299 - "unknown field \\"{f}\\""' for f in unknown)
                headers["Warning"] = f"{warn}, {extra}" if warn else extra
                continue
            if errors:
                causes: list[Cause] = []
                for e in errors:
                    fields_ = _unknown_fields(e)
                    if fields_:
                        causes += [
                            Cause(
                                "FieldValueInvalid",
                                f,
                                f'unknown field "{f}" (stand-in: a real server drops it with a'
                                " Warning)",
                            )
                            for f in fields_
                        ]
                    elif e.validator == "required" and isinstance(e.instance, dict):
                        base = _field_path(e.absolute_path)
                        causes += [
                            _required(f"{base}.{k}" if base else k)
                            for k in list(e.validator_value)  # type: ignore[arg-type]
                            if k not in e.instance
                        ]
                    else:
                        causes.append(
                            Cause(
                                "FieldValueInvalid",
                                _field_path(e.absolute_path),
                                f"Invalid value: {e.message}",
                            )
                        )
                raise _invalid_error("Event", group, name, causes)
            break
        return obj

    # ----------------------------------------------------------------- watch


def _map_event_selector(selector: str) -> str:
    out = selector
    for v1, core in _V1_TO_CORE.items():
        out = re.sub(rf"(^|,)(!?){re.escape(v1)}(?=[.!=])", rf"\1\2{core}", out)
    return out


def _drop_field(obj: JSON, dotted: str) -> None:
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", dotted)
    cur: Any = obj
    for p in parts[:-1]:
        cur = cur[int(p[1:-1])] if p.startswith("[") else cur[p]
    cur.pop(parts[-1], None)


def status_success(name: str, group: str) -> JSON:
    details: JSON = {"name": name, "kind": "events"}
    if group:
        details["group"] = group
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    }
