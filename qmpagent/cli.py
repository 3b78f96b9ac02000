"""The ``qmpagent`` command line. The only module that prints, configures logging or calls
``asyncio.run``.

Subcommands mirror the library:

* ``qmpagent agent ...``: the guest agent (:class:`~qmpagent.GuestAgent`): ``ping``, ``info``,
  ``fsfreeze status|freeze|thaw``, ``exec``, ``osinfo``, ``fsinfo``, ``execute``, ``shutdown``;
* ``qmpagent qmp ...``: QMP (:class:`~qmpagent.Monitor`): ``execute``, ``events``, ``wait-event``;
* ``qmpagent snapshot ...``: :class:`~qmpagent.snapshot.SnapshotOrchestrator`;
* ``qmpagent demo``: boot the built-in test guest and take a quiesced snapshot of it.

Human output by default, ``--json`` for machines. Errors are one line on stderr (a traceback
only with ``--debug``) and a distinct exit status, :class:`ExitCode`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import enum
import json
import logging
import os
import re
import signal
import sys
import textwrap
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

import anyio

from . import __version__
from .agent import AgentAddress, AgentInfo, ExecResult, GuestAgent
from .errors import (
    AgentCommandError,
    AgentUnavailable,
    EventOverflow,
    MonitorCommandError,
    MonitorTimeout,
    MonitorUnavailable,
    QMPAgentError,
    SnapshotError,
    ThawError,
    UsageError,
)
from .monitor import Monitor, QMPEvent
from .snapshot import SnapshotOrchestrator, SnapshotResult

__all__ = [
    "EXIT_CODE_HELP",
    "ExitCode",
    "build_parser",
    "exit_code_for",
    "main",
    "parse_agent_address",
    "parse_qmp_address",
]

PROG: Final = "qmpagent"
QMP_ENV: Final = "QMPAGENT_QMP"
AGENT_ENV: Final = "QMPAGENT_AGENT"

QMPAddress = str | tuple[str, int]


class _Closable(Protocol):
    async def close(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)


class ExitCode(enum.IntEnum):
    """The exit statuses of the ``qmpagent`` command. Each failure class has its own."""

    OK = 0
    #: Any other failure: a malformed reply from QEMU or the guest, lost events, a failed
    #: demo check, an unexpected error.
    ERROR = 1
    #: A bad command line or bad arguments (argparse's own status; also the library's
    #: :class:`~qmpagent.UsageError`, e.g. an unknown disk or an existing overlay file).
    USAGE = 2
    #: The guest agent cannot be reached: no socket, its port closed in the guest (qemu-ga not
    #: running), or no answer to sync/ping.
    AGENT_UNAVAILABLE = 3
    #: QMP cannot be reached (no socket, QEMU not running) or the connection was lost.
    QMP_UNAVAILABLE = 4
    #: A command or a wait got no answer in time.
    TIMEOUT = 5
    #: QEMU or the agent answered with an error (unknown command, bad arguments...), or a
    #: program run with ``agent exec`` exited non-zero or was killed.
    COMMAND_ERROR = 6
    #: ``snapshot``: no snapshot was taken, or it could not be quiesced under
    #: ``--quiesce required`` (the error says whether the VM runs on the overlays).
    SNAPSHOT_FAILED = 7
    #: ``snapshot``: our freeze could not be thawed. THE GUEST MAY STILL BE FROZEN.
    THAW_FAILED = 8
    #: Interrupted by SIGINT (Ctrl-C). A freeze made by this command is thawed first.
    INTERRUPTED = 130
    #: Terminated by SIGTERM. A freeze made by this command is thawed first.
    TERMINATED = 143


#: One line per exit status, for ``--help`` and docs/cli.md.
EXIT_CODE_HELP: Final[dict[ExitCode, str]] = {
    ExitCode.OK: "success",
    ExitCode.ERROR: "other error (malformed reply, lost events, failed demo check)",
    ExitCode.USAGE: "bad command line or arguments (unknown disk, existing overlay file...)",
    ExitCode.AGENT_UNAVAILABLE: "guest agent unreachable: no socket, qemu-ga not running, no answer",
    ExitCode.QMP_UNAVAILABLE: "QMP unreachable: no socket, QEMU not running, connection lost",
    ExitCode.TIMEOUT: "a command or a wait got no answer in time",
    ExitCode.COMMAND_ERROR: "QEMU or the agent answered with an error; `agent exec` program failed",
    ExitCode.SNAPSHOT_FAILED: "snapshot failed (or not quiesced under --quiesce required)",
    ExitCode.THAW_FAILED: "THAW FAILED: THE GUEST MAY STILL BE FROZEN; check and thaw by hand",
    ExitCode.INTERRUPTED: "interrupted (SIGINT); a freeze of ours is thawed first",
    ExitCode.TERMINATED: "terminated (SIGTERM); a freeze of ours is thawed first",
}


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit status for an error raised by a subcommand."""
    if isinstance(exc, ThawError):  # a SnapshotError too: check it first
        return ExitCode.THAW_FAILED
    if isinstance(exc, SnapshotError):
        return ExitCode.SNAPSHOT_FAILED
    if isinstance(exc, UsageError):
        return ExitCode.USAGE
    if isinstance(exc, AgentUnavailable):
        return ExitCode.AGENT_UNAVAILABLE
    if isinstance(exc, MonitorUnavailable):
        return ExitCode.QMP_UNAVAILABLE
    if isinstance(exc, TimeoutError):  # AgentTimeout, MonitorTimeout
        return ExitCode.TIMEOUT
    if isinstance(exc, (AgentCommandError, MonitorCommandError)):
        return ExitCode.COMMAND_ERROR
    return ExitCode.ERROR


