#!/usr/bin/env bash
# Installs Prometheus from Debian's `prometheus` package; the tests start their own server on 127.0.0.1
# (tests/fixtures/prometheus.py). A fast no-op when the binary is there.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=apt.sh
source "$here/apt.sh"

apt_install install-prometheus prometheus
prometheus --version >/dev/null
