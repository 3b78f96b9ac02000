"""Reference replies of the real qemu-ga 7.2.22 (Debian 12) and 10.0.13 (Debian 13), shared by
the fake's own tests and the conformance suite. Built independently of the fake's encoder.

Versions are named by ``major.minor`` ("7.2", "10.0"), as the fakes' profiles are."""

from __future__ import annotations

import json
from collections.abc import Callable

#: The reason of a command refused while frozen, by version (matched by class, never by text, in
#: the library; the fakes reproduce the text).
FROZEN_BY_VERSION = {
    "7.2": "has been disabled: the agent is in frozen state",
    "10.0": "has been disabled: the command is not allowed",
}
FROZEN = FROZEN_BY_VERSION["7.2"]

AGENT_VERSION = {"7.2": "7.2.22", "10.0": "10.0.13"}

_NAMES_7_2 = [
    "get-cpustats", "get-diskstats", "ssh-remove-authorized-keys", "ssh-add-authorized-keys",
    "ssh-get-authorized-keys", "get-devices", "get-osinfo", "get-timezone", "get-users",
    "get-host-name", "exec", "exec-status", "get-memory-block-info", "set-memory-blocks",
    "get-memory-blocks", "set-user-password", "get-fsinfo", "get-disks", "set-vcpus",
    "get-vcpus", "network-get-interfaces", "suspend-hybrid", "suspend-ram", "suspend-disk",
    "fstrim", "fsfreeze-thaw", "fsfreeze-freeze-list", "fsfreeze-freeze", "fsfreeze-status",
    "file-flush", "file-seek", "file-write", "file-read", "file-close", "file-open",
    "shutdown", "info", "set-time", "get-time", "ping", "sync", "sync-delimited",
]
# 10.0: two new commands first; get-devices (unsupported on Linux) is no longer built.
_NAMES = {
    "7.2": _NAMES_7_2,
    "10.0": ["network-get-route", "get-load"] + [n for n in _NAMES_7_2 if n != "get-devices"],
}


def info_golden(enabled: Callable[[str], bool], version: str = "7.2") -> bytes:
    """guest-info of the real qemu-ga of ``version``, built independently of the fake's encoder."""
    items = []
    for short in _NAMES[version]:
        name = "guest-" + short
        no_response = short.startswith("suspend-") or short == "shutdown"
        items.append(
            f'{{"enabled": {json.dumps(enabled(name))}, "name": "{name}", '
            f'"success-response": {json.dumps(not no_response)}}}'
        )
    return (
        f'{{"return": {{"version": "{AGENT_VERSION[version]}", "supported_commands": ['
        + ", ".join(items) + "]}}\n"
    ).encode()


ALLOWED_WHILE_FROZEN = {
    "guest-ping", "guest-info", "guest-sync", "guest-sync-delimited", "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
}
