"""A throwaway certificate authority made with the openssl command line (Debian's openssl):
a server certificate for 127.0.0.1, a client certificate it signed, and a client certificate
of another CA the server must refuse."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import realkernel


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate signed by a CA the server does not trust."""
    stranger_key: Path


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _key_and_csr(directory: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, csr = directory / f"{name}.key", directory / f"{name}.csr"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", csr, "-subj", subject)  # fmt: skip
    return key, csr


def _authority(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return cert, key


def sign(directory: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    """A certificate ``name`` for ``usage`` (serverAuth for 127.0.0.1, or clientAuth)."""
    key, csr = _key_and_csr(directory, name, f"/CN={name}")
    extensions = directory / f"{name}.ext"
    lines = [f"extendedKeyUsage={usage}"]
    if usage == "serverAuth":
        lines.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
    extensions.write_text("\n".join(lines) + "\n")
    cert = directory / f"{name}.crt"
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", extensions)  # fmt: skip
    return cert, key


def make_test_ca(directory: Path) -> Certificates:
    if shutil.which("openssl") is None:
        realkernel.skip_or_fail("openssl not installed (Debian package openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _authority(directory, "nodediag-test-ca")
    other = _authority(directory, "nodediag-other-ca")
    server = sign(directory, "server", ca, "serverAuth")
    client = sign(directory, "prometheus", ca, "clientAuth")
    stranger = sign(directory, "stranger", other, "clientAuth")
    return Certificates(ca[0], *server, *client, *stranger)
