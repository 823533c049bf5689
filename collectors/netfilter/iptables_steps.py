"""An ``iptables-save`` rule compiled into evaluator steps (``collectors.netfilter.steps``).

Every match option is either understood exactly or compiled into a test that cannot be
decided (the evaluator follows both ways): a match is never dropped silently. Pure."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from collectors.netfilter.ipset import IpSet, set_matches
from collectors.netfilter.iptables import tokenize
from collectors.netfilter.model import parse_port, port_ranges
from collectors.netfilter.steps import (
    INERT,
    PORT_PROTOS,
    PROTO_NUMBERS,
    Compiled,
    Effect,
    IpNetwork,
    State,
    Step,
    Test,
    Tri,
    Verdict,
    dnat_to,
    in_networks,
    interface_matches,
    notrack,
    parse_network,
    redirect,
    undecided,
    with_mark,
)

#: Targets that neither stop nor change the packet for our purposes.
INERT_TARGETS = frozenset(
    {
        "LOG",
        "NFLOG",
        "ULOG",
        "TRACE",
        "AUDIT",
        "TCPMSS",
        "CHECKSUM",
        "TOS",
        "DSCP",
        "TTL",
        "HL",
        "CLASSIFY",
        "SET",
        "CONNSECMARK",
        "SECMARK",
        "IDLETIMER",
        "LED",
        "RATEEST",
        "TEE",
        "ECN",
        "NOTRACK_LOG",
    }
)
#: Targets that end the base chain like ACCEPT (after changing addresses we do not follow).
NAT_ACCEPT_TARGETS = frozenset({"SNAT", "MASQUERADE", "NETMAP", "CLUSTERIP"})
CT_STATES = frozenset({"new", "established", "related", "invalid", "untracked", "snat", "dnat"})
#: IPv6 extension header matches: a packet without that header never matches.
EXTENSION_HEADER_MATCHES = frozenset({"rt", "frag", "hbh", "dst"})
#: Matches that only load a module, or only say something about the rule itself.
QUIET_MATCHES = frozenset({"comment", "udp", "tcp", "multiport", "sctp"})


@dataclass(slots=True)
class _Rule:
    tokens: list[str]
    i: int = 0
    tests: list[Step] = field(default_factory=list)
    module: str = ""

    def value(self) -> tuple[str, bool]:
        """The option's value (and a pre-1.4.3 ``-p ! udp`` negation)."""
        self.i += 1
        if self.i < len(self.tokens) and self.tokens[self.i] == "!":
            self.i += 1
            return self._at(), True
        return self._at(), False

    def _at(self) -> str:
        return self.tokens[self.i] if self.i < len(self.tokens) else ""

    def rest_of_option(self) -> str:
        """Skip the values of an option we do not know; return them."""
        values: list[str] = []
        while self.i + 1 < len(self.tokens) and not self.tokens[self.i + 1].startswith("-"):
            if self.tokens[self.i + 1] == "!":
                break
            self.i += 1
            values.append(self.tokens[self.i])
        return " ".join(values)


def compile_iptables(text: str, ipsets: Mapping[str, IpSet] | None = None) -> Compiled:
    """The steps of one ``-A CHAIN …`` rule; ``ipsets``: the sets ``ipset save`` showed (a
    ``-m set`` match on another set cannot be decided). Never raises."""
    tokens = tokenize(text)
    rule = _Rule(tokens)
    negate = False
    while rule.i < len(tokens):
        token = tokens[rule.i]
        if token == "!":
            negate = True
            rule.i += 1
            continue
        if token in ("-j", "--jump", "-g", "--goto"):
            target, _ = rule.value()
            args = tokens[rule.i + 1 :]
            verdict = _verdict(target, args, goto=token in ("-g", "--goto"))
            if verdict is None:
                return INERT
            return Compiled((*rule.tests, verdict))
        if token in ("-A", "--append", "-I", "--insert"):
            rule.value()
        elif token in ("-m", "--match"):
            rule.module, _ = rule.value()
            if rule.module == "rpfilter":
                # The flows' sources are routed back through the interface they arrive on.
                rule.tests.append(Test("-m rpfilter", lambda _s: True))
            elif rule.module in EXTENSION_HEADER_MATCHES:
                # The flows' packets carry no IPv6 extension header (ufw6 drops type 0
                # routing headers: `-m rt --rt-type 0 -j DROP`).
                rule.tests.append(Test(f"-m {rule.module}", lambda _s: False))
            elif rule.module not in QUIET_MATCHES and rule.module not in (*_MODULES, "set"):
                rule.tests.append(undecided(f"-m {rule.module}"))
        elif token == "--invert" and rule.module == "rpfilter":
            last = rule.tests.pop()
            assert isinstance(last, Test)
            rule.tests.append(Test("-m rpfilter --invert", last.check, negated=True))
        elif token == "--match-set" and rule.module == "set":
            name, _ = rule.value()
            flags, _ = rule.value()
            rule.tests.append(_match_set(name, flags, negate, ipsets or {}))
        elif token == "--tcp-flags":
            mask, _ = rule.value()
            comp, _ = rule.value()
            rule.tests.append(_tcp_flags(mask, comp, negate))
        else:
            _option(rule, token, negate)
        negate = False
        rule.i += 1
    # No target: a rule that only counts.
    return INERT


