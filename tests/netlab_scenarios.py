"""Rule sets for the lab's node namespace, made by the real tools: ufw and firewalld run inside
the node's namespace with private copies of their configuration (and firewalld on a private
D-Bus), nftables configs loaded with ``nft -f``, iptables rules with iptables-restore (nft
backend) or iptables-legacy-restore; kube-proxy-shaped rules on top, as kube-proxy adds them
after the firewall came up."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from netlab import Netns, stop

SRC = Path(__file__).parent / "vectors" / "firewall" / "src"
KUBE_PROXY_IPTABLES = SRC / "lab_kube_proxy.rules"
KUBE_PROXY_NFT = SRC / "lab_kube_proxy.nft"

Step = Callable[[Netns, Path], None]


def restore(name: str, tool: str = "iptables-restore") -> Step:
    def step(node: Netns, workdir: Path) -> None:
        node.run([tool, "--noflush"], stdin=(SRC / name).read_text())

    step.__name__ = f"{tool} {name}"
    return step


def nft_file(name: str) -> Step:
    def step(node: Netns, workdir: Path) -> None:
        node.run(["nft", "-f", str(SRC / name)])

    step.__name__ = f"nft -f {name}"
    return step


def _private_mounts(binds: dict[str, Path]) -> str:
    """Shell that makes the mount namespace private and bind-mounts the copies."""
    mounts = " && ".join(f"mount --bind {copy} {target}" for target, copy in binds.items())
    return f"mount --make-rprivate / && {mounts}"


def ufw(*commands: str, forward_policy: str = "DROP") -> Step:
    """``ufw --force enable`` (then ``ufw COMMAND``…) in the node's namespace, on a copy of
    /etc/ufw, /lib/ufw and /etc/default/ufw seen only by that ufw (``unshare -m``). The copy's
    sysctl file is emptied: the namespace's sysctls are the lab's, not ufw's."""

    def step(node: Netns, workdir: Path) -> None:
        root = workdir / "ufw"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        shutil.copytree("/etc/ufw", root / "etc-ufw", symlinks=True)
        shutil.copytree("/lib/ufw", root / "lib-ufw", symlinks=True)
        (root / "etc-ufw" / "sysctl.conf").write_text("")
        default = Path("/etc/default/ufw").read_text()
        default = re.sub(
            r"^DEFAULT_FORWARD_POLICY=.*$",
            f'DEFAULT_FORWARD_POLICY="{forward_policy}"',
            default,
            flags=re.M,
        )
        (root / "default-ufw").write_text(default)
        run_ufw(node, workdir, "ufw --force enable", *(f"ufw {c}" for c in commands))

    step.__name__ = f"ufw {forward_policy} {' '.join(commands)}".strip()
    return step


def run_ufw(node: Netns, workdir: Path, *commands: str) -> None:
    """Shell commands in the node's namespace where /etc/ufw, /lib/ufw and /etc/default/ufw
    are the lab's copies (made by :func:`ufw`)."""
    root = workdir / "ufw"
    binds = {
        "/etc/ufw": root / "etc-ufw",
        "/lib/ufw": root / "lib-ufw",
        "/etc/default/ufw": root / "default-ufw",
    }
    node.run(["unshare", "-m", "sh", "-c", " && ".join([_private_mounts(binds), *commands])])


_BACKTICKED = re.compile(r"`([^`]+)`")


def runnable_fix(owner: str | None, fix: str) -> str | None:
    """The command of a finding's fix the lab can run: the first one in backticks; for ufw
    its allow rule (the others edit files, then reload); for firewalld the firewall-cmd
    lines, joined by " ; "; None when the fix runs nothing (kube-proxy's is about the
    Service)."""
    commands = _BACKTICKED.findall(fix)
    if owner == "ufw":
        commands = [c for c in commands if c.startswith("ufw ") and " allow " in c]
    elif owner == "firewalld":
        commands = [" ; ".join(c for c in commands if c.startswith("firewall-cmd "))]
    elif owner == "kube-proxy":
        return None
    return commands[0] if commands and commands[0] else None


