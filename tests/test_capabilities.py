"""``nodediag scan`` with exactly the capabilities the DaemonSet ships, read from the
rendered ``daemonset/`` manifest (util-linux ``setpriv``: bounding, inheritable and ambient
sets, no_new_privs as allowPrivilegeEscalation says), in a network namespace this test made
holding a DNS DROP in one backend (iptables-legacy, iptables-nft, native nft) and a DNS test
server on the cluster DNS IP. The kernel decides what the reduced process may read.

With the shipped set, each backend's drop is found. With ``NET_ADMIN`` alone (the set before
NET_RAW was added), the legacy tables cannot be read: the scan names ``iptables-legacy-save``
as not checked — in the report, in the JSON lines and in its exit status — and never says
"No faults found"; nft and iptables-nft are still read.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import realkernel
from agentproc import REPO, json_lines
from test_deploy import container, rendered
from test_firewall_netns import Netns, missing_tools

pytestmark = pytest.mark.root

CLUSTER_DNS = "10.43.0.10"
SERVER_SCRIPT = Path(__file__).with_name("dns_test_server.py")
DROP = ("OUTPUT", "-p", "udp", "-d", CLUSTER_DNS, "--dport", "53", "-j", "DROP")
NFT_DROP = (
    "table inet nodediag_test {\n"
    "  chain out { type filter hook output priority 0; policy accept;\n"
    f"    ip daddr {CLUSTER_DNS} udp dport 53 drop\n"
    "  }\n"
    "}\n"
)
#: backend -> how to plant the DNS drop
PLANT: dict[str, tuple[str, ...]] = {
    "iptables-legacy": ("iptables-legacy", "-A", *DROP),
    "iptables-nft": ("iptables-nft", "-A", *DROP),
    "nft": ("nft", "-f", "-"),
}


def shipped_capabilities() -> tuple[list[str], bool]:
    """The DaemonSet's added capabilities and whether privilege escalation is allowed."""
    security: dict[str, Any] = container(rendered("base"))["securityContext"]
    capabilities = security["capabilities"]
    assert capabilities["drop"] == ["ALL"], "this translation assumes drop: [ALL]"
    return list(capabilities.get("add", [])), bool(security["allowPrivilegeEscalation"])


def setpriv(capabilities: Sequence[str], no_new_privs: bool) -> list[str]:
    """A ``setpriv`` prefix giving uid 0 exactly ``capabilities`` (as containerd does)."""
    caps = ",".join(["-all", *(f"+{c.lower()}" for c in capabilities)])
    argv = ["setpriv", "--bounding-set", caps, "--inh-caps", caps, "--ambient-caps", caps]
    return argv + (["--no-new-privs"] if no_new_privs else [])


@pytest.fixture
def node() -> Iterator[Netns]:
    """A namespace whose lo holds the cluster DNS IP, answered by a DNS test server."""
    missing = missing_tools() + [
        t for t in ("setpriv", "iptables-legacy", "iptables-nft") if shutil.which(t) is None
    ]
    if missing:
        realkernel.skip_or_fail(f"not installed: {', '.join(missing)}")
    with Netns() as ns:
        ns.run(["ip", "addr", "add", f"{CLUSTER_DNS}/32", "dev", "lo"])
        ready = Path(f"/tmp/{ns.name}.ready")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, sys.executable, str(SERVER_SCRIPT),
             "--address", CLUSTER_DNS, "--ready", str(ready)],
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while not ready.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the DNS test server did not start")
                time.sleep(0.05)
            yield ns
        finally:
            server.kill()
            server.wait()
            ready.unlink(missing_ok=True)


def plant(ns: Netns, backend: str) -> None:
    ns.run(PLANT[backend], stdin=NFT_DROP if backend == "nft" else None)


