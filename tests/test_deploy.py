"""The deployment: the kustomize base and its components render and validate against the
official Kubernetes schemas, the RBAC rules equal the API calls the code makes, the mounts
match the paths the agent reads, the dashboard and rules use metrics the agent exports, and
the Dockerfile's inputs exist and build as a wheel.

``kubectl kustomize`` is not installable from the registries these machines reach (Debian's
``kubernetes-client`` 1.20 predates kustomize components), so :func:`render` implements the
subset the manifests use — ``resources``, ``components``, ``images`` and JSON 6902
``patches`` with a ``target`` — and, where a ``kubectl`` with kustomize v4+ is on ``PATH``,
a test checks it renders the same objects.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "daemonset"
COMPONENTS = sorted(p.name for p in (BASE / "components").iterdir() if p.is_dir())
SCHEMA_VERSION = kubernetes_validate.utils.latest_version()
CRDS = {"monitoring.coreos.com/v1"}

Obj = dict[str, Any]


# ----------------------------------------------------------------------------- rendering


def render(directory: Path, components: list[Path] | None = None) -> list[Obj]:
    """The objects ``kustomize build`` makes of ``directory`` plus extra ``components``."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[Obj] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    extra = components or []
    for component in [directory / c for c in kustomization.get("components", [])] + extra:
        spec = yaml.safe_load((component / "kustomization.yaml").read_text())
        assert spec["kind"] == "Component", component
        known = {"apiVersion", "kind", "resources", "patches"}
        assert set(spec) <= known, f"{component}: unsupported keys"
        for resource in spec.get("resources", []):
            objects.extend(d for d in yaml.safe_load_all((component / resource).read_text()) if d)
        _apply_patches(objects, spec.get("patches", []))
    _apply_patches(objects, kustomization.get("patches", []))
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    new_tag = image.get("newTag", tag)
                    container["image"] = image.get("newName", name) + (
                        f":{new_tag}" if new_tag else ""
                    )
    return objects


def _containers(obj: Obj) -> list[Obj]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _apply_patches(objects: list[Obj], patches: list[Obj]) -> None:
    for patch in patches:
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        matched = [o for o in objects if _matches(o, target)]
        assert matched, f"patch target {target} matches nothing"
        for obj in matched:
            for op in ops:
                _json_patch(obj, op)


