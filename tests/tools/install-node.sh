#!/usr/bin/env bash
# Installs what a real node of the test cluster runs besides the kubelet (built by install-k8s.sh): Debian's
# containerd, runc and CNI plugins (bridge, host-local, loopback, portmap), iptables for kube-proxy, and the
# image tools buildah and mmdebstrap (tests/tools/build-images.sh). A fast no-op when they are installed.
#
# The e2e tests (tests/test_e2e.py) need them; elsewhere nothing uses them. Debian 12's containerd 1.6 and
# runc 1.1 are known to work here; crun is not (cgroup v1 in the hybrid layout).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=apt.sh
source "$here/apt.sh"

apt_install install-node containerd runc containernetworking-plugins iptables buildah mmdebstrap
