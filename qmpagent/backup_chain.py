"""What makes an incremental backup's ``since`` right: the checks, and the record they use.

An incremental backup copies the clusters a persistent dirty bitmap marked since the last
backup *made with that bitmap*. Given any other file as ``since`` (an older backup, another
disk's, a copy), the new qcow2 would sit on a backing file that lacks changes: a silently wrong
backup. QEMU cannot tell (a bitmap records no file name), so qmpagent keeps, per disk image and
bitmap, a small record of the last completed backup (its path and its device and inode) in its
state directory, and refuses a ``since`` that is not that file (:class:`~qmpagent.BackupChainError`).

Before a backup that uses the bitmap starts, the record is marked *pending* (durably: a
temporary file renamed over the old one, then the directory synced); the new backup replaces
it once it completed (the bitmap was reset by then: QEMU's ``on-success`` mode); a backup that
failed or was cancelled (its bitmap merged back, nothing lost) clears the mark. A process that
dies in between leaves the mark: the next incremental is refused until ``recover`` settled the
dead backup (it clears the mark if the job did not complete) or a full backup starts a new
chain. Never a wrong incremental.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .durable import write_durably
from .errors import BackupChainError, UsageError

__all__ = [
    "ChainRecord", "bitmap_info", "check_bitmap_name", "check_since", "clear_pending",
    "default_state_dir", "mark_pending", "qcow2_virtual_size", "read_record", "write_record",
]

_QCOW2_MAGIC: Final = b"QFI\xfb"
_FORMAT: Final = 1


def default_state_dir() -> str:
    """``$XDG_STATE_HOME/qmpagent-backups`` (else ``~/.local/state/qmpagent-backups``): where
    the records of the last backups are kept, next to (never inside: its files are all
    journal entries) the journal's ``qmpagent`` directory. Raises nothing."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "qmpagent-backups")


@dataclass(frozen=True, slots=True)
class ChainRecord:
    """The last completed backup of one disk image made with one bitmap.

    Attributes:
        disk_file: the disk's image file (as QEMU names it).
        bitmap: the dirty bitmap's name.
        target: the backup file.
        dev: its ``st_dev``.
        ino: its ``st_ino``.
        virtual_size: the disk's virtual size when it was made.
        pending: the target of a backup with this bitmap that started and has not finished
            (None: none). While it is set, no incremental is allowed: had that backup's job
            completed (the bitmap reset) without the record following, an incremental since
            ``target`` would miss changes.
    """

    disk_file: str
    bitmap: str
    target: str
    dev: int
    ino: int
    virtual_size: int
    pending: str | None = None


