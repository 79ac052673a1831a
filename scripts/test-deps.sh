#!/usr/bin/env bash
# Installs what the test suite needs beyond a Rust toolchain: the tests of a cluster of
# hubs start a real nats-server (Debian's nats-server package), and the dashboard's tests
# drive a headless Chromium through chromedriver (Debian's chromium and chromium-driver
# packages). The package test (scripts/test-package) builds the Debian package with
# cargo-deb, installed with `cargo install cargo-deb --locked` when missing. Safe to run
# again: it installs only what is missing, and says what it did.
set -euo pipefail

# cargo-deb: a cargo subcommand, installed into cargo's bin directory (no root needed);
# an installed one is used as it is.
if command -v cargo-deb >/dev/null 2>&1; then
    echo "test-deps: cargo-deb present ($(cargo-deb --version 2>/dev/null | head -1))"
else
    echo "test-deps: installing cargo-deb (cargo install cargo-deb --locked)"
    cargo install cargo-deb --locked
    command -v cargo-deb >/dev/null 2>&1 ||
        { echo "test-deps: cargo-deb still not on PATH after cargo install (is ~/.cargo/bin on PATH?)" >&2; exit 1; }
fi

have_nats() {
    command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]
}
have_chromium() {
    [ -x /usr/bin/chromium ]
}
have_chromedriver() {
    [ -x /usr/bin/chromedriver ]
}

missing=()
if have_nats; then
    echo "test-deps: nats-server present ($( (command -v nats-server || echo /usr/sbin/nats-server) | head -1))"
else
    missing+=(nats-server)
fi
if have_chromium; then
    echo "test-deps: chromium present (/usr/bin/chromium)"
else
    missing+=(chromium)
fi
if have_chromedriver; then
    echo "test-deps: chromedriver present (/usr/bin/chromedriver)"
else
    missing+=(chromium-driver)
fi

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "test-deps: missing ${missing[*]} and there is no apt-get here;" \
        "install them (nats-server: https://nats.io; chromium and chromedriver" \
        "at /usr/bin/chromium and /usr/bin/chromedriver) and run the tests again" >&2
    exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    else
        echo "test-deps: missing ${missing[*]}; run as root or install sudo" >&2
        exit 1
    fi
fi

echo "test-deps: installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
# The nats-server package also enables a system service; the tests start their own
# servers on ephemeral ports, and a system one on 4222 is not needed for them.
if [[ " ${missing[*]} " == *" nats-server "* ]] \
    && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now nats-server >/dev/null 2>&1 || true
fi
have_nats || { echo "test-deps: nats-server still missing after apt-get" >&2; exit 1; }
have_chromium || { echo "test-deps: /usr/bin/chromium still missing after apt-get" >&2; exit 1; }
have_chromedriver || { echo "test-deps: /usr/bin/chromedriver still missing after apt-get" >&2; exit 1; }
echo "test-deps: installed ${missing[*]}"