def _option(rule: _Rule, token: str, negate: bool) -> None:
    handler = _OPTIONS.get(token)
    if handler is not None:
        value, neg = rule.value()
        test = handler(value, rule.module)
        if test is not None:
            text = f"{'! ' if negate or neg else ''}{token} {value}"
            rule.tests.append(Test(text, test.check, negated=negate or neg, random=test.random))
        return
    flag = _FLAGS.get(token)
    if flag is not None:
        check = flag(rule.module)
        rule.tests.append(Test(f"{'! ' if negate else ''}{token}", check, negated=negate))
        return
    if token.startswith("-"):
        values = rule.rest_of_option()
        if rule.module in _MODULES and _MODULES[rule.module] is None:
            return  # an option of a module we decided as a whole
        if token in _IGNORED or (rule.module == "rpfilter" and token in _RPFILTER_OPTIONS):
            return
        rule.tests.append(undecided(f"{'! ' if negate else ''}-m {rule.module} {token} {values}"))


# --------------------------------------------------------------------------- tests


def _proto(value: str, _module: str) -> Test | None:
    name = value.lower()
    if name in ("all", "0", ""):
        return None
    number = PROTO_NUMBERS.get(name)
    if number is None and name.isdigit():
        number = int(name)
    if number is None:
        return undecided(f"-p {value}")
    return Test("", lambda s: s.l4 == number)


def _networks_test(value: str, side: str) -> Test:
    nets: list[IpNetwork] = []
    for part in value.split(","):
        net = parse_network(part)
        if net is None:
            return undecided(f"{side} {value}")
        nets.append(net)
    found = tuple(nets)
    if side == "src":
        return Test("", lambda s: in_networks(s.saddr, found))
    return Test("", lambda s: in_networks(s.daddr, found))


def _interface(value: str, side: str) -> Test:
    if side == "in":
        return Test("", lambda s: interface_matches(s.iif, value) if s.iif else False)
    return Test("", lambda s: interface_matches(s.oif, value))


def _ports(value: str, side: str) -> Test:
    ranges = port_ranges(value)
    if not ranges:
        return undecided(f"port {value}")

    def check(state: State) -> Tri:
        if state.l4 not in PORT_PROTOS:
            return False
        port = state.dport if side == "dst" else state.sport
        if port is None:
            return None
        return any(lo <= port <= hi for lo, hi in ranges)

    return Test("", check)


def _both_ports(value: str, _module: str) -> Test:
    dst, src = _ports(value, "dst"), _ports(value, "src")

    def check(state: State) -> Tri:
        a, b = dst.check(state), src.check(state)
        if a or b:
            return True
        return None if a is None or b is None else False

    return Test("", check)


def _ct_states(value: str, _module: str) -> Test:
    states = frozenset(v.strip().lower() for v in value.split(","))
    if not states <= CT_STATES:
        return undecided(f"--ctstate {value}")

    def check(state: State) -> Tri:
        seen = state.ct_seen
        if seen in states:
            return True
        if "dnat" not in states or seen in ("invalid", "untracked"):
            return False
        # An answer's connection may have been DNATed: only the original direction is known.
        return None if state.reply else state.dnat

    return Test("", check)


def _mark(value: str, module: str) -> Test | None:
    number, mask = _value_mask(value)
    if number is None:
        return undecided(f"--mark {value}")
    if module == "connmark":
        return Test("", lambda s: (s.ctmark & mask) == number)
    return Test("", lambda s: (s.mark & mask) == number)


def _value_mask(value: str) -> tuple[int | None, int]:
    text, _, mask_text = value.partition("/")
    try:
        number = int(text, 0)
        mask = int(mask_text, 0) if mask_text else 0xFFFFFFFF
    except ValueError:
        return None, 0
    return number, mask


def _addrtype(value: str, side: str) -> Test:
    types = frozenset(v.strip().lower() for v in value.split(","))
    known = {"local", "unicast", "multicast", "broadcast"}

    def check(state: State) -> Tri:
        address = state.saddr if side == "src" else state.daddr
        if state.address_type(address) in types:
            return True
        return False if types <= known else None

    return Test("", check)


def _ct_orig_dst(value: str, _module: str) -> Test:
    net = parse_network(value)
    if net is None:
        return undecided(f"--ctorigdst {value}")
    return Test("", lambda s: in_networks(s.orig_daddr or s.daddr, (net,)))


