"""What the commands that run an orchestrator operation (``snapshot``, ``backup``, ``export``)
share: their options (the QMP and agent addresses, the disks, ``--quiesce``, the timeouts, the
agent's chardev, the journal), the checks argparse cannot make, and the orchestrator on a
connected monitor."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Final

from ..agent import AgentAddress
from ..monitor import Monitor
from ..snapshot import SnapshotOrchestrator
from . import argtypes
from .argtypes import AGENT_ENV, QMP_ENV, QMPAddress
from .command import CommonOptions
from .connect import closing
from .output import PROG

__all__ = [
    "THAW_FAILED_HELP",
    "OrchestratedOptions",
    "add_orchestrated_arguments",
    "connected_orchestrator",
    "repeated",
]

#: The last lines of each such command's ``--help``.
THAW_FAILED_HELP: Final = (
    "If the exit status is 8 (thaw failed), THE GUEST MAY STILL BE FROZEN: check with\n"
    f"`{PROG} agent --agent ADDR fsfreeze status` and thaw with `... fsfreeze thaw`."
)

#: The timeouts every such command has: flag, default (seconds), help. (``--job-timeout``'s
#: help is the command's own.)
_TIMEOUTS: Final = (
    ("--freeze-timeout", 10.0, "the longest allowed freeze window (default 10)"),
    ("--agent-timeout", 10.0, "each agent command: sync, ping, status, info, freeze (default 10)"),
    ("--thaw-timeout", 30.0, "the thaw, retries included (default 30)"),
    ("--command-timeout", 30.0, "each QMP command outside the freeze window (default 30)"),
    ("--job-timeout", 120.0, None),
    ("--connect-timeout", 10.0, "the QMP connect and handshake (default 10)"),
)


@dataclasses.dataclass(frozen=True)
class OrchestratedOptions(CommonOptions):
    """The options of a command that runs an orchestrator operation; each command's options
    subclass it with their own."""

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
    journal: str | None

    def usage_problem(self) -> str | None:
        """``--qmp`` is required; no disk may be named twice."""
        if self.qmp is None:
            return f"--qmp is required (or set ${QMP_ENV})"
        return repeated("--disk", self.disk)


def repeated(flag: str, pairs: list[tuple[str, str]]) -> str | None:
    """The usage problem of a ``NAME=VALUE`` option that names one NAME twice, or None."""
    names = [name for name, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            return f"{flag} {name}=... given twice"
    return None


def add_orchestrated_arguments(
    p: argparse.ArgumentParser, *, what: str, disk_metavar: str, disk_help: str,
    job_timeout_help: str,
) -> tuple[argparse._ArgumentGroup, argparse._ArgumentGroup]:
    """Add the options of :class:`OrchestratedOptions` to ``p``; returns its two groups (``what``
    to act on, and the timeouts) for the command to add its own options to."""
    g = p.add_argument_group(what)
    argtypes.add_address_option(g, "--qmp", f"QMP socket (${QMP_ENV}); required")
    argtypes.add_address_option(g, "--agent", f"the guest agent's socket (${AGENT_ENV}); needed to quiesce")
    g.add_argument("--disk", type=argtypes.disk, action="append", required=True,
                   metavar=disk_metavar, help=disk_help)
    g.add_argument("--quiesce", choices=("required", "preferred", "off"), default="required",
                   help="required (default), preferred or off; see below")
    t = p.add_argument_group("timeouts (seconds)")
    for flag, default, help in _TIMEOUTS:
        t.add_argument(flag, type=argtypes.seconds, default=default, metavar="SECONDS",
                       help=help if help is not None else job_timeout_help)
    p.add_argument("--agent-chardev", metavar="ID",
                   help="the agent's chardev id, if its port is not org.qemu.guest_agent.0")
    p.add_argument("--journal", metavar="DIR",
                   help="the crash-safety journal's directory (default $XDG_STATE_HOME/qmpagent); "
                   f"`{PROG} recover` reads it")
    return g, t


@contextlib.asynccontextmanager
async def connected_orchestrator(opts: OrchestratedOptions) -> AsyncIterator[SnapshotOrchestrator]:
    """The orchestrator of the command, on a monitor connected to ``--qmp`` (closed after)."""
    assert opts.qmp is not None  # OrchestratedOptions.usage_problem
    async with closing(await Monitor.connect(
        opts.qmp, timeout=opts.connect_timeout, command_timeout=opts.command_timeout, name="cli"
    )) as mon:
        yield SnapshotOrchestrator(
            mon,
            agent=opts.agent,
            agent_timeout=opts.agent_timeout,
            thaw_timeout=opts.thaw_timeout,
            command_timeout=opts.command_timeout,
            job_timeout=opts.job_timeout,
            agent_chardev=opts.agent_chardev,
            journal_dir=opts.journal,
        )
