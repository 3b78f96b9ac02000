"""``qmpagent snapshot``: :class:`~qmpagent.snapshot.SnapshotOrchestrator`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Final

from ..snapshot import SnapshotResult
from .command import ADDRESS_HELP, Command
from .exit_codes import ExitCode, exit_code_help
from .orchestrated import (
    THAW_FAILED_HELP,
    OrchestratedOptions,
    add_orchestrated_arguments,
    connected_orchestrator,
)
from .output import PROG, emit_json, err, ms, out, tty

__all__ = ["SNAPSHOT", "SnapshotOptions"]

_PHASES: Final = ("preflight", "prepare", "freeze", "transaction", "thaw", "cleanup")


@dataclasses.dataclass(frozen=True)
class SnapshotOptions(OrchestratedOptions):
    """The options of ``qmpagent snapshot``."""

    mountpoint: list[str] | None


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g, _ = add_orchestrated_arguments(
        p, what="what to snapshot", disk_metavar="NODE=OVERLAY",
        disk_help="block node (or device id) and the new overlay file to create; repeatable, "
        "all disks are switched in one atomic transaction",
        job_timeout_help="each overlay-creating job (default 120)")
    g.add_argument("--mountpoint", action="append", metavar="PATH",
                   help="freeze only this guest filesystem (repeatable; default: all); one the "
                   "guest does not have is refused before anything is frozen")


def _summary(result: SnapshotResult) -> str:
    if result.freeze_owner == "external":
        return ("quiesced by an existing freeze (freeze owner: external); "
                "the guest was left frozen, as it was")
    if result.quiesced:
        resolved = " (a lost freeze reply, resolved)" if result.freeze_resolved else ""
        return (f"quiesced: froze {result.frozen} filesystem(s){resolved}, thawed {result.thawed}; "
                f"freeze window {ms(result.freeze_window)}")
    return f"NOT quiesced (crash-consistent): {result.reason}"


def _print(result: SnapshotResult, disks: dict[str, str]) -> None:
    t = result.timings
    for name in _PHASES:
        seconds = getattr(t, name)
        if seconds or name not in ("freeze", "thaw", "cleanup"):
            out(f"  {name:<12} {ms(seconds):>10}")
    out(f"  {'total':<12} {ms(t.total):>10}")
    out(f"Snapshot taken, {_summary(result)}")
    by_file = {path: node for node, path in result.files.items()}
    for key, path in disks.items():
        node = by_file.get(path, key)
        was = f" (node {node})" if node != key else ""
        out(f"  {key}{was} -> {path} (node {result.overlays.get(node, '?')})")


def _progress(phase: str, seconds: float | None) -> None:
    """A progress line per snapshot phase, on a terminal."""
    if seconds is None:
        err(f"  {phase}...")
    else:
        err(f"  {phase} done in {seconds * 1000:.1f} ms")


async def _run(opts: SnapshotOptions) -> int:
    disks: dict[str, str] = dict(opts.disk)
    if tty(sys.stderr) and not opts.json:
        err(f"snapshot of {', '.join(disks)} (quiesce: {opts.quiesce}, "
            f"freeze timeout {opts.freeze_timeout}s)...")
    async with connected_orchestrator(opts) as orch:
        result = await orch.snapshot(
            disks,
            quiesce=opts.quiesce,
            freeze_timeout=opts.freeze_timeout,
            on_phase=_progress if tty(sys.stderr) and not opts.json else None,
            mountpoints=opts.mountpoint,
        )
    if opts.json:
        emit_json(dataclasses.asdict(result))
    else:
        _print(result, disks)
    return ExitCode.OK


#: ``qmpagent snapshot``.
SNAPSHOT: Command[SnapshotOptions] = Command(
    name="snapshot",
    help="take an atomic, quiesced external snapshot of a running VM's disks",
    description="Take one atomic external snapshot of a running VM's disks: overlays are "
    "created and attached first, then the guest's filesystems are frozen (through the "
    "agent), one QMP transaction switches every disk to its overlay, and the guest is "
    "thawed. Only a freeze this command made is ever thawed; a guest frozen beforehand is "
    "snapshotted as is and left frozen.",
    epilog=f"{ADDRESS_HELP}\n\nquiesce:\n"
    "  required    freeze or take no snapshot at all (exit status 7); the default\n"
    "  preferred   freeze if possible, else take a crash-consistent snapshot and say why\n"
    "  off         never talk to the agent: a crash-consistent snapshot\n\n"
    "example:\n"
    f"  {PROG} snapshot --qmp /run/vm1/qmp.sock --agent /run/vm1/qga.sock \\\n"
    "      --disk disk0=/var/lib/vm1/disk0.snap1.qcow2 --disk disk1=/var/lib/vm1/disk1.snap1.qcow2\n\n"
    f"{exit_code_help()}\n\n{THAW_FAILED_HELP}",
    options=SnapshotOptions,
    run=_run,
    add_arguments=_add_arguments,
)
