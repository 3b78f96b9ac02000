"""Files on stable storage: the fsync of a file or a directory, and an atomic, durable write
(a temporary file, fsync, rename over the old one, fsync of the directory). One place for what
the journal, the backup chain records and the backups' targets all need."""

from __future__ import annotations

import contextlib
import os
import secrets

__all__ = ["fsync_path", "write_durably"]


def fsync_path(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Write the file (or, with ``directory``, the directory) ``path`` to stable storage.

    Raises:
        OSError: it cannot be opened, or its fsync failed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(directory: str | os.PathLike[str], name: str, data: bytes) -> None:
    """Write ``directory/name`` atomically and durably (mode 0600): a temporary file beside it,
    fsync, rename over the old one, fsync of the directory.

    Raises:
        OSError: it could not be written (the old file, if any, is still in place).
    """
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(directory, directory=True)
