"""A fake QEMU guest agent (``qemu-ga`` 7.2) for fast tests, with fault injection: :class:`FakeAgent`.

It is a real asyncio socket server (a unix socket in a private temporary directory by default,
or TCP) that answers like ``qemu-ga`` 7.2 on Linux as seen through QEMU's virtio-serial chardev
socket, byte for byte where that was checked against the real agent (see "Fidelity" below)::

    async with FakeAgent(mountpoints=["/", "/mnt/data"]) as agent:
        agent.freeze_foreign("/mnt/data")        # frozen inside the guest by another tool
        agent.inject("guest-fsfreeze-freeze", AgentFault.no_reply())  # freezes; reply lost
        await code_under_test(agent.address)     # e.g. qmpagent.GuestAgent.connect(address)
        assert agent.foreign_frozen == ["/mnt/data"]      # someone else's freeze left alone
        assert agent.frozen_mountpoints == ["/mnt/data"]  # and our own freeze thawed
        assert len(agent.calls("guest-fsfreeze-thaw")) == 1

Model (what the fake is a model of):

* **The agent** parses the byte stream exactly like QEMU's JSON streamer (lexer, error recovery,
  a 0xFF byte flushing partial input with ``JSON parse error, stray '\\uFFFD'``, limits), checks
  requests like ``qmp_dispatch`` and arguments like the QAPI input visitor (same error texts,
  same choice of which unexpected argument is reported), executes them one at a time in order,
  and writes each reply as one JSON object plus ``\\n``, formatted like QEMU (``", "`` and
  ``": "`` separators, keys in QDict hash order, non-ASCII as upper-case ``\\uXXXX``), with the
  0xFF delimiter before a ``guest-sync-delimited`` reply.
* **The guest state** behind the commands: filesystems (``mountpoints``) that can be frozen by the
  agent or by another tool in the guest (:meth:`FakeAgent.freeze_foreign`), the agent's own
  frozen state (the only thing ``guest-fsfreeze-status`` reports), in-memory files
  (:attr:`FakeAgent.files`) for ``guest-file-*``, and scripted programs
  (:class:`FakeExecResult`) for ``guest-exec``.
* **QEMU's chardev** in front of it: one client connection at a time. A second connection is
  accepted by the kernel but not served until the first one closes (QEMU's socket chardev does
  the same). The agent outlives connections: partial input left by a client is still in its
  parser when the next client writes, and replies produced while no client is connected (or for
  a client that went away) are delivered to the next client, before anything else (the real
  agent's port is throttled and resumes on the next connection). Both were observed on the real
  stack, and both are why clients must resynchronise with ``guest-sync-delimited``.
* **The virtio-serial port** (:attr:`FakeAgent.port_open`): while it is closed (the agent is not
  running, e.g. the guest boots) requests are held and not answered; when it opens they are
  answered in a burst, as QEMU does. Closing the port is the agent going away: its partial
  input, the requests it held but had not read, and the reply of a command in progress are lost.
  ``on_port_change`` lets a fake QMP server emit ``VSERPORT_CHANGE`` and report ``frontend-open``.

Layers (each a module of its own; :class:`FakeAgent` wires them and runs the agent's loop):
the guest model (``_agent_guest``: filesystems, freeze state, files, programs), the command
table over it (``_agent_commands``), the sans-I/O engine (``_agent_engine``: bytes in, checked
requests with their faults and the record, replies out, the 0xFF delimiter), the fault runner
(``_agent_faults``: one method per fault kind) and the chardev shell (``_agent_chardev``: the
socket, one client at a time, undelivered replies).

Commands implemented: ``guest-sync``, ``guest-sync-delimited``, ``guest-ping``, ``guest-info``,
``guest-fsfreeze-status``, ``guest-fsfreeze-freeze``, ``guest-fsfreeze-freeze-list``,
``guest-fsfreeze-thaw``, ``guest-get-osinfo``, ``guest-get-fsinfo``, ``guest-get-host-name``,
``guest-get-time``, ``guest-get-timezone``, ``guest-get-users``, ``guest-shutdown``,
``guest-suspend-disk``/``-ram``/``-hybrid``, ``guest-exec``, ``guest-exec-status``,
``guest-file-open``/``-read``/``-write``/``-close``. The other commands the real agent lists in
``guest-info`` exist but answer ``GenericError`` "this feature or command is not currently
supported" (QEMU's wording for an unsupported command); :meth:`FakeAgent.set_handler` adds or
replaces commands. ``guest-get-devices`` is disabled, as on a real Linux guest.

Faults (:class:`AgentFault`, injected with :meth:`FakeAgent.inject` per command, per call number,
once, a few times or persistently): delay, no reply (with or without the command's effect),
disconnect (before the reply or after part of it), garbage bytes, an oversized reply, a reply of
the wrong type, an error reply, a hang of the whole agent until released, and a custom handler.

Everything received is recorded as :class:`AgentMessage` entries (:attr:`FakeAgent.received`,
:meth:`FakeAgent.calls`, :meth:`FakeAgent.wait_for_call`).

Bounded memory (a buggy or hostile client cannot make the fake grow without limit): one JSON
message may hold at most ``max_input`` bytes of tokens (default 1 MiB; QEMU's limit is 64 MiB)
and 65536 tokens (QEMU: 2 Mi) and nest 1024 deep (as QEMU), beyond which the agent answers
``JSON token size limit exceeded`` (or the count/nesting variant) and recovers like QEMU; at most
``max_input`` bytes wait between the socket and the agent (beyond that the fake stops reading the
socket, so the client's writes block, as with QEMU); at most ``max_input`` bytes of undelivered
replies are kept for the next client; the record keeps the last ``max_records`` messages
holding at most ``max_record_bytes`` of JSON; calls are numbered for at most 4096 distinct
command names; at most 1024 files may be open and 1024 ``guest-exec`` processes unreaped (then
the commands fail, as when a real guest runs out of them), and ``guest-file-write`` stops a file
at 64 MiB ("No space left on device").

Fidelity: checked byte for byte against ``qemu-ga`` 7.2 (Debian 12, ``7.2+dfsg-7+deb12u18``,
which reports version ``7.2.22``) in the test guest: the replies and errors listed in the
module's tests, including the 0xFF error line, ``id`` placement (after ``return``, before
``error``), ``guest-info`` thawed and frozen, the frozen-state errors, ``guest-exec-status``,
``guest-file-read``, and the persistence of partial input and replies across connections.
Not modelled: fsfreeze hooks, the commands answered as unsupported above, ``guest-exec``
environments and output truncation, and the agent's state across a guest reboot (after
``guest-shutdown``, :meth:`FakeAgent.open_port` brings the same state back). Requests written
while the port is closed are dropped if their client disconnects before it opens.
"""


