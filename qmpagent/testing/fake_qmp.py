"""A fake QMP server for fast tests of code that drives QEMU: :class:`FakeQMPServer`.

It is a real asyncio server (unix socket by default, or TCP on 127.0.0.1) that speaks QMP like
QEMU 7.2: greeting with ``capabilities: ["oob"]``, ``qmp_capabilities`` negotiation, ``id`` echo,
errors as ``{"error": {"class": ..., "desc": ...}}``, events with timestamps, and a JSON *stream*
parser (clients such as ``qemu.qmp`` send messages without a trailing newline)::

    async with FakeQMPServer() as server:
        mon = await qmpagent.Monitor.connect(server.address)
        server.never_answer("query-status")                  # fault injection
        await server.emit("VSERPORT_CHANGE", {"id": "qgaport0", "open": False})
        await server.flood("BLOCK_IO_ERROR", 100_000)
        server.set_handler("query-foo", lambda call: {"foo": call.arguments.get("x")})
        assert server.commands("query-status")               # the record of what was received

Output is formatted exactly like QEMU's (``", "`` and ``": "`` separators, members in QEMU's
QDict order, ``\\r\\n`` after each message; see :func:`~qmpagent.testing.qemu_json`), and the
built-in replies are built in QAPI schema order, so they are byte-identical to QEMU 7.2's
where the values are the same (checked by ``tests/test_conformance.py``).

Commands are answered by *handlers* (a table, :attr:`FakeQMPServer.handlers`, that tests can
extend or override per command). A handler takes a :class:`FakeCall` and returns the
``return`` value (or an awaitable of it), or raises :class:`FakeQMPError` for an error reply.

Built in: ``qmp_capabilities``, ``query-status``, ``query-version``, ``query-commands``,
``query-chardev``, ``qom-list``, ``qom-get``, ``query-block``, ``query-named-block-nodes``
(flat or not), ``query-jobs``, ``job-cancel``, ``job-dismiss``, ``stop``, ``cont``, plus
job-based commands added with :meth:`FakeQMPServer.add_job_command`. With
``block_commands=True`` (as :class:`~qmpagent.testing.FakeVM` does) also the block layer:
``blockdev-create`` (a job; drivers ``file``, which creates the file on disk like QEMU, and
``qcow2``, which writes a real qcow2 header recording the backing file), ``blockdev-add``
(``file``, ``qcow2`` with ``backing: null`` or with its backing chain opened, ``raw``),
``blockdev-del`` and ``transaction`` of ``blockdev-snapshot`` actions, atomic, all or nothing.

The model behind them is public: :attr:`~FakeQMPServer.qom`, :attr:`~FakeQMPServer.chardevs`,
the block graph (:attr:`~FakeQMPServer.nodes`, :attr:`~FakeQMPServer.devices`, queried as
:attr:`~FakeQMPServer.block_nodes` and :attr:`~FakeQMPServer.block_devices`) and
:attr:`~FakeQMPServer.jobs`. Errors of the block layer use QEMU 7.2's texts (e.g. ``Node 'disk0'
is busy: node is used as backing hd of 'ov1'``, ``Block device ov1f is in use``, ``The overlay is
already in use``); the ones listed in ``tests/test_conformance.py`` are checked against real QEMU.

Faults (per command; ``times=None`` means every time): :meth:`~FakeQMPServer.delay`,
:meth:`~FakeQMPServer.never_answer`, :meth:`~FakeQMPServer.disconnect_on` (each before or,
with ``apply=True``, after the command took effect), :meth:`~FakeQMPServer.fail` (an error
reply instead of the command), :meth:`~FakeQMPServer.fail_job` and
:meth:`~FakeQMPServer.delay_job` (for job commands: the job fails, or runs longer); and at any
time :meth:`~FakeQMPServer.emit`, :meth:`~FakeQMPServer.flood`,
:meth:`~FakeQMPServer.disconnect_all`.

Like QEMU, in-band commands of one connection are executed one at a time, in order (a delayed
command delays the ones after it); ``exec-oob`` commands are executed at once. A command that
"never answers" is swallowed (the ones after it are answered). Like QEMU, ``VSERPORT_CHANGE``
sent by the model (:meth:`~FakeQMPServer.set_port_open`) is rate-limited to one event per
second per port, keeping only the latest (delivered at the end of the second, with the
timestamp of when it happened); :meth:`~FakeQMPServer.emit` sends at once, unthrottled.

A bare server serves any number of clients at once; QEMU's ``-qmp`` socket serves one at a
time (``max_clients=1``, as :class:`~qmpagent.testing.FakeVM` uses).

Not modelled: block jobs other than ``blockdev-create``, image data (the qcow2 images have no
clusters allocated), file locking between nodes, other transaction actions, node options
beyond the common ones, and the ``BlockBackend`` permissions of devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..monitor import AGENT_PORT_NAME
from ._block_graph import BlockGraph, BlockLayer, FakeBlockDevice, FakeBlockNode
from ._faults import QMP_KINDS, Fault, FaultKind, FaultTable, Injection
from ._json_reader import QEMUJSONStreamParser
from ._json_writer import qemu_json
from ._qcow2 import Qcow2Header, create_qcow2_image, read_qcow2_header
from ._qmp_backup import FakeBackupJob, FakeBackups, FakeBitmap
from ._qmp_commands import BUILTIN_HANDLERS, block_handlers
from ._qmp_commit import FakeCommitJob, commit_handlers
from ._qmp_error import FakeQMPError
from ._qmp_events import EventThrottle, make_event
from ._qmp_jobs import FakeJob, JobRunner, JobWork
from ._server import AsyncService, SocketListener

__all__ = [
    "FakeBackupJob",
    "FakeBackups",
    "FakeBitmap",
    "FakeBlockDevice",
    "FakeBlockNode",
    "FakeCall",
    "FakeCommitJob",
    "FakeJob",
    "FakeQMPConnection",
    "FakeQMPError",
    "FakeQMPServer",
    "FakeQOMObject",
    "Fault",
    "FaultKind",
    "Injection",
    "Qcow2Header",
    "ReceivedCommand",
    "create_qcow2_image",
    "read_qcow2_header",
]

log = logging.getLogger(__name__)


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
        fault: the fault that applies to this command, if any (job commands read
            :attr:`FaultKind.JOB_ERROR` and :attr:`FaultKind.JOB_DELAY` from here).
    """

    server: FakeQMPServer
    connection: FakeQMPConnection
    command: str
    arguments: dict[str, Any]
    id: Any = None
    oob: bool = False
    fault: Fault | None = None

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