def _ct_orig_dst_port(value: str, _module: str) -> Test:
    ranges = port_ranges(value)
    return Test("", lambda s: any(lo <= (s.orig_dport or s.dport or -1) <= hi for lo, hi in ranges))


def _ct_dir(value: str, _module: str) -> Test:
    want = value.strip().upper() == "REPLY"
    return Test("", lambda s: s.reply == want)


def _pkttype(value: str, _module: str) -> Test:
    kind = value.strip().lower()
    return Test("", lambda s: kind == ("multicast" if s.daddr.is_multicast else "unicast"))


def _iprange(value: str, side: str) -> Test:
    low_text, _, high_text = value.partition("-")
    try:
        low = ipaddress.ip_address(low_text)
        high = ipaddress.ip_address(high_text or low_text)
    except ValueError:
        return undecided(f"iprange {value}")

    def check(state: State) -> Tri:
        address = state.saddr if side == "src" else state.daddr
        return address.version == low.version and low <= address <= high  # type: ignore[operator]

    return Test("", check)


def _policy(value: str, _module: str) -> Test:
    return Test("", lambda _s: value.strip() == "none")


def _statistic(_value: str, _module: str) -> Test:
    return undecided("-m statistic (random)", random=True)


def _icmp(value: str, _module: str) -> Test:
    return Test("", lambda s: None if s.l4 in (1, 58) else False)


def _match_set(name: str, flags: str, negate: bool, ipsets: Mapping[str, IpSet]) -> Test:
    text = f"{'! ' if negate else ''}-m set --match-set {name} {flags}"
    return Test(text, lambda s: set_matches(ipsets, name, flags, s), negated=negate)


def _tcp_flags(mask: str, comp: str, negate: bool) -> Test:
    """``--tcp-flags MASK COMP``: a new connection's first packet is a SYN (no ACK), every
    later one has ACK; other masks cannot be decided."""
    masked = set(mask.upper().split(","))
    wanted = set(comp.upper().split(",")) if comp.upper() != "NONE" else set()
    text = f"{'! ' if negate else ''}--tcp-flags {mask} {comp}"
    if not {"SYN", "ACK"} <= masked or mask.upper() == "ALL":
        return undecided(text)
    syn_only = wanted & {"SYN", "ACK", "RST", "FIN"} == {"SYN"}
    with_ack = "ACK" in wanted and not wanted & {"SYN", "RST", "FIN"}

    def check(state: State) -> Tri:
        if state.l4 != 6:
            return False
        first = state.ct_seen == "new" and not state.reply
        if syn_only:
            return first
        if with_ack:
            return not first
        return False if not wanted & {"SYN", "ACK"} else None

    return Test(text, check, negated=negate)


def _syn(module: str) -> Callable[[State], Tri]:
    return lambda s: (s.ct_seen == "new") if s.l4 == 6 else False


def _physdev_bridged(module: str) -> Callable[[State], Tri]:
    return lambda _s: None


_OPTIONS: dict[str, Callable[[str, str], Test | None]] = {
    "-p": _proto,
    "--protocol": _proto,
    "-s": lambda v, _m: _networks_test(v, "src"),
    "--source": lambda v, _m: _networks_test(v, "src"),
    "--src": lambda v, _m: _networks_test(v, "src"),
    "-d": lambda v, _m: _networks_test(v, "dst"),
    "--destination": lambda v, _m: _networks_test(v, "dst"),
    "--dst": lambda v, _m: _networks_test(v, "dst"),
    "-i": lambda v, _m: _interface(v, "in"),
    "--in-interface": lambda v, _m: _interface(v, "in"),
    "-o": lambda v, _m: _interface(v, "out"),
    "--out-interface": lambda v, _m: _interface(v, "out"),
    "--dport": lambda v, _m: _ports(v, "dst"),
    "--destination-port": lambda v, _m: _ports(v, "dst"),
    "--dports": lambda v, _m: _ports(v, "dst"),
    "--destination-ports": lambda v, _m: _ports(v, "dst"),
    "--sport": lambda v, _m: _ports(v, "src"),
    "--source-port": lambda v, _m: _ports(v, "src"),
    "--sports": lambda v, _m: _ports(v, "src"),
    "--source-ports": lambda v, _m: _ports(v, "src"),
    "--ports": _both_ports,
    "--ctstate": _ct_states,
    "--state": _ct_states,
    "--mark": _mark,
    "--dst-type": lambda v, _m: _addrtype(v, "dst"),
    "--src-type": lambda v, _m: _addrtype(v, "src"),
    "--ctorigdst": _ct_orig_dst,
    "--ctorigdstport": _ct_orig_dst_port,
    "--ctdir": _ct_dir,
    "--pkt-type": _pkttype,
    "--src-range": lambda v, _m: _iprange(v, "src"),
    "--dst-range": lambda v, _m: _iprange(v, "dst"),
    "--pol": _policy,
    "--mode": _statistic,
    "--icmp-type": _icmp,
    "--icmpv6-type": _icmp,
    "--comment": lambda _v, _m: None,
}
_FLAGS: dict[str, Callable[[str], Callable[[State], Tri]]] = {
    "--syn": _syn,
    "--physdev-is-bridged": _physdev_bridged,
}
# Options whose meaning is carried by another option of the same match.
_IGNORED = frozenset({"--limit-iface-in", "--limit-iface-out", "--dir", "--strict", "-4", "-6"})
#: rpfilter's lookup options: the flows' sources route back through their interface whatever
#: the lookup (firewalld's IPv6 `-m rpfilter --validmark --invert -j DROP`).
_RPFILTER_OPTIONS = frozenset({"--loose", "--validmark", "--accept-local"})
#: Modules we understand (None: the whole module is decided by one test added here).
_MODULES: dict[str, object] = {
    "conntrack": "",
    "state": "",
    "mark": "",
    "connmark": "",
    "addrtype": "",
    "pkttype": "",
    "iprange": "",
    "policy": "",
    "statistic": None,
    "icmp": "",
    "icmp6": "",
    "rpfilter": "",
    **dict.fromkeys(EXTENSION_HEADER_MATCHES),
}


