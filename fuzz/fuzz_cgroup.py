"""Fuzz the cgroup path attribution (collectors/cgroup_path.py) and the memory cgroup file
readers (collectors/memcg.py).

Input: up to three parts separated by NUL bytes: a cgroup path (as the kernel prints it in
an OOM report), a /proc/<pid>/status text and a memory.events / memory.oom_control text.
Seeds: the path shapes of tests/test_cgroup_path.py with matching status and counter files.

The counter and status texts are also read from files, through ``read_oom_kill_counter``,
``read_oom_kill_counters`` and ``MemcgProbe``, in a fixed tree in ``fuzz/corpus/work/cgroup``
(a container's cgroup with the counter file, /proc/<pid>/status, cgroup.procs): the fuzzed
text only fills files, it never names one. The files are written as UTF-8: the kernel
writes them, as ASCII but for the process name in the status file (a status file that
does not decode, or does not parse, is "no such process" to ``MemcgProbe.process``).

Invariants (by design, see the module docs):
- nothing raises (the path functions are documented as never raising; the readers skip
  what they cannot read);
- an attributed pod uid is in the path (with ``_`` for ``-`` on the systemd driver) and is a
  UUID or a 32-hex static pod hash; a container id is 64 hex digits of the path;
- the ``oom_kill`` counter is a non-negative number from an ``oom_kill`` line, the same read
  from a file as parsed from its text; the probe lists only pids of cgroup.procs.
"""

from __future__ import annotations

import re
import sys

import _common
import atheris

_common.enable_hooks(atheris)
with atheris.instrument_imports(include=["collectors"]):
    from collectors.cgroup_path import container_id_from_cgroup, parse_pod_cgroup
    from collectors.memcg import (
        MemcgProbe,
        parse_oom_kill_counter,
        parse_status,
        read_oom_kill_counter,
        read_oom_kill_counters,
    )

UID = "11112222-3333-4444-5555-666677778888"
CID = "0123456789abcdef" * 4
CONTAINER = f"/kubepods/burstable/pod{UID}/{CID}"
ROOT = _common.workdir("cgroup")
V2 = ROOT / "sys/fs/cgroup"  # the v2 hierarchy: memory.events
PID = 4242
_UID_RE = re.compile(r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32}")


def check_path(path: str) -> None:
    pod = parse_pod_cgroup(path)
    if pod is not None:
        assert pod.pod_uid in path or pod.pod_uid.replace("-", "_") in path, (path, pod)
        assert "_" not in pod.pod_uid and _UID_RE.fullmatch(pod.pod_uid), pod
        assert pod.qos in ("guaranteed", "burstable", "besteffort"), pod
        assert pod.driver in ("cgroupfs", "systemd"), pod
        assert pod.runtime in (None, "containerd", "crio", "docker"), pod
        if pod.container_id is not None:
            assert re.fullmatch("[0-9a-f]{64}", pod.container_id), pod
            assert pod.container_id in path
    container = container_id_from_cgroup(path)
    if container is not None:
        assert re.fullmatch("[0-9a-f]{64}", container) and container in path, container


def check_counter(text: str) -> None:
    counter = parse_oom_kill_counter(text)
    if counter is not None:
        assert counter >= 0 and "oom_kill " in text, counter
    directory = V2 / CONTAINER.lstrip("/")
    (directory / "memory.events").write_text(text, encoding="utf-8")
    assert read_oom_kill_counter(V2, CONTAINER) == counter
    expected = {} if counter is None else {CONTAINER: counter}
    assert read_oom_kill_counters(V2) == expected


def check_status(text: str) -> None:
    try:
        info = parse_status(PID, text)
    except ValueError:
        pass  # its one caller, MemcgProbe.process, takes ValueError for "no such process"
    else:
        assert info.pid == PID and (info.ns_pid is None or info.ns_pid >= 0), info
    (ROOT / f"proc/{PID}/status").write_text(text, encoding="utf-8")
    procs = V2 / CONTAINER.lstrip("/") / "cgroup.procs"
    procs.write_text(f"{PID}\n{text[:40]}\n", encoding="utf-8")
    members = MemcgProbe(ROOT).members(CONTAINER)
    assert members is not None and all(m.pid == PID for m in members), members


def test_one_input(data: bytes) -> None:
    parts = data.split(b"\0", 2)
    path, status, counter = [*parts, b"", b""][:3]
    check_path(path.decode("utf-8", "replace"))
    check_status(status.decode("utf-8", "replace"))
    check_counter(counter.decode("utf-8", "replace"))


def seeds() -> list[bytes]:
    systemd_uid = UID.replace("-", "_")
    paths = [
        CONTAINER,
        f"/kubepods/pod{UID}/crio-{CID}",
        f"/kubepods/besteffort/pod0f1e2d3c4b5a69788796a5b4c3d2e1f0/docker-{CID}",
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/"
        f"cri-containerd-{CID}.scope",
        f"/kubepods.slice/kubepods-pod{systemd_uid}.slice/crio-conmon-{CID}.scope",
        f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{systemd_uid}.slice/"
        f"docker-{CID}.scope",
        f"/docker/{CID}/kubepods/pod{UID}/libpod-{CID}",
        "/system.slice/containerd.service",
    ]
    status = "Name:\tworker\nState:\tS (sleeping)\nTgid:\t4242\nNSpid:\t4242\t1\n"
    counters = [
        "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n",
        "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n",
    ]
    return [f"{path}\0{status}\0{counter}".encode() for path in paths for counter in counters]


DICTIONARY = [
    b"/kubepods",
    b"/burstable",
    b"/besteffort",
    b"/pod",
    b".slice",
    b".scope",
    b"kubepods-burstable-pod",
    b"cri-containerd-",
    b"crio-conmon-",
    b"docker-",
    b"libpod-",
    b"oom_kill ",
    b"NSpid:\t",
    b"State:\t",
    b"Name:\t",
]


def _prepare_tree() -> None:
    (V2 / CONTAINER.lstrip("/")).mkdir(parents=True)
    (ROOT / f"proc/{PID}").mkdir(parents=True)


if __name__ == "__main__":
    _prepare_tree()
    atheris.Setup(_common.libfuzzer_argv("cgroup", seeds(), DICTIONARY), test_one_input)
    atheris.Fuzz()
    sys.exit(0)
