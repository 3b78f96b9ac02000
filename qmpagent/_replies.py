"""Checks on the shape of QMP query replies: QEMU's schema gives each member a type, and a reply
that breaks it is a :class:`~qmpagent.MonitorProtocolError`, not a crash further on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import MonitorProtocolError

__all__ = ["entries", "member"]


def _brief(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def entries(what: str, reply: object) -> list[dict[str, Any]]:
    """A query's reply that must be a list of JSON objects (``what`` names the query)."""
    if not isinstance(reply, list):
        raise MonitorProtocolError(f"{what}: expected a list, got {type(reply).__name__}")
    for entry in reply:
        if not isinstance(entry, dict):
            raise MonitorProtocolError(f"{what}: expected objects in the list, got {_brief(entry)}")
    return reply


def member(
    what: str, obj: Mapping[str, Any], key: str, kind: type, *, required: bool = False
) -> Any:
    """``obj[key]`` if it has the type QEMU's schema gives it; ``None`` if it is absent and
    optional. A ``bool`` is never taken for an ``int``, nor ``null`` for an absent member."""
    if key not in obj:
        if required:
            raise MonitorProtocolError(f"{what}: an entry has no {key!r}: {_brief(obj)}")
        return None
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MonitorProtocolError(
            f"{what}: {key!r} should be {kind.__name__}, got {type(value).__name__} "
            f"in {_brief(obj)}"
        )
    return value
