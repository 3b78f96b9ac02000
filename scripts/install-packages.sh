#!/usr/bin/env bash
# Install the Debian packages qmpagent's test guest is built from, when any is missing: with
# apt-get as root, or through sudo otherwise. Called by scripts/setup.sh.
#
#   scripts/install-packages.sh PACKAGE...
#
# QMPAGENT_SETUP_APT=always runs the install even when every package is present (CI does, so a
# broken install step cannot hide behind a machine that already has the packages).
set -euo pipefail

missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)) && [ "${QMPAGENT_SETUP_APT:-}" != always ]; then
    exit 0
fi
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
else
    echo "setup: all Debian packages present; running the install step anyway (QMPAGENT_SETUP_APT=always)" >&2
fi
# As root, apt-get runs as it is; otherwise through sudo, keeping the environment below.
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "setup: not root and no sudo: install these as root first: apt-get install -y ${missing[*]:-$*}" >&2
        exit 1
    fi
    as_root=(sudo -E)
fi
export DEBIAN_FRONTEND=noninteractive
# The kernel is only used to boot the test guest: skip building a host initramfs for it.
export INITRD=No
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
