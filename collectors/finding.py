"""Finding: the one dataclass every detector produces and every sink consumes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

Severity = Literal["warning", "info", "error"]
"""``error``: nodediag could not check something (``CollectorFailed``), not a node fault."""
SubjectKind = Literal["Pod", "Node"]


@dataclass(frozen=True, slots=True)
class Subject:
    """The object a finding is about. Unknown fields are ``None``, never guessed."""

    kind: SubjectKind
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    container: str | None = None
    container_id: str | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """A fault found on the node, in the JSON line form of DESIGN.md."""

    reason: str
    severity: Severity
    time: datetime | None
    node: str
    subject: Subject
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def on_node(
        cls,
        reason: str,
        node: str,
        message: str,
        details: dict[str, Any],
        *,
        severity: Severity = "warning",
        time: datetime | None = None,
    ) -> Finding:
        """A finding whose subject is this node (firewall, offload, DNS probe faults)."""
        return cls(
            reason=reason,
            severity=severity,
            time=time,
            node=node,
            subject=Subject(kind="Node", name=node),
            message=message,
            details=details,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "severity": self.severity,
            "time": self.time.isoformat() if self.time else None,
            "node": self.node,
            "subject": asdict(self.subject),
            "details": self.details,
            "message": self.message,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False, default=str)
