#!/usr/bin/env bash
# Installs the peer servers the benchmarks compare velium-server against:
# nats-server and mosquitto (Debian packages). Skips whatever is already installed.
# Run as root (or with sudo available). Then: cargo bench
set -euo pipefail

missing=()
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)

if [ ${#missing[@]} -eq 0 ]; then
    echo "install-peers: nats-server and mosquitto are already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install-peers: run as root to install: ${missing[*]}" >&2
        exit 1
    fi
fi

echo "install-peers: installing ${missing[*]}"
$SUDO apt-get update
# The packages may start system services (nats-server on 4222, mosquitto on 1883) where an
# init system runs; the benchmarks start their own instances on ephemeral ports, so such a
# service neither helps nor gets in the way.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"

for bin in nats-server mosquitto; do
    if command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ]; then
        echo "install-peers: $bin ok"
    else
        echo "install-peers: $bin still missing" >&2
        exit 1
    fi
done
