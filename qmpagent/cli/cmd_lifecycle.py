"""``qmpagent chain`` and ``qmpagent commit``: a disk's backing chain, and merging its overlays
back (:meth:`~qmpagent.SnapshotOrchestrator.chain`, :meth:`~qmpagent.SnapshotOrchestrator.commit`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Final

from ..block_jobs import JobProgress
from ..chain import ChainNode
from ..commit import CommitResult
from ..monitor import Monitor
from ..snapshot import SnapshotOrchestrator
from . import argtypes
from .argtypes import QMP_ENV, QMPAddress
from .command import ADDRESS_HELP, Command, CommonOptions
from .connect import closing
from .exit_codes import ExitCode, exit_code_help
from .output import PROG, emit_json, err, out, size, tty

__all__ = ["CHAIN", "COMMIT", "chain_json"]

_CHAIN_FIELDS: Final = ("node_name", "driver", "format", "filename", "virtual_size", "read_only",
                        "backing_file", "file_node_name", "backing_node_name", "depth")


@dataclasses.dataclass(frozen=True)
class _QMPOptions(CommonOptions):
    qmp: QMPAddress | None
    connect_timeout: float
    command_timeout: float

    def usage_problem(self) -> str | None:
        return super().usage_problem() or (
            f"--qmp is required (or set ${QMP_ENV})" if self.qmp is None else None)


def _qmp_arguments(p: argparse.ArgumentParser) -> None:
    argtypes.add_address_option(p, "--qmp", f"QMP socket (${QMP_ENV}); required")
    p.add_argument("--connect-timeout", type=argtypes.seconds, default=10.0, metavar="SECONDS",
                   help="the QMP connect and handshake (default 10)")
    p.add_argument("--command-timeout", type=argtypes.seconds, default=30.0, metavar="SECONDS",
                   help="each QMP command (default 30)")


async def _connect(opts: _QMPOptions) -> Monitor:
    assert opts.qmp is not None  # usage_problem
    return await Monitor.connect(opts.qmp, timeout=opts.connect_timeout,
                                 command_timeout=opts.command_timeout, name="cli")


# --- chain ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ChainOptions(_QMPOptions):
    disk: str


def _chain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("disk", metavar="DISK", help="a device id (e.g. vblk0) or a block node name")
    _qmp_arguments(p)


def chain_json(chain: list[ChainNode]) -> list[dict[str, Any]]:
    """The chain as ``--json`` prints it: one object per image, active layer first."""
    return [{name: getattr(node, name) for name in _CHAIN_FIELDS} for node in chain]


async def _chain(opts: _ChainOptions) -> int:
    async with closing(await _connect(opts)) as mon:
        chain = await SnapshotOrchestrator(mon, command_timeout=opts.command_timeout).chain(opts.disk)
    if opts.json:
        emit_json(chain_json(chain))
        return ExitCode.OK
    rows = [(str(n.depth), n.node_name, n.format or n.driver, size(n.virtual_size), n.filename)
            for n in chain]
    header = ("#", "NODE", "FORMAT", "SIZE", "FILE")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for i, row in enumerate([header, *rows]):
        note = "  (active)" if i == 1 else "  (base)" if i == len(rows) and i > 1 else ""
        out("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=False)) + "  " + row[4] + note)
    return ExitCode.OK


# --- commit --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CommitOptions(_QMPOptions):
    disk: str
    base: str | None
    delete_files: bool
    timeout: float
    job_timeout: float
    speed: int | None


def _speed(text: str) -> int:
    """Bytes per second, with an optional K/M/G suffix (binary)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    scale = units.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    try:
        value = int(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes per second: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte per second: {text!r}")
    return value


def _commit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk", required=True, metavar="DISK",
                   help="the device id (e.g. vblk0) whose active layer is merged down")
    p.add_argument("--base", metavar="NODE",
                   help="the node to merge into (default: the image directly below the active "
                   "layer; a deeper one only when named, as bases are often shared)")
    p.add_argument("--delete-files", action="store_true",
                   help="delete the merged images' files afterwards")
    p.add_argument("--timeout", type=argtypes.seconds, default=120.0, metavar="SECONDS",
                   help="the longest wait for the job to be ready (default 120)")
    p.add_argument("--job-timeout", type=argtypes.seconds, default=120.0, metavar="SECONDS",
                   help="the pivot once ready (default 120)")
    p.add_argument("--speed", type=_speed, metavar="BYTES",
                   help="limit the copy to BYTES per second (suffix K, M or G)")
    _qmp_arguments(p)


class _Progress:
    """A progress line on a terminal's stderr, at most once a second."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, progress: JobProgress) -> None:
        now = time.monotonic()
        if now - self._last < 1.0 and progress.status not in ("ready", "concluded"):
            return
        self._last = now
        fraction = progress.fraction
        pct = f"{fraction * 100:5.1f}%" if fraction is not None else "    ?"
        err(f"  commit {progress.status:<9} {pct} ({size(progress.current)} of "
            f"{size(progress.total)})")


def _print_commit(res: CommitResult) -> None:
    how = "finished an interrupted commit" if res.resumed else f"merged {res.top} down"
    out(f"Committed {res.device}: {how}; the device runs on {res.active_node} "
        f"({res.duration:.2f}s)")
    out(f"  removed nodes: {', '.join(res.removed_nodes) or 'none'}")
    if res.removed_files:
        out(f"  removed files: {', '.join(res.removed_files)}")
    elif res.merged_files:
        out(f"  merged files kept (not in use any more): {', '.join(res.merged_files)}")


async def _commit(opts: _CommitOptions) -> int:
    show = tty(sys.stderr) and not opts.json
    if show:
        err(f"commit of {opts.disk} into {opts.base or 'the image below its active layer'}...")
    async with closing(await _connect(opts)) as mon:
        orch = SnapshotOrchestrator(mon, command_timeout=opts.command_timeout,
                                    job_timeout=opts.job_timeout)
        res = await orch.commit(opts.disk, base=opts.base, delete_files=opts.delete_files,
                                timeout=opts.timeout, speed=opts.speed,
                                on_progress=_Progress() if show else None)
    if opts.json:
        emit_json(dataclasses.asdict(res))
    else:
        _print_commit(res)
    return ExitCode.OK


#: ``qmpagent chain``.
CHAIN: Command[_ChainOptions] = Command(
    name="chain",
    help="show a disk's backing chain, active layer first",
    description="Show the backing chain of a device (its active layer first) or of a block "
    "node: node names, formats, virtual sizes and files.",
    epilog=f"{ADDRESS_HELP}\n\nexample:\n  {PROG} chain --qmp /run/vm1/qmp.sock vblk0\n\n"
    f"{exit_code_help()}",
    options=_ChainOptions,
    run=_chain,
    add_arguments=_chain_arguments,
)

#: ``qmpagent commit``.
COMMIT: Command[_CommitOptions] = Command(
    name="commit",
    help="merge a disk's active layer back into its base (after a snapshot)",
    description="Merge a running VM's disk's active layer (and every layer between) into the "
    "image below it, or into --base: an active block-commit, completed once ready (the pivot), "
    "checked, and the merged nodes removed (their files too with --delete-files). A failure "
    "leaves the VM on a valid chain and says where; running it again finishes an interrupted "
    "commit.",
    epilog=f"{ADDRESS_HELP}\n\nexample:\n  {PROG} commit --qmp /run/vm1/qmp.sock --disk vblk0 "
    f"--delete-files\n\n{exit_code_help()}",
    options=_CommitOptions,
    run=_commit,
    add_arguments=_commit_arguments,
)
