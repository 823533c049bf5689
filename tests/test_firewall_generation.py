"""iptables-nft read piece by piece while kube-proxy rewrites the kube-dns Service's chains
(new endpoint chains, the old ones deleted, as its ``iptables-restore --noflush`` does): the
ruleset's generation noted before the reads and compared after the analyses makes the
collector read again, and fall back to ``iptables-save -c`` (one snapshot) when the rules
change under every read. Unit tests on an injected runner and generation; the real ones with
the real iptables-nft-restore and nf_tables' generation in a throwaway network namespace."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry
from test_firewall_netns import Netns, kube_proxy_rules

# The throwaway network namespace fixture, under its own name here.
from test_firewall_netns import netns as netns_fixture  # noqa: F401
from test_firewall_reading import NFT_HEADER, run, summary, xtables_nft_runner

from collectors.firewall_collector import FirewallCollector
from collectors.netfilter.nft_socket import NftDumps, NftNetlink
from collectors.registry import Runner, ToolNotFound

#: kube-dns's UDP 53 Service chain in ``kube_proxy_rules`` (RKE2's CoreDNS).
DNS_SERVICE = "KUBE-SVC-ERIFXISQEP7F7OF4"
NAT_READ = ["iptables-nft", "-t", "nat", "-S", DNS_SERVICE, "-v"]
CHANGED = "the rules changed while read by iptables-nft: read again"


def dns_path_rules(services: int = 40) -> str:
    """``kube_proxy_rules`` without NodeLocal DNSCache's NOTRACK rules: the pod DNS flows
    take the kube-dns Service's DNAT, so its nat chains are read during the evaluation."""
    lines = kube_proxy_rules(services).splitlines()
    return "\n".join(line for line in lines if "skip conntrack" not in line) + "\n"


def resync(rules: str, service: str, tag: str) -> tuple[str, str]:
    """kube-proxy's resync of ``service`` after its endpoints changed: the
    ``iptables-restore --noflush`` script (the Service chain rewritten to jump to new
    endpoint chains named with ``tag``, the old ones deleted) and ``rules`` after it."""
    nat = rules.split("*nat\n", 1)[1].split("\nCOMMIT", 1)[0].splitlines()
    service_rules = [line for line in nat if line.startswith(f"-A {service} ")]
    old = [m[1] for line in service_rules if (m := re.search(r"-j (KUBE-SEP-\S+)", line))]
    new = {name: name[: -len(tag)] + tag for name in old}

    def renamed(text: str) -> str:
        for before, after in new.items():
            text = text.replace(before, after)
        return text

    endpoint_rules = [line for line in nat if line.split()[:2] in [["-A", n] for n in old]]
    script = [
        "*nat",
        f":{service} - [0:0]",
        *(f":{name} - [0:0]" for name in [*new.values(), *old]),  # old ones flushed
        *(renamed(line) for line in service_rules + endpoint_rules),
        *(f"-X {name}" for name in old),
        "COMMIT",
    ]
    return "\n".join(script) + "\n", renamed(rules)


@dataclass
class KubeProxy:
    """A runner that, when the collector asks for the kube-dns Service's chain, first has
    kube-proxy resync that Service (``times`` times at most): ``apply`` loads the script;
    ``inner`` answers on the rules as they are then."""

    rules: str
    times: int
    apply: Callable[[str], None]
    inner: Callable[[str, Sequence[str]], str]
    resyncs: int = 0
    calls: list[str] = field(default_factory=list)

    def __call__(self, argv: Sequence[str]) -> str:
        self.calls.append(" ".join(argv))
        if list(argv) == NAT_READ and self.resyncs < self.times:
            self.resyncs += 1
            script, self.rules = resync(self.rules, DNS_SERVICE, f"{self.resyncs:04X}")
            self.apply(script)
        return self.inner(self.rules, argv)


class Generation:
    """An ``NftDumps`` that only tells the ruleset's generation (``value``, moved by the
    test), counting the times it is asked, or refusing as without CAP_NET_ADMIN."""

    def __init__(self, refuse: bool = False, answers: int | None = None) -> None:
        self.value = 1
        self.asked = 0
        self.refuse = refuse
        self.answers = answers  # then a broken socket

    def generation(self) -> int:
        if self.refuse:
            raise PermissionError(1, "Operation not permitted")
        if self.answers is not None and self.asked >= self.answers:
            raise ConnectionResetError(104, "Connection reset by peer")
        self.asked += 1
        return self.value

    def rules(self, family: str, table: str, chain: str) -> list[bytes]:
        raise OSError(2, "no native nft table here")

    set_head = elements = chain = rules

    def close(self) -> None:
        pass


