"""Fuzz cluster DNS discovery (collectors/cluster_dns.py): kubelet config files (kubeadm,
K3s/RKE2 drop-ins), the ``cluster-dns`` key of the RKE2/K3s config and a kubelet's command
line in /proc.

Input: one byte choosing where the rest goes (a bit per source, below), then the content,
written as is (a config file on a node can hold any bytes). The files live in a fixed tree
in ``fuzz/corpus/work/kubelet_config`` (the host root); the fuzzed content fills them, it
never names one (a ``--config`` path in a fuzzed command line has its ``..`` defused, so
nothing outside that root is read).
Seeds: the configs of tests/test_cluster_dns.py, each in its place.

Invariants (by design, see the module doc):
- nothing raises: a file that cannot be read or parsed counts as no answer;
- the servers are valid IP addresses, each once, as ``ipaddress`` prints them;
- the source is ``none`` exactly when no server is found, and names a source the input
  filled (no server from nowhere).
"""

from __future__ import annotations

import ipaddress
import sys

import _common
import atheris

_common.enable_hooks(atheris)
with atheris.instrument_imports(include=["collectors", "yaml"]):
    from collectors.cluster_dns import discover, flag_values

ROOT = _common.workdir("kubelet_config")  # the host root
KUBEADM = "var/lib/kubelet/config.yaml"
RKE2_DROP_IN = "var/lib/rancher/rke2/agent/etc/kubelet.conf.d/50-fuzz.conf"
K3S_DROP_IN = "var/lib/rancher/k3s/agent/etc/kubelet.conf.d/10-fuzz.conf"
RKE2_CONFIG = "etc/rancher/rke2/config.yaml"
K3S_CONFIG = "etc/rancher/k3s/config.yaml"
KUBELET_ARGV = "proc/100/cmdline"
CONFIG_FLAG_ARGV = "proc/101/cmdline"
CONFIG_FLAG_FILE = "etc/kubernetes/kubelet.yaml"
# Bit i of the first byte: the content goes to FILES[i]; bit 7: it is the explicit list.
FILES = (
    KUBEADM,
    RKE2_DROP_IN,
    K3S_DROP_IN,
    RKE2_CONFIG,
    K3S_CONFIG,
    KUBELET_ARGV,
    CONFIG_FLAG_ARGV,
)
SOURCES = {
    KUBEADM: "kubelet config /var/lib/kubelet/config.yaml",
    RKE2_DROP_IN: "kubelet drop-ins /var/lib/rancher/rke2/agent/etc/kubelet.conf.d",
    K3S_DROP_IN: "kubelet drop-ins /var/lib/rancher/k3s/agent/etc/kubelet.conf.d",
    RKE2_CONFIG: "cluster-dns in /etc/rancher/rke2/config.yaml",
    K3S_CONFIG: "cluster-dns in /etc/rancher/k3s/config.yaml",
}
PROCESS_SOURCES = (
    "kubelet --cluster-dns flag",
    "kubelet config /etc/kubernetes/kubelet.yaml (from kubelet --config)",
)


def _write(relative: str, content: bytes | None) -> None:
    path = ROOT / relative
    if content is None:
        path.unlink(missing_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    chosen, content = data[0], data[1:]
    for bit, relative in enumerate(FILES):
        selected = bool(chosen >> bit & 1)
        if relative == KUBELET_ARGV:
            _write(
                relative,
                b"/usr/bin/kubelet\0" + content.replace(b"..", b"__") if selected else None,
            )
        elif relative == CONFIG_FLAG_ARGV:
            cmdline = b"kubelet\0--config\0/" + CONFIG_FLAG_FILE.encode() + b"\0"
            _write(relative, cmdline if selected else None)
            _write(CONFIG_FLAG_FILE, content if selected else None)
        else:
            _write(relative, content if selected else None)
    explicit = content.decode("utf-8", "replace").split("\0") if chosen & 0x80 else []
    found = discover(ROOT, explicit)
    assert (found.source == "none") == (not found.servers), found
    assert len(set(found.servers)) == len(found.servers), found
    for server in found.servers:
        assert str(ipaddress.ip_address(server)) == server, found
    filled = {SOURCES[f] for bit, f in enumerate(FILES) if chosen >> bit & 1 and f in SOURCES}
    if chosen & 0x80:
        filled.add("--cluster-dns")
    if chosen & 0x60:
        filled.update(PROCESS_SOURCES)
    # A fuzzed kubelet command line may name any --config file of the host root.
    from_flag = found.source.startswith("kubelet config ") and found.source.endswith(
        " (from kubelet --config)"
    )
    assert found.source in ("none", *filled) or (chosen & 0x20 and from_flag), (found, filled)
    argv = content.decode("utf-8", "replace").split("\0")
    for value in flag_values(argv, "--cluster-dns"):
        assert value in argv or f"--cluster-dns={value}" in argv


def seeds() -> list[bytes]:
    kubeadm = (
        b"apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
        b"clusterDNS:\n- 10.96.0.10\n- fd00:10:96::a\nclusterDomain: cluster.local\n"
    )
    return [
        b"\x01" + kubeadm,
        b"\x02clusterDNS:\n  - 10.43.0.10\n",
        b"\x04clusterDNS:\n  - 169.254.20.10\nmaxPods: 200\n",
        b'\x08cluster-dns: "10.43.0.10"\ntoken: x\n',
        b"\x10cluster-dns:\n- 10.43.0.10\n- 10.43.0.11,fd00::a\n",
        b"\x20--cluster-dns=10.96.0.10,10.96.0.11\0--cluster-dns\x0010.0.0.1\0",
        b"\x40clusterDNS: [10.100.0.10]\n",
        b"\x8010.0.0.53\0not-an-ip",
        b"\x01clusterDNS: [unclosed\n",
        b"\x10- just\n- a list\n",
    ]


DICTIONARY = [b"clusterDNS:", b"cluster-dns:", b"--cluster-dns=", b"--config", b"\n- ", b"[", b"{"]


if __name__ == "__main__":
    atheris.Setup(_common.libfuzzer_argv("kubelet_config", seeds(), DICTIONARY), test_one_input)
    atheris.Fuzz()
    sys.exit(0)
