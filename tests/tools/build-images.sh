#!/usr/bin/env bash
# Builds the operator image (Dockerfile) and the trainer image (trainer_image/Dockerfile), unchanged, without
# Docker or a registry, and the pod sandbox's pause image; writes each as an OCI archive into
# ~/.cache/longcat-i2v/images/, named by the content hash of the Dockerfile and the files it copies. A fast
# no-op when the archives of the current sources exist. Prints `NAME=REFERENCE ARCHIVE` for each image.
#
#   tests/tools/build-images.sh              (run it alone, or let scripts/test and tests/test_e2e.py run it)
#
# No image can be pulled here, so the base both Dockerfiles name (python:3.11-slim-bookworm) is a stand-in
# made locally: Debian bookworm's minbase with python3 and venv (mmdebstrap), committed under that name.
# Python is Debian's 3.11 in /usr/bin in both build stages, so the copied venv is consistent. RUN steps reach
# PyPI through this machine's CA bundle and pip configuration, bind-mounted read-only (not in the image).
# buildah's default runtime crun fails here (cgroup v1); runc works. Host networking leaves no iptables
# chains behind. Needs root, buildah, mmdebstrap (tests/tools/install-node.sh) and pause (install-k8s.sh).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${LONGCAT_CACHE:-$HOME/.cache/longcat-i2v}"
images="$cache/images"
mkdir -p "$images"
exec 9>"$images/.lock"
flock 9  # one build at a time; a second run waits, then finds the archives

say() { echo "build-images: $*" >&2; }
if [[ $EUID -ne 0 ]]; then
    say "needs root (buildah and the e2e node); the e2e tests skip"
    [[ "${CI:-}" =~ ^(1|true|yes)$ ]] && exit 1
    exit 0
fi
for tool in buildah mmdebstrap; do
    command -v "$tool" >/dev/null || { say "'$tool' is missing: run tests/tools/install-node.sh"; exit 1; }
done
buildah=(buildah)

# The content of a list of paths (files or folders), minus what .dockerignore keeps out of the build, and of
# the base image they build on.
content_hash() {
    (cd "$root" && { find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 \
        | sort -z | xargs -0 sha256sum; echo "$base_key"; } | sha256sum | cut -c1-12)
}

# Older builds of image NAME go before anything new is written (a trainer build is 5.6 GB, and CI's disk may
# not hold two): drop_archives NAME REFERENCE before a build, drop_images NAME REFERENCE once REFERENCE is built,
# since the layers of the older ones are what --layers builds the new one from.
drop_archives() {
    find "$images" -maxdepth 1 -name "$1-*.tar*" ! -name "$1-${2##*:}.tar" -delete
}
drop_images() {
    "${buildah[@]}" images --format '{{.Name}}:{{.Tag}}' "localhost/longcat-$1" 2>/dev/null \
        | grep -vx "$2" | xargs -r "${buildah[@]}" rmi >/dev/null 2>&1 || true
    # With them, the layers only they used: untagged images that no other image builds on.
    "${buildah[@]}" rmi --prune >/dev/null 2>&1 || true
}

# archive NAME REFERENCE: the OCI archive of REFERENCE, from buildah's storage.
archive() {
    local name="$1" ref="$2" out="$images/$1-${2##*:}.tar"
    if [[ ! -f "$out" ]]; then
        drop_archives "$name" "$ref"
        drop_images "$name" "$ref"
        say "writing $out"
        # Uncompressed layers: written and imported in a fraction of the time, and identical layers keep
        # identical digests, so the importer skips what it has.
        "${buildah[@]}" push --quiet --disable-compression "$ref" "oci-archive:$out.partial:$ref" >/dev/null
        mv "$out.partial" "$out"
    fi
    echo "$name=$ref $out"
}

# --- the stand-in base -------------------------------------------------------------------------------------
base_ref=docker.io/library/python:3.11-slim-bookworm
base_key="bookworm-minbase-python3-$(echo "$BASE_PACKAGES" | sha256sum | cut -c1-8)"
if [[ "$("${buildah[@]}" inspect --type image --format '{{index .ImageAnnotations "longcat.base"}}' "$base_ref" \
        2>/dev/null || true)" != "$base_key" ]]; then
    tarball="$images/base-$base_key.tar"
    if [[ ! -f "$tarball" ]]; then
        say "making the stand-in for $base_ref: Debian bookworm minbase with $BASE_PACKAGES (about 40 s)"
        # mmdebstrap picks its output format by the name's extension: .tar.
        mmdebstrap --quiet --mode=root --variant=minbase --include="$BASE_PACKAGES" bookworm "$tarball.partial.tar"
        mv "$tarball.partial.tar" "$tarball"
    fi
    container="$("${buildah[@]}" from scratch)"
    "${buildah[@]}" add --quiet "$container" "$tarball" / >/dev/null
    "${buildah[@]}" config --env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
        --annotation "longcat.base=$base_key" --cmd python3 "$container"
    "${buildah[@]}" commit --quiet --rm "$container" "$base_ref" >/dev/null
fi

# --- the pod sandbox's pause image ---------------------------------------------------------------------------
pause_bin="$cache/k8s-$KUBERNETES_VERSION/bin/pause"
[[ -x "$pause_bin" ]] || { say "$pause_bin is missing: run tests/tools/install-k8s.sh"; exit 1; }
pause_ref="localhost/longcat-pause:$(sha256sum "$pause_bin" | cut -c1-12)"
if ! "${buildah[@]}" inspect --type image "$pause_ref" >/dev/null 2>&1; then
    container="$("${buildah[@]}" from scratch)"
    "${buildah[@]}" copy --quiet "$container" "$pause_bin" /pause >/dev/null
    "${buildah[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$container"
    "${buildah[@]}" commit --quiet --rm "$container" "$pause_ref" >/dev/null
fi
archive pause "$pause_ref"

# --- the project's two images ----------------------------------------------------------------------------------
# build NAME DOCKERFILE PATH...: PATHs are what the Dockerfile copies (its content hash names the image).
build() {
    local name="$1" dockerfile="$2"
    shift 2
    local ref="localhost/longcat-$name:$(content_hash "$dockerfile" "$@")"
    if [[ ! -f "$images/$name-${ref##*:}.tar" ]] && ! "${buildah[@]}" inspect --type image "$ref" >/dev/null 2>&1; then
        drop_archives "$name" "$ref"
        say "building $ref from $dockerfile (the trainer's first build downloads torch: about 5 min)"
        local began=$SECONDS
        local mounts=() file
        for file in /etc/ssl/certs/ca-certificates.crt /etc/pip.conf; do
            [[ -f "$file" ]] && mounts+=(-v "$file:$file:ro")
        done
        (cd "$root" && "${buildah[@]}" bud --runtime /usr/sbin/runc --quiet --layers --pull=never --network host \
            "${mounts[@]}" -f "$dockerfile" -t "$ref" . >/dev/null)
        say "built $ref in $((SECONDS - began)) s: $("${buildah[@]}" images --format '{{.Size}}' "$ref")"
    fi
    archive "$name" "$ref"
}

build operator Dockerfile pyproject.toml constraints.txt README.md operator
build trainer trainer_image/Dockerfile pyproject.toml constraints.txt README.md operator/longcat_job operator/longcat_ui trainer_image
