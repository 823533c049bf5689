"""The real ``nodediag scan``/``run``/``analyze`` on DNS faults made by the node: a DROP of
DNS in OUTPUT and a VXLAN link with checksum offload, inside a test network namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import realkernel
from agentproc import REPO, free_port, json_lines, nodediag
from prometheus_client.parser import text_string_to_metric_families
from test_firewall_netns import Netns, missing_tools

pytestmark = pytest.mark.root

VECTORS = Path(__file__).parent / "vectors" / "firewall"
CLUSTER_DNS = "10.43.0.10"


@pytest.fixture
def faulty_node() -> Iterator[Netns]:
    """A namespace with kube-proxy-shaped rules plus a DNS DROP in OUTPUT, and a flannel.1
    VXLAN link with tx checksum offload on."""
    missing = missing_tools() + [t for t in ("ethtool",) if not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        realkernel.skip_or_fail(f"not installed: {', '.join(missing)}")
    with Netns() as ns:
        ns.load_scenario("clean_rke2")
        ns.run(["iptables", "-A", "OUTPUT", "-d", f"{CLUSTER_DNS}/32", "-p", "udp",
                "--dport", "53", "-j", "DROP"])  # fmt: skip
        ns.run(["ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dstport",
                "8472", "local", "10.0.0.1", "dev", "dummy0"])  # fmt: skip
        ns.run(["ethtool", "-K", "flannel.1", "tx-checksum-ip-generic", "on"])
        yield ns


def agent_in(ns: Netns, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns.name, sys.executable, "-m", "agent", *args]


def by_reason(findings: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for finding in findings:
        grouped.setdefault(finding["reason"], []).append(finding)
    return grouped


def test_scan_reports_the_drop_rule_the_offload_and_the_failing_probe(
    faulty_node: Netns, tmp_path: Path
) -> None:
    result = subprocess.run(
        agent_in(faulty_node, "scan", "--json", "--no-kube", "--kernel-log", "kmsg",
                 "--since", "1s", "--cluster-dns", CLUSTER_DNS, "--node-name", "node-x"),
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    found = by_reason(json_lines(result.stdout))

    [drop] = found["DNSDropRule"]
    assert drop["subject"] == {"kind": "Node", "name": "node-x", "namespace": None,
                               "uid": None, "container": None, "container_id": None}  # fmt: skip
    assert drop["details"]["chain"] == "OUTPUT"
    assert drop["details"]["hits_cluster_dns"] is True
    assert "-D OUTPUT" in drop["details"]["fix"]

    [offload] = found["VXLANChecksumOffload"]
    assert offload["details"]["interface"] == "flannel.1"
    assert "ethtool -K flannel.1 tx-checksum-ip-generic off" in offload["message"]

    udp = [f for f in found["DNSProbeFailed"] if f["details"]["protocol"] == "udp"]
    assert [f["details"]["outcome"] for f in udp] == ["local_rule"]
    assert udp[0]["details"]["server"] == CLUSTER_DNS


def _metrics(ns: Netns, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    script = f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read().decode())"
    text = ns.run(["python3", "-c", script])
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_run_exports_the_faults_and_fixes_offload_when_asked(
    faulty_node: Netns, tmp_path: Path
) -> None:
    port = free_port()
    # Files, not pipes: the agent prints every finding (this boot's OOM kills too), and an
    # undrained pipe would block it.
    out_file = (tmp_path / "stdout").open("w+")
    err_file = (tmp_path / "stderr").open("w+")
    agent = subprocess.Popen(
        agent_in(faulty_node, "run", "--no-kube", "--kernel-log", "kmsg",
                 "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path),
                 "--cluster-dns", CLUSTER_DNS, "--fix-vxlan-offload"),
        stdout=out_file, stderr=err_file, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        while time.monotonic() < deadline:
            try:
                samples = _metrics(faulty_node, port)
            except RuntimeError:
                samples = {}
            ran = [samples.get(("nodediag_collector_success", (("collector", c),))) for c in
                   ("firewall", "vxlan", "dns_probe", "kernel_log")]  # fmt: skip
            if all(value == 1 for value in ran):  # the kernel log may still be catching up
                break
            time.sleep(0.2)
        success = {
            collector: samples.get(("nodediag_collector_success", (("collector", collector),)))
            for collector in ("firewall", "vxlan", "dns_probe", "kernel_log")
        }
        assert set(success.values()) == {1.0}, success
        drops = [v for (name, labels), v in samples.items() if name == "nodediag_dns_drop_rules"
                 and ("chain", "OUTPUT") in labels]  # fmt: skip
        assert drops == [1.0]
        # --fix-vxlan-offload turned it off on the first run.
        offload = ("nodediag_vxlan_tx_checksum_offload", (("interface", "flannel.1"),))
        assert samples[offload] == 0
        ethtool = faulty_node.run(["ethtool", "-k", "flannel.1"])
        assert "tx-checksum-ip-generic: off" in ethtool
        probe = ("nodediag_dns_probe_success", (("protocol", "udp"), ("server", CLUSTER_DNS)))
        assert samples[probe] == 0
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
        out_file.close()
        err_file.close()
    assert agent.returncode == 0, err
    reasons = {json.loads(line)["reason"] for line in out.splitlines() if line.startswith("{")}
    assert {"DNSDropRule", "DNSProbeFailed"} <= reasons


def test_analyze_a_support_bundle_rule_set() -> None:
    result = nodediag(
        "analyze", "--iptables-save", str(VECTORS / "fault_custom_reject.iptables-save"),
        "--nft-json", str(VECTORS / "clean_rke2.nft.json"), "--cluster-dns", CLUSTER_DNS,
        "--json",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    [hit] = json_lines(result.stdout)
    assert hit["reason"] == "DNSDropRule"
    assert hit["details"]["jump_path"][0] == "INPUT"
    clean = nodediag("analyze", "--iptables-save", str(VECTORS / "clean_rke2.iptables-save"))
    assert clean.returncode == 0, clean.stdout + clean.stderr