def apply_fix(node: Netns, workdir: Path, command: str) -> None:
    """Runs a :func:`runnable_fix` command in the node's namespace, the way its tool runs
    there. firewalld, when it starts again, rebuilds the iptables tables it manages (with
    the iptables backend: all of them; with either backend IPv6's nat table and the raw and
    filter rules NodeLocal DNSCache added): kube-proxy's and node-cache's rules are added
    again, as they would on their next sync (``RESYNC``)."""
    if command.startswith("ufw "):
        run_ufw(node, workdir, command)
    elif command.startswith("firewall-cmd "):
        resyncing = [(save, mark, step) for save, mark, step in RESYNC if mark in node.run([save])]
        run_firewall_cmd(node, workdir, *command.split(" ; "))
        for save, mark, step in resyncing:
            if mark not in node.run([save]):
                step(node, workdir)
    else:
        node.run(["sh", "-c", command])


_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
"""


def _wait(process: subprocess.Popen[bytes], ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.1)


def _copy_firewalld_config(root: Path, backend: str) -> None:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    shutil.copytree("/etc/firewalld", root / "etc-firewalld", symlinks=True)
    conf = root / "etc-firewalld" / "firewalld.conf"
    text = re.sub(
        r"^FirewallBackend=.*$", f"FirewallBackend={backend}", conf.read_text(), flags=re.M
    )
    conf.write_text(re.sub(r"^CleanupOnExit=.*$", "CleanupOnExit=no", text, flags=re.M))


@contextmanager
def _firewalld(node: Netns, root: Path) -> Iterator[dict[str, str]]:
    """A firewalld on a private system bus, in the node's namespace, on the copy of
    /etc/firewalld in ``root``; yields the environment for firewall-cmd. It is stopped on
    exit with CleanupOnExit=no, so its rules stay for the packets."""
    socket = root / "bus"
    socket.unlink(missing_ok=True)
    (root / "bus.conf").write_text(_BUS_CONFIG.format(socket=socket))
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={socket}"}
    log = (root / "log").open("wb")
    started: list[subprocess.Popen[bytes]] = []
    try:
        bus = subprocess.Popen(
            ["dbus-daemon", f"--config-file={root / 'bus.conf'}", "--nofork", "--nopidfile"],
            stdout=log,
            stderr=log,
        )
        started.append(bus)
        _wait(bus, socket.exists, "dbus-daemon")
        script = _private_mounts({"/etc/firewalld": root / "etc-firewalld"})
        script += " && mount -t tmpfs tmpfs /run && exec firewalld --nofork --nopid"
        daemon = subprocess.Popen(
            ["ip", "netns", "exec", node.name, "unshare", "-m", "sh", "-c", script],
            env=env,
            stdout=log,
            stderr=log,
        )
        started.append(daemon)

        def running() -> bool:
            state = subprocess.run(
                ["firewall-cmd", "--state"], env=env, capture_output=True, check=False
            )
            return state.returncode == 0

        _wait(daemon, running, f"firewalld (log: {root / 'log'})")
        yield env
    finally:
        for process in reversed(started):
            stop(process)
        log.close()


def firewalld(backend: str, *commands: str) -> Step:
    """firewalld with its shipped configuration (default zone public) and the backend given,
    then ``firewall-cmd COMMAND`` for each command (runtime configuration)."""

    def step(node: Netns, workdir: Path) -> None:
        _copy_firewalld_config(workdir / "firewalld", backend)
        run_firewall_cmd(node, workdir, *(f"firewall-cmd {c}" for c in commands))

    step.__name__ = f"firewalld {backend} {'; '.join(commands)}".strip()
    return step


def run_firewall_cmd(node: Netns, workdir: Path, *commands: str) -> None:
    """firewalld started on the lab's copy of its configuration (made by :func:`firewalld`),
    these firewall-cmd command lines run, firewalld stopped (its rules stay)."""
    with _firewalld(node, workdir / "firewalld") as env:
        for command in commands:
            subprocess.run(
                shlex.split(command), env=env, check=True, capture_output=True, timeout=60
            )


FIREWALLD_FIX = (
    "--add-port 8472/udp",
    "--add-masquerade",
    "--zone trusted --add-interface cni0",
)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    steps: tuple[Step, ...]
    tools: tuple[str, ...] = ()
    """Programs the scenario needs beyond iproute2, iptables and nft."""
    features: frozenset[str] = frozenset()
    """What the lab adds to its IPv4 flows (netlab_topology.FEATURES): ipv6, vxlan6, nodelocal,
    ipip, wireguard."""


KP_IPT = restore("lab_kube_proxy.rules")
KP_NFT = nft_file("lab_kube_proxy.nft")
KP_IPT6 = restore("lab_kube_proxy6.rules", "ip6tables-restore")
KP_NFT6 = nft_file("lab_kube_proxy6.nft")
NODELOCAL = restore("lab_nodelocal.rules")
DOCKER_USER = restore("lab_stacked_docker_user.rules")
IPV6 = frozenset({"ipv6"})
#: (dump, text it shows, step): rules their owner adds again when they are gone (Docker
#: makes its chains again when firewalld reloads).
RESYNC = (
    ("iptables-save", "KUBE-SERVICES", KP_IPT),
    ("ip6tables-save", "KUBE-SERVICES", KP_IPT6),
    ("iptables-save", "NodeLocal DNS Cache", NODELOCAL),
    ("iptables-save", "DOCKER-USER", DOCKER_USER),
)
VXLAN6 = frozenset({"ipv6", "vxlan6"})
TUNNELS = frozenset({"ipip", "wireguard"})
UFW_TOOLS = ("ufw", "unshare")
FIREWALLD_TOOLS = ("firewalld", "firewall-cmd", "dbus-daemon", "unshare")

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("lab_kube_proxy_iptables", "kube-proxy iptables mode alone", (KP_IPT,)),
        Scenario("lab_kube_proxy_nft", "kube-proxy nftables mode alone", (KP_NFT,)),
        Scenario(
            "lab_kube_proxy_nft_no_endpoints",
            "kube-proxy nftables mode, the DNS Service without endpoints",
            (KP_NFT, nft_file("lab_kube_proxy_no_endpoints.nft")),
        ),
        Scenario(
            "lab_kube_proxy_iptables_no_endpoints",
            "kube-proxy iptables mode, the DNS Service without endpoints",
            (KP_IPT, restore("lab_kube_proxy_no_endpoints.rules")),
        ),
        Scenario("lab_ufw_default", "ufw enabled with its defaults", (ufw(), KP_IPT), UFW_TOOLS),
        Scenario(
            "lab_ufw_forward_accept",
            'ufw with DEFAULT_FORWARD_POLICY="ACCEPT"',
            (ufw(forward_policy="ACCEPT"), KP_IPT),
            UFW_TOOLS,
        ),
        Scenario(
            "lab_ufw_allow_cni0",
            "ufw with `ufw allow in on cni0` (forward policy DROP)",
            (ufw("allow in on cni0"), KP_IPT),
            UFW_TOOLS,
        ),
        Scenario(
            "lab_firewalld_nft",
            "firewalld, nftables backend, public zone default",
            (firewalld("nftables"), KP_IPT),
            FIREWALLD_TOOLS,
        ),
        Scenario(
            "lab_firewalld_nft_fixed",
            "firewalld nftables backend with 8472/udp, masquerade, cni0 in trusted",
            (firewalld("nftables", *FIREWALLD_FIX), KP_IPT),
            FIREWALLD_TOOLS,
        ),
        Scenario(
            "lab_firewalld_iptables",
            "firewalld, iptables backend, public zone default",
            (firewalld("iptables"), KP_IPT),
            FIREWALLD_TOOLS,
        ),
        Scenario(
            "lab_firewalld_iptables_fixed",
            "firewalld iptables backend with 8472/udp, masquerade, cni0 in trusted",
            (firewalld("iptables", *FIREWALLD_FIX), KP_IPT),
            FIREWALLD_TOOLS,
        ),
        Scenario(
            "lab_debian_workstation",
            "Debian's nftables example workstation.nft",
            (nft_file("lab_debian_workstation.nft"), KP_IPT),
        ),
        Scenario("lab_alpine", "Alpine's /etc/nftables.nft", (nft_file("lab_alpine.nft"), KP_IPT)),
        Scenario(
            "lab_docker",
            "Docker's rules for docker0 (FORWARD policy DROP)",
            (restore("lab_docker.rules"), KP_IPT),
        ),
        Scenario(
            "lab_output_web_only",
            "OUTPUT policy DROP, only TCP 80/443 out",
            (restore("lab_output_web_only.rules"), KP_IPT),
        ),
        Scenario(
            "lab_forward_drop_nft",
            "FORWARD policy DROP in iptables-nft, kube-proxy iptables-nft",
            (restore("lab_forward_drop.rules"), KP_IPT),
        ),
        Scenario(
            "lab_forward_drop_legacy",
            "FORWARD policy DROP in iptables-legacy, kube-proxy iptables-nft",
            (restore("lab_forward_drop.rules", "iptables-legacy-restore"), KP_IPT),
            ("iptables-legacy-restore",),
        ),
    )
}

#: The rule sets of tests/test_firewall_netns.py's fault scenarios (vectors fault_*), each on
#: top of the lab's kube-proxy rules: their kernel-checked twins (fault_ip6 is left out: the
#: lab is IPv4 only).
FAULT_TWINS = (
    "output_drop",
    "custom_reject",
    "multiport",
    "range",
    "negated_dst",
    "proto_number",
    "all_to_dns",
    "negations",
    "ufw",
)
SCENARIOS.update(
    {
        f"lab_fault_{name}": Scenario(
            f"lab_fault_{name}",
            f"fault_{name}.rules on kube-proxy's",
            (KP_IPT, restore(f"fault_{name}.rules")),
        )
        for name in FAULT_TWINS
    }
)
SCENARIOS["lab_fault_legacy"] = Scenario(
    "lab_fault_legacy",
    "fault_legacy.legacy (iptables-legacy) on kube-proxy's (iptables-nft)",
    (KP_IPT, restore("fault_legacy.legacy", "iptables-legacy-restore")),
    ("iptables-legacy-restore",),
)
SCENARIOS["lab_fault_native"] = Scenario(
    "lab_fault_native", "fault_native.nft on kube-proxy's", (KP_IPT, nft_file("fault_native.nft"))
)


def dual_stack(
    name: str,
    description: str,
    steps: tuple[Step, ...],
    tools: tuple[str, ...] = (),
    features: frozenset[str] = IPV6,
) -> Scenario:
    """A scenario with the lab's IPv6 flows too (kube-proxy's IPv6 rules among its steps)."""
    return Scenario(name, description, steps, tools, features=features)


SCENARIOS.update(
    {
        s.name: s
        for s in (
            dual_stack(
                "lab_ipv6_kube_proxy",
                "kube-proxy iptables mode, IPv4 and IPv6 instances (dual stack)",
                (KP_IPT, KP_IPT6),
            ),
            dual_stack(
                "lab_ipv6_kube_proxy_nft",
                "kube-proxy nftables mode, tables ip and ip6 kube-proxy (dual stack)",
                (KP_NFT, KP_NFT6),
            ),
            dual_stack(
                "lab_ipv6_kube_proxy_nft_no_endpoints",
                "kube-proxy nftables mode, the IPv6 DNS Service without endpoints",
                (KP_NFT, KP_NFT6, nft_file("lab_kube_proxy6_no_endpoints.nft")),
            ),
            dual_stack(
                "lab_ipv6_dns_drop_nft",
                "ip6tables-nft drops forwarded UDP DNS and the host's TCP DNS",
                (KP_IPT, KP_IPT6, restore("lab_ip6_dns_drop.rules6", "ip6tables-restore")),
            ),
            dual_stack(
                "lab_ipv6_dns_drop_legacy",
                "ip6tables-legacy drops forwarded UDP DNS and the host's TCP DNS",
                (
                    KP_IPT,
                    KP_IPT6,
                    restore("lab_ip6_dns_drop.rules6", "ip6tables-legacy-restore"),
                ),
                ("ip6tables-legacy-restore",),
            ),
            dual_stack(
                "lab_ipv6_ufw_default",
                "ufw enabled with its defaults (IPV6=yes), dual stack",
                (ufw(), KP_IPT, KP_IPT6),
                UFW_TOOLS,
            ),
            dual_stack(
                "lab_ipv6_inet_dns",
                "a native nft inet table drops IPv6 DNS (forwarded UDP, the host's TCP)",
                (KP_IPT, KP_IPT6, nft_file("lab_inet_ipv6_dns.nft")),
            ),
            dual_stack(
                "lab_ipv6_firewalld_nft",
                "firewalld, nftables backend, public zone default, dual stack",
                (firewalld("nftables"), KP_IPT, KP_IPT6),
                FIREWALLD_TOOLS,
            ),
            dual_stack(
                "lab_ipv6_firewalld_iptables",
                "firewalld, iptables backend (ip6tables too), public zone default, dual stack",
                (firewalld("iptables"), KP_IPT, KP_IPT6),
                FIREWALLD_TOOLS,
            ),
            Scenario(
                "lab_nodelocal",
                "NodeLocal DNSCache on 169.254.20.10 and the kube-dns IP, kube-proxy iptables",
                (KP_IPT, NODELOCAL),
                features=frozenset({"nodelocal"}),
            ),
            Scenario(
                "lab_nodelocal_established_only",
                "NodeLocal DNSCache under an input policy drop that accepts only ESTABLISHED",
                (KP_IPT, NODELOCAL, nft_file("lab_established_only.nft")),
                features=frozenset({"nodelocal"}),
            ),
            Scenario(
                "lab_nodelocal_ufw_default",
                "NodeLocal DNSCache (its accepts before ufw's chains) and ufw's defaults",
                (ufw(), KP_IPT, NODELOCAL),
                UFW_TOOLS,
                features=frozenset({"nodelocal"}),
            ),
            Scenario(
                "lab_nodelocal_firewalld_nft",
                "NodeLocal DNSCache and firewalld's public zone (nftables backend)",
                (firewalld("nftables"), KP_IPT, NODELOCAL),
                FIREWALLD_TOOLS,
                features=frozenset({"nodelocal"}),
            ),
            Scenario(
                "lab_tunnels_firewalld",
                "IP-in-IP and WireGuard packets, firewalld's public zone (nftables backend)",
                (firewalld("nftables"), KP_IPT),
                FIREWALLD_TOOLS,
                features=TUNNELS,
            ),
            Scenario(
                "lab_tunnels_firewalld_allowed",
                "IP-in-IP and WireGuard packets, firewalld allowing protocol 4 and 51820/udp",
                (
                    firewalld(
                        "nftables", "--add-protocol 4", "--add-port 51820/udp", *FIREWALLD_FIX
                    ),
                    KP_IPT,
                ),
                FIREWALLD_TOOLS,
                features=TUNNELS,
            ),
            Scenario(
                "lab_tunnels_ufw_default",
                "IP-in-IP and WireGuard packets, ufw's default deny incoming",
                (ufw(), KP_IPT),
                UFW_TOOLS,
                features=TUNNELS,
            ),
            dual_stack(
                "lab_ipv6_debian_workstation",
                "Debian's nftables example workstation.nft (inet), dual stack",
                (nft_file("lab_debian_workstation.nft"), KP_IPT, KP_IPT6),
            ),
            dual_stack(
                "lab_ipv6_alpine",
                "Alpine's /etc/nftables.nft (inet), dual stack",
                (nft_file("lab_alpine.nft"), KP_IPT, KP_IPT6),
            ),
            dual_stack(
                "lab_vxlan6_alpine",
                "the pods' IPv6 over vxlan-v6.calico, Alpine's /etc/nftables.nft",
                (nft_file("lab_alpine.nft"), KP_IPT, KP_IPT6),
                features=VXLAN6,
            ),
            dual_stack(
                "lab_vxlan6_kube_proxy",
                "the pods' IPv6 over vxlan-v6.calico (UDP 4789 in IPv6), kube-proxy iptables",
                (KP_IPT, KP_IPT6),
                features=VXLAN6,
            ),
            dual_stack(
                "lab_vxlan6_ufw_default",
                "the pods' IPv6 over vxlan-v6.calico, ufw enabled with its defaults",
                (ufw(), KP_IPT, KP_IPT6),
                UFW_TOOLS,
                features=VXLAN6,
            ),
            dual_stack(
                "lab_vxlan6_firewalld_nft",
                "the pods' IPv6 over vxlan-v6.calico, firewalld's public zone (nftables)",
                (firewalld("nftables"), KP_IPT, KP_IPT6),
                FIREWALLD_TOOLS,
                features=VXLAN6,
            ),
            # Stops that stack up on a flow's way: fixing the first alone leaves the next.
            Scenario(
                "lab_stacked_ufw_overlay",
                "ufw's defaults and, before them, a hand-written INPUT drop of the overlay's "
                "8472/udp",
                (ufw(), KP_IPT, restore("lab_stacked_overlay_drop.rules")),
                UFW_TOOLS,
            ),
            Scenario(
                "lab_stacked_forward_tables",
                "a native inet table's forward drop of UDP 53 and iptables-legacy's FORWARD "
                "policy DROP",
                (
                    nft_file("lab_stacked_forward.nft"),
                    restore("lab_forward_drop.rules", "iptables-legacy-restore"),
                    KP_IPT,
                ),
                ("iptables-legacy-restore",),
            ),
            Scenario(
                "lab_stacked_firewalld_docker_user",
                "firewalld's public zone (nftables) and a UDP 53 drop in Docker's DOCKER-USER",
                (firewalld("nftables"), KP_IPT, DOCKER_USER),
                FIREWALLD_TOOLS,
            ),
            # Kernel-checked twins of the clean_rke2 and clean_kubeadm vectors' rule sets.
            Scenario(
                "lab_clean_rke2",
                "rke2_canal_nodelocal.rules (RKE2: kube-proxy, Canal, NodeLocal DNSCache)",
                (restore("rke2_canal_nodelocal.rules"),),
                features=frozenset({"nodelocal"}),
            ),
            dual_stack(
                "lab_clean_kubeadm",
                "kubeadm_calico.rules and .rules6 (kubeadm, Calico, dual stack) under the lab's "
                "kube-proxy rules (they replace its KUBE-* chains: its Services are not the lab's)",
                (
                    restore("kubeadm_calico.rules"),
                    restore("kubeadm_calico.rules6", "ip6tables-restore"),
                    KP_IPT,
                    KP_IPT6,
                ),
            ),
        )
    }
)


def missing_tools(scenario: Scenario) -> list[str]:
    return [tool for tool in scenario.tools if shutil.which(tool) is None]


def load(scenario: Scenario, node: Netns, workdir: Path) -> None:
    for step in scenario.steps:
        step(node, workdir)