def _matches(obj: Obj, target: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": obj["kind"]}
    wanted["name"] = obj["metadata"]["name"]
    return all(wanted.get(k) == v for k, v in target.items() if k in wanted)


def _json_patch(doc: Obj, op: Obj) -> None:
    """RFC 6902 add/replace/remove (what the components use)."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(op.get("value"))
    if isinstance(node, list):
        if op["op"] == "add":
            node.insert(len(node) if last == "-" else int(last), value)
        elif op["op"] == "replace":
            node[int(last)] = value
        else:
            del node[int(last)]
    elif op["op"] == "add":
        node[last] = value
    elif op["op"] == "replace":
        assert last in node, f"replace of missing {op['path']}"
        node[last] = value
    else:
        del node[last]


VARIANTS: dict[str, list[Path]] = {"base": []} | {
    name: [BASE / "components" / name] for name in COMPONENTS
}


def rendered(variant: str) -> list[Obj]:
    return render(BASE, VARIANTS[variant])


def the(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def pod_spec(objects: list[Obj]) -> Obj:
    spec: Obj = the(objects, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def container(objects: list[Obj]) -> Obj:
    containers = pod_spec(objects)["containers"]
    assert len(containers) == 1
    found: Obj = containers[0]
    return found


def env(objects: list[Obj]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objects)["env"]}


# ----------------------------------------------------------------------------- rendering tests


def test_components_exist() -> None:
    assert set(COMPONENTS) == {"kmsg", "fix-vxlan-offload", "tls"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_validates_against_the_official_schemas(variant: str) -> None:
    objects = rendered(variant)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet",
         "Service", "ServiceMonitor", "PrometheusRule"]
        + (["ConfigMap"] if variant == "tls" else [])
    )  # fmt: skip
    for obj in objects:
        if obj["apiVersion"] in CRDS:
            continue  # not in the core schemas: see test_prometheus_operator_objects
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
        if obj["kind"] not in {"Namespace", "ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["namespace"] == "nodediag", obj["kind"]


def test_prometheus_operator_objects() -> None:
    objects = rendered("base")
    service = the(objects, "Service")
    monitor = the(objects, "ServiceMonitor")
    assert service["spec"]["clusterIP"] == "None"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["nodediag"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in ports and ports[endpoint["port"]]["port"] == 9102
    assert endpoint["path"] == "/metrics"
    selector = service["spec"]["selector"]
    pod_labels = the(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    # The rules themselves: promtool in tests/test_alerts.py; here the CRD's shape.
    rule = the(objects, "PrometheusRule")
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}


def test_daemonset_contract() -> None:
    objects = rendered("base")
    daemonset = the(objects, "DaemonSet")
    spec = pod_spec(objects)
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["serviceAccountName"] == the(objects, "ServiceAccount")["metadata"]["name"]
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"]
    agent = container(objects)
    assert agent["image"] == "ghcr.io/example/nodediag:0.1.0"
    assert agent["resources"] == {
        "requests": {"cpu": "10m", "memory": "64Mi"},
        "limits": {"memory": "128Mi"},
    }
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert agent["ports"] == [{"name": "metrics", "containerPort": 9102, "protocol": "TCP"}]
    security = agent["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsUser"] == 0
    # NET_ADMIN reads rules; NET_RAW is iptables-legacy-save's raw socket (see the manifest
    # and tests/test_capabilities.py, which runs the collector with exactly this set).
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert "privileged" not in security
    assert env(objects) == {
        "NODEDIAG_KERNEL_LOG": "journal",
        "NODE_NAME": {"fieldRef": {"fieldPath": "spec.nodeName"}},
        "NODEDIAG_HOST_ROOT": "/host",
        "NODEDIAG_STATE_DIR": "/var/lib/nodediag",
        "NODEDIAG_LISTEN": "0.0.0.0:9102",
    }


def test_kmsg_component_is_privileged_and_reads_kmsg() -> None:
    objects = rendered("kmsg")
    assert env(objects)["NODEDIAG_KERNEL_LOG"] == "kmsg"
    security = container(objects)["securityContext"]
    assert security["privileged"] is True
    assert security["allowPrivilegeEscalation"] is True
    assert "privileged" in (BASE / "components/kmsg/kustomization.yaml").read_text()


def test_fix_vxlan_offload_component() -> None:
    objects = rendered("fix-vxlan-offload")
    assert env(objects)["NODEDIAG_FIX_VXLAN_OFFLOAD"] == "1"
    assert "NET_ADMIN" in container(objects)["securityContext"]["capabilities"]["add"]
    assert "privileged" not in container(objects)["securityContext"]


def test_tls_component_serves_https_and_its_probes_still_pass(tmp_path: Path) -> None:
    """The rendered web configuration, with a test CA's files where the Secret is mounted,
    is loaded by the agent's own server: a kubelet-like probe (HTTPS, certificate not
    checked, none presented) gets /healthz and /readyz; /metrics wants a client certificate."""
    import http.client
    import ssl

    from prometheus_client import CollectorRegistry
    from testca import make_test_ca

    from agent.http import HttpServer, make_app
    from agent.web_config import WebConfig

    objects = rendered("tls")
    agent = container(objects)
    config_path = Path(env(objects)["NODEDIAG_WEB_CONFIG_FILE"])
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    config_volume = next(n for n, m in mounts.items() if m["mountPath"] == str(config_path.parent))
    config_map = the(objects, "ConfigMap")
    assert volumes[config_volume]["configMap"]["name"] == config_map["metadata"]["name"]
    secret_dir = Path(mounts["tls"]["mountPath"])
    assert volumes["tls"]["secret"]["secretName"] == "nodediag-tls"
    for probe in ("livenessProbe", "readinessProbe"):
        assert agent[probe]["httpGet"]["scheme"] == "HTTPS"
    endpoint = the(objects, "ServiceMonitor")["spec"]["endpoints"][0]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["serverName"] == "nodediag.nodediag.svc"
    assert (
        endpoint["tlsConfig"]["keySecret"]["name"]
        == endpoint["tlsConfig"]["cert"]["secret"]["name"]
    )

    # The Secret's keys (kubernetes.io/tls plus ca.crt), with a test CA's files.
    certs = make_test_ca(tmp_path / "ca")
    mounted = tmp_path / "secret"
    mounted.mkdir()
    for key, source in (("tls.crt", certs.server_cert), ("tls.key", certs.server_key),
                        ("ca.crt", certs.ca)):  # fmt: skip
        shutil.copy(source, mounted / key)
    text = config_map["data"][config_path.name]
    assert str(secret_dir) in text
    local = tmp_path / config_path.name
    local.write_text(text.replace(str(secret_dir), str(mounted)))
    app = make_app(CollectorRegistry(), lambda: (True, "ok"), lambda: (True, "ready"))
    server = HttpServer("127.0.0.1", 0, app, web_config=WebConfig(local))
    server.start()
    try:
        kubelet = ssl.create_default_context()
        kubelet.check_hostname = False
        kubelet.verify_mode = ssl.CERT_NONE  # the kubelet's HTTPS probes verify nothing
        for path, status in (
            (agent["livenessProbe"]["httpGet"]["path"], 200),
            (agent["readinessProbe"]["httpGet"]["path"], 200),
            ("/metrics", 403),
        ):
            conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=kubelet)
            conn.request("GET", path)
            assert conn.getresponse().status == status, path
            conn.close()
    finally:
        server.stop()


def test_env_vars_name_real_flags() -> None:
    """Every NODEDIAG_* variable the DaemonSet sets is one the CLI reads."""
    from agent.cli import build_parser

    subcommands: Any = build_parser()._subparsers
    run = subcommands._group_actions[0].choices["run"]
    flags = {
        "NODEDIAG_" + opt.lstrip("-").upper().replace("-", "_")
        for action in run._actions
        for opt in action.option_strings
        if opt.startswith("--")
    }
    for variant in VARIANTS:
        for name in env(rendered(variant)):
            assert name == "NODE_NAME" or name in flags, f"{variant}: {name} is no flag"
    # the values parse
    from agent.settings import parse_listen

    assert parse_listen(env(rendered("base"))["NODEDIAG_LISTEN"]) == ("0.0.0.0", 9102)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kubectl_kustomize_renders_the_same(variant: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on PATH (not installable from Debian/PyPI here)")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": [os.path.relpath(BASE, overlay)],
                "components": [os.path.relpath(c, overlay) for c in VARIANTS[variant]],
            }
        )
    )
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0 and "unknown field" in result.stderr + result.stdout:
        pytest.skip(f"kubectl's kustomize is too old: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    theirs = [d for d in yaml.safe_load_all(result.stdout) if d]

    def key(o: Obj) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(theirs, key=key) == sorted(rendered(variant), key=key)


# ----------------------------------------------------------------------------- RBAC


def _module_functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def _module_constants(tree: ast.Module) -> dict[str, ast.expr]:
    found: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                found[target.id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            found[node.target.id] = node.value
    return found


class PathEvaluator:
    """The path templates an expression can take (``{}`` for what is only known at run
    time): constants, f-strings, names assigned in the function or the module, ``a if c
    else b``, and calls of the module's own functions (their ``return`` expressions). A
    name the module does not define is looked up in ``project`` (the other modules': what
    a module imports from them)."""

    def __init__(self, tree: ast.Module, project: PathEvaluator | None = None) -> None:
        self.functions = _module_functions(tree)
        self.constants = _module_constants(tree)
        if project is not None:
            self.functions = {**project.functions, **self.functions}
            self.constants = {**project.constants, **self.constants}

    def values(self, expr: ast.expr, scope: ast.FunctionDef | None, depth: int = 0) -> set[str]:
        if depth > 8:
            return {"{}"}
        again = depth + 1
        if isinstance(expr, ast.Constant):
            return {str(expr.value)}
        if isinstance(expr, ast.JoinedStr):
            results = {""}
            for part in expr.values:
                options = (
                    self.values(part.value, scope, again)
                    if isinstance(part, ast.FormattedValue)
                    else self.values(part, scope, again)
                )
                results = {r + o for r in results for o in options}
            return results
        if isinstance(expr, ast.IfExp):
            return self.values(expr.body, scope, again) | self.values(expr.orelse, scope, again)
        if isinstance(expr, ast.Name):
            if scope is not None:
                assigned = [
                    n.value
                    for n in ast.walk(scope)
                    if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == expr.id for t in n.targets)
                ]
                if assigned:
                    return set().union(*(self.values(v, scope, again) for v in assigned))
            if expr.id in self.constants:
                return self.values(self.constants[expr.id], None, again)
            return {"{}"}
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name):
            function = self.functions.get(expr.func.id)
            if function is not None:
                returns = [
                    n.value for n in ast.walk(function) if isinstance(n, ast.Return) and n.value
                ]
                return set().union(*(self.values(v, function, again) for v in returns))
        return {"{}"}


def api_calls() -> set[tuple[str, str, str]]:
    """(kind, method, path template) of every Kubernetes API call in agent/ and collectors/:
    ``<x>.request("METHOD", path, …)`` and ``<x>.watch(path, …)``."""
    calls: set[tuple[str, str, str]] = set()
    sources = sorted([*REPO.glob("agent/*.py"), *REPO.glob("collectors/*.py")])
    trees = {source: ast.parse(source.read_text()) for source in sources}
    project = PathEvaluator(ast.Module(body=[], type_ignores=[]))
    for tree in trees.values():
        project.functions.update(_module_functions(tree))
        project.constants.update(_module_constants(tree))
    for source, tree in trees.items():
        evaluator = PathEvaluator(tree, project)
        for function in _module_functions(tree).values():
            for node in ast.walk(function):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                name = node.func.attr
                if name == "request" and node.args:
                    method = node.args[0]
                    if source.name == "kube.py" and function.name == "_send":
                        continue  # the transport under KubeClient.request itself
                    assert isinstance(method, ast.Constant), (
                        f"{source.name}:{node.lineno}: a request whose method is not a literal"
                    )
                    for path in evaluator.values(node.args[1], function):
                        calls.add(("request", str(method.value), path))
                elif name == "watch" and node.args and source.name != "kube.py":
                    for path in evaluator.values(node.args[0], function):
                        calls.add(("watch", "GET", path))
    return calls


_RESOURCE_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/\{\})?/(?P<resource>[a-z]+)(?P<name>/\{\})?$"
)
_VERBS = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}


def rbac_needed(calls: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for each call, as the API server authorizes it."""
    needed: set[tuple[str, str, str]] = set()
    for kind, method, path in calls:
        match = _RESOURCE_PATH.match(path)
        if match is None:
            # Discovery (/api, /apis/<group>/<version>) is granted to all by system:discovery.
            assert re.fullmatch(r"/apis?(/[a-z0-9.]+)*", path), f"unknown API path {path}"
            continue
        group = match["group"] or ""
        if kind == "watch":
            verb = "watch"
        elif method == "GET":
            verb = "get" if match["name"] else "list"
        else:
            verb = _VERBS[method]
        needed.add((group, match["resource"], verb))
    return needed


