#!/usr/bin/env bash
# Installs Debian's chromium and its WebDriver, which tests/test_ui_browser.py drives through selenium (the
# browser, not selenium's own download of one: nothing but package registries is reachable). A fast no-op
# when both are installed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=apt.sh
source "$here/apt.sh"

apt_install install-chromium chromium chromium-driver
