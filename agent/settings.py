"""Settings: one documented field each, filled from flags or ``NODEDIAG_<FLAG>`` variables."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

KernelLogChoice = Literal["auto", "journal", "kmsg"]
DEFAULT_CONTAINERD_SOCKETS = (
    "/run/containerd/containerd.sock",
    "/run/k3s/containerd/containerd.sock",
)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Settings:
    """Everything the agent can be told. Defaults fit a node where it runs as root."""

    node_name: str = field(
        default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname()
    )
    """Name of this node, the subject of node-level findings (``--node-name``)."""

    host_root: Path = Path("/")
    """Where the host's filesystem is mounted: ``/`` on the host, ``/host`` in the DaemonSet."""

    state_dir: Path = Path("/var/lib/nodediag")
    """Where the kernel-log resume position is kept across restarts."""

    kernel_log: KernelLogChoice = "auto"
    """``journal``, ``kmsg``, or ``auto``: journald when a journal with kernel entries exists."""

    journal_path: Path | None = None
    """A journal directory or file to read instead of the host's own journal directories."""

    kmsg_path: Path = Path("/dev/kmsg")
    """The kernel's record device (a path so tests can point elsewhere)."""

    listen: tuple[str, int] = ("0.0.0.0", 9102)
    """Address and port serving ``/metrics``, ``/healthz`` and ``/readyz``."""

    web_config_file: Path | None = None
    """TLS, client certificates and basic auth for that endpoint, in the format of the
    exporters' ``--web.config.file`` (agent/web_config.py); None: plain HTTP, no auth."""

    kubeconfig: Path | None = None
    """Kubeconfig to use; else in-cluster config, else ``$KUBECONFIG``."""

    service_account_dir: Path = field(
        default_factory=lambda: Path(
            os.environ.get("NODEDIAG_SERVICE_ACCOUNT_DIR")
            or "/var/run/secrets/kubernetes.io/serviceaccount"
        )
    )
    """In-cluster credentials (``token``, ``ca.crt``, ``namespace``) as kubelet projects
    them; ``$NODEDIAG_SERVICE_ACCOUNT_DIR`` points elsewhere (tests)."""

    no_kube: bool = False
    """Never talk to the Kubernetes API: findings go to the log and metrics only."""

    fix_vxlan_offload: bool = False
    """Opt-in remediation: turn tx-checksum offload off on VXLAN links at risk."""

    containerd_sockets: tuple[str, ...] = DEFAULT_CONTAINERD_SOCKETS
    """containerd sockets to probe, under ``host_root``."""

    cluster_dns: tuple[str, ...] = ()
    """Cluster DNS server IPs; empty means discover them."""

    pod_cidrs: tuple[str, ...] = ()
    """This node's pod CIDRs; empty means: from the node's routes and CNI config, else from
    its Node object."""

    collect_interval: float = 60.0
    """Seconds between runs of the periodic collectors (firewall, VXLAN offload, DNS probe)."""

    dns_probe_name: str = "kubernetes.default.svc.cluster.local"
    """The name the DNS probe asks the cluster DNS for (any answer, even NXDOMAIN, is up)."""

    live_evidence_window: float = 10.0
    """A kill younger than this (seconds) is judged from the node itself: a container cgroup
    found empty then means the kill ended the container."""

    idle_flush_seconds: float = 0.05
    """How long the kernel log must stay quiet before a held-back OOM kill is reported.

    The hold is for a ``memory.oom.group`` line: the kernel prints it right after the
    ``Killed process`` line (same oom_kill_process call, under oom_lock), and journald
    writes both from one /dev/kmsg burst, so it is in the log within a few ms; every
    millisecond of hold is detection latency (bench/RESULTS.md)."""

    def resolve(self, path: str | Path) -> Path:
        """A host path seen from here (under ``host_root``)."""
        return self.host_root / str(path).lstrip("/")


def parse_duration(text: str) -> timedelta:
    """``90s``, ``10m``, ``2h``, ``1d`` → timedelta; ``ValueError`` naming the bad value."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"invalid duration {text!r} (use e.g. 90s, 10m, 2h, 1d)")
    return timedelta(seconds=float(match[1]) * _DURATION_UNITS[match[2]])


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ``ValueError`` when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid listen address {text!r} (use host:port, e.g. 0.0.0.0:9102)")
    return host.strip("[]") or "0.0.0.0", int(port)
