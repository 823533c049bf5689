"""The API stand-in's validation: Status errors, the official JSON schemas, and the
server-side Event rules (see ``kube_standin``'s docstring for where each rule comes from)."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import kubernetes_validate.utils  # type: ignore[import-untyped]
import referencing

JSON = dict[str, Any]

EVENTS_GROUP = "events.k8s.io"
EVENTS_V1 = "events.k8s.io/v1"
DEFAULT_TOKEN = "standin-token"
DEFAULT_USER = "system:serviceaccount:kube-system:nodediag"

# events.k8s.io/v1 name <-> internal (core/v1) name for the fields that differ.
_V1_TO_CORE = {
    "regarding": "involvedObject",
    "note": "message",
    "reportingController": "reportingComponent",
    "deprecatedSource": "source",
    "deprecatedFirstTimestamp": "firstTimestamp",
    "deprecatedLastTimestamp": "lastTimestamp",
    "deprecatedCount": "count",
}
_CORE_TO_V1 = {v: k for k, v in _V1_TO_CORE.items()}

_MICROTIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")
_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_NS_MISMATCH = (
    "the namespace of the provided object does not match the namespace sent on the request"
)
_MODIFIED = (
    "the object has been modified; please apply your changes to the latest version and try again"
)
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apiserver names.SimpleNameGenerator


def now_rfc3339() -> str:
    """Server-side ``metav1.Time`` (seconds precision, UTC, ``Z``)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time(when: dt.datetime | None = None) -> str:
    """A ``metav1.MicroTime`` string the real server accepts (exactly 6 fractional digits)."""
    when = when or dt.datetime.now(dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------- errors / Status


def status_object(code: int, reason: str, message: str, details: JSON | None = None) -> JSON:
    body: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


class ApiError(Exception):
    """Raised inside handlers; becomes a ``Status`` answer."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: JSON | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.body = status_object(code, reason, message, details)
        self.headers = headers or {}


@dataclass(frozen=True)
class Cause:
    """One ``field.Error``: reason is FieldValueRequired / FieldValueInvalid / …"""

    reason: str
    field: str
    message: str


def _required(path: str) -> Cause:
    return Cause("FieldValueRequired", path, "Required value")


def _invalid(path: str, value: Any, detail: str) -> Cause:
    return Cause("FieldValueInvalid", path, f"Invalid value: {json.dumps(value)}: {detail}")


def _invalid_error(kind: str, group: str, name: str, causes: list[Cause]) -> ApiError:
    """422 Invalid like ``apierrors.NewInvalid``."""
    qualified = f"{kind}.{group}" if group else kind
    parts = [f"{c.field}: {c.message}" for c in causes]
    joined = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    details: JSON = {
        "name": name,
        "kind": kind,
        "causes": [{"reason": c.reason, "message": c.message, "field": c.field} for c in causes],
    }
    if group:
        details["group"] = group
    return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {joined}', details)


def _bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# --------------------------------------------------------------------------- schemas


class SchemaValidator:
    """JSON-schema validation with the schemas ``kubernetes-validate`` ships.

    Same file choice as ``kubernetes_validate.validate(obj, version, strict=True)`` (the newest
    shipped schema set not newer than ``version``, ``-strict`` variant where every object has
    ``additionalProperties: false``), but each validator is built once and cached: the
    definitions file is ~1.8 MB and the package re-reads it on every call.
    """

    def __init__(self, version: str) -> None:
        utils = kubernetes_validate.utils
        wanted = utils.major_minor(version.lstrip("v"))
        versions = [
            v
            for v in utils.all_versions()
            if _version_key(utils.major_minor(v)) <= _version_key(wanted)
        ]
        if not versions:
            raise ValueError(f"kubernetes-validate has no schemas for Kubernetes {version}")
        self.schema_version: str = str(versions[-1])
        self._dir = f"kubernetes-json-schema/v{self.schema_version}-local-strict"
        self._definitions: Any = None
        self._cache: dict[tuple[str, str], jsonschema.protocols.Validator] = {}
        self._lock = threading.Lock()

    def _validator(self, kind: str, api_version: str) -> jsonschema.protocols.Validator:
        key = (kind, api_version)
        with self._lock:
            if key not in self._cache:
                utils = kubernetes_validate.utils
                # kubernetes_validate's file naming: events.k8s.io/v1 -> events-v1
                suffix = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
                schema = utils.schema_contents(
                    f"{self._dir}/{kind.lower()}-{suffix}.json", self.schema_version
                )
                if self._definitions is None:
                    self._definitions = utils.schema_contents(
                        f"{self._dir}/_definitions.json", self.schema_version
                    )
                registry: referencing.Registry[Any] = referencing.Registry()
                registry = referencing.Resource.from_contents(schema) @ registry
                registry = referencing.Resource.from_contents(self._definitions) @ registry
                self._cache[key] = jsonschema.Draft202012Validator(schema, registry=registry)
            return self._cache[key]

    def errors(self, obj: JSON) -> list[jsonschema.ValidationError]:
        validator = self._validator(str(obj["kind"]), str(obj["apiVersion"]))
        return sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2])


def _field_path(parts: Any) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _unknown_fields(err: jsonschema.ValidationError) -> list[str]:
    if err.validator != "additionalProperties" or not isinstance(err.instance, dict):
        return []
    known = set(err.schema.get("properties", {})) if isinstance(err.schema, dict) else set()
    base = _field_path(err.absolute_path)
    return [f"{base}.{k}" if base else k for k in err.instance if k not in known]


def _dig(obj: JSON, dotted: str) -> Any:
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


# --------------------------------------------------------------------------- event conversion


def event_to_core(obj: JSON) -> JSON:
    """events.k8s.io/v1 Event -> core/v1 (internal) field names."""
    out: JSON = {}
    for key, value in obj.items():
        out[_V1_TO_CORE.get(key, key)] = copy.deepcopy(value)
    out["apiVersion"], out["kind"] = "v1", "Event"
    return out


def event_to_v1(obj: JSON) -> JSON:
    """core/v1 Event -> events.k8s.io/v1 field names."""
    out: JSON = {}
    for key, value in obj.items():
        out[_CORE_TO_V1.get(key, key)] = copy.deepcopy(value)
    out["apiVersion"], out["kind"] = EVENTS_V1, "Event"
    return out


def _empty(value: Any) -> bool:
    return value in (None, "", 0, {}, [])


def validate_event(
    ev: JSON, group: str, old: JSON | None = None, *, extra_rules: bool = True
) -> list[Cause]:
    """The API server's Event rules on an internal (core/v1-named) Event dict."""
    causes: list[Cause] = []
    ns = str((ev.get("metadata") or {}).get("namespace") or "")
    involved = ev.get("involvedObject") or {}
    has_event_time = not _empty(ev.get("eventTime"))

    # legacyValidateEvent (both groups)
    if not has_event_time:
        inv_ns = str(involved.get("namespace") or "")
        if (inv_ns == "" and ns not in ("", "default")) or (inv_ns != "" and ns != inv_ns):
            causes.append(
                _invalid("involvedObject.namespace", inv_ns, "does not match event.namespace")
            )
    else:
        inv_ns = str(involved.get("namespace") or "")
        if inv_ns == "" and ns not in ("default", "kube-system"):
            causes.append(
                _invalid("involvedObject.namespace", inv_ns, "does not match event.namespace")
            )
        controller = str(ev.get("reportingComponent") or "")
        if not controller:
            causes.append(_required("reportingController"))
        elif msg := _qualified_name_error(controller):
            causes.append(_invalid("reportingController", controller, msg))
        for fld, limit in (("reportingInstance", 128), ("action", 128), ("reason", 128)):
            value = str(ev.get(fld) or "")
            if not value:
                causes.append(_required(fld))
            elif len(value.encode()) > limit:
                causes.append(_invalid(fld, "", f"can have at most {limit} characters"))
        if len(str(ev.get("message") or "").encode()) > 1024:
            causes.append(_invalid("message", "", "can have at most 1024 characters"))
    if ns and not _DNS1123_LABEL.match(ns):
        causes.append(_invalid("namespace", ns, "a lowercase RFC 1123 label must consist of …"))

    if extra_rules and (not involved.get("kind") or not involved.get("name")):
        causes.append(
            Cause(
                "FieldValueRequired",
                "involvedObject",
                "Required value: stand-in rule: regarding must name the object (kind, name)",
            )
        )

    if group != EVENTS_GROUP:
        return causes

    series_changed = old is None or ev.get("series") != old.get("series")
    if series_changed and ev.get("series") is not None:
        series = ev["series"] or {}
        if int(series.get("count") or 0) < 2:
            causes.append(_invalid("series.count", "", "should be at least 2"))
        if _empty(series.get("lastObservedTime")):
            causes.append(_required("series.lastObservedTime"))

    if old is None:  # ValidateEventCreate
        name = str((ev.get("metadata") or {}).get("name") or "")
        if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            causes.append(
                _invalid("metadata.name", name, "a lowercase RFC 1123 subdomain must consist of …")
            )
        if not has_event_time:
            causes.append(_required("eventTime"))
        if ev.get("type") not in ("Normal", "Warning"):
            causes.append(_invalid("type", "", f"has invalid value: {ev.get('type') or ''}"))
        for fld in ("firstTimestamp", "lastTimestamp", "count"):
            if not _empty(ev.get(fld)):
                causes.append(_invalid(fld, "", "needs to be unset"))
        source = ev.get("source") or {}
        if source.get("component") or source.get("host"):
            causes.append(_invalid("source", "", "needs to be unset"))
    else:  # ValidateEventUpdate
        for fld in (
            "involvedObject",
            "reason",
            "message",
            "source",
            "firstTimestamp",
            "lastTimestamp",
            "count",
            "type",
            "eventTime",
            "action",
            "related",
            "reportingComponent",
            "reportingInstance",
        ):
            if ev.get(fld) != old.get(fld) and not (_empty(ev.get(fld)) and _empty(old.get(fld))):
                path = "reportingController" if fld == "reportingComponent" else fld
                causes.append(_invalid(path, ev.get(fld), "field is immutable"))
    return causes


def _qualified_name_error(value: str) -> str | None:
    prefix, _, name = value.rpartition("/")
    if "/" in value and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return "prefix part a lowercase RFC 1123 subdomain must consist of …"
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return "name part must consist of alphanumeric characters, '-', '_' or '.', …"
    return None


def check_event_times(ev: JSON, kind_desc: str) -> None:
    """Decode-time checks (400 like the real JSON decoder) on an internal Event."""
    micro = {
        "eventTime": ev.get("eventTime"),
        "series.lastObservedTime": _dig(ev, "series.lastObservedTime"),
    }
    for path, value in micro.items():
        if value is not None and not (
            isinstance(value, str) and _MICROTIME_RE.match(value) and _parses(value)
        ):
            raise _bad_request(
                f"{kind_desc} cannot be handled as a Event: {path}: parsing time"
                f' {json.dumps(value)} as "2006-01-02T15:04:05.000000Z07:00": cannot parse'
                " (MicroTime needs exactly 6 fractional digits and a zone)"
            )
    for path in ("firstTimestamp", "lastTimestamp", "metadata.creationTimestamp"):
        value = _dig(ev, path)
        if value is not None and not (
            isinstance(value, str) and _TIME_RE.match(value) and _parses(value)
        ):
            raise _bad_request(
                f"{kind_desc} cannot be handled as a Event: {path}: parsing time"
                f' {json.dumps(value)} as "2006-01-02T15:04:05Z07:00": cannot parse'
            )


def _parses(value: str) -> bool:
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _not_found_path() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def _not_found(resource: str, group: str, name: str) -> ApiError:
    qualified = f"{resource}.{group}" if group else resource
    details: JSON = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    return ApiError(404, "NotFound", f'{qualified} "{name}" not found', details)


def _already_exists(resource: str, group: str, name: str) -> ApiError:
    qualified = f"{resource}.{group}" if group else resource
    details: JSON = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    return ApiError(409, "AlreadyExists", f'{qualified} "{name}" already exists', details)
