"""A throwaway network namespace for the node checks' tests: links, sysctls and packets in
it are real kernel state, and the host's own namespace is never touched."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import realkernel
from agentproc import REPO


@dataclass
class NodeNetns:
    name: str

    def run(self, *argv: str, check: bool = True) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], check=check, capture_output=True, text=True
        )
        return done.stdout

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True, text=True)

    def write_sysctl(self, path: str, value: str | int) -> None:
        """Write ``/proc/sys/<path>`` inside the namespace (names with dots or underscores)."""
        self.run("sh", "-c", f"echo {value} > /proc/sys/{path}")

    def read_sysctl(self, path: str) -> str:
        return self.run("cat", f"/proc/sys/{path}").strip()

    def scan(self, host_root: Path, cluster_dns: str) -> subprocess.CompletedProcess[str]:
        """``nodediag scan --json`` inside the namespace, on ``host_root``, as node-x."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-m", "agent", "scan", "--json",
             "--no-kube", "--kernel-log", "kmsg", "--since", "1s", "--host-root",
             str(host_root), "--cluster-dns", cluster_dns, "--node-name", "node-x"],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip

    @property
    def inode(self) -> int:
        """The namespace's inode number (what the kernel log calls it)."""
        return os.stat(f"/run/netns/{self.name}").st_ino


@contextmanager
def throwaway_netns(prefix: str = "nodediag-nc") -> Iterator[NodeNetns]:
    """A fresh namespace ``<prefix>-<random>`` with ``lo`` up; deleted afterwards."""
    if os.geteuid() != 0:
        realkernel.skip_or_fail("needs root (network namespaces)")
    if shutil.which("ip") is None:
        realkernel.skip_or_fail("ip not found (Debian iproute2)")
    ns = NodeNetns(f"{prefix}-{secrets.token_hex(4)}")
    subprocess.run(["ip", "netns", "add", ns.name], check=True, capture_output=True)
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], check=False, capture_output=True)
