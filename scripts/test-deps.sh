#!/usr/bin/env bash
# Installs what the test suite needs beyond a Rust toolchain: the tests of a cluster of
# hubs start a real nats-server (Debian's nats-server package). Safe to run again: it
# installs only what is missing, and says what it did.
set -euo pipefail

have_nats() {
    command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]
}

if have_nats; then
    echo "test-deps: nats-server present ($( (command -v nats-server || echo /usr/sbin/nats-server) | head -1))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "test-deps: nats-server is missing and there is no apt-get here;" \
        "install nats-server (https://nats.io) and run the tests again" >&2
    exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    else
        echo "test-deps: nats-server is missing; run as root or install sudo" >&2
        exit 1
    fi
fi

echo "test-deps: installing nats-server (apt-get)"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends nats-server
# The package also enables a system service; the tests start their own servers on
# ephemeral ports, and a system one on 4222 is not needed for them.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now nats-server >/dev/null 2>&1 || true
fi
have_nats || { echo "test-deps: nats-server still missing after apt-get" >&2; exit 1; }
echo "test-deps: nats-server installed"
