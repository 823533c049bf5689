"""``--web-config-file``: TLS, client certificates and basic auth for the metrics endpoint, in
the file format of Prometheus' exporters (node_exporter's ``--web.config.file``)::

    tls_server_config:
      cert_file: /etc/nodediag/tls/tls.crt
      key_file: /etc/nodediag/tls/tls.key
      client_auth_type: RequireAndVerifyClientCert   # or NoClientCert, VerifyClientCertIfGiven
      client_ca_file: /etc/nodediag/tls/ca.crt
      min_version: TLS12                              # TLS10 … TLS13; max_version likewise
    basic_auth_users:
      prometheus: $2y$10$…                            # bcrypt hashes only

Keys nodediag does not implement are refused by name, never ignored. bcrypt hashes are
checked by the system's libcrypt (libxcrypt, Debian's ``libcrypt1``): ``crypt(3)`` with a
``$2b$``/``$2y$``/``$2a$`` setting. The file and the files it names are read again when one
of them changes (certificates renewed in a mounted Secret); a changed file that does not load
is logged and the previous configuration kept.

``/healthz`` and ``/readyz`` ask for neither a password nor a client certificate (the kubelet
can present neither); ``/metrics`` asks for both as configured."""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hashlib
import hmac
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

GUARDED_PATHS = frozenset({"/metrics"})
RELOAD_CHECK_SECONDS = 5.0
AUTH_CACHE_SIZE = 1024
TEXT = ("Content-Type", "text/plain; charset=utf-8")

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    # The handshake lets a client without a certificate in (CERT_OPTIONAL) so that the
    # kubelet's probes reach /healthz; /metrics then answers such a client 403.
    "RequireAndVerifyClientCert": ssl.CERT_OPTIONAL,
}
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
            "max_version")  # fmt: skip
TOP_KEYS = ("tls_server_config", "basic_auth_users")
_BCRYPT = re.compile(r"^\$2[aby]\$(0[4-9]|[12]\d|3[01])\$[./A-Za-z0-9]{53}$")
# A cheap (cost 4) setting: does this libcrypt do bcrypt at all?
_BCRYPT_PROBE = b"$2b$04$" + b"." * 22


class WebConfigError(ValueError):
    """The web configuration file is unusable; the message names the file and the key."""


@dataclass(frozen=True)
class Parsed:
    tls: ssl.SSLContext | None
    require_client_cert: bool
    users: dict[str, str]
    watched: tuple[Path, ...]
    """The config file and the files it names: a change to any reloads them all."""


