# Sourced by the install scripts that build with Go. Go's installer leaves it in /usr/local/go/bin, which only
# an interactive shell's profile puts on PATH: CI runs scripts/test without one, so look there too.
if ! command -v go >/dev/null; then
    for candidate in /usr/local/go/bin "$HOME/go/bin" /usr/lib/go/bin; do
        if [[ -x "$candidate/go" ]]; then
            export PATH="$PATH:$candidate"
            break
        fi
    done
fi
