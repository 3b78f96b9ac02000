"""``GuestAgent``: a native asyncio client of the QEMU guest agent.

The protocol work (framing, 0xFF resync, id matching, size limits) is done by the sans-I/O
:class:`~qmpagent.agent_protocol.AgentConnection`; this module only moves bytes and owns the
timeouts. One command is in flight at a time; concurrent callers queue on a lock.

The channel is synced on connect. After a timeout, a cancellation or a protocol error the channel
is out of sync and is resynchronised before the next command (not before every command: a sync
costs a round trip, and per-command ids already catch stale replies).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio

from . import _addresses
from ._closing import AsyncClosing
from ._shield import run_to_completion
from .agent_protocol import (
    DEFAULT_MAX_REPLY_SIZE,
    SMALL_REPLY_COMMANDS,
    SMALL_REPLY_SIZE,
    AgentConnection,
    ErrorReply,
    NeedData,
    Reply,
    State,
    Synced,
    Yield,
)
from .errors import (
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    UsageError,
)
from .timeouts import USE_CLIENT_DEFAULT, Timeout, deadline, deadline_raising, resolve_timeout

__all__ = [
    "AgentAddress",
    "AgentInfo",
    "CommandInfo",
    "ExecResult",
    "FreezeStatus",
    "GuestAgent",
    "check_address",
]

log = logging.getLogger(__name__)

#: Commands that send no reply when they succeed.
NO_REPLY_COMMANDS: Final = frozenset(
    {"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"}
)

_READ_CHUNK: Final = 256 * 1024

#: Commands whose replies are small by nature. The protocol core applies every command's own
#: limit (:func:`~qmpagent.agent_protocol.reply_limit`); these names are kept for the code here.
_SMALL_REPLY_COMMANDS: Final = SMALL_REPLY_COMMANDS
_SMALL_REPLY_SIZE: Final = SMALL_REPLY_SIZE
_FILE_READ_CHUNK: Final = 1024 * 1024
# How long close() lets queued bytes go out before it drops them.
_CLOSE_GRACE: Final = 2.0


#: Where the agent listens: a unix socket path, ``(host, port)``, or ``("vsock", cid, port)``.
AgentAddress = str | os.PathLike[str] | tuple[str, int] | tuple[str, int, int]


class FreezeStatus(str, enum.Enum):
    """The guest's filesystem freeze state, as ``guest-fsfreeze-status`` reports it."""

    THAWED = "thawed"
    FROZEN = "frozen"


@dataclass(frozen=True, slots=True)
class CommandInfo:
    """One entry of ``guest-info``'s ``supported_commands``."""

    name: str
    enabled: bool
    success_response: bool


class AgentInfo(dict[str, Any]):
    """The reply of ``guest-info``: the dict as the agent returned it (``version``,
    ``supported_commands``), with typed accessors. Validated on construction."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        super().__init__(raw)
        version = raw.get("version")
        cmds = raw.get("supported_commands")
        if not isinstance(version, str) or not isinstance(cmds, list):
            raise AgentProtocolError("guest-info: missing version or supported_commands")
        commands: dict[str, CommandInfo] = {}
        for c in cmds:
            if (
                not isinstance(c, dict)
                or not isinstance(c.get("name"), str)
                or not isinstance(c.get("enabled"), bool)
            ):
                raise AgentProtocolError(f"guest-info: malformed command entry {c!r:.200}")
            sr = c.get("success-response", True)
            commands[c["name"]] = CommandInfo(c["name"], c["enabled"], sr is not False)
        self._commands = commands

    @property
    def version(self) -> str:
        """The agent's version, e.g. ``"7.2.22"``."""
        return str(self["version"])

    @property
    def commands(self) -> Mapping[str, CommandInfo]:
        """Every command the agent knows, by name."""
        return self._commands

    def supports(self, command: str) -> bool:
        """Whether the agent knows ``command`` (enabled or not)."""
        return command in self._commands

    def is_enabled(self, command: str) -> bool:
        """Whether ``command`` is known and enabled right now. Note that the agent disables the
        freeze commands while it is frozen: read ``guest-fsfreeze-status`` first."""
        info = self._commands.get(command)
        return info is not None and info.enabled


