"""The pod spec -> ``ctr run`` translator on the rendered manifests and on small specs: what
it expresses, and that it refuses what it cannot (so a manifest change cannot slip past the
image tests unnoticed)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import podspec
import pytest
from test_deploy import pod_spec, rendered

NETNS = Path("/run/netns/nodediag-node-x")


def _translate(spec: dict[str, Any], tmp_path: Path) -> podspec.CtrRun:
    return podspec.translate(
        spec,
        entrypoint=["nodediag"],
        cmd=["run"],
        downward={"spec.nodeName": "worker-1"},
        network_namespace=NETNS,
        host_path=lambda path: tmp_path / "host" / path.lstrip("/"),
        scratch=tmp_path / "scratch",
    )


def _base_with_host(tmp_path: Path) -> dict[str, Any]:
    """The rendered base pod spec, with the hostPaths of type Directory/File made."""
    spec = pod_spec(rendered("base"))
    for volume in spec["volumes"]:
        host = volume.get("hostPath", {})
        path = tmp_path / "host" / host.get("path", "").lstrip("/")
        if host.get("type") == "Directory":
            path.mkdir(parents=True, exist_ok=True)
        elif host.get("type") == "File":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    return spec


def test_the_rendered_daemonset(tmp_path: Path) -> None:
    run = _translate(_base_with_host(tmp_path), tmp_path)
    assert run.capabilities == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert "--cap-add=CAP_NET_ADMIN" in run.options
    assert "--cap-drop=CAP_CHOWN" in run.options and "--cap-drop=CAP_NET_RAW" not in run.options
    assert {"--read-only", "--seccomp"} <= set(run.options)
    assert "--allow-new-privs" not in run.options and run.no_new_privs
    assert run.argv == ["nodediag", "run"]
    assert run.env["NODE_NAME"] == "worker-1"
    assert run.memory_limit == 128 << 20
    assert run.qos == "burstable"
    assert run.options[run.options.index("--cpu-shares") + 1] == "10"  # requests.cpu 10m
    assert run.probes["livenessProbe"] == podspec.HttpProbe("/healthz", 9102)
    namespaces = [run.options[i + 1] for i, o in enumerate(run.options) if o == "--with-ns"]
    assert namespaces[0] == f"network:{NETNS}" and namespaces[1].startswith("pid:")
    # DirectoryOrCreate / FileOrCreate made what was missing, as the kubelet does.
    assert (tmp_path / "host/var/lib/nodediag").is_dir()
    assert (tmp_path / "host/run/xtables.lock").is_file()
    tmpfs = [o for o in run.options if o.startswith("type=tmpfs")]
    assert tmpfs == ["type=tmpfs,src=tmpfs,options=nosuid:nodev:mode=777:rw:size=16777216,dst=/tmp"]


def test_kmsg_component_is_privileged_without_seccomp(tmp_path: Path) -> None:
    spec = pod_spec(rendered("kmsg"))
    base = _base_with_host(tmp_path)
    spec["volumes"] = base["volumes"]
    run = _translate(spec, tmp_path)
    assert run.privileged and "--privileged" in run.options and "--allow-new-privs" in run.options
    assert not run.seccomp and "--seccomp" not in run.options
    assert "CAP_SYSLOG" in run.capabilities and run.env["NODEDIAG_KERNEL_LOG"] == "kmsg"


def test_capability_rules() -> None:
    assert podspec.capabilities({}) == podspec.RUNTIME_DEFAULT_CAPABILITIES
    dropped = podspec.capabilities({"capabilities": {"drop": ["NET_RAW"]}})
    assert dropped == podspec.RUNTIME_DEFAULT_CAPABILITIES - {"CAP_NET_RAW"}
    assert podspec.capabilities({"capabilities": {"drop": ["ALL"], "add": ["BPF"]}}) == {"CAP_BPF"}
    assert podspec.cap_names(0x3000) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}


@pytest.mark.parametrize(
    ("kind", "make", "error"),
    [
        ("Directory", None, podspec.PodStartError),
        ("File", None, podspec.PodStartError),
        ("File", "dir", podspec.PodStartError),
        ("Socket", "file", podspec.PodStartError),
        ("Directory", "dir", None),
        ("DirectoryOrCreate", None, None),
        ("FileOrCreate", None, None),
        ("", None, None),
    ],
)
def test_host_path_types(tmp_path: Path, kind: str, make: str | None, error: Any) -> None:
    path = tmp_path / "a" / "b"
    if make == "dir":
        path.mkdir(parents=True)
    elif make == "file":
        path.parent.mkdir(parents=True)
        path.touch()
    if error:
        with pytest.raises(error):
            podspec.check_host_path(path, kind)
    else:
        podspec.check_host_path(path, kind)
    if kind.endswith("OrCreate"):
        assert path.is_dir() if kind.startswith("Directory") else path.is_file()


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s["containers"][0].setdefault("lifecycle", {"preStop": {}}),
        lambda s: s["containers"][0]["securityContext"].update(runAsUser=10001),
        lambda s: s["containers"][0]["env"].append(
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
        ),
        lambda s: s["volumes"].append({"name": "cfg", "configMap": {"name": "c"}})
        or s["containers"][0]["volumeMounts"].append({"name": "cfg", "mountPath": "/cfg"}),
        lambda s: s.update(hostNetwork=False),
        lambda s: s.update(shareProcessNamespace=True),
        lambda s: s["containers"][0]["securityContext"].update(
            seccompProfile={"type": "Localhost", "localhostProfile": "x.json"}
        ),
    ],
    ids=["lifecycle", "runAsUser", "secretKeyRef", "configMap", "podNetwork", "unknownPodField",
         "localhostSeccomp"],
)  # fmt: skip
def test_what_cannot_be_expressed_is_refused(tmp_path: Path, change: Any) -> None:
    spec = copy.deepcopy(_base_with_host(tmp_path))
    change(spec)
    with pytest.raises(podspec.Unsupported):
        _translate(spec, tmp_path)


def test_what_the_kubelet_refuses_is_refused(tmp_path: Path) -> None:
    spec = _base_with_host(tmp_path)
    spec["containers"][0]["securityContext"]["runAsNonRoot"] = True
    with pytest.raises(podspec.PodStartError):
        _translate(spec, tmp_path)
    spec = _base_with_host(tmp_path)
    (tmp_path / "host/etc/machine-id").unlink()  # type: File
    with pytest.raises(podspec.PodStartError):
        _translate(spec, tmp_path)


@pytest.mark.parametrize(
    ("resources", "qos"),
    [
        ({}, "besteffort"),
        ({"limits": {"cpu": "1", "memory": "1Gi"}}, "guaranteed"),
        ({"limits": {"cpu": "1", "memory": "1Gi"},
          "requests": {"cpu": "1000m", "memory": "1024Mi"}}, "guaranteed"),
        ({"limits": {"memory": "1Gi"}}, "burstable"),
        ({"requests": {"cpu": "10m"}, "limits": {"cpu": "1", "memory": "1Gi"}}, "burstable"),
    ],
)  # fmt: skip
def test_qos_class(tmp_path: Path, resources: dict[str, Any], qos: str) -> None:
    spec = _base_with_host(tmp_path)
    spec["containers"][0]["resources"] = resources
    assert _translate(spec, tmp_path).qos == qos