def fake_kube_proxy(times: int, generation: Generation) -> KubeProxy:
    def answer(rules: str, argv: Sequence[str]) -> str:
        return xtables_nft_runner(NFT_HEADER + rules)[1](argv)

    def apply(_script: str) -> None:
        generation.value += 1

    return KubeProxy(dns_path_rules(), times, apply, answer)


def checked_run(runner: Runner, dumps: Callable[[], NftDumps] | None) -> FirewallCollector:
    return run(runner, nft_netlink=dumps)[0]


def verdicts(collector: FirewallCollector) -> dict[str, str]:
    return {v.flow.name: v.verdict for v in collector.last_verdicts}


def statuses(collector: FirewallCollector) -> dict[str, tuple[str, str | None]]:
    return {r.source: (r.status, r.detail) for r in collector.sources.results()}


# --------------------------------------------------------------------------- unit


def test_the_plain_read_asks_the_generation_twice_and_reads_once() -> None:
    generation = Generation()
    calls, runner = xtables_nft_runner(NFT_HEADER + dns_path_rules())
    collector = checked_run(runner, lambda: generation)
    assert generation.asked == 2
    assert calls.count("nft -j list chains") == 1
    assert calls.count(" ".join(NAT_READ)) == 1
    assert set(verdicts(collector).values()) == {"pass"}


def test_a_resync_between_two_chain_reads_is_read_again(caplog: pytest.LogCaptureFixture) -> None:
    generation = Generation()
    kube_proxy = fake_kube_proxy(1, generation)
    with caplog.at_level(logging.INFO):
        collector = checked_run(kube_proxy, lambda: generation)
    assert set(verdicts(collector).values()) == {"pass"}
    assert kube_proxy.calls.count("nft -j list chains") == 2
    assert generation.asked == 4
    assert CHANGED in caplog.messages
    assert statuses(collector)["iptables-nft"] == ("ok", None)
    assert "iptables-save -c" not in kube_proxy.calls


def test_without_the_check_the_resync_gives_a_wrong_may_drop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The product bug the check fixes: no generation (netlink refused), one read, the new
    endpoint chains unknown to the listing made before the resync: may drop."""
    kube_proxy = fake_kube_proxy(1, Generation())
    refused = Generation(refuse=True)
    collector = checked_run(kube_proxy, lambda: refused)
    assert verdicts(collector)["pod-dns-udp"] == "may-drop"
    assert kube_proxy.calls.count("nft -j list chains") == 1
    assert [m for m in caplog.messages if "without a consistency check" in m]


def test_a_generation_that_cannot_be_asked_after_the_read_is_no_change_of_the_rules(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The socket broke between the two generation reads: the read stands, unchecked and
    said so, not re-read and not reported as rules that changed."""
    generation = Generation(answers=1)
    calls, runner = xtables_nft_runner(NFT_HEADER + dns_path_rules())
    with caplog.at_level(logging.INFO):
        collector = checked_run(runner, lambda: generation)
    assert set(verdicts(collector).values()) == {"pass"}
    assert calls.count("nft -j list chains") == 1
    assert CHANGED not in caplog.messages
    assert [m for m in caplog.messages if "Connection reset by peer" in m]
    assert statuses(collector)["iptables-nft"] == ("ok", None)


def test_rules_changing_under_every_read_are_read_whole() -> None:
    generation = Generation()
    kube_proxy = fake_kube_proxy(100, generation)
    collector = checked_run(kube_proxy, lambda: generation)
    assert set(verdicts(collector).values()) == {"pass"}
    assert kube_proxy.resyncs == 2
    assert kube_proxy.calls[-1] != " ".join(NAT_READ)
    assert "iptables-save -c" in kube_proxy.calls
    status, why = statuses(collector)["iptables-nft"]
    assert status == "skipped"
    assert why == "the rules changed while being read (2 times); read with iptables-save -c"
    assert statuses(collector)["iptables-save"] == ("ok", None)


