# Sourced by scripts/demo and scripts/test: makes a fresh Linux machine ready.
# Idempotent and quiet when nothing is missing: Debian packages (as root, only
# the missing ones, one `apt-get update` first), a virtual environment in .venv,
# and the project installed into it with its test extra.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DEBIAN_PACKAGES=(nftables iproute2 tcpdump nginx-light wrk procps redis-server shellcheck nghttp2-client)
# Commands that tell whether each package above is present.
DEBIAN_PROBES=(/usr/sbin/nft /usr/sbin/ip /usr/bin/tcpdump /usr/sbin/nginx /usr/bin/wrk /usr/bin/pgrep /usr/bin/redis-server /usr/bin/shellcheck /usr/bin/h2load)

missing=()
for i in "${!DEBIAN_PACKAGES[@]}"; do
    [ -x "${DEBIAN_PROBES[$i]}" ] || missing+=("${DEBIAN_PACKAGES[$i]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    else
        echo "bootstrap: missing ${missing[*]} (not root: tests that need them will skip)" >&2
    fi
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv" >&2
    "$PY" -m venv .venv
fi
stamp=".venv/.pyambient-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "bootstrap: installing pyambient and its test extra into .venv" >&2
    log=".venv/pip-install.log"
    if ! { .venv/bin/python -m pip install -q --upgrade pip &&
           .venv/bin/python -m pip install -q -e '.[test]'; } >"$log" 2>&1; then
        cat "$log" >&2
        echo "bootstrap: pip install failed (log above, also in $log)" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
export PATH="$ROOT/.venv/bin:$PATH"
