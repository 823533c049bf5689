"""Where the cluster DNS is: the IPs pods resolve names through, and which source said so.

Sources, first that answers wins: the kubelet's config file (kubeadm
``/var/lib/kubelet/config.yaml``, or the file its ``--config`` flag names), K3s/RKE2 kubelet
drop-ins (``/var/lib/rancher/{k3s,rke2}/agent/etc/kubelet.conf.d/*`` merged in name order),
the ``cluster-dns`` key of ``/etc/rancher/{rke2,k3s}/config.yaml``, and ``--cluster-dns``
on a kubelet's command line in ``/proc``. All paths are under the host root. A file that
is there but cannot be read or parsed is named in ``ClusterDns.problems`` (never silently
taken for "not configured").

:func:`discover_resolv_conf` reads the same sources for kubelet's ``resolvConf``: the file
whose nameservers pods with ``dnsPolicy: Default`` (CoreDNS among them) are given.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

log = logging.getLogger(__name__)

KUBEADM_CONFIG = "var/lib/kubelet/config.yaml"
DROP_IN_DIRS = (
    "var/lib/rancher/rke2/agent/etc/kubelet.conf.d",
    "var/lib/rancher/k3s/agent/etc/kubelet.conf.d",
)
RANCHER_CONFIGS = ("etc/rancher/rke2/config.yaml", "etc/rancher/k3s/config.yaml")
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"


@dataclass(frozen=True, slots=True)
class ClusterDns:
    """The cluster DNS server IPs and the source they came from (``none`` when unknown)."""

    servers: tuple[str, ...]
    source: str
    problems: tuple[str, ...] = ()
    """Config files that exist but could not be read or parsed, each with why."""


def _valid_ips(values: Iterable[Any]) -> tuple[str, ...]:
    found: list[str] = []
    for value in values:
        for part in str(value).split(","):
            try:
                found.append(str(ipaddress.ip_address(part.strip())))
            except ValueError:
                continue
    return tuple(dict.fromkeys(found))


def _load_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    """The file's mapping; ``{}`` when it is missing or empty, or (named in ``problems``)
    unreadable, not YAML or not a mapping."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}
    # ValueError: bytes that are not UTF-8, and scalars PyYAML resolves but cannot build
    # ("2026-02-30", an int over Python's digit limit); RecursionError: nesting too deep.
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as error:
        problems.append(f"{path}: {str(error).splitlines()[0] if str(error) else error!r}")
        return {}
    if data is not None and not isinstance(data, dict):
        problems.append(f"{path}: not a YAML mapping")
    return data if isinstance(data, dict) else {}


def _from_kubelet_config(path: Path, problems: list[str]) -> tuple[str, ...]:
    value = _load_yaml(path, problems).get("clusterDNS")
    return _valid_ips(value if isinstance(value, list) else [value] if value else [])


def _from_drop_ins(directory: Path, problems: list[str]) -> tuple[str, ...]:
    if not directory.is_dir():
        return ()
    merged: tuple[str, ...] = ()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        merged = _from_kubelet_config(path, problems) or merged  # a later file overrides
    return merged


def _from_rancher_config(path: Path, problems: list[str]) -> tuple[str, ...]:
    value = _load_yaml(path, problems).get("cluster-dns")
    return _valid_ips(value if isinstance(value, list) else [value] if value else [])


def command_lines(proc: Path, program: bytes) -> Iterator[list[str]]:
    """argv of every process whose program (argv[0]'s base name) is ``program``."""
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].rsplit(b"/", 1)[-1] == program:
            yield [arg.decode("utf-8", "replace") for arg in argv if arg]


def kubelet_command_lines(proc: Path) -> Iterator[list[str]]:
    """argv of every process whose program is a kubelet."""
    return command_lines(proc, b"kubelet")


def flag_values(argv: list[str], flag: str) -> list[str]:
    """Values of ``--flag=value`` and ``--flag value`` in ``argv``."""
    values = []
    for i, arg in enumerate(argv):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
    return values


def _from_kubelet_process(
    host_root: Path, problems: list[str]
) -> tuple[tuple[str, ...], str] | None:
    for argv in kubelet_command_lines(host_root / "proc"):
        servers = _valid_ips(flag_values(argv, "--cluster-dns"))
        if servers:
            return servers, "kubelet --cluster-dns flag"
        for config in flag_values(argv, "--config"):
            path = host_root / config.lstrip("/")
            servers = _from_kubelet_config(path, problems)
            if servers:
                return servers, f"kubelet config {config} (from kubelet --config)"
    return None


def discover(host_root: Path = Path("/"), explicit: Iterable[str] = ()) -> ClusterDns:
    """The cluster DNS: ``explicit`` (``--cluster-dns``) wins, then the node's config."""
    given = _valid_ips(explicit)
    if given:
        return ClusterDns(given, "--cluster-dns")
    problems: list[str] = []
    kubeadm = host_root / KUBEADM_CONFIG
    if servers := _from_kubelet_config(kubeadm, problems):
        return ClusterDns(servers, f"kubelet config /{KUBEADM_CONFIG}", tuple(problems))
    for directory in DROP_IN_DIRS:
        if servers := _from_drop_ins(host_root / directory, problems):
            return ClusterDns(servers, f"kubelet drop-ins /{directory}", tuple(problems))
    for config in RANCHER_CONFIGS:
        if servers := _from_rancher_config(host_root / config, problems):
            return ClusterDns(servers, f"cluster-dns in /{config}", tuple(problems))
    found = _from_kubelet_process(host_root, problems)
    if found is not None:
        return ClusterDns(*found, tuple(problems))
    return ClusterDns((), "none", tuple(problems))


