"""``snapshot(mountpoints=...)``: freezing only some of the guest's filesystems.

``guest-fsfreeze-freeze-list`` ignores a mountpoint the guest does not have (docs/design.md
section 4: it answers 0 for it), so a typo would freeze less than asked, silently. The list is
checked twice: its shape before anything is sent (:func:`check_mountpoints`), and each entry
against the guest's ``guest-get-fsinfo`` before the freeze (:func:`unknown_mountpoints`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import UnknownMountpointError, UsageError

__all__ = ["check_mountpoints", "require_known"]


def check_mountpoints(value: object) -> tuple[str, ...] | None:
    """``value`` as a tuple of mountpoints (None: every filesystem).

    Raises:
        UsageError: not a non-empty sequence of distinct absolute paths (a single string is
            refused: it would be read as a list of characters).
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise UsageError(f"mountpoints must be a non-empty list of paths, not {value!r:.100}")
    result: list[str] = []
    for m in value:
        if not isinstance(m, str) or not m.startswith("/") or "\0" in m:
            raise UsageError(f"a mountpoint must be an absolute path, not {m!r:.100}")
        if m in result:
            raise UsageError(f"mountpoint {m!r} given twice")
        result.append(m)
    return tuple(result)


def require_known(requested: Iterable[str], fsinfo: Sequence[dict[str, object]]) -> None:
    """Raise :class:`~qmpagent.UnknownMountpointError` unless every requested mountpoint is
    one the guest reports (exact match, as qemu-ga compares them)."""
    known = [str(fs.get("mountpoint")) for fs in fsinfo]
    unknown = [m for m in requested if m not in known]
    if unknown:
        raise UnknownMountpointError(unknown, sorted(set(known)))
