"""Debian's ``kubectl`` (package ``kubernetes-client``, 1.20) for the tests.

It is unpacked, not installed: on some machines ``/usr/bin/kubectl`` belongs to another
package, and both cannot be installed at once. ``scripts/test`` unpacks it into
``.venv/kubernetes-client`` (``apt-get download`` + ``dpkg-deb -x``); ``$NODEDIAG_TEST_KUBECTL``
points elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNPACKED = REPO / ".venv" / "kubernetes-client" / "usr" / "bin" / "kubectl"


def debian_kubectl() -> Path | None:
    path = Path(os.environ.get("NODEDIAG_TEST_KUBECTL") or UNPACKED)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def client_version(kubectl: Path) -> str:
    out = subprocess.run([str(kubectl), "version", "--client", "-o", "json"],
                         capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip
    return str(json.loads(out)["clientVersion"]["gitVersion"])


def run(kubectl: Path, kubeconfig: Path, *args: str, netns: str | None = None) -> str:
    """``kubectl ARGS`` against ``kubeconfig`` (from inside test network namespace ``netns``
    when given); its stdout (an error names stderr)."""
    where = ["ip", "netns", "exec", netns] if netns else []
    result = subprocess.run(
        [*where, str(kubectl), "--kubeconfig", str(kubeconfig),
         "--cache-dir", str(kubeconfig.parent / "kubectl-cache"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.returncode}: {result.stderr}")
    return result.stdout


def table(text: str) -> list[dict[str, str]]:
    """kubectl's column output as rows keyed by header (columns split at the header's
    offsets: cells may hold single spaces)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    # A header like "LAST SEEN" has one space inside: keep words joined by one space.
    starts = [s for s in starts if s == 0 or header[s - 2] == " "]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    names = [header[a:b].strip() for a, b in bounds]
    return [{n: line[a:b].strip() for n, (a, b) in zip(names, bounds, strict=True)}
            for line in lines[1:]]  # fmt: skip


def events_section(describe: str) -> list[str]:
    """The rows under ``Events:`` in ``kubectl describe`` output."""
    lines = describe.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Events:"))
    return [line.strip() for line in lines[start + 3 :] if line.strip()]
