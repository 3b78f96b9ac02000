"""What differs between the real ``qemu-ga`` versions the fake agent answers like
(:class:`AgentProfile`), and the command lists and freeze allowlist of each.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AGENT_PROFILES",
    "DEBIAN13_VERSION",
    "DEFAULT_VERSION",
    "FREEZE_ALLOWLIST",
    "AgentProfile",
    "agent_profile",
]

#: The ``version`` the fake reports in ``guest-info`` (the real Debian 12 qemu-ga reports this).
DEFAULT_VERSION: Final = "7.2.22"
#: The version of Debian 13's qemu-ga, the second real peer; ``FakeAgent(version=...)`` with it
#: behaves like that agent where the two differ (see :class:`AgentProfile`).
DEBIAN13_VERSION: Final = "10.0.13"

# qemu-ga 7.2 on Linux: commands in its guest-info order, and whether they answer on success.
REAL_COMMANDS: Final[tuple[tuple[str, bool], ...]] = (
    ("guest-get-cpustats", True),
    ("guest-get-diskstats", True),
    ("guest-ssh-remove-authorized-keys", True),
    ("guest-ssh-add-authorized-keys", True),
    ("guest-ssh-get-authorized-keys", True),
    ("guest-get-devices", True),
    ("guest-get-osinfo", True),
    ("guest-get-timezone", True),
    ("guest-get-users", True),
    ("guest-get-host-name", True),
    ("guest-exec", True),
    ("guest-exec-status", True),
    ("guest-get-memory-block-info", True),
    ("guest-set-memory-blocks", True),
    ("guest-get-memory-blocks", True),
    ("guest-set-user-password", True),
    ("guest-get-fsinfo", True),
    ("guest-get-disks", True),
    ("guest-set-vcpus", True),
    ("guest-get-vcpus", True),
    ("guest-network-get-interfaces", True),
    ("guest-suspend-hybrid", False),
    ("guest-suspend-ram", False),
    ("guest-suspend-disk", False),
    ("guest-fstrim", True),
    ("guest-fsfreeze-thaw", True),
    ("guest-fsfreeze-freeze-list", True),
    ("guest-fsfreeze-freeze", True),
    ("guest-fsfreeze-status", True),
    ("guest-file-flush", True),
    ("guest-file-seek", True),
    ("guest-file-write", True),
    ("guest-file-read", True),
    ("guest-file-close", True),
    ("guest-file-open", True),
    ("guest-shutdown", False),
    ("guest-info", True),
    ("guest-set-time", True),
    ("guest-get-time", True),
    ("guest-ping", True),
    ("guest-sync", True),
    ("guest-sync-delimited", True),
)

# qemu-ga 10.0 on Linux (Debian 13, 10.0.13): two commands more, listed first, and the commands
# Linux does not support (guest-get-devices) are not built in at all since 9.1.
REAL_COMMANDS_10_0: Final[tuple[tuple[str, bool], ...]] = (
    ("guest-network-get-route", True),
    ("guest-get-load", True),
    *(c for c in REAL_COMMANDS if c[0] != "guest-get-devices"),
)

#: Commands qemu-ga 7.2 and 10.0 keep enabled while frozen (qga/main.c ``ga_freeze_allowlist``).
FREEZE_ALLOWLIST: Final = frozenset(
    {
        "guest-ping",
        "guest-info",
        "guest-fsfreeze-status",
        "guest-fsfreeze-thaw",
        "guest-sync",
        "guest-sync-delimited",
    }
)
_FROZEN_REASON: Final = "the agent is in frozen state"
_ALWAYS_BLOCKED: Final = ("guest-get-devices",)  # not supported on Linux: disabled at startup


@dataclass(frozen=True)
class AgentProfile:
    """How one real ``qemu-ga`` version behaves where versions differ (each seen on the real
    agent of that version in the test guest, and checked by the conformance suite).

    Attributes:
        version: the ``guest-info`` version of the real agent this profile was checked against.
        commands: the commands in ``guest-info`` order, and whether they answer on success.
        frozen_reason: the reason in ``"Command X has been disabled: <reason>"`` while frozen.
        blocked_reason: the reason for a command blocked with ``qemu-ga -b`` (None: no reason).
        unsupported: commands listed in ``guest-info`` but disabled from start-up because Linux
            does not support them (7.2); 10.0 does not build them, so they are "not found".
        wraps_glib_errors: a failed ``guest-exec`` says ``Guest agent command failed, error was
            '<glib message>'`` (7.2) rather than the glib message alone (10.0).
        fsinfo_privileged: ``guest-get-fsinfo`` reports ``total-bytes-privileged`` (10.0).
    """

    version: str
    commands: tuple[tuple[str, bool], ...]
    frozen_reason: str
    blocked_reason: str | None
    unsupported: tuple[str, ...]
    wraps_glib_errors: bool
    fsinfo_privileged: bool

    def glib_error(self, message: str) -> str:
        """A failure reported by glib (e.g. spawning a process), as this version words it."""
        return f"Guest agent command failed, error was '{message}'" if self.wraps_glib_errors else message


#: qemu-ga 7.2.22 (Debian 12) and 10.0.13 (Debian 13), by ``major.minor``.
AGENT_PROFILES: Final[Mapping[str, AgentProfile]] = {
    "7.2": AgentProfile(
        DEFAULT_VERSION, REAL_COMMANDS, _FROZEN_REASON, None, _ALWAYS_BLOCKED,
        wraps_glib_errors=True, fsinfo_privileged=False,
    ),
    "10.0": AgentProfile(
        DEBIAN13_VERSION, REAL_COMMANDS_10_0, "the command is not allowed",
        "the command is not allowed", (), wraps_glib_errors=False, fsinfo_privileged=True,
    ),
}


def agent_profile(version: str) -> AgentProfile:
    """The :class:`AgentProfile` for a ``guest-info`` version: its ``major.minor`` if known,
    else the newest known profile at or below it (7.2 for anything older)."""
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:2]) or (0,)

    exact = ".".join(version.split(".")[:2])
    if exact in AGENT_PROFILES:
        return AGENT_PROFILES[exact]
    below = [k for k in AGENT_PROFILES if key(k) <= key(version)]
    return AGENT_PROFILES[max(below, key=key)] if below else AGENT_PROFILES["7.2"]
