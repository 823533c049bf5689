"""The Kubernetes API stand-in, exercised with the official ``kubernetes`` Python client."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kube_standin as ks
import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

NODE = "node-1"

# The client's pydantic models make every field Optional; tests read them as Any.
_Watch: Any = watch.Watch
_load_kube_config: Any = config.load_kube_config
_new_client_from_config: Any = config.new_client_from_config


def _any(obj: object) -> Any:
    return obj


def _events_api(kube: client.ApiClient) -> Any:
    return client.EventsV1Api(kube)


def _core_api(kube: client.ApiClient) -> Any:
    return client.CoreV1Api(kube)


def _v1_event(body: dict[str, Any]) -> Any:
    return client.EventsV1Event.from_dict(body)


def _core_v1_event(body: dict[str, Any]) -> Any:
    return client.CoreV1Event.from_dict(body)


def _event(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"generateName": "web-0.", "namespace": "default"},
        "eventTime": ks.micro_time(),
        "reportingController": "nodediag.io/agent",
        "reportingInstance": f"nodediag-{NODE}",
        "action": "Detected",
        "reason": "InvisibleOOMKill",
        "type": "Warning",
        "note": "process worker (pid 4885) in container app was OOM-killed",
        "regarding": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": "default",
            "name": "web-0",
            "uid": "0b4f3c1e-0000-4000-8000-000000000001",
        },
    }
    body.update(overrides)
    return body


def _node_event(namespace: str = "default", **overrides: Any) -> dict[str, Any]:
    return _event(
        metadata={"generateName": f"{NODE}.", "namespace": namespace},
        reason="DNSDropRule",
        regarding={"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": "node-uid"},
        **overrides,
    )


def _pod(name: str, node: str, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox"}]},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "app",
                    "containerID": f"containerd://{name:0<64}"[:77],
                    "image": "busybox",
                    "imageID": "",
                    "ready": True,
                    "restartCount": 0,
                }
            ],
        },
    }


@pytest.fixture
def api() -> Iterator[ks.KubeStandin]:
    with ks.running() as standin:
        yield standin


@pytest.fixture
def kube(api: ks.KubeStandin, tmp_path: Path) -> Any:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    return _new_client_from_config(config_file=str(kubeconfig))


def _status(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body or "{}")
    assert body["kind"] == "Status"
    return dict(body)


def _fields(exc: ApiException) -> set[str]:
    return {c["field"] for c in _status(exc)["details"]["causes"]}


def _with_status(resp: Any) -> tuple[Any, int]:
    """``*_with_http_info`` answers (data, status, headers) in this client version."""
    if isinstance(resp, tuple):
        return resp[0], int(resp[1])
    return resp.data, int(resp.status_code)


def _raw(
    api: ks.KubeStandin,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
    token: str | None = ks.DEFAULT_TOKEN,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A request outside the client (which validates bodies itself with pydantic)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(api.url + path, data=data, method=method)
    req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


# ----------------------------------------------------------------------------- discovery


def test_discovery_and_kubeconfig(kube: client.ApiClient) -> None:
    assert _any(client.VersionApi(kube)).get_code().git_version.startswith("v1.37")
    assert _any(client.CoreApi(kube)).get_api_versions().versions == ["v1"]
    groups = _any(client.ApisApi(kube)).get_api_versions().groups
    assert [g.name for g in groups] == ["events.k8s.io"]
    resources = _events_api(kube).get_api_resources().resources
    assert [r.name for r in resources] == ["events"]


def test_wrong_token_is_401(api: ks.KubeStandin) -> None:
    status, body, _ = _raw(api, "GET", "/api/v1/nodes", token="nope")
    assert (status, body["reason"]) == (401, "Unauthorized")


def test_unserved_path_is_404(api: ks.KubeStandin) -> None:
    status, body, _ = _raw(api, "GET", "/apis/apps/v1/namespaces/default/deployments")
    assert (status, body["reason"]) == (404, "NotFound")


# ----------------------------------------------------------------------------- events.k8s.io/v1


def test_create_valid_event_regarding_pod(api: ks.KubeStandin, kube: client.ApiClient) -> None:
    events = _events_api(kube)
    created, status = _with_status(
        events.create_namespaced_event_with_http_info("default", _v1_event(_event()))
    )
    assert status == 201
    assert created.metadata.name.startswith("web-0.")
    assert len(created.metadata.name) == len("web-0.") + 5
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.resource_version == "1"
    stored = api.events("default")
    assert len(stored) == 1
    assert stored[0]["regarding"]["name"] == "web-0"
    assert stored[0]["reportingController"] == "nodediag.io/agent"
    # the same Event through core/v1, as on a real server
    core = _core_api(kube).list_namespaced_event("default").items
    assert [e.involved_object.name for e in core] == ["web-0"]
    assert core[0].reporting_component == "nodediag.io/agent"
    assert core[0].message == stored[0]["note"]


def test_node_event_in_default_and_kube_system(kube: client.ApiClient) -> None:
    events = _events_api(kube)
    for ns in ("default", "kube-system"):
        body = _v1_event(_node_event(ns))
        assert _with_status(events.create_namespaced_event_with_http_info(ns, body))[1] == 201


def test_list_get_and_field_selector(kube: client.ApiClient) -> None:
    events = _events_api(kube)
    pod_ev = events.create_namespaced_event("default", _v1_event(_event()))
    events.create_namespaced_event("default", _v1_event(_node_event()))
    assert len(events.list_namespaced_event("default").items) == 2
    assert len(events.list_event_for_all_namespaces().items) == 2
    nodes = events.list_namespaced_event("default", field_selector="regarding.kind=Node").items
    assert [e.reason for e in nodes] == ["DNSDropRule"]
    got = events.read_namespaced_event(pod_ev.metadata.name, "default")
    assert got.metadata.uid == pod_ev.metadata.uid
    with pytest.raises(ApiException) as exc:
        events.read_namespaced_event("missing", "default")
    assert exc.value.status == 404


def test_unknown_field_is_422_naming_it(api: ks.KubeStandin) -> None:
    path = "/apis/events.k8s.io/v1/namespaces/default/events"
    status, body, _ = _raw(
        api,
        "POST",
        path,
        _event(bogus=1, series={"count": 2, "x": 1, "lastObservedTime": ks.micro_time()}),
    )
    assert (status, body["reason"]) == (422, "Invalid")
    fields = {c["field"] for c in body["details"]["causes"]}
    assert fields == {"bogus", "series.x"}
    # a missing required field inside an object is named with its full path
    status, body, _ = _raw(api, "POST", path, _event(series={"count": 2}))
    assert status == 422
    assert {c["field"] for c in body["details"]["causes"]} == {"series.lastObservedTime"}
    assert body["details"]["group"] == "events.k8s.io"
    # the real server's fieldValidation=Strict answer is 400
    status, body, _ = _raw(api, "POST", path + "?fieldValidation=Strict", _event(bogus=1))
    assert (status, body["reason"]) == (400, "BadRequest")
    assert 'unknown field "bogus"' in body["message"]
    assert api.events() == []


def test_unknown_field_warn_mode_like_real_default() -> None:
    with ks.running(unknown_fields="warn") as api:
        path = "/apis/events.k8s.io/v1/namespaces/default/events"
        status, body, headers = _raw(api, "POST", path, _event(bogus=1))
        assert status == 201
        assert "bogus" not in body
        assert 'unknown field \\"bogus\\"' in headers["Warning"]


def test_schema_type_error_is_422(api: ks.KubeStandin) -> None:
    path = "/apis/events.k8s.io/v1/namespaces/default/events"
    status, body, _ = _raw(api, "POST", path, _event(reason=5))
    assert status == 422
    assert {c["field"] for c in body["details"]["causes"]} == {"reason"}


def test_missing_reporting_controller_is_422(kube: client.ApiClient) -> None:
    body = _event()
    del body["reportingController"]
    with pytest.raises(ApiException) as exc:
        _events_api(kube).create_namespaced_event("default", _v1_event(body))
    assert exc.value.status == 422
    assert _fields(exc.value) == {"reportingController"}
    assert "reportingController: Required value" in _status(exc.value)["message"]


def test_missing_required_event_fields_are_each_named(api: ks.KubeStandin) -> None:
    body = _event(type="Info", metadata={"name": "Bad_Name", "namespace": "default"})
    for key in ("action", "reason", "reportingInstance"):
        del body[key]
    path = "/apis/events.k8s.io/v1/namespaces/default/events"
    status, answer, _ = _raw(api, "POST", path, body)
    assert status == 422
    fields = {c["field"] for c in answer["details"]["causes"]}
    assert fields == {"action", "reason", "reportingInstance", "type", "metadata.name"}


def test_note_over_1kib_is_422(kube: client.ApiClient) -> None:
    events = _events_api(kube)
    ok = _event(note="é" * 512)  # 1024 bytes
    events.create_namespaced_event("default", _v1_event(ok))
    with pytest.raises(ApiException) as exc:
        events.create_namespaced_event("default", _v1_event(_event(note="é" * 512 + "x")))
    assert exc.value.status == 422
    # the server validates the internal type: events.k8s.io/v1 `note` is reported as `message`
    assert _fields(exc.value) == {"message"}
    assert "at most 1024 characters" in _status(exc.value)["message"]


def test_node_event_outside_default_is_422(kube: client.ApiClient) -> None:
    with pytest.raises(ApiException) as exc:
        _events_api(kube).create_namespaced_event(
            "monitoring", _v1_event(_node_event("monitoring"))
        )
    assert exc.value.status == 422
    assert _fields(exc.value) == {"involvedObject.namespace"}


def test_series_count_below_2_is_422(kube: client.ApiClient) -> None:
    body = _event(series={"count": 1, "lastObservedTime": ks.micro_time()})
    with pytest.raises(ApiException) as exc:
        _events_api(kube).create_namespaced_event("default", _v1_event(body))
    assert exc.value.status == 422
    assert _fields(exc.value) == {"series.count"}


def test_deprecated_fields_must_be_unset(api: ks.KubeStandin) -> None:
    path = "/apis/events.k8s.io/v1/namespaces/default/events"
    status, body, _ = _raw(api, "POST", path, _event(deprecatedCount=3))
    assert status == 422
    assert {c["field"] for c in body["details"]["causes"]} == {"count"}


def test_event_time_without_microseconds_is_400(kube: client.ApiClient) -> None:
    """MicroTime needs exactly 6 fractional digits; datetime.isoformat() drops them at 0 µs."""
    whole_second = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    body = _v1_event(_event())
    body.event_time = whole_second
    with pytest.raises(ApiException) as exc:
        _events_api(kube).create_namespaced_event("default", body)
    assert exc.value.status == 400
    assert "eventTime" in _status(exc.value)["message"]


def test_namespace_mismatch_is_400(api: ks.KubeStandin) -> None:
    path = "/apis/events.k8s.io/v1/namespaces/kube-system/events"
    status, body, _ = _raw(api, "POST", path, _node_event("default"))
    assert (status, body["reason"]) == (400, "BadRequest")
    assert "does not match the namespace" in body["message"]


def test_duplicate_name_is_409_already_exists(kube: client.ApiClient) -> None:
    events = _events_api(kube)
    body = _event(metadata={"name": "web-0.fixed", "namespace": "default"})
    events.create_namespaced_event("default", _v1_event(body))
    with pytest.raises(ApiException) as exc:
        events.create_namespaced_event("default", _v1_event(body))
    assert exc.value.status == 409
    assert _status(exc.value)["reason"] == "AlreadyExists"
    assert _status(exc.value)["details"]["name"] == "web-0.fixed"


def test_patch_series(api: ks.KubeStandin, kube: client.ApiClient) -> None:
    events = _events_api(kube)
    created = events.create_namespaced_event("default", _v1_event(_event()))
    name = created.metadata.name
    seen = ks.micro_time()
    patched = events.patch_namespaced_event(
        name, "default", {"series": {"count": 2, "lastObservedTime": seen}}
    )
    assert patched.series.count == 2
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)
    assert api.requests[-1].content_type == "application/strategic-merge-patch+json"
    # merge-patch+json and json-patch+json work too
    path = f"/apis/events.k8s.io/v1/namespaces/default/events/{name}"
    status, body, _ = _raw(
        api, "PATCH", path, {"series": {"count": 3}}, "application/merge-patch+json"
    )
    assert (status, body["series"]["count"]) == (200, 3)
    ops = [{"op": "replace", "path": "/series/count", "value": 4}]
    status, body, _ = _raw(api, "PATCH", path, ops, "application/json-patch+json")
    assert (status, body["series"]["count"]) == (200, 4)
    assert api.event("default", name)["series"]["count"] == 4  # type: ignore[index]
    # the series must stay valid
    with pytest.raises(ApiException) as exc:
        events.patch_namespaced_event(name, "default", {"series": {"count": 1}})
    assert exc.value.status == 422
    assert _fields(exc.value) == {"series.count"}


def test_patch_of_immutable_note_is_422(kube: client.ApiClient) -> None:
    events = _events_api(kube)
    created = events.create_namespaced_event("default", _v1_event(_event()))
    with pytest.raises(ApiException) as exc:
        events.patch_namespaced_event(created.metadata.name, "default", {"note": "changed"})
    assert exc.value.status == 422
    assert _fields(exc.value) == {"message"}
    assert "field is immutable" in _status(exc.value)["message"]


def test_patch_missing_is_404(kube: client.ApiClient) -> None:
    with pytest.raises(ApiException) as exc:
        _events_api(kube).patch_namespaced_event(
            "gone", "default", {"series": {"count": 2, "lastObservedTime": ks.micro_time()}}
        )
    assert exc.value.status == 404
    assert _status(exc.value)["reason"] == "NotFound"
    assert _status(exc.value)["details"] == {
        "name": "gone",
        "kind": "events",
        "group": "events.k8s.io",
    }


def test_patch_with_stale_resource_version_is_409(kube: client.ApiClient) -> None:
    events = _events_api(kube)
    created = events.create_namespaced_event("default", _v1_event(_event()))
    body = {"metadata": {"resourceVersion": "999"}, "series": {"count": 2}}
    body["series"]["lastObservedTime"] = ks.micro_time()  # type: ignore[index]
    with pytest.raises(ApiException) as exc:
        events.patch_namespaced_event(created.metadata.name, "default", body)
    assert exc.value.status == 409
    assert _status(exc.value)["reason"] == "Conflict"


def test_deleted_event_then_patch_is_404_and_recreate_works(
    api: ks.KubeStandin, kube: client.ApiClient
) -> None:
    events = _events_api(kube)
    body = _event(metadata={"name": "web-0.a", "namespace": "default"})
    events.create_namespaced_event("default", _v1_event(body))
    api.delete_event("default", "web-0.a")
    with pytest.raises(ApiException) as exc:
        events.patch_namespaced_event("web-0.a", "default", {"series": {"count": 2}})
    assert exc.value.status == 404
    events.create_namespaced_event("default", _v1_event(body))
    assert [e["metadata"]["name"] for e in api.events()] == ["web-0.a"]


# ----------------------------------------------------------------------------- core/v1 fallback


def _core_event(namespace: str = "default", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "web-0.", "namespace": namespace},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "namespace": namespace,
            "name": "web-0",
        },
        "reason": "InvisibleOOMKill",
        "message": "process worker was OOM-killed",
        "type": "Warning",
        "eventTime": ks.micro_time(),
        "action": "Detected",
        "reportingComponent": "nodediag.io/agent",
        "reportingInstance": f"nodediag-{NODE}",
    }
    body.update(overrides)
    return body


def test_core_v1_fallback_when_events_group_not_served(tmp_path: Path) -> None:
    with ks.running(serve_events_v1=False) as api:
        kube = _new_client_from_config(config_file=str(api.write_kubeconfig(tmp_path / "kc")))
        assert _any(client.ApisApi(kube)).get_api_versions().groups == []
        with pytest.raises(ApiException) as exc:
            _events_api(kube).get_api_resources()
        assert exc.value.status == 404
        with pytest.raises(ApiException) as exc:
            _events_api(kube).create_namespaced_event("default", _v1_event(_event()))
        assert exc.value.status == 404
        core = _core_api(kube)
        created, status = _with_status(
            core.create_namespaced_event_with_http_info("default", _core_v1_event(_core_event()))
        )
        assert status == 201
        name = created.metadata.name
        seen = ks.micro_time()
        patched = core.patch_namespaced_event(
            name, "default", {"series": {"count": 2, "lastObservedTime": seen}, "count": 2}
        )
        assert (patched.series.count, patched.count) == (2, 2)
        assert api.events(group="")[0]["involvedObject"]["name"] == "web-0"
        assert api.events()[0]["regarding"]["name"] == "web-0"


def test_core_v1_event_rules(kube: client.ApiClient) -> None:
    core = _core_api(kube)
    body = _core_event()
    del body["reportingComponent"]
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_event("default", _core_v1_event(body))
    assert (exc.value.status, _fields(exc.value)) == (422, {"reportingController"})
    node_body = _core_event(
        "monitoring", involvedObject={"apiVersion": "v1", "kind": "Node", "name": NODE}
    )
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_event("monitoring", _core_v1_event(node_body))
    assert (exc.value.status, _fields(exc.value)) == (422, {"involvedObject.namespace"})
    # old-style core Event (no eventTime): involvedObject.namespace must match
    legacy = _core_event("default", involvedObject={"kind": "Pod", "namespace": "x", "name": "p"})
    del legacy["eventTime"]
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_event("default", _core_v1_event(legacy))
    assert (exc.value.status, _fields(exc.value)) == (422, {"involvedObject.namespace"})


# ----------------------------------------------------------------------------- faults


def test_429_with_retry_after(api: ks.KubeStandin, kube: client.ApiClient) -> None:
    api.fail_next(429, method="POST", path="/events$", retry_after=3)
    events = _events_api(kube)
    body = _v1_event(_event())
    with pytest.raises(ApiException) as exc:
        events.create_namespaced_event("default", body)
    assert exc.value.status == 429
    assert exc.value.headers is not None
    assert exc.value.headers["Retry-After"] == "3"
    assert _status(exc.value)["details"]["retryAfterSeconds"] == 3
    assert api.events() == []
    assert _with_status(events.create_namespaced_event_with_http_info("default", body))[1] == 201
    log = api.requests_matching("POST", "/events$")
    assert [(r.status, r.fault) for r in log] == [(429, "status"), (201, None)]


@pytest.mark.parametrize(
    ("status", "reason"),
    [(500, "InternalError"), (503, "ServiceUnavailable"), (409, "Conflict")],
)
def test_injected_status(
    api: ks.KubeStandin, kube: client.ApiClient, status: int, reason: str
) -> None:
    api.fail_next(status, count=2, method="PATCH")
    events = _events_api(kube)
    created = events.create_namespaced_event("default", _v1_event(_event()))
    for _ in range(2):
        with pytest.raises(ApiException) as exc:
            events.patch_namespaced_event(created.metadata.name, "default", {"series": None})
        assert exc.value.status == status
        assert _status(exc.value)["reason"] == reason
    events.patch_namespaced_event(created.metadata.name, "default", {"series": None})


def test_forbidden_names_verb_resource_group(api: ks.KubeStandin, kube: client.ApiClient) -> None:
    api.forbid("create", "events", "events.k8s.io")
    with pytest.raises(ApiException) as exc:
        _events_api(kube).create_namespaced_event("default", _v1_event(_event()))
    status = _status(exc.value)
    assert (exc.value.status, status["reason"]) == (403, "Forbidden")
    assert status["message"] == (
        f'events.events.k8s.io is forbidden: User "{api.user}" cannot create resource "events"'
        ' in API group "events.k8s.io" in the namespace "default"'
    )
    assert status["details"] == {"kind": "events", "group": "events.k8s.io"}
    # a one-shot 403 on a core list
    api.fail_next(403, path="/pods$")
    with pytest.raises(ApiException) as exc:
        _core_api(kube).list_pod_for_all_namespaces()
    assert (
        'cannot list resource "pods" in API group "" at the cluster scope'
        in (_status(exc.value)["message"])
    )


def test_dropped_connection_raises_connection_error(
    api: ks.KubeStandin, kube: client.ApiClient
) -> None:
    api.drop_next(method="POST")
    with pytest.raises(urllib3.exceptions.HTTPError) as exc:
        _events_api(kube).create_namespaced_event("default", _v1_event(_event()))
    assert isinstance(
        exc.value, urllib3.exceptions.ProtocolError | urllib3.exceptions.MaxRetryError
    )
    assert api.events() == []
    assert [(r.status, r.fault) for r in api.requests] == [(None, "drop")]


def test_dropped_get_is_retried_by_urllib3(api: ks.KubeStandin, kube: client.ApiClient) -> None:
    """Worth knowing for the agent: urllib3 silently retries idempotent requests once the
    connection drops (default Retry(3)); POST/PATCH are not retried."""
    api.add_node(NODE)
    api.drop_next(method="GET")
    assert _core_api(kube).read_node(NODE).metadata.name == NODE
    assert [(r.status, r.fault) for r in api.requests] == [(None, "drop"), (200, None)]


def test_outage_then_recovery(api: ks.KubeStandin, tmp_path: Path) -> None:
    api.add_node(NODE)
    cfg = client.Configuration()
    _load_kube_config(str(api.write_kubeconfig(tmp_path / "kc")), client_configuration=cfg)
    cfg.retries = False  # see every drop (urllib3 would retry the GET)
    core = _core_api(client.ApiClient(cfg))
    api.outage(0.3, 500)
    api.outage(0.3, "drop", start_in=0.3)
    with pytest.raises(ApiException) as exc:
        core.read_node(NODE)
    assert exc.value.status == 500
    time.sleep(0.35)
    with pytest.raises(urllib3.exceptions.HTTPError):
        core.read_node(NODE)
    time.sleep(0.35)
    assert core.read_node(NODE).metadata.name == NODE
    assert [r.fault for r in api.requests] == ["outage", "outage", None]


# ----------------------------------------------------------------------------- pods


def test_pod_list_and_get(api: ks.KubeStandin, kube: client.ApiClient) -> None:
    api.add_pod(_pod("a", NODE))
    api.add_pod(_pod("b", "node-2", namespace="other"))
    core = _core_api(kube)
    mine = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE}")
    assert [p.metadata.name for p in mine.items] == ["a"]
    assert mine.metadata.resource_version == str(api.resource_version)
    assert core.read_namespaced_pod("b", "other").spec.node_name == "node-2"
    assert len(core.list_namespaced_pod("other").items) == 1
    with pytest.raises(ApiException) as exc:
        core.list_pod_for_all_namespaces(field_selector="spec.bogus=1")
    assert exc.value.status == 400
    with pytest.raises(ApiException) as exc:
        core.read_namespaced_pod("missing", "default")
    assert exc.value.status == 404


def test_add_pod_rejects_schema_errors(api: ks.KubeStandin) -> None:
    bad = _pod("a", NODE)
    bad["spec"]["nodname"] = NODE
    with pytest.raises(ValueError, match="nodname"):
        api.add_pod(bad)


def _collect_watch(
    kube: client.ApiClient, out: list[tuple[str, str]], **kwargs: Any
) -> threading.Thread:
    def run() -> None:
        w = _Watch()
        for ev in w.stream(
            _core_api(kube).list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={NODE}",
            timeout_seconds=2,
            **kwargs,
        ):
            out.append((ev["type"], ev["object"].metadata.name))
            if ev["type"] == "DELETED":
                w.stop()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_pod_watch_streams_added_modified_deleted_filtered_by_node(
    api: ks.KubeStandin, kube: client.ApiClient
) -> None:
    api.add_pod(_pod("before", NODE))
    listed = _core_api(kube).list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE}")
    seen: list[tuple[str, str]] = []
    t = _collect_watch(kube, seen, resource_version=listed.metadata.resource_version)
    assert api.wait_for(lambda s: any("watch" in r.query for r in s.requests))
    api.add_pod(_pod("elsewhere", "node-2"))
    api.add_pod(_pod("mine", NODE))
    moved = _pod("elsewhere", NODE)
    api.update_pod(moved)  # moved onto this node: ADDED for this watch
    api.delete_pod("default", "mine")
    t.join(5)
    assert not t.is_alive()
    assert seen == [("ADDED", "mine"), ("ADDED", "elsewhere"), ("DELETED", "mine")]
    watch_req = next(r for r in api.requests if "watch" in r.query)
    assert watch_req.query["fieldSelector"] == f"spec.nodeName={NODE}"


def test_watch_without_resource_version_starts_with_current_pods(
    api: ks.KubeStandin, kube: client.ApiClient
) -> None:
    api.add_pod(_pod("a", NODE))
    api.add_pod(_pod("b", "node-2"))
    seen: list[tuple[str, str]] = []
    t = _collect_watch(kube, seen)
    assert api.wait_for(lambda _: seen == [("ADDED", "a")])
    api.delete_pod("default", "a")
    t.join(5)
    assert seen == [("ADDED", "a"), ("DELETED", "a")]


def test_watch_from_compacted_resource_version_gets_410(api: ks.KubeStandin) -> None:
    api.add_pod(_pod("a", NODE))
    api.add_pod(_pod("b", NODE))
    api.compact()
    req = urllib.request.Request(
        api.url + "/api/v1/pods?watch=1&resourceVersion=1",
        headers={"Authorization": f"Bearer {ks.DEFAULT_TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        lines = [json.loads(line) for line in resp.read().splitlines()]
    assert lines[0]["type"] == "ERROR"
    assert (lines[0]["object"]["code"], lines[0]["object"]["reason"]) == (410, "Expired")


def test_outage_cuts_open_watch(api: ks.KubeStandin) -> None:
    req = urllib.request.Request(
        api.url + "/api/v1/pods?watch=1",
        headers={"Authorization": f"Bearer {ks.DEFAULT_TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        api.outage(1.0, 503)
        started = time.monotonic()
        with pytest.raises(http_client_errors()):
            resp.read()
        assert time.monotonic() - started < 2


def http_client_errors() -> tuple[type[BaseException], ...]:
    import http.client

    return (http.client.IncompleteRead, ConnectionError)


def test_node_get(api: ks.KubeStandin, kube: client.ApiClient) -> None:
    api.add_node({"metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}}})
    node = _core_api(kube).read_node(NODE)
    assert node.metadata.uid
    with pytest.raises(ApiException) as exc:
        _core_api(kube).read_node("other")
    assert exc.value.status == 404


def test_request_log_counts_calls_per_finding(api: ks.KubeStandin, kube: client.ApiClient) -> None:
    events = _events_api(kube)
    created = events.create_namespaced_event("default", _v1_event(_event()))
    for count in (2, 3):
        events.patch_namespaced_event(
            created.metadata.name,
            "default",
            {"series": {"count": count, "lastObservedTime": ks.micro_time()}},
        )
    writes = api.requests_matching(path=r"/namespaces/default/events")
    assert [(r.method, r.status) for r in writes] == [
        ("POST", 201),
        ("PATCH", 200),
        ("PATCH", 200),
    ]
    assert writes[0].body["reason"] == "InvisibleOOMKill"
    assert writes[1].time <= writes[2].time
    api.clear_requests()
    assert api.requests == []
