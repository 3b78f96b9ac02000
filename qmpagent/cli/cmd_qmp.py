"""``qmpagent qmp ACTION``: QMP (:class:`~qmpagent.Monitor`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio

from ..errors import EventOverflow
from ..monitor import Monitor
from . import argtypes
from .argtypes import QMP_ENV, QMPAddress
from .command import (
    Command,
    CommonOptions,
    ExecuteFields,
    Group,
    add_execute_arguments,
    connected,
    shared_default,
)
from .connect import closing
from .exit_codes import ExitCode
from .output import dumps, emit_json, err, out, print_event, tty

__all__ = ["QMP", "QMPOptions"]


@dataclasses.dataclass(frozen=True)
class QMPOptions(CommonOptions):
    """The options of every ``qmp`` action: where QMP is, and how long to wait."""

    qmp: QMPAddress | None
    timeout: float
    connect_timeout: float

    def usage_problem(self) -> str | None:
        """``--qmp`` is required."""
        return f"--qmp is required (or set ${QMP_ENV})" if self.qmp is None else None


def _add_options(parser: argparse.ArgumentParser, leaf: bool) -> None:
    default = shared_default(not leaf)
    g = parser.add_argument_group("QMP connection")
    argtypes.add_address_option(g, "--qmp", f"QMP socket: PATH or HOST:PORT (${QMP_ENV})", default)
    g.add_argument("--timeout", type=argtypes.seconds, metavar="SECONDS", default=default(30.0),
                   help="timeout of each QMP command, and of wait-event (default 30)")
    g.add_argument("--connect-timeout", type=argtypes.seconds, metavar="SECONDS", default=default(10.0),
                   help="timeout of the connect and QMP handshake (default 10)")


@contextlib.asynccontextmanager
async def _monitor(opts: QMPOptions) -> AsyncIterator[Monitor]:
    """The monitor, connected."""
    assert opts.qmp is not None  # QMPOptions.usage_problem
    async with closing(await Monitor.connect(
        opts.qmp, timeout=opts.connect_timeout, command_timeout=opts.timeout, name="cli"
    )) as mon:
        yield mon


@dataclasses.dataclass(frozen=True)
class _ExecuteOptions(QMPOptions, ExecuteFields):
    pass


async def _execute(mon: Monitor, opts: _ExecuteOptions) -> int:
    value = await mon.execute(opts.name, opts.arguments)
    if opts.json:
        emit_json(value)
    else:
        out(dumps(value, pretty=True))
    return ExitCode.OK


@dataclasses.dataclass(frozen=True)
class _EventsOptions(QMPOptions):
    names: list[str]
    duration: float | None
    count: int | None


def _events_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", metavar="EVENT", nargs="*", help="only these events (default: all)")
    p.add_argument("--duration", type=argtypes.seconds, metavar="SECONDS", help="stop after SECONDS")
    p.add_argument("--count", type=argtypes.count, metavar="N", help="stop after N events")


async def _events(mon: Monitor, opts: _EventsOptions) -> int:
    seen = 0
    async with mon.listen(*opts.names) as events:
        if tty(sys.stderr) and not opts.json:
            what = ", ".join(opts.names) or "all"
            until = f"for {opts.duration}s" if opts.duration else "until Ctrl-C"
            err(f"watching {what} events {until}")
        with anyio.move_on_after(opts.duration):
            while opts.count is None or seen < opts.count:
                try:
                    event = await events.get(timeout=None)
                except EventOverflow as exc:
                    err(f"warning: {exc}")
                    continue
                print_event(event, opts.json)
                seen += 1
    return ExitCode.OK


@dataclasses.dataclass(frozen=True)
class _WaitEventOptions(QMPOptions):
    name: str
    match: dict[str, Any] | None


def _wait_event_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="EVENT", help="e.g. SHUTDOWN or VSERPORT_CHANGE")
    p.add_argument("--match", type=argtypes.json_object, metavar="JSON",
                   help="a JSON object the event's data must contain, e.g. '{\"open\": true}'")


async def _wait_event(mon: Monitor, opts: _WaitEventOptions) -> int:
    event = await mon.wait_event(opts.name, match=opts.match, timeout=opts.timeout)
    print_event(event, opts.json)
    return ExitCode.OK


#: ``qmpagent qmp``.
QMP: Group = Group(
    name="qmp",
    help="talk QMP: execute a command, stream events, wait for an event",
    description="Talk to QEMU over QMP.",
    examples=(
        "qmp --qmp /run/vm1/qmp.sock execute query-status",
        "qmp --qmp 127.0.0.1:4444 execute query-block-jobs",
        "qmp --qmp /run/vm1/qmp.sock execute blockdev-del '{\"node-name\": \"ov1\"}'",
        "--json qmp --qmp /run/vm1/qmp.sock events --duration 60 >> events.jsonl",
        "qmp --qmp /run/vm1/qmp.sock wait-event SHUTDOWN --timeout 300",
    ),
    add_options=_add_options,
    actions=(
        Command("execute", "run a QMP command with JSON arguments; print its return value",
                _ExecuteOptions, connected(_monitor, _execute), add_execute_arguments("query-status")),
        Command("events", "print events as they come, until Ctrl-C, --duration or --count",
                _EventsOptions, connected(_monitor, _events), _events_arguments, stop_is_ok=True,
                description="Print QMP events as they arrive: one line each (time, name, data), "
                "or with --json one JSON object per line. Stops on Ctrl-C or SIGTERM (exit 0), "
                "after --duration seconds or after --count events."),
        Command("wait-event", "wait for an event (matching --match); print it",
                _WaitEventOptions, connected(_monitor, _wait_event), _wait_event_arguments,
                description="Wait for the next event NAME whose data contains --match, and print "
                "it. Only events that arrive after the connection are seen. Exit status 5 if "
                "none comes within --timeout."),
    ),
)
