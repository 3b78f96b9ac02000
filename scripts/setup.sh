#!/usr/bin/env bash
# Idempotent set-up on Debian 12 (as root, or with sudo): the Debian packages the test guest is
# built from, a virtualenv with qmpagent installed editable (with its test tools), and the guest.
# The second run only checks and returns in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 qemu-utils qemu-guest-agent busybox-static linux-image-amd64 e2fsprogs)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    # As root, apt-get runs as it is; otherwise through sudo (keeping the environment below).
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo -E)
    export DEBIAN_FRONTEND=noninteractive
    # The kernel is only used to boot the test guest: skip building a host initramfs for it.
    export INITRD=No
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
stamp=.venv/.qmpagent-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing qmpagent and its test tools into .venv" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi

# Build (or find in the cache) the test guest.
.venv/bin/qmpagent build-guest >/dev/null
