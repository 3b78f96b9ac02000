"""Checks of a backup chain made by :meth:`qmpagent.SnapshotOrchestrator.backup`, with the
host's (or a peer's) ``qemu-img``: it opens, every image passes ``qemu-img check``, every link
is a qcow2 of one virtual size; and, for the test guest's ext4 data disk, a file read out of
the backup (e.g. the in-guest writer's log) and ``e2fsck -fn`` on it.

Each reads the images with ``-U`` (no lock), so it also works on the backup of a disk QEMU
still has open.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .image import find_tool

__all__ = ["BackupChainReport", "check_backup_chain", "read_backup_file"]


@dataclass(frozen=True)
class BackupChainReport:
    """What :func:`check_backup_chain` found.

    Attributes:
        chain: the images, the one checked first, then its backing files in order.
        formats: each image's format.
        virtual_sizes: each image's virtual size.
        problems: what is wrong, one sentence each (empty: the chain is good).
        check_output: ``qemu-img check``'s output per image.
    """

    chain: tuple[str, ...]
    formats: tuple[str, ...]
    virtual_sizes: tuple[int, ...]
    problems: tuple[str, ...] = ()
    check_output: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No problem found. Raises nothing."""
        return not self.problems


async def _run(argv: Sequence[str]) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def _qemu_img(qemu_img: Sequence[str] | None) -> list[str]:
    return list(qemu_img) if qemu_img is not None else [find_tool("qemu-img")]


async def check_backup_chain(
    path: str | os.PathLike[str],
    *,
    expect_length: int | None = None,
    qemu_img: Sequence[str] | None = None,
) -> BackupChainReport:
    """Check the backup ``path`` and its backing chain (an incremental's previous backups).

    Args:
        path: the newest backup.
        expect_length: how many images the chain must have (1: a full backup), if known.
        qemu_img: the ``qemu-img`` argv prefix (default: the host's; a real guest's
            ``guest.command("qemu-img")`` for its peer's).

    Raises:
        GuestBuildError: ``qemu-img`` is not installed.
    """
    tool = _qemu_img(qemu_img)
    target = os.fspath(path)
    rc, out = await _run([*tool, "info", "-U", "--backing-chain", "--output=json", target])
    if rc != 0:
        return BackupChainReport((target,), (), (), (f"qemu-img info failed: {out.strip()}",))
    try:
        infos: Any = json.loads(out)
    except ValueError:
        return BackupChainReport((target,), (), (), (f"qemu-img info: not JSON: {out[:200]!r}",))
    if isinstance(infos, dict):
        infos = [infos]
    chain = tuple(str(i.get("filename")) for i in infos)
    formats = tuple(str(i.get("format")) for i in infos)
    sizes = tuple(int(i.get("virtual-size", -1)) for i in infos)
    problems = []
    if expect_length is not None and len(chain) != expect_length:
        problems.append(f"the chain has {len(chain)} images, not {expect_length}: {list(chain)}")
    for name, fmt in zip(chain, formats, strict=True):
        if fmt != "qcow2":
            problems.append(f"{name} is {fmt}, not qcow2")
    if len(set(sizes)) > 1:
        problems.append(f"the images' virtual sizes differ: {list(sizes)}")
    outputs = {}
    for name in chain:
        rc, out = await _run([*tool, "check", "-U", name])
        outputs[name] = out
        if rc != 0:
            problems.append(f"qemu-img check {name} failed (exit {rc}): {out.strip()}")
    return BackupChainReport(chain, formats, sizes, tuple(problems), outputs)


async def read_backup_file(
    path: str | os.PathLike[str],
    file: str,
    scratch: str | os.PathLike[str],
    *,
    fsck: bool = True,
    qemu_img: Sequence[str] | None = None,
) -> tuple[str, str | None]:
    """Read ``file`` (a path inside the ext4 filesystem, e.g. ``/writer.log``) out of the
    backup ``path`` (its backing chain followed): the chain converted to raw at ``scratch``
    (removed afterwards), then ``debugfs -R cat``. With ``fsck``, ``e2fsck -fn`` runs on it
    too.

    Returns:
        The file's text, and ``e2fsck``'s output if it found a problem (None: clean, or not
        run).

    Raises:
        GuestBuildError: a tool is not installed.
        RuntimeError: the conversion or the read failed.
    """
    tool = _qemu_img(qemu_img)
    raw = os.fspath(scratch)
    try:
        rc, out = await _run([*tool, "convert", "-U", "-O", "raw", os.fspath(path), raw])
        if rc != 0:
            raise RuntimeError(f"qemu-img convert failed: {out.strip()}")
        proc = await asyncio.create_subprocess_exec(
            find_tool("debugfs"), "-R", f"cat {file}", raw,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        data, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"debugfs failed: {err.decode(errors='replace').strip()}")
        problem = None
        if fsck:
            rc, out = await _run([find_tool("e2fsck"), "-fn", raw])
            problem = None if rc == 0 else out
        return data.decode(errors="replace"), problem
    finally:
        if os.path.exists(raw):
            os.unlink(raw)
