"""``qmpagent export``: :meth:`~qmpagent.SnapshotOrchestrator.export` (pull mode, NBD)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
from typing import Any, Final

import anyio

from ..fleece import FleeceResult
from .command import ADDRESS_HELP, Command
from .exit_codes import ExitCode, exit_code_help
from .orchestrated import (
    THAW_FAILED_HELP,
    OrchestratedOptions,
    add_orchestrated_arguments,
    connected_orchestrator,
)
from .output import PROG, emit_json, err, ms, out

__all__ = ["EXPORT", "URIS_ENV", "URI_ENV", "ExportOptions"]

#: The environment of a ``-- COMMAND``: the NBD URI of the only disk (unset for several).
URI_ENV: Final = "QMPAGENT_NBD_URI"
#: The environment of a ``-- COMMAND``: a JSON object, disk -> NBD URI.
URIS_ENV: Final = "QMPAGENT_NBD_URIS"

#: The exit status when ``-- COMMAND`` is not found, or cannot be executed (as a shell's).
_NOT_RUN: Final = 127
_NOT_EXECUTABLE: Final = 126

#: How long a ``-- COMMAND`` may take to exit after SIGTERM (when this command is stopped)
#: before it is killed.
_CHILD_GRACE: Final = 10.0


@dataclasses.dataclass(frozen=True)
class ExportOptions(OrchestratedOptions):
    """The options of ``qmpagent export``."""

    socket: str
    argv: list[str]

    def usage_problem(self) -> str | None:
        """Those of every such command; ``--`` must be followed by a COMMAND."""
        problem = super().usage_problem()
        if problem is None and self.argv == ["--"]:
            return "-- must be followed by a COMMAND to run"
        return problem


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g, _ = add_orchestrated_arguments(
        p, what="what to export", disk_metavar="DISK=IMAGE",
        disk_help="block node (or device id) and its temporary fleecing image (a qcow2 that "
        "must not exist; it holds what the guest overwrites meanwhile, and is removed at the "
        "end); repeatable, all disks in one atomic transaction",
        job_timeout_help="each image-creating job (default 120)")
    g.add_argument("--socket", required=True, metavar="PATH",
                   help="the unix socket of QEMU's NBD server (started here unless one runs)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help=f"run COMMAND with the export open (${URI_ENV}: the only disk's NBD "
                   f"URI; ${URIS_ENV}: all, as JSON), then end the export; its exit status is "
                   "this command's. Without it: serve until Ctrl-C, SIGTERM or the VM's shutdown")


def _print(result: FleeceResult) -> None:
    if result.freeze_owner == "external":
        how = "quiesced by an existing freeze (freeze owner: external); left frozen, as it was"
    elif result.quiesced:
        how = (f"quiesced: froze {result.frozen} filesystem(s), thawed {result.thawed}; "
               f"freeze window {ms(result.freeze_window)}")
    else:
        how = f"NOT quiesced (crash-consistent): {result.reason}"
    out(f"Exported the frozen view, {how}")
    for disk, uri in result.uris.items():
        out(f"  {disk}: {uri}")
    for warning in result.warnings:
        out(f"  warning: {warning}")


def _print_result(result: FleeceResult, as_json: bool) -> None:
    """The result on stdout. If its reader has gone (a closed pipe), COMMAND still runs: our
    stdout (which COMMAND inherits) goes to /dev/null from then on."""
    try:
        if as_json:
            emit_json(dataclasses.asdict(result))
        else:
            _print(result)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


async def _start_child(argv: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    """Start ``argv`` in a process group of its own: a stop of ours reaches every process of
    it (``sh -c 'a && b'`` included), not only the first."""
    group: dict[str, Any] = (
        {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    )
    return await asyncio.create_subprocess_exec(*argv, env=env, **group)


def _signal_group(proc: asyncio.subprocess.Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


async def _run_child(argv: list[str], result: FleeceResult) -> int:
    """Run ``argv`` with the URIs in its environment; its exit status (128 + N if signal N
    ended it; 126 or 127 if it cannot be run). Cancelled (this command was stopped): its
    process group gets SIGTERM, then SIGKILL after :data:`_CHILD_GRACE` seconds."""
    env = dict(os.environ)
    env[URIS_ENV] = json.dumps(result.uris)
    env.pop(URI_ENV, None)
    if len(result.uris) == 1:
        env[URI_ENV] = next(iter(result.uris.values()))
    try:
        proc = await _start_child(argv, env)
    except OSError as exc:
        err(f"cannot run {argv[0]}: {exc.strerror or exc}")
        return _NOT_RUN if isinstance(exc, FileNotFoundError) else _NOT_EXECUTABLE
    try:
        code = await proc.wait()
    except BaseException:
        with anyio.CancelScope(shield=True):
            _signal_group(proc, signal.SIGTERM)
            with anyio.move_on_after(_CHILD_GRACE):
                await proc.wait()
            if proc.returncode is None:
                _signal_group(proc, signal.SIGKILL)
                with anyio.move_on_after(_CHILD_GRACE):  # (a process in uninterruptible I/O)
                    await proc.wait()
        raise
    return 128 - code if code < 0 else code


async def _run(opts: ExportOptions) -> int:
    command = opts.argv[1:] if opts.argv[:1] == ["--"] else list(opts.argv)
    async with (
        connected_orchestrator(opts) as orch,
        # Listening before the export is set up: a shutdown meanwhile is not missed.
        orch.monitor.listen("SHUTDOWN", maxsize=1) as shutdown,
        orch.export(dict(opts.disk), socket=opts.socket, quiesce=opts.quiesce,
                    freeze_timeout=opts.freeze_timeout) as result,
    ):
        _print_result(result, opts.json)
        if command:
            return await _run_child(command, result)
        if not opts.json:
            err("serving until Ctrl-C or SIGTERM (or the VM's shutdown)")
        await shutdown.get(timeout=None)
        err("the VM shut down: ending the export")
    return ExitCode.OK


#: ``qmpagent export``.
EXPORT: Command[ExportOptions] = Command(
    name="export",
    help="export a running VM's disks' frozen view over NBD (pull mode), quiesced",
    description="Export each disk's point-in-time view read-only over QEMU's NBD server, for "
    "an external reader (image fleecing): the fleecing images are created and attached first, "
    "then the guest's filesystems are frozen (through the agent), one QMP transaction starts "
    "the copy-before-write jobs that keep the view, and the guest is thawed at once. The view "
    "stays readable (as a raw image) until COMMAND exits, or until Ctrl-C or SIGTERM; then "
    "the exports, jobs, nodes and images are removed. An open export is not journalled: if "
    "this process dies, it stays in QEMU.",
    epilog=f"{ADDRESS_HELP}\n\nquiesce:\n"
    "  required    freeze or export nothing at all (exit status 10); the default\n"
    "  preferred   freeze if possible, else export a crash-consistent view and say why\n"
    "  off         never talk to the agent: a crash-consistent view\n\n"
    "examples:\n"
    f"  {PROG} export --qmp /run/vm1/qmp.sock --agent /run/vm1/qga.sock \\\n"
    "      --disk vblk0=/var/tmp/vm1.fleece.qcow2 --socket /run/vm1/nbd.sock \\\n"
    f"      -- sh -c 'qemu-img convert -f raw -O qcow2 \"${URI_ENV}\" /backups/vm1.qcow2'\n"
    f"  {PROG} export --qmp /run/vm1/qmp.sock --agent /run/vm1/qga.sock \\\n"
    "      --disk vblk0=/var/tmp/vm1.fleece.qcow2 --socket /run/vm1/nbd.sock   # until Ctrl-C\n\n"
    f"{exit_code_help()}\n"
    "With COMMAND, the exit status is COMMAND's once the export is set up (127: not found,\n"
    "126: not executable). COMMAND runs in a process group of its own: a stop of this\n"
    f"command sends the group SIGTERM, then SIGKILL after 10 s.\n\n{THAW_FAILED_HELP}",
    options=ExportOptions,
    run=_run,
    add_arguments=_add_arguments,
)