from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar, overload

from ._agent_callbacks import AgentCallbacks
from ._agent_chardev import READ_CHUNK, Changes, Chardev
from ._agent_commands import CommandHandler, CommandTable, builtin_commands
from ._agent_engine import AgentEngine, AgentMessage
from ._agent_faults import AgentFaultRunner
from ._agent_guest import ExecProgram, FakeExecResult, GuestModel
from ._agent_profiles import (
    AGENT_PROFILES,
    DEBIAN13_VERSION,
    DEFAULT_VERSION,
    FREEZE_ALLOWLIST,
    AgentProfile,
    agent_profile,
)
from ._agent_qapi import FakeAgentError
from ._faults import AgentFault, Fault
from ._faults import FaultKind as AgentFaultKind
from ._faults import Injection as AgentInjection
from ._json_reader import QEMUJSONEvent, QEMUJSONStreamParser
from ._json_writer import qemu_json
from ._server import AsyncService

__all__ = [
    "AGENT_PROFILES",
    "DEBIAN13_VERSION",
    "DEFAULT_VERSION",
    "FREEZE_ALLOWLIST",
    "AgentFault",
    "AgentFaultKind",
    "AgentInjection",
    "AgentMessage",
    "AgentProfile",
    "CommandHandler",
    "ExecProgram",
    "ExecResult",
    "FakeAgent",
    "FakeAgentError",
    "FakeExecResult",
    "FaultHandler",
    "QEMUJSONEvent",
    "QEMUJSONStreamParser",
    "agent_profile",
    "qemu_json",
]

