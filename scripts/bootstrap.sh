#!/usr/bin/env bash
# Shared by scripts/run-agent and scripts/test: install what nodediag needs on a fresh
# Debian/Ubuntu machine (as root), then a virtualenv in .venv with nodediag installed.
# Usage: source scripts/bootstrap.sh; bootstrap [extra debian packages...]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${NODEDIAG_VENV:-$ROOT/.venv}
# Build systemd-python (libsystemd headers), read the journal, run the tests' processes.
BASE_PACKAGES=(gcc pkg-config libsystemd-dev python3-dev python3-venv systemd util-linux procps)

log() { printf '[bootstrap] %s\n' "$*" >&2; }

install_packages() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$package")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        log "missing Debian packages: ${missing[*]}; run as root to install them"
        return 1
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_venv() {
    local extra=$1
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    log "installing nodediag$extra into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT$extra" 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
}

bootstrap() {
    local extra=$1
    shift
    install_packages "${BASE_PACKAGES[@]}" "$@"
    install_venv "$extra"
}
