"""This node's pod CIDR as its Node object holds it: ``spec.podCIDRs`` (dual-stack), else
``spec.podCIDR``, set by kube-controller-manager's node IPAM (kubeadm's
``--pod-network-cidr``, RKE2, K3s).

The DNS flows from pods need it, and many nodes show it nowhere else: Cilium, Calico before
its first block route, a node with no pod yet. One ``GET /api/v1/nodes/<node>``, cached, never
per collector run. The API server lets a Node's pod CIDR go only from unset to set (a change
needs the Node deleted and registered again), so a set one is read again only every
``refresh_set`` seconds (an hour), an unset one every ``refresh`` seconds (10 minutes: node
IPAM may assign it later), and after a failure (a 403 when the ClusterRole lacks ``get`` on
``nodes``, the API server unreachable) with exponential backoff from ``retry`` up to
``refresh``. ``resourceVersion=0`` lets the API server answer from its watch cache instead
of a quorum read of etcd (as client-go's informers list).
"""

from __future__ import annotations

import ipaddress
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.kube import JSON, Api, KubeError, KubeUnreachable, backoff_delay
from collectors.node_facts import PodCidrLookup

REFRESH_SECONDS = 600.0
REFRESH_SET_SECONDS = 3600.0
RETRY_SECONDS = 30.0


def node_pod_cidrs(node: JSON) -> tuple[str, ...]:
    """The Node's ``spec.podCIDRs``, else ``[spec.podCIDR]``; what is no CIDR is left out."""
    spec = node.get("spec")
    if not isinstance(spec, dict):
        return ()
    given: Any = spec.get("podCIDRs") or [spec.get("podCIDR")]
    found = []
    for text in given if isinstance(given, list) else []:
        try:
            found.append(str(ipaddress.ip_network(str(text), strict=False)))
        except ValueError:
            continue
    return tuple(dict.fromkeys(found))


def _explain(error: Exception, node: str) -> str:
    if isinstance(error, KubeError) and error.status == 403:
        return f"{error} (the ClusterRole lacks get on nodes)"
    if isinstance(error, KubeError) and error.status == 404:
        return f"Node {node} not found (is --node-name / $NODE_NAME this node's name?)"
    return str(error)


class NodePodCidrReader:
    """``PodCidrLookup`` of the Node ``node``: the CIDRs last read (kept through later
    failures: a Node's pod CIDR does not change) and the last attempt's error."""

    def __init__(
        self,
        node: str,
        client: Callable[[], Api],
        *,
        refresh: float = REFRESH_SECONDS,
        refresh_set: float = REFRESH_SET_SECONDS,
        retry: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.node = node
        self._client = client
        self.refresh = refresh
        self.refresh_set = refresh_set
        self.retry = retry
        self._clock = clock
        self._rand = rand
        self._lookup = PodCidrLookup()
        self._due = float("-inf")
        self._failures = 0
        self._lock = threading.Lock()
        self.reads = 0

    def __call__(self) -> PodCidrLookup:
        with self._lock:
            now = self._clock()
            if now >= self._due:
                self._read(now)
            return self._lookup

    def _read(self, now: float) -> None:
        self.reads += 1
        try:
            node = self._client().request(
                "GET", f"/api/v1/nodes/{self.node}", query={"resourceVersion": "0"}
            )
        except (KubeError, KubeUnreachable) as error:
            self._lookup = PodCidrLookup(self._lookup.cidrs, _explain(error, self.node))
            self._due = now + backoff_delay(self._failures, self.retry, self.refresh, self._rand)
            self._failures += 1
            return
        self._lookup = PodCidrLookup(node_pod_cidrs(node), None)
        self._due = now + (self.refresh_set if self._lookup.cidrs else self.refresh)
        self._failures = 0
