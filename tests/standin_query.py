"""The API stand-in's object operations: field and label selectors, merge / strategic merge /
JSON patches."""

from __future__ import annotations

import copy
import re
from typing import Any

from standin_validation import JSON, ApiError, _bad_request, _dig

# --------------------------------------------------------------------------- selectors


_POD_FIELDS = {
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
}
_EVENT_FIELDS = {
    "metadata.name",
    "metadata.namespace",
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
}
_NODE_FIELDS = {"metadata.name", "spec.unschedulable"}


def _parse_field_selector(text: str, allowed: set[str]) -> list[tuple[str, bool, str]]:
    terms: list[tuple[str, bool, str]] = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        m = re.match(r"^([^!=]+)(!=|==|=)(.*)$", raw)
        if not m:
            raise _bad_request(f"invalid selector: '{text}'; can't understand '{raw}'")
        key, op, value = m.group(1), m.group(2), m.group(3)
        if key not in allowed:
            raise _bad_request(f"field label not supported: {key}")
        terms.append((key, op == "!=", value))
    return terms


def _field_value(obj: JSON, key: str) -> str:
    value = _dig(obj, "source.component") if key == "source" else _dig(obj, key)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_label_selector(text: str) -> list[tuple[str, str, str]]:
    terms: list[tuple[str, str, str]] = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        if raw.startswith("!"):
            terms.append((raw[1:], "!exists", ""))
            continue
        m = re.match(r"^([^!=]+)(!=|==|=)(.*)$", raw)
        if m:
            terms.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
        else:
            terms.append((raw, "exists", ""))
    return terms


def _labels_match(obj: JSON, terms: list[tuple[str, str, str]]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, value in terms:
        if op == "exists" and key not in labels:
            return False
        if op == "!exists" and key in labels:
            return False
        if op == "=" and labels.get(key) != value:
            return False
        if op == "!=" and labels.get(key) == value:
            return False
    return True


# --------------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch for the objects served here: like a merge patch (no Event field
    has a patch merge key), plus the ``$patch: replace|delete`` directives on maps."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    body = {k: v for k, v in patch.items() if k != "$patch"}
    if directive == "replace":
        return copy.deepcopy(body)
    if directive is not None:
        raise _bad_request(f"Unknown patch directive: {directive!r}")
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in body.items():
        if key.startswith("$"):
            raise _bad_request(f"unsupported strategic merge directive {key!r}")
        if value is None:
            result.pop(key, None)
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _json_pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise _bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, test, copy, move)."""
    if not isinstance(ops, list):
        raise _bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(target)

    def parent(parts: list[str]) -> tuple[Any, str]:
        cur = doc
        for p in parts[:-1]:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return cur, parts[-1]

    def get(parts: list[str]) -> Any:
        cur = doc
        for p in parts:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return cur

    try:
        for op in ops:
            kind, parts = op["op"], _json_pointer(op["path"])
            if kind == "test":
                if get(parts) != op["value"]:
                    raise ApiError(422, "Invalid", f"testing value {op['path']} failed")
                continue
            if kind in ("copy", "move"):
                value = copy.deepcopy(get(_json_pointer(op["from"])))
                if kind == "move":
                    src, skey = parent(_json_pointer(op["from"]))
                    del src[int(skey) if isinstance(src, list) else skey]
                kind, op = "add", {"value": value}
            if not parts:
                doc = copy.deepcopy(op.get("value"))
                continue
            container, key = parent(parts)
            if kind == "add":
                if isinstance(container, list):
                    idx = len(container) if key == "-" else int(key)
                    container.insert(idx, copy.deepcopy(op["value"]))
                else:
                    container[key] = copy.deepcopy(op["value"])
            elif kind == "replace":
                get(parts)  # must exist
                container[int(key) if isinstance(container, list) else key] = copy.deepcopy(
                    op["value"]
                )
            elif kind == "remove":
                del container[int(key) if isinstance(container, list) else key]
            else:
                raise _bad_request(f"unknown json patch op {kind!r}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(422, "Invalid", f"the json patch could not be applied: {exc!r}") from exc
    return doc
