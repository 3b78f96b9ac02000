"""scripts/install-packages.sh, the install step of the README's commands, run with stub
``dpkg-query``, ``apt-get``, ``id`` and ``sudo`` on PATH: as root without sudo (a fresh Debian
machine), as a user with sudo, as a user without it, and with nothing missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install-packages.sh"


def _stub(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


def run_install(
    tmp_path: Path, *, uid: int, installed: set[str], sudo: bool, always: bool = False
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    _stub(bindir, "id", f'[ "$1" = -u ] && echo {uid}')
    _stub(bindir, "dpkg-query", "\n".join(
        ['for p; do :; done  # the package is the last argument', 'case "$p" in']
        + [f'  {p}) printf "install ok installed"; exit 0 ;;' for p in sorted(installed)]
        + ["esac", "exit 1"]
    ))
    _stub(bindir, "apt-get", f'echo "apt-get $* INITRD=$INITRD FRONTEND=$DEBIAN_FRONTEND" >> {calls}')
    if sudo:
        _stub(bindir, "sudo", f'echo "sudo $1" >> {calls}; shift; exec "$@"')
    # Only the stubs and what the script itself needs (bash, grep) are on PATH.
    for tool in ("grep", "bash"):
        (bindir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    env = {"PATH": str(bindir), "HOME": str(tmp_path)}
    if always:
        env["QMPAGENT_SETUP_APT"] = "always"
    proc = subprocess.run(
        [str(bindir / "bash"), str(SCRIPT), "qemu-utils", "busybox-static"],
        env=env, capture_output=True, text=True, check=False,
    )
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc, lines


def test_as_root_without_sudo_runs_apt_get_itself(tmp_path: Path) -> None:
    proc, calls = run_install(tmp_path, uid=0, installed={"qemu-utils"}, sudo=False)
    assert proc.returncode == 0, proc.stderr
    assert "installing Debian packages: busybox-static" in proc.stderr
    assert calls == [
        "apt-get update -qq INITRD=No FRONTEND=noninteractive",
        "apt-get install -y -qq --no-install-recommends qemu-utils busybox-static "
        "INITRD=No FRONTEND=noninteractive",
    ]


def test_as_a_user_with_sudo_goes_through_sudo_keeping_the_environment(tmp_path: Path) -> None:
    proc, calls = run_install(tmp_path, uid=1000, installed=set(), sudo=True)
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == "sudo -E"
    assert calls[1] == "apt-get update -qq INITRD=No FRONTEND=noninteractive"
    assert calls[2] == "sudo -E"
    assert calls[3].startswith("apt-get install -y -qq --no-install-recommends qemu-utils busybox-static")


def test_as_a_user_without_sudo_says_what_to_run(tmp_path: Path) -> None:
    proc, calls = run_install(tmp_path, uid=1000, installed=set(), sudo=False)
    assert proc.returncode == 1 and calls == []
    assert "not root and no sudo" in proc.stderr and "qemu-utils busybox-static" in proc.stderr


def test_nothing_missing_installs_nothing(tmp_path: Path) -> None:
    proc, calls = run_install(tmp_path, uid=0, installed={"qemu-utils", "busybox-static"}, sudo=False)
    assert proc.returncode == 0 and calls == [] and proc.stderr == ""


@pytest.mark.parametrize("uid", [0, 1000])
def test_always_runs_the_install_step_even_with_everything_present(tmp_path: Path, uid: int) -> None:
    # What CI does, so that a broken install step fails CI on a machine that has the packages.
    proc, calls = run_install(
        tmp_path, uid=uid, installed={"qemu-utils", "busybox-static"}, sudo=True, always=True
    )
    assert proc.returncode == 0, proc.stderr
    apt = [c for c in calls if c.startswith("apt-get")]
    assert len(apt) == 2 and "install -y" in apt[1]
    assert ("sudo -E" in calls) == (uid != 0)


def test_setup_script_uses_the_install_step() -> None:
    text = (SCRIPT.parent / "setup.sh").read_text()
    assert "scripts/install-packages.sh" in text
    assert os.access(SCRIPT, os.X_OK)
