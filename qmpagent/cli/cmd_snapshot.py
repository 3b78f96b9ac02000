"""``qmpagent snapshot``: :class:`~qmpagent.snapshot.SnapshotOrchestrator`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Final, Protocol

from ..agent import AgentAddress
from ..monitor import Monitor
from ..snapshot import SnapshotOrchestrator, SnapshotResult
from . import argtypes
from .argtypes import AGENT_ENV, QMP_ENV, QMPAddress
from .command import ADDRESS_HELP, Command, CommonOptions
from .connect import closing
from .exit_codes import ExitCode, exit_code_help
from .output import PROG, emit_json, err, ms, out, tty

__all__ = ["SNAPSHOT", "OrchestratorFields", "SnapshotOptions", "add_journal_option", "orchestrator"]

_PHASES: Final = ("preflight", "prepare", "freeze", "transaction", "thaw", "cleanup")

#: The timeouts' options: flag, default (seconds), help.
_TIMEOUTS: Final = (
    ("--freeze-timeout", 10.0, "the longest allowed freeze window (default 10)"),
    ("--agent-timeout", 10.0, "each agent command: sync, ping, status, info, freeze (default 10)"),
    ("--thaw-timeout", 30.0, "the thaw, retries included (default 30)"),
    ("--command-timeout", 30.0, "each QMP command outside the freeze window (default 30)"),
    ("--job-timeout", 120.0, "each overlay-creating job (default 120)"),
    ("--connect-timeout", 10.0, "the QMP connect and handshake (default 10)"),
)


class OrchestratorFields(Protocol):
    """The options an orchestrator is made from, shared by ``snapshot`` and ``backup``."""

    @property
    def agent(self) -> AgentAddress | None: ...
    @property
    def agent_timeout(self) -> float: ...
    @property
    def thaw_timeout(self) -> float: ...
    @property
    def command_timeout(self) -> float: ...
    @property
    def job_timeout(self) -> float: ...
    @property
    def agent_chardev(self) -> str | None: ...
    @property
    def journal(self) -> str | None: ...


def orchestrator(mon: Monitor, opts: OrchestratorFields) -> SnapshotOrchestrator:
    """The orchestrator of a ``snapshot`` or ``backup`` command, on ``mon``."""
    return SnapshotOrchestrator(
        mon,
        agent=opts.agent,
        agent_timeout=opts.agent_timeout,
        thaw_timeout=opts.thaw_timeout,
        command_timeout=opts.command_timeout,
        job_timeout=opts.job_timeout,
        agent_chardev=opts.agent_chardev,
        journal_dir=opts.journal,
    )


def add_journal_option(p: argparse.ArgumentParser) -> None:
    """``--journal DIR``: where the operation's crash-safety journal is kept."""
    p.add_argument("--journal", metavar="DIR",
                   help="the crash-safety journal's directory (default $XDG_STATE_HOME/qmpagent); "
                   f"`{PROG} recover` reads it")


@dataclasses.dataclass(frozen=True)
class SnapshotOptions(CommonOptions):
    """The options of ``qmpagent snapshot``."""

    qmp: QMPAddress | None
    agent: AgentAddress | None
    disk: list[tuple[str, str]]
    quiesce: str
    freeze_timeout: float
    agent_timeout: float
    thaw_timeout: float
    command_timeout: float
    job_timeout: float
    connect_timeout: float
    agent_chardev: str | None
    mountpoint: list[str] | None
    journal: str | None

    def usage_problem(self) -> str | None:
        """``--qmp`` is required; no disk may be named twice."""
        if self.qmp is None:
            return f"--qmp is required (or set ${QMP_ENV})"
        nodes = [node for node, _ in self.disk]
        for node in nodes:
            if nodes.count(node) > 1:
                return f"--disk {node}=... given twice"
        return None


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to snapshot")
    argtypes.add_address_option(g, "--qmp", f"QMP socket (${QMP_ENV}); required")
    argtypes.add_address_option(g, "--agent", f"the guest agent's socket (${AGENT_ENV}); needed to quiesce")
    g.add_argument("--disk", type=argtypes.disk, action="append", required=True,
                   metavar="NODE=OVERLAY",
                   help="block node (or device id) and the new overlay file to create; "
                   "repeatable, all disks are switched in one atomic transaction")
    g.add_argument("--quiesce", choices=("required", "preferred", "off"), default="required",
                   help="required (default), preferred or off; see below")
    t = p.add_argument_group("timeouts (seconds)")
    for flag, default, help in _TIMEOUTS:
        t.add_argument(flag, type=argtypes.seconds, default=default, metavar="SECONDS", help=help)
    g.add_argument("--mountpoint", action="append", metavar="PATH",
                   help="freeze only this guest filesystem (repeatable; default: all); one the "
                   "guest does not have is refused before anything is frozen")
    p.add_argument("--agent-chardev", metavar="ID",
                   help="the agent's chardev id, if its port is not org.qemu.guest_agent.0")
    add_journal_option(p)


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
    assert opts.qmp is not None  # SnapshotOptions.usage_problem
    async with closing(await Monitor.connect(
        opts.qmp, timeout=opts.connect_timeout, command_timeout=opts.command_timeout, name="cli"
    )) as mon:
        orch = orchestrator(mon, opts)
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
    f"{exit_code_help()}\n\n"
    "If the exit status is 8 (thaw failed), THE GUEST MAY STILL BE FROZEN: check with\n"
    f"`{PROG} agent --agent ADDR fsfreeze status` and thaw with `... fsfreeze thaw`.",
    options=SnapshotOptions,
    run=_run,
    add_arguments=_add_arguments,
)
