"""pyroute2 imported from two threads at once (the periodic collectors and the VXLAN link
watch of ``nodediag run``): before the import lock, an agent's first firewall run crashed with
``_DeadlockError`` in 3 of 4 starts of tests/test_dns_faults_e2e.py. Each round here is a
fresh interpreter (in a network namespace of its own, empty) whose two threads start the
real lazy paths at the same moment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import realkernel

REPO = Path(__file__).resolve().parent.parent
ROUND = """
import threading, traceback
from collectors.firewall_reader import host_netlink
from prometheus_client import CollectorRegistry
from collectors.vxlan import VxlanCollector

start = threading.Barrier(3)
errors = []

def run(action):
    start.wait()
    try:
        action()
    except BaseException:
        errors.append(traceback.format_exc())

stopped = threading.Event()
stopped.set()
watch = VxlanCollector("n", CollectorRegistry(), fix=True).watch_links
paths = [lambda: host_netlink().close(), lambda: watch(stopped)]
threads = [threading.Thread(target=run, args=(path,)) for path in paths]
for thread in threads:
    thread.start()
start.wait()
for thread in threads:
    thread.join()
print("".join(errors) or "ok")
"""


@pytest.mark.root
def test_two_threads_loading_pyroute2_at_once_do_not_deadlock() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        realkernel.skip_or_fail("needs root and unshare (util-linux) for a network namespace")
    for _ in range(8):
        done = subprocess.run(
            ["unshare", "--net", sys.executable, "-c", ROUND],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok", done.stdout
