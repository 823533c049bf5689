"""Shutdown: SIGTERM → exit of ``nodediag run`` (the kubelet allows a pod 30 s), with the
Event sink and a quiet pod watch open against ``tests/kube_standin.py``, against a baseline
of ``--no-kube`` in the same run.

    .venv/bin/python bench/shutdown.py [--repeat 5] [--source DIR]

``--source DIR``: run the agent from another tree (e.g. an older commit:
``git archive <commit> | tar -x -C DIR``) to compare. No root needed (``--kernel-log kmsg``
falls back to what the user may read; the kernel log is not what is measured).
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import kube_standin as ks  # noqa: E402

NODE = "node-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError("/readyz never answered 200")


def one_stop(source: Path, api: ks.KubeStandin | None, scratch: Path) -> float:
    """Seconds from SIGTERM to the agent's exit (status 0 required)."""
    port = _free_port()
    kube = ["--kubeconfig", str(api.write_kubeconfig(scratch / "kc"))] if api else ["--no-kube"]
    argv = [sys.executable, "-m", "agent", "run", "--listen", f"127.0.0.1:{port}", *kube,
            "--kernel-log", "kmsg", "--state-dir", str(scratch / "state"), "--node-name", NODE,
            "--containerd-socket", str(scratch / "none.sock"),
            "--cluster-dns", "127.0.0.1"]  # fmt: skip
    started = time.time()
    proc = subprocess.Popen(argv, cwd=source, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _ready(port, proc)
        if api is not None:

            def watching(s: ks.KubeStandin) -> bool:
                return any(r.query.get("watch") and r.time >= started for r in s.requests)

            if not api.wait_for(watching, 30):
                raise TimeoutError("no pod watch opened")
        time.sleep(1.0)  # quiet: no pod changes, no findings to write
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if status != 0:
        raise RuntimeError(f"exit status {status}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--source", type=Path, default=REPO)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"--no-kube (baseline)": [], "Events + quiet pod watch": []}
    with ks.running() as api:
        api.add_node(NODE)
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as scratch:
                rows["--no-kube (baseline)"].append(one_stop(args.source, None, Path(scratch)))
            with tempfile.TemporaryDirectory() as scratch:
                rows["Events + quiet pod watch"].append(one_stop(args.source, api, Path(scratch)))
    baseline = statistics.median(rows["--no-kube (baseline)"])
    print(f"source: {args.source}\n")
    print("| agent | SIGTERM → exit, s (median) | max | ratio to baseline |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {max(values):.2f} | {median / baseline:.1f} |")


if __name__ == "__main__":
    main()