def test_the_code_calls_what_we_think() -> None:
    calls = api_calls()
    assert ("request", "POST", "/apis/events.k8s.io/v1/namespaces/{}/events") in calls
    assert ("request", "PATCH", "/api/v1/namespaces/{}/events/{}") in calls
    assert ("watch", "GET", "/api/v1/pods") in calls
    assert ("request", "GET", "/api/v1/nodes/{}") in calls  # the own Node's pod CIDR


def test_cluster_role_equals_the_calls_in_the_code() -> None:
    role = the(rendered("base"), "ClusterRole")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == rbac_needed(api_calls())
    binding = the(rendered("base"), "ClusterRoleBinding")
    account = the(rendered("base"), "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": "nodediag",
            "namespace": account["metadata"]["namespace"],
        }
    ]


def test_rbac_derivation_would_catch_a_new_verb() -> None:
    extra = {("request", "DELETE", "/api/v1/namespaces/{}/pods/{}")}
    assert ("", "pods", "delete") in rbac_needed(api_calls() | extra)


# ----------------------------------------------------------------------------- host paths


def mounts(objects: list[Obj]) -> dict[str, tuple[Obj, bool]]:
    """mountPath → (hostPath volume, read-only)."""
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    return {
        m["mountPath"]: (volumes[m["name"]], bool(m.get("readOnly")))
        for m in container(objects)["volumeMounts"]
    }


