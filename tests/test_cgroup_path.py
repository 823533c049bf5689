"""Kubernetes attribution from cgroup paths (collectors.cgroup_path)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collectors.cgroup_path import (
    PodCgroup,
    QosClass,
    container_id_from_cgroup,
    parse_pod_cgroup,
)

UID = "11112222-3333-4444-5555-666677778888"
SYSTEMD_UID = UID.replace("-", "_")
STATIC_UID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"  # mirror pods: a 32-hex manifest hash
CID = "0123456789abcdef" * 4
OTHER_CID = "fedcba9876543210" * 4


def systemd_path(qos: str, scope: str) -> str:
    """A systemd-driver path; ``qos`` is "" for Guaranteed pods."""
    if not qos:
        return f"/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/{scope}"
    return f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{SYSTEMD_UID}.slice/{scope}"


def cgroupfs_path(qos: str, container: str) -> str:
    """A cgroupfs-driver path; ``qos`` is "" for Guaranteed pods."""
    qos_level = f"/{qos}" if qos else ""
    return f"/kubepods{qos_level}/pod{UID}/{container}"


QOS_LEVELS: list[tuple[str, QosClass]] = [
    ("", "guaranteed"),
    ("burstable", "burstable"),
    ("besteffort", "besteffort"),
]
SYSTEMD_SCOPES = [
    (f"cri-containerd-{CID}.scope", "containerd"),
    (f"crio-{CID}.scope", "crio"),
    (f"crio-conmon-{CID}.scope", "crio"),  # conmon of that container: same id, runtime crio
    (f"docker-{CID}.scope", "docker"),
]
CGROUPFS_DIRS = [
    (CID, None),  # containerd and docker: the bare id says nothing about the runtime
    (f"crio-{CID}", "crio"),
    (f"cri-containerd-{CID}", "containerd"),
    (f"docker-{CID}", "docker"),
]


@pytest.mark.parametrize(("qos_level", "qos"), QOS_LEVELS)
@pytest.mark.parametrize(("scope", "runtime"), SYSTEMD_SCOPES)
def test_systemd_driver(qos_level: str, qos: QosClass, scope: str, runtime: str) -> None:
    assert parse_pod_cgroup(systemd_path(qos_level, scope)) == PodCgroup(
        UID, qos, CID, runtime, "systemd"
    )


@pytest.mark.parametrize(("qos_level", "qos"), QOS_LEVELS)
@pytest.mark.parametrize(("container", "runtime"), CGROUPFS_DIRS)
def test_cgroupfs_driver(
    qos_level: str, qos: QosClass, container: str, runtime: str | None
) -> None:
    assert parse_pod_cgroup(cgroupfs_path(qos_level, container)) == PodCgroup(
        UID, qos, CID, runtime, "cgroupfs"
    )


VECTORS: list[tuple[str, PodCgroup | None]] = [
    # pod level: no container
    (f"/kubepods/burstable/pod{UID}", PodCgroup(UID, "burstable", None, None, "cgroupfs")),
    (f"/kubepods/pod{UID}/", PodCgroup(UID, "guaranteed", None, None, "cgroupfs")),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice",
        PodCgroup(UID, "besteffort", None, None, "systemd"),
    ),
    # an unknown level below the pod is not a container
    (
        f"/kubepods/besteffort/pod{UID}/not-a-container/{CID}",
        PodCgroup(UID, "besteffort", None, None, "cgroupfs"),
    ),
    # trailing slash, sub-cgroups below the container
    (f"/kubepods/pod{UID}/{CID}/", PodCgroup(UID, "guaranteed", CID, None, "cgroupfs")),
    (
        f"/kubepods/burstable/pod{UID}/{CID}/init",
        PodCgroup(UID, "burstable", CID, None, "cgroupfs"),
    ),
    (
        systemd_path("burstable", f"crio-{CID}.scope/container"),
        PodCgroup(UID, "burstable", CID, "crio", "systemd"),
    ),
    # nested hosts: the last kubepods counts
    (
        f"/docker/{OTHER_CID}/kubepods/burstable/pod{UID}/{CID}",
        PodCgroup(UID, "burstable", CID, None, "cgroupfs"),
    ),
    (
        f"/nodediag-test-x/kubepods/besteffort/pod{UID}/{CID}",
        PodCgroup(UID, "besteffort", CID, None, "cgroupfs"),
    ),
    (
        f"/actions_job/{OTHER_CID}/kubepods/pod{UID}/{CID}",
        PodCgroup(UID, "guaranteed", CID, None, "cgroupfs"),
    ),
    (
        f"/kubepods/burstable/pod{STATIC_UID}/{OTHER_CID}/kubepods/besteffort/pod{UID}/{CID}",
        PodCgroup(UID, "besteffort", CID, None, "cgroupfs"),
    ),
    (
        "/system.slice/docker-" + OTHER_CID + ".scope" + systemd_path("", f"docker-{CID}.scope"),
        PodCgroup(UID, "guaranteed", CID, "docker", "systemd"),
    ),
    # kind: kubelet --cgroup-root=/kubelet with the systemd driver
    (
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/"
        f"kubelet-kubepods-burstable-pod{SYSTEMD_UID}.slice/cri-containerd-{CID}.scope",
        PodCgroup(UID, "burstable", CID, "containerd", "systemd"),
    ),
    (
        f"/kubelet/kubepods/besteffort/pod{UID}/{CID}",
        PodCgroup(UID, "besteffort", CID, None, "cgroupfs"),
    ),
    # static (mirror) pods: 32-hex uid, no dashes
    (
        f"/kubepods/burstable/pod{STATIC_UID}/{CID}",
        PodCgroup(STATIC_UID, "burstable", CID, None, "cgroupfs"),
    ),
    (
        f"/kubepods.slice/kubepods-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope",
        PodCgroup(STATIC_UID, "guaranteed", CID, "containerd", "systemd"),
    ),
    # /proc/<pid>/cgroup lines work as they are
    (f"0::/kubepods/pod{UID}/{CID}", PodCgroup(UID, "guaranteed", CID, None, "cgroupfs")),
    # outside any pod
    ("/", None),
    ("", None),
    ("/system.slice/foo.service", None),
    ("/system.slice/containerd.service", None),
    ("/user.slice/user-1000.slice/session-2.scope", None),
    (f"/system.slice/docker-{CID}.scope", None),
    ("/kubepods", None),
    ("/kubepods/burstable", None),
    ("/kubepods.slice", None),
    ("/kubepods.slice/kubepods-burstable.slice", None),
    (f"/kubepods/guaranteed/pod{UID}/{CID}", None),  # cgroupfs has no "guaranteed" level
    (f"/kubepods/burstable/{CID}", None),
    ("/kubepods/burstable/podnot-a-uid/" + CID, None),
    (f"/kubepods/burstable/pod{UID[:-1]}/{CID}", None),
    (f"/kubepods.slice/kubepods-burstable-pod{UID}.slice/{CID}", None),  # dashes in a slice
    (f"/kubepods.slice/kubepods-guaranteed-pod{SYSTEMD_UID}.slice", None),
    # the last kubepods level has no pod
    (f"/kubepods/pod{UID}/{CID}/kubepods", None),
    ("kubepods/pod/\x00/\udcff", None),
]


@pytest.mark.parametrize(("path", "expected"), VECTORS)
def test_parse_pod_cgroup_vectors(path: str, expected: PodCgroup | None) -> None:
    assert parse_pod_cgroup(path) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (cgroupfs_path("burstable", CID), CID),
        (systemd_path("", f"crio-conmon-{CID}.scope"), CID),
        (f"/system.slice/docker-{CID}.scope", CID),
        (f"/docker/{CID}", CID),
        (f"/default/{CID}", CID),  # ctr run, containerd namespace "default"
        (f"/machine.slice/libpod-{CID}.scope/container", CID),
        (f"/docker/{OTHER_CID}/kubepods/pod{UID}/{CID}/init", CID),  # the innermost
        (f"/kubepods/burstable/pod{UID}", None),
        ("/system.slice/containerd.service", None),
        ("/", None),
        ("", None),
        (CID[:-1], None),
        (CID.upper(), None),
        (f"/x/{CID}0", None),
    ],
)
def test_container_id_from_cgroup(path: str, expected: str | None) -> None:
    assert container_id_from_cgroup(path) == expected


def test_pod_container_id_agrees_with_container_id_from_cgroup() -> None:
    for path, expected in VECTORS:
        if expected is not None and expected.container_id is not None:
            assert container_id_from_cgroup(path) == expected.container_id


LEVELS = st.sampled_from(
    [
        "kubepods",
        "kubepods.slice",
        "kubelet-kubepods.slice",
        "burstable",
        "besteffort",
        "kubepods-burstable.slice",
        f"pod{UID}",
        f"pod{STATIC_UID}",
        f"kubepods-burstable-pod{SYSTEMD_UID}.slice",
        f"kubepods-pod{SYSTEMD_UID}.slice",
        CID,
        f"crio-{CID}.scope",
        f"crio-conmon-{CID}",
        "",
        "..",
    ]
)


@given(st.text())
def test_never_raises_on_arbitrary_text(path: str) -> None:
    result = parse_pod_cgroup(path)
    assert result is None or isinstance(result, PodCgroup)
    container_id_from_cgroup(path)


@given(st.lists(LEVELS | st.text(alphabet="abcdef0123456789-_./kubepodslice", max_size=70)))
def test_never_raises_on_almost_valid_paths(levels: list[str]) -> None:
    path = "/" + "/".join(levels)
    result = parse_pod_cgroup(path)
    if result is not None:
        assert result.pod_uid in path or result.pod_uid.replace("-", "_") in path
        assert "_" not in result.pod_uid
        assert result.container_id is None or len(result.container_id) == 64
