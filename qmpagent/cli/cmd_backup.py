"""``qmpagent backup``: :meth:`~qmpagent.SnapshotOrchestrator.backup`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Final

from ..backup import BackupResult
from ..block_jobs import JobProgress
from . import argtypes
from .command import ADDRESS_HELP, Command
from .exit_codes import ExitCode, exit_code_help
from .orchestrated import (
    THAW_FAILED_HELP,
    OrchestratedOptions,
    add_orchestrated_arguments,
    connected_orchestrator,
    repeated,
)
from .output import PROG, emit_json, err, ms, out, tty

__all__ = ["BACKUP", "BackupOptions"]

_PHASES: Final = ("preflight", "prepare", "freeze", "transaction", "thaw", "copy", "cleanup")

@dataclasses.dataclass(frozen=True)
class BackupOptions(OrchestratedOptions):
    """The options of ``qmpagent backup``."""

    since: list[tuple[str, str]] | None
    bitmap: str
    no_bitmap: bool
    state_dir: str | None
    no_fsync: bool
    timeout: float | None

    def usage_problem(self) -> str | None:
        """Those of every such command; no ``--since`` twice, each for a ``--disk``."""
        problem = super().usage_problem() or repeated("--since", self.since or [])
        if problem is not None:
            return problem
        disks = {name for name, _ in self.disk}
        for name, _ in self.since or []:
            if name not in disks:
                return f"--since {name}=... names no --disk"
        if self.since and self.no_bitmap:
            return "--since needs a dirty bitmap: it cannot go with --no-bitmap"
        return None


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g, t = add_orchestrated_arguments(
        p, what="what to back up", disk_metavar="DISK=PATH",
        disk_help="block node (or device id) and the backup file to create (qcow2); "
        "repeatable, all disks start in one atomic transaction",
        job_timeout_help="each target-creating job; a copy without progress this long fails "
        "(default 120)")
    g.add_argument("--since", type=argtypes.disk, action="append", metavar="DISK=PATH",
                   help="an incremental backup of DISK since PATH, its last backup (which "
                   "becomes the new file's backing file); repeatable")
    g.add_argument("--bitmap", default="qmpagent", metavar="NAME",
                   help="the persistent dirty bitmap that tracks changes (default qmpagent)")
    g.add_argument("--no-bitmap", action="store_true",
                   help="track no changes (full backups only; e.g. a raw disk)")
    g.add_argument("--state-dir", metavar="DIR",
                   help="where the last backup of each disk is recorded (default "
                   "$XDG_STATE_HOME/qmpagent-backups)")
    g.add_argument("--no-fsync", action="store_true",
                   help="do not fsync the complete backup files (faster; as qemu-img convert, "
                   "a power loss soon after may lose them)")
    t.add_argument("--timeout", type=argtypes.seconds, default=None, metavar="SECONDS",
                   help="the longest the copy may take (default: none, but see --job-timeout)")


def _summary(result: BackupResult) -> str:
    if result.freeze_owner == "external":
        return ("quiesced by an existing freeze (freeze owner: external); "
                "the guest was left frozen, as it was")
    if result.quiesced:
        return (f"quiesced: froze {result.frozen} filesystem(s), thawed {result.thawed}; "
                f"freeze window {ms(result.freeze_window)}")
    return f"NOT quiesced (crash-consistent): {result.reason}"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _print(result: BackupResult) -> None:
    t = result.timings
    for name in _PHASES:
        seconds = getattr(t, name)
        if seconds or name not in ("freeze", "thaw", "cleanup"):
            out(f"  {name:<12} {ms(seconds):>10}")
    out(f"  {'total':<12} {ms(t.total):>10}")
    out(f"Backup complete, {_summary(result)}")
    for disk, path in result.targets.items():
        kind = f"incremental since {result.since[disk]}" if result.incremental.get(disk) else "full"
        out(f"  {disk} -> {path} ({kind}; {_size(result.bytes_copied.get(disk, 0))} copied)")
    for warning in result.warnings:
        out(f"  warning: {warning}")


class _Progress:
    """Progress lines on a terminal (stderr): the phases, and each disk's copy at most every
    half second."""

    def __init__(self) -> None:
        self._shown: dict[str, float] = {}

    def phase(self, phase: str, seconds: float | None) -> None:
        if seconds is None:
            err(f"  {phase}...")
        else:
            err(f"  {phase} done in {seconds * 1000:.1f} ms")

    def copy(self, disk: str, p: JobProgress) -> None:
        now = time.monotonic()
        done = p.total > 0 and p.current >= p.total
        if not done and now - self._shown.get(disk, 0.0) < 0.5:
            return
        self._shown[disk] = now
        pct = f"{100 * p.current / p.total:5.1f}%" if p.total else "  ?  "
        err(f"    {disk}: {pct} ({_size(p.current)} of {_size(p.total)})")


async def _run(opts: BackupOptions) -> int:
    disks: dict[str, str] = dict(opts.disk)
    since = dict(opts.since) if opts.since else None
    show = tty(sys.stderr) and not opts.json
    progress = _Progress() if show else None
    if show:
        kind = "incremental" if since else "full"
        err(f"{kind} backup of {', '.join(disks)} (quiesce: {opts.quiesce}, "
            f"freeze timeout {opts.freeze_timeout}s)...")
    async with connected_orchestrator(opts) as orch:
        result = await orch.backup(
            disks,
            since=since,
            quiesce=opts.quiesce,
            freeze_timeout=opts.freeze_timeout,
            bitmap=None if opts.no_bitmap else opts.bitmap,
            on_phase=progress.phase if progress is not None else None,
            on_progress=progress.copy if progress is not None else None,
            progress_interval=0.5,
            timeout=opts.timeout,
            state_dir=opts.state_dir,
            durable=not opts.no_fsync,
        )
    if opts.json:
        emit_json(dataclasses.asdict(result))
    else:
        _print(result)
    return ExitCode.OK


#: ``qmpagent backup``.
BACKUP: Command[BackupOptions] = Command(
    name="backup",
    help="back up a running VM's disks (full or incremental), quiesced, frozen only to start",
    description="Back up a running VM's disks: the targets are created and attached first, "
    "then the guest's filesystems are frozen (through the agent), one QMP transaction starts "
    "a copy job per disk (and starts the dirty bitmap that tracks changes), and the guest is "
    "thawed at once; the copy of that point in time runs after the thaw. With --since, only "
    "what changed since that backup is copied, into a qcow2 whose backing file it is. A "
    "failed or interrupted backup removes its files and loses no tracked changes.",
    epilog=f"{ADDRESS_HELP}\n\nquiesce:\n"
    "  required    freeze or take no backup at all (exit status 10); the default\n"
    "  preferred   freeze if possible, else take a crash-consistent backup and say why\n"
    "  off         never talk to the agent: a crash-consistent backup\n\n"
    "examples:\n"
    f"  {PROG} backup --qmp /run/vm1/qmp.sock --agent /run/vm1/qga.sock \\\n"
    "      --disk vblk0=/backups/vm1.full.qcow2\n"
    f"  {PROG} backup --qmp /run/vm1/qmp.sock --agent /run/vm1/qga.sock \\\n"
    "      --disk vblk0=/backups/vm1.inc1.qcow2 --since vblk0=/backups/vm1.full.qcow2\n\n"
    f"{exit_code_help()}\n\n{THAW_FAILED_HELP}",
    options=BackupOptions,
    run=_run,
    add_arguments=_add_arguments,
)