def host_path_seen_at(objects: list[Obj], path: str) -> tuple[str, bool] | None:
    """Which host path a path inside the container shows, and whether read-only."""
    best: tuple[str, tuple[Obj, bool]] | None = None
    for mount_path, entry in mounts(objects).items():
        if (path == mount_path or path.startswith(mount_path.rstrip("/") + "/")) and (
            best is None or len(mount_path) > len(best[0])
        ):
            best = (mount_path, entry)
    if best is None or "hostPath" not in best[1][0]:
        return None
    mount_path, (volume, read_only) = best
    return volume["hostPath"]["path"] + path[len(mount_path) :], read_only


def test_the_agent_paths_are_mounted_from_the_host() -> None:
    from agent.settings import DEFAULT_CONTAINERD_SOCKETS, Settings
    from collectors import cluster_dns, resolver
    from collectors.journal import default_journal_dirs

    objects = rendered("base")
    root = Path(env(objects)["NODEDIAG_HOST_ROOT"])
    settings = Settings(host_root=root)
    wanted = [
        *default_journal_dirs(root),
        *(settings.resolve(s).parent for s in DEFAULT_CONTAINERD_SOCKETS),
        settings.resolve("/proc/1/cgroup"),
        settings.resolve("/proc/sys/kernel/random/boot_id"),
        settings.resolve("/proc/net/snmp"),
        settings.resolve("/sys/fs/cgroup"),
        root / cluster_dns.KUBEADM_CONFIG,
        *(root / d for d in cluster_dns.DROP_IN_DIRS),
        *(root / c for c in cluster_dns.RANCHER_CONFIGS),
        root / "etc/machine-id",
        # node checks: conntrack and sysctls of the (host) network namespace, resolver files
        settings.resolve("/proc/sys/net/netfilter/nf_conntrack_count"),
        settings.resolve("/proc/thread-self/net/stat/nf_conntrack"),
        root / cluster_dns.DEFAULT_RESOLV_CONF.lstrip("/"),
        root / resolver.RESOLVED_UPSTREAM.lstrip("/"),
    ]
    for path in wanted:
        seen = host_path_seen_at(objects, str(path))
        assert seen is not None, f"{path} is not mounted from the host"
        host, read_only = seen
        assert host == "/" + str(path.relative_to(root)), (path, host)
        assert read_only, f"{path} must be mounted read-only"
    state = host_path_seen_at(objects, env(objects)["NODEDIAG_STATE_DIR"])
    assert state == ("/var/lib/nodediag", False)
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["state"]["hostPath"]["type"] == "DirectoryOrCreate"
    assert host_path_seen_at(objects, "/run/xtables.lock") == ("/run/xtables.lock", False)
    # Everything else is read-only; writable: the state dir, the xtables lock, /tmp.
    writable = {p for p, (_, ro) in mounts(objects).items() if not ro}
    assert writable == {"/var/lib/nodediag", "/run/xtables.lock", "/tmp"}


