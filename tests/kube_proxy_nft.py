"""kube-proxy's nftables mode (Kubernetes 1.31+ layout) as an ``nft -f`` script, for the real
nft in a throwaway network namespace: ``table ip kube-proxy`` with ``services`` ClusterIP
Services of ``endpoints`` endpoints each and the kube-dns Service (10.43.0.10, UDP and TCP 53,
endpoints 10.42.0.5 and 10.42.7.9; or none: then, as kube-proxy writes it, its ports are in
``no-endpoint-services``, which sends them to ``reject-chain``)."""

from __future__ import annotations

from collections.abc import Sequence

DNS_ENDPOINTS = ("10.42.0.5", "10.42.7.9")


def service_specs(services: int, separator: str) -> list[tuple[str, str, int, str]]:
    """(ClusterIP, protocol, port, namespace + ``separator`` + name) of ``services`` TCP
    Services and of kube-dns's UDP and TCP ports, in that order."""
    specs = [
        (f"10.43.{100 + n // 250}.{n % 250 + 1}", "tcp", 80, f"ns{n % 97}{separator}svc-{n}")
        for n in range(services)
    ]
    dns = f"kube-system{separator}kube-dns"
    return specs + [("10.43.0.10", proto, 53, dns) for proto in ("udp", "tcp")]


def kube_proxy_nft_script(
    services: int, endpoints: int = 3, dns_endpoints: Sequence[str] = DNS_ENDPOINTS
) -> str:
    chains: list[str] = []
    rules: list[str] = []
    service_ips: list[str] = []
    no_endpoints: list[str] = []
    cluster_ips: list[str] = ["10.43.0.10"]
    base = (
        ("nat-prerouting", "type nat hook prerouting priority dstnat; policy accept;"),
        ("nat-output", "type nat hook output priority -100; policy accept;"),
        ("nat-postrouting", "type nat hook postrouting priority srcnat; policy accept;"),
        ("filter-forward", "type filter hook forward priority -110; policy accept;"),
        ("filter-input", "type filter hook input priority -110; policy accept;"),
        ("filter-output", "type filter hook output priority -110; policy accept;"),
    )
    for name, spec in base:
        chains.append(f"add chain ip kube-proxy {name} {{ {spec} }}")
    for name in (
        "services",
        "service-endpoints-check",
        "cluster-ips-check",
        "mark-for-masquerade",
        "masquerading",
        "reject-chain",
    ):
        chains.append(f"add chain ip kube-proxy {name}")
    rules += [
        "add rule ip kube-proxy nat-prerouting jump services",
        "add rule ip kube-proxy nat-output jump services",
        "add rule ip kube-proxy nat-postrouting jump masquerading",
        "add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check",
        "add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check",
        "add rule ip kube-proxy filter-input ct state new jump service-endpoints-check",
        "add rule ip kube-proxy filter-output ct state new jump service-endpoints-check",
        "add rule ip kube-proxy filter-output ct state new jump cluster-ips-check",
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
        "add rule ip kube-proxy service-endpoints-check "
        "ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
        "add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject",
        "add rule ip kube-proxy cluster-ips-check ip daddr 10.43.0.0/16 drop",
        "add rule ip kube-proxy mark-for-masquerade meta mark set meta mark or 0x4000",
        "add rule ip kube-proxy masquerading meta mark & 0x4000 == 0 return",
        "add rule ip kube-proxy masquerading masquerade",
        "add rule ip kube-proxy reject-chain reject",
    ]
    for n, (ip, proto, port, name) in enumerate(service_specs(services, "-")):
        service = f"service-{n:08X}-{name}-{proto}-{port}"
        cluster_ips.append(ip)
        if port == 53 and not dns_endpoints:
            comment = f'comment "{name.replace("-kube-dns", "/kube-dns")}:{proto}"'
            no_endpoints.append(f"{ip} . {proto} . {port} {comment} : goto reject-chain")
            continue
        chains.append(f"add chain ip kube-proxy {service}")
        service_ips.append(f"{ip} . {proto} . {port} : goto {service}")
        rules.append(
            f"add rule ip kube-proxy {service} ip daddr {ip} {proto} dport {port} "
            "ip saddr != 10.42.0.0/16 jump mark-for-masquerade"
        )
        pods = (
            dns_endpoints
            if port == 53
            else [
                f"10.42.{(n * endpoints + e) // 250 % 256}.{(n * endpoints + e) % 250 + 2}"
                for e in range(endpoints)
            ]
        )
        picks = []
        for e, pod in enumerate(pods):
            endpoint = f"endpoint-{n:08X}{e:02X}-{name}-{proto}-{port}"
            chains.append(f"add chain ip kube-proxy {endpoint}")
            rules.append(
                f"add rule ip kube-proxy {endpoint} ip saddr {pod} jump mark-for-masquerade"
            )
            rules.append(
                f"add rule ip kube-proxy {endpoint} meta l4proto {proto} dnat to {pod}:{port}"
            )
            picks.append(f"{e} : goto {endpoint}")
        rules.append(
            f"add rule ip kube-proxy {service} numgen random mod {len(pods)} "
            f"vmap {{ {', '.join(picks)} }}"
        )
    key = "ipv4_addr . inet_proto . inet_service : verdict"
    sets = [
        f"add map ip kube-proxy service-ips {{ type {key} ; }}",
        f"add map ip kube-proxy no-endpoint-services {{ type {key} ; }}",
        "add set ip kube-proxy cluster-ips { type ipv4_addr ; }",
    ]
    elements = [
        f"add element ip kube-proxy service-ips {{ {', '.join(service_ips[i : i + 500])} }}"
        for i in range(0, len(service_ips), 500)
    ]
    if no_endpoints:
        joined = ", ".join(no_endpoints)
        elements.append(f"add element ip kube-proxy no-endpoint-services {{ {joined} }}")
    unique = sorted(set(cluster_ips))
    elements += [
        f"add element ip kube-proxy cluster-ips {{ {', '.join(unique[i : i + 500])} }}"
        for i in range(0, len(unique), 500)
    ]
    return "\n".join(["add table ip kube-proxy", *sets, *chains, *rules, *elements, ""])
