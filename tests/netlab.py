"""A two-node cluster network in throwaway network namespaces, for asking the kernel which DNS
flows a node's firewall lets through.

Namespaces (``nodediag-lab-<random>-<role>``), every address private to them::

    pod 10.42.0.2 ── cni0 ── NODE (ip_forward=1) ── eth0 10.99.0.1 ─┬─ br0 10.99.0.2 PEER
                              flannel.1 10.42.0.0  ·· vxlan UDP 8472 ··  flannel.1 10.42.1.0
                                                                 │     cni0 10.42.1.1
                                          upstream 10.99.0.3 ────┘          │
                                          (DNS server)          dnspod 10.42.1.2 (DNS server,
                                                                the cluster DNS endpoint)

The underlay (10.99.0.0/24) is a bridge in the peer's namespace; the upstream nameserver
sits on it, reached by the node through eth0 as well.

The node's rules are the ones judged: the scenarios load kube-proxy-shaped rules for the
cluster DNS Service 10.43.0.10 (DNAT to 10.42.1.2 behind the peer) and a firewall made by a
real tool. :meth:`Lab.observe` sends real DNS queries along each flow of the evaluator's
contract and records what the kernel did: answered or not, whether the query reached the
server (counters in the server's namespace), and which drop/reject rule or policy counters rose.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import test_firewall_netns

from collectors.dns_probe import DnsProbe, run_in_netns

SERVER_SCRIPT = Path(__file__).parent / "dns_test_server.py"
CLUSTER_DNS = "10.43.0.10"
POD_CIDR = "10.42.0.0/16"
NODE_POD_CIDR = "10.42.0.0/24"
POD_IP = "10.42.0.2"
NODE_IP = "10.99.0.1"
NODE_FLANNEL_IP = "10.42.0.0"
PEER_IP = "10.99.0.2"
DNS_POD_IP = "10.42.1.2"
UPSTREAM_DNS = "10.99.0.3"
VXLAN_PORT = 8472
PROBE_NAME = "kubernetes.default.svc.cluster.local"
ROLES = ("node", "pod", "peer", "dnspod", "upstream")
_SERVER_COUNTERS = """
table inet nodediag_lab {
    counter dns_udp {}
    counter dns_syn {}
    chain input {
        type filter hook input priority 0;
        udp dport 53 counter name "dns_udp"
        tcp dport 53 tcp flags & (syn | ack) == syn counter name "dns_syn"
    }
}
"""

#: flow name -> (namespace the query leaves from, server role, server address, protocol)
FLOW_PROBES: dict[str, tuple[str, str, str, str]] = {
    "pod-dns-udp": ("pod", "dnspod", CLUSTER_DNS, "udp"),
    "pod-dns-tcp": ("pod", "dnspod", CLUSTER_DNS, "tcp"),
    "host-dns-udp": ("node", "dnspod", CLUSTER_DNS, "udp"),
    "host-dns-tcp": ("node", "dnspod", CLUSTER_DNS, "tcp"),
    "dns-upstream-udp": ("pod", "upstream", UPSTREAM_DNS, "udp"),
    "dns-upstream-tcp": ("pod", "upstream", UPSTREAM_DNS, "tcp"),
}
FLOWS = (*FLOW_PROBES, "dns-replies", "overlay-vxlan")


def stop(process: subprocess.Popen[Any]) -> None:
    """SIGTERM, and SIGKILL when it has not ended 10 s later."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Netns(test_firewall_netns.Netns):
    """A namespace of the lab, by name (``run`` a command in it, ``ip -n`` it)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str) -> None:
        ip("-n", self.name, *args)


@dataclass
class ProbeObservation:
    """What the kernel did with one DNS query."""

    answered: bool
    reached_server: bool
    outcome: str
    drops: dict[str, int] = field(default_factory=dict)
    """Drop/reject rules and DROP policies of the node whose packet counters rose."""


@dataclass
class FlowObservation:
    verdict: str
    """``pass`` or ``drop`` as the packets showed, ``unobserved`` when nothing could say."""
    evidence: str
    drops: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------- counters

_IPT_POLICY = re.compile(r"^:(\S+) (ACCEPT|DROP) \[(\d+):\d+\]")
_IPT_RULE = re.compile(r"^\[(\d+):\d+\] -A (\S+) (.*)$")
_DROPPING = re.compile(r"-j (DROP|REJECT)\b")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def iptables_drop_counters(text: str, source: str) -> dict[str, int]:
    """``iptables-save -c`` text -> {"source table chain rule-or-policy": packets} for every
    DROP/REJECT rule and DROP policy."""
    counters: dict[str, int] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif match := _IPT_POLICY.match(line):
            chain, policy, packets = match.groups()
            if policy == "DROP":
                counters[f"{source} {table} {chain} policy DROP"] = int(packets)
        elif (match := _IPT_RULE.match(line)) and _DROPPING.search(
            _QUOTED.sub('""', match.group(3))
        ):
            packets, chain, rule = match.groups()
            key = f"{source} {table} {chain} {rule}"
            counters[key] = counters.get(key, 0) + int(packets)
    return counters


def _nft_expr_verdict(expr: Sequence[dict[str, object]]) -> str | None:
    for statement in expr:
        for verdict in ("drop", "reject"):
            if verdict in statement:
                return verdict
    return None


def nft_drop_counters(ruleset: dict[str, object], skip: set[tuple[str, str]]) -> dict[str, int]:
    """``nft -j list ruleset`` -> counters of native nft drop/reject rules that count
    (``counter`` statement); the tables in ``skip`` (iptables-nft's: (family, name)) are read
    from iptables-save instead."""
    counters: dict[str, int] = {}
    items = ruleset.get("nftables", [])
    assert isinstance(items, list)
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict):
            continue
        expr = rule.get("expr", [])
        verdict = _nft_expr_verdict(expr)
        counted = [s["counter"] for s in expr if isinstance(s, dict) and "counter" in s]
        if verdict is None or not counted or (rule["family"], rule["table"]) in skip:
            continue
        key = f"nft {rule['family']} {rule['table']} {rule['chain']} handle {rule['handle']}"
        counters[key] = int(counted[0]["packets"])
    return counters


def rose(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        key: after[key] - before.get(key, 0) for key in after if after[key] > before.get(key, 0)
    }


_TRACE_TABLE = """
table ip nodediag_lab_trace {
    chain pre { type filter hook prerouting priority -500; meta nftrace set 1; }
    chain out { type filter hook output priority -500; meta nftrace set 1; }
}
"""
_TRACE_STOP = re.compile(
    r"^trace id \S+ (\S+) (\S+) (\S+) (?:rule .*# handle (\d+) \(verdict drop\)|policy drop)"
)


def trace_stops(lines: Sequence[str], skip: set[tuple[str, str]]) -> dict[str, int]:
    """``nft --handle monitor trace`` lines -> the drop/reject stops they show: {"nft FAMILY
    TABLE CHAIN handle N" or "nft FAMILY TABLE CHAIN policy drop": packets}, leaving out the
    tables in ``skip`` ((family, name))."""
    stops: dict[str, int] = {}
    for line in lines:
        match = _TRACE_STOP.match(line)
        if match is None or (match.group(1), match.group(2)) in skip:
            continue
        family, table, chain, handle = match.groups()
        key = f"nft {family} {table} {chain} " + (f"handle {handle}" if handle else "policy drop")
        stops[key] = stops.get(key, 0) + 1
    return stops


def _poke_loopback() -> None:
    # A rule may drop it (EPERM): it is traced all the same.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(b"", ("127.0.0.1", 9))


class Tracer:
    """``nft monitor trace`` in the node's namespace while a table there marks every IPv4
    packet for tracing: which nft rule or chain policy dropped (or rejected) each packet.
    It names the stops of native nft tables, which count nothing unless a rule says
    ``counter``; iptables' tables (``skip``) are read from their counters instead."""

    def __init__(self, node: Netns, skip: set[tuple[str, str]]) -> None:
        self.node = node
        self.skip = skip
        self.lines: list[str] = []
        node.run(["nft", "-f", "-"], stdin=_TRACE_TABLE)
        self.monitor = subprocess.Popen(
            ["ip", "netns", "exec", node.name, "nft", "--handle", "monitor", "trace"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self._wait_subscribed()
        except BaseException:
            self.close()
            raise

    def _wait_subscribed(self) -> None:
        """Pokes the node's loopback until the monitor shows a trace: then it listens."""
        deadline = time.monotonic() + 10
        while not self.lines:
            if self.monitor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nft monitor trace showed nothing")
            run_in_netns(self.node.name, _poke_loopback)
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.monitor.stdout is not None
        for line in self.monitor.stdout:
            self.lines.append(line)

    def stops(self, since: int) -> dict[str, int]:
        """The stops traced since line ``since`` (see :func:`trace_stops`)."""
        return trace_stops(self.lines[since:], self.skip)

    def close(self) -> None:
        stop(self.monitor)
        self.reader.join(timeout=5)
        self.node.run(["nft", "delete", "table", "ip", "nodediag_lab_trace"])


def iptables_tables(dumps: dict[str, str]) -> set[tuple[str, str]]:
    """(nft family, table) of the tables iptables-nft shows."""
    return {
        (family, table)
        for family, suffix in (("ip", "iptables-save"), ("ip6", "ip6tables-save"))
        for table in re.findall(r"^\*(\S+)", dumps[suffix], re.M)
    }


# ------------------------------------------------------------------------------ the lab


class Lab:
    """The topology above: :meth:`start` builds it and starts the two DNS servers,
    :meth:`close` removes every namespace (use :func:`lab`). Only the ``node`` namespace's
    rules change between scenarios (:meth:`reset`)."""

    def __init__(self, workdir: Path) -> None:
        tag = secrets.token_hex(3)
        self.ns = {role: Netns(f"nodediag-lab-{tag}-{role}") for role in ROLES}
        self.workdir = workdir
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.probe_timeout = 0.5
        self.tracer: Tracer | None = None

    def start(self) -> None:
        self._build()
        for role, address in (("dnspod", DNS_POD_IP), ("upstream", UPSTREAM_DNS)):
            self._count_queries(role)
            self._start_server(role, address)

    def close(self) -> None:
        for process in self.servers.values():
            stop(process)
        self.servers.clear()
        for netns in self.ns.values():
            subprocess.run(["ip", "netns", "del", netns.name], check=False, capture_output=True)

    @property
    def node(self) -> Netns:
        return self.ns["node"]

    # ---------------------------------------------------------------- topology

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        ip(
            "link", "add", a_if, "netns", self.ns[a].name, "type", "veth",
            "peer", "name", b_if, "netns", self.ns[b].name,
        )  # fmt: skip

    def _build(self) -> None:
        for netns in self.ns.values():
            ip("netns", "add", netns.name)
            netns.ip("link", "set", "lo", "up")
        node, pod, peer, dnspod, upstream = (self.ns[r] for r in ROLES)
        self._veth("node", "vpod", "pod", "eth0")
        self._veth("node", "eth0", "peer", "vnode")
        self._veth("upstream", "eth0", "peer", "vup")
        self._veth("peer", "vdns", "dnspod", "eth0")
        peer.ip("link", "add", "br0", "type", "bridge")
        for port in ("vnode", "vup"):
            peer.ip("link", "set", port, "master", "br0")
            peer.ip("link", "set", port, "up")
        peer.ip("addr", "add", f"{PEER_IP}/24", "dev", "br0")
        peer.ip("link", "set", "br0", "up")
        for bridged, port, gateway in ((node, "vpod", "10.42.0.1"), (peer, "vdns", "10.42.1.1")):
            bridged.ip("link", "add", "cni0", "type", "bridge")
            bridged.ip("addr", "add", f"{gateway}/24", "dev", "cni0")
            bridged.ip("link", "set", port, "master", "cni0")
            for ifname in ("cni0", port):
                bridged.ip("link", "set", ifname, "up")
            bridged.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        # A Docker-shaped bridge on the node: Docker's rules name it.
        node.ip("link", "add", "docker0", "type", "bridge")
        node.ip("addr", "add", "172.17.0.1/16", "dev", "docker0")
        for leaf, address, gateway in (
            (pod, POD_IP, "10.42.0.1"),
            (dnspod, DNS_POD_IP, "10.42.1.1"),
        ):
            leaf.ip("addr", "add", f"{address}/24", "dev", "eth0")
            leaf.ip("link", "set", "eth0", "up")
            leaf.ip("route", "add", "default", "via", gateway)
        upstream.ip("addr", "add", f"{UPSTREAM_DNS}/24", "dev", "eth0")
        upstream.ip("link", "set", "eth0", "up")
        upstream.ip("route", "add", NODE_POD_CIDR, "via", NODE_IP)
        node.ip("addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        node.ip("link", "set", "eth0", "up")
        # The Service range leaves by the default route, as on a node.
        node.ip("route", "add", "default", "via", PEER_IP)
        self._flannel(node, NODE_IP, NODE_FLANNEL_IP, "eth0")
        self._flannel(peer, PEER_IP, "10.42.1.0", "br0")
        self._flannel_route(node, peer, PEER_IP, "10.42.1.0")
        self._flannel_route(peer, node, NODE_IP, NODE_FLANNEL_IP)

    @staticmethod
    def _flannel(netns: Netns, local: str, address: str, underlay: str) -> None:
        netns.ip(
            "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", local,
            "dev", underlay, "dstport", str(VXLAN_PORT), "nolearning",
        )  # fmt: skip
        netns.ip("addr", "add", f"{address}/32", "dev", "flannel.1")
        netns.ip("link", "set", "flannel.1", "up")

    @staticmethod
    def _mac(netns: Netns, ifname: str) -> str:
        info = json.loads(netns.run(["ip", "-j", "link", "show", ifname]))
        return str(info[0]["address"])

    def _flannel_route(self, here: Netns, there: Netns, there_ip: str, there_vtep: str) -> None:
        """flannel's per-peer state: route, neighbour and FDB entry of the remote VTEP."""
        subnet = there_vtep.rsplit(".", 1)[0] + ".0/24"
        mac = self._mac(there, "flannel.1")
        here.ip("route", "add", subnet, "via", there_vtep, "dev", "flannel.1", "onlink")
        here.ip("neigh", "add", there_vtep, "lladdr", mac, "dev", "flannel.1", "nud", "permanent")
        here.run(["bridge", "fdb", "append", mac, "dev", "flannel.1", "dst", there_ip])

    def _start_server(self, role: str, address: str) -> None:
        ready = self.workdir / f"ready-{role}"
        ready.unlink(missing_ok=True)
        process = subprocess.Popen(
            [
                "ip", "netns", "exec", self.ns[role].name, sys.executable, str(SERVER_SCRIPT),
                "--address", address, "--ready", str(ready),
            ]
        )  # fmt: skip
        self.servers[role] = process
        deadline = time.monotonic() + 10
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the DNS test server in {role} did not start")
            time.sleep(0.02)

    # ---------------------------------------------------------------- rules

    def reset(self) -> None:
        """Empty every table of the node (nft, iptables-nft and legacy) and its conntrack."""
        self.node.run(["nft", "flush", "ruleset"])
        legacy = self.node.run(["iptables-legacy-save"])
        for table in re.findall(r"^\*(\S+)", legacy, re.M):
            for argv in (["-F"], ["-X"]):
                self.node.run(["iptables-legacy", "-w", "-t", table, *argv])
            heads = legacy.split(f"*{table}")[1]
            for chain in re.findall(r"^:(\S+) (?:ACCEPT|DROP)", heads, re.M):
                self.node.run(["iptables-legacy", "-w", "-t", table, "-P", chain, "ACCEPT"])
        self.node.run(["conntrack", "-F"])

    def dumps(self) -> dict[str, str]:
        """What the real tools print about the node's rules, by vector file suffix."""
        return {
            "iptables-save": self.node.run(["iptables-save", "-c"]),
            "ip6tables-save": self.node.run(["ip6tables-save", "-c"]),
            "iptables-legacy-save": self.node.run(["iptables-legacy-save", "-c"]),
            "nft.json": self.node.run(["nft", "-j", "list", "ruleset"]),
        }

    def drop_counters(self) -> dict[str, int]:
        dumps = self.dumps()
        return {
            **iptables_drop_counters(dumps["iptables-save"], "iptables-nft"),
            **iptables_drop_counters(dumps["iptables-legacy-save"], "iptables-legacy"),
            **nft_drop_counters(json.loads(dumps["nft.json"]), iptables_tables(dumps)),
        }

    # ---------------------------------------------------------------- packets

    def _count_queries(self, role: str) -> None:
        """Counters of the queries that reach a server: UDP to port 53 and TCP SYNs (a late
        segment of an earlier connection is no new query)."""
        self.ns[role].run(["nft", "-f", "-"], stdin=_SERVER_COUNTERS)
        # An unanswered SYN-ACK is not retried: its retries would reach the next flow.
        self.ns[role].run(["sysctl", "-qw", "net.ipv4.tcp_synack_retries=0"])

    def _server_received(self, role: str, protocol: str) -> int:
        listed = json.loads(self.ns[role].run(["nft", "-j", "list", "counters"]))
        name = "dns_udp" if protocol == "udp" else "dns_syn"
        for item in listed["nftables"]:
            counter = item.get("counter")
            if counter and counter["name"] == name:
                return int(counter["packets"])
        raise RuntimeError(f"no counter {name} in {role}")

    @contextmanager
    def _drops(self) -> Iterator[dict[str, int]]:
        """Fills the yielded dict with the drops while the block ran: counters that rose,
        and the tracer's stops when it runs."""
        before = self.drop_counters()
        mark = len(self.tracer.lines) if self.tracer else 0
        found: dict[str, int] = {}
        yield found
        time.sleep(0.05)  # the last segments (TCP FIN, RST) reach the counters
        found.update(rose(before, self.drop_counters()))
        if self.tracer:
            found.update(self.tracer.stops(mark))

    def probe(self, flow: str) -> ProbeObservation:
        source, server_role, address, protocol = FLOW_PROBES[flow]
        received = self._server_received(server_role, protocol)
        probe = DnsProbe(PROBE_NAME, self.probe_timeout, netns=self.ns[source].name)
        with self._drops() as drops:
            result = probe.probe(address, "udp" if protocol == "udp" else "tcp")
        return ProbeObservation(
            answered=result.ok,
            reached_server=self._server_received(server_role, protocol) > received,
            outcome=result.outcome if result.ok else f"{result.outcome} {result.error}",
            drops=drops,
        )

    def _flannel_rx(self) -> int:
        stats = json.loads(self.node.run(["ip", "-j", "-s", "link", "show", "flannel.1"]))
        return int(stats[0]["stats64"]["rx"]["packets"])

    def probe_overlay(self) -> FlowObservation:
        """A new flow from the peer's side over the vxlan link: the DNS pod queries the pod.
        The outer UDP 8472 packet passed the node's INPUT when flannel.1 received it."""
        received = self._flannel_rx()
        with self._drops() as drops:
            DnsProbe(PROBE_NAME, 0.3, netns=self.ns["dnspod"].name).probe(POD_IP, "udp")
        passed = self._flannel_rx() > received
        return FlowObservation(
            "pass" if passed else "drop",
            f"node flannel.1 rx {'rose' if passed else 'did not rise'}",
            {} if passed else drops,
        )

    def observe(self) -> dict[str, FlowObservation]:
        """Every flow's kernel verdict under the node's current rules. A query flow passes
        when the server got the query; ``dns-replies`` when the answers to the cluster DNS
        queries that got through came back (``unobserved`` when none got through)."""
        self.tracer = Tracer(self.node, iptables_tables(self.dumps()))
        try:
            return self._observe()
        finally:
            self.tracer.close()
            self.tracer = None

    def _observe(self) -> dict[str, FlowObservation]:
        observed: dict[str, FlowObservation] = {}
        replies: list[str] = []
        replies_dropped: dict[str, int] = {}
        for flow in FLOW_PROBES:
            seen = self.probe(flow)
            observed[flow] = FlowObservation(
                "pass" if seen.reached_server else "drop",
                f"server {'got' if seen.reached_server else 'never got'} the query; "
                f"{'answered' if seen.answered else seen.outcome}",
                {} if seen.reached_server else seen.drops,
            )
            if seen.reached_server and not flow.startswith("dns-upstream"):
                replies.append(f"{flow}:{'answered' if seen.answered else 'lost'}")
                if not seen.answered:
                    for key, packets in seen.drops.items():
                        replies_dropped[key] = replies_dropped.get(key, 0) + packets
        lost = [r for r in replies if r.endswith(":lost")]
        observed["dns-replies"] = FlowObservation(
            ("drop" if lost else "pass") if replies else "unobserved",
            ", ".join(replies) or "no cluster DNS query reached the server",
            replies_dropped,
        )
        observed["overlay-vxlan"] = self.probe_overlay()
        return observed


def observations_json(observed: dict[str, FlowObservation]) -> str:
    return json.dumps({flow: asdict(o) for flow, o in observed.items()}, indent=1) + "\n"


@contextmanager
def lab(workdir: Path) -> Iterator[Lab]:
    if os.geteuid() != 0:
        raise PermissionError("the lab needs root")
    made = Lab(workdir)
    try:
        made.start()
        yield made
    finally:
        made.close()
