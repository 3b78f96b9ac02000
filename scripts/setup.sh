#!/usr/bin/env bash
# Idempotent set-up on Debian 12 or 13 (as root, or with sudo): the Debian packages the test
# guest is built from, a virtualenv with qmpagent installed editable (with its test tools), and
# the guest. The second run only checks and returns in a few seconds.
#
# QMPAGENT_PEER=debian13 also provisions (once, about a minute) the Debian 13 root whose QEMU
# 10.0 and qemu-ga 10.0 the guest then uses; QMPAGENT_SETUP_APT=always runs the package install
# step even when nothing is missing (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."

# The one list of the host's packages, which qmpagent.testing reads too (comments and blank lines
# dropped).
mapfile -t PACKAGES < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' qmpagent/testing/host-packages.txt)
if [ "${QMPAGENT_PEER:-host}" = debian13 ]; then
    PACKAGES+=(debootstrap)
fi
bash scripts/install-packages.sh "${PACKAGES[@]}"

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

# Build (or find in the cache) the test guest of the chosen peer ($QMPAGENT_PEER, default host).
.venv/bin/qmpagent build-guest >/dev/null
