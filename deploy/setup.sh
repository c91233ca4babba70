#!/usr/bin/env bash
# One entry point for a fresh Debian machine, as root:
#   bash deploy/setup.sh demo    install, then run the main job (ipsecstack demo)
#   bash deploy/setup.sh test    install everything the tests need, then lint, type-check and test
# Idempotent: a second run reuses the virtualenv in .venv and skips installed packages.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${IPSECSTACK_VENV:-$ROOT/.venv}
what=${1:-}
shift || true

log() { printf '\n== %s\n' "$*"; }

apt_install() {
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "setup: need root to apt-get install ${missing[*]}" >&2
        return 1
    fi
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

ensure_venv() {
    local py=${PYTHON:-python3}
    if ! command -v "$py" >/dev/null || ! python_ok "$py"; then
        apt_install python3 python3-venv python3-dev
        py=python3
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv $VENV"
        "$py" -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; "$py" -m venv "$VENV"; }
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
}

install_pkg() {
    local spec=.
    [ -n "${1:-}" ] && spec=".[$1]"
    log "pip install -e $spec"
    # -qq: quiet, but errors still print
    "$VENV/bin/python" -m pip install -qq -e "$spec" 2> >(grep -v "^WARNING: Location" >&2)
}

case "$what" in
demo)
    # the native ESP engine (optional C extension) builds from these; without them the Python datapath runs
    apt_install gcc python3-dev libssl-dev pkg-config || log "native engine not built: no compiler or OpenSSL headers"
    ensure_venv
    install_pkg ""
    log "ipsecstack demo $*"
    exec "$VENV/bin/ipsecstack" demo "$@"
    ;;
test)
    # kernel-facing tests: namespaces, firewall, captures, throughput; NFQUEUE bindings build from source;
    # the native ESP engine builds against OpenSSL (libssl-dev)
    apt_install gcc python3-dev libssl-dev pkg-config iproute2 iptables iputils-ping tcpdump tshark iperf3 \
        libnetfilter-queue-dev libnfnetlink-dev \
        strongswan-charon strongswan-swanctl libstrongswan-standard-plugins libcharon-extra-plugins \
        libstrongswan-extra-plugins
    ensure_venv
    install_pkg "test,nfqueue,fuzz"
    log "ruff"
    lint_dirs=()
    for d in ipsecstack backends tests bench; do [ -d "$d" ] && lint_dirs+=("$d"); done
    "$VENV/bin/ruff" check "${lint_dirs[@]}"
    "$VENV/bin/ruff" format --check "${lint_dirs[@]}"
    log "mypy --strict ipsecstack"
    "$VENV/bin/mypy"
    # the native engine once more, built with AddressSanitizer + UndefinedBehaviorSanitizer: its tests, then
    # its inbound parser fuzzed (atheris corpus, then random inputs) for a bounded time
    log "native engine under ASan + UBSan"
    PYTHON="$VENV/bin/python" bash tests/native/run_sanitized.sh
    log "native engine fuzzed under ASan + UBSan (40 s)"
    PYTHON="$VENV/bin/python" bash tests/native/run_sanitized.sh --fuzz 40
    log "pytest"
    # the packages above build the native engine: its tests must run, not skip
    IPSECSTACK_REQUIRE_NATIVE=1 exec "$VENV/bin/python" -m pytest "$@"
    ;;
*)
    echo "usage: bash deploy/setup.sh demo|test [args...]" >&2
    exit 2
    ;;
esac
