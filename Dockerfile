# syntax=docker/dockerfile:1
# The image the DaemonSet runs. Build it with scripts/build-image (buildah, or docker where
# present): it makes the base `debian:<suite>-slim` from Debian packages (mmdebstrap) when
# the machine has no copy, and passes this machine's apt and pip settings as build secrets.
# Plain `docker build -t <registry>/nodediag:0.1.0 .` works too where Docker Hub is reachable.
#
# DEBIAN_SUITE picks the libsystemd the agent reads the host's journal with. It must be at
# least as new as the hosts' systemd: bookworm's systemd 252 reads journals written with
# the compact format and keyed hashes (systemd ≥ 246/252 hosts: Debian 12, Ubuntu 22.04/24.04,
# RHEL 9); for hosts with a newer systemd build with --build-arg DEBIAN_SUITE=trixie (257).
#
# Build secrets (all optional, mounted under /run/secrets for one RUN, never stored in a
# layer): apt-conf is an apt configuration (APT_CONFIG: the machine's mirrors, proxy, ...; it
# names apt-sources as the source list in place of the base's); pip-conf and ca-bundle are
# pip's configuration file and the CA bundle its TLS connections trust (PIP_CERT).
ARG DEBIAN_SUITE=bookworm

# ---- build: the agent and its dependencies in a virtualenv (systemd-python compiles here) ----
FROM debian:${DEBIAN_SUITE}-slim AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN --mount=type=secret,id=apt-conf --mount=type=secret,id=apt-sources \
    if [ -f /run/secrets/apt-conf ]; then export APT_CONFIG=/run/secrets/apt-conf; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev pkg-config libsystemd-dev \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/nodediag
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent/ agent/
COPY collectors/ collectors/
# The agent uses kubernetes' synchronous client only: its asyncio client (kubernetes.aio,
# ~42 MB) and the packages only that one imports (aiohttp & co, ~12 MB) go, and so do pip
# and setuptools (the image installs nothing at run time).
RUN --mount=type=secret,id=pip-conf --mount=type=secret,id=ca-bundle \
    if [ -f /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi \
 && if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
 && /opt/nodediag/bin/pip install --no-compile . \
 && /opt/nodediag/bin/pip uninstall -y -q aiohttp aiohttp-retry aiohappyeyeballs aiosignal \
        frozenlist multidict propcache yarl \
 && rm -rf /opt/nodediag/lib/python3*/site-packages/kubernetes/aio \
 && /opt/nodediag/bin/pip uninstall -y -q pip setuptools \
 && find /opt/nodediag -depth -name __pycache__ -type d -exec rm -rf {} +

# ---- runtime ----
FROM debian:${DEBIAN_SUITE}-slim
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="nodediag" \
      org.opencontainers.image.description="Per-node Kubernetes agent: invisible OOM kills, DNS dropped by the node's firewall, VXLAN checksum offload" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/nodediag/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# python3-minimal + libpython3-stdlib: the interpreter and standard library the virtualenv
# runs on; libsystemd0: the journal reader (Debian's, see DEBIAN_SUITE); iptables:
# iptables-save and ip6tables-save for both backends (xtables-nft-multi,
# xtables-legacy-multi); nftables: nft -j list ruleset; ipset: ipset save (the members of
# the sets rules match on).
RUN --mount=type=secret,id=apt-conf --mount=type=secret,id=apt-sources \
    if [ -f /run/secrets/apt-conf ]; then export APT_CONFIG=/run/secrets/apt-conf; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3-minimal libpython3-stdlib \
        libsystemd0 iptables nftables ipset \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/*
COPY --from=build /opt/nodediag /opt/nodediag
RUN nodediag --version \
 && python3 -c "import agent.kube, kubernetes.client, kubernetes.config, kubernetes.watch"
# Runs as root (uid 0) in the DaemonSet with all capabilities dropped but NET_ADMIN: see
# daemonset/daemonset.yaml for why.
EXPOSE 9102
ENTRYPOINT ["nodediag"]
CMD ["run"]