# --- addresses and argument types ----------------------------------------------------------------

_HOST_PORT = re.compile(r"\[(?P<host6>[^\]]+)\]:(?P<port6>\d+)|(?P<host>[^/:\[\]]+):(?P<port>\d+)")


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text}")
    return port


def _host_port(text: str) -> tuple[str, int] | None:
    m = _HOST_PORT.fullmatch(text)
    if m is None:
        return None
    if m.group("host6") is not None:
        return m.group("host6"), _port(m.group("port6"))
    return m.group("host"), _port(m.group("port"))


def parse_qmp_address(text: str) -> QMPAddress:
    """``--qmp``: a unix socket path, ``HOST:PORT`` (``[v6addr]:PORT``), ``unix:PATH`` or
    ``tcp:HOST:PORT``. A ``HOST:PORT`` that names an existing file is taken as a path."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise argparse.ArgumentTypeError("unix: needs a path")
        return text[5:]
    if text.startswith("tcp:"):
        hp = _host_port(text[4:])
        if hp is None:
            raise argparse.ArgumentTypeError(f"expected tcp:HOST:PORT, not {text!r}")
        return hp
    if not text:
        raise argparse.ArgumentTypeError("empty address")
    hp = _host_port(text)
    if hp is not None and not os.path.exists(text):
        return hp
    return text


def parse_agent_address(text: str) -> AgentAddress:
    """``--agent``: like ``--qmp``, plus ``vsock:CID:PORT``."""
    if text.startswith("vsock:"):
        parts = text.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise argparse.ArgumentTypeError(f"expected vsock:CID:PORT, not {text!r}")
        return ("vsock", int(parts[1]), int(parts[2]))
    return parse_qmp_address(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    if text == "-":
        text = sys.stdin.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r:.80}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, not {text!r:.80}")
    return value


def _disk(text: str) -> tuple[str, str]:
    node, sep, path = text.partition("=")
    if not sep or not node or not path:
        raise argparse.ArgumentTypeError(f"expected NODE=OVERLAY, not {text!r}")
    return node, os.path.abspath(os.path.expanduser(path))


# --- output --------------------------------------------------------------------------------------


def _json_default(value: object) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _dumps(value: Any, pretty: bool = False) -> str:
    return json.dumps(value, default=_json_default, indent=2 if pretty else None)


def _out(text: str = "") -> None:
    print(text, file=sys.stdout, flush=True)


def _emit_json(value: Any) -> None:
    _out(_dumps(value))


def _err(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _size(n: object) -> str:
    if not isinstance(n, int):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _event_time(event: QMPEvent) -> str:
    ts = event.get("timestamp") or {}
    sec, usec = ts.get("seconds"), ts.get("microseconds")
    if not isinstance(sec, int) or not isinstance(usec, int) or sec < 0:
        return "-"
    return datetime.datetime.fromtimestamp(sec + usec / 1e6).strftime("%Y-%m-%d %H:%M:%S.%f")


def _print_event(event: QMPEvent, as_json: bool) -> None:
    if as_json:
        _emit_json(event)
    else:
        data = f" {_dumps(event['data'])}" if event.get("data") else ""
        _out(f"{_event_time(event)} {event['event']}{data}")


# --- checks and connections ----------------------------------------------------------------------


def _check_args(args: argparse.Namespace) -> None:
    """What argparse cannot check by itself; exits with status 2 like argparse."""
    parser: argparse.ArgumentParser = args.parser
    required = {"agent": ("--agent", AGENT_ENV), "qmp": ("--qmp", QMP_ENV),
                "snapshot": ("--qmp", QMP_ENV)}.get(args.command)
    if required is not None and getattr(args, required[0][2:]) is None:
        parser.error(f"{required[0]} is required (or set ${required[1]})")
    if args.command == "agent":
        if args.wait_port is not None and args.qmp is None:
            parser.error(f"--wait-port needs --qmp (or ${QMP_ENV})")
        if getattr(args, "mountpoint", None) and args.op != "freeze":
            parser.error("--mountpoint applies to freeze only")
    if args.command == "snapshot":
        nodes = [node for node, _ in args.disk]
        for node in nodes:
            if nodes.count(node) > 1:
                parser.error(f"--disk {node}=... given twice")


@contextlib.asynccontextmanager
async def _closing(resource: _C) -> AsyncIterator[_C]:
    """``async with`` a connection whose close is shielded: after a signal cancelled the command
    (an anyio cancel scope, which keeps cancelling), the connection is still closed cleanly."""
    try:
        yield resource
    finally:
        with anyio.CancelScope(shield=True):
            await resource.close()


# --- agent ---------------------------------------------------------------------------------------


async def _check_agent_port(args: argparse.Namespace) -> None:
    """With ``--qmp``: check (or, with ``--wait-port``, wait) that the guest has the agent's
    virtio-serial port open before sending the agent anything."""
    async with _closing(await Monitor.connect(
        args.qmp, timeout=args.timeout, command_timeout=args.timeout, name="cli"
    )) as mon:
        if args.wait_port is not None:
            try:
                await mon.wait_agent_port(timeout=args.wait_port)
            except MonitorTimeout as exc:
                raise AgentUnavailable(
                    f"the guest agent's port did not open in the guest within {args.wait_port}s "
                    "(qemu-ga not running)"
                ) from exc
        elif not await mon.agent_port_open():
            raise AgentUnavailable(
                "the guest agent is not running: its virtio-serial port is closed in the guest"
            )


async def _agent_main(args: argparse.Namespace) -> int:
    if args.qmp is not None:
        await _check_agent_port(args)
    async with _closing(await GuestAgent.connect(args.agent, timeout=args.timeout)) as ga:
        action: Callable[[GuestAgent, argparse.Namespace], Awaitable[int]] = args.action
        return await action(ga, args)


async def _agent_ping(ga: GuestAgent, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    await ga.ping()
    elapsed = time.perf_counter() - started
    if args.json:
        _emit_json({"ok": True, "seconds": elapsed})
    else:
        _out(f"ok: the guest agent answers ({_ms(elapsed)})")
    return ExitCode.OK


def _print_info(info: AgentInfo) -> None:
    cmds = info.commands
    disabled = sorted(c.name for c in cmds.values() if not c.enabled)
    _out(f"qemu-ga {info.version}: {len(cmds)} commands, {len(cmds) - len(disabled)} enabled")
    if disabled:
        _out(f"disabled: {', '.join(disabled)}")
    names = sorted(cmds)
    width = max((len(n) for n in names), default=0) + 2
    columns = max(1, (_WIDTH - 2) // width)
    rows = -(-len(names) // columns)
    for r in range(rows):
        _out("  " + "".join(f"{n:<{width}}" for n in names[r::rows]).rstrip())


async def _agent_info(ga: GuestAgent, args: argparse.Namespace) -> int:
    info = await ga.info()
    if args.json:
        _emit_json(dict(info))
    else:
        _print_info(info)
    return ExitCode.OK


async def _agent_fsfreeze(ga: GuestAgent, args: argparse.Namespace) -> int:
    op = args.op
    if op == "status":
        status = await ga.fsfreeze_status()
        if args.json:
            _emit_json({"status": status.value})
        else:
            _out(status.value)
    elif op == "freeze":
        n = await ga.fsfreeze_freeze(args.mountpoint or None)
        if args.json:
            _emit_json({"frozen": n})
        elif n:
            _out(f"froze {n} filesystem(s); they stay frozen until `{PROG} agent fsfreeze thaw`")
        else:
            _out("froze 0 filesystems (nothing to freeze, or frozen already by another tool)")
    else:
        n = await ga.fsfreeze_thaw()
        if args.json:
            _emit_json({"thawed": n})
        else:
            _out(f"thawed {n} filesystem(s)")
    return ExitCode.OK


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


async def _agent_exec(ga: GuestAgent, args: argparse.Namespace) -> int:
    input_data = sys.stdin.buffer.read() if args.stdin else None
    res = await ga.exec(
        args.path, args.args, env=args.env, input_data=input_data, timeout=args.exec_timeout
    )
    if args.json:
        _emit_json(_exec_json(res))
    else:
        sys.stdout.buffer.write(res.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(res.stderr)
        sys.stderr.flush()
    for name, truncated in (("stdout", res.stdout_truncated), ("stderr", res.stderr_truncated)):
        if truncated:
            _err(f"warning: the agent truncated the program's {name}")
    if res.ok:
        return ExitCode.OK
    how = f"was killed by signal {res.signal}" if res.signal is not None else (
        f"exited with status {res.exitcode}"
    )
    _err(f"error: {args.path} (pid {res.pid} in the guest) {how}")
    return ExitCode.COMMAND_ERROR


async def _agent_osinfo(ga: GuestAgent, args: argparse.Namespace) -> int:
    info = await ga.get_osinfo()
    if args.json:
        _emit_json(info)
    else:
        width = max((len(k) for k in info), default=0)
        for key, value in info.items():
            _out(f"{key + ':':<{width + 1}} {value}")
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


async def _agent_fsinfo(ga: GuestAgent, args: argparse.Namespace) -> int:
    fsinfo = await ga.get_fsinfo()
    if args.json:
        _emit_json(fsinfo)
        return ExitCode.OK
    rows = [
        (
            str(fs.get("mountpoint", "?")),
            str(fs.get("type", "?")),
            str(fs.get("name", "?")),
            f"{_size(fs.get('used-bytes'))} of {_size(fs.get('total-bytes'))}"
            if "total-bytes" in fs else "-",
            _fs_disks(fs),
        )
        for fs in fsinfo
    ]
    header = ("MOUNTPOINT", "TYPE", "NAME", "USED", "DISKS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        _out("  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=False)) + "  " + row[4])
    return ExitCode.OK


async def _agent_execute(ga: GuestAgent, args: argparse.Namespace) -> int:
    value = await ga.execute(args.name, args.arguments)
    if args.json:
        _emit_json(value)
    elif value is not None:
        _out(_dumps(value, pretty=True))
    return ExitCode.OK


async def _agent_shutdown(ga: GuestAgent, args: argparse.Namespace) -> int:
    await ga.shutdown(args.mode)
    if args.json:
        _emit_json({"ok": True, "mode": args.mode})
    else:
        _out(f"guest-shutdown ({args.mode}) sent; the agent does not confirm it")
    return ExitCode.OK


# --- qmp -----------------------------------------------------------------------------------------


async def _qmp_main(args: argparse.Namespace) -> int:
    async with _closing(await Monitor.connect(
        args.qmp, timeout=args.connect_timeout, command_timeout=args.timeout, name="cli"
    )) as mon:
        action: Callable[[Monitor, argparse.Namespace], Awaitable[int]] = args.action
        return await action(mon, args)


async def _qmp_execute(mon: Monitor, args: argparse.Namespace) -> int:
    value = await mon.execute(args.name, args.arguments)
    if args.json:
        _emit_json(value)
    else:
        _out(_dumps(value, pretty=True))
    return ExitCode.OK


async def _qmp_events(mon: Monitor, args: argparse.Namespace) -> int:
    seen = 0
    async with mon.listen(*args.names) as events:
        if _tty(sys.stderr) and not args.json:
            what = ", ".join(args.names) or "all"
            until = f"for {args.duration}s" if args.duration else "until Ctrl-C"
            _err(f"watching {what} events {until}")
        with anyio.move_on_after(args.duration):
            while args.count is None or seen < args.count:
                try:
                    event = await events.get(timeout=None)
                except EventOverflow as exc:
                    _err(f"warning: {exc}")
                    continue
                _print_event(event, args.json)
                seen += 1
    return ExitCode.OK


async def _qmp_wait_event(mon: Monitor, args: argparse.Namespace) -> int:
    event = await mon.wait_event(args.name, match=args.match, timeout=args.timeout)
    _print_event(event, args.json)
    return ExitCode.OK


# --- snapshot ------------------------------------------------------------------------------------

_PHASES: Final = ("preflight", "prepare", "freeze", "transaction", "thaw", "cleanup")


def _snapshot_summary(result: SnapshotResult) -> str:
    if result.freeze_owner == "external":
        return ("quiesced by an existing freeze (freeze owner: external); "
                "the guest was left frozen, as it was")
    if result.quiesced:
        resolved = " (a lost freeze reply, resolved)" if result.freeze_resolved else ""
        return (f"quiesced: froze {result.frozen} filesystem(s){resolved}, thawed {result.thawed}; "
                f"freeze window {_ms(result.freeze_window)}")
    return f"NOT quiesced (crash-consistent): {result.reason}"


def _print_snapshot(result: SnapshotResult, disks: dict[str, str]) -> None:
    t = result.timings
    for name in _PHASES:
        seconds = getattr(t, name)
        if seconds or name not in ("freeze", "thaw", "cleanup"):
            _out(f"  {name:<12} {_ms(seconds):>10}")
    _out(f"  {'total':<12} {_ms(t.total):>10}")
    _out(f"Snapshot taken, {_snapshot_summary(result)}")
    by_file = {path: node for node, path in result.files.items()}
    for key, path in disks.items():
        node = by_file.get(path, key)
        was = f" (node {node})" if node != key else ""
        _out(f"  {key}{was} -> {path} (node {result.overlays.get(node, '?')})")


def _progress(phase: str, seconds: float | None) -> None:
    """A progress line per snapshot phase, on a terminal."""
    if seconds is None:
        _err(f"  {phase}...")
    else:
        _err(f"  {phase} done in {seconds * 1000:.1f} ms")


async def _snapshot(args: argparse.Namespace) -> int:
    disks: dict[str, str] = dict(args.disk)
    if _tty(sys.stderr) and not args.json:
        _err(f"snapshot of {', '.join(disks)} (quiesce: {args.quiesce}, "
             f"freeze timeout {args.freeze_timeout}s)...")
    async with _closing(await Monitor.connect(
        args.qmp, timeout=args.connect_timeout, command_timeout=args.command_timeout, name="cli"
    )) as mon:
        orch = SnapshotOrchestrator(
            mon,
            agent=args.agent,
            agent_timeout=args.agent_timeout,
            thaw_timeout=args.thaw_timeout,
            command_timeout=args.command_timeout,
            job_timeout=args.job_timeout,
            agent_chardev=args.agent_chardev,
        )
        result = await orch.snapshot(
            disks,
            quiesce=args.quiesce,
            freeze_timeout=args.freeze_timeout,
            on_phase=_progress if _tty(sys.stderr) and not args.json else None,
        )
    if args.json:
        _emit_json(dataclasses.asdict(result))
    else:
        _print_snapshot(result, disks)
    return ExitCode.OK


# --- demo ----------------------------------------------------------------------------------------


def _print_demo(report: object) -> None:
    from .testing.demo import DemoReport

    assert isinstance(report, DemoReport)
    r = report.result
    t = r.timings
    ok = "quiesced" if r.quiesced else f"NOT quiesced ({r.reason})"
    _out(f"Demo guest booted in {report.boot_time:.2f}s (QEMU TCG, real qemu-ga inside).")
    _out(f"Snapshot: {ok}; froze {r.frozen} filesystem(s), thawed {r.thawed}; "
         f"freeze owner: {r.freeze_owner}")
    _out("Phases:")
    for name in ("preflight", "prepare", "freeze", "transaction", "thaw"):
        _out(f"  {name:<12} {getattr(t, name) * 1000:8.1f} ms")
    _out(f"  {'total':<12} {t.total * 1000:8.1f} ms")
    window = f"{r.freeze_window * 1000:.1f} ms" if r.freeze_window is not None else "none"
    _out(f"Freeze window seen by the host (freeze reply -> thaw reply): {window}")
    _out(
        f"Gap seen in the guest's own writer log: {report.guest_gap * 1000:.0f} ms "
        f"(normal period {report.writer_period * 1000:.0f} ms; writer resumed: "
        f"{'yes' if report.writer_resumed else 'NO'})"
    )
    for node, ov in r.overlays.items():
        _out(f"Overlay: {node} -> {ov} ({r.files[node]})")
    verdict = "clean" if report.fsck.clean else f"NOT CLEAN (exit {report.fsck.returncode})"
    _out(f"e2fsck -fn of the snapshot's base image: {verdict}")
    if not report.fsck.clean:
        _out(report.fsck.output)


async def _demo(args: argparse.Namespace) -> int:
    from .testing.demo import run_demo

    report = await run_demo(quiesce=args.quiesce, freeze_timeout=args.freeze_timeout)
    if args.json:
        _emit_json(dataclasses.asdict(report))
    else:
        _print_demo(report)
    ok = report.fsck.clean and report.writer_resumed
    if not ok:
        _err("error: the demo's checks failed (see above)")
    return ExitCode.OK if ok else ExitCode.ERROR


async def _build_guest(args: argparse.Namespace) -> int:
    from .testing.image import build_guest_image

    image = await anyio.to_thread.run_sync(lambda: build_guest_image(peer=args.peer))
    if args.json:
        _emit_json({"directory": str(image.directory), "kernel": str(image.kernel),
                    "initrd": str(image.initrd), "kernel_version": image.kernel_version,
                    "peer": image.peer})
    else:
        _out(str(image.directory))
    return ExitCode.OK


# --- the parser ----------------------------------------------------------------------------------

_ADDRESS_HELP = f"""\
addresses:
  --qmp ADDR     a unix socket path or HOST:PORT (also unix:PATH, tcp:HOST:PORT, [v6]:PORT);
                 default ${QMP_ENV}
  --agent ADDR   a unix socket path, HOST:PORT or vsock:CID:PORT; default ${AGENT_ENV}"""


def _exit_code_help() -> str:
    lines = ["exit status:"]
    for code, text in EXIT_CODE_HELP.items():
        lines.append(f"  {int(code):<4} {code.name.lower().replace('_', '-'):<18} {text}")
    return "\n".join(lines)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilogs' tables as written; descriptions are wrapped by :func:`_wrap`."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=_WIDTH)


_WIDTH: Final = 100


def _wrap(text: str) -> str:
    return textwrap.fill(text, _WIDTH - 2)


def _common_options(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """--json / --debug / --verbose: on the top parser with defaults, repeated on every
    subcommand (default SUPPRESS, so they can be given before or after the subcommand)."""
    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    g = parser.add_argument_group("output")
    g.add_argument("--json", action="store_true", default=default(False),
                   help="machine-readable JSON on stdout (errors too: {\"error\": {...}})")
    g.add_argument("-v", "--verbose", action="store_true", default=default(False),
                   help="also show the library's warnings and log (INFO)")
    g.add_argument("--debug", action="store_true", default=default(False),
                   help="log everything (DEBUG) and show tracebacks of errors")


def _agent_options(parser: argparse.ArgumentParser, leaf: bool) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if leaf else value

    g = parser.add_argument_group("agent connection")
    g.add_argument("--agent", type=parse_agent_address, metavar="ADDR",
                   default=default(os.environ.get(AGENT_ENV) or None),
                   help=f"the agent's socket: PATH, HOST:PORT or vsock:CID:PORT (${AGENT_ENV})")
    g.add_argument("--qmp", type=parse_qmp_address, metavar="ADDR",
                   default=default(os.environ.get(QMP_ENV) or None),
                   help="QMP socket: if given, first check that the agent's port is open in the "
                   f"guest, so a stopped qemu-ga fails fast (${QMP_ENV})")
    g.add_argument("--timeout", type=_seconds, metavar="SECONDS", default=default(5.0),
                   help="timeout of the connect, the sync and each agent command (default 5)")
    g.add_argument("--wait-port", type=_seconds, metavar="SECONDS", default=default(None),
                   help="with --qmp: wait up to SECONDS for the agent's port to open (a booting "
                   "guest) instead of failing at once")


def _qmp_options(parser: argparse.ArgumentParser, leaf: bool) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if leaf else value

    g = parser.add_argument_group("QMP connection")
    g.add_argument("--qmp", type=parse_qmp_address, metavar="ADDR",
                   default=default(os.environ.get(QMP_ENV) or None),
                   help=f"QMP socket: PATH or HOST:PORT (${QMP_ENV})")
    g.add_argument("--timeout", type=_seconds, metavar="SECONDS", default=default(30.0),
                   help="timeout of each QMP command, and of wait-event (default 30)")
    g.add_argument("--connect-timeout", type=_seconds, metavar="SECONDS", default=default(10.0),
                   help="timeout of the connect and QMP handshake (default 10)")


def _leaf(
    sub: Any,
    name: str,
    help: str,
    options: Callable[[argparse.ArgumentParser, bool], None],
    **kwargs: Any,
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help,
        description=_wrap(kwargs.pop("description", help[:1].upper() + help[1:] + ".")),
        formatter_class=_Formatter, **kwargs,
    )
    options(p, True)
    _common_options(p)
    p.set_defaults(parser=p)
    return p


def _add_agent(sub: Any) -> None:
    agent = sub.add_parser(
        "agent",
        help="talk to the guest agent: ping, info, fsfreeze, exec, osinfo, fsinfo, ...",
        description=_wrap("Talk to the QEMU guest agent (qemu-ga) in a VM. The channel is synced "
        "(guest-sync-delimited) on connect; with --qmp the agent's port is checked first."),
        formatter_class=_Formatter,
        epilog=f"{_ADDRESS_HELP}\n\nexamples:\n"
        f"  {PROG} agent --agent /run/vm1/qga.sock ping\n"
        f"  {PROG} agent --agent /run/vm1/qga.sock --qmp /run/vm1/qmp.sock fsfreeze status\n"
        f"  {PROG} agent --agent vsock:3:1234 exec /bin/sh -c 'df -h'\n"
        f"  {PROG} --json agent --agent 127.0.0.1:4445 info\n\n{_exit_code_help()}",
    )
    _agent_options(agent, False)
    _common_options(agent)
    agent.set_defaults(func=_agent_main, parser=agent)
    actions = agent.add_subparsers(dest="agent_command", metavar="ACTION", required=True)

    _leaf(actions, "ping", "check that the agent answers (guest-ping)", _agent_options) \
        .set_defaults(action=_agent_ping)
    _leaf(actions, "info", "the agent's version and commands (guest-info)", _agent_options) \
        .set_defaults(action=_agent_info)
    p = _leaf(actions, "fsfreeze",
              "freeze state of the guest's filesystems: status, freeze, thaw", _agent_options,
              description="guest-fsfreeze-status / -freeze / -thaw. A freeze made here stays "
              "until you thaw it. A freeze that froze 0 filesystems froze nothing (maybe another "
              "tool holds a freeze: do not thaw it).")
    p.add_argument("op", choices=("status", "freeze", "thaw"), help="status, freeze or thaw")
    p.add_argument("--mountpoint", action="append", metavar="PATH",
                   help="freeze only this mountpoint (repeatable; guest-fsfreeze-freeze-list)")
    p.set_defaults(action=_agent_fsfreeze)
    p = _leaf(actions, "exec", "run a program in the guest and wait for it (guest-exec)",
              _agent_options,
              description="Run a program in the guest (guest-exec), wait for it, and write its "
              "stdout and stderr to ours. Exit status 0 if it exited 0, else 6 (command error); "
              "--json gives its exitcode, signal and output. Put qmpagent's options before PATH: "
              "everything after PATH goes to the program.")
    p.add_argument("--env", action="append", metavar="NAME=VALUE",
                   help="an environment entry for the program (repeatable)")
    p.add_argument("--stdin", action="store_true", help="pass our standard input to the program")
    p.add_argument("--exec-timeout", type=_seconds, metavar="SECONDS", default=60.0,
                   help="how long the program may run (default 60); it is not killed after")
    p.add_argument("path", metavar="PATH", help="the program, e.g. /bin/sh")
    p.add_argument("args", metavar="ARG", nargs=argparse.REMAINDER, help="its arguments")
    p.set_defaults(action=_agent_exec)
    _leaf(actions, "osinfo", "the guest OS (guest-get-osinfo)", _agent_options) \
        .set_defaults(action=_agent_osinfo)
    _leaf(actions, "fsinfo", "the guest's filesystems and disks (guest-get-fsinfo)",
          _agent_options).set_defaults(action=_agent_fsinfo)
    p = _leaf(actions, "execute", "run any agent command with JSON arguments", _agent_options)
    p.add_argument("name", metavar="COMMAND", help="e.g. guest-get-time")
    p.add_argument("arguments", metavar="ARGS", type=_json_object, nargs="?",
                   help="its arguments as a JSON object ('-': read from stdin)")
    p.set_defaults(action=_agent_execute)
    p = _leaf(actions, "shutdown", "shut the guest down (guest-shutdown; no reply)", _agent_options)
    p.add_argument("--mode", choices=("powerdown", "halt", "reboot"), default="powerdown")
    p.set_defaults(action=_agent_shutdown)


def _add_qmp(sub: Any) -> None:
    qmp = sub.add_parser(
        "qmp",
        help="talk QMP: execute a command, stream events, wait for an event",
        description="Talk to QEMU over QMP.",
        formatter_class=_Formatter,
        epilog=f"{_ADDRESS_HELP}\n\nexamples:\n"
        f"  {PROG} qmp --qmp /run/vm1/qmp.sock execute query-status\n"
        f"  {PROG} qmp --qmp 127.0.0.1:4444 execute query-block-jobs\n"
        f"  {PROG} qmp --qmp /run/vm1/qmp.sock execute blockdev-del '{{\"node-name\": \"ov1\"}}'\n"
        f"  {PROG} --json qmp --qmp /run/vm1/qmp.sock events --duration 60 >> events.jsonl\n"
        f"  {PROG} qmp --qmp /run/vm1/qmp.sock wait-event SHUTDOWN --timeout 300\n\n"
        f"{_exit_code_help()}",
    )
    _qmp_options(qmp, False)
    _common_options(qmp)
    qmp.set_defaults(func=_qmp_main, parser=qmp)
    actions = qmp.add_subparsers(dest="qmp_command", metavar="ACTION", required=True)

    p = _leaf(actions, "execute", "run a QMP command with JSON arguments; print its return value",
              _qmp_options)
    p.add_argument("name", metavar="COMMAND", help="e.g. query-status")
    p.add_argument("arguments", metavar="ARGS", type=_json_object, nargs="?",
                   help="its arguments as a JSON object ('-': read from stdin)")
    p.set_defaults(action=_qmp_execute)
    p = _leaf(actions, "events", "print events as they come, until Ctrl-C, --duration or --count",
              _qmp_options,
              description="Print QMP events as they arrive: one line each (time, name, data), "
              "or with --json one JSON object per line. Stops on Ctrl-C or SIGTERM (exit 0), "
              "after --duration seconds or after --count events.")
    p.add_argument("names", metavar="EVENT", nargs="*", help="only these events (default: all)")
    p.add_argument("--duration", type=_seconds, metavar="SECONDS", help="stop after SECONDS")
    p.add_argument("--count", type=_count, metavar="N", help="stop after N events")
    p.set_defaults(action=_qmp_events, stop_is_ok=True)
    p = _leaf(actions, "wait-event", "wait for an event (matching --match); print it",
              _qmp_options,
              description="Wait for the next event NAME whose data contains --match, and print "
              "it. Only events that arrive after the connection are seen. Exit status 5 if "
              "none comes within --timeout.")
    p.add_argument("name", metavar="EVENT", help="e.g. SHUTDOWN or VSERPORT_CHANGE")
    p.add_argument("--match", type=_json_object, metavar="JSON",
                   help="a JSON object the event's data must contain, e.g. '{\"open\": true}'")
    p.set_defaults(action=_qmp_wait_event)


def _add_snapshot(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot",
        help="take an atomic, quiesced external snapshot of a running VM's disks",
        description=_wrap("Take one atomic external snapshot of a running VM's disks: overlays are "
        "created and attached first, then the guest's filesystems are frozen (through the "
        "agent), one QMP transaction switches every disk to its overlay, and the guest is "
        "thawed. Only a freeze this command made is ever thawed; a guest frozen beforehand is "
        "snapshotted as is and left frozen."),
        formatter_class=_Formatter,
        epilog=f"{_ADDRESS_HELP}\n\nquiesce:\n"
        "  required    freeze or take no snapshot at all (exit status 7); the default\n"
        "  preferred   freeze if possible, else take a crash-consistent snapshot and say why\n"
        "  off         never talk to the agent: a crash-consistent snapshot\n\n"
        "example:\n"
        f"  {PROG} snapshot --qmp /run/vm1/qmp.sock --agent /run/vm1/qga.sock \\\n"
        "      --disk disk0=/var/lib/vm1/disk0.snap1.qcow2 --disk disk1=/var/lib/vm1/disk1.snap1.qcow2\n\n"
        f"{_exit_code_help()}\n\n"
        "If the exit status is 8 (thaw failed), THE GUEST MAY STILL BE FROZEN: check with\n"
        f"`{PROG} agent --agent ADDR fsfreeze status` and thaw with `... fsfreeze thaw`.",
    )
    g = p.add_argument_group("what to snapshot")
    g.add_argument("--qmp", type=parse_qmp_address, metavar="ADDR",
                   default=os.environ.get(QMP_ENV) or None, help=f"QMP socket (${QMP_ENV}); required")
    g.add_argument("--agent", type=parse_agent_address, metavar="ADDR",
                   default=os.environ.get(AGENT_ENV) or None,
                   help=f"the guest agent's socket (${AGENT_ENV}); needed to quiesce")
    g.add_argument("--disk", type=_disk, action="append", required=True, metavar="NODE=OVERLAY",
                   help="block node (or device id) and the new overlay file to create; "
                   "repeatable, all disks are switched in one atomic transaction")
    g.add_argument("--quiesce", choices=("required", "preferred", "off"), default="required",
                   help="required (default), preferred or off; see below")
    t = p.add_argument_group("timeouts (seconds)")
    t.add_argument("--freeze-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="the longest allowed freeze window (default 10)")
    t.add_argument("--agent-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="each agent command: sync, ping, status, info, freeze (default 10)")
    t.add_argument("--thaw-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="the thaw, retries included (default 30)")
    t.add_argument("--command-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="each QMP command outside the freeze window (default 30)")
    t.add_argument("--job-timeout", type=_seconds, default=120.0, metavar="SECONDS",
                   help="each overlay-creating job (default 120)")
    t.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="the QMP connect and handshake (default 10)")
    p.add_argument("--agent-chardev", metavar="ID",
                   help="the agent's chardev id, if its port is not org.qemu.guest_agent.0")
    _common_options(p)
    p.set_defaults(func=_snapshot, parser=p)


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="boot the built-in demo guest and take a quiesced snapshot of it",
        description=_wrap("Boot the built-in demo guest (real QEMU, real qemu-ga, a writer logging "
        "every 10 ms), take a quiesced snapshot of its disk and report the phases, the freeze "
        "window seen by the host and by the guest, and e2fsck of the snapshot's base image."),
        formatter_class=_Formatter,
    )
    demo.add_argument("--quiesce", choices=("required", "preferred", "off"), default="required")
    demo.add_argument("--freeze-timeout", type=_seconds, default=10.0, metavar="SECONDS")
    _common_options(demo)
    demo.set_defaults(func=_demo, parser=demo)
    build = sub.add_parser(
        "build-guest",
        help="build (or find in the cache) the test guest the demo and the tests boot",
        description=_wrap("Build the minimal test guest (kernel, initramfs with busybox and "
        "qemu-ga, ext4 data disks) from a peer's Debian packages into the cache "
        "($QMPAGENT_GUEST_CACHE or ~/.cache/qmpagent/guest) and print its directory. Fast when "
        "the inputs are unchanged. The peer 'host' is this machine's own packages; 'debian13' "
        "is a Debian 13 root (QEMU 10.0, qemu-ga 10.0) provisioned with debootstrap on first use "
        "(as root, about a minute)."),
        formatter_class=_Formatter,
    )
    build.add_argument("--peer", choices=("host", "debian13"), default=None,
                       help="whose QEMU, qemu-ga and kernel (default: $QMPAGENT_PEER, else host)")
    _common_options(build)
    build.set_defaults(func=_build_guest, parser=build)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qmpagent`` command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talk QMP and the QEMU guest agent; take quiesced live snapshots.",
        formatter_class=_Formatter,
        epilog=f"{_ADDRESS_HELP}\n\n{_exit_code_help()}\n\n"
        f"Run `{PROG} COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_agent(sub)
    _add_qmp(sub)
    _add_snapshot(sub)
    _add_demo(sub)
    return parser


# --- running -------------------------------------------------------------------------------------


def _error_message(exc: BaseException, args: argparse.Namespace) -> str:
    """The one-line description of a failure (without the ``qmpagent: error:`` prefix)."""
    if isinstance(exc, ThawError):
        agent = getattr(args, "agent", None)
        how = f"{PROG} agent --agent {_address_text(agent)}" if agent is not None else f"{PROG} agent"
        detail = str(exc)
        for advice in (": THE GUEST MAY STILL BE FROZEN", ": the guest MAY BE FROZEN"):
            detail = detail.split(advice, 1)[0]  # the library's own advice: ours follows
        return (f"THAW FAILED - THE GUEST MAY STILL BE FROZEN (froze {exc.frozen}, thawed "
                f"{exc.thawed}): {detail}; check with `{how} fsfreeze status`, thaw with "
                f"`{how} fsfreeze thaw`")
    if isinstance(exc, SnapshotError):
        rec = exc.record
        if rec.snapshot_taken:
            what = "the snapshot WAS taken: the VM runs on the new overlays"
        else:
            what = "no snapshot was taken"
            left = [f for f in rec.files_created if f not in rec.files_removed]
            if left:
                what += f"; files left behind: {', '.join(left)}"
        return f"snapshot failed in {rec.phase}: {exc} ({what})"
    if isinstance(exc, AgentUnavailable):
        return f"guest agent unavailable: {exc}"
    if isinstance(exc, MonitorUnavailable):
        return f"QMP unavailable: {exc}"
    if isinstance(exc, TimeoutError):
        return f"timeout: {exc}"
    if isinstance(exc, QMPAgentError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"


def _address_text(address: object) -> str:
    if isinstance(address, tuple):
        if len(address) == 3:
            return ":".join(map(str, address))
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def _error_json(exc: BaseException, code: ExitCode, message: str) -> dict[str, Any]:
    error: dict[str, Any] = {
        "exit_code": int(code),
        "status": code.name.lower(),
        "type": type(exc).__name__,
        "message": message,
    }
    if isinstance(exc, (AgentCommandError, MonitorCommandError)):
        error.update(command=exc.command, error_class=exc.error_class, desc=exc.desc)
    if isinstance(exc, SnapshotError):
        error["record"] = dataclasses.asdict(exc.record)
    return {"error": error}


def _report(exc: BaseException, args: argparse.Namespace) -> ExitCode:
    code = exit_code_for(exc)
    if getattr(args, "debug", False):
        traceback.print_exception(exc, file=sys.stderr)
    message = _error_message(exc, args)
    if getattr(args, "json", False):
        with contextlib.suppress(OSError):
            _emit_json(_error_json(exc, code, message))
    # "THAW FAILED ..." and "snapshot failed ..." stand on their own; the rest reads as argparse's.
    _err(message if isinstance(exc, SnapshotError) else f"error: {message}")
    return code


async def _run(args: argparse.Namespace) -> int:
    """Run the subcommand. SIGINT and SIGTERM cancel it once, through an anyio cancel scope, so
    the library's shielded cleanup (the thaw of a freeze of ours) runs to its end; further
    signals are ignored while it cleans up."""
    loop = asyncio.get_running_loop()
    received: list[int] = []
    func: Callable[[argparse.Namespace], Awaitable[int]] = args.func
    with anyio.CancelScope() as scope:

        def on_signal(signum: int) -> None:
            received.append(signum)
            if len(received) == 1:
                scope.cancel()
            else:
                _err("still cleaning up (a thaw of ours is never skipped); please wait")

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
        try:
            return await func(args)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
    # Only reached when the scope caught the cancellation of a signal.
    if getattr(args, "stop_is_ok", False):
        return ExitCode.OK
    _err("interrupted" if received[0] == signal.SIGINT else "terminated")
    return ExitCode.INTERRUPTED if received[0] == signal.SIGINT else ExitCode.TERMINATED


def _configure_logging(args: argparse.Namespace) -> None:
    """Errors are reported by :func:`_report`, one line each; the library's own log (warnings
    such as each failed thaw attempt, and progress) only with ``-v`` or ``--debug``."""
    if args.debug:
        level, fmt = logging.DEBUG, f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    elif args.verbose:
        level, fmt = logging.INFO, f"{PROG}: %(levelname)s: %(name)s: %(message)s"
    else:
        level, fmt = logging.ERROR, f"{PROG}: %(levelname)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)
    if not args.debug:
        # qemu.qmp logs its own view of connection failures, which we report ourselves.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (an :class:`ExitCode`).

    Raises:
        SystemExit: for ``--help``, ``--version`` and command-line errors (status 2), as argparse.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args)
    _configure_logging(args)
    try:
        return int(asyncio.run(_run(args)))
    except KeyboardInterrupt:
        _err("interrupted")
        return ExitCode.OK if getattr(args, "stop_is_ok", False) else ExitCode.INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (`| head`): not our failure; keep Python from complaining at exit.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK
    except Exception as exc:
        return _report(exc, args)


if __name__ == "__main__":
    sys.exit(main())
