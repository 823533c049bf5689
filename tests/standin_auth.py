"""The API stand-in's authentication and authorization, as a real API server does them.

- Bearer tokens → a user (name and groups); no token or an unknown one: 401 with the
  ``Unauthorized`` Status. A service-account token's user is
  ``system:serviceaccount:<ns>:<name>`` in the groups ``system:serviceaccounts``,
  ``system:serviceaccounts:<ns>`` and ``system:authenticated``.
- Request attributes from the URL as kube-apiserver's ``RequestInfoFactory`` reads them
  (``k8s.io/apiserver/pkg/endpoints/request/requestinfo.go``): resource requests under
  ``/api/v1`` and ``/apis/<group>/<version>`` with namespace, resource, name, subresource and
  the verb (``get`` without a name is ``list``, or ``watch`` with ``?watch=1``; ``delete``
  without a name is ``deletecollection``); anything else is a non-resource request whose verb
  is the lower-case HTTP method.
- RBAC as ``plugin/pkg/auth/authorizer/rbac`` evaluates it (``pkg/apis/rbac/v1/
  evaluation_helpers.go``): a ClusterRoleBinding grants its ClusterRole everywhere; a
  RoleBinding grants its Role or ClusterRole in its own namespace only; a rule matches on
  verbs, apiGroups, resources (``*``, ``resource/subresource``, ``*/subresource``),
  resourceNames (when set), or nonResourceURLs (``*``, exact, or a ``prefix*``). Besides the
  objects given (the ones rendered from ``daemonset/``), the bootstrap policy every cluster
  has: ``system:discovery`` and ``system:public-info-viewer`` for authenticated users and
  ``cluster-admin`` for ``system:masters``.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

JSON = dict[str, Any]

AUTHENTICATED = "system:authenticated"
MASTERS = "system:masters"


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()


def service_account_user(namespace: str, name: str) -> User:
    return User(
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", AUTHENTICATED),
    )


ADMIN = User("kubernetes-admin", (MASTERS, AUTHENTICATED))


@dataclass(frozen=True)
class RequestInfo:
    path: str
    verb: str
    resource_request: bool
    api_group: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""


_NAMESPACE_SUBRESOURCES = {"status", "finalize"}


def request_info(method: str, path: str, query: Mapping[str, str]) -> RequestInfo:
    """What the authorizer sees of a request (see the module docstring)."""
    parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/") if p]
    verb = method.lower()
    if len(parts) < 3 or parts[0] not in ("api", "apis"):
        return RequestInfo(path, verb, False)
    group = ""
    rest = parts[1:]
    if parts[0] == "apis":
        if len(rest) < 3:
            return RequestInfo(path, verb, False)
        group, rest = rest[0], rest[1:]
    rest = rest[1:]  # the version
    verb = {"post": "create", "get": "get", "head": "get", "put": "update", "patch": "patch",
            "delete": "delete"}.get(verb, verb)  # fmt: skip
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in _NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if not name and verb == "get":
        verb = "watch" if query.get("watch") in ("1", "true") else "list"
    if not name and verb == "delete":
        verb = "deletecollection"
    return RequestInfo(path, verb, True, group, namespace, resource, subresource, name)


def rule_allows(rule: JSON, info: RequestInfo) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and info.verb not in verbs:
        return False
    if not info.resource_request:
        return any(_url_matches(url, info.path) for url in rule.get("nonResourceURLs") or [])
    groups = rule.get("apiGroups") or []
    if "*" not in groups and info.api_group not in groups:
        return False
    if not _resource_matches(rule.get("resources") or [], info):
        return False
    names = rule.get("resourceNames") or []
    return not names or info.name in names


def _resource_matches(resources: list[str], info: RequestInfo) -> bool:
    combined = f"{info.resource}/{info.subresource}" if info.subresource else info.resource
    for resource in resources:
        if resource in ("*", combined):
            return True
        if info.subresource and resource == f"*/{info.subresource}":
            return True
    return False


def _url_matches(rule_url: str, path: str) -> bool:
    if rule_url in ("*", path):
        return True
    return rule_url.endswith("*") and path.startswith(rule_url.rstrip("*"))


BOOTSTRAP: list[JSON] = [
    {
        "kind": "ClusterRole",
        "metadata": {"name": "system:discovery"},
        "rules": [
            {
                "nonResourceURLs": [
                    "/api",
                    "/api/*",
                    "/apis",
                    "/apis/*",
                    "/healthz",
                    "/livez",
                    "/openapi",
                    "/openapi/*",
                    "/readyz",
                    "/version",
                    "/version/",
                ],
                "verbs": ["get"],
            }
        ],
    },
    {
        "kind": "ClusterRole",
        "metadata": {"name": "system:public-info-viewer"},
        "rules": [
            {
                "nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"],
                "verbs": ["get"],
            }
        ],
    },
    {
        "kind": "ClusterRole",
        "metadata": {"name": "cluster-admin"},
        "rules": [
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
            {"nonResourceURLs": ["*"], "verbs": ["*"]},
        ],
    },
    *(
        {
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
        }
        for role, group in (
            ("system:discovery", AUTHENTICATED),
            ("system:public-info-viewer", AUTHENTICATED),
            ("cluster-admin", MASTERS),
        )
    ),
]


@dataclass
class Rbac:
    """Roles and bindings (plus :data:`BOOTSTRAP`); :meth:`allowed` answers one request."""

    objects: list[JSON] = field(default_factory=list)

    @classmethod
    def of(cls, objects: Iterable[JSON]) -> Rbac:
        kinds = {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
        return cls([*BOOTSTRAP, *(o for o in objects if o.get("kind") in kinds)])

    def allowed(self, user: User, info: RequestInfo) -> bool:
        return any(rule_allows(rule, info) for rule in self._rules_for(user, info.namespace))

    def _rules_for(self, user: User, namespace: str) -> Iterable[JSON]:
        for binding in self.objects:
            kind = binding.get("kind")
            meta = binding.get("metadata") or {}
            if kind == "RoleBinding" and (not namespace or meta.get("namespace") != namespace):
                continue
            if kind not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            if not any(_subject_matches(s, user, meta) for s in binding.get("subjects") or []):
                continue
            yield from self._role_rules(binding["roleRef"], meta.get("namespace"))

    def _role_rules(self, ref: JSON, namespace: str | None) -> list[JSON]:
        for role in self.objects:
            meta = role.get("metadata") or {}
            if role.get("kind") != ref.get("kind") or meta.get("name") != ref.get("name"):
                continue
            if role["kind"] == "Role" and meta.get("namespace") != namespace:
                continue
            return list(role.get("rules") or [])
        return []


def _subject_matches(subject: JSON, user: User, binding_meta: JSON) -> bool:
    kind = subject.get("kind")
    if kind == "User":
        return bool(subject.get("name") == user.name)
    if kind == "Group":
        return subject.get("name") in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_meta.get("namespace")
        return user.name == f"system:serviceaccount:{namespace}:{subject.get('name')}"
    return False


def forbidden_message(user: User, info: RequestInfo) -> tuple[str, JSON]:
    """The 403 Status message and details kube-apiserver writes (``responsewriters.forbidden``
    with the RBAC authorizer's reason left out, as it is for a plain deny)."""
    if not info.resource_request:
        return f'forbidden: User "{user.name}" cannot {info.verb} path "{info.path}"', {}
    resource = f"{info.resource}/{info.subresource}" if info.subresource else info.resource
    qualified = f"{info.resource}.{info.api_group}" if info.api_group else info.resource
    subject = f'{qualified} "{info.name}"' if info.name else qualified
    scope = f'in the namespace "{info.namespace}"' if info.namespace else "at the cluster scope"
    details: JSON = {"kind": info.resource}
    if info.name:
        details["name"] = info.name
    if info.api_group:
        details["group"] = info.api_group
    message = (
        f'{subject} is forbidden: User "{user.name}" cannot {info.verb} resource "{resource}" '
        f'in API group "{info.api_group}" {scope}'
    )
    return message, details
