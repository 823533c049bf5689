"""Resolver loop check on fixture host roots shaped like kubeadm, K3s/RKE2 and systemd-resolved
nodes: which file kubelet gives pods with dnsPolicy Default, and what it names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import realkernel
from prometheus_client import CollectorRegistry

from collectors.cluster_dns import discover_resolv_conf, in_root, nameservers
from collectors.resolver import ResolverCollector

STUB = """\
# This is /run/systemd/resolve/stub-resolv.conf managed by man:systemd-resolved(8).
nameserver 127.0.0.53
options edns0 trust-ad
search .
"""
UPSTREAM = """\
# This is /run/systemd/resolve/resolv.conf managed by man:systemd-resolved(8).
nameserver 192.168.1.1
nameserver 2001:db8::53
search lan
"""


def write(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def link(root: Path, path: str, target: str) -> None:
    source = root / path.lstrip("/")
    source.parent.mkdir(parents=True, exist_ok=True)
    source.symlink_to(target)


def collect(root: Path) -> tuple[list[str], dict[str, object], float | None]:
    registry = CollectorRegistry()
    findings = ResolverCollector("node-1", registry, host_root=root).collect()
    ok = registry.get_sample_value("nodediag_node_check_ok", {"check": "resolver"})
    assert len(findings) <= 1
    return [f.reason for f in findings], findings[0].details if findings else {}, ok


def test_nameservers_parse() -> None:
    text = "nameserver 10.0.0.2\nnameserver fe80::1%eth0\nnameserver bogus\n#nameserver 1.1.1.1\n"
    assert nameservers(text) == ["10.0.0.2", "fe80::1"]


def test_ubuntu_stub_symlink_points_at_resolved_upstream(tmp_path: Path) -> None:
    write(tmp_path, "/run/systemd/resolve/stub-resolv.conf", STUB)
    write(tmp_path, "/run/systemd/resolve/resolv.conf", UPSTREAM)
    link(tmp_path, "/etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf")
    reasons, details, ok = collect(tmp_path)
    assert reasons == ["DNSResolverLoop"]
    assert details["resolv_conf"] == "/etc/resolv.conf"
    assert details["resolv_conf_source"] == "kubelet default"
    assert details["loopback"] == ["127.0.0.53"]
    assert details["fix_resolv_conf"] == "/run/systemd/resolve/resolv.conf"
    assert details["upstream_nameservers"] == ["192.168.1.1", "2001:db8::53"]
    assert ok == 0


def test_kubeadm_points_kubelet_at_the_upstream_file(tmp_path: Path) -> None:
    """kubeadm writes resolvConf: /run/systemd/resolve/resolv.conf on resolved hosts."""
    write(tmp_path, "/etc/resolv.conf", STUB)
    write(tmp_path, "/run/systemd/resolve/resolv.conf", UPSTREAM)
    write(
        tmp_path,
        "/var/lib/kubelet/config.yaml",
        "kind: KubeletConfiguration\nresolvConf: /run/systemd/resolve/resolv.conf\n",
    )
    assert collect(tmp_path) == ([], {}, 1)


@pytest.mark.parametrize(
    ("config", "source"),
    [
        ("resolv-conf: /etc/k3s-resolv.conf\n", "resolv-conf in /etc/rancher/k3s/config.yaml"),
        (
            'kubelet-arg:\n- "resolv-conf=/etc/k3s-resolv.conf"\n',
            "resolv-conf in /etc/rancher/k3s/config.yaml",
        ),
    ],
)
def test_k3s_config_and_kubelet_arg(tmp_path: Path, config: str, source: str) -> None:
    write(tmp_path, "/etc/rancher/k3s/config.yaml", config)
    write(tmp_path, "/etc/k3s-resolv.conf", "nameserver 127.0.0.1\n")  # a local dnsmasq
    write(tmp_path, "/etc/resolv.conf", "nameserver 10.0.0.2\n")
    assert discover_resolv_conf(tmp_path).source == source
    reasons, details, _ = collect(tmp_path)
    assert reasons == ["DNSResolverLoop"]
    assert details["resolv_conf"] == "/etc/k3s-resolv.conf"
    assert details["loopback"] == ["127.0.0.1"]
    assert details["upstream_file"] is None
    assert "/etc/rancher/{k3s,rke2}/config.yaml" in str(details["fix"])


def test_kubelet_flag_beats_config_files(tmp_path: Path) -> None:
    write(
        tmp_path, "/proc/4242/cmdline", "/usr/bin/kubelet\0--resolv-conf=/etc/kubelet-resolv.conf\0"
    )
    write(tmp_path, "/var/lib/kubelet/config.yaml", "resolvConf: /etc/resolv.conf\n")
    write(tmp_path, "/etc/kubelet-resolv.conf", "nameserver ::1\n")
    reasons, details, _ = collect(tmp_path)
    assert reasons == ["DNSResolverLoop"]
    assert details["resolv_conf_source"] == "kubelet --resolv-conf flag"
    assert details["loopback"] == ["::1"]


def test_rke2_drop_in_and_only_the_first_three_servers_count(tmp_path: Path) -> None:
    write(
        tmp_path,
        "/var/lib/rancher/rke2/agent/etc/kubelet.conf.d/00-rke2-defaults.conf",
        "resolvConf: /etc/rke2-resolv.conf\n",
    )
    servers = "".join(f"nameserver 10.0.0.{i}\n" for i in range(1, 4))
    write(tmp_path, "/etc/rke2-resolv.conf", servers + "nameserver 127.0.0.1\n")
    assert collect(tmp_path)[0] == []  # a fourth nameserver is never used


def test_no_nameserver_at_all(tmp_path: Path) -> None:
    write(tmp_path, "/etc/resolv.conf", "search example.com\noptions ndots:2\n")
    reasons, details, _ = collect(tmp_path)
    assert reasons == ["DNSResolverLoop"]
    assert details["nameservers"] == [] and details["loopback"] == []


def test_unreadable_file_is_a_failed_source_not_a_finding(tmp_path: Path) -> None:
    write(tmp_path, "/var/lib/kubelet/config.yaml", "resolvConf: /opt/missing.conf\n")
    registry = CollectorRegistry()
    collector = ResolverCollector("n", registry, host_root=tmp_path)
    assert collector.collect() == []
    [result] = collector.sources.results()
    assert (result.source, result.status) == ("resolv_conf", "failed")
    assert "missing.conf" in (result.detail or "")
    assert registry.get_sample_value("nodediag_node_check_ok", {"check": "resolver"}) is None


def test_kubelet_gives_no_resolv_conf(tmp_path: Path) -> None:
    write(tmp_path, "/var/lib/kubelet/config.yaml", 'resolvConf: ""\n')
    collector = ResolverCollector("n", CollectorRegistry(), host_root=tmp_path)
    assert collector.collect() == []
    assert [r.status for r in collector.sources.results()] == ["skipped"]


def test_in_root_keeps_absolute_links_inside_the_root(tmp_path: Path) -> None:
    write(tmp_path, "/run/systemd/resolve/stub-resolv.conf", STUB)
    link(tmp_path, "/etc/resolv.conf", "/run/systemd/resolve/stub-resolv.conf")
    assert (
        in_root(tmp_path, "/etc/resolv.conf") == tmp_path / "run/systemd/resolve/stub-resolv.conf"
    )
    link(tmp_path, "/etc/loop", "/etc/loop")
    with pytest.raises(OSError, match="too many symbolic links"):
        in_root(tmp_path, "/etc/loop")


@pytest.mark.root
def test_scan_says_the_resolver_file_was_not_checked(tmp_path: Path) -> None:
    """kubelet names a resolvConf that is not there (or not mounted): ``scan`` reports the
    source it could not read (CollectorFailed), never "no faults"."""
    from agentproc import json_lines
    from nodenet import throwaway_netns

    write(tmp_path, "/var/lib/kubelet/config.yaml", "resolvConf: /etc/kubelet-resolv.conf\n")
    (tmp_path / "proc").symlink_to("/proc")
    with throwaway_netns() as ns:
        result = ns.scan(tmp_path, "127.0.0.1")
    failed = [f for f in json_lines(result.stdout) if f["reason"] == "CollectorFailed"]
    resolver = [f for f in failed if f["details"]["collector"] == "resolver"]
    assert [f["details"]["source"] for f in resolver] == ["resolv_conf"], result.stdout
    assert "kubelet-resolv.conf" in resolver[0]["details"]["error"]
    # 2, or 1 when a warning comes too (the probe to 127.0.0.1 finds no DNS server there; the
    # host's kernel log may hold others' OOM kills): never 0, "no faults"
    assert result.returncode in (1, 2), result.stdout + result.stderr


@pytest.mark.parametrize(
    ("etc", "upstream", "chosen"),
    [
        ("nameserver 10.0.0.2\n", UPSTREAM, "/etc/resolv.conf"),
        (STUB, UPSTREAM, "/run/systemd/resolve/resolv.conf"),
        (STUB, None, "/var/lib/rancher/k3s/agent/etc/resolv.conf"),
        (
            "nameserver 10.0.0.2\nnameserver fe80::1\n",
            None,
            "/var/lib/rancher/k3s/agent/etc/resolv.conf",
        ),
    ],
)
def test_k3s_picks_its_own_file_without_resolv_conf(
    tmp_path: Path, etc: str, upstream: str | None, chosen: str
) -> None:
    """K3s's kubelet runs inside the k3s process (no kubelet command line to read): without
    resolv-conf it takes the first valid of /etc/resolv.conf and systemd-resolved's upstream
    file, else writes its own with 8.8.8.8 — no loop either way."""
    write(tmp_path, "/proc/321/cmdline", "/usr/local/bin/k3s\0server\0")
    write(tmp_path, "/etc/resolv.conf", etc)
    if upstream is not None:
        write(tmp_path, "/run/systemd/resolve/resolv.conf", upstream)
    write(tmp_path, "/var/lib/rancher/k3s/agent/etc/resolv.conf", "nameserver 8.8.8.8\n")
    setting = discover_resolv_conf(tmp_path)
    assert setting.path == chosen
    assert setting.source.startswith("K3s's")
    assert collect(tmp_path) == ([], {}, 1)


def test_k3s_with_an_explicit_loopback_file_still_loops(tmp_path: Path) -> None:
    write(tmp_path, "/proc/321/cmdline", "/usr/local/bin/k3s\0server\0")
    write(tmp_path, "/etc/rancher/k3s/config.yaml", "resolv-conf: /etc/resolv.conf\n")
    write(tmp_path, "/etc/resolv.conf", STUB)
    reasons, details, _ = collect(tmp_path)
    assert reasons == ["DNSResolverLoop"]
    assert details["resolv_conf_source"] == "resolv-conf in /etc/rancher/k3s/config.yaml"


REPLACED_READ = """
import json, sys
from pathlib import Path
from prometheus_client import CollectorRegistry
from collectors.resolver import ResolverCollector
collector = ResolverCollector("n", CollectorRegistry(), host_root=Path(sys.argv[1]))
collector.collect()
print(json.dumps({r.source: [r.status, r.detail] for r in collector.sources.results()}))
"""


@pytest.mark.root
def test_a_resolver_file_replaced_on_the_host_is_said_not_read_stale(tmp_path: Path) -> None:
    """The DaemonSet mounts /etc/resolv.conf as a file: a host that replaces it by rename
    leaves the mount on the old file. A real bind mount in a private mount namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        realkernel.skip_or_fail("needs root and unshare (util-linux)")
    host_file = tmp_path / "host-resolv.conf"
    host_file.write_text("nameserver 10.0.0.1\n")
    root = tmp_path / "root"
    write(root, "/etc/resolv.conf", "")
    mounted = root / "etc" / "resolv.conf"
    read = f"{sys.executable} -c '{REPLACED_READ}' {root}"
    script = (
        f"mount --bind {host_file} {mounted} && {read}"
        f" && printf 'nameserver 10.0.0.2\\n' > {host_file}.new && mv {host_file}.new {host_file}"
        f" && {read}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    before, after = (json.loads(line) for line in done.stdout.splitlines())
    assert before["resolv_conf"] == ["ok", None]
    status, error = after["resolv_conf"]
    assert status == "failed"
    assert "replaced on the host" in error and "restart the pod" in error