def _record_path(state_dir: str, disk_file: str, bitmap: str) -> str:
    key = hashlib.sha256(f"{disk_file}\0{bitmap}".encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return os.path.join(state_dir, f"chain-{key}.json")


def read_record(state_dir: str, disk_file: str, bitmap: str) -> ChainRecord | None:
    """The record of ``disk_file``'s last backup with ``bitmap``, or None (none, or unreadable:
    then no incremental is allowed, which is the safe side). Raises nothing."""
    try:
        with open(_record_path(state_dir, disk_file, bitmap), encoding="utf-8") as f:
            raw: Any = json.load(f)
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
            return None
        rec = ChainRecord(
            disk_file=raw["disk_file"], bitmap=raw["bitmap"], target=raw["target"],
            dev=raw["dev"], ino=raw["ino"], virtual_size=raw["virtual_size"],
            pending=raw.get("pending"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if rec.disk_file != disk_file or rec.bitmap != bitmap:
        return None  # a hash collision, or a foreign file
    numbers = (rec.dev, rec.ino, rec.virtual_size)
    fields_ok = all(isinstance(v, int) and not isinstance(v, bool) for v in numbers)
    texts_ok = isinstance(rec.target, str) and isinstance(rec.pending, (str, type(None)))
    return rec if fields_ok and texts_ok else None


def mark_pending(state_dir: str, disk_file: str, bitmap: str, target: str, virtual_size: int) -> None:
    """Record, durably and before the backup starts, that a backup into ``target`` is under
    way: no incremental is allowed until it completed (:func:`write_record`) or was undone
    with its bitmap intact (:func:`clear_pending`).

    Raises:
        OSError: it could not be written.
    """
    rec = read_record(state_dir, disk_file, bitmap)
    if rec is None:
        rec = ChainRecord(disk_file, bitmap, "", 0, 0, virtual_size)
    write_record(state_dir, dataclasses.replace(rec, pending=target))


def clear_pending(state_dir: str, disk_file: str, bitmap: str, target: str) -> None:
    """The backup into ``target`` did not complete and its bitmap lost nothing (QEMU merged
    the writes back): the record of the last completed backup holds again.

    Raises:
        OSError: it could not be written.
    """
    rec = read_record(state_dir, disk_file, bitmap)
    if rec is None or rec.pending != target:
        return
    if not rec.target:  # no completed backup before this one
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_record_path(state_dir, disk_file, bitmap))
        return
    write_record(state_dir, dataclasses.replace(rec, pending=None))


def write_record(state_dir: str, record: ChainRecord) -> None:
    """Write ``record`` durably (:func:`~qmpagent.durable.write_durably`).

    Raises:
        OSError: it could not be written (the old record, if any, is still in place).
    """
    path = _record_path(state_dir, record.disk_file, record.bitmap)
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    data = json.dumps({"format": _FORMAT, **dataclasses.asdict(record)})
    write_durably(directory, os.path.basename(path), data.encode())


def qcow2_virtual_size(path: str) -> int | None:
    """The virtual size in a qcow2 header, or None if ``path`` is not a qcow2 image.

    Raises:
        OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        header = f.read(32)
    if len(header) < 32 or header[:4] != _QCOW2_MAGIC:
        return None
    size: int = struct.unpack(">Q", header[24:32])[0]
    return size


def bitmap_info(node_raw: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    """The ``dirty-bitmaps`` entry ``name`` of a ``query-named-block-nodes`` entry, or None.
    Raises nothing."""
    bitmaps = node_raw.get("dirty-bitmaps")
    if not isinstance(bitmaps, list):
        return None
    for bm in bitmaps:
        if isinstance(bm, Mapping) and bm.get("name") == name:
            return bm
    return None


def check_since(
    disk: str,
    since: str,
    *,
    node_raw: Mapping[str, Any],
    disk_file: str,
    virtual_size: int,
    bitmap: str,
    state_dir: str,
) -> None:
    """Refuse (:class:`~qmpagent.BackupChainError`) a ``since`` that does not match the disk:
    see the module docstring. Reads only; raises nothing else."""
    def refuse(why: str) -> BackupChainError:
        return BackupChainError(disk, since, why)

    try:
        st = os.stat(since)
        size = qcow2_virtual_size(since)
    except FileNotFoundError:
        raise refuse("the file does not exist") from None
    except (OSError, ValueError) as exc:
        raise refuse(f"the file cannot be read ({exc})") from None
    if size is None:
        raise refuse("the file is not a qcow2 image")
    if size != virtual_size:
        raise refuse(f"its virtual size is {size} bytes, the disk's is {virtual_size}")
    bm = bitmap_info(node_raw, bitmap)
    if bm is None:
        raise refuse(f"the disk has no dirty bitmap {bitmap!r} (no full backup with this bitmap yet?)")
    if bm.get("persistent") is False:
        raise refuse(f"the dirty bitmap {bitmap!r} is not persistent")
    if bm.get("inconsistent") is True:
        raise refuse(f"the dirty bitmap {bitmap!r} is inconsistent (QEMU did not close the image cleanly)")
    if bm.get("busy") is True:
        raise refuse(f"the dirty bitmap {bitmap!r} is in use by another operation (a backup running?)")
    if bm.get("recording") is False:
        raise refuse(f"the dirty bitmap {bitmap!r} is disabled (it has not recorded every write)")
    rec = read_record(state_dir, disk_file, bitmap)
    if rec is not None and rec.pending is not None:
        raise refuse(
            f"a backup with the bitmap {bitmap!r} into {rec.pending} did not finish (its process "
            "died?), so the bitmap may have been reset after it: run qmpagent recover"
        )
    if rec is None or not rec.target:
        raise refuse(
            f"no record of a backup made with the bitmap {bitmap!r} in {state_dir} (made by another "
            "tool, or the state directory was lost)"
        )
    if (rec.dev, rec.ino) != (st.st_dev, st.st_ino):
        raise refuse(f"it is not the last backup made with the bitmap {bitmap!r}, which is {rec.target}")


def check_bitmap_name(bitmap: object) -> str | None:
    """``bitmap`` as given to ``backup()``: a non-empty name QEMU can take, or None.

    Raises:
        UsageError: anything else.
    """
    if bitmap is None:
        return None
    if not isinstance(bitmap, str) or not bitmap or len(bitmap) > 1023 or "\0" in bitmap:
        raise UsageError(f"bitmap must be a non-empty name (at most 1023 characters) or None, not {bitmap!r}")
    try:
        bitmap.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"bitmap is not valid Unicode: {bitmap!r}") from None
    return bitmap
