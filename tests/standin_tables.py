"""Server-side printing for the API stand-in: ``kubectl get`` asks for a ``meta.k8s.io``
``Table`` (``Accept: application/json;as=Table;v=v1;g=meta.k8s.io``) and prints its cells.

Events are printed as kube-apiserver's ``pkg/printers/internalversion`` ``printEvent`` does
(the server always generates the wide columns; kubectl hides those with priority > 0):
an events.k8s.io Event's ``series`` gives the count and "last seen", its ``eventTime`` the
"first seen" when it has no ``firstTimestamp``; the object is ``<kind lower-case>/<name>``.
Ages are ``duration.HumanDuration``. Each row carries the object's metadata
(``PartialObjectMetadata``, the server's default ``includeObject=Metadata``), from which
kubectl takes the NAMESPACE column of ``-A``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from standin_validation import JSON

_EVENT_COLUMNS: list[tuple[str, int, str]] = [
    ("Last Seen", 0, ""),
    ("Type", 0, ""),
    ("Reason", 0, ""),
    ("Object", 0, ""),
    ("Subobject", 1, ""),
    ("Source", 1, ""),
    ("Message", 0, ""),
    ("First Seen", 1, ""),
    ("Count", 1, ""),
    ("Name", 1, "name"),
]


def wants_table(accept: str) -> bool:
    return any("as=Table" in part and "g=meta.k8s.io" in part for part in accept.split(","))


def human_duration(seconds: float) -> str:
    """``k8s.io/apimachinery/pkg/util/duration.HumanDuration``."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes = whole // 60
    if minutes < 10:
        return f"{minutes}m{whole % 60}s" if whole % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = whole // 3600
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    return f"{hours // 24}d"


def _since(stamp: Any, now: dt.datetime) -> str:
    if not stamp:
        return "<unknown>"
    when = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    return human_duration((now - when).total_seconds())


def event_row(event: JSON, now: dt.datetime) -> list[Any]:
    """The wide cells of one core/v1 (internal-named) Event."""
    first = _since(event.get("firstTimestamp"), now)
    if not event.get("firstTimestamp"):
        first = _since(event.get("eventTime"), now)
    last = _since(event.get("lastTimestamp"), now) if event.get("lastTimestamp") else first
    count = event.get("count") or 0
    series = event.get("series")
    if series:
        last = _since(series.get("lastObservedTime"), now)
        count = series.get("count") or 0
    elif not count:
        count = 1
    involved = event.get("involvedObject") or {}
    kind = str(involved.get("kind") or "").lower()
    target = f"{kind}/{involved['name']}" if involved.get("name") else kind
    source = event.get("source") or {}
    component = source.get("component") or event.get("reportingComponent") or ""
    instance = source.get("host") or event.get("reportingInstance") or ""
    return [
        last,
        event.get("type") or "",
        event.get("reason") or "",
        target,
        involved.get("fieldPath") or "",
        f"{component}, {instance}" if instance else component,
        str(event.get("message") or "").strip(),
        first,
        int(count),
        event["metadata"]["name"],
    ]


def event_table(events: list[JSON], resource_version: str, now: dt.datetime) -> JSON:
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [
            {
                "name": name,
                "type": "integer" if name == "Count" else "string",
                "format": fmt,
                "description": name,
                "priority": priority,
            }
            for name, priority, fmt in _EVENT_COLUMNS
        ],
        "rows": [
            {
                "cells": event_row(event, now),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": event["metadata"],
                },
            }
            for event in events
        ],
    }
