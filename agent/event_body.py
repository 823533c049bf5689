"""What a finding's Kubernetes Event looks like on the wire: the key that makes two findings
one series, the object it is about, the body of its create (``events.k8s.io/v1`` or
``core/v1``) and the patch of a repeat. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from agent.kube import JSON
from collectors.finding import Finding

REPORTING_CONTROLLER = "nodediag.io/agent"
ACTION = "Detected"
NOTE_LIMIT = 1024  # bytes, the API server's limit
EVENTS_GROUP: Final = "events.k8s.io"
NODE_EVENT_NAMESPACE = "default"
MERGE_PATCH = "application/merge-patch+json"

# Detail fields that tell one fault from another of the same reason on the same object.
_KEY_DETAILS: dict[str, tuple[str, ...]] = {
    "DNSDropRule": ("backend", "family", "table", "chain", "rule"),
    "DNSNoEndpointsReject": ("backend", "family", "table", "chain", "rule"),
    "VXLANChecksumOffload": ("interface",),
    "DNSProbeFailed": ("server", "protocol"),
    "NodeProcessOOMKill": ("memcg",),
}
_GENERIC_KEY_DETAILS = ("interface", "server", "rule", "chain", "table", "memcg")

Group = Literal["events.k8s.io", ""]


def isomorphic_key(finding: Finding) -> str:
    """What, besides object and reason, makes two findings the same fault."""
    subject = finding.subject
    if subject.kind == "Pod":
        return subject.container or subject.container_id or ""
    fields = _KEY_DETAILS.get(finding.reason, _GENERIC_KEY_DETAILS)
    details = finding.details
    return "|".join(f"{k}={details[k]}" for k in fields if details.get(k) is not None)


def event_type(finding: Finding) -> str:
    return "Warning" if finding.severity == "warning" else "Normal"


def trim_utf8(text: str, limit: int = NOTE_LIMIT) -> str:
    """``text`` in at most ``limit`` UTF-8 bytes, cut on a character boundary, ``…`` marking
    a cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    ellipsis = "…".encode()
    return data[: limit - len(ellipsis)].decode(errors="ignore") + "…"


def micro_time(when: datetime) -> str:
    """A ``metav1.MicroTime``: UTC, exactly 6 fractional digits (the server insists)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Regarding:
    kind: Literal["Pod", "Node"]
    name: str
    namespace: str | None
    uid: str | None

    def ref(self) -> JSON:
        ref: JSON = {"apiVersion": "v1", "kind": self.kind, "name": self.name}
        if self.namespace:
            ref["namespace"] = self.namespace
        if self.uid:
            ref["uid"] = self.uid
        return ref

    @property
    def event_namespace(self) -> str:
        return self.namespace or NODE_EVENT_NAMESPACE


def event_body(
    finding: Finding,
    regarding: Regarding,
    name: str,
    group: Group,
    count: int,
    *,
    first_time: datetime,
    last_time: datetime,
    instance: str,
    node: str,
) -> JSON:
    """The Event to create for ``finding`` (``count`` findings so far) in API group
    ``group`` ("": core/v1)."""
    note = trim_utf8(finding.message)
    meta = {"name": name, "namespace": regarding.event_namespace}
    series_field = (
        {"series": {"count": count, "lastObservedTime": micro_time(last_time)}} if count > 1 else {}
    )
    common: JSON = {
        "metadata": meta,
        "eventTime": micro_time(first_time),
        "action": ACTION,
        "reason": finding.reason,
        "type": event_type(finding),
        "reportingInstance": instance,
        **series_field,
    }
    if group:
        return {
            "apiVersion": f"{EVENTS_GROUP}/v1",
            "kind": "Event",
            **common,
            "regarding": regarding.ref(),
            "note": note,
            "reportingController": REPORTING_CONTROLLER,
        }
    return {
        "apiVersion": "v1",
        "kind": "Event",
        **common,
        "involvedObject": regarding.ref(),
        "message": note,
        "reportingComponent": REPORTING_CONTROLLER,
        "source": {"component": REPORTING_CONTROLLER, "host": node},
        **({"count": count} if count > 1 else {}),
    }


def events_path(group: Group, namespace: str) -> str:
    base = f"/apis/{EVENTS_GROUP}/v1" if group else "/api/v1"
    return f"{base}/namespaces/{namespace}/events"


def series_patch(count: int, last_time: datetime, group: Group) -> JSON:
    patch: JSON = {"series": {"count": count, "lastObservedTime": micro_time(last_time)}}
    if not group:
        patch["count"] = count  # what `kubectl get events` shows for core/v1 Events
    return patch