# --------------------------------------------------------------------------- targets


def _verdict(target: str, args: list[str], goto: bool) -> Verdict | Effect | None:
    upper = target.upper()
    if upper in ("ACCEPT", "DROP", "RETURN"):
        return Verdict(upper.lower(), text=upper)  # type: ignore[arg-type]
    if upper == "REJECT":
        return Verdict("reject", text=" ".join(["REJECT", *args]))
    if upper in INERT_TARGETS:
        return None
    if upper in ("QUEUE", "NFQUEUE"):
        return Verdict("queue", text=" ".join([upper, *args]))
    if upper == "MARK" or upper == "CONNMARK":
        return _mark_effect(upper, args)
    if upper == "NOTRACK" or (upper == "CT" and "--notrack" in args):
        return Effect(upper, notrack)
    if upper == "CT":
        return None
    if upper == "DNAT":
        return Verdict("accept", effect=_dnat_effect(args), text=" ".join(["DNAT", *args]))
    if upper == "REDIRECT":
        port = _arg(args, "--to-ports")
        number = parse_port(port.split("-")[0]) if port else None
        return Verdict("accept", effect=redirect(number), text=" ".join(["REDIRECT", *args]))
    if upper in NAT_ACCEPT_TARGETS:
        return Verdict("accept", text=upper)
    if target and not target.isupper():
        return Verdict("goto" if goto else "jump", chain=target, text=target)
    # An upper-case name: a user chain (KUBE-SERVICES) or a target we do not know; the
    # evaluator decides by whether the table has such a chain.
    return Verdict("goto" if goto else "jump", chain=target, text=" ".join([target, *args]))


def _arg(args: list[str], name: str) -> str | None:
    for i, token in enumerate(args[:-1]):
        if token == name:
            return args[i + 1]
    return None


def _mark_effect(target: str, args: list[str]) -> Effect | None:
    conn = target == "CONNMARK"
    for how, option in (
        ("set-xmark", "--set-xmark"),
        ("set-mark", "--set-mark"),
        ("or", "--or-mark"),
        ("and", "--and-mark"),
        ("xor", "--xor-mark"),
    ):
        value = _arg(args, option)
        if value is not None:
            number, mask = _value_mask(value)
            if number is None:
                return None
            return Effect(f"{target} {option} {value}", with_mark(how, number, mask, conn))
    if conn and ("--save-mark" in args or "--restore-mark" in args):
        return Effect(f"CONNMARK {' '.join(args)}", _save_restore("--save-mark" in args))
    return None


def _save_restore(save: bool) -> Callable[[State], State]:
    def apply(state: State) -> State:
        if save:
            return replace(state, ctmark=state.mark)
        return replace(state, mark=state.ctmark)

    return apply


def _dnat_effect(args: list[str]) -> Callable[[State], State]:
    to = _arg(args, "--to-destination") or ""
    address_text, port = to, None
    if to.startswith("["):  # [v6]:port
        address_text, _, rest = to[1:].partition("]")
        port = parse_port(rest[1:].split("-")[0]) if rest.startswith(":") else None
    elif to.count(":") == 1:
        address_text, _, port_text = to.partition(":")
        port = parse_port(port_text.split("-")[0])
    address_text = address_text.split("-")[0]
    try:
        address = ipaddress.ip_address(address_text) if address_text else None
    except ValueError:
        address = None
    return dnat_to(address, port)
