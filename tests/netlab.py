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
sits on it, reached by the node through eth0 as well. IPv6 is on the same links (pods
fd42::/64 and fd42:0:0:1::/64 over the IPv4 vxlan link, the underlay fd99::/64, the cluster
DNS fd43::a, the DNS pod fd42:0:0:1::2, the upstream fd99::3).

A scenario may ask for more than the IPv4 flows (``netlab_topology.FEATURES``): ``ipv6`` (the
same flows in IPv6; with ``vxlan6`` the pods' IPv6 rides a vxlan link of its own with an IPv6
underlay, Calico's ``vxlan-v6.calico``, UDP 4789), ``nodelocal`` (NodeLocal DNSCache's
addresses on the node, a DNS server on each: the pods and the host ask it, it asks the
upstream), ``ipip`` and ``wireguard`` (the peer sends IP protocol 4 and UDP 51820 packets to
the node's address from sockets: this kernel may have neither driver; what reaches the node's
sockets passed its INPUT).

The node's rules are the ones judged: the scenarios load kube-proxy-shaped rules for the
cluster DNS Service 10.43.0.10 (DNAT to 10.42.1.2 behind the peer) and a firewall made by a
real tool. :meth:`Lab.observe` sends real DNS queries along each flow of the evaluator's
contract and records what the kernel did: answered or not, whether the query reached the
server (counters in the server's namespace), and which drop/reject rule or policy counters rose.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from netlab_evidence import (
    Tracer,
    iptables_drop_counters,
    iptables_tables,
    nft_drop_counters,
    rose,
    stop,
    trace_stops,
)
from netlab_topology import (
    CLUSTER_DNS,
    CLUSTER_DNS6,
    DNS_POD_IP,
    DNS_POD_IP6,
    NODE_CACHE,
    NODE_IP,
    POD_IP,
    POD_IP6,
    PROBE_NAME,
    ROLES,
    UPSTREAM_DNS,
    UPSTREAM_DNS6,
    VXLAN6,
    WIREGUARD_PORT,
    Netns,
    build,
    set_vxlan6,
)

from collectors.dns_probe import DnsProbe, run_in_netns

# Re-exported: the lab's readers and names.
__all__ = ["NODE_CACHE", "Netns", "iptables_drop_counters", "stop", "trace_stops"]

SERVER_SCRIPT = Path(__file__).parent / "dns_test_server.py"
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


@dataclass(frozen=True)
class Probe:
    """One DNS query of a flow: from the ``source`` namespace to ``address``; ``server`` is the
    role whose namespace runs the server (``node``: NodeLocal DNSCache's)."""

    source: str
    server: str
    address: str
    protocol: str


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
_V6 = {CLUSTER_DNS: CLUSTER_DNS6, UPSTREAM_DNS: UPSTREAM_DNS6}


def flow_key(flow: str, family: str) -> str:
    """How the lab names a flow of a family: IPv4 flows by their name, IPv6 ``ipv6:NAME``."""
    return flow if family == "ipv4" else f"{family}:{flow}"


def flow_probes(features: frozenset[str] = frozenset()) -> dict[str, tuple[Probe, ...]]:
    """The queries of each DNS flow (by :func:`flow_key`) the lab sends for these features.
    With NodeLocal DNSCache the pods and the host ask the node's cache on both its addresses,
    and the cache (host network) asks the upstream too."""
    probes: dict[str, tuple[Probe, ...]] = {}
    for flow, (source, server, address, protocol) in FLOW_PROBES.items():
        if "nodelocal" in features and server == "dnspod":
            found = tuple(Probe(source, "node", a, protocol) for a in NODE_CACHE)
        elif "nodelocal" in features:
            found = tuple(Probe(s, server, address, protocol) for s in (source, "node"))
        else:
            found = (Probe(source, server, address, protocol),)
        probes[flow] = found
    if "ipv6" in features:
        for flow, (source, server, address, protocol) in FLOW_PROBES.items():
            probes[flow_key(flow, "ipv6")] = (Probe(source, server, _V6[address], protocol),)
    return probes


