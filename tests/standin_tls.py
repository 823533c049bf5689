"""A throwaway CA and a server certificate for 127.0.0.1, made with the ``openssl`` CLI
(Debian ``openssl``), so the API stand-in serves HTTPS the way kube-apiserver does and
clients verify it against ``ca.crt`` as in a pod."""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, text=True)


def make_tls(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A CA (``ca.crt``) and a server certificate for ``host`` signed by it."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *curve, "-keyout", str(ca_key), "-out", str(ca_cert),
             "-days", "2", "-subj", "/CN=nodediag-test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    _openssl("req", "-new", *curve, "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=kube-apiserver")  # fmt: skip
    extensions = directory / "server.ext"
    extensions.write_text(
        f"subjectAltName=IP:{host},DNS:localhost,DNS:kubernetes.default.svc\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2",
             "-extfile", str(extensions))  # fmt: skip
    return TlsFiles(ca_cert, cert, key)