@dataclass
class FakeQOMObject:
    """An object in the fake QOM tree (see :attr:`FakeQMPServer.qom`).

    Attributes:
        type: the QOM type, e.g. ``"virtserialport"``.
        properties: ``qom-get``-able properties.
    """

    type: str
    properties: dict[str, Any] = field(default_factory=dict)


# The faults that lose a command's reply, and what the log says (not applied, applied).
_LOST_REPLY: Final[Mapping[FaultKind, tuple[str, str]]] = {
    FaultKind.NO_REPLY: ("fake QMP: never answering %s", "fake QMP: %s took effect; its reply is lost"),
    FaultKind.DISCONNECT: ("fake QMP: disconnecting on %s", "fake QMP: %s took effect; disconnecting"),
}


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
        """Send one message (a reply, an event, anything) to this client, formatted like QEMU
        (:func:`~qmpagent.testing.qemu_json`, then ``\\r\\n``).

        Silently does nothing when the connection is closed.

        Raises:
            TypeError: ``message`` is not JSON-serialisable.
        """
        await self.send_raw(qemu_json(message).encode("ascii") + b"\r\n")

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
            # QEMU's own reader: values need no separator, errors are answered without an id
            # and the reader recovers as QEMU's does; one message is bounded by _MAX_BUFFER.
            parser = QEMUJSONStreamParser(max_message_size=self._MAX_BUFFER)
            while not self.closed:
                data = await self._reader.read(65536)
                if not data:
                    break
                for event in parser.feed(data):
                    if event.error is not None:
                        await self._send_error(None, "GenericError", event.error)
                    else:
                        await self._dispatch(event.value)
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
        fault = self.server._take_fault(call.command)
        call.fault = fault
        kind = fault.kind if fault is not None else None
        lost = kind in _LOST_REPLY
        if fault is not None and lost and not fault.apply:
            self._lose_reply(call, fault, applied=False)
            return
        if fault is not None and kind is FaultKind.DELAY:
            await asyncio.sleep(fault.seconds)
        if fault is not None and kind is FaultKind.ERROR and self.negotiated:
            await self._send_error(call.id, fault.error_class, fault.desc)
            return
        reply = await self._run(call)
        if fault is not None and lost:
            self._lose_reply(call, fault, applied=True)
            return
        await self.send(reply)

    def _lose_reply(self, call: FakeCall, fault: Fault, *, applied: bool) -> None:
        # The reply never arrives: the command is swallowed, or the connection drops
        # (before the command ran, or, with ``apply``, after it took effect).
        log.debug(_LOST_REPLY[fault.kind][applied], call.command)
        if fault.kind is FaultKind.DISCONNECT:
            self.close()

    async def _run(self, call: FakeCall) -> dict[str, Any]:
        """Execute ``call``; return the reply message (a result or an error)."""
        if not self.negotiated and call.command != "qmp_capabilities":
            return _error_reply(
                call.id, "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            )
        handler = self.server.handlers.get(call.command)
        if handler is None:
            return _error_reply(
                call.id, "CommandNotFound", f"The command {call.command} has not been found"
            )
        try:
            result = handler(call)
            if inspect.isawaitable(result):
                result = await result
        except FakeQMPError as exc:
            return _error_reply(call.id, exc.error_class, exc.desc)
        except Exception as exc:  # a broken handler: answer, and say so in the log
            log.exception("fake QMP handler for %s failed", call.command)
            return _error_reply(call.id, "GenericError", f"fake handler failed: {exc!r}")
        reply: dict[str, Any] = {"return": {} if result is None else result}
        if call.id is not None:
            reply["id"] = call.id
        return reply

    async def _send_error(self, msg_id: Any, error_class: str, desc: str) -> None:
        await self.send(_error_reply(msg_id, error_class, desc))


def _error_reply(msg_id: Any, error_class: str, desc: str) -> dict[str, Any]:
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if msg_id is not None:
        reply["id"] = msg_id
    return reply


@dataclass(frozen=True)
class QEMUProfile:
    """How one real QEMU version answers where versions differ (each seen on that version in
    the test guest and checked by the conformance suite).

    Attributes:
        version: the version this profile was checked against.
        status_singlestep: ``query-status`` has ``singlestep`` (gone in 10.0).
        node_active: block node entries have ``active`` (new in 10.0).
    """

    version: tuple[int, int, int]
    status_singlestep: bool
    node_active: bool


#: QEMU 7.2 (Debian 12) and 10.0 (Debian 13), by ``(major, minor)``.
QEMU_PROFILES: Final[Mapping[tuple[int, int], QEMUProfile]] = {
    (7, 2): QEMUProfile((7, 2, 0), status_singlestep=True, node_active=False),
    (10, 0): QEMUProfile((10, 0, 13), status_singlestep=False, node_active=True),
}


def qemu_profile(version: tuple[int, int, int]) -> QEMUProfile:
    """The :class:`QEMUProfile` of ``version``: its ``(major, minor)`` if known, else the newest
    known one at or below it (7.2 for anything older)."""
    below = [k for k in QEMU_PROFILES if k <= version[:2]]
    return QEMU_PROFILES[max(below)] if below else QEMU_PROFILES[(7, 2)]


class FakeQMPServer(AsyncService):
    """A QMP server that behaves like QEMU's monitor, for tests. Use it as an async context
    manager (or :meth:`start` / :meth:`close`).

    Args:
        path: the unix socket path (default: a fresh temporary directory, removed on close).
        tcp: listen on ``127.0.0.1`` and a free port instead of a unix socket.
        agent_port: create a guest-agent virtio-serial port like the test guest's
            (device ``qgaport0``, chardev ``qga0``, name ``org.qemu.guest_agent.0``).
        agent_port_open: whether the guest has that port open initially.
        version: the QEMU version in the greeting; it also chooses which real QEMU the fake
            answers like where versions differ (:func:`qemu_profile`): 7.2 (the default) or 10.0.
        package: the ``package`` string in the greeting.
        disk: add the default disk: node ``disk0`` (qcow2) on ``file0``, image
            ``/fake/data0.qcow2`` (which need not exist), device ``vblk0``.
        block_commands: install ``blockdev-create``, ``blockdev-add``, ``blockdev-del`` and
            ``transaction`` (off by default: a bare server answers them ``CommandNotFound``).
        vserport_rate_limit: seconds between two ``VSERPORT_CHANGE`` events of one port sent
            by the model (QEMU: 1.0); 0 sends them at once.
        job_duration: seconds a built-in ``blockdev-create`` job runs before it concludes.
        max_clients: serve at most this many clients at a time; the others wait, unserved
            (no greeting), like QEMU's ``-qmp`` socket, which serves one (``None``: no limit).

    Attributes:
        address: where clients connect (a path str, or ``(host, port)``).
        handlers: command name -> :data:`Handler`; add, replace or delete entries freely.
        received: every command received, in order (a :class:`ReceivedCommand` each).
        faults: command name -> its injected :class:`Fault` s, first applicable first (a view
            of :attr:`injections`).
        connections: every connection accepted so far (closed ones too).
        status: the run state ``query-status`` reports (``"running"``, ``"paused"``, ...).
        chardevs: chardev label -> ``{"filename": ..., "frontend-open": ...}``.
        qom: QOM path -> :class:`FakeQOMObject` (``qom-list`` lists children and properties).
        nodes: the block graph: node name -> :class:`FakeBlockNode`, oldest first.
        devices: qdev id -> :class:`FakeBlockDevice`.
        jobs: job id -> :class:`FakeJob`.
        rate_limits: event name -> minimum seconds between two events of one key (the model's
            events only; see :meth:`queue_event`).
        commit_rate: bytes a second an active ``block-commit`` copies (before its ``speed``).
        commit_size: bytes an active commit has to copy when it starts.
        guest_write_rate: bytes a second the guest dirties while a commit runs (as fast as
            ``commit_rate``: the job is never ready, as under heavy writes).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        tcp: bool = False,
        agent_port: bool = True,
        agent_port_open: bool = True,
        version: tuple[int, int, int] = (7, 2, 0),
        package: str = "qmpagent-fake",
        disk: bool = True,
        block_commands: bool = False,
        vserport_rate_limit: float = 1.0,
        job_duration: float = 0.0,
        max_clients: int | None = None,
    ) -> None:
        self._slots = asyncio.Semaphore(max_clients) if max_clients is not None else None
        self._waiting: set[asyncio.StreamWriter] = set()
        self._closing = False
        self._listener = SocketListener(
            self._accept, path=path, host="127.0.0.1" if tcp else None,
            socket_name="qmp.sock", tmp_prefix="qmpagent-fakeqmp-",
        )
        self._command_waiters: list[tuple[str, int, asyncio.Future[ReceivedCommand]]] = []
        self._block_nodes_override: list[dict[str, Any]] | None = None
        self._block_devices_override: list[dict[str, Any]] | None = None
        self.version = version
        self.package = package
        #: The real QEMU version the fake answers like.
        self.profile = qemu_profile(version)
        self._block = BlockLayer(node_active=self.profile.node_active)
        self.job_duration = job_duration
        self.address: str | tuple[str, int] = ""
        self.handlers: dict[str, Handler] = {}
        self.received: list[ReceivedCommand] = []
        self._faults = FaultTable(QMP_KINDS)
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
        self.jobs: dict[str, FakeJob] = {}
        self.rate_limits: dict[str, float] = {"VSERPORT_CHANGE": vserport_rate_limit}
        self.commit_rate: float = 1 << 30
        self.commit_size: int = 8 << 20
        self.guest_write_rate: float = 0.0
        self._job_runner = JobRunner(lambda: self.jobs, self.emit)
        self._throttle = EventThrottle(
            self._send_event, lambda name: self.rate_limits.get(name, 0.0)
        )
        self.handlers.update(BUILTIN_HANDLERS)
        if block_commands:
            self.handlers.update(block_handlers(self._block, self._start_announced_job))
            self.handlers.update(commit_handlers(self, self._follow_roots))
        if agent_port:
            self.qom["/machine/peripheral/vser0"] = FakeQOMObject("virtio-serial-pci")
            self.add_serial_port("qgaport0", AGENT_PORT_NAME, "qga0", open=agent_port_open)
        if disk:
            self.add_disk("disk0", "file0", "/fake/data0.qcow2", "vblk0")
        #: Dirty bitmaps and backup jobs (a :class:`FakeBackups`; ``blockdev-backup`` runs in a
        #: ``transaction``).
        self.backups = FakeBackups(self)
        if block_commands:
            self.handlers.update(self.backups.handlers(
                self.handlers["query-named-block-nodes"], self.handlers.get("blockdev-del")))

    def __repr__(self) -> str:
        return f"<FakeQMPServer {self.address!r} connections={len(self.connections)}>"

    # lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening.

        Raises:
            OSError: the socket cannot be created.
        """
        await self._listener.start()
        assert self._listener.address is not None
        self.address = self._listener.address
        log.debug("fake QMP server listening on %r", self.address)

    @property
    def listening(self) -> bool:
        """Whether the server accepts connections (started and not closed). Raises nothing."""
        return self._listener.listening

    async def close(self) -> None:
        """Stop listening, close every connection, remove the socket (and temp dir).

        Idempotent. Raises nothing.
        """
        self._closing = True
        self._listener.stop_listening()
        for conn in self.connections:
            conn.close()
        if self._slots is not None:
            for writer in list(self._waiting):
                writer.close()
                self._slots.release()  # wakes a waiting client up, to be turned away
        await self._job_runner.close()
        await self._throttle.close()
        await self._listener.close()  # the connections were closed above: their tasks end

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots is not None:
            # Like QEMU's QMP chardev: the kernel accepts, QEMU serves one client at a
            # time; the next one gets its greeting when the current one has gone.
            self._waiting.add(writer)
            try:
                await self._slots.acquire()
            finally:
                self._waiting.discard(writer)
            if self._closing:
                writer.close()
                return
        try:
            conn = FakeQMPConnection(self, len(self.connections), reader, writer)
            self.connections.append(conn)
            await conn.serve()
        finally:
            if self._slots is not None:
                self._slots.release()

    def greeting(self) -> dict[str, Any]:
        """The greeting sent to each new client. Raises nothing."""
        major, minor, micro = self.version
        return {"QMP": {
            "version": {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": self.package,
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

    def calls(self, name: str | None = None) -> list[ReceivedCommand]:
        """:meth:`commands` under the name the fake agent uses (``FakeAgent.calls``), so a
        test reads both records alike. Raises nothing."""
        return self.commands(name)

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
        self._faults.add(command, fault, times=fault.times)
        return fault

    def inject(
        self, command: str, fault: Fault, *, call: int | None = None, times: int | None = 1
    ) -> Injection:
        """Inject ``fault`` into ``command`` (``"*"``: any), like ``FakeAgent.inject``: only
        its call number ``call`` (1-based, counted since the server started; for ``"*"`` over
        all commands), or else its next ``times`` calls (``None``: all of them).

        Raises:
            ValueError: ``call`` or ``times`` below 1, or a kind QMP does not model (the
                agent-only ones, e.g. ``GARBAGE``).
        """
        return self._faults.add(command, fault, call=call, times=times)

    @property
    def injections(self) -> list[Injection]:
        """The injections that can still apply, oldest first. Raises nothing."""
        return self._faults.active

    @property
    def faults(self) -> dict[str, list[Fault]]:
        """Command name -> the faults that can still apply to it, first applicable first
        (a view of :attr:`injections`). Raises nothing."""
        view: dict[str, list[Fault]] = {}
        for injection in self._faults.active:
            view.setdefault(injection.command, []).append(injection.fault)
        return view

    def delay(self, command: str, seconds: float, *, times: int | None = None) -> Fault:
        """Answer ``command`` only after ``seconds`` (in-band commands after it wait too); the
        command takes effect after the delay.

        Raises nothing.
        """
        return self.add_fault(command, Fault(FaultKind.DELAY, seconds, times))

    def never_answer(
        self, command: str, *, times: int | None = None, apply: bool = False
    ) -> Fault:
        """Swallow ``command``: record it, never answer it. With ``apply`` it takes effect
        (its reply is lost). Raises nothing."""
        return self.add_fault(command, Fault(FaultKind.NEVER_ANSWER, 0.0, times, apply=apply))

    def disconnect_on(
        self, command: str, *, times: int | None = 1, apply: bool = False
    ) -> Fault:
        """Close the client's connection when ``command`` arrives (as if QEMU died then); with
        ``apply``, after the command took effect (the reply is lost).

        Raises nothing.
        """
        return self.add_fault(command, Fault(FaultKind.DISCONNECT, 0.0, times, apply=apply))

    def fail(
        self,
        command: str,
        desc: str = "injected fault",
        error_class: str = "GenericError",
        *,
        times: int | None = 1,
    ) -> Fault:
        """Answer ``command`` with an error instead of executing it (e.g. a ``transaction``
        that QEMU refuses: nothing is applied). Raises nothing."""
        return self.add_fault(
            command, Fault(FaultKind.ERROR, times=times, error_class=error_class, desc=desc)
        )

    def fail_job(self, command: str, desc: str, *, times: int | None = 1) -> Fault:
        """Let the job started by ``command`` (e.g. ``blockdev-create``) conclude with the
        error ``desc``, without its effect. Raises nothing."""
        return self.add_fault(command, Fault(FaultKind.JOB_ERROR, times=times, desc=desc))

    def delay_job(self, command: str, seconds: float, *, times: int | None = 1) -> Fault:
        """Let the job started by ``command`` run ``seconds`` longer. Raises nothing."""
        return self.add_fault(command, Fault(FaultKind.JOB_DELAY, seconds, times))

    def clear_faults(self, command: str | None = None) -> None:
        """Remove the faults of ``command``, or all faults. Raises nothing."""
        self._faults.clear(command)

    def _take_fault(self, command: str) -> Fault | None:
        injection, _ = self._faults.call(command)
        return injection.fault if injection is not None else None

    # events and disconnection -----------------------------------------------------------------

    @staticmethod
    def make_event(name: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """An event message as QEMU sends it, timestamped now. Raises nothing."""
        return make_event(name, data)

    def _live(self) -> list[FakeQMPConnection]:
        return [c for c in self.connections if c.negotiated and not c.closed]

    async def emit(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every negotiated client now (returns once it is written), not
        rate-limited (see :meth:`queue_event` for QEMU's throttling).

        Raises:
            TypeError: ``data`` is not JSON-serialisable.
        """
        await self._send_event(self.make_event(name, data))

    async def _send_event(self, event: Mapping[str, Any]) -> None:
        for conn in self._live():
            await conn.send(event)

    async def queue_event(
        self, name: str, data: Mapping[str, Any] | None = None, *, key: str | None = None
    ) -> None:
        """Send an event the way QEMU's monitor does: events listed in :attr:`rate_limits` are
        throttled per ``key`` (for ``VSERPORT_CHANGE``: the port id): the first one goes out
        at once, later ones within the period replace each other and only the latest is sent
        when the period ends, with the timestamp of when it was queued.

        Raises:
            TypeError: ``data`` is not JSON-serialisable.
        """
        await self._throttle.queue(name, data, key=key)

    async def settle_events(self, timeout: float = 5.0) -> None:
        """Wait until every throttled event has been sent and every throttle period has
        passed, so that the next event of the model goes out at once (see :meth:`queue_event`).

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        await self._throttle.settle(timeout)

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
                qemu_json(self.make_event(name, data(i) if callable(data) else data)).encode()
                + b"\r\n"
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
        """Set whether the guest has port ``device_id`` open; emit ``VSERPORT_CHANGE``
        (rate-limited like QEMU: see :meth:`queue_event`).

        Raises:
            KeyError: no such port.
        """
        port = self.qom[f"/machine/peripheral/{device_id}"]
        self.chardevs[port.properties["chardev"]]["frontend-open"] = open
        if emit:
            await self.queue_event("VSERPORT_CHANGE", {"id": device_id, "open": open}, key=device_id)

    def port_open(self, device_id: str) -> bool:
        """Whether port ``device_id`` is open in the guest (``frontend-open``).

        Raises:
            KeyError: no such port.
        """
        port = self.qom[f"/machine/peripheral/{device_id}"]
        return bool(self.chardevs[port.properties["chardev"]]["frontend-open"])

    # the model: the block graph ---------------------------------------------------------------

    @property
    def nodes(self) -> dict[str, FakeBlockNode]:
        """The block graph: node name -> :class:`FakeBlockNode`, oldest first (QEMU lists them
        newest first). Change it only through the commands and helpers. Raises nothing."""
        return self._block.graph.nodes

    @property
    def devices(self) -> dict[str, FakeBlockDevice]:
        """The block devices: qdev id -> :class:`FakeBlockDevice`. Raises nothing."""
        return self._block.graph.devices

    @property
    def block_nodes(self) -> list[dict[str, Any]]:
        """``query-named-block-nodes`` (flat) entries as QEMU sends them, newest first.

        Computed from :attr:`nodes`; assigning a list makes the query return that list
        instead (``None`` goes back to the graph). Raises nothing.
        """
        if self._block_nodes_override is not None:
            return self._block_nodes_override
        return [self.node_info(n, flat=True) for n in reversed(list(self._block.graph.nodes))]

    @block_nodes.setter
    def block_nodes(self, value: list[dict[str, Any]] | None) -> None:
        self._block_nodes_override = value

    @property
    def block_devices(self) -> list[dict[str, Any]]:
        """``query-block`` entries as QEMU sends them. Computed from :attr:`devices`; assigning
        a list makes the query return that list instead. Raises nothing."""
        if self._block_devices_override is not None:
            return self._block_devices_override
        return [self._block.device_info(d) for d in self._block.graph.devices.values()]

    @block_devices.setter
    def block_devices(self, value: list[dict[str, Any]] | None) -> None:
        self._block_devices_override = value

    def add_disk(self, node_name: str, file_node_name: str, filename: str, device_id: str) -> None:
        """Add a qcow2 node on a file node, attached to virtio-blk device ``device_id``, without
        touching the disk (``filename`` need not exist; 64 MiB virtual size).

        Raises nothing.
        """
        self._block.add_disk(node_name, file_node_name, filename)
        self.attach_device(device_id, node_name)

    def attach_device(self, device_id: str, node_name: str) -> FakeBlockDevice:
        """Attach a virtio-blk device ``device_id`` (``-device virtio-blk-pci,drive=...``) with
        root node ``node_name``.

        Raises:
            FakeQMPError: no such node.
        """
        device = self._block.attach_device(device_id, node_name)
        self.qom[f"/machine/peripheral/{device_id}"] = FakeQOMObject(
            "virtio-blk-pci", {"drive": node_name}
        )
        return device

    def active_node(self, device_id: str) -> str | None:
        """The root node of block device ``device_id``.

        Raises:
            KeyError: no such device.
        """
        return self._block.graph.devices[device_id].root

    def blockdev_add(self, options: Mapping[str, Any]) -> FakeBlockNode:
        """Add a node as ``blockdev-add`` (or ``-blockdev``) does; return it.

        Raises:
            FakeQMPError: what QEMU would answer.
        """
        return self._block.add(dict(options))

    def blockdev_del(self, node_name: str) -> None:
        """Delete a node as ``blockdev-del`` does.

        Raises:
            FakeQMPError: what QEMU would answer.
        """
        self._block.blockdev_del(node_name)

    def snapshot(self, actions: Sequence[Mapping[str, Any]]) -> None:
        """Apply ``blockdev-snapshot`` actions as one ``transaction``: all or nothing.

        Raises:
            FakeQMPError: what QEMU would answer (nothing was applied).
        """
        self._block.snapshot(actions)
        self._follow_roots()

    def _follow_roots(self, job: FakeCommitJob | None = None) -> None:
        for device in self._block.graph.devices.values():  # QOM follows the new roots
            obj = self.qom.get(f"/machine/peripheral/{device.device_id}")
            if obj is not None:
                obj.properties["drive"] = device.root

    def nodes_graph(self) -> BlockGraph:
        """The current block graph (nodes and devices; replaced by each transaction).
        Raises nothing."""
        return self._block.graph

    def node_info(self, node_name: str, *, flat: bool = True) -> dict[str, Any]:
        """The ``query-named-block-nodes`` entry of a node (``BlockDeviceInfo``); as in QEMU,
        ``backing_file_depth`` is 0 and there is no ``backing-image`` when ``flat``.

        Raises:
            KeyError: no such node.
        """
        return self._block.node_info(node_name, flat=flat)

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
        ``blockdev-create``: ``created`` -> ``running`` (both before the command's reply, as
        in QEMU) -> (``duration`` seconds; ``None``: until cancelled) -> ``waiting`` ->
        ``pending`` -> ``aborting`` on error or cancellation -> ``concluded``; it stays until
        ``job-dismiss``. :meth:`fail_job` and :meth:`delay_job` apply.

        Raises nothing.
        """
        async def handler(call: FakeCall) -> dict[str, Any]:
            job_id = call.arg("job-id", str)
            await self._start_announced_job(call, job_id, job_type, duration, error, None)
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
        return self._job_runner.start(job_id, job_type, duration=duration, error=error)

    async def _start_announced_job(
        self, call: FakeCall, job_id: str, job_type: str, duration: float | None,
        error: str | None, work: JobWork | None,
    ) -> FakeJob:
        return await self._job_runner.start_announced(
            call.fault, job_id, job_type, duration, error, work
        )

    # built-in handlers ------------------------------------------------------------------------

    def named_block_nodes(self, *, flat: bool = True) -> list[dict[str, Any]]:
        """What ``query-named-block-nodes`` answers: :attr:`block_nodes` if assigned, else the
        graph's nodes, newest first (``flat``: without their backing images). Raises nothing."""
        if self._block_nodes_override is not None:
            return list(self._block_nodes_override)
        return [self.node_info(n, flat=flat) for n in reversed(list(self._block.graph.nodes))]
