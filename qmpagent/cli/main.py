"""The command's entry point: the parser built from :data:`COMMANDS`, logging, the signal
handling around the command that runs, and the report of its failure."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, Final

import anyio

from .. import __version__
from .cmd_agent import AGENT
from .cmd_backup import BACKUP
from .cmd_export import EXPORT
from .cmd_guest import BUILD_GUEST, DEMO
from .cmd_lifecycle import CHAIN, COMMIT
from .cmd_qmp import QMP
from .cmd_recover import RECOVER
from .cmd_snapshot import SNAPSHOT
from .command import ADDRESS_HELP, Command, CommonOptions, Formatter, Group, add_common_options
from .exit_codes import ExitCode, exit_code_help
from .failures import report
from .output import PROG, err

__all__ = ["COMMANDS", "build_parser", "main"]

#: The subcommands, in the order ``qmpagent --help`` lists them. A new command is one more entry.
COMMANDS: Final[tuple[Command[Any] | Group, ...]] = (
    AGENT, QMP, SNAPSHOT, BACKUP, EXPORT, CHAIN, COMMIT, RECOVER, DEMO, BUILD_GUEST,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qmpagent`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talk QMP and the QEMU guest agent; take quiesced live snapshots.",
        formatter_class=Formatter,
        epilog=f"{ADDRESS_HELP}\n\n{exit_code_help()}\n\n"
        f"Run `{PROG} COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for unit in COMMANDS:
        unit.add_to(sub)
    return parser


async def _run(command: Command[Any], options: CommonOptions) -> int:
    """Run the command. SIGINT and SIGTERM cancel it once, through an anyio cancel scope, so
    the library's shielded cleanup (the thaw of a freeze of ours) runs to its end; further
    signals are ignored while it cleans up."""
    loop = asyncio.get_running_loop()
    received: list[int] = []
    with anyio.CancelScope() as scope:

        def on_signal(signum: int) -> None:
            received.append(signum)
            if len(received) == 1:
                scope.cancel()
            else:
                err("still cleaning up (a thaw of ours is never skipped); please wait")

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
        try:
            return await command.run(options)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
    # Only reached when the scope caught the cancellation of a signal.
    if command.stop_is_ok:
        return ExitCode.OK
    err("interrupted" if received[0] == signal.SIGINT else "terminated")
    return ExitCode.INTERRUPTED if received[0] == signal.SIGINT else ExitCode.TERMINATED


def _configure_logging(options: CommonOptions) -> None:
    """Errors are reported by :func:`~qmpagent.cli.failures.report`, one line each; the
    library's own log (warnings such as each failed thaw attempt, and progress) only with
    ``-v`` or ``--debug``."""
    if options.debug:
        level, fmt = logging.DEBUG, f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    elif options.verbose:
        level, fmt = logging.INFO, f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    else:
        level, fmt = logging.ERROR, f"{PROG}: %(levelname)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)
    if not options.debug:
        # qemu.qmp logs its own view of connection failures, which we report ourselves.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (an :class:`ExitCode`).

    Raises:
        SystemExit: for ``--help``, ``--version`` and command-line errors (status 2), as argparse.
    """
    args = build_parser().parse_args(argv)
    command: Command[Any] = args.command_unit
    options = command.options.from_namespace(args)
    problem = options.usage_problem()
    if problem is not None:
        parser: argparse.ArgumentParser = args.command_parser
        parser.error(problem)
    _configure_logging(options)
    try:
        return int(asyncio.run(_run(command, options)))
    except KeyboardInterrupt:
        err("interrupted")
        return ExitCode.OK if command.stop_is_ok else ExitCode.INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (`| head`): not our failure; keep Python from complaining at exit.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK
    except Exception as exc:
        return report(exc, as_json=options.json, debug=options.debug,
                      agent=getattr(options, "agent", None))
