"""Issue 16 end to end: a real Prometheus (Debian's) scrapes a running ``nodediag run
--web-config-file`` over TLS with a client certificate and basic auth, the certificates from
a test CA made by openssl; scrape jobs with a wrong password or without a client certificate
are refused (their ``up`` is 0), and the plain-HTTP health probe path still answers."""

from __future__ import annotations

import http.client
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from agentproc import RunningAgent
from test_http_tls import ABC_HASH
from test_prometheus_e2e import Prometheus
from testca import make_test_ca

pytestmark = pytest.mark.root


def https_status(port: int, ca: Path, path: str) -> int:
    context = ssl.create_default_context(cafile=ca)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def wait_ready(agent: RunningAgent, ca: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.proc.poll() is not None:
            raise RuntimeError(f"agent exited {agent.proc.returncode}: {agent.log()}")
        try:
            if https_status(agent.port, ca, "/readyz") == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"agent not ready over TLS after {timeout}s: {agent.log()}")


def test_real_prometheus_scrapes_over_tls_with_client_cert_and_basic_auth(
    tmp_path: Path,
) -> None:
    certs = make_test_ca(tmp_path / "ca")
    config = tmp_path / "web.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {
                    "cert_file": str(certs.server_cert),
                    "key_file": str(certs.server_key),
                    "client_auth_type": "RequireAndVerifyClientCert",
                    "client_ca_file": str(certs.ca),
                },
                "basic_auth_users": {"prometheus": ABC_HASH},
            }
        )
    )
    agent = RunningAgent(
        ["--no-kube", "--kernel-log", "kmsg", "--state-dir", str(tmp_path / "state"),
         "--web-config-file", str(config)]
    )  # fmt: skip
    tls: dict[str, Any] = {
        "ca_file": str(certs.ca),
        "cert_file": str(certs.client_cert),
        "key_file": str(certs.client_key),
    }
    right = {"username": "prometheus", "password": "abc"}
    jobs = {
        "nodediag": {"scheme": "https", "tls_config": tls, "basic_auth": right},
        "wrong-password": {
            "scheme": "https",
            "tls_config": tls,
            "basic_auth": {**right, "password": "abd"},
        },
        "no-client-cert": {
            "scheme": "https",
            "tls_config": {"ca_file": str(certs.ca)},
            "basic_auth": right,
        },
        "plain-http": {},
    }
    prometheus: Prometheus | None = None
    try:
        wait_ready(agent, certs.ca)
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        prometheus = Prometheus(workdir, f"127.0.0.1:{agent.port}", [], jobs)
        prometheus.wait("the TLS job up", lambda: prometheus.query('up{job="nodediag"} == 1'))
        built = prometheus.wait(
            "nodediag_build_info over TLS",
            lambda: prometheus.query('nodediag_build_info{job="nodediag"} == 1'),
        )
        assert built[0]["metric"]["version"]
        targets = prometheus.wait(
            "every job scraped once",
            lambda: (
                found := prometheus.api("/api/v1/targets")["activeTargets"]
            ) and all(t["lastScrape"] != "0001-01-01T00:00:00Z" for t in found) and found,
        )  # fmt: skip
        health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in targets}
        assert health["nodediag"] == ("up", ""), health
        assert health["wrong-password"][0] == "down"
        assert "401" in health["wrong-password"][1], health
        assert health["no-client-cert"][0] == "down"
        assert "403" in health["no-client-cert"][1], health
        assert health["plain-http"][0] == "down", health
        # The kubelet's probe: HTTPS, no certificate, no password.
        assert https_status(agent.port, certs.ca, "/healthz") == 200
    finally:
        if prometheus is not None:
            prometheus.stop()
        assert agent.stop() == 0, agent.log()
