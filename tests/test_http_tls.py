"""Issue 16: ``--web-config-file`` — TLS, client certificates and basic auth on the metrics
endpoint, with certificates from a test CA made by the openssl command line; bad files are
refused with the file and the key named. Prometheus' own ``promtool check web-config`` says
whether the files we accept are valid exporter web configurations."""

from __future__ import annotations

import base64
import http.client
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import realkernel
import yaml
from agentproc import nodediag
from prometheus_client import CollectorRegistry, Gauge
from testca import Certificates, make_test_ca, sign

from agent import web_config
from agent.http import HttpServer, make_app
from agent.web_config import WebConfig, WebConfigError, libcrypt, load

# A bcrypt test vector of jBCrypt (the password "abc"), cost 6: quick to check.
ABC_HASH = "$2a$06$If6bvum7DFjUnE9p2uDeDu0YHzrHM6tf.iqN8.yx.jNN1ILEf7h0i"
JBCRYPT_VECTORS = [
    ("", "$2a$06$DCq7YPn5Rq63x1Lad4cll.TV4S6ytwfsfvkgY8jIucDrjc8deX1s."),
    ("a", "$2a$06$m0CrhHm10qJ3lXRY.5zDGO3rS2KdeeWLuGmsfGlMfOxih58VYVfxe"),
    ("abc", ABC_HASH),
]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_test_ca(tmp_path_factory.mktemp("ca"))


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    path = directory / "web.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def tls_section(certs: Certificates, **extra: str) -> dict[str, str]:
    return {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), **extra}


class Served:
    def __init__(self, config: Path) -> None:
        registry = CollectorRegistry()
        Gauge("nodediag_build_info", "b", ["version"], registry=registry).labels("t").set(1)
        app = make_app(registry, lambda: (True, "ok"), lambda: (True, "ready"))
        self.server = HttpServer("127.0.0.1", 0, app, web_config=WebConfig(config))
        self.server.start()

    def get(
        self, certs: Certificates, path: str, client: tuple[Path, Path] | None = None, **kw: Any
    ) -> tuple[int, dict[str, str], bytes]:
        context = ssl.create_default_context(cafile=certs.ca)
        if client is not None:
            context.load_cert_chain(*client)
        if "max_version" in kw:
            context.maximum_version = kw.pop("max_version")
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.server.port, context=context, timeout=10
        )
        try:
            conn.request("GET", path, headers=kw.get("headers", {}))
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[Served] = []

    def start(config: dict[str, Any]) -> Served:
        started.append(Served(write_config(tmp_path, config)))
        return started[-1]

    yield start
    for served in started:
        served.server.stop()


def test_tls_scrape_checked_against_the_ca(certs: Certificates, serve: Any) -> None:
    served = serve({"tls_server_config": tls_section(certs)})
    status, _, body = served.get(certs, "/metrics")
    assert status == 200 and b'nodediag_build_info{version="t"} 1.0' in body
    assert served.get(certs, "/healthz")[0] == 200
    # Plain HTTP to the TLS port gets no answer, and the server carries on.
    plain = http.client.HTTPConnection("127.0.0.1", served.server.port, timeout=10)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        plain.request("GET", "/metrics")
        plain.getresponse()
    plain.close()
    assert served.server.stats.tls_failures >= 1
    assert served.get(certs, "/metrics")[0] == 200


def test_min_version_is_enforced(certs: Certificates, serve: Any) -> None:
    served = serve({"tls_server_config": tls_section(certs, min_version="TLS13")})
    assert served.get(certs, "/healthz")[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        served.get(certs, "/healthz", max_version=ssl.TLSVersion.TLSv1_2)


def test_required_client_certificate(certs: Certificates, serve: Any) -> None:
    served = serve(
        {
            "tls_server_config": tls_section(
                certs, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(certs.ca)
            )
        }
    )
    client = (certs.client_cert, certs.client_key)
    assert served.get(certs, "/metrics", client)[0] == 200
    # Without a certificate: the kubelet's probes get through, /metrics does not.
    status, _, body = served.get(certs, "/metrics")
    assert (status, body) == (403, b"a client certificate is required\n")
    assert served.get(certs, "/healthz")[:1] == (200,)
    assert served.get(certs, "/readyz")[:1] == (200,)
    # A certificate of another CA fails the handshake.
    with pytest.raises((ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected)):
        served.get(certs, "/healthz", (certs.stranger_cert, certs.stranger_key))


def test_client_certificate_if_given(certs: Certificates, serve: Any) -> None:
    served = serve(
        {
            "tls_server_config": tls_section(
                certs, client_auth_type="VerifyClientCertIfGiven", client_ca_file=str(certs.ca)
            )
        }
    )
    assert served.get(certs, "/metrics")[0] == 200
    assert served.get(certs, "/metrics", (certs.client_cert, certs.client_key))[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected)):
        served.get(certs, "/metrics", (certs.stranger_cert, certs.stranger_key))


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_basic_auth(certs: Certificates, serve: Any) -> None:
    served = serve(
        {"tls_server_config": tls_section(certs), "basic_auth_users": {"prometheus": ABC_HASH}}
    )
    status, headers, _ = served.get(certs, "/metrics")
    assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="nodediag"'
    for wrong in (basic("prometheus", "abd"), basic("nobody", "abc"), {"Authorization": "Basic !"},
                  {"Authorization": "Bearer abc"}):  # fmt: skip
        assert served.get(certs, "/metrics", headers=wrong)[0] == 401
    assert served.get(certs, "/metrics", headers=basic("prometheus", "abc"))[0] == 200
    assert served.get(certs, "/metrics", headers=basic("prometheus", "abc"))[0] == 200  # cached
    assert served.get(certs, "/healthz")[0] == 200
    assert served.get(certs, "/nothing")[0] == 404