@dataclass(frozen=True, slots=True)
class ExecResult:
    """The outcome of :meth:`GuestAgent.exec`.

    Attributes:
        pid: the guest process id.
        exitcode: its exit status, or None when it was killed by a signal.
        signal: the signal that killed it, or None.
        stdout: captured standard output (bytes).
        stderr: captured standard error (bytes).
        stdout_truncated: the agent truncated stdout (it keeps at most 16 MiB).
        stderr_truncated: the agent truncated stderr.
    """

    pid: int
    exitcode: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        """Whether the process exited with status 0."""
        return self.exitcode == 0

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")


def _expect(command: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    # bool is an int subclass: a count of True is not a count.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise AgentProtocolError(f"{command}: expected {kind}, got bool")
    if not isinstance(value, kind):
        raise AgentProtocolError(f"{command}: unexpected reply type {type(value).__name__}")
    return value


_INT64_MAX: Final = 2**63 - 1


def _count(command: str, value: Any) -> int:
    """A filesystem count from the guest: an int in 0..int64 max (what QAPI's ``int`` holds),
    else AgentProtocolError."""
    n: int = _expect(command, value, int)
    if n < 0:
        raise AgentProtocolError(f"{command}: negative count {n}")
    if n > _INT64_MAX:
        raise AgentProtocolError(f"{command}: count {n:.3g} is out of range (not an int64)")
    return n


def check_address(address: object) -> AgentAddress:
    """Check an agent address without connecting: a unix socket path (``str``, ``bytes`` or
    path-like; on Linux a leading NUL names an abstract socket), ``(host, port)`` with a port in
    1..65535, or ``("vsock", cid, port)`` with an unsigned 32-bit CID and port.

    Returns:
        The address, normalised (a path-like becomes its path).

    Raises:
        UsageError: anything else, e.g. port 70000, a NUL inside a path, an unencodable path or
            host name, a ``bool`` where a number belongs.
    """
    what = "agent address"
    if isinstance(address, (str, bytes, os.PathLike)):
        path = _addresses.unix_path(address, what)
        return path if isinstance(path, str) else os.fsdecode(path)
    if isinstance(address, tuple) and len(address) == 3 and address[0] == "vsock":
        return (
            "vsock",
            _addresses.vsock_field(address[1], "cid", what),
            _addresses.vsock_field(address[2], "port", what),
        )
    if isinstance(address, tuple) and len(address) == 2:
        return (_addresses.host(address[0], what), _addresses.tcp_port(address[1], what))
    raise UsageError(
        f"bad agent address {address!r:.100}: expected a unix path, (host, port) or "
        "('vsock', cid, port)"
    )


async def _open_stream(
    address: AgentAddress,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a checked address (see :func:`check_address`)."""
    limit = _READ_CHUNK
    try:
        if isinstance(address, (str, os.PathLike)):
            return await asyncio.open_unix_connection(os.fspath(address), limit=limit)
        if len(address) == 2:
            host, port = address
            return await asyncio.open_connection(host, port, limit=limit)
        _, cid, port = address
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            raise AgentUnavailable("this platform has no AF_VSOCK")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=limit)
    except (ValueError, OverflowError) as exc:
        # What check_address cannot foresee (the socket layer's own argument checks).
        raise UsageError(f"bad agent address {address!r:.100}: {exc}") from exc


class GuestAgent(AsyncClosing):
    """A connection to a QEMU guest agent.

    Make one with :meth:`connect`; use it as an async context manager or call :meth:`close`.

    Args (of :meth:`connect`):
        timeout: the default timeout of every command, in seconds (``None``: wait forever,
            not recommended: the guest is untrusted). Each method takes ``timeout=`` to override.
        max_reply_size: the longest reply accepted, in bytes.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float | None = 5.0,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
        request_ids: bool = False,
        name: str = "agent",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = AgentConnection(max_reply_size, request_ids=request_ids)
        self._lock = asyncio.Lock()
        self.timeout = timeout
        self.name = name
        self._log = log.getChild(name)
        self._closed = False
        self._hold = False  # see hold_reading
        #: Syncs performed on this connection (the first one on connect included).
        self.syncs = 0
        #: Commands handed to the transport so far (syncs not counted), and the last one. A
        #: command counted here reaches the agent even if its caller gave up: what tells "timed
        #: out before sending" from "sent, reply lost".
        self.requests_written = 0
        self.last_written: str | None = None

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        address: AgentAddress,
        *,
        timeout: float | None = 5.0,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
        request_ids: bool = False,
    ) -> GuestAgent:
        """Connect to the agent at ``address`` and sync the channel before returning.

        Args:
            address: a unix socket path, ``(host, port)``, or ``("vsock", cid, port)``.
            timeout: bounds the connect and the sync, and is the client's default per-command
                timeout afterwards.
            max_reply_size: the longest reply line accepted, in bytes.
            request_ids: also tag every command with a random ``"id"`` and drop replies that do
                not echo it (see :class:`~qmpagent.agent_protocol.AgentConnection`). Off by
                default: the channel is resynced after anything that can leave a stray reply,
                and an id costs qemu-ga about 10% of a round trip.

        Raises:
            AgentUnavailable: cannot connect, or no answer to ``guest-sync-delimited``.
            UsageError: a malformed address (see :func:`check_address`), before anything is
                tried.
        """
        address = check_address(address)
        name = str(address) if not isinstance(address, tuple) else ":".join(map(str, address))
        try:
            async with deadline_raising(
                timeout, lambda: AgentUnavailable(f"connecting to the agent at {name} timed out")
            ):
                reader, writer = await _open_stream(address)
        except OSError as exc:
            raise AgentUnavailable(f"cannot connect to the agent at {name}: {exc}") from exc
        agent = cls(
            reader,
            writer,
            timeout=timeout,
            max_reply_size=max_reply_size,
            request_ids=request_ids,
            name=name,
        )
        try:
            await agent.sync()
        except BaseException:
            await agent.close()
            raise
        return agent

    async def close(self) -> None:
        """Close the connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._conn.receive_eof()
        self._writer.close()
        await run_to_completion(self._flush_or_abort())

    async def _flush_or_abort(self) -> None:
        try:
            async with deadline(_CLOSE_GRACE):
                with contextlib.suppress(OSError, RuntimeError):
                    await self._writer.wait_closed()
        except TimeoutError:
            # The guest stopped reading: drop what is still queued (it could be a freeze we
            # gave up on) rather than let the transport deliver it later.
            self._writer.transport.abort()

    @property
    def is_connected(self) -> bool:
        """Whether the connection is open (it may still be out of sync)."""
        return not self._closed and self._conn.state is not State.CLOSED

    def socket_fileno(self) -> int | None:
        """The connected socket's file descriptor, or None (closed, or not a socket): what the
        freeze guard (:mod:`qmpagent.guard`) is handed a duplicate of. Do not read from it or
        change its flags while this client is in use."""
        if not self.is_connected:
            return None
        sock = self._writer.get_extra_info("socket")
        try:
            fd = sock.fileno() if sock is not None else -1
        except (OSError, ValueError):
            return None
        return fd if isinstance(fd, int) and fd >= 0 else None

    def hold_reading(self, hold: bool) -> None:
        """Stop (``True``) or resume (``False``) reading from the socket while no command of
        this client is in flight (a command reads while it waits for its reply, then stops
        again): while the freeze guard may speak on a duplicate of the socket
        (:mod:`qmpagent.guard`), only one process may read it. Raises nothing."""
        self._hold = hold
        self._set_reading(not hold)

    def _set_reading(self, reading: bool) -> None:
        transport = self._writer.transport
        with contextlib.suppress(AttributeError, RuntimeError, OSError):
            if reading:
                transport.resume_reading()  # type: ignore[attr-defined]
            else:
                transport.pause_reading()  # type: ignore[attr-defined]

    @property
    def in_sync(self) -> bool:
        """Whether the next command can be sent without a resync first."""
        return self._conn.in_sync

    # --- core -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _channel(
        self, timeout: Timeout, expired: Callable[[float | None], AgentError]
    ) -> AsyncIterator[None]:
        """The one way to the channel (as websockets' ``send_context``): refuse at once when
        closed, else take the lock, all under one deadline (``timeout``: waiting for the lock
        counts), and raise ``expired(limit)`` if it passes. An exchange that does not complete
        (timeout, cancellation, protocol error, lost connection) leaves the channel out of sync:
        a reply may still come, so it is resynced before the next command."""
        if self._closed:
            raise AgentUnavailable("the agent connection is closed")
        limit = resolve_timeout(timeout, self.timeout)
        async with deadline_raising(limit, lambda: expired(limit)), self._lock:
            try:
                yield
            except BaseException:
                self._conn.abandon()
                raise
            finally:
                if self._hold:
                    self._set_reading(False)  # held between commands: see hold_reading

    async def _send(
        self, data: bytes, command: str | None = None, on_sent: Callable[[], None] | None = None
    ) -> None:
        try:
            self._writer.write(data)
            if command is not None:
                # Handed to the transport: it goes out even if we are cancelled in drain().
                self.requests_written += 1
                self.last_written = command
                if on_sent is not None:
                    on_sent()  # this call's request, and no one else's (see execute)
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            self._conn.receive_eof()
            raise AgentUnavailable(f"writing to the agent failed: {exc}") from exc

    async def _next_event(self) -> Reply | ErrorReply | Synced:
        # The protocol core works in bounded steps: between two, let the loop run other tasks
        # (other VMs' freeze windows), however much a hostile guest sends in one read.
        while True:
            event = self._conn.next_event()
            if isinstance(event, Yield):
                await asyncio.sleep(0)
                continue
            if not isinstance(event, NeedData):
                return event
            if self._hold:
                self._set_reading(True)  # held between commands only: this one reads
            try:
                data = await self._reader.read(_READ_CHUNK)
            except OSError as exc:
                self._conn.receive_eof()
                raise AgentUnavailable(f"reading from the agent failed: {exc}") from exc
            if data:
                self._conn.receive_data(data)
            else:
                self._conn.receive_eof()

    async def _sync_locked(self) -> None:
        await self._send(self._conn.start_sync())
        self.syncs += 1
        event = await self._next_event()
        if not isinstance(event, Synced):  # pragma: no cover - the protocol only yields Synced
            raise AgentProtocolError(f"unexpected event while syncing: {event!r}")

    async def _round_trip(
        self, command: str, arguments: dict[str, Any] | None, on_sent: Callable[[], None] | None
    ) -> Any:
        if not self._conn.in_sync:
            await self._sync_locked()
        limit = self._conn.max_reply_size
        if command in _SMALL_REPLY_COMMANDS:
            limit = min(limit, _SMALL_REPLY_SIZE)
        await self._send(
            self._conn.send_command(command, arguments, max_reply_size=limit), command, on_sent
        )
        event = await self._next_event()
        if isinstance(event, Reply):
            return event.value
        if isinstance(event, ErrorReply):
            raise AgentCommandError(command, event.error_class, event.desc)
        raise AgentProtocolError(f"unexpected event for {command!r}: {event!r}")  # pragma: no cover

    async def _call(
        self,
        command: str,
        arguments: dict[str, Any] | None,
        *,
        timeout: Timeout,
        on_sent: Callable[[], None] | None = None,
    ) -> Any:
        async with self._channel(
            timeout, lambda limit: AgentTimeout(f"{command}: no reply within {limit:g}s")
        ):
            try:
                return await self._round_trip(command, arguments, on_sent)
            except AgentCommandError:
                raise  # the agent's own answer, not a failure: nothing to log
            except AgentError as exc:
                self._log.debug("%s failed: %s", command, exc)
                raise

    # --- generic commands -----------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        on_sent: Callable[[], None] | None = None,
    ) -> Any:
        """Run an agent command and return its ``return`` value.

        Commands that send no reply on success (``guest-shutdown``, ``guest-suspend-*``) return
        ``None`` once sent; see :meth:`execute_no_reply`.

        ``on_sent``, if given, is called (synchronously, once, and only for this call) right
        after this command's request bytes were handed to the transport: from then on the
        request reaches the agent even if the call times out or is cancelled. A call that fails
        without having called it never sent its request. It must not raise or block. (Unlike
        :attr:`requests_written`, it cannot be confused by another caller on this connection.)

        Raises:
            AgentCommandError: the agent answered with an error.
            AgentTimeout: no reply within the timeout (the channel is resynced before the next
                command).
            AgentProtocolError: the reply is malformed or too large.
            AgentUnavailable: the connection is closed or was lost.
        """
        if not isinstance(command, str):
            raise UsageError("command must be a string")
        if command in NO_REPLY_COMMANDS:
            await self.execute_no_reply(command, arguments, timeout=timeout, on_sent=on_sent)
            return None
        return await self._call(command, arguments, timeout=timeout, on_sent=on_sent)

    async def execute_no_reply(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """Send a command that sends no reply on success; return once it is sent
        (``on_sent``: as in :meth:`execute`).

        The channel is synced first if needed, and is resynced before the next command: an
        error reply the agent may still send is then dropped as stale.

        Raises:
            AgentTimeout: the sync or the write did not complete in time.
            AgentUnavailable: the connection is closed or was lost.
        """
        async with self._channel(
            timeout, lambda limit: AgentTimeout(f"{command}: not sent within {limit:g}s")
        ):
            if not self._conn.in_sync:
                await self._sync_locked()
            await self._send(
                self._conn.send_command(command, arguments, expect_reply=False), command, on_sent
            )

    async def sync(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """Resynchronise the channel now (0xFF + ``guest-sync-delimited`` with a fresh random id).

        Raises:
            AgentUnavailable: no matching answer within the timeout, or the connection is lost.
        """
        async with self._channel(
            timeout,
            lambda limit: AgentUnavailable(f"no answer to guest-sync-delimited within {limit:g}s"),
        ):
            await self._sync_locked()

    # --- typed commands -------------------------------------------------------------------

    async def ping(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """``guest-ping``: check that the agent answers.

        Raises:
            AgentUnavailable: no answer within the timeout (also for a lost connection).
        """
        try:
            await self._call("guest-ping", None, timeout=timeout)
        except AgentTimeout as exc:
            raise AgentUnavailable(f"no answer to guest-ping: {exc}") from exc

    async def info(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> AgentInfo:
        """``guest-info``: the agent's version and its commands, with whether each is enabled.

        Raises:
            AgentError: as :meth:`execute`; AgentProtocolError for a malformed reply.
        """
        return AgentInfo(_expect("guest-info", await self._call("guest-info", None, timeout=timeout), dict))

    async def fsfreeze_status(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> FreezeStatus:
        """``guest-fsfreeze-status``: whether the agent has the guest's filesystems frozen.

        Raises:
            AgentError: as :meth:`execute`; AgentProtocolError for an unknown status.
        """
        value = await self._call("guest-fsfreeze-status", None, timeout=timeout)
        try:
            return FreezeStatus(value)
        except ValueError as exc:
            raise AgentProtocolError(f"guest-fsfreeze-status: unknown status {value!r:.100}") from exc

    async def fsfreeze_freeze(
        self,
        mountpoints: Sequence[str] | None = None,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        on_sent: Callable[[], None] | None = None,
    ) -> int:
        """Freeze the guest's filesystems (``guest-fsfreeze-freeze``), or only ``mountpoints``
        (``guest-fsfreeze-freeze-list``). Returns how many filesystems this call froze; a
        filesystem already frozen by another tool in the guest is not counted.

        ``on_sent`` (see :meth:`execute`) tells whether *this* freeze request left: a call that
        failed without calling it froze nothing.

        Raises:
            AgentCommandError: e.g. ``CommandNotFound`` when already frozen via the agent.
            AgentTimeout: no reply in time: the guest MAY be frozen (check the status).
        """
        if mountpoints is None:
            value = await self._call("guest-fsfreeze-freeze", None, timeout=timeout, on_sent=on_sent)
            return _count("guest-fsfreeze-freeze", value)
        if (
            isinstance(mountpoints, str)
            or not isinstance(mountpoints, Sequence)
            or not all(isinstance(m, str) for m in mountpoints)
        ):
            raise UsageError("mountpoints must be a sequence of strings")
        value = await self._call(
            "guest-fsfreeze-freeze-list", {"mountpoints": list(mountpoints)},
            timeout=timeout, on_sent=on_sent,
        )
        return _count("guest-fsfreeze-freeze-list", value)

    async def fsfreeze_thaw(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """``guest-fsfreeze-thaw``: thaw and return how many filesystems were thawed (0 when
        nothing was frozen).

        Raises:
            AgentError: as :meth:`execute`.
        """
        return _count("guest-fsfreeze-thaw", await self._call("guest-fsfreeze-thaw", None, timeout=timeout))

    async def get_osinfo(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> dict[str, Any]:
        """``guest-get-osinfo``: the guest OS description (kernel, distribution...)."""
        value = await self._call("guest-get-osinfo", None, timeout=timeout)
        result: dict[str, Any] = _expect("guest-get-osinfo", value, dict)
        return result

    async def get_fsinfo(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> list[dict[str, Any]]:
        """``guest-get-fsinfo``: the guest's mounted filesystems and their disks."""
        value = _expect("guest-get-fsinfo", await self._call("guest-get-fsinfo", None, timeout=timeout), list)
        for entry in value:
            _expect("guest-get-fsinfo", entry, dict)
            _expect("guest-get-fsinfo mountpoint", entry.get("mountpoint"), str)
        return list(value)

    async def shutdown(
        self, mode: str = "powerdown", *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """``guest-shutdown`` (mode ``powerdown``, ``halt`` or ``reboot``). Returns once sent:
        the agent sends no reply on success; watch QMP for ``SHUTDOWN``.

        Raises:
            UsageError: an unknown mode.
            AgentUnavailable, AgentTimeout: the request could not be sent.
        """
        if mode not in ("powerdown", "halt", "reboot"):
            raise UsageError(f"unknown shutdown mode {mode!r}")
        await self.execute_no_reply("guest-shutdown", {"mode": mode}, timeout=timeout)

    async def suspend(self, kind: str = "ram", *, timeout: Timeout = USE_CLIENT_DEFAULT) -> None:
        """``guest-suspend-ram`` / ``-disk`` / ``-hybrid``. Returns once sent (no reply).

        Raises:
            UsageError: an unknown kind.
        """
        if kind not in ("ram", "disk", "hybrid"):
            raise UsageError(f"unknown suspend kind {kind!r}")
        await self.execute_no_reply(f"guest-suspend-{kind}", None, timeout=timeout)

    async def exec(
        self,
        path: str,
        args: Sequence[str] = (),
        *,
        env: Sequence[str] | None = None,
        input_data: bytes | None = None,
        capture_output: bool = True,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        poll_interval: float = 0.01,
    ) -> ExecResult:
        """Run a program in the guest (``guest-exec``) and wait for it to finish, polling
        ``guest-exec-status`` (backing off from ``poll_interval`` to 0.25 s).

        Args:
            path: the program, e.g. ``"/bin/sh"``.
            args: its arguments.
            env: environment entries ``"NAME=value"``.
            input_data: bytes for its standard input.
            capture_output: capture stdout and stderr.
            timeout: bounds the whole run, polling included.

        Raises:
            AgentTimeout: the program did not finish in time (it may still run in the guest).
            AgentCommandError: the agent could not start it.
            AgentProtocolError: a malformed reply.
        """
        arguments: dict[str, Any] = {"path": path, "arg": list(args), "capture-output": capture_output}
        if env is not None:
            arguments["env"] = list(env)
        if input_data is not None:
            arguments["input-data"] = base64.b64encode(input_data).decode()
        limit = resolve_timeout(timeout, self.timeout)
        until = None if limit is None else time.monotonic() + limit
        started = _expect(
            "guest-exec", await self._call("guest-exec", arguments, timeout=limit), dict
        )
        pid = _expect("guest-exec", started.get("pid"), int)
        interval = poll_interval
        while True:
            remaining = None if until is None else max(0.0, until - time.monotonic())
            try:
                status = await self._call("guest-exec-status", {"pid": pid}, timeout=remaining)
            except AgentTimeout as exc:
                raise AgentTimeout(f"guest-exec of {path}: pid {pid} did not finish in {limit:g}s") from exc
            status = _expect("guest-exec-status", status, dict)
            exited = _expect("guest-exec-status", status.get("exited"), bool)
            if exited:
                return ExecResult(
                    pid=pid,
                    exitcode=_optional_int(status, "exitcode"),
                    signal=_optional_int(status, "signal"),
                    stdout=_b64(status, "out-data"),
                    stderr=_b64(status, "err-data"),
                    stdout_truncated=bool(status.get("out-truncated", False)),
                    stderr_truncated=bool(status.get("err-truncated", False)),
                )
            if until is not None and time.monotonic() + interval > until:
                raise AgentTimeout(f"guest-exec of {path}: pid {pid} did not finish in {limit:g}s")
            await anyio.sleep(interval)
            interval = min(interval * 2, 0.25)

    async def read_file(
        self, path: str, *, max_size: int = 64 * 1024 * 1024, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> bytes:
        """Read a whole file from the guest (``guest-file-open`` / ``-read`` / ``-close``).

        Args:
            path: the file in the guest.
            max_size: refuse files larger than this many bytes.
            timeout: per agent command.

        Raises:
            AgentCommandError: e.g. the file does not exist.
            AgentProtocolError: a malformed reply, or the file is larger than ``max_size``.
        """
        handle = _expect(
            "guest-file-open",
            await self._call("guest-file-open", {"path": path, "mode": "r"}, timeout=timeout),
            int,
        )
        chunks: list[bytes] = []
        total = 0
        try:
            while True:
                reply = _expect(
                    "guest-file-read",
                    await self._call(
                        "guest-file-read", {"handle": handle, "count": _FILE_READ_CHUNK},
                        timeout=timeout,
                    ),
                    dict,
                )
                data = _b64(reply, "buf-b64")
                count = _expect("guest-file-read", reply.get("count"), int)
                if count != len(data):
                    raise AgentProtocolError("guest-file-read: count does not match the data")
                total += count
                if total > max_size:
                    raise AgentProtocolError(f"{path} is larger than max_size ({max_size} bytes)")
                chunks.append(data)
                if _expect("guest-file-read", reply.get("eof"), bool) or count == 0:
                    return b"".join(chunks)
        finally:
            if self.is_connected:  # a handle left open would stay open in the guest
                await run_to_completion(self._close_file(path, handle, timeout=timeout))

    async def _close_file(self, path: str, handle: int, *, timeout: Timeout) -> None:
        try:
            await self._call("guest-file-close", {"handle": handle}, timeout=timeout)
        except AgentError as exc:
            self._log.debug("guest-file-close of %s failed: %s", path, exc)


def _optional_int(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    result: int = _expect(key, value, int)
    return result


def _b64(obj: dict[str, Any], key: str) -> bytes:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise AgentProtocolError(f"{key}: expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AgentProtocolError(f"{key}: invalid base64") from exc