def scan(
    ns: Netns, capabilities: Sequence[str], no_new_privs: bool, tmp_path: Path, *flags: str
) -> subprocess.CompletedProcess[str]:
    """``nodediag scan`` in ``ns`` as uid 0 with ``capabilities`` only (an empty journal
    directory as the kernel log: this test is about the firewall)."""
    journal = tmp_path / "journal"
    journal.mkdir(exist_ok=True)
    argv = [
        "ip", "netns", "exec", ns.name, *setpriv(capabilities, no_new_privs),
        sys.executable, "-m", "agent", "scan", "--no-kube", "--node-name", "node-c",
        "--kernel-log", "journal", "--journal-path", str(journal), "--since", "1s",
        "--cluster-dns", CLUSTER_DNS, "--state-dir", str(tmp_path / "state"), *flags,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_the_translation_really_reduces_the_capabilities(node: Netns) -> None:
    """The oracle is the kernel: /proc/self/status of the reduced process."""
    status = node.run([*setpriv(["NET_ADMIN"], True), "cat", "/proc/self/status"])
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    net_admin = 1 << 12
    for field in ("CapBnd", "CapEff", "CapPrm", "CapAmb"):
        assert int(fields[field], 16) == net_admin, (field, fields[field])
    assert fields["NoNewPrivs"].strip() == "1"


@pytest.mark.parametrize("backend", sorted(PLANT))
def test_shipped_capabilities_find_the_drop_in_every_backend(
    node: Netns, backend: str, tmp_path: Path
) -> None:
    capabilities, escalation = shipped_capabilities()
    plant(node, backend)
    result = scan(node, capabilities, not escalation, tmp_path, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    findings = json_lines(result.stdout)
    drops = [f for f in findings if f["reason"] == "DNSDropRule"]
    assert [d["details"]["backend"] for d in drops] == [backend], findings
    assert drops[0]["details"]["hits_cluster_dns"] is True
    assert [f for f in findings if f["reason"] == "CollectorFailed"] == []
    # The kernel agrees: the UDP probe to the DNS server was stopped on this node.
    udp = [f for f in findings if f["reason"] == "DNSProbeFailed"]
    assert [f["details"]["outcome"] for f in udp] == ["local_rule"]


@pytest.mark.parametrize("backend", sorted(PLANT))
def test_net_admin_alone_names_the_legacy_source(node: Netns, backend: str, tmp_path: Path) -> None:
    """The capability set before NET_RAW: nft backends still read; legacy named as failed."""
    _, escalation = shipped_capabilities()
    plant(node, backend)
    result = scan(node, ["NET_ADMIN"], not escalation, tmp_path, "--json")
    findings = json_lines(result.stdout)
    failed = [f for f in findings if f["reason"] == "CollectorFailed"]
    drops = [f for f in findings if f["reason"] == "DNSDropRule"]
    if backend == "iptables-legacy":
        assert drops == [], findings
        [legacy] = failed
        assert legacy["severity"] == "error"
        assert legacy["details"]["collector"] == "firewall"
        assert legacy["details"]["source"] == "iptables-legacy-save"
        assert "Permission denied" in legacy["details"]["error"]
        assert "CAP_NET_RAW" in legacy["details"]["error"]
    else:
        assert failed == [], findings
        assert [d["details"]["backend"] for d in drops] == [backend]
    # The UDP probe fails on the planted drop: a warning finding, exit 1 either way.
    assert result.returncode == 1, result.stdout + result.stderr

    report = scan(node, ["NET_ADMIN"], not escalation, tmp_path)
    assert "No faults found" not in report.stdout
    if backend == "iptables-legacy":
        assert "COULD NOT CHECK" in report.stdout
        assert "iptables-legacy-save (firewall): " in report.stdout
        assert "collector firewall source iptables-legacy-save failed" in report.stderr


def test_unreadable_legacy_tables_are_never_no_faults_found(node: Netns, tmp_path: Path) -> None:
    """Nothing wrong that can be seen, but legacy tables that cannot be read: exit 2 and the
    report says what was not checked; with the shipped set, the same node is clean (exit 0)."""
    node.run(["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])
    capabilities, escalation = shipped_capabilities()

    blind = scan(node, ["NET_ADMIN"], not escalation, tmp_path)
    assert blind.returncode == 2, blind.stdout + blind.stderr
    assert "No faults found." not in blind.stdout
    assert "1 thing(s) not checked" in blind.stdout
    assert "iptables-legacy-save (firewall): " in blind.stdout
    assert "No faults found in what could be checked." in blind.stdout

    clean = scan(node, capabilities, not escalation, tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "No faults found.\n" in clean.stdout


def _http(ns: Netns, port: int, path: str) -> tuple[int, str]:
    script = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
    )
    status, _, body = ns.run(["python3", "-c", script]).partition("\n")
    return int(status), body


@pytest.mark.parametrize("capabilities", [["NET_ADMIN"], None], ids=["net-admin-only", "shipped"])
def test_run_exports_the_source_and_stays_healthy(
    node: Netns, capabilities: list[str] | None, tmp_path: Path
) -> None:
    """``run``: the legacy source's series says whether it was read; the collector still
    runs (collector_success 1) and a source it cannot read does not fail /healthz or
    /readyz (a restart would not give the pod a capability)."""
    from agentproc import free_port
    from prometheus_client.parser import text_string_to_metric_families

    node.run(["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])
    shipped, escalation = shipped_capabilities()
    port = free_port()
    journal = tmp_path / "journal"
    journal.mkdir()
    err = (tmp_path / "stderr").open("w+")
    agent = subprocess.Popen(
        ["ip", "netns", "exec", node.name, *setpriv(capabilities or shipped, not escalation),
         sys.executable, "-m", "agent", "run", "--no-kube", "--kernel-log", "journal",
         "--journal-path", str(journal), "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(tmp_path / "state"), "--cluster-dns", CLUSTER_DNS],
        stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
    )  # fmt: skip
    try:
        legacy: float | None = None
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        deadline = time.monotonic() + 60
        while legacy is None and time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                _, text = _http(node, port, "/metrics")
            except (RuntimeError, ValueError):
                continue  # not listening yet
            samples = {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            key = frozenset({("collector", "firewall"), ("source", "iptables-legacy-save")})
            legacy = samples.get(("nodediag_collector_source_success", key))
        assert legacy == (0 if capabilities else 1), samples
        firewall = ("nodediag_collector_success", frozenset({("collector", "firewall")}))
        assert samples[firewall] == 1
        assert _http(node, port, "/healthz")[0] == 200
        assert _http(node, port, "/readyz")[0] == 200
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    err.seek(0)
    log = err.read()
    failed = log.count("collector firewall source iptables-legacy-save failed")
    assert failed == (1 if capabilities else 0), log
    if capabilities:
        assert "CAP_NET_RAW" in log
