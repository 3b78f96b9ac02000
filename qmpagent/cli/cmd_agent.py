"""``qmpagent agent ACTION``: the guest agent (:class:`~qmpagent.GuestAgent`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from ..agent import AgentAddress, AgentInfo, ExecResult, GuestAgent
from ..errors import AgentUnavailable, MonitorTimeout
from ..monitor import Monitor
from . import argtypes
from .argtypes import AGENT_ENV, QMP_ENV, QMPAddress
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
from .output import PROG, WIDTH, dumps, emit_json, err, ms, out, size

__all__ = ["AGENT", "AgentOptions"]


@dataclasses.dataclass(frozen=True)
class AgentOptions(CommonOptions):
    """The options of every ``agent`` action: where the agent is, and how long to wait."""

    agent: AgentAddress | None
    qmp: QMPAddress | None
    timeout: float
    wait_port: float | None

    def usage_problem(self) -> str | None:
        """``--agent`` is required; ``--wait-port`` needs ``--qmp``."""
        if self.agent is None:
            return f"--agent is required (or set ${AGENT_ENV})"
        if self.wait_port is not None and self.qmp is None:
            return f"--wait-port needs --qmp (or ${QMP_ENV})"
        return None


def _add_options(parser: argparse.ArgumentParser, leaf: bool) -> None:
    default = shared_default(not leaf)
    g = parser.add_argument_group("agent connection")
    argtypes.add_address_option(
        g, "--agent", f"the agent's socket: PATH, HOST:PORT or vsock:CID:PORT (${AGENT_ENV})", default
    )
    argtypes.add_address_option(
        g, "--qmp", "QMP socket: if given, first check that the agent's port is open in the "
        f"guest, so a stopped qemu-ga fails fast (${QMP_ENV})", default
    )
    g.add_argument("--timeout", type=argtypes.seconds, metavar="SECONDS", default=default(5.0),
                   help="timeout of the connect, the sync and each agent command (default 5)")
    g.add_argument("--wait-port", type=argtypes.seconds, metavar="SECONDS", default=default(None),
                   help="with --qmp: wait up to SECONDS for the agent's port to open (a booting "
                   "guest) instead of failing at once")


async def _check_agent_port(opts: AgentOptions) -> None:
    """With ``--qmp``: check (or, with ``--wait-port``, wait) that the guest has the agent's
    virtio-serial port open before sending the agent anything."""
    assert opts.qmp is not None
    async with closing(await Monitor.connect(
        opts.qmp, timeout=opts.timeout, command_timeout=opts.timeout, name="cli"
    )) as mon:
        if opts.wait_port is not None:
            try:
                await mon.wait_agent_port(timeout=opts.wait_port)
            except MonitorTimeout as exc:
                raise AgentUnavailable(
                    f"the guest agent's port did not open in the guest within {opts.wait_port}s "
                    "(qemu-ga not running)"
                ) from exc
        elif not await mon.agent_port_open():
            raise AgentUnavailable(
                "the guest agent is not running: its virtio-serial port is closed in the guest"
            )


@contextlib.asynccontextmanager
async def _agent(opts: AgentOptions) -> AsyncIterator[GuestAgent]:
    """The agent, connected (after the port check with --qmp)."""
    if opts.qmp is not None:
        await _check_agent_port(opts)
    assert opts.agent is not None  # AgentOptions.usage_problem
    async with closing(await GuestAgent.connect(opts.agent, timeout=opts.timeout)) as ga:
        yield ga


async def _ping(ga: GuestAgent, opts: AgentOptions) -> int:
    started = time.perf_counter()
    await ga.ping()
    elapsed = time.perf_counter() - started
    if opts.json:
        emit_json({"ok": True, "seconds": elapsed})
    else:
        out(f"ok: the guest agent answers ({ms(elapsed)})")
    return ExitCode.OK


def _print_info(info: AgentInfo) -> None:
    cmds = info.commands
    disabled = sorted(c.name for c in cmds.values() if not c.enabled)
    out(f"qemu-ga {info.version}: {len(cmds)} commands, {len(cmds) - len(disabled)} enabled")
    if disabled:
        out(f"disabled: {', '.join(disabled)}")
    names = sorted(cmds)
    width = max((len(n) for n in names), default=0) + 2
    columns = max(1, (WIDTH - 2) // width)
    rows = -(-len(names) // columns)
    for r in range(rows):
        out("  " + "".join(f"{n:<{width}}" for n in names[r::rows]).rstrip())


async def _info(ga: GuestAgent, opts: AgentOptions) -> int:
    info = await ga.info()
    if opts.json:
        emit_json(dict(info))
    else:
        _print_info(info)
    return ExitCode.OK


@dataclasses.dataclass(frozen=True)
class _FsfreezeOptions(AgentOptions):
    op: str
    mountpoint: list[str] | None

    def usage_problem(self) -> str | None:
        problem = super().usage_problem()
        if problem is None and self.mountpoint and self.op != "freeze":
            return "--mountpoint applies to freeze only"
        return problem


def _fsfreeze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("op", choices=("status", "freeze", "thaw"), help="status, freeze or thaw")
    p.add_argument("--mountpoint", action="append", metavar="PATH",
                   help="freeze only this mountpoint (repeatable; guest-fsfreeze-freeze-list)")


async def _fsfreeze(ga: GuestAgent, opts: _FsfreezeOptions) -> int:
    if opts.op == "status":
        status = await ga.fsfreeze_status()
        if opts.json:
            emit_json({"status": status.value})
        else:
            out(status.value)
    elif opts.op == "freeze":
        n = await ga.fsfreeze_freeze(opts.mountpoint or None)
        if opts.json:
            emit_json({"frozen": n})
        elif n:
            out(f"froze {n} filesystem(s); they stay frozen until `{PROG} agent fsfreeze thaw`")
        else:
            out("froze 0 filesystems (nothing to freeze, or frozen already by another tool)")
    else:
        n = await ga.fsfreeze_thaw()
        if opts.json:
            emit_json({"thawed": n})
        else:
            out(f"thawed {n} filesystem(s)")
    return ExitCode.OK


@dataclasses.dataclass(frozen=True)
class _ExecOptions(AgentOptions):
    env: list[str] | None
    stdin: bool
    exec_timeout: float
    path: str
    args: list[str]


def _exec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="an environment entry for the program (repeatable)")
    p.add_argument("--stdin", action="store_true", help="pass our standard input to the program")
    p.add_argument("--exec-timeout", type=argtypes.seconds, metavar="SECONDS", default=60.0,
                   help="how long the program may run (default 60); it is not killed after")
    p.add_argument("path", metavar="PATH", help="the program, e.g. /bin/sh")
    p.add_argument("args", metavar="ARG", nargs=argparse.REMAINDER, help="its arguments")


def _exec_json(res: ExecResult) -> dict[str, Any]:
    return {
        "pid": res.pid,
        "exitcode": res.exitcode,
        "signal": res.signal,
        "stdout": res.stdout.decode("utf-8", "replace"),
        "stderr": res.stderr.decode("utf-8", "replace"),
        "stdout_truncated": res.stdout_truncated,
        "stderr_truncated": res.stderr_truncated,
    }


async def _exec(ga: GuestAgent, opts: _ExecOptions) -> int:
    input_data = sys.stdin.buffer.read() if opts.stdin else None
    res = await ga.exec(
        opts.path, opts.args, env=opts.env, input_data=input_data, timeout=opts.exec_timeout
    )
    if opts.json:
        emit_json(_exec_json(res))
    else:
        sys.stdout.buffer.write(res.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(res.stderr)
        sys.stderr.flush()
    for name, truncated in (("stdout", res.stdout_truncated), ("stderr", res.stderr_truncated)):
        if truncated:
            err(f"warning: the agent truncated the program's {name}")
    if res.ok:
        return ExitCode.OK
    how = f"was killed by signal {res.signal}" if res.signal is not None else (
        f"exited with status {res.exitcode}"
    )
    err(f"error: {opts.path} (pid {res.pid} in the guest) {how}")
    return ExitCode.COMMAND_ERROR


async def _osinfo(ga: GuestAgent, opts: AgentOptions) -> int:
    info = await ga.get_osinfo()
    if opts.json:
        emit_json(info)
    else:
        width = max((len(k) for k in info), default=0)
        for key, value in info.items():
            out(f"{key + ':':<{width + 1}} {value}")
    return ExitCode.OK


def _fs_disks(fs: dict[str, Any]) -> str:
    parts = []
    for disk in fs.get("disk") or []:
        if not isinstance(disk, dict):
            continue
        bits = [str(disk.get("dev") or "?"), str(disk.get("bus-type") or "?")]
        if disk.get("serial"):
            bits.append(f"serial={disk['serial']}")
        parts.append(" ".join(bits))
    return ", ".join(parts) or "-"


async def _fsinfo(ga: GuestAgent, opts: AgentOptions) -> int:
    fsinfo = await ga.get_fsinfo()
    if opts.json:
        emit_json(fsinfo)
        return ExitCode.OK
    rows = [
        (
            str(fs.get("mountpoint", "?")),
            str(fs.get("type", "?")),
            str(fs.get("name", "?")),
            f"{size(fs.get('used-bytes'))} of {size(fs.get('total-bytes'))}"
            if "total-bytes" in fs else "-",
            _fs_disks(fs),
        )
        for fs in fsinfo
    ]
    header = ("MOUNTPOINT", "TYPE", "NAME", "USED", "DISKS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        out("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=False)) + "  " + row[4])
    return ExitCode.OK


@dataclasses.dataclass(frozen=True)
class _ExecuteOptions(AgentOptions, ExecuteFields):
    pass


async def _execute(ga: GuestAgent, opts: _ExecuteOptions) -> int:
    value = await ga.execute(opts.name, opts.arguments)
    if opts.json:
        emit_json(value)
    elif value is not None:
        out(dumps(value, pretty=True))
    return ExitCode.OK


@dataclasses.dataclass(frozen=True)
class _ShutdownOptions(AgentOptions):
    mode: str


def _shutdown_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=("powerdown", "halt", "reboot"), default="powerdown")


async def _shutdown(ga: GuestAgent, opts: _ShutdownOptions) -> int:
    await ga.shutdown(opts.mode)
    if opts.json:
        emit_json({"ok": True, "mode": opts.mode})
    else:
        out(f"guest-shutdown ({opts.mode}) sent; the agent does not confirm it")
    return ExitCode.OK


#: ``qmpagent agent``.
AGENT: Group = Group(
    name="agent",
    help="talk to the guest agent: ping, info, fsfreeze, exec, osinfo, fsinfo, ...",
    description="Talk to the QEMU guest agent (qemu-ga) in a VM. The channel is synced "
    "(guest-sync-delimited) on connect; with --qmp the agent's port is checked first.",
    examples=(
        "agent --agent /run/vm1/qga.sock ping",
        "agent --agent /run/vm1/qga.sock --qmp /run/vm1/qmp.sock fsfreeze status",
        "agent --agent vsock:3:1234 exec /bin/sh -c 'df -h'",
        "--json agent --agent 127.0.0.1:4445 info",
    ),
    add_options=_add_options,
    actions=(
        Command("ping", "check that the agent answers (guest-ping)", AgentOptions,
                connected(_agent, _ping)),
        Command("info", "the agent's version and commands (guest-info)", AgentOptions,
                connected(_agent, _info)),
        Command("fsfreeze", "freeze state of the guest's filesystems: status, freeze, thaw",
                _FsfreezeOptions, connected(_agent, _fsfreeze), _fsfreeze_arguments,
                description="guest-fsfreeze-status / -freeze / -thaw. A freeze made here stays "
                "until you thaw it. A freeze that froze 0 filesystems froze nothing (maybe another "
                "tool holds a freeze: do not thaw it)."),
        Command("exec", "run a program in the guest and wait for it (guest-exec)",
                _ExecOptions, connected(_agent, _exec), _exec_arguments,
                description="Run a program in the guest (guest-exec), wait for it, and write its "
                "stdout and stderr to ours. Exit status 0 if it exited 0, else 6 (command error); "
                "--json gives its exitcode, signal and output. Put qmpagent's options before PATH: "
                "everything after PATH goes to the program."),
        Command("osinfo", "the guest OS (guest-get-osinfo)", AgentOptions,
                connected(_agent, _osinfo)),
        Command("fsinfo", "the guest's filesystems and disks (guest-get-fsinfo)", AgentOptions,
                connected(_agent, _fsinfo)),
        Command("execute", "run any agent command with JSON arguments", _ExecuteOptions,
                connected(_agent, _execute), add_execute_arguments("guest-get-time")),
        Command("shutdown", "shut the guest down (guest-shutdown; no reply)", _ShutdownOptions,
                connected(_agent, _shutdown), _shutdown_arguments),
    ),
)
