# syntax=docker/dockerfile:1
# The image the DaemonSet runs:  docker build -t <registry>/nodediag:0.1.0 .
#
# DEBIAN_SUITE picks the libsystemd the agent reads the host's journal with. It must be at
# least as new as the hosts' systemd: bookworm's systemd 252 reads journals written with
# the compact format and keyed hashes (systemd ≥ 246/252 hosts: Debian 12, Ubuntu 22.04/24.04,
# RHEL 9); for hosts with a newer systemd build with --build-arg DEBIAN_SUITE=trixie (257).
ARG PYTHON_VERSION=3.11
ARG DEBIAN_SUITE=bookworm

# ---- build: wheels for the agent and its dependencies (systemd-python compiles here) ----
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libsystemd-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 builder
# The build itself runs unprivileged.
USER builder
WORKDIR /home/builder/src
COPY --chown=builder pyproject.toml README.md ./
COPY --chown=builder agent/ agent/
COPY --chown=builder collectors/ collectors/
RUN python -m pip wheel --wheel-dir /home/builder/wheels .

# ---- runtime ----
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="nodediag" \
      org.opencontainers.image.description="Per-node Kubernetes agent: invisible OOM kills, DNS dropped by the node's firewall, VXLAN checksum offload" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# libsystemd0: the journal reader (Debian's, see DEBIAN_SUITE); iptables: iptables-save and
# ip6tables-save for both backends (xtables-nft-multi and xtables-legacy-multi);
# nftables: nft -j list ruleset; ipset: ipset save (the members of the sets rules match on).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libsystemd0 iptables nftables ipset \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /home/builder/wheels /tmp/wheels
RUN python -m pip install --no-index --find-links=/tmp/wheels nodediag \
 && rm -rf /tmp/wheels \
 && nodediag --version
# Runs as root (uid 0) in the DaemonSet with all capabilities dropped but NET_ADMIN: see
# daemonset/daemonset.yaml for why.
EXPOSE 9102
ENTRYPOINT ["nodediag"]
CMD ["run"]
