"""Checks of an operation's arguments, before anything is sent: a number of seconds, a quiesce
mode, and the paths of the new images an operation is to create (snapshot overlays, backup
targets, fleecing images): text QEMU can take, absolute, not existing yet, no two one file.

Each failure is a :class:`~qmpagent.UsageError`, the caller's mistake.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping

from .errors import UsageError
from .snapshot_types import Quiesce

__all__ = ["check_absent", "new_image_paths", "overlay_path", "path_identities", "quiesce_mode", "seconds"]


def seconds(name: str, value: object) -> float:
    """``value`` as a positive, finite number of seconds, or UsageError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a positive number of seconds, not {value!r}")
    try:
        number = float(value)
    except (OverflowError, ValueError):
        raise UsageError(f"{name} must be a positive finite number of seconds, not {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise UsageError(f"{name} must be a positive finite number of seconds, not {value!r}")
    return number


def overlay_path(key: str, value: object) -> str:
    """Static checks of an overlay path (no file system access): text QEMU can take (UTF-8, no
    NUL), absolute, naming a file. UsageError otherwise."""
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"bad disk entry {key!r}: {value!r} (expected str: path)")
    try:
        path = os.fspath(value)
    except TypeError as exc:
        raise UsageError(f"bad overlay path for {key!r}: {exc}") from None
    if not isinstance(path, str):
        raise UsageError(f"overlay path for {key!r} must be text, not {type(path).__name__}")
    if "\0" in path:
        raise UsageError(f"overlay path for {key!r} contains a NUL byte: {path!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"overlay path for {key!r} is not valid Unicode (a lone surrogate?): {path!r}"
        ) from None
    if not os.path.isabs(path):
        raise UsageError(f"overlay path must be absolute: {path!r}")
    if os.path.basename(path) in ("", ".", ".."):
        raise UsageError(f"overlay path must name a file: {path!r}")
    return path


def path_identities(path: str) -> set[tuple[object, ...]]:
    """What makes two overlay paths one file (the files do not exist yet): the same basename in
    the same directory, by its real path (``.``, ``..``, ``//`` and symlinks resolved) and, when
    it exists, by its device and inode (bind mounts)."""
    parent, base = os.path.split(path)
    try:
        ids: set[tuple[object, ...]] = {("path", os.path.realpath(parent), base)}
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot resolve the directory of overlay path {path!r}: {exc}") from None
    try:
        st = os.stat(parent)
    except (OSError, ValueError):
        pass  # no such directory: QEMU will fail to create the file, and say so
    else:
        ids.add(("inode", st.st_dev, st.st_ino, base))
    return ids


def new_image_paths(
    images: object, *, empty: str, entry: str, kind: str, nonempty_keys: bool = False
) -> dict[str, str]:
    """The checked paths of the images an operation is to create (overlays, backup targets,
    fleecing images): each a new file, none the same file as another's; UsageError otherwise.
    ``empty`` is the message for a mapping that is not one or is empty, ``entry`` and ``kind``
    name an entry and its file in the others; ``nonempty_keys``: an empty key is a bad entry
    too."""
    if not isinstance(images, Mapping) or not images:
        raise UsageError(empty)
    paths: dict[str, str] = {}
    seen: set[tuple[object, ...]] = set()
    for key, path in images.items():
        if not isinstance(key, str) or (nonempty_keys and not key):
            raise UsageError(f"bad {entry} entry {key!r}: {path!r} (expected str: path)")
        paths[key] = checked = overlay_path(key, path)
        ids = path_identities(checked)
        if ids & seen:
            raise UsageError(f"{kind} {checked!r} is the same file as another disk's {kind}")
        seen |= ids
        check_absent(checked)
    return paths


def check_absent(path: str) -> None:
    """UsageError unless ``path`` is known not to exist (never overwrite a file)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot check overlay path {path!r}: {exc}") from None
    raise UsageError(f"overlay file {path} already exists; refusing to overwrite it")


def quiesce_mode(value: Quiesce | str) -> Quiesce:
    """``value`` as a :class:`Quiesce`, or UsageError."""
    try:
        return Quiesce(value)
    except ValueError:
        raise UsageError(f"quiesce must be one of required, preferred, off; not {value!r}") from None