def load(path: Path, crypt: Callable[[bytes, bytes], bytes | None] | None = None) -> Parsed:
    """Read and check a web configuration file; ``WebConfigError`` names what is wrong."""

    def fail(key: str, problem: str) -> WebConfigError:
        return WebConfigError(f"--web-config-file {path}: {key}: {problem}")

    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise WebConfigError(f"--web-config-file {path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise WebConfigError(f"--web-config-file {path}: not YAML ({error})") from None
    document = document or {}
    if not isinstance(document, dict):
        raise fail("(top level)", "must be a mapping")
    _only_known(document, TOP_KEYS, "", fail)
    tls_section = document.get("tls_server_config")
    tls, require_cert, named = (None, False, ()) if tls_section is None else _tls(tls_section, fail)
    users = _users(document.get("basic_auth_users"), fail, crypt or libcrypt())
    if users and tls is None:
        log.warning("%s: basic auth without tls_server_config sends passwords in clear", path)
    return Parsed(tls, require_cert, users, (path, *named))


def _only_known(
    section: dict[Any, Any], known: Iterable[str], prefix: str, fail: Callable[..., Exception]
) -> None:
    for key in section:
        if key not in known:
            raise fail(
                f"{prefix}{key}",
                f"not supported by nodediag (supported: {', '.join(known)})",
            )


def _tls(
    section: Any, fail: Callable[[str, str], WebConfigError]
) -> tuple[ssl.SSLContext, bool, tuple[Path, ...]]:
    prefix = "tls_server_config."
    if not isinstance(section, dict):
        raise fail("tls_server_config", "must be a mapping")
    _only_known(section, TLS_KEYS, prefix, fail)
    for key in ("cert_file", "key_file"):
        if not section.get(key):
            raise fail(prefix + key, "required when tls_server_config is given")
    auth = section.get("client_auth_type") or "NoClientCert"
    ca_file = section.get("client_ca_file")
    if auth in UNVERIFIED_CLIENT_AUTH:
        raise fail(
            prefix + "client_auth_type",
            f"{auth} (a client certificate taken without verifying it) is not supported; use "
            "VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file",
        )
    if auth not in CLIENT_AUTH:
        raise fail(prefix + "client_auth_type", f"unknown value {auth!r}")
    if auth != "NoClientCert" and not ca_file:
        raise fail(prefix + "client_ca_file", f"required with client_auth_type {auth}")
    if ca_file and auth == "NoClientCert":
        raise fail(prefix + "client_auth_type", "client_ca_file is given but no client_auth_type")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for key, default in (("min_version", "TLS12"), ("max_version", None)):
        name = section.get(key) or default
        if name is None:
            continue
        if name not in TLS_VERSIONS:
            raise fail(prefix + key, f"unknown version {name!r} (use {', '.join(TLS_VERSIONS)})")
        setattr(context, "minimum_version" if key == "min_version" else "maximum_version",
                TLS_VERSIONS[name])  # fmt: skip
    named = [Path(section["cert_file"]), Path(section["key_file"])]
    try:
        context.load_cert_chain(named[0], named[1])
    except (OSError, ssl.SSLError) as error:
        raise fail(prefix + "cert_file/key_file", f"{named[0]}, {named[1]}: {error}") from None
    if ca_file:
        named.append(Path(ca_file))
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            raise fail(prefix + "client_ca_file", f"{ca_file}: {error}") from None
    context.verify_mode = CLIENT_AUTH[auth]
    return context, auth == "RequireAndVerifyClientCert", tuple(named)


def _users(
    section: Any,
    fail: Callable[[str, str], WebConfigError],
    crypt: Callable[[bytes, bytes], bytes | None] | None,
) -> dict[str, str]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise fail("basic_auth_users", "must be a mapping of user name to bcrypt hash")
    if section and (crypt is None or crypt(b"probe", _BCRYPT_PROBE) is None):
        raise fail(
            "basic_auth_users",
            "bcrypt hashes cannot be checked on this system (no libcrypt with bcrypt)",
        )
    users = {}
    for user, hashed in section.items():
        key = f"basic_auth_users.{user}"
        if not isinstance(hashed, str) or not _BCRYPT.match(hashed):
            raise fail(key, "not a bcrypt hash ($2y$10$… as `htpasswd -nbBC 10 USER PASS` makes)")
        users[str(user)] = hashed
    return users


# ---------------------------------------------------------------------- bcrypt via libcrypt


def libcrypt() -> Callable[[bytes, bytes], bytes | None] | None:
    """``crypt(3)`` of the system's libxcrypt, or None where there is none."""
    for name in (ctypes.util.find_library("crypt"), "libcrypt.so.1"):
        if not name:
            continue
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        function = library.crypt
        function.restype = ctypes.c_char_p
        function.argtypes = [ctypes.c_char_p, ctypes.c_char_p]

        def crypt(phrase: bytes, setting: bytes, function: Any = function) -> bytes | None:
            result = function(phrase, setting)
            # libxcrypt answers a failure with NULL or a string starting with "*".
            ok = isinstance(result, bytes) and result[:4] == setting[:4]
            return result if ok else None

        return crypt
    return None


@dataclass
class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes. One check at a time (crypt(3)
    keeps its answer in a static buffer, and bcrypt is slow on purpose); answers are cached
    per user, hash and password digest, as the exporters' toolkit does."""

    users: dict[str, str]
    crypt: Callable[[bytes, bytes], bytes | None]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cache: dict[bytes, bool] = field(default_factory=dict)

    def allows(self, header: str | None) -> bool:
        credentials = _basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        hashed = self.users.get(user)
        # An unknown user costs one bcrypt too: the time taken does not tell users apart.
        setting = hashed or next(iter(self.users.values()))
        key = hashlib.sha256(b"\0".join([user.encode(), setting.encode(), password])).digest()
        with self._lock:
            known = self._cache.get(key)
            if known is None:
                answer = self.crypt(password, setting.encode())
                known = hashed is not None and answer is not None
                known = known and hmac.compare_digest(answer or b"", setting.encode())
                if len(self._cache) >= AUTH_CACHE_SIZE:
                    self._cache.clear()
                self._cache[key] = known
        return known


def _basic_credentials(header: str | None) -> tuple[str, bytes] | None:
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon or b"\0" in password:
        return None
    return user.decode("utf-8", "replace"), password


# ---------------------------------------------------------------------- the running config


class WebConfig:
    """The loaded file, read again when it or a file it names changes."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._crypt = libcrypt()
        self._parsed = load(path, self._crypt)
        self._auth = self._make_auth(self._parsed)
        self._stamps = _stamps(self._parsed.watched)
        self._checked = clock()
        self._lock = threading.Lock()

    @property
    def tls(self) -> bool:
        return self._parsed.tls is not None

    def _make_auth(self, parsed: Parsed) -> BasicAuth | None:
        if not parsed.users:
            return None
        if self._crypt is None:  # load() refuses users without crypt(3): never serve open
            raise WebConfigError(f"--web-config-file {self.path}: basic_auth_users need crypt(3)")
        return BasicAuth(parsed.users, self._crypt)

    def tls_context(self) -> ssl.SSLContext | None:
        """The SSL context for a new connection (None: plain HTTP), reloaded when changed."""
        self._reload_if_changed()
        return self._parsed.tls

    def _reload_if_changed(self) -> None:
        now = self._clock()
        if now - self._checked < RELOAD_CHECK_SECONDS:
            return
        with self._lock:
            self._checked = now
            stamps = _stamps(self._parsed.watched)
            if stamps == self._stamps:
                return
            self._stamps = stamps
            try:
                parsed = load(self.path, self._crypt)
            except WebConfigError as error:
                log.error("%s; keeping the configuration loaded before", error)
                return
            self._parsed, self._auth = parsed, self._make_auth(parsed)
            self._stamps = _stamps(parsed.watched)
            log.info("--web-config-file %s: reloaded", self.path)

    def guard(self, app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        """The app behind the configured client certificate and basic auth checks."""

        def guarded(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO") not in GUARDED_PATHS:
                return app(environ, start_response)
            self._reload_if_changed()
            if self._parsed.require_client_cert and not environ.get("nodediag.client_cert"):
                start_response("403 Forbidden", [TEXT])
                return [b"a client certificate is required\n"]
            auth = self._auth
            if auth is not None and not auth.allows(environ.get("HTTP_AUTHORIZATION")):
                start_response(
                    "401 Unauthorized", [TEXT, ("WWW-Authenticate", 'Basic realm="nodediag"')]
                )
                return [b"Unauthorized\n"]
            return app(environ, start_response)

        return guarded


def _stamps(paths: Iterable[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    def stamp(path: Path) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    return tuple(stamp(p) for p in paths)