# ----------------------------------------------------------------------------- metrics


def exported_metrics() -> set[str]:
    """Sample names the agent exports, from the metric definitions in the code."""
    names: set[str] = set()
    for source in [*REPO.glob("agent/*.py"), *REPO.glob("collectors/*.py")]:
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            first = node.args[0]
            kind = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            name = first.value
            if not name.startswith("nodediag_"):
                continue
            if kind == "Counter" or kind == "KernelCounter":
                names |= {name + "_total", name + "_created"}
            elif kind == "Histogram":
                names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
            elif kind in ("Gauge", "KernelGauge"):
                names.add(name)
    return names


def referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\bnodediag_[a-z_]+\b", text))


def test_rules_and_dashboard_use_exported_metrics() -> None:
    exported = exported_metrics()
    assert {"nodediag_oom_kills_total", "nodediag_dns_probe_duration_seconds_bucket"} <= exported
    rules = (BASE / "alerts" / "nodediag.rules.yaml").read_text()
    dashboard = (BASE / "dashboards" / "nodediag.json").read_text()
    for text in (rules, dashboard):
        unknown = referenced_metrics(text) - exported
        assert not unknown, f"not exported by the agent: {unknown}"


def test_dashboard_panels() -> None:
    dashboard = json.loads((BASE / "dashboards" / "nodediag.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for needed in (
        "nodediag_oom_kills_total",
        "nodediag_dns_drop_rules",
        "nodediag_dns_dropped_packets_total",
        "nodediag_vxlan_tx_checksum_offload",
        "nodediag_dns_probe_duration_seconds_bucket",
        "nodediag_collector_success",
        "nodediag_collector_source_success",
        "nodediag_conntrack_entries",
        "nodediag_conntrack_drops_total",
        "nodediag_node_check_ok",
        "nodediag_dns_flow_ok",
        "up{",
    ):
        assert needed in exprs, needed
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------- image


def _dockerfile_copies() -> list[str]:
    sources: list[str] = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            sources.extend(w for w in words[1:-1] if not w.startswith("--"))
    return sources


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    sources = _dockerfile_copies()
    assert sources, "no COPY found"
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
        assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    dockerfile = (REPO / "Dockerfile").read_text()
    for package in ("libsystemd0", "iptables", "nftables", "libsystemd-dev"):
        assert package in dockerfile


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    pip = REPO / ".venv" / "bin" / "pip"
    command = [str(pip)] if pip.exists() else ["python3", "-m", "pip"]
    result = subprocess.run(
        [*command, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("nodediag-*.whl")
    return built


def test_the_package_builds_as_a_wheel_with_the_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "nodediag = agent.cli:main" in archive.read(entry_points).decode()
    assert "agent/cli.py" in names and "collectors/journal.py" in names


def test_the_wheel_holds_every_module(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    modules = {
        str(p.relative_to(REPO))
        for p in [*REPO.glob("agent/**/*.py"), *REPO.glob("collectors/**/*.py")]
    }
    assert modules <= names, sorted(modules - names)
