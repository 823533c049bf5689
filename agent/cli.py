"""The ``nodediag`` command line: run, scan, analyze, pid."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent import __version__
from agent.pidinfo import NoSuchProcess
from agent.report import EXIT_FAILED
from agent.settings import DEFAULT_CONTAINERD_SOCKETS, Settings, parse_duration, parse_listen
from collectors.kernel_log import KernelLogError

log = logging.getLogger("nodediag")


class InputError(Exception):
    """A flag's value or an input file is unusable (the message names which)."""


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a parser so argparse names the flag and the bad value in its error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    return convert


def _env(flag: str) -> str | None:
    return os.environ.get("NODEDIAG_" + flag.upper().replace("-", "_"))


def _env_list(flag: str) -> list[str] | None:
    value = _env(flag)
    return [item for item in value.split(",") if item] if value else None


def _env_bool(flag: str) -> bool:
    return (_env(flag) or "").lower() in ("1", "true", "yes", "on")


def _common_flags(*, kernel_log_source: bool = True) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add = common.add_argument
    add("--kubeconfig", type=Path, default=_env("kubeconfig"), help="kubeconfig file")
    add(
        "--no-kube",
        action="store_true",
        default=_env_bool("no-kube"),
        help="do not talk to the Kubernetes API",
    )
    add(
        "--fix-vxlan-offload",
        action="store_true",
        default=_env_bool("fix-vxlan-offload"),
        help="turn off tx-checksum offload on VXLAN links at risk (opt-in)",
    )
    add("--node-name", default=_env("node-name"), help="this node's name ($NODE_NAME, hostname)")
    add(
        "--listen",
        type=_typed(parse_listen),
        default=_env("listen") or "0.0.0.0:9102",
        help="host:port for /metrics, /healthz, /readyz (default 0.0.0.0:9102)",
    )
    add(
        "--web-config-file",
        type=Path,
        default=_env("web-config-file"),
        help="TLS and basic auth for --listen, as the exporters' --web.config.file (default off)",
    )
    add(
        "--state-dir",
        type=Path,
        default=_env("state-dir") or "/var/lib/nodediag",
        help="where the kernel log position is kept (default /var/lib/nodediag)",
    )
    if kernel_log_source:  # `analyze --kernel-log FILE` gives a file instead
        add(
            "--kernel-log",
            choices=("auto", "journal", "kmsg"),
            default=_env("kernel-log") or "auto",
            help="kernel log source (default auto: journald if it has kernel entries, else kmsg)",
        )
    add(
        "--journal-path",
        type=Path,
        default=_env("journal-path"),
        help="journal directory or file to read (default: the host's journal)",
    )
    add(
        "--containerd-socket",
        action="append",
        default=_env_list("containerd-socket"),
        help="containerd socket (repeatable)",
    )
    add(
        "--cluster-dns",
        action="append",
        type=_typed(_ip_address),
        default=_env_list("cluster-dns"),
        help="cluster DNS server IP (repeatable; default discovered)",
    )
    add(
        "--pod-cidr",
        action="append",
        type=_typed(_ip_network),
        default=_env_list("pod-cidr"),
        metavar="CIDR",
        help="this node's pod CIDR, for the DNS flows from pods (repeatable; default: the "
        "node's routes and CNI config, else its Node object's spec.podCIDRs)",
    )
    add(
        "--dns-probe-name",
        type=_typed(_dns_name),
        default=_env("dns-probe-name") or Settings.dns_probe_name,
        help="name the DNS probe resolves (default kubernetes.default.svc.cluster.local)",
    )
    add(
        "--host-root",
        type=Path,
        default=_env("host-root") or "/",
        help="where the host's / is mounted (default /; /host in the DaemonSet)",
    )
    add("-v", "--verbose", action="store_true", help="debug logging")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_flags()
    parser = argparse.ArgumentParser(
        prog="nodediag",
        description="Find the node faults Kubernetes does not show: invisible OOM kills, "
        "DNS dropped by the node's own firewall, VXLAN checksum offload.",
    )
    parser.add_argument("--version", action="version", version=f"nodediag {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[common], help="the daemon: follow, serve /metrics, report")
    scan = commands.add_parser("scan", parents=[common], help="one-shot diagnosis of this node")
    scan.add_argument("--json", action="store_true", help="JSON lines instead of a report")
    scan.add_argument(
        "--since",
        type=_typed(parse_duration),
        default=None,
        help="only the kernel log of the last DURATION (90s, 10m, 2h); default: since boot",
    )
    offline = _common_flags(kernel_log_source=False)
    analyze = commands.add_parser(
        "analyze", parents=[offline], help="offline diagnosis of a support bundle's files"
    )
    analyze.add_argument(
        "--kernel-log",
        dest="kernel_log_file",
        type=Path,
        metavar="FILE",
        help="dmesg, dmesg -T, journalctl -k or /dev/kmsg text",
    )
    analyze.add_argument(
        "--iptables-save", type=Path, metavar="FILE", help="`iptables-save -c` output"
    )
    analyze.add_argument("--nft-json", type=Path, metavar="FILE", help="`nft -j list ruleset`")
    analyze.add_argument(
        "--year",
        type=_typed(_year),
        help="the year of the kernel log's first year-less time stamp (syslog, journalctl "
        "-o short); default: inferred",
    )
    analyze.add_argument("--json", action="store_true", help="JSON lines instead of a report")
    pid = commands.add_parser(
        "pid", parents=[common], help="which pod and container a host process belongs to"
    )
    pid.add_argument("pid", type=_typed(_positive_int), metavar="PID", help="host process id")
    pid.add_argument("--json", action="store_true", help="one JSON object instead of text")
    return parser


def _ip_network(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ValueError(f"invalid CIDR {text!r}") from None


def _checked(flag: str, given: Sequence[str], convert: Callable[[str], str]) -> tuple[str, ...]:
    """Values of a repeatable flag; those from its ``$NODEDIAG_…`` variable, which argparse
    does not convert, are checked here."""
    try:
        return tuple(convert(text) for text in given)
    except ValueError as error:
        variable = "NODEDIAG_" + flag.upper().replace("-", "_")
        raise InputError(f"--{flag} (or ${variable}): {error}") from None


def _ip_address(text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}") from None


def _dns_name(text: str) -> str:
    from collectors.dns_probe import DnsFormatError, encode_name

    try:
        encode_name(text)
    except DnsFormatError as error:
        raise ValueError(f"invalid DNS name {text!r}: {error}") from None
    return text


def _year(text: str) -> int:
    if not (text.isdigit() and 1970 <= int(text) <= datetime.now(UTC).year):
        raise ValueError(f"invalid year {text!r} (1970 to this year)")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"invalid PID {text!r} (a positive number)")
    return int(text)


def settings_from(args: argparse.Namespace) -> Settings:
    defaults = Settings()
    kernel_log = getattr(args, "kernel_log", "auto")
    return Settings(
        node_name=args.node_name or defaults.node_name,
        host_root=Path(args.host_root),
        state_dir=Path(args.state_dir),
        kernel_log=kernel_log,  # type: ignore[arg-type]
        journal_path=Path(args.journal_path) if args.journal_path else None,
        listen=args.listen if isinstance(args.listen, tuple) else parse_listen(args.listen),
        web_config_file=Path(args.web_config_file) if args.web_config_file else None,
        kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
        no_kube=args.no_kube,
        fix_vxlan_offload=args.fix_vxlan_offload,
        containerd_sockets=tuple(args.containerd_socket or DEFAULT_CONTAINERD_SOCKETS),
        cluster_dns=_checked("cluster-dns", args.cluster_dns or (), _ip_address),
        pod_cidrs=_checked("pod-cidr", args.pod_cidr or (), _ip_network),
        dns_probe_name=args.dns_probe_name,
    )


def _print_findings(args: argparse.Namespace, findings: Sequence[Any], title: str) -> int:
    from agent.report import exit_code, write_json_lines, write_report

    if args.json:
        write_json_lines(findings, sys.stdout)
    else:
        write_report(findings, sys.stdout, title=title)
    return exit_code(findings)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from agent.daemon import run

    _check_state_dir(settings.state_dir)
    kubeconfig = settings.kubeconfig
    if kubeconfig is not None and not settings.no_kube and not kubeconfig.is_file():
        raise InputError(f"--kubeconfig {kubeconfig}: no such file")
    _check_web_config(settings.web_config_file)
    return run(settings)


def _check_web_config(path: Path | None) -> None:
    from agent.web_config import WebConfigError, load

    if path is not None:
        try:
            load(path)
        except WebConfigError as error:
            raise InputError(str(error)) from error


def _check_state_dir(path: Path) -> None:
    """Fail at start, not at the first save, when the state dir cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".nodediag-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise InputError(
            f"--state-dir {path}: not a writable directory ({error.strerror})"
        ) from error


def _scan(args: argparse.Namespace, settings: Settings) -> int:
    from agent.diagnose import scan
    from agent.kernel_watch import open_source

    since: datetime | None = None
    if isinstance(args.since, timedelta):
        since = datetime.now(UTC) - args.since
    from agent.metrics import Metrics

    source = open_source(settings)
    try:
        findings = scan(settings, source, since, Metrics())
    finally:
        source.close()
    return _print_findings(args, findings, f"nodediag scan of node {settings.node_name}")


def _analyze(args: argparse.Namespace, settings: Settings) -> int:
    from agent.diagnose import analyze

    given = {
        "--kernel-log": args.kernel_log_file,
        "--iptables-save": args.iptables_save,
        "--nft-json": args.nft_json,
    }
    if not any(given.values()):
        raise InputError("analyze needs at least one of --kernel-log, --iptables-save, --nft-json")
    for flag, path in given.items():
        if path is not None and not path.is_file():
            raise InputError(f"{flag} {path}: no such file")
    findings = analyze(
        settings,
        args.kernel_log_file,
        args.iptables_save,
        args.nft_json,
        settings.pod_cidrs,
        year=args.year,
    )
    names = ", ".join(str(p) for p in given.values() if p)
    return _print_findings(args, findings, f"nodediag analysis of {names}")


def _pid(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from agent.containers import ContainerLookup, containerd_client
    from agent.pidinfo import describe, locate

    place = locate(settings, args.pid, ContainerLookup(containerd_client(settings)))
    sys.stdout.write(json.dumps(place.to_dict()) + "\n" if args.json else describe(place))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "run": _run,
    "scan": _scan,
    "analyze": _analyze,
    "pid": _pid,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.verbose:  # our own debug logs, not those of the libraries we use
        for ours in ("nodediag", "agent", "collectors"):
            logging.getLogger(ours).setLevel(logging.DEBUG)
    try:
        return COMMANDS[args.command](args, settings_from(args))
    except BrokenPipeError:
        # The reader of our output went away (`nodediag scan | head`): not our failure.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (InputError, KernelLogError, NoSuchProcess) as error:
        log.error("%s", error)
    except PermissionError as error:
        log.error(
            "permission denied: %s (nodediag needs root or the capabilities in the DaemonSet)",
            error.filename or error,
        )
    except OSError as error:
        log.error("%s", error)
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
