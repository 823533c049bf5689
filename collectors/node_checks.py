"""What the node-setting checks share: their gauge, reading a sysctl, the fix they print.

``nodediag_node_check_ok{check}`` is one gauge for several collectors (node_sysctl,
overlay_mtu, resolver): :func:`check_gauge` makes it once per registry and each collector
sets its own checks (1 passes, 0 fails, no series when the check could not be made).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

SYSCTL_FILE = "/etc/sysctl.d/90-kubernetes-node.conf"
"""Where the printed fixes persist sysctls (any name under /etc/sysctl.d works)."""


def check_gauge(registry: CollectorRegistry) -> Gauge:
    """The registry's ``nodediag_node_check_ok`` gauge (made on first use)."""
    existing = registry._names_to_collectors.get("nodediag_node_check_ok")
    if isinstance(existing, Gauge):
        return existing
    return Gauge(
        "nodediag_node_check_ok",
        "1 if the node setting passes the check (bridge_netfilter, ip_forward, rp_filter,"
        " overlay_mtu, resolver), 0 if it breaks pod DNS; absent when it could not be read.",
        ["check"],
        registry=registry,
    )


def set_check(gauge: Gauge, check: str, ok: bool | None) -> None:
    """``ok`` None: the check could not be made, so the series goes away."""
    if ok is None:
        with contextlib.suppress(KeyError):
            gauge.remove(check)
    else:
        gauge.labels(check=check).set(1 if ok else 0)


def sysctl_path(proc: Path, parts: Sequence[str]) -> Path:
    """``("net", "ipv4", "conf", "flannel.1", "rp_filter")`` under ``proc/sys`` (parts, not a
    dotted name: interface names may hold dots)."""
    return proc.joinpath("sys", *parts)


def sysctl_name(parts: Sequence[str]) -> str:
    """The name ``sysctl`` takes: dots between parts, a dot inside a part written as ``/``."""
    return ".".join(part.replace(".", "/") for part in parts)


def read_sysctl(proc: Path, parts: Sequence[str]) -> int:
    """An integer sysctl; ``OSError`` (missing, unreadable) or ``ValueError`` (not a number)."""
    return int(sysctl_path(proc, parts).read_text().split()[0])


def sysctl_fix(settings: dict[str, int]) -> dict[str, str]:
    """The commands that set ``settings`` now and at every boot."""
    now = " ".join(f"{name}={value}" for name, value in settings.items())
    lines = "\\n".join(f"{name} = {value}" for name, value in settings.items())
    return {
        "fix": f"sysctl -w {now}",
        "fix_persistent": f"printf '{lines}\\n' >> {SYSCTL_FILE}",
    }
