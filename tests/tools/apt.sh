# Sourced by the install-*.sh scripts that need Debian packages: `apt_install SCRIPT PACKAGE...`.
#
# A no-op when every package is installed. Otherwise installs them without recommends, waiting for another
# apt run to finish (two installers may run at once), and without letting the packages' maintainer scripts
# start their system-wide services (prometheus on :9090, containerd on its default socket): the tests start
# their own. policy-rc.d is Debian's switch for that; one denying every start exists only while installing.

apt_install() {
    local who="$1"
    shift
    local missing=() package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || { echo "$who: needs apt-get for Debian's ${missing[*]}" >&2; return 1; }
    local policy=/usr/sbin/policy-rc.d added=""
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local lock=(-o DPkg::Lock::Timeout=600)
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
        apt-get "${lock[@]}" update -qq
    fi
    echo "$who: installing Debian's ${missing[*]}"
    local rc=0
    apt-get "${lock[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    [[ -n "$added" ]] && rm -f "$policy"
    return "$rc"
}
