"""Benchmark: what the image's start costs in Python imports, as shipped (no bytecode: the
build strips it to keep the image small) and with the bytecode compiled in.

    .venv/bin/python bench/image_imports.py [--image localhost/nodediag:test] [--repeat 5]

Needs root and buildah, and an image built by ``scripts/build-image``. Each variant runs
in its own working container (``buildah run --network none``: no network at all): the
modules the agent imports at start are imported once per round in a fresh interpreter,
which reports its own CPU time, wall time and peak RSS. The compiled variant is the same
image after ``compileall --invalidation-mode unchecked-hash`` of the virtualenv and the
standard library (what a ``RUN`` line in the Dockerfile would add); its size is measured
on the working container's file system.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

IMPORTS = """
import json, resource, sys, time
started = time.perf_counter()
import agent.daemon, agent.kube, kubernetes.client, kubernetes.config, kubernetes.watch
import grpc, systemd.journal, pyroute2
from collectors.netfilter import nft_netlink_table, nft_socket
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu": usage.ru_utime + usage.ru_stime,
                  "wall": time.perf_counter() - started,
                  "rss_mib": usage.ru_maxrss / 1024, "modules": len(sys.modules)}))
"""
COMPILE = (
    "/opt/nodediag/bin/python -m compileall -q -j0 --invalidation-mode unchecked-hash"
    " /opt/nodediag/lib /usr/lib/python3*"
)
TREES = ("/opt/nodediag", "/usr/lib/python3")


def buildah(*args: str) -> str:
    done = subprocess.run(["buildah", *args], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def run_imports(container: str, script: Path) -> dict[str, float]:
    out = buildah(
        "run", "--network", "none", "-v", f"{script}:/imports.py:ro", container,
        "--", "/opt/nodediag/bin/python", "/imports.py",
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def tree_mib(container: str) -> float:
    root = Path(buildah("mount", container))
    try:
        total = 0
        for tree in TREES:
            for found in root.glob(tree.lstrip("/") + "*"):
                total += sum(p.stat().st_size for p in found.rglob("*") if p.is_file())
        return total / 2**20
    finally:
        buildah("umount", container)


def measure(image: str, compiled: bool, repeat: int, script: Path) -> dict[str, float]:
    container = buildah("from", image)
    try:
        if compiled:
            buildah("run", "--network", "none", container, "--", "sh", "-c", COMPILE)
        rounds = [run_imports(container, script) for _ in range(repeat + 1)][1:]
        row = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        row["tree_mib"] = tree_mib(container)
        return row
    finally:
        buildah("rm", container)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="localhost/nodediag:test")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("buildah") is None:
        sys.exit("buildah not found (Debian package buildah)")
    with tempfile.TemporaryDirectory() as scratch:
        script = Path(scratch, "imports.py")
        script.write_text(IMPORTS)
        shipped = measure(args.image, False, args.repeat, script)
        compiled = measure(args.image, True, args.repeat, script)
    print(f"image {args.image}, median of {args.repeat} starts (one warm-up dropped)\n")
    print("| variant | import CPU s | wall s | peak RSS MiB | modules | venv + stdlib MiB |")
    print("|---|---|---|---|---|---|")
    for name, row in (("as shipped (baseline)", shipped), ("bytecode compiled in", compiled)):
        print(
            f"| {name} | {row['cpu']:.2f} | {row['wall']:.2f} | {row['rss_mib']:.0f}"
            f" | {row['modules']:.0f} | {row['tree_mib']:.0f} |"
        )
    print(
        f"\nratio compiled / shipped: CPU {compiled['cpu'] / shipped['cpu']:.2f},"
        f" size +{compiled['tree_mib'] - shipped['tree_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
