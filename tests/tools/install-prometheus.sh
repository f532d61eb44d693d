#!/usr/bin/env bash
# Installs Prometheus from Debian's `prometheus` package; the tests start their own server on 127.0.0.1
# (tests/fixtures/prometheus.py). A fast no-op when the binary is there.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
command -v apt-get >/dev/null || { echo "install-prometheus: needs apt-get (Debian's prometheus package)" >&2; exit 1; }

# The package's maintainer scripts would start a system-wide Prometheus on :9090; the tests want none.
# policy-rc.d is Debian's switch for that: add one (denying every start) only while installing, if none exists.
policy=/usr/sbin/policy-rc.d
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show prometheus >/dev/null 2>&1; then
    apt-get update -qq
fi
echo "install-prometheus: installing Debian's prometheus package"
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
prometheus --version | head -1