def test_netlink_refused_reads_as_before_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused = Generation(refuse=True)
    calls, runner = xtables_nft_runner(NFT_HEADER + dns_path_rules())
    collector = FirewallCollector(
        "node-1",
        lambda: ["10.43.0.10"],
        CollectorRegistry(),
        runner=runner,
        nft_netlink=lambda: refused,
    )
    for _ in range(2):
        collector.collect()
    said = [m for m in caplog.messages if "without a consistency check" in m]
    assert len(said) == 1
    assert "iptables-nft read piece by piece" in said[0] and "Operation not permitted" in said[0]
    assert calls.count("nft -j list chains") == 2  # one read per run, as before
    assert "iptables-save -c" not in calls


# --------------------------------------------------------------------------- real kernel


def kernel_kube_proxy(ns: Netns, times: int) -> KubeProxy:
    rules = dns_path_rules()
    ns.run(["iptables-nft-restore"], stdin=rules)

    def apply(script: str) -> None:
        ns.run(["iptables-nft-restore", "--noflush"], stdin=script)

    return KubeProxy(rules, times, apply, lambda _rules, argv: ns.runner(argv))


def whole_read(ns: Netns) -> FirewallCollector:
    """The rules as they are now, read whole (``iptables-save -c``): the oracle."""

    def hidden(argv: Sequence[str]) -> str:
        if argv[0] in ("iptables-nft", "ip6tables-nft"):
            raise ToolNotFound(f"{argv[0]} not found")
        return ns.runner(argv)

    return checked_run(hidden, None)


@pytest.mark.root
@pytest.mark.parametrize("checked", [True, False])
def test_real_resync_during_the_read(
    netns_fixture: Netns,  # noqa: F811 (the fixture imported above)
    checked: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The real kube-proxy-shaped rules rewritten between the read of KUBE-SERVICES and the
    read of the kube-dns Service's chain: checked, the flows pass (as the whole read of the
    rules after the resync says) and the re-read is logged; unchecked, the wrong may-drop."""
    kube_proxy = kernel_kube_proxy(netns_fixture, 1)
    opened: list[NftNetlink] = []

    def netlink() -> NftNetlink:
        opened.append(NftNetlink(netns_fixture.name))
        return opened[-1]

    with caplog.at_level(logging.INFO):
        collector = checked_run(kube_proxy, netlink if checked else None)
    after = netns_fixture.run(["iptables-nft", "-t", "nat", "-S", DNS_SERVICE])
    assert "KUBE-SEP-2VZPZVB5DG6Y0001" in after and "YRKQD" not in after
    oracle = whole_read(netns_fixture)
    assert set(verdicts(oracle).values()) == {"pass"}
    if checked:
        assert summary(collector.last_verdicts) == summary(oracle.last_verdicts)
        assert CHANGED in caplog.messages
        assert kube_proxy.calls.count("nft -j list chains") == 2
        assert sum(d.requests for d in opened) == 4  # two generation pairs, one connection
        assert len(opened) == 1
    else:
        assert verdicts(collector)["pod-dns-udp"] == "may-drop"
        assert [m for m in caplog.messages if "without a consistency check" in m]


@pytest.mark.root
def test_real_plain_read_is_one_generation_pair(
    netns_fixture: Netns,  # noqa: F811 (the fixture imported above)
) -> None:
    kube_proxy = kernel_kube_proxy(netns_fixture, 0)
    opened: list[NftNetlink] = []

    def netlink() -> NftNetlink:
        opened.append(NftNetlink(netns_fixture.name))
        return opened[-1]

    collector = checked_run(kube_proxy, netlink)
    assert set(verdicts(collector).values()) == {"pass"}
    assert sum(d.requests for d in opened) == 2
    assert kube_proxy.calls.count("nft -j list chains") == 1
    assert not [c for c in kube_proxy.calls if c.startswith(("iptables-save", "iptables -L"))]


@pytest.mark.root
def test_real_rules_changing_under_every_read_are_read_whole(
    netns_fixture: Netns,  # noqa: F811 (the fixture imported above)
) -> None:
    kube_proxy = kernel_kube_proxy(netns_fixture, 100)
    collector = checked_run(kube_proxy, lambda: NftNetlink(netns_fixture.name))
    assert kube_proxy.resyncs == 2
    assert "iptables-save -c" in kube_proxy.calls
    assert summary(collector.last_verdicts) == summary(whole_read(netns_fixture).last_verdicts)
    assert set(verdicts(collector).values()) == {"pass"}
    status, why = statuses(collector)["iptables-nft"]
    assert status == "skipped" and "changed while being read (2 times)" in (why or "")
