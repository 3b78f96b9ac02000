"""What the real peer under test ($QMPAGENT_PEER: host or debian13) reports, for real-VM tests
whose expected output names a version. QEMU and qemu-ga of one peer come from one Debian
release, so their major.minor agree; the QEMU binary is asked (never qemu-ga on the host)."""

from __future__ import annotations

import functools
import re
import subprocess

from qmpagent.testing import Guest, get_peer


@functools.cache
def peer_qemu_version() -> tuple[int, int, int]:
    """The version of the peer's ``qemu-system-x86_64`` (``--version``)."""
    peer = get_peer()
    out = subprocess.run(
        [*peer.command("qemu-system-x86_64"), "--version"], capture_output=True, text=True,
        check=True, env=None,
    ).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def agent_version_prefix(guest: Guest | None = None) -> str:
    """``"7.2."`` or ``"10.0."``: how the peer's qemu-ga version begins."""
    major, minor, _ = guest.qemu_version if guest is not None else peer_qemu_version()
    return f"{major}.{minor}."


def frozen_reason(guest: Guest) -> str:
    """How the peer's qemu-ga words a command refused while frozen (class CommandNotFound on
    both: the library matches the class, the tests check the text)."""
    return "the agent is in frozen state" if guest.qemu_version < (9, 1, 0) else "the command is not allowed"


def unsupported_agent_commands(guest: Guest) -> list[str]:
    """Commands the peer's qemu-ga lists but disables on Linux (7.2); 10.0 does not build them."""
    return ["guest-get-devices"] if guest.qemu_version < (9, 1, 0) else []
