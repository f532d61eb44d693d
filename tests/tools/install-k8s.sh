#!/usr/bin/env bash
# Builds the pinned control plane (kube-apiserver, kube-controller-manager, kube-scheduler) and node
# (kubelet, kube-proxy, and the sandbox's `pause` from the same module's C source) from the Go module proxy
# into ~/.cache/longcat-i2v/k8s-<version>/bin. A fast no-op when that directory is complete.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces the staging modules (k8s.io/api,
# k8s.io/client-go, ...) with ./staging paths that do not exist in the module zip. So we generate a tiny
# module that requires k8s.io/kubernetes and replaces each staging module it requires with the published
# v0.<minor>.<patch> of the same release, then build the two commands from it.
#
# Environment: LONGCAT_CACHE (default ~/.cache/longcat-i2v), LONGCAT_BUILD_JOBS (default: nproc, max 2;
# the build shares this machine with other work).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
# shellcheck source=find-go.sh
source "$here/find-go.sh"

version="$KUBERNETES_VERSION"
cache="${LONGCAT_CACHE:-$HOME/.cache/longcat-i2v}"
dest="$cache/k8s-$version"
commands=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

complete() {
    [[ -f "$dest/.complete" ]] || return 1
    local c
    for c in "${commands[@]}" pause; do [[ -x "$dest/bin/$c" ]] || return 1; done
}

if complete; then
    exit 0
fi

if ! command -v go >/dev/null; then
    echo "install-k8s: 'go' is not on PATH, so kube-apiserver $version cannot be built here;" \
         "install Go (https://go.dev/dl/), or the cluster tests skip" >&2
    # CI must run the cluster tests, so there a missing toolchain is an error, not a skip.
    [[ "${CI:-}" =~ ^(1|true|yes)$ ]] && exit 1
    exit 0
fi
mkdir -p "$cache"
# One build at a time: a second run waits, then finds the cache complete.
exec 9>"$cache/k8s-$version.lock"
flock 9
if complete; then
    exit 0
fi

# Go's caches live outside the repository, for this version only: they are removed once the binaries
# exist (3 GiB that the next version could not reuse much), and kept after a failure to resume from.
gocache="$cache/k8s-$version.go"
export GOMODCACHE="$gocache/mod"
export GOCACHE="$gocache/build"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
jobs="${LONGCAT_BUILD_JOBS:-$(( $(nproc) < 2 ? $(nproc) : 2 ))}"

work="$cache/k8s-$version.work"
rm -rf "$work" "$dest.tmp"
mkdir -p "$work" "$dest.tmp/bin"
echo "install-k8s: building ${commands[*]} $version with $jobs job(s)" \
     "(about 15 min on 2 idle cores, then cached in $dest)"

upstream_mod="$(cd "$work" && go mod download -json "k8s.io/kubernetes@$version" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')"
if [[ ! -f "$upstream_mod" ]]; then
    echo "install-k8s: could not download k8s.io/kubernetes@$version's go.mod from $(go env GOPROXY)" >&2
    exit 1
fi

staging_version="v0.${version#v1.}"
go_directive="$(grep -m1 '^go ' "$upstream_mod")"
{
    echo "module longcat-i2v/k8s-build"
    echo
    echo "$go_directive"
    # Upstream's godebug defaults only apply to the main module, so carry them over to build the same binaries.
    grep '^godebug ' "$upstream_mod" || true
    echo
    echo "require k8s.io/kubernetes $version"
    echo
    echo "replace ("
    # Staging modules are those upstream replaces with ./staging paths; only the ones it requires matter
    # (some, such as k8s.io/sample-cli-plugin, are neither required nor published for every release).
    awk -v v="$staging_version" '
        /^require \(/ { inreq = 1; next }
        /^replace \(/ { inrep = 1; next }
        /^\)/ { inreq = 0; inrep = 0; next }
        inreq && $2 == "v0.0.0" { required[$1] = 1 }
        inrep && $3 ~ /^\.\/staging\// && ($1 in required) { print "\t" $1 " => " $1 " " v }
    ' "$upstream_mod"
    echo ")"
} > "$work/go.mod"

version_pkg=k8s.io/component-base/version
minor="${version#v1.}"; minor="${minor%%.*}"
ldflags="-s -w -X $version_pkg.gitVersion=$version -X $version_pkg.gitMajor=1 -X $version_pkg.gitMinor=$minor"
ldflags+=" -X $version_pkg.gitTreeState=clean -X $version_pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# `go build -v` names each package as it compiles it: count them against the total for a rate and an ETA.
report_progress() {
    local total="$1" built=0 last=$SECONDS line rate
    while IFS= read -r line; do
        if [[ "$line" =~ ^[A-Za-z0-9._/~-]+$ ]]; then
            built=$((built + 1))
            if (( SECONDS - last >= 30 )); then
                last=$SECONDS
                rate=$(( built * 100 / (SECONDS - began > 0 ? SECONDS - began : 1) ))
                echo "install-k8s: compiled $built/$total packages, $((rate / 100)).$((rate % 100 / 10))/s," \
                     "ETA $(( (total - built) * 100 / (rate > 0 ? rate : 1) )) s"
            fi
        else
            echo "$line" >&2  # a compiler error, or go's own messages
        fi
    done
}

cd "$work"
packages=()
for c in "${commands[@]}"; do packages+=("k8s.io/kubernetes/cmd/$c"); done
total=$(go list -deps "${packages[@]}" | wc -l)
# The pod sandbox's pause process: Kubernetes ships its C source in the module; no image can be pulled here.
pause_c="$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
if ! command -v gcc >/dev/null; then
    echo "install-k8s: gcc is needed to build the pod sandbox's pause from $pause_c" >&2
    exit 1
fi
gcc -Os -static -o "$dest.tmp/bin/pause" "$pause_c"
strip "$dest.tmp/bin/pause"

began=$SECONDS
echo "install-k8s: compiling $total packages ($SECONDS s so far)"
nice -n 10 go build -v -p "$jobs" -trimpath -ldflags "$ldflags" -o "$dest.tmp/bin/" "${packages[@]}" 2>&1 \
    | report_progress "$total"

cp "$work/go.mod" "$dest.tmp/go.mod"
echo "$version" > "$dest.tmp/.complete"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
cd "$cache"
rm -rf "$work"
go clean -modcache  # its files are read-only, so plain rm cannot remove them as a normal user
rm -rf "$gocache"
echo "install-k8s: done in $SECONDS s: $(du -sh "$dest/bin" | cut -f1) in $dest/bin"
