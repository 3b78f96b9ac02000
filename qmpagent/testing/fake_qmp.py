"""A fake QMP server for fast tests of code that drives QEMU: :class:`FakeQMPServer`.

It is a real asyncio server (unix socket by default, or TCP on 127.0.0.1) that speaks QMP like
QEMU: greeting with ``capabilities: ["oob"]``, ``qmp_capabilities`` negotiation, ``id`` echo,
errors as ``{"error": {"class": ..., "desc": ...}}``, events with timestamps, and a JSON *stream*
parser (clients such as ``qemu.qmp`` send messages without a trailing newline)::

    async with FakeQMPServer() as server:
        mon = await qmpagent.Monitor.connect(server.address)
        server.never_answer("query-status")                  # fault injection
        await server.emit("VSERPORT_CHANGE", {"id": "qgaport0", "open": False})
        await server.flood("BLOCK_IO_ERROR", 100_000)
        server.set_handler("query-foo", lambda call: {"foo": call.arguments.get("x")})
        assert server.commands("query-status")               # the record of what was received

Commands are answered by *handlers* (a table, :attr:`FakeQMPServer.handlers`, that tests can
extend or override per command). A handler takes a :class:`FakeCall` and returns the
``return`` value (or an awaitable of it), or raises :class:`FakeQMPError` for an error reply.

Built in: ``qmp_capabilities``, ``query-status``, ``query-version``, ``query-commands``,
``query-chardev``, ``qom-list``, ``qom-get``, ``query-block``, ``query-named-block-nodes``,
``query-jobs``, ``job-cancel``, ``job-dismiss``, ``stop``, ``cont``, plus job-based commands
added with :meth:`FakeQMPServer.add_job_command`. The model behind them is deliberately simple
and public (:attr:`~FakeQMPServer.qom`, :attr:`~FakeQMPServer.chardevs`,
:attr:`~FakeQMPServer.block_devices`, :attr:`~FakeQMPServer.block_nodes`,
:attr:`~FakeQMPServer.jobs`) so it can be replaced by richer models (a node graph,
transactions, a linked fake guest agent).

Faults (per command; ``times=None`` means every time): :meth:`~FakeQMPServer.delay`,
:meth:`~FakeQMPServer.never_answer`, :meth:`~FakeQMPServer.disconnect_on`; and at any time
:meth:`~FakeQMPServer.emit`, :meth:`~FakeQMPServer.flood`,
:meth:`~FakeQMPServer.disconnect_all`.

Like QEMU, in-band commands of one connection are executed one at a time, in order (a delayed
command delays the ones after it); ``exec-oob`` commands are executed at once. A command that
"never answers" is swallowed (the ones after it are answered).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import enum
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

__all__ = [
    "FakeCall",
    "FakeJob",
    "FakeQMPConnection",
    "FakeQMPError",
    "FakeQMPServer",
    "FakeQOMObject",
    "Fault",
    "FaultKind",
    "ReceivedCommand",
]

log = logging.getLogger(__name__)

_JSON_WS: Final = " \t\r\n"
_AGENT_PORT_NAME: Final = "org.qemu.guest_agent.0"


class FakeQMPError(Exception):
    """Raised by a handler to answer with a QMP error.

    Attributes:
        error_class: the QAPI error class (``"GenericError"``, ``"CommandNotFound"``,
            ``"DeviceNotFound"``, ...).
        desc: the description.
    """

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc


@dataclass(frozen=True)
class ReceivedCommand:
    """One command the server received (see :attr:`FakeQMPServer.received`).

    Attributes:
        command: the command name.
        arguments: its arguments (``{}`` when none were sent).
        id: the request ``id`` (any JSON value), or ``None``.
        oob: sent with ``exec-oob``.
        connection: the number of the connection it arrived on (0, 1, ...).
        time: ``time.monotonic()`` at arrival.
    """

    command: str
    arguments: dict[str, Any]
    id: Any
    oob: bool
    connection: int
    time: float


@dataclass
class FakeCall:
    """What a handler gets: one command to execute.

    Attributes:
        server: the server (its model and helpers).
        connection: the client connection the command came from.
        command: the command name.
        arguments: its arguments (``{}`` when none were sent).
        id: the request ``id``, or ``None``.
        oob: sent with ``exec-oob``.
    """

    server: FakeQMPServer
    connection: FakeQMPConnection
    command: str
    arguments: dict[str, Any]
    id: Any = None
    oob: bool = False

    def arg(self, name: str, type_: type | tuple[type, ...] = object, default: Any = ...) -> Any:
        """An argument, checked like QEMU checks it.

        Raises:
            FakeQMPError: ``GenericError`` when the argument is missing (and has no default)
                or has the wrong type.
        """
        if name not in self.arguments:
            if default is ...:
                raise FakeQMPError("GenericError", f"Parameter '{name}' is missing")
            return default
        value = self.arguments[name]
        if not isinstance(value, type_) or (type_ in (int, float) and isinstance(value, bool)):
            raise FakeQMPError("GenericError", f"Invalid parameter type for '{name}'")
        return value


#: A command handler: takes the call, returns the ``return`` value or an awaitable of it.
Handler = Callable[[FakeCall], Any]


class FaultKind(str, enum.Enum):
    """What a :class:`Fault` does to a command."""

    DELAY = "delay"
    """Answer normally, after a delay."""
    NEVER_ANSWER = "never-answer"
    """Record the command, never answer it."""
    DISCONNECT = "disconnect"
    """Close the connection when the command arrives (the client is left mid-command)."""


@dataclass
class Fault:
    """A fault injected into a command (see :meth:`FakeQMPServer.add_fault`).

    Attributes:
        kind: what the fault does.
        seconds: the delay, for :attr:`FaultKind.DELAY`.
        times: how many more commands it applies to; ``None``: all of them.
    """

    kind: FaultKind
    seconds: float = 0.0
    times: int | None = None


@dataclass
class FakeQOMObject:
    """An object in the fake QOM tree (see :attr:`FakeQMPServer.qom`).

    Attributes:
        type: the QOM type, e.g. ``"virtserialport"``.
        properties: ``qom-get``-able properties.
    """

    type: str
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeJob:
    """A job of the fake server (see :meth:`FakeQMPServer.add_job_command`).

    Attributes:
        id: the job id.
        type: the job type (``query-jobs`` ``type``), e.g. ``"create"``.
        status: the current status (``"created"``, ``"running"``, ..., ``"concluded"``).
        error: the error text it concludes with, if it fails.
        duration: seconds it runs before concluding; ``None``: until cancelled.
    """

    id: str
    type: str
    status: str = "created"
    error: str | None = None
    duration: float | None = 0.0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _cancelled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def info(self) -> dict[str, Any]:
        """The job as ``query-jobs`` shows it. Raises nothing."""
        done = 1 if self.status in ("concluded", "pending", "waiting") else 0
        info: dict[str, Any] = {
            "id": self.id, "type": self.type, "status": self.status,
            "current-progress": done, "total-progress": 1,
        }
        if self.status == "concluded" and self.error is not None:
            info["error"] = self.error
        return info


class FakeQMPConnection:
    """One client connection to a :class:`FakeQMPServer`.

    Attributes:
        number: the connection's number (0 for the first one accepted, and so on).
        negotiated: whether ``qmp_capabilities`` has been executed.
        oob: whether the client enabled out-of-band execution.
    """

    _MAX_BUFFER: Final = 1 << 20

    def __init__(
        self,
        server: FakeQMPServer,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.number = number
        self.negotiated = False
        self.oob = False
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._inband: asyncio.Queue[FakeCall] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        """Whether the connection is closed. Raises nothing."""
        return self._closed.is_set()

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message (a reply, an event, anything) to this client.

        Silently does nothing when the connection is closed.

        Raises:
            TypeError: ``message`` is not JSON-serialisable.
        """
        await self.send_raw(json.dumps(message, separators=(",", ":")).encode() + b"\r\n")

    async def send_raw(self, data: bytes) -> None:
        """Send raw bytes to this client (for malformed-output tests). Raises nothing."""
        if self.closed:
            return
        async with self._write_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError) as exc:
                log.debug("fake QMP connection %d: write failed: %r", self.number, exc)
                self._close_transport()

    def close(self) -> None:
        """Close the connection now (the client sees end-of-file). Raises nothing."""
        self._close_transport()

    def _close_transport(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._writer.close()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self) -> None:
        """Greet the client, then read and execute its commands until it hangs up.

        Raises nothing.
        """
        self._spawn(self._run_inband())
        try:
            await self.send(self.server.greeting())
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            buffer = ""
            while not self.closed:
                data = await self._reader.read(65536)
                if not data:
                    break
                buffer += decoder.decode(data)
                buffer = await self._parse(buffer)
                if len(buffer) > self._MAX_BUFFER:
                    await self._send_error(None, "GenericError", "JSON token too large")
                    break
        except (ConnectionError, OSError) as exc:
            log.debug("fake QMP connection %d: %r", self.number, exc)
        finally:
            self._close_transport()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()

    async def _parse(self, buffer: str) -> str:
        """Take every complete JSON value off the front of ``buffer``; return the rest."""
        decoder = self.server._decoder
        while True:
            start = 0
            while start < len(buffer) and buffer[start] in _JSON_WS:
                start += 1
            buffer = buffer[start:]
            if not buffer:
                return buffer
            try:
                value, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError as exc:
                if _maybe_incomplete(buffer):
                    return buffer  # wait for the rest
                # QEMU answers a parse error (without an id) and resets its parser.
                await self._send_error(None, "GenericError", f"JSON parse error, {exc.msg}")
                return ""
            buffer = buffer[end:]
            await self._dispatch(value)

    async def _dispatch(self, msg: Any) -> None:
        if not isinstance(msg, dict):
            await self._send_error(None, "GenericError", "QMP input must be a JSON object")
            return
        msg_id = msg.get("id")
        oob = "exec-oob" in msg
        command = msg.get("exec-oob") if oob else msg.get("execute")
        if not isinstance(command, str):
            await self._send_error(
                msg_id, "GenericError", "QMP input lacks member 'execute'"
            )
            return
        arguments = msg.get("arguments", {})
        if not isinstance(arguments, dict):
            await self._send_error(
                msg_id, "GenericError", "QMP input member 'arguments' must be an object"
            )
            return
        if oob and not self.oob:
            await self._send_error(
                msg_id, "GenericError", "QMP input member 'exec-oob' is unexpected"
            )
            return
        record = ReceivedCommand(command, arguments, msg_id, oob, self.number, time.monotonic())
        self.server._record(record)
        call = FakeCall(self.server, self, command, arguments, msg_id, oob)
        if oob:
            self._spawn(self._execute(call))
        else:
            self._inband.put_nowait(call)

    async def _run_inband(self) -> None:
        while True:
            await self._execute(await self._inband.get())

    async def _execute(self, call: FakeCall) -> None:
        server = self.server
        fault = server._take_fault(call.command)
        if fault is not None:
            if fault.kind is FaultKind.NEVER_ANSWER:
                log.debug("fake QMP: never answering %s", call.command)
                return
            if fault.kind is FaultKind.DISCONNECT:
                log.debug("fake QMP: disconnecting on %s", call.command)
                self.close()
                return
            await asyncio.sleep(fault.seconds)
        if not self.negotiated and call.command != "qmp_capabilities":
            await self._send_error(
                call.id, "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )
            return
        handler = server.handlers.get(call.command)
        if handler is None:
            await self._send_error(
                call.id, "CommandNotFound", f"The command {call.command} has not been found"
            )
            return
        try:
            result = handler(call)
            if inspect.isawaitable(result):
                result = await result
        except FakeQMPError as exc:
            await self._send_error(call.id, exc.error_class, exc.desc)
            return
        except Exception as exc:  # a broken handler: answer, and say so in the log
            log.exception("fake QMP handler for %s failed", call.command)
            await self._send_error(call.id, "GenericError", f"fake handler failed: {exc!r}")
            return
        reply: dict[str, Any] = {"return": {} if result is None else result}
        if call.id is not None:
            reply["id"] = call.id
        await self.send(reply)

    async def _send_error(self, msg_id: Any, error_class: str, desc: str) -> None:
        reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
        if msg_id is not None:
            reply["id"] = msg_id
        await self.send(reply)


def _maybe_incomplete(text: str) -> bool:
    """Whether ``text`` may be the start of a JSON value (brackets or a string still open)."""
    depth = 0
    in_string = escape = False
    for ch in text:
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                return False
    return in_string or depth > 0


class FakeQMPServer:
    """A QMP server that behaves like QEMU's monitor, for tests. Use it as an async context
    manager (or :meth:`start` / :meth:`close`).

    Args:
        path: the unix socket path (default: a fresh temporary directory, removed on close).
        tcp: listen on ``127.0.0.1`` and a free port instead of a unix socket.
        agent_port: create a guest-agent virtio-serial port like the test guest's
            (device ``qgaport0``, chardev ``qga0``, name ``org.qemu.guest_agent.0``).
        agent_port_open: whether the guest has that port open initially.
        version: the QEMU version in the greeting.

    Attributes:
        address: where clients connect (a path str, or ``(host, port)``).
        handlers: command name -> :data:`Handler`; add, replace or delete entries freely.
        received: every command received, in order (a :class:`ReceivedCommand` each).
        faults: command name -> list of :class:`Fault` (first applicable one is used).
        connections: every connection accepted so far (closed ones too).
        status: the run state ``query-status`` reports (``"running"``, ``"paused"``, ...).
        chardevs: chardev label -> ``{"filename": ..., "frontend-open": ...}``.
        qom: QOM path -> :class:`FakeQOMObject` (``qom-list`` lists children and properties).
        block_devices: ``query-block`` entries (dicts as QEMU sends them).
        block_nodes: ``query-named-block-nodes`` entries (dicts as QEMU sends them).
        jobs: job id -> :class:`FakeJob`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        tcp: bool = False,
        agent_port: bool = True,
        agent_port_open: bool = True,
        version: tuple[int, int, int] = (7, 2, 0),
    ) -> None:
        self._path = Path(path) if path is not None else None
        self._tcp = tcp
        self._tmpdir: Path | None = None
        self._server: asyncio.AbstractServer | None = None
        self._decoder = json.JSONDecoder()
        self._serve_tasks: set[asyncio.Task[None]] = set()
        self._command_waiters: list[tuple[str, int, asyncio.Future[ReceivedCommand]]] = []
        self.version = version
        self.address: str | tuple[str, int] = ""
        self.handlers: dict[str, Handler] = {}
        self.received: list[ReceivedCommand] = []
        self.faults: dict[str, list[Fault]] = {}
        self.connections: list[FakeQMPConnection] = []
        self.status = "running"
        self.chardevs: dict[str, dict[str, Any]] = {
            "compat_monitor0": {"filename": "unix:qmp.sock,server=on", "frontend-open": True},
            "serial0": {"filename": "file", "frontend-open": True},
        }
        self.qom: dict[str, FakeQOMObject] = {
            "/machine": FakeQOMObject("container"),
            "/machine/peripheral": FakeQOMObject("container"),
            "/machine/peripheral-anon": FakeQOMObject("container"),
        }
        self.block_devices: list[dict[str, Any]] = []
        self.block_nodes: list[dict[str, Any]] = []
        self.jobs: dict[str, FakeJob] = {}
        self._install_builtin_handlers()
        if agent_port:
            self.qom["/machine/peripheral/vser0"] = FakeQOMObject("virtio-serial-pci")
            self.add_serial_port("qgaport0", _AGENT_PORT_NAME, "qga0", open=agent_port_open)
        self.add_disk("disk0", "file0", "/fake/data0.qcow2", "vblk0")

    def __repr__(self) -> str:
        return f"<FakeQMPServer {self.address!r} connections={len(self.connections)}>"

    # lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening.

        Raises:
            OSError: the socket cannot be created.
        """
        if self._tcp:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            host, port = self._server.sockets[0].getsockname()[:2]
            self.address = (str(host), int(port))
        else:
            if self._path is None:
                self._tmpdir = Path(tempfile.mkdtemp(prefix="qmpagent-fakeqmp-"))
                self._path = self._tmpdir / "qmp.sock"
            self._server = await asyncio.start_unix_server(self._accept, str(self._path))
            self.address = str(self._path)
        log.debug("fake QMP server listening on %r", self.address)

    async def close(self) -> None:
        """Stop listening, close every connection, remove the socket (and temp dir).

        Raises nothing.
        """
        if self._server is not None:
            self._server.close()
        for conn in self.connections:
            conn.close()
        for job in self.jobs.values():
            if job._task is not None:
                job._task.cancel()
        tasks = list(self._serve_tasks) + [
            j._task for j in self.jobs.values() if j._task is not None
        ]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if not self._tcp and self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    async def __aenter__(self) -> FakeQMPServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = FakeQMPConnection(self, len(self.connections), reader, writer)
        self.connections.append(conn)
        task = asyncio.current_task()
        if task is not None:
            self._serve_tasks.add(task)
        try:
            await conn.serve()
        finally:
            if task is not None:
                self._serve_tasks.discard(task)

    def greeting(self) -> dict[str, Any]:
        """The greeting sent to each new client. Raises nothing."""
        major, minor, micro = self.version
        return {"QMP": {
            "version": {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": "qmpagent-fake",
            },
            "capabilities": ["oob"],
        }}

    # commands ---------------------------------------------------------------------------------

    def set_handler(self, command: str, handler: Handler) -> None:
        """Answer ``command`` with ``handler`` (replacing any handler it had). Raises nothing."""
        self.handlers[command] = handler

    def remove_handler(self, command: str) -> None:
        """Make ``command`` unknown (``CommandNotFound``). Raises nothing."""
        self.handlers.pop(command, None)

    def commands(self, name: str | None = None) -> list[ReceivedCommand]:
        """The commands received so far, optionally only those named ``name``. Raises nothing."""
        return [c for c in self.received if name is None or c.command == name]

    def _record(self, record: ReceivedCommand) -> None:
        self.received.append(record)
        if self._command_waiters:
            for name, count, fut in list(self._command_waiters):
                seen = self.commands(name)
                if len(seen) >= count and not fut.done():
                    fut.set_result(seen[count - 1])

    async def wait_for_command(
        self, name: str, count: int = 1, timeout: float = 10.0
    ) -> ReceivedCommand:
        """Wait until ``count`` commands named ``name`` were received; return the
        ``count``-th one.

        Raises:
            TimeoutError: not received in time.
        """
        seen = self.commands(name)
        if len(seen) >= count:
            return seen[count - 1]
        fut: asyncio.Future[ReceivedCommand] = asyncio.get_running_loop().create_future()
        waiter = (name, count, fut)
        self._command_waiters.append(waiter)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError as exc:
            raise TimeoutError(f"fake QMP: no {count}x {name} within {timeout}s") from exc
        finally:
            self._command_waiters.remove(waiter)

    # faults -----------------------------------------------------------------------------------

    def add_fault(self, command: str, fault: Fault) -> Fault:
        """Inject ``fault`` into the next ``fault.times`` commands ``command`` (all if None).

        Raises nothing.
        """
        self.faults.setdefault(command, []).append(fault)
        return fault

    def delay(self, command: str, seconds: float, *, times: int | None = None) -> Fault:
        """Answer ``command`` only after ``seconds`` (in-band commands after it wait too).

        Raises nothing.
        """
        return self.add_fault(command, Fault(FaultKind.DELAY, seconds, times))

    def never_answer(self, command: str, *, times: int | None = None) -> Fault:
        """Swallow ``command``: record it, never answer it. Raises nothing."""
        return self.add_fault(command, Fault(FaultKind.NEVER_ANSWER, 0.0, times))

    def disconnect_on(self, command: str, *, times: int | None = 1) -> Fault:
        """Close the client's connection when ``command`` arrives (as if QEMU died then).

        Raises nothing.
        """
        return self.add_fault(command, Fault(FaultKind.DISCONNECT, 0.0, times))

    def clear_faults(self, command: str | None = None) -> None:
        """Remove the faults of ``command``, or all faults. Raises nothing."""
        if command is None:
            self.faults.clear()
        else:
            self.faults.pop(command, None)

    def _take_fault(self, command: str) -> Fault | None:
        faults = self.faults.get(command)
        if not faults:
            return None
        fault = faults[0]
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                faults.pop(0)
        return fault

    # events and disconnection -----------------------------------------------------------------

    @staticmethod
    def make_event(name: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """An event message as QEMU sends it, timestamped now. Raises nothing."""
        now = time.time()
        event: dict[str, Any] = {
            "event": name,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)},
        }
        if data is not None:
            event["data"] = dict(data)
        return event

    def _live(self) -> list[FakeQMPConnection]:
        return [c for c in self.connections if c.negotiated and not c.closed]

    async def emit(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every negotiated client (returns once it is written).

        Raises:
            TypeError: ``data`` is not JSON-serialisable.
        """
        event = self.make_event(name, data)
        for conn in self._live():
            await conn.send(event)

    async def flood(
        self,
        name: str,
        count: int,
        data: Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None = None,
        *,
        batch: int = 1000,
    ) -> None:
        """Send ``count`` events ``name`` as fast as possible to every negotiated client.

        Args:
            data: the events' data, or a function of the event's index returning it.
            batch: events per write.

        Raises:
            TypeError: ``data`` is not JSON-serialisable.
        """
        for start in range(0, count, batch):
            chunk = b"".join(
                json.dumps(
                    self.make_event(name, data(i) if callable(data) else data),
                    separators=(",", ":"),
                ).encode() + b"\r\n"
                for i in range(start, min(start + batch, count))
            )
            for conn in self._live():
                await conn.send_raw(chunk)

    async def disconnect_all(self) -> None:
        """Close every client connection now (as if QEMU exited). Raises nothing."""
        for conn in self.connections:
            conn.close()
        await asyncio.sleep(0)

    # the model: chardevs, QOM, serial ports ---------------------------------------------------

    def add_serial_port(
        self, device_id: str, name: str, chardev: str, *, open: bool = False,
        bus: str = "vser0.0",
    ) -> None:
        """Add a ``virtserialport`` device ``device_id`` with its socket chardev. Raises nothing."""
        self.chardevs[chardev] = {
            "filename": f"disconnected:unix:{chardev}.sock,server=on", "frontend-open": open,
        }
        self.qom[f"/machine/peripheral/{device_id}"] = FakeQOMObject(
            "virtserialport", {"name": name, "chardev": chardev, "bus": bus}
        )

    async def set_port_open(self, device_id: str, open: bool, *, emit: bool = True) -> None:
        """Set whether the guest has port ``device_id`` open; emit ``VSERPORT_CHANGE``.

        Raises:
            KeyError: no such port.
        """
        port = self.qom[f"/machine/peripheral/{device_id}"]
        self.chardevs[port.properties["chardev"]]["frontend-open"] = open
        if emit:
            await self.emit("VSERPORT_CHANGE", {"id": device_id, "open": open})

    def add_disk(self, node_name: str, file_node_name: str, filename: str, device_id: str) -> None:
        """Add a qcow2 node on a file node, attached to virtio-blk device ``device_id``.

        Raises nothing.
        """
        self.block_nodes += [
            {"node-name": node_name, "drv": "qcow2", "file": filename, "ro": False,
             "backing_file_depth": 0, "encrypted": False,
             "image": {"filename": filename, "format": "qcow2", "virtual-size": 67108864}},
            {"node-name": file_node_name, "drv": "file", "file": filename, "ro": False,
             "backing_file_depth": 0, "encrypted": False,
             "image": {"filename": filename, "format": "file", "virtual-size": 393216}},
        ]
        self.block_devices.append({
            "device": "", "qdev": f"/machine/peripheral/{device_id}/virtio-backend",
            "locked": False, "removable": False, "type": "unknown", "io-status": "ok",
            "inserted": {"node-name": node_name, "drv": "qcow2", "file": filename,
                         "ro": False, "backing_file_depth": 0, "encrypted": False},
        })
        self.qom[f"/machine/peripheral/{device_id}"] = FakeQOMObject(
            "virtio-blk-pci", {"drive": node_name}
        )

    # jobs -------------------------------------------------------------------------------------

    def add_job_command(
        self,
        command: str,
        *,
        job_type: str = "create",
        duration: float | None = 0.0,
        error: str | None = None,
    ) -> None:
        """Make ``command`` start a job (named by its ``job-id`` argument) like
        ``blockdev-create``: ``created`` -> ``running`` -> (``duration`` seconds; ``None``:
        until cancelled) -> ``waiting`` -> ``pending`` -> ``aborting`` on error or
        cancellation -> ``concluded``; it stays until ``job-dismiss``.

        Raises nothing.
        """
        def handler(call: FakeCall) -> dict[str, Any]:
            job_id = call.arg("job-id", str)
            self.start_job(job_id, job_type, duration=duration, error=error)
            return {}

        self.set_handler(command, handler)

    def start_job(
        self, job_id: str, job_type: str, *, duration: float | None = 0.0,
        error: str | None = None,
    ) -> FakeJob:
        """Start a job now (see :meth:`add_job_command`).

        Raises:
            FakeQMPError: a job with this id exists.
        """
        if job_id in self.jobs:
            raise FakeQMPError("GenericError", f"Job ID '{job_id}' already in use")
        job = FakeJob(job_id, job_type, error=error, duration=duration)
        self.jobs[job_id] = job
        job._task = asyncio.ensure_future(self._run_job(job))
        return job

    async def _set_job_status(self, job: FakeJob, status: str) -> None:
        job.status = status
        await self.emit("JOB_STATUS_CHANGE", {"id": job.id, "status": status})

    async def _run_job(self, job: FakeJob) -> None:
        await asyncio.sleep(0)  # the command's reply goes out first
        await self._set_job_status(job, "created")
        await self._set_job_status(job, "running")
        try:
            await asyncio.wait_for(job._cancelled.wait(), job.duration)
            job.error = "Operation cancelled"
        except asyncio.TimeoutError:
            pass
        if job.error is not None:
            await self._set_job_status(job, "aborting")
        else:
            await self._set_job_status(job, "waiting")
            await self._set_job_status(job, "pending")
        await self._set_job_status(job, "concluded")

    def _install_builtin_handlers(self) -> None:
        h = self.handlers

        def qmp_capabilities(call: FakeCall) -> dict[str, Any]:
            if call.connection.negotiated:
                raise FakeQMPError(
                    "CommandNotFound", "Capabilities negotiation is already complete, "
                    "command ignored",
                )
            enable = call.arg("enable", list, [])
            for cap in enable:
                if cap != "oob":
                    raise FakeQMPError(
                        "GenericError", f"Parameter 'enable' does not accept value '{cap}'"
                    )
            call.connection.oob = "oob" in enable
            call.connection.negotiated = True
            return {}

        def query_status(call: FakeCall) -> dict[str, Any]:
            return {"status": self.status, "singlestep": False,
                    "running": self.status == "running"}

        def query_version(call: FakeCall) -> dict[str, Any]:
            major, minor, micro = self.version
            return {"qemu": {"major": major, "minor": minor, "micro": micro},
                    "package": "qmpagent-fake"}

        def query_commands(call: FakeCall) -> list[dict[str, str]]:
            return [{"name": name} for name in sorted(self.handlers)]

        def query_chardev(call: FakeCall) -> list[dict[str, Any]]:
            return [{"label": label, **info} for label, info in self.chardevs.items()]

        def qom_list(call: FakeCall) -> list[dict[str, str]]:
            path = call.arg("path", str).rstrip("/") or "/"
            obj = self.qom.get(path)
            if obj is None:
                raise FakeQMPError("DeviceNotFound", f"Device '{path}' not found")
            entries = [{"name": "type", "type": "string"}]
            entries += [{"name": p, "type": "string"} for p in obj.properties]
            prefix = path + "/"
            for child_path, child in self.qom.items():
                rest = child_path[len(prefix):]
                if child_path.startswith(prefix) and rest and "/" not in rest:
                    entries.append({"name": rest, "type": f"child<{child.type}>"})
            return entries

        def qom_get(call: FakeCall) -> Any:
            path = call.arg("path", str).rstrip("/") or "/"
            prop = call.arg("property", str)
            obj = self.qom.get(path)
            if obj is None:
                raise FakeQMPError("DeviceNotFound", f"Device '{path}' not found")
            if prop == "type":
                return obj.type
            if prop not in obj.properties:
                raise FakeQMPError("GenericError", f"Property '{obj.type}.{prop}' not found")
            return obj.properties[prop]

        def query_block(call: FakeCall) -> list[dict[str, Any]]:
            return list(self.block_devices)

        def query_named_block_nodes(call: FakeCall) -> list[dict[str, Any]]:
            call.arg("flat", bool, False)
            return list(self.block_nodes)

        def query_jobs(call: FakeCall) -> list[dict[str, Any]]:
            return [job.info() for job in self.jobs.values()]

        def find_job(call: FakeCall) -> FakeJob:
            job_id = call.arg("id", str)
            job = self.jobs.get(job_id)
            if job is None:
                raise FakeQMPError("GenericError", f"Job not found: '{job_id}'")
            return job

        def job_cancel(call: FakeCall) -> dict[str, Any]:
            job = find_job(call)
            if job.status in ("concluded", "aborting", "null"):
                raise FakeQMPError(
                    "GenericError",
                    f"Job '{job.id}' in state '{job.status}' cannot accept command verb 'cancel'",
                )
            job._cancelled.set()
            return {}

        async def job_dismiss(call: FakeCall) -> dict[str, Any]:
            job = find_job(call)
            if job.status != "concluded":
                raise FakeQMPError(
                    "GenericError",
                    f"Job '{job.id}' in state '{job.status}' cannot accept command verb 'dismiss'",
                )
            del self.jobs[job.id]
            await self.emit("JOB_STATUS_CHANGE", {"id": job.id, "status": "null"})
            return {}

        async def stop(call: FakeCall) -> dict[str, Any]:
            self.status = "paused"
            await self.emit("STOP")
            return {}

        async def cont(call: FakeCall) -> dict[str, Any]:
            self.status = "running"
            await self.emit("RESUME")
            return {}

        h.update({
            "qmp_capabilities": qmp_capabilities,
            "query-status": query_status,
            "query-version": query_version,
            "query-commands": query_commands,
            "query-chardev": query_chardev,
            "qom-list": qom_list,
            "qom-get": qom_get,
            "query-block": query_block,
            "query-named-block-nodes": query_named_block_nodes,
            "query-jobs": query_jobs,
            "job-cancel": job_cancel,
            "job-dismiss": job_dismiss,
            "stop": stop,
            "cont": cont,
        })

