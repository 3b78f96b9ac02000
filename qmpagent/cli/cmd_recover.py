"""``qmpagent recover``: :func:`~qmpagent.recover`, after a process that ran a snapshot died."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..agent import AgentAddress
from ..monitor import Monitor
from ..recovery import RecoveryReport, recover
from . import argtypes
from .argtypes import AGENT_ENV, QMP_ENV, QMPAddress
from .command import ADDRESS_HELP, Command, CommonOptions
from .connect import closing
from .exit_codes import ExitCode, exit_code_help
from .output import PROG, emit_json, err, out, tty

__all__ = ["RECOVER", "RecoverOptions"]


@dataclasses.dataclass(frozen=True)
class RecoverOptions(CommonOptions):
    """The options of ``qmpagent recover``."""

    qmp: QMPAddress | None
    agent: AgentAddress | None
    journal: str | None
    timeout: float
    connect_timeout: float
    agent_chardev: str | None

    def usage_problem(self) -> str | None:
        """``--qmp`` is required: the journal's entries are matched to the VM behind it."""
        if self.qmp is None:
            return f"--qmp is required (or set ${QMP_ENV})"
        return None


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to recover")
    argtypes.add_address_option(
        g, "--qmp", f"QMP socket (${QMP_ENV}); required: the same one the snapshot used")
    argtypes.add_address_option(
        g, "--agent", f"the guest agent's socket (${AGENT_ENV}); needed to thaw a freeze of ours")
    g.add_argument("--journal", metavar="DIR",
                   help="the journal directory (default $XDG_STATE_HOME/qmpagent, "
                   "i.e. ~/.local/state/qmpagent)")
    t = p.add_argument_group("timeouts (seconds)")
    t.add_argument("--timeout", type=argtypes.seconds, default=30.0, metavar="SECONDS",
                   help="each QMP and agent command, and waiting for a leftover job (default 30)")
    t.add_argument("--connect-timeout", type=argtypes.seconds, default=10.0, metavar="SECONDS",
                   help="the QMP connect and handshake (default 10)")
    p.add_argument("--agent-chardev", metavar="ID",
                   help="the agent's chardev id, if its port is not org.qemu.guest_agent.0")


def _exit_code(report: RecoveryReport) -> ExitCode:
    # The report says what it means (RecoveryReport.exit_code); the CLI names it.
    return ExitCode(report.exit_code)


async def _run(opts: RecoverOptions) -> int:
    assert opts.qmp is not None  # RecoverOptions.usage_problem
    if tty(sys.stderr) and not opts.json:
        err("looking for operations of ours that did not finish...")
    async with closing(await Monitor.connect(
        opts.qmp, timeout=opts.connect_timeout, command_timeout=opts.timeout, name="cli"
    )) as mon:
        report = await recover(mon, agent=opts.agent, journal_dir=opts.journal,
                               timeout=opts.timeout, agent_chardev=opts.agent_chardev)
    if opts.json:
        emit_json(report.to_dict())
    else:
        out(report.render())
    return _exit_code(report)


#: ``qmpagent recover``.
RECOVER: Command[RecoverOptions] = Command(
    name="recover",
    help="settle what a snapshot whose process died left behind (a freeze, nodes, files)",
    description="Settle the operations of this VM that a dead process left unfinished, from the "
    "journal every snapshot keeps: thaw a freeze of ours still in place (never one that is not "
    "ours), ask QEMU whether the snapshot's transaction was applied, detach the block nodes and "
    "remove the files of ours that are not part of the VM's chain, and remove the journal "
    "entries. The VM ends on a consistent chain: its original images, or the overlays if the "
    "snapshot was taken. Safe to run at any time: when nothing is wrong it changes nothing.",
    epilog=f"{ADDRESS_HELP}\n\n"
    "example:\n"
    f"  {PROG} recover --qmp /run/vm1/qmp.sock --agent /run/vm1/qga.sock\n\n"
    f"{exit_code_help()}\n\n"
    "recover exits 0 when nothing of ours is left (also when nothing was wrong), 1 when\n"
    "something could not be settled (each is listed as UNRESOLVED), and 8 when a freeze of\n"
    "ours may still be in place (THE GUEST MAY STILL BE FROZEN: give --agent and run again).",
    options=RecoverOptions,
    run=_run,
    add_arguments=_add_arguments,
)