log = logging.getLogger(__name__)

#: A custom fault's handler: takes the message and the agent; returns the bytes to send, a
#: mapping to send as a JSON reply (formatted like QEMU), or None to send nothing, or an
#: awaitable of one of these. ``await agent.execute(message)`` runs the real command.
FaultHandler = Callable[["AgentMessage", "FakeAgent"], Any]

#: The former name of :class:`FakeExecResult` (it clashed with :class:`qmpagent.ExecResult`,
#: the client's result type); kept so existing imports work.
ExecResult = FakeExecResult


_T = TypeVar("_T")


class _GuestAttribute(Generic[_T]):
    """An attribute of :class:`FakeAgent` that its guest model keeps (read and set through
    the agent, as when it was the agent's own)."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _GuestAttribute[_T]: ...
    @overload
    def __get__(self, obj: FakeAgent, owner: type) -> _T: ...
    def __get__(self, obj: FakeAgent | None, owner: type) -> _T | _GuestAttribute[_T]:
        if obj is None:
            return self
        value: _T = getattr(obj._guest, self._name)
        return value

    def __set__(self, obj: FakeAgent, value: _T) -> None:
        setattr(obj._guest, self._name, value)


class FakeAgent(AsyncService):
    """A fake ``qemu-ga`` 7.2 behind a fake virtio-serial chardev socket (see the module doc).

    ``async with FakeAgent() as agent:`` starts it and closes it (also on error); or call
    :meth:`start` and :meth:`close`. Connect to :attr:`address` like to the real agent socket.

    Args:
        path: the unix socket to listen on; default: ``qga.sock`` in a private temporary
            directory, removed on close. Ignored when ``host`` is given.
        host: listen on TCP at this host instead (e.g. ``"127.0.0.1"``).
        port: the TCP port (``0``: any free one; see :attr:`address`).
        mountpoints: the guest's freezable filesystems, in mount order (default: ``/``).
        files: the guest's files for ``guest-file-*`` (path -> content); kept as
            :attr:`files`, which tests may change at any time.
        programs: programs for ``guest-exec`` (path -> :data:`ExecProgram`), on top of the
            built-in ``true``, ``false``, ``echo`` and ``cat`` (in ``/bin`` and ``/usr/bin``).
        osinfo: the ``guest-get-osinfo`` result (default: a Debian 12 guest).
        host_name: the ``guest-get-host-name`` result.
        version: the ``guest-info`` version; it also chooses which real agent the fake behaves
            like where versions differ (:func:`agent_profile`): ``"7.2.22"`` (the default,
            Debian 12) or ``"10.0.13"`` (Debian 13).
        blocked_commands: commands disabled as by ``qemu-ga -b`` (on 7.2 ``guest-get-devices``
            is always disabled, as on Linux; 10.0 does not have it).
        port_open: whether the agent's port starts open (``False``: the guest is booting).
        on_port_change: called with ``True``/``False`` when the port opens/closes.
        on_shutdown: called with the mode (``"powerdown"``, ``"halt"``, ``"reboot"``) after a
            successful ``guest-shutdown``.
        on_suspend: called with ``"disk"``, ``"ram"`` or ``"hybrid"`` after ``guest-suspend-*``.
        max_input: the memory bound in bytes (see the module doc), default 1 MiB.
        max_records: how many received messages :attr:`received` keeps (the oldest go first).
        max_record_bytes: how many bytes of JSON those messages may hold together.

    Callbacks are called in the event loop; one that returns an awaitable (e.g. a fake QMP
    server's async ``set_port_open``) has it run as a task, callbacks in order.

    Raises:
        ValueError: ``max_input`` below 4096.
    """

    # Attributes of the guest, kept by the guest model and read and set through the agent.
    files: _GuestAttribute[dict[str, bytes]] = _GuestAttribute(
        "The guest's files for ``guest-file-*``: path -> content. Change it freely."
    )
    osinfo: _GuestAttribute[dict[str, Any]] = _GuestAttribute("The ``guest-get-osinfo`` result.")
    host_name: _GuestAttribute[str] = _GuestAttribute("The ``guest-get-host-name`` result.")
    total_frozen: _GuestAttribute[int] = _GuestAttribute(
        "Filesystems frozen by the agent's freeze commands, added up."
    )
    total_thawed: _GuestAttribute[int] = _GuestAttribute(
        "Filesystems thawed by the agent's thaw command (and failed freezes), added up."
    )

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        host: str | None = None,
        port: int = 0,
        mountpoints: Sequence[str] = ("/",),
        files: Mapping[str, bytes] | None = None,
        programs: Mapping[str, ExecProgram] | None = None,
        osinfo: Mapping[str, Any] | None = None,
        host_name: str = "fake-guest",
        version: str = DEFAULT_VERSION,
        blocked_commands: Iterable[str] = (),
        port_open: bool = True,
        on_port_change: Callable[[bool], object] | None = None,
        on_shutdown: Callable[[str], object] | None = None,
        on_suspend: Callable[[str], object] | None = None,
        max_input: int = 1 << 20,
        max_records: int = 100_000,
        max_record_bytes: int = 64 << 20,
    ) -> None:
        if max_input < READ_CHUNK:
            raise ValueError(f"max_input must be at least {READ_CHUNK}")
        #: The ``guest-info`` version.
        self.version = version
        #: The real agent version the fake behaves like.
        self.profile = agent_profile(version)
        self._callbacks = AgentCallbacks(on_port_change, on_shutdown, on_suspend)
        # The layers: the guest (state and effects), the command table over it, the protocol
        # engine (bytes -> requests, replies -> bytes) and the chardev (the socket).
        self._guest = GuestModel(
            mountpoints=mountpoints, files=files, programs=programs, osinfo=osinfo,
            host_name=host_name, profile=self.profile,
            on_frozen_change=lambda frozen: self._commands.set_frozen(frozen),
        )
        self._engine = AgentEngine(
            max_input=max_input, max_records=max_records, max_record_bytes=max_record_bytes
        )
        self._commands = CommandTable(
            self.profile,
            builtin_commands(
                self._guest, info=lambda: self._commands.info(self.version),
                delimit=self._engine.delimit, suspend=self._suspend,
            ),
            blocked_commands,
        )
        self._changes = Changes()
        self._chardev = Chardev(
            self._changes, port_open=lambda: self._port_open, path=path, host=host, port=port,
            max_input=max_input,
        )
        self._faults = AgentFaultRunner(
            agent=self, execute=self.execute, send=self._send, encode=self._engine.encode,
            current=lambda generation: generation == self._generation,
            connected=lambda: self._chardev.connected, drop_client=self._chardev.drop_client,
            changes=self._changes,
        )
        #: Whether a ``guest-shutdown`` succeeded (stays set; see :attr:`shutdown_mode`).
        self.shut_down = False
        #: The mode of the last successful ``guest-shutdown``, or ``None``.
        self.shutdown_mode: str | None = None
        self._port_open = port_open
        self._generation = 0  # bumped whenever the agent "restarts" (port closed)
        self._busy = False
        self._agent_task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<FakeAgent {self._chardev.address!r} port_open={self._port_open} "
            f"frozen={self._guest.frozen} calls={self._engine.total_calls}>"
        )

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start listening (and the agent).

        Raises:
            RuntimeError: already started or closed.
            OSError: the socket cannot be created.
        """
        if self._started or self._closed:
            raise RuntimeError("FakeAgent.start() may be called once")
        self._started = True
        try:
            await self._chardev.start()
        except BaseException:
            await self.close()
            raise
        self._agent_task = asyncio.create_task(self._agent_loop(), name="fake-qemu-ga")
        log.debug("fake agent listening on %s", self._chardev.address)

    async def close(self) -> None:
        """Stop: drop the client, stop the agent, remove the socket (and its temporary directory).

        Idempotent; safe at any time, also while commands are delayed or hung.
        """
        if self._closed:
            return
        self._closed = True
        self._chardev.stop_listening()
        if self._agent_task is not None:
            self._agent_task.cancel()
            await asyncio.gather(self._agent_task, return_exceptions=True)
        await self._callbacks.close()
        # Client handlers are not cancelled (asyncio's stream callback logs an error for a
        # cancelled handler task before Python 3.12): their connection is closed and they end.
        await self._chardev.close()

    # ---------------------------------------------------------------------------- properties

    @property
    def address(self) -> str | tuple[str, int]:
        """Where to connect: the unix socket path, or ``(host, port)`` for TCP.

        Raises:
            RuntimeError: not started.
        """
        address = self._chardev.address
        if address is None:
            raise RuntimeError("the FakeAgent is not started")
        return address

    @property
    def path(self) -> str | None:
        """The unix socket path (``None`` for TCP or before :meth:`start`)."""
        return self._chardev.socket_path

    @property
    def port_open(self) -> bool:
        """Whether the agent's virtio-serial port is open (the agent is running)."""
        return self._port_open

    @property
    def connected(self) -> bool:
        """Whether a client is connected (and being served)."""
        return self._chardev.connected

    @property
    def connections(self) -> int:
        """How many client connections have been served so far."""
        return self._chardev.connection_count

    @property
    def frozen(self) -> bool:
        """The agent's frozen state: what ``guest-fsfreeze-status`` reports."""
        return self._guest.frozen

    @property
    def frozen_mountpoints(self) -> list[str]:
        """Mountpoints frozen now, by the agent or by another tool, in mount order."""
        return self._guest.frozen_mountpoints

    @property
    def foreign_frozen(self) -> list[str]:
        """Mountpoints frozen now by another tool in the guest (see :meth:`freeze_foreign`)."""
        return self._guest.foreign_frozen

    @property
    def mountpoints(self) -> list[str]:
        """The guest's freezable filesystems."""
        return list(self._guest.mounts)

    @property
    def suspended(self) -> str | None:
        """The suspend mode (``"disk"``, ``"ram"``, ``"hybrid"``) while suspended, else ``None``."""
        return self._guest.suspended

    @property
    def hung(self) -> bool:
        """Whether the agent is hung by an :meth:`AgentFault.hang` fault."""
        return self._faults.hung

    @property
    def buffered(self) -> int:
        """Bytes received from clients that the agent has not read yet (at most ``max_input``
        plus one read)."""
        return self._chardev.buffered

    @property
    def undelivered(self) -> int:
        """Bytes of replies waiting for the next client (produced while none was connected;
        at most ``max_input``, newer ones beyond that are dropped)."""
        return self._chardev.undelivered

    @property
    def received(self) -> list[AgentMessage]:
        """Everything received (requests and rejected input), oldest first."""
        return self._engine.received

    def calls(self, command: str | None = None) -> list[AgentMessage]:
        """The requests received (with a valid ``execute``), optionally only of ``command``."""
        return self._engine.calls(command)

    def call_count(self, command: str | None = None) -> int:
        """How many requests of ``command`` (or of any command) were received in total."""
        return self._engine.call_count(command)

    def clear_received(self) -> None:
        """Forget the record (:attr:`received`); call numbers keep counting."""
        self._engine.clear_received()

    async def wait_for_call(
        self, command: str | None = None, count: int = 1, timeout: float | None = 5.0
    ) -> AgentMessage:
        """Wait until ``count`` requests of ``command`` (or of any) have been received in total.

        Returns the newest such request still in the record.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
            LookupError: the requests were received but are no longer in the record.
        """

        def done() -> bool:
            return self.call_count(command) >= count

        try:
            await asyncio.wait_for(self._changes.wait_until(done), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{count} call(s) of {command or 'any command'} not received in {timeout}s "
                f"(got {self.call_count(command)})"
            ) from None
        calls = self.calls(command)
        if not calls:
            raise LookupError(f"no call of {command or 'any command'} is left in the record")
        return calls[-1]

    @property
    def idle(self) -> bool:
        """Whether the agent has answered everything it can now (nothing buffered or in
        progress, or its port is closed, or the guest is suspended)."""
        return not self._busy and (not self._chardev.buffered or not self._runnable())

    async def wait_idle(self, timeout: float | None = 5.0) -> None:
        """Wait until :attr:`idle`.

        Bytes a client has written but the fake has not read from the socket yet are not
        known here: to wait for a request, use :meth:`wait_for_call` or wait for a reply.

        Raises:
            TimeoutError: not within ``timeout`` seconds (e.g. the agent is hung).
        """
        try:
            await asyncio.wait_for(self._changes.wait_until(lambda: self.idle), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the fake agent is still busy after {timeout}s") from None

    # ---------------------------------------------------------------------------- port, power

    def open_port(self) -> None:
        """Open the agent's port (the agent starts): held requests are answered in a burst.

        After a ``guest-shutdown`` this is the guest booting again. No-op if already open.
        """
        if self._port_open:
            return
        self._port_open = True
        self._callbacks.port_changed(True)
        self._changes.notify()

    def close_port(self) -> None:
        """Close the agent's port (the agent stops): requests are held, nothing is answered.

        The agent's partial input, the requests it had not read yet and the reply of a command
        in progress are lost. No-op if already closed.
        """
        if not self._port_open:
            return
        self._port_open = False
        self._restart_agent()
        self._callbacks.port_changed(False)
        self._changes.notify()

    def wakeup(self) -> None:
        """Wake the guest from ``guest-suspend-*``: the agent answers again."""
        self._guest.suspended = None
        self._changes.notify()

    async def drop_connection(self) -> None:
        """Close the current client connection (as if the chardev lost its client)."""
        await self._chardev.drop_connection()

    # ---------------------------------------------------------------------------- guest state

    def set_frozen(self, frozen: bool = True) -> None:
        """Put the guest in the state of being frozen through the agent by someone else.

        ``True``: every filesystem not frozen yet is frozen by the agent and the agent is in
        frozen state (``guest-fsfreeze-status`` says ``"frozen"``, most commands are disabled).
        ``False``: the agent's freezes are thawed and the agent leaves frozen state.
        """
        self._guest.set_frozen(frozen)

    def freeze_foreign(self, mountpoint: str) -> None:
        """Freeze ``mountpoint`` from inside the guest with another tool (``fsfreeze -f``).

        The agent does not know: its status stays ``"thawed"``, its freeze skips this
        filesystem (EBUSY, not counted) and its thaw thaws it too (and counts it).
        No-op if the filesystem is frozen already.

        Raises:
            ValueError: not one of :attr:`mountpoints`.
        """
        self._guest.freeze_foreign(mountpoint)

    def thaw_foreign(self, mountpoint: str) -> None:
        """Thaw ``mountpoint`` from inside the guest with another tool (``fsfreeze -u``).

        Thaws it whoever froze it; the agent's frozen state does not change.

        Raises:
            ValueError: not one of :attr:`mountpoints`.
        """
        self._guest.thaw_foreign(mountpoint)

    def set_freeze_error(self, mountpoint: str, strerror: str | None = "Input/output error") -> None:
        """Make freezing ``mountpoint`` fail (``None``: work again).

        Like ``qemu-ga``, a freeze that hits it answers ``failed to freeze <mountpoint>:
        <strerror>`` and thaws every filesystem, whoever froze it.

        Raises:
            ValueError: not one of :attr:`mountpoints`.
        """
        self._guest.set_freeze_error(mountpoint, strerror)

    # ---------------------------------------------------------------------------- commands

    def set_handler(
        self,
        command: str,
        handler: CommandHandler,
        *,
        success_response: bool = True,
    ) -> None:
        """Add a command, or replace a command's implementation.

        The handler gets the ``arguments`` object (unchecked) and returns the ``return`` value
        or an awaitable of it, or raises :class:`FakeAgentError`. A new command is listed first
        in ``guest-info`` and is disabled while frozen like the others.

        Args:
            command: the command name.
            handler: see :data:`CommandHandler`.
            success_response: ``False`` for a command that sends no reply when it succeeds.
        """
        self._commands.set_handler(command, handler, success_response=success_response)

    def set_exec_result(self, path: str, program: ExecProgram) -> None:
        """Set what running ``path`` with ``guest-exec`` does (an :class:`FakeExecResult`, or a
        function of ``(args, input bytes)`` returning one)."""
        self._guest.programs[path] = program

    async def execute(self, message: AgentMessage) -> dict[str, Any] | None:
        """Run the request ``message`` as the agent does; return its reply object.

        The reply includes the echoed ``id``; ``None`` for a command that succeeded without a
        reply (``guest-shutdown``, ``guest-suspend-*``). The command takes effect. For custom
        fault handlers (:meth:`AgentFault.custom`).
        """
        return await self._commands.execute(message)

    # ---------------------------------------------------------------------------- faults

    def inject(
        self,
        command: str,
        fault: Fault,
        *,
        call: int | None = None,
        times: int | None = 1,
    ) -> AgentInjection:
        """Inject ``fault`` into ``command`` (``"*"``: any command).

        Args:
            command: the command name, or ``"*"``.
            fault: what to do (see :class:`AgentFault`).
            call: apply only to this call of the command (1-based, counted since the agent
                started, including calls before this injection; for ``"*"`` counted over all
                commands), e.g. ``call=2`` for "the 2nd ``guest-fsfreeze-freeze``".
            times: without ``call``: apply to the next ``times`` calls (``None``: all of them).

        The first active injection that matches a call applies; each call gets at most one.

        Raises:
            ValueError: ``call`` or ``times`` below 1, or a fault kind the agent does not
                model (the QMP-only job kinds).
        """
        return self._engine.faults.add(command, fault, call=call, times=times)

    def clear_faults(self, command: str | None = None) -> None:
        """Remove the injected faults (of ``command`` only, if given) and :meth:`release` a hang."""
        self._engine.faults.clear(command)
        self.release()

    def release(self) -> None:
        """End a hang (:meth:`AgentFault.hang`): the agent answers again."""
        self._faults.release()

    @property
    def injections(self) -> list[AgentInjection]:
        """The injections that can still apply."""
        return self._engine.faults.active

    # ---------------------------------------------------------------------------- the agent

    def _suspend(self, mode: str) -> None:
        self._guest.suspend(mode)
        self._callbacks.suspended(mode)

    def _restart_agent(self) -> None:
        self._generation += 1
        self._engine.restart()
        self._chardev.clear_input()
        self._guest.suspended = None

    def _runnable(self) -> bool:
        return self._port_open and self._guest.suspended is None

    async def _send(self, data: bytes, generation: int) -> None:
        if not data or generation != self._generation:
            return  # the agent that produced it has gone
        await self._chardev.write(data)

    async def _agent_loop(self) -> None:
        while True:
            await self._changes.wait_until(lambda: bool(self._chardev.buffered) and self._runnable())
            generation = self._generation
            chunk = self._chardev.read(READ_CHUNK)
            self._busy = True
            try:
                def ready(generation: int = generation) -> bool:
                    return self._runnable() or generation != self._generation

                for event in self._engine.feed(chunk):
                    await self._changes.wait_until(ready)
                    if generation != self._generation:
                        break
                    try:
                        await self._process(event, generation)
                    except Exception:
                        log.exception("fake agent: processing %r failed", event)
            finally:
                self._busy = False
                self._changes.notify()

    async def _process(self, event: QEMUJSONEvent, generation: int) -> None:
        message = self._engine.take(
            event, connection=self._chardev.connection_number, now=time.monotonic()
        )
        self._changes.notify()
        if message.error is not None:
            await self._send(self._engine.rejection(message), generation)
            return
        try:
            if message.fault is None:
                answer = await self.execute(message)
                if answer is not None:
                    await self._send(self._engine.encode(answer), generation)
            else:
                await self._faults.run(message.fault, message, generation)
        finally:
            self._after_command()

    def _after_command(self) -> None:
        mode, self._guest.pending_shutdown = self._guest.pending_shutdown, None
        if mode is None:
            return
        self.shut_down = True
        self.shutdown_mode = mode
        self._callbacks.shut_down(mode)
        self.close_port()
        self._chardev.drop_client()  # QEMU exits
