"""Cluster DNS discovery on fixture trees shaped like kubeadm, K3s and RKE2 nodes."""

from __future__ import annotations

from pathlib import Path

from collectors.cluster_dns import discover, flag_values


def write(root: Path, path: str, text: str) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def test_explicit_flag_wins(tmp_path: Path) -> None:
    write(tmp_path, "var/lib/kubelet/config.yaml", "clusterDNS:\n- 10.96.0.10\n")
    found = discover(tmp_path, ["10.0.0.53", "not-an-ip"])
    assert (found.servers, found.source) == (("10.0.0.53",), "--cluster-dns")


def test_kubeadm_kubelet_config(tmp_path: Path) -> None:
    write(
        tmp_path,
        "var/lib/kubelet/config.yaml",
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
        "clusterDNS:\n- 10.96.0.10\n- fd00:10:96::a\nclusterDomain: cluster.local\n",
    )
    found = discover(tmp_path)
    assert found.servers == ("10.96.0.10", "fd00:10:96::a")
    assert found.source == "kubelet config /var/lib/kubelet/config.yaml"


def test_k3s_drop_ins_merge_in_name_order(tmp_path: Path) -> None:
    directory = "var/lib/rancher/k3s/agent/etc/kubelet.conf.d"
    write(tmp_path, f"{directory}/00-k3s-defaults.conf", "clusterDNS:\n  - 10.43.0.10\n")
    write(tmp_path, f"{directory}/50-local.conf", "clusterDNS:\n  - 169.254.20.10\n")
    write(tmp_path, f"{directory}/90-other.conf", "maxPods: 200\n")
    found = discover(tmp_path)
    assert found.servers == ("169.254.20.10",)
    assert "kubelet.conf.d" in found.source


def test_rke2_config_key(tmp_path: Path) -> None:
    write(tmp_path, "etc/rancher/rke2/config.yaml", 'cluster-dns: "10.43.0.10"\ntoken: x\n')
    found = discover(tmp_path)
    assert found.servers == ("10.43.0.10",)
    assert found.source == "cluster-dns in /etc/rancher/rke2/config.yaml"


def test_kubelet_command_line(tmp_path: Path) -> None:
    write(tmp_path, "proc/1234/cmdline", "/usr/bin/kubelet\0--cluster-dns=10.96.0.10,10.96.0.11\0")
    write(tmp_path, "proc/99/cmdline", "/usr/bin/bash\0--cluster-dns=1.2.3.4\0")
    found = discover(tmp_path)
    assert found.servers == ("10.96.0.10", "10.96.0.11")
    assert found.source == "kubelet --cluster-dns flag"


def test_kubelet_config_flag(tmp_path: Path) -> None:
    write(tmp_path, "proc/77/cmdline", "kubelet\0--config\0/etc/kubernetes/kubelet.yaml\0")
    write(tmp_path, "etc/kubernetes/kubelet.yaml", "clusterDNS: [10.100.0.10]\n")
    assert discover(tmp_path).servers == ("10.100.0.10",)


def test_nothing_found_and_broken_files(tmp_path: Path) -> None:
    write(tmp_path, "var/lib/kubelet/config.yaml", "clusterDNS: [unclosed\n")
    write(tmp_path, "etc/rancher/k3s/config.yaml", "- just\n- a list\n")
    found = discover(tmp_path)
    assert (found.servers, found.source) == ((), "none")
    # Broken files are named, never taken silently for "not configured".
    [kubeadm, k3s] = found.problems
    assert kubeadm.startswith(f"{tmp_path}/var/lib/kubelet/config.yaml: ")
    assert k3s == f"{tmp_path}/etc/rancher/k3s/config.yaml: not a YAML mapping"


def test_missing_and_empty_files_are_no_problem(tmp_path: Path) -> None:
    # The DaemonSet's FileOrCreate mount makes an empty kubelet config on K3s/RKE2 nodes.
    write(tmp_path, "var/lib/kubelet/config.yaml", "")
    write(tmp_path, "etc/rancher/rke2/config.yaml", "cluster-dns: 10.43.0.10\n")
    found = discover(tmp_path)
    assert found.servers == ("10.43.0.10",) and found.problems == ()


def test_flag_values_forms() -> None:
    argv = ["kubelet", "--cluster-dns=a", "--cluster-dns", "b", "--cluster-dns"]
    assert flag_values(argv, "--cluster-dns") == ["a", "b"]