def lab_flows(features: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Every flow (by :func:`flow_key`) the lab observes for these features."""
    overlays = tuple(f"overlay-{k}" for k in ("ipip", "wireguard") if k in features)
    v6 = [*FLOW_PROBES, "dns-replies"] if "ipv6" in features else []
    if "vxlan6" in features:
        v6.append("overlay-vxlan")
    return (*FLOWS, *overlays, *(flow_key(f, "ipv6") for f in v6))


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
        self.features: frozenset[str] = frozenset()

    def start(self) -> None:
        build(self.ns)
        for role, address, address6 in (
            ("dnspod", DNS_POD_IP, DNS_POD_IP6),
            ("upstream", UPSTREAM_DNS, UPSTREAM_DNS6),
        ):
            self._count_queries(role)
            self._start_server(role, address)
            self._start_server(role, address6)
        self._warm_up()
        self._settle()

    def _warm_up(self) -> None:
        """One query to each server from each side before any rule is loaded: the neighbours
        on the way are resolved (a scenario's first query is then not lost to discovery)."""
        for source in ("pod", "node"):
            probe = DnsProbe(PROBE_NAME, 2.0, netns=self.ns[source].name)
            for address in (DNS_POD_IP, DNS_POD_IP6, UPSTREAM_DNS, UPSTREAM_DNS6):
                if not probe.probe(address, "udp").ok:
                    raise RuntimeError(f"the lab does not work: {source} -> {address}")

    def _settle(self, window: float = 0.5, limit: float = 5.0) -> None:
        """Wait until the node sends nothing of its own: links just brought up send their
        IGMP and MLD reports for a second or two, and one of them, counted by a blanket
        drop rule (``! -p udp``) while a scenario's first flow is observed, would be read as
        that flow's drop."""
        deadline = time.monotonic() + limit
        sent = self._node_tx_packets()
        while time.monotonic() < deadline:
            time.sleep(window)
            now = self._node_tx_packets()
            if now == sent:
                return
            sent = now

    def _node_tx_packets(self) -> int:
        links = json.loads(self.node.run(["ip", "-s", "-j", "link", "show"]))
        return sum(int(link["stats64"]["tx"]["packets"]) for link in links)

    def close(self) -> None:
        for process in self.servers.values():
            stop(process)
        self.servers.clear()
        for netns in self.ns.values():
            subprocess.run(["ip", "netns", "del", netns.name], check=False, capture_output=True)

    @property
    def node(self) -> Netns:
        return self.ns["node"]

    def _start_server(self, role: str, address: str) -> None:
        """A DNS server on ``address`` in ``role``'s namespace; it logs the queries it gets
        (:meth:`_server_received` reads the log of the node's, the other namespaces count
        in their own rules)."""
        ready = self.workdir / f"ready-{address}"
        ready.unlink(missing_ok=True)
        self._server_log(address).write_text("")
        process = subprocess.Popen(
            [
                "ip", "netns", "exec", self.ns[role].name, sys.executable, str(SERVER_SCRIPT),
                "--address", address, "--ready", str(ready),
                "--log", str(self._server_log(address)),
            ]
        )  # fmt: skip
        self.servers[address] = process
        deadline = time.monotonic() + 10
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the DNS test server in {role} did not start")
            time.sleep(0.02)

    # ---------------------------------------------------------------- rules

    def reset(self, features: frozenset[str] = frozenset()) -> None:
        """Empty every table of the node (nft, iptables-nft and legacy, IPv4 and IPv6) and its
        conntrack; set the lab up for ``features`` (``netlab_topology.FEATURES``)."""
        self.node.run(["nft", "flush", "ruleset"])
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            legacy = self.node.run([f"{tool}-save"])
            for table in re.findall(r"^\*(\S+)", legacy, re.M):
                for argv in (["-F"], ["-X"]):
                    self.node.run([tool, "-w", "-t", table, *argv])
                heads = legacy.split(f"*{table}")[1]
                for chain in re.findall(r"^:(\S+) (?:ACCEPT|DROP)", heads, re.M):
                    self.node.run([tool, "-w", "-t", table, "-P", chain, "ACCEPT"])
        self.node.run(["conntrack", "-F"])
        self._node_cache("nodelocal" in features)
        self._vxlan6("vxlan6" in features)
        self.features = features

    def _vxlan6(self, wanted: bool) -> None:
        if wanted != ("vxlan6" in self.features):
            set_vxlan6(self.ns, wanted)

    def _node_cache(self, wanted: bool) -> None:
        """NodeLocal DNSCache on the node: its addresses on a link named ``nodelocaldns`` (a
        bridge without ports: node-local-dns makes a dummy link, and this kernel may have no
        dummy driver) and a DNS server on each."""
        if wanted == ("nodelocal" in self.features):
            return
        if wanted:
            self.node.ip("link", "add", "nodelocaldns", "type", "bridge")
            for address in NODE_CACHE:
                self.node.ip("addr", "add", f"{address}/32", "dev", "nodelocaldns")
            self.node.ip("link", "set", "nodelocaldns", "up")
            self.node.run(["sysctl", "-qw", "net.ipv4.tcp_synack_retries=0"])
            for address in NODE_CACHE:
                self._start_server("node", address)
        else:
            for address in NODE_CACHE:
                stop(self.servers.pop(address))
            self.node.ip("link", "del", "nodelocaldns")

    def dumps(self) -> dict[str, str]:
        """What the real tools print about the node's rules, by vector file suffix."""
        return {
            "iptables-save": self.node.run(["iptables-save", "-c"]),
            "ip6tables-save": self.node.run(["ip6tables-save", "-c"]),
            "iptables-legacy-save": self.node.run(["iptables-legacy-save", "-c"]),
            "ip6tables-legacy-save": self.node.run(["ip6tables-legacy-save", "-c"]),
            "nft.json": self.node.run(["nft", "-j", "list", "ruleset"]),
        }

    def drop_counters(self) -> dict[str, int]:
        """The drop counters of the node's rules; IPv6's only with the ``ipv6`` feature (other
        IPv6 packets, neighbour discovery, never count into an IPv4 scenario's evidence)."""
        dumps = self.dumps()
        found = {
            **iptables_drop_counters(dumps["iptables-save"], "iptables-nft"),
            **iptables_drop_counters(dumps["iptables-legacy-save"], "iptables-legacy"),
        }
        if "ipv6" in self.features:
            found.update(iptables_drop_counters(dumps["ip6tables-save"], "ip6tables-nft"))
            found.update(iptables_drop_counters(dumps["ip6tables-legacy-save"], "ip6tables-legacy"))
        found.update(nft_drop_counters(json.loads(dumps["nft.json"]), iptables_tables(dumps)))
        return found

    # ---------------------------------------------------------------- packets

    def _count_queries(self, role: str) -> None:
        """Counters of the queries that reach a server: UDP to port 53 and TCP SYNs (a late
        segment of an earlier connection is no new query)."""
        self.ns[role].run(["nft", "-f", "-"], stdin=_SERVER_COUNTERS)
        # An unanswered SYN-ACK is not retried: its retries would reach the next flow.
        self.ns[role].run(["sysctl", "-qw", "net.ipv4.tcp_synack_retries=0"])

    def _server_log(self, address: str) -> Path:
        return self.workdir / f"queries-{address}"

    def _server_received(self, probe: Probe) -> int:
        if probe.server == "node":  # the node's rules are the ones judged: no counters there
            lines = self._server_log(probe.address).read_text().splitlines()
            return sum(1 for line in lines if line.startswith(probe.protocol))
        listed = json.loads(self.ns[probe.server].run(["nft", "-j", "list", "counters"]))
        name = "dns_udp" if probe.protocol == "udp" else "dns_syn"
        for item in listed["nftables"]:
            counter = item.get("counter")
            if counter and counter["name"] == name:
                return int(counter["packets"])
        raise RuntimeError(f"no counter {name} in {probe.server}")

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

    def probe(self, query: Probe) -> ProbeObservation:
        received = self._server_received(query)
        probe = DnsProbe(PROBE_NAME, self.probe_timeout, netns=self.ns[query.source].name)
        with self._drops() as drops:
            result = probe.probe(query.address, "udp" if query.protocol == "udp" else "tcp")
        return ProbeObservation(
            answered=result.ok,
            reached_server=self._server_received(query) > received,
            outcome=result.outcome if result.ok else f"{result.outcome} {result.error}",
            drops=drops,
        )

    def _rx(self, ifname: str) -> int:
        stats = json.loads(self.node.run(["ip", "-j", "-s", "link", "show", ifname]))
        return int(stats[0]["stats64"]["rx"]["packets"])

    def probe_overlay(self, ifname: str = "flannel.1", pod: str = POD_IP) -> FlowObservation:
        """A new flow from the peer's side over a vxlan link: the DNS pod queries the pod.
        The outer UDP packet passed the node's INPUT when the link received it."""
        received = self._rx(ifname)
        with self._drops() as drops:
            DnsProbe(PROBE_NAME, 0.3, netns=self.ns["dnspod"].name).probe(pod, "udp")
        passed = self._rx(ifname) > received
        return FlowObservation(
            "pass" if passed else "drop",
            f"node {ifname} rx {'rose' if passed else 'did not rise'}",
            {} if passed else drops,
        )

    def probe_tunnel(self, kind: str) -> FlowObservation:
        """An IP-in-IP or WireGuard packet from the peer node to the node's address (this
        kernel may have neither driver: the packets are made and received by sockets). IP
        protocol 4 reaches a raw IPPROTO_IPIP socket in the node, UDP 51820 a UDP socket,
        only when the node's INPUT let it through."""
        proto, kind_of, port = (
            (socket.IPPROTO_UDP, socket.SOCK_DGRAM, WIREGUARD_PORT)
            if kind == "wireguard"
            else (socket.IPPROTO_IPIP, socket.SOCK_RAW, 0)
        )
        marker = secrets.token_bytes(8)
        # IP-in-IP carries an IPv4 packet (here a header, pod to pod, and the marker).
        inner = _ipv4_header(DNS_POD_IP, POD_IP, len(marker)) if kind == "ipip" else b""

        def listen() -> socket.socket:
            sock = socket.socket(socket.AF_INET, kind_of, proto)
            if kind == "wireguard":
                sock.bind((NODE_IP, port))
            sock.settimeout(0.3)
            return sock

        def send() -> None:
            with socket.socket(socket.AF_INET, kind_of, proto) as sock:
                sock.sendto(inner + marker, (NODE_IP, port))

        with run_in_netns(self.node.name, listen) as listener, self._drops() as drops:
            run_in_netns(self.ns["peer"].name, send)
            passed = _received(listener, marker)
        what = "raw IPPROTO_IPIP socket" if kind == "ipip" else f"UDP socket on {port}"
        return FlowObservation(
            "pass" if passed else "drop",
            f"the node's {what} {'got' if passed else 'never got'} the peer's packet",
            {} if passed else drops,
        )

    def observe(self) -> dict[str, FlowObservation]:
        """Every flow's kernel verdict under the node's current rules (:func:`lab_flows` of
        the lab's features). A query flow passes when the server got each of its queries;
        ``dns-replies`` when the answers to the cluster DNS queries that got through came
        back (``unobserved`` when none got through)."""
        family = "inet" if "ipv6" in self.features else "ip"
        self.tracer = Tracer(self.node, iptables_tables(self.dumps()), family)
        try:
            return self._observe()
        finally:
            self.tracer.close()
            self.tracer = None

    def _observe(self) -> dict[str, FlowObservation]:
        observed: dict[str, FlowObservation] = {}
        replies: dict[str, list[str]] = {}
        replies_dropped: dict[str, dict[str, int]] = {}
        for flow, queries in flow_probes(self.features).items():
            family, _, name = flow.rpartition(":")
            family = family or "ipv4"
            evidence, drops, passed = [], {}, True
            for query in queries:
                seen = self.probe(query)
                passed = passed and seen.reached_server
                evidence.append(
                    f"{query.source} -> {query.address}: server "
                    f"{'got' if seen.reached_server else 'never got'} the query; "
                    f"{'answered' if seen.answered else seen.outcome}"
                )
                if not seen.reached_server:
                    drops.update(seen.drops)
                elif not name.startswith("dns-upstream"):
                    answered = "answered" if seen.answered else "lost"
                    replies.setdefault(family, []).append(f"{flow}:{answered}")
                    if not seen.answered:
                        _add(replies_dropped.setdefault(family, {}), seen.drops)
            observed[flow] = FlowObservation(
                "pass" if passed else "drop", "; ".join(evidence), drops
            )
        for family in ("ipv4", "ipv6") if "ipv6" in self.features else ("ipv4",):
            got = replies.get(family, [])
            lost = [r for r in got if r.endswith(":lost")]
            observed[flow_key("dns-replies", family)] = FlowObservation(
                ("drop" if lost else "pass") if got else "unobserved",
                ", ".join(got) or "no cluster DNS query reached the server",
                replies_dropped.get(family, {}),
            )
        observed["overlay-vxlan"] = self.probe_overlay()
        if "vxlan6" in self.features:
            observed[flow_key("overlay-vxlan", "ipv6")] = self.probe_overlay(VXLAN6, POD_IP6)
        for kind in ("ipip", "wireguard"):
            if kind in self.features:
                observed[f"overlay-{kind}"] = self.probe_tunnel(kind)
        return {flow: observed[flow] for flow in lab_flows(self.features)}


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for key, packets in more.items():
        into[key] = into.get(key, 0) + packets


def _ipv4_header(source: str, destination: str, payload: int) -> bytes:
    """A minimal IPv4 header (protocol 253, experimental; checksum left 0)."""
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + payload, 0, 0, 64, 253, 0,
        socket.inet_aton(source), socket.inet_aton(destination),
    )  # fmt: skip


def _received(sock: socket.socket, marker: bytes) -> bool:
    """Whether ``marker`` ends a datagram (or raw packet) ``sock`` gets before its timeout."""
    while True:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            return False
        if data.endswith(marker):
            return True


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