@pytest.mark.parametrize(("password", "hashed"), JBCRYPT_VECTORS)
def test_libcrypt_checks_bcrypt_test_vectors(password: str, hashed: str) -> None:
    crypt = libcrypt()
    assert crypt is not None, "no libcrypt (Debian package libcrypt1)"
    assert crypt(password.encode(), hashed.encode()) == hashed.encode()
    assert crypt(password.encode() + b"x", hashed.encode()) != hashed.encode()


def test_certificates_renewed_in_place_are_served(
    certs: Certificates, serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(web_config, "RELOAD_CHECK_SECONDS", 0.0)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(certs.server_cert, cert)
    shutil.copy(certs.server_key, key)
    served = serve({"tls_server_config": {"cert_file": str(cert), "key_file": str(key)}})
    assert _served_certificate(served.server.port) == _der(certs.server_cert)
    renewed = sign(tmp_path, "renewed", (certs.ca, certs.ca.with_suffix(".key")), "serverAuth")
    shutil.copy(renewed[0], cert)
    shutil.copy(renewed[1], key)
    assert _served_certificate(served.server.port) == _der(renewed[0])
    assert served.get(certs, "/metrics")[0] == 200
    # A broken renewal is logged and the last good certificate kept.
    key.write_text("not a key\n")
    assert _served_certificate(served.server.port) == _der(renewed[0])


def _served_certificate(port: int) -> bytes:
    return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port), timeout=10))


def _der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


# ------------------------------------------------------------------ files nodediag refuses


def bad_configs(certs: Certificates) -> list[tuple[dict[str, Any] | str, str]]:
    tls = tls_section(certs)
    return [
        ({"tls_server_config": {"cert_file": tls["cert_file"]}}, "tls_server_config.key_file"),
        ({"tls_server_config": {**tls, "cipher_suites": ["x"]}}, "tls_server_config.cipher_suites"),
        ({"http_server_config": {"http2": False}}, "http_server_config: not supported"),
        ({"tls_server_config": {**tls, "client_auth_type": "RequireAnyClientCert"}},
         "tls_server_config.client_auth_type: RequireAnyClientCert"),
        ({"tls_server_config": {**tls, "client_auth_type": "RequireAndVerifyClientCert"}},
         "tls_server_config.client_ca_file: required"),
        ({"tls_server_config": {**tls, "min_version": "SSL3"}}, "tls_server_config.min_version"),
        ({"tls_server_config": {**tls, "cert_file": "/nonexistent.crt"}}, "/nonexistent.crt"),
        ({"basic_auth_users": {"alice": "plain-password"}},
         "basic_auth_users.alice: not a bcrypt hash"),
        ({"basic_auth_users": {"alice": "$2y$99$" + "a" * 53}}, "basic_auth_users.alice"),
        ("tls_server_config: [unclosed", "not YAML"),
    ]  # fmt: skip


def test_bad_files_are_refused_naming_file_and_key(certs: Certificates, tmp_path: Path) -> None:
    for i, (config, expected) in enumerate(bad_configs(certs)):
        path = tmp_path / f"bad-{i}.yml"
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        with pytest.raises(WebConfigError) as error:
            load(path)
        assert str(path) in str(error.value) and expected in str(error.value), error.value


def test_nodediag_run_refuses_a_bad_file_at_start(certs: Certificates, tmp_path: Path) -> None:
    path = write_config(tmp_path, {"basic_auth_users": {"alice": "secret"}})
    result = nodediag(
        "run", "--no-kube", "--state-dir", str(tmp_path / "state"), "--web-config-file", str(path)
    )
    assert result.returncode == 2, result.stderr
    assert f"--web-config-file {path}: basic_auth_users.alice: not a bcrypt hash" in result.stderr
    assert "Traceback" not in result.stderr


def test_what_nodediag_accepts_promtool_accepts(certs: Certificates, tmp_path: Path) -> None:
    """Prometheus' own checker of exporter web configurations is the oracle for the format."""
    promtool = shutil.which("promtool")
    if promtool is None:
        realkernel.skip_or_fail("promtool not installed (Debian package prometheus)")
    mtls = tls_section(
        certs, client_auth_type="RequireAndVerifyClientCert", client_ca_file=str(certs.ca)
    )
    good = [
        {"tls_server_config": tls_section(certs, min_version="TLS13")},
        {"tls_server_config": mtls, "basic_auth_users": {"prometheus": ABC_HASH}},
    ]
    for i, config in enumerate(good):
        path = tmp_path / f"good-{i}.yml"
        path.write_text(yaml.safe_dump(config))
        load(path)  # no error
        checked = subprocess.run([promtool, "check", "web-config", str(path)], capture_output=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
