"""Reference replies of the real qemu-ga 7.2.22 (Debian 12), shared by the fake's own tests and
the conformance suite. Built independently of the fake's encoder."""

from __future__ import annotations

import json
from collections.abc import Callable

FROZEN = "has been disabled: the agent is in frozen state"


def info_golden(enabled: Callable[[str], bool]) -> bytes:
    """guest-info of the real qemu-ga 7.2.22, built independently of the fake's encoder."""
    names = [
        "get-cpustats", "get-diskstats", "ssh-remove-authorized-keys", "ssh-add-authorized-keys",
        "ssh-get-authorized-keys", "get-devices", "get-osinfo", "get-timezone", "get-users",
        "get-host-name", "exec", "exec-status", "get-memory-block-info", "set-memory-blocks",
        "get-memory-blocks", "set-user-password", "get-fsinfo", "get-disks", "set-vcpus",
        "get-vcpus", "network-get-interfaces", "suspend-hybrid", "suspend-ram", "suspend-disk",
        "fstrim", "fsfreeze-thaw", "fsfreeze-freeze-list", "fsfreeze-freeze", "fsfreeze-status",
        "file-flush", "file-seek", "file-write", "file-read", "file-close", "file-open",
        "shutdown", "info", "set-time", "get-time", "ping", "sync", "sync-delimited",
    ]
    items = []
    for short in names:
        name = "guest-" + short
        no_response = short.startswith("suspend-") or short == "shutdown"
        items.append(
            f'{{"enabled": {json.dumps(enabled(name))}, "name": "{name}", '
            f'"success-response": {json.dumps(not no_response)}}}'
        )
    return (
        '{"return": {"version": "7.2.22", "supported_commands": [' + ", ".join(items) + "]}}\n"
    ).encode()


ALLOWED_WHILE_FROZEN = {
    "guest-ping", "guest-info", "guest-sync", "guest-sync-delimited", "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
}
