"""Validation of socket addresses, shared by :class:`~qmpagent.Monitor` and
:class:`~qmpagent.GuestAgent`: a malformed address is the caller's mistake and raises
:class:`~qmpagent.UsageError` up front, never ``OverflowError``, ``UnicodeEncodeError`` or
``ValueError`` from deep inside the socket layer (nor, for a path with a NUL in it, a connection to
the wrong socket: the kernel stops a path at its first NUL).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Final

from .errors import UsageError

#: The most bytes an ``AF_UNIX`` address holds (``sizeof(sockaddr_un.sun_path)`` on Linux).
UNIX_PATH_MAX: Final = 108
_U32_MAX: Final = 2**32 - 1


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unix_path(value: Any, what: str) -> str | bytes:
    """A unix socket path (``str``, ``bytes`` or path-like), checked.

    On Linux a leading NUL names a socket in the abstract namespace; anywhere else a NUL is an
    error.

    Raises:
        UsageError: empty, a NUL inside the path, not encodable to bytes, or too long.
    """
    try:
        path: str | bytes = os.fspath(value)
    except TypeError as exc:
        raise UsageError(f"bad {what} {_brief(value)}: not a path") from exc
    if isinstance(path, str):
        try:
            raw = os.fsencode(path)
        except UnicodeError as exc:
            raise UsageError(f"bad {what} {_brief(path)}: not encodable ({exc})") from exc
    else:
        raw = path
    if not raw:
        raise UsageError(f"bad {what}: an empty path")
    abstract = raw[:1] == b"\0" and sys.platform.startswith("linux")
    if b"\0" in (raw[1:] if abstract else raw):
        raise UsageError(f"bad {what} {_brief(path)}: it contains a NUL byte")
    if len(raw) > UNIX_PATH_MAX:
        raise UsageError(
            f"bad {what} {_brief(path)}: {len(raw)} bytes, longer than a unix socket address "
            f"holds ({UNIX_PATH_MAX})"
        )
    return path


def host(value: Any, what: str) -> str:
    """A host name or IP address, checked.

    Raises:
        UsageError: not a non-empty string, a NUL in it, or not encodable as a host name (IDNA).
    """
    if not isinstance(value, str) or not value:
        raise UsageError(f"bad {what} host {_brief(value)}: expected a non-empty string")
    if "\0" in value:
        raise UsageError(f"bad {what} host {_brief(value)}: it contains a NUL")
    try:
        value.encode("idna")  # what the socket module does with a str host
    except UnicodeError as exc:
        raise UsageError(f"bad {what} host {_brief(value)}: {exc}") from exc
    return value


def tcp_port(value: Any, what: str) -> int:
    """A TCP port to connect to: an ``int`` in 1..65535.

    Raises:
        UsageError: anything else (``bool`` included).
    """
    if not _is_int(value) or not 1 <= value <= 65535:
        raise UsageError(f"bad {what} port {_brief(value)}: expected an int in 1..65535")
    return int(value)


def vsock_field(value: Any, name: str, what: str) -> int:
    """A vsock CID or port: an unsigned 32-bit ``int``.

    Raises:
        UsageError: anything else (``bool`` included).
    """
    if not _is_int(value) or not 0 <= value <= _U32_MAX:
        raise UsageError(f"bad {what} vsock {name} {_brief(value)}: expected an int in 0..{_U32_MAX}")
    return int(value)
