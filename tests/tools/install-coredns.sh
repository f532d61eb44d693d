#!/usr/bin/env bash
# Builds the pinned CoreDNS from the Go module proxy into ~/.cache/longcat-i2v/coredns-<version>/coredns: the
# e2e node's cluster DNS (its kubernetes plugin answers the gang's <pod>.<service> names). A no-op when built.
#
# Environment: LONGCAT_CACHE (default ~/.cache/longcat-i2v), LONGCAT_BUILD_JOBS (default: nproc, max 2).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
# shellcheck source=find-go.sh
source "$here/find-go.sh"
cache="${LONGCAT_CACHE:-$HOME/.cache/longcat-i2v}"
dest="$cache/coredns-$COREDNS_VERSION"
if [[ -x "$dest/coredns" ]]; then
    exit 0
fi
command -v go >/dev/null || { echo "install-coredns: 'go' is not on PATH" >&2; [[ "${CI:-}" =~ ^(1|true|yes)$ ]] && exit 1; exit 0; }
mkdir -p "$cache"
exec 9>"$cache/coredns-$COREDNS_VERSION.lock"
flock 9
[[ -x "$dest/coredns" ]] && exit 0

gocache="$cache/coredns-$COREDNS_VERSION.go"
export GOMODCACHE="$gocache/mod" GOCACHE="$gocache/build" GOBIN="$dest.tmp" CGO_ENABLED=0 GOFLAGS="-buildvcs=false"
jobs="${LONGCAT_BUILD_JOBS:-$(( $(nproc) < 2 ? $(nproc) : 2 ))}"
echo "install-coredns: building coredns $COREDNS_VERSION with $jobs job(s) (about 4 min on 2 idle cores)"
began=$SECONDS
rm -rf "$dest.tmp"
nice -n 10 go install -p "$jobs" -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
go clean -modcache
rm -rf "$gocache"
echo "install-coredns: done in $((SECONDS - began)) s: $dest/coredns"