# ----------------------------------------------------------------------- kubelet resolvConf


def nameservers(text: str) -> list[str]:
    """The ``nameserver`` addresses of resolv.conf text, in order (zone ids dropped); a line
    that is not a valid address is skipped, as the resolver does."""
    found: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            found.append(str(ipaddress.ip_address(words[1].split("%", 1)[0])))
        except ValueError:
            continue
    return found


def in_root(root: Path, path: str, hops: int = 16) -> Path:
    """``path`` on the host seen under ``root``, following symlinks inside ``root`` (an
    absolute link target is the host's, not this process's). ``OSError`` on a link loop."""
    parts = list(PurePosixPath(path).parts[1:])
    current = root
    while parts:
        part = parts.pop(0)
        candidate = current / part
        if candidate.is_symlink():
            if hops == 0:
                raise OSError(f"{path}: too many symbolic links under {root}")
            hops -= 1
            target = PurePosixPath(os.readlink(candidate))
            base = root if target.is_absolute() else current
            parts = list(target.parts[1:] if target.is_absolute() else target.parts) + parts
            current = base
            continue
        current = current.parent if part == ".." and current != root else candidate
    return current


@dataclass(frozen=True, slots=True)
class ResolvConfSetting:
    """kubelet's ``resolvConf``: the path on the host (``""``: kubelet gives pods none), the
    source that said so (``kubelet default`` when none did) and the config files that could
    not be read or parsed on the way (the answer may then be wrong)."""

    path: str
    source: str
    problems: tuple[str, ...] = ()


def _string_key(path: Path, key: str, problems: list[str]) -> str | None:
    value = _load_yaml(path, problems).get(key)
    return value if isinstance(value, str) else None


def _resolv_conf_from_drop_ins(directory: Path, problems: list[str]) -> str | None:
    if not directory.is_dir():
        return None
    found: str | None = None
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        value = _string_key(path, "resolvConf", problems)
        found = value if value is not None else found  # a later file overrides
    return found


def _resolv_conf_from_rancher(path: Path, problems: list[str]) -> str | None:
    data = _load_yaml(path, problems)
    args = data.get("kubelet-arg")
    for arg in args if isinstance(args, list) else [args] if isinstance(args, str) else []:
        name, _, flag = str(arg).lstrip("-").partition("=")
        if name == "resolv-conf":
            return flag
    value = data.get("resolv-conf")
    return value if isinstance(value, str) else None


def _resolv_conf_from_process(host_root: Path, problems: list[str]) -> tuple[str, str] | None:
    for argv in kubelet_command_lines(host_root / "proc"):
        flags = flag_values(argv, "--resolv-conf")
        if flags:
            return flags[-1], "kubelet --resolv-conf flag"
        for config in flag_values(argv, "--config"):
            value = _string_key(host_root / config.lstrip("/"), "resolvConf", problems)
            if value is not None:
                return value, f"kubelet config {config} (from kubelet --config)"
    return None


def _find_resolv_conf(host_root: Path, problems: list[str]) -> tuple[str, str]:
    found = _resolv_conf_from_process(host_root, problems)
    if found is not None:
        return found
    if (value := _string_key(host_root / KUBEADM_CONFIG, "resolvConf", problems)) is not None:
        return value, f"kubelet config /{KUBEADM_CONFIG}"
    for directory in DROP_IN_DIRS:
        if (value := _resolv_conf_from_drop_ins(host_root / directory, problems)) is not None:
            return value, f"kubelet drop-ins /{directory}"
    for config in RANCHER_CONFIGS:
        if (value := _resolv_conf_from_rancher(host_root / config, problems)) is not None:
            return value, f"resolv-conf in /{config}"
    return DEFAULT_RESOLV_CONF, "kubelet default"


K3S_FALLBACK_RESOLV_CONF = "/var/lib/rancher/k3s/agent/etc/resolv.conf"


def k3s_valid_resolv_conf(text: str) -> bool:
    """K3s's test of a resolv.conf it may hand kubelet: at least one nameserver, and every
    one a global unicast address (not loopback, link-local, multicast or unspecified)."""
    found = False
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(words[1])
        except ValueError:
            return False
        if address.is_loopback or address.is_link_local or address.is_multicast:
            return False
        if address.is_unspecified:
            return False
        found = True
    return found


def _k3s_choice(host_root: Path) -> tuple[str, str]:
    """What an embedded K3s kubelet (no kubelet process to read) uses without resolv-conf:
    the first valid of /etc/resolv.conf and systemd-resolved's upstream file, else a file it
    writes itself with 8.8.8.8."""
    for candidate in (DEFAULT_RESOLV_CONF, "/run/systemd/resolve/resolv.conf"):
        try:
            text = (host_root / candidate.lstrip("/")).read_text(errors="replace")
        except OSError:
            continue
        if k3s_valid_resolv_conf(text):
            return candidate, "K3s's own choice (no resolv-conf set)"
    return K3S_FALLBACK_RESOLV_CONF, "K3s's fallback (no resolv-conf set, no valid host file)"


def discover_resolv_conf(host_root: Path = Path("/")) -> ResolvConfSetting:
    """Which file kubelet hands pods with ``dnsPolicy: Default``: a kubelet's own flag or
    config, the kubeadm config, K3s/RKE2 drop-ins and config, else kubelet's default (or,
    under K3s, whose kubelet runs inside the k3s process, K3s's own choice)."""
    problems: list[str] = []
    path, source = _find_resolv_conf(host_root, problems)
    if source == "kubelet default" and any(command_lines(host_root / "proc", b"k3s")):
        path, source = _k3s_choice(host_root)
    return ResolvConfSetting(path, source, tuple(problems))
