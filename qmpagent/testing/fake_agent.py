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
import base64
import binascii
import contextlib
import inspect
import logging
import os
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from ._agent_qapi import BOOL, INT, STR, STR_LIST, FakeAgentError, Param, check_arguments
from ._faults import AGENT_KINDS, AgentFault, Fault, FaultTable
from ._faults import FaultKind as AgentFaultKind
from ._faults import Injection as AgentInjection
from ._json_reader import QEMUJSONEvent, QEMUJSONStreamParser
from ._json_writer import qdict_order, qemu_json
from ._server import SocketListener

__all__ = [
    "AgentFault",
    "AgentFaultKind",
    "AgentInjection",
    "AgentMessage",
    "AgentProfile",
    "FakeAgent",
    "FakeAgentError",
    "FakeExecResult",
    "QEMUJSONEvent",
    "QEMUJSONStreamParser",
    "agent_profile",
    "qemu_json",
]

log = logging.getLogger(__name__)

#: The ``version`` the fake reports in ``guest-info`` (the real Debian 12 qemu-ga reports this).
DEFAULT_VERSION: Final = "7.2.22"
#: The version of Debian 13's qemu-ga, the second real peer; ``FakeAgent(version=...)`` with it
#: behaves like that agent where the two differ (see :class:`AgentProfile`).
DEBIAN13_VERSION: Final = "10.0.13"

# =================================================================================================
# Public data types
# =================================================================================================


#: A custom fault's handler: takes the message and the agent; returns the bytes to send, a
#: mapping to send as a JSON reply (formatted like QEMU), or None to send nothing, or an
#: awaitable of one of these. ``await agent.execute(message)`` runs the real command.
FaultHandler = Callable[["AgentMessage", "FakeAgent"], Any]

#: A command handler (see :meth:`FakeAgent.set_handler`): takes the ``arguments`` object and
#: returns the ``return`` value (``None`` for ``{}``) or an awaitable of it; raises
#: :class:`FakeAgentError` to answer with an error.
CommandHandler = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class AgentMessage:
    """One message the fake agent received: a request, or input it rejected.

    Attributes:
        command: the ``execute`` member of a well-formed request, else ``None``.
        arguments: the ``arguments`` object (``{}`` when absent or not a request).
        id: the ``id`` member, or ``None`` (see ``has_id``).
        has_id: whether the request had an ``id`` member.
        time: ``time.monotonic()`` when the agent took it.
        after_sync_byte: a 0xFF byte came before it (since the previous parsed message).
        call: for a request, which call of ``command`` it was (1-based), else 0.
        connection: the number (1-based) of the client connection current when it was
            processed, or ``None`` if no client was connected.
        message: the parsed JSON value (``None`` for a parse error).
        error: why the agent rejected it without running a command (a JSON parse error or a
            malformed request), else ``None``. Unknown commands and bad arguments are requests.
        fault: the injected fault that applied to it, if any.
    """

    command: str | None
    arguments: dict[str, Any]
    id: Any
    has_id: bool
    time: float
    after_sync_byte: bool
    call: int
    connection: int | None
    message: Any
    error: str | None = None
    fault: Fault | None = None


@dataclass(frozen=True, slots=True)
class FakeExecResult:
    """How a program run with ``guest-exec`` ends (see :meth:`FakeAgent.set_exec_result`).

    Attributes:
        exitcode: the exit status (ignored if ``signal`` is set).
        signal: the signal that killed it, or ``None``.
        stdout: what it writes to stdout (reported only with ``capture-output``).
        stderr: what it writes to stderr (reported only with ``capture-output``).
        polls: how many ``guest-exec-status`` calls answer ``{"exited": false}`` first.
        duration: seconds after ``guest-exec`` before it has exited.
    """

    exitcode: int = 0
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    polls: int = 0
    duration: float = 0.0


#: The former name of :class:`FakeExecResult` (it clashed with :class:`qmpagent.ExecResult`,
#: the client's result type); kept so existing imports work.
ExecResult = FakeExecResult

#: A program of the fake guest: an :class:`FakeExecResult`, or a function of ``(args, input bytes)``
#: returning one.
ExecProgram = FakeExecResult | Callable[[list[str], bytes], FakeExecResult]

# =================================================================================================
# The fake agent
# =================================================================================================

# qemu-ga 7.2 on Linux: commands in its guest-info order, and whether they answer on success.
_REAL_COMMANDS: Final[tuple[tuple[str, bool], ...]] = (
    ("guest-get-cpustats", True),
    ("guest-get-diskstats", True),
    ("guest-ssh-remove-authorized-keys", True),
    ("guest-ssh-add-authorized-keys", True),
    ("guest-ssh-get-authorized-keys", True),
    ("guest-get-devices", True),
    ("guest-get-osinfo", True),
    ("guest-get-timezone", True),
    ("guest-get-users", True),
    ("guest-get-host-name", True),
    ("guest-exec", True),
    ("guest-exec-status", True),
    ("guest-get-memory-block-info", True),
    ("guest-set-memory-blocks", True),
    ("guest-get-memory-blocks", True),
    ("guest-set-user-password", True),
    ("guest-get-fsinfo", True),
    ("guest-get-disks", True),
    ("guest-set-vcpus", True),
    ("guest-get-vcpus", True),
    ("guest-network-get-interfaces", True),
    ("guest-suspend-hybrid", False),
    ("guest-suspend-ram", False),
    ("guest-suspend-disk", False),
    ("guest-fstrim", True),
    ("guest-fsfreeze-thaw", True),
    ("guest-fsfreeze-freeze-list", True),
    ("guest-fsfreeze-freeze", True),
    ("guest-fsfreeze-status", True),
    ("guest-file-flush", True),
    ("guest-file-seek", True),
    ("guest-file-write", True),
    ("guest-file-read", True),
    ("guest-file-close", True),
    ("guest-file-open", True),
    ("guest-shutdown", False),
    ("guest-info", True),
    ("guest-set-time", True),
    ("guest-get-time", True),
    ("guest-ping", True),
    ("guest-sync", True),
    ("guest-sync-delimited", True),
)

# qemu-ga 10.0 on Linux (Debian 13, 10.0.13): two commands more, listed first, and the commands
# Linux does not support (guest-get-devices) are not built in at all since 9.1.
_REAL_COMMANDS_10_0: Final[tuple[tuple[str, bool], ...]] = (
    ("guest-network-get-route", True),
    ("guest-get-load", True),
    *(c for c in _REAL_COMMANDS if c[0] != "guest-get-devices"),
)

#: Commands qemu-ga 7.2 and 10.0 keep enabled while frozen (qga/main.c ``ga_freeze_allowlist``).
FREEZE_ALLOWLIST: Final = frozenset(
    {
        "guest-ping",
        "guest-info",
        "guest-fsfreeze-status",
        "guest-fsfreeze-thaw",
        "guest-sync",
        "guest-sync-delimited",
    }
)
_FROZEN_REASON: Final = "the agent is in frozen state"
_ALWAYS_BLOCKED: Final = ("guest-get-devices",)  # not supported on Linux: disabled at startup


@dataclass(frozen=True)
class AgentProfile:
    """How one real ``qemu-ga`` version behaves where versions differ (each seen on the real
    agent of that version in the test guest, and checked by the conformance suite).

    Attributes:
        version: the ``guest-info`` version of the real agent this profile was checked against.
        commands: the commands in ``guest-info`` order, and whether they answer on success.
        frozen_reason: the reason in ``"Command X has been disabled: <reason>"`` while frozen.
        blocked_reason: the reason for a command blocked with ``qemu-ga -b`` (None: no reason).
        unsupported: commands listed in ``guest-info`` but disabled from start-up because Linux
            does not support them (7.2); 10.0 does not build them, so they are "not found".
        wraps_glib_errors: a failed ``guest-exec`` says ``Guest agent command failed, error was
            '<glib message>'`` (7.2) rather than the glib message alone (10.0).
        fsinfo_privileged: ``guest-get-fsinfo`` reports ``total-bytes-privileged`` (10.0).
    """

    version: str
    commands: tuple[tuple[str, bool], ...]
    frozen_reason: str
    blocked_reason: str | None
    unsupported: tuple[str, ...]
    wraps_glib_errors: bool
    fsinfo_privileged: bool

    def glib_error(self, message: str) -> str:
        """A failure reported by glib (e.g. spawning a process), as this version words it."""
        return f"Guest agent command failed, error was '{message}'" if self.wraps_glib_errors else message


#: qemu-ga 7.2.22 (Debian 12) and 10.0.13 (Debian 13), by ``major.minor``.
AGENT_PROFILES: Final[Mapping[str, AgentProfile]] = {
    "7.2": AgentProfile(
        DEFAULT_VERSION, _REAL_COMMANDS, _FROZEN_REASON, None, _ALWAYS_BLOCKED,
        wraps_glib_errors=True, fsinfo_privileged=False,
    ),
    "10.0": AgentProfile(
        DEBIAN13_VERSION, _REAL_COMMANDS_10_0, "the command is not allowed",
        "the command is not allowed", (), wraps_glib_errors=False, fsinfo_privileged=True,
    ),
}


def agent_profile(version: str) -> AgentProfile:
    """The :class:`AgentProfile` for a ``guest-info`` version: its ``major.minor`` if known,
    else the newest known profile at or below it (7.2 for anything older)."""
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", v)[:2]) or (0,)

    exact = ".".join(version.split(".")[:2])
    if exact in AGENT_PROFILES:
        return AGENT_PROFILES[exact]
    below = [k for k in AGENT_PROFILES if key(k) <= key(version)]
    return AGENT_PROFILES[max(below, key=key)] if below else AGENT_PROFILES["7.2"]
_FILE_MODES: Final = frozenset(
    {"r", "rb", "w", "wb", "a", "ab", "r+", "rb+", "r+b", "w+", "wb+", "w+b", "a+", "ab+", "a+b"}
)
_FILE_READ_DEFAULT: Final = 4096
_FILE_READ_MAX: Final = 48 << 20
_FIRST_HANDLE: Final = 1000
_READ_CHUNK: Final = 4096
_MAX_COUNTED_NAMES: Final = 4096  # distinct command names whose calls are numbered
_MAX_OPEN: Final = 1024  # open file handles, and unreaped guest-exec processes
_MAX_FILE_SIZE: Final = 64 << 20  # a file written through guest-file-write
_B64_RE: Final = re.compile(r"[A-Za-z0-9+/=]*\Z")

_DEFAULT_OSINFO: Final[Mapping[str, Any]] = {
    "kernel-release": "6.1.0-13-amd64",
    "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.55-1 (2023-09-29)",
    "machine": "x86_64",
    "id": "debian",
    "name": "Debian GNU/Linux",
    "pretty-name": "Debian GNU/Linux 12 (bookworm)",
    "version": "12 (bookworm)",
    "version-id": "12",
}


@dataclass(eq=False)
class _Command:
    name: str
    success_response: bool
    params: tuple[Param, ...] | None  # None: the handler checks its own arguments
    run: Callable[[dict[str, Any]], Any] | None  # None: not implemented


@dataclass(eq=False)
class _Connection:
    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    closed: bool = False
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False)
class _OpenFile:
    path: str
    readable: bool
    writable: bool
    append: bool
    position: int = 0
    eof: bool = False


@dataclass(eq=False)
class _Process:
    result: FakeExecResult
    capture: bool
    started: float
    polls_left: int


def _b64decode(text: str) -> bytes:
    if not _B64_RE.match(text):
        raise FakeAgentError("Base64 data contains invalid characters")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        raise FakeAgentError("Base64 data contains invalid characters") from None


class FakeAgent:
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
        if max_input < _READ_CHUNK:
            raise ValueError(f"max_input must be at least {_READ_CHUNK}")
        self._listener = SocketListener(
            self._on_client, path=path, host=host, port=port, socket_name="qga.sock",
            tmp_prefix="qmpagent-fake-agent-", limit=_READ_CHUNK,
        )
        self._mounts = list(dict.fromkeys(mountpoints))
        #: The guest's files for ``guest-file-*``: path -> content. Change it freely.
        self.files: dict[str, bytes] = dict(files or {})
        self._programs: dict[str, ExecProgram] = dict(programs or {})
        #: The ``guest-get-osinfo`` result.
        self.osinfo: dict[str, Any] = dict(osinfo if osinfo is not None else _DEFAULT_OSINFO)
        #: The ``guest-get-host-name`` result.
        self.host_name = host_name
        #: The ``guest-info`` version.
        self.version = version
        #: The real agent version the fake behaves like.
        self.profile = agent_profile(version)
        self._on_port_change = on_port_change
        self._on_shutdown = on_shutdown
        self._on_suspend = on_suspend
        self._max_input = max_input

        # Commands, enabled state
        self._commands: dict[str, _Command] = {}
        self._command_order: list[str] = []  # guest-info order
        self._install_builtins()
        self._blocked = set(self.profile.unsupported) | set(blocked_commands)
        self._disabled: dict[str, str | None] = {
            name: None if name in self.profile.unsupported else self.profile.blocked_reason
            for name in self._blocked
        }

        # Guest state
        self._agent_frozen = False
        self._fs_owner: dict[str, str] = {}  # mountpoint -> "agent" | "foreign"
        self._freeze_errors: dict[str, str] = {}
        self._handles: dict[int, _OpenFile] = {}
        self._next_handle = _FIRST_HANDLE
        self._processes: dict[int, _Process] = {}
        self._next_pid = 1000
        #: Filesystems frozen by the agent's freeze commands, added up.
        self.total_frozen = 0
        #: Filesystems thawed by the agent's thaw command (and failed freezes), added up.
        self.total_thawed = 0
        #: Whether a ``guest-shutdown`` succeeded (stays set; see :attr:`shutdown_mode`).
        self.shut_down = False
        #: The mode of the last successful ``guest-shutdown``, or ``None``.
        self.shutdown_mode: str | None = None
        self._suspended: str | None = None
        self._pending_shutdown: str | None = None

        # Agent and chardev machinery
        self._port_open = port_open
        self._generation = 0  # bumped whenever the agent "restarts" (port closed)
        self._parser = self._new_parser()
        self._delimit_next = False
        self._inbuf = bytearray()  # client bytes not yet read by the agent
        self._stash = bytearray()  # replies waiting for the next client
        self._conn: _Connection | None = None
        self._connection_count = 0
        self._faults = FaultTable(AGENT_KINDS)
        self._release_epoch = 0
        self._hung = False
        self._busy = False

        # Record
        self._records: deque[tuple[AgentMessage, int]] = deque()
        self._record_bytes = 0
        self._max_records = max_records
        self._max_record_bytes = max_record_bytes
        self._call_counts: Counter[str] = Counter()
        self._total_calls = 0

        # Server
        self._client_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._agent_task: asyncio.Task[None] | None = None
        self._callback_task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<FakeAgent {self._listener.address!r} port_open={self._port_open} "
            f"frozen={self._agent_frozen} calls={self._total_calls}>"
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
            await self._listener.start()
        except BaseException:
            await self.close()
            raise
        self._agent_task = asyncio.create_task(self._agent_loop(), name="fake-qemu-ga")
        log.debug("fake agent listening on %s", self._listener.address)

    async def close(self) -> None:
        """Stop: drop the client, stop the agent, remove the socket (and its temporary directory).

        Idempotent; safe at any time, also while commands are delayed or hung.
        """
        if self._closed:
            return
        self._closed = True
        self._listener.stop_listening()
        own = [t for t in (self._agent_task, self._callback_task) if t is not None]
        for task in own:
            task.cancel()
        await asyncio.gather(*own, return_exceptions=True)
        # Client handlers are not cancelled (asyncio's stream callback logs an error for a
        # cancelled handler task before Python 3.12): their connection is closed and they end.
        if self._conn is not None:
            self._close_connection(self._conn)
        self._notify()
        await self._listener.close(timeout=5.0)

    async def __aenter__(self) -> FakeAgent:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------------------- properties

    @property
    def address(self) -> str | tuple[str, int]:
        """Where to connect: the unix socket path, or ``(host, port)`` for TCP.

        Raises:
            RuntimeError: not started.
        """
        address = self._listener.address
        if address is None:
            raise RuntimeError("the FakeAgent is not started")
        return address

    @property
    def path(self) -> str | None:
        """The unix socket path (``None`` for TCP or before :meth:`start`)."""
        path = self._listener.socket_path
        return str(path) if path is not None else None

    @property
    def port_open(self) -> bool:
        """Whether the agent's virtio-serial port is open (the agent is running)."""
        return self._port_open

    @property
    def connected(self) -> bool:
        """Whether a client is connected (and being served)."""
        return self._conn is not None and not self._conn.closed

    @property
    def connections(self) -> int:
        """How many client connections have been served so far."""
        return self._connection_count

    @property
    def frozen(self) -> bool:
        """The agent's frozen state: what ``guest-fsfreeze-status`` reports."""
        return self._agent_frozen

    @property
    def frozen_mountpoints(self) -> list[str]:
        """Mountpoints frozen now, by the agent or by another tool, in mount order."""
        return [mp for mp in self._mounts if mp in self._fs_owner]

    @property
    def foreign_frozen(self) -> list[str]:
        """Mountpoints frozen now by another tool in the guest (see :meth:`freeze_foreign`)."""
        return [mp for mp in self._mounts if self._fs_owner.get(mp) == "foreign"]

    @property
    def mountpoints(self) -> list[str]:
        """The guest's freezable filesystems."""
        return list(self._mounts)

    @property
    def suspended(self) -> str | None:
        """The suspend mode (``"disk"``, ``"ram"``, ``"hybrid"``) while suspended, else ``None``."""
        return self._suspended

    @property
    def hung(self) -> bool:
        """Whether the agent is hung by an :meth:`AgentFault.hang` fault."""
        return self._hung

    @property
    def buffered(self) -> int:
        """Bytes received from clients that the agent has not read yet (at most ``max_input``
        plus one read)."""
        return len(self._inbuf)

    @property
    def undelivered(self) -> int:
        """Bytes of replies waiting for the next client (produced while none was connected;
        at most ``max_input``, newer ones beyond that are dropped)."""
        return len(self._stash)

    @property
    def received(self) -> list[AgentMessage]:
        """Everything received (requests and rejected input), oldest first."""
        return [m for m, _ in self._records]

    def calls(self, command: str | None = None) -> list[AgentMessage]:
        """The requests received (with a valid ``execute``), optionally only of ``command``."""
        return [
            m
            for m, _ in self._records
            if m.command is not None and (command is None or m.command == command)
        ]

    def call_count(self, command: str | None = None) -> int:
        """How many requests of ``command`` (or of any command) were received in total."""
        return self._total_calls if command is None else self._call_counts[command]

    def clear_received(self) -> None:
        """Forget the record (:attr:`received`); call numbers keep counting."""
        self._records.clear()
        self._record_bytes = 0

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
            await asyncio.wait_for(self._wait_until(done), timeout)
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
        return not self._busy and (not self._inbuf or not self._runnable())

    async def wait_idle(self, timeout: float | None = 5.0) -> None:
        """Wait until :attr:`idle`.

        Bytes a client has written but the fake has not read from the socket yet are not
        known here: to wait for a request, use :meth:`wait_for_call` or wait for a reply.

        Raises:
            TimeoutError: not within ``timeout`` seconds (e.g. the agent is hung).
        """
        try:
            await asyncio.wait_for(self._wait_until(lambda: self.idle), timeout)
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
        self._fire(self._on_port_change, True)
        self._notify()

    def close_port(self) -> None:
        """Close the agent's port (the agent stops): requests are held, nothing is answered.

        The agent's partial input, the requests it had not read yet and the reply of a command
        in progress are lost. No-op if already closed.
        """
        if not self._port_open:
            return
        self._port_open = False
        self._restart_agent()
        self._fire(self._on_port_change, False)
        self._notify()

    def wakeup(self) -> None:
        """Wake the guest from ``guest-suspend-*``: the agent answers again."""
        self._suspended = None
        self._notify()

    async def drop_connection(self) -> None:
        """Close the current client connection (as if the chardev lost its client)."""
        conn = self._conn
        if conn is not None:
            self._close_connection(conn)
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    # ---------------------------------------------------------------------------- freeze model

    def set_frozen(self, frozen: bool = True) -> None:
        """Put the guest in the state of being frozen through the agent by someone else.

        ``True``: every filesystem not frozen yet is frozen by the agent and the agent is in
        frozen state (``guest-fsfreeze-status`` says ``"frozen"``, most commands are disabled).
        ``False``: the agent's freezes are thawed and the agent leaves frozen state.
        """
        if frozen:
            for mp in self._mounts:
                self._fs_owner.setdefault(mp, "agent")
            self._set_agent_frozen(True)
        else:
            for mp in [m for m, owner in self._fs_owner.items() if owner == "agent"]:
                del self._fs_owner[mp]
            self._set_agent_frozen(False)

    def freeze_foreign(self, mountpoint: str) -> None:
        """Freeze ``mountpoint`` from inside the guest with another tool (``fsfreeze -f``).

        The agent does not know: its status stays ``"thawed"``, its freeze skips this
        filesystem (EBUSY, not counted) and its thaw thaws it too (and counts it).
        No-op if the filesystem is frozen already.

        Raises:
            ValueError: not one of :attr:`mountpoints`.
        """
        self._check_mountpoint(mountpoint)
        self._fs_owner.setdefault(mountpoint, "foreign")

    def thaw_foreign(self, mountpoint: str) -> None:
        """Thaw ``mountpoint`` from inside the guest with another tool (``fsfreeze -u``).

        Thaws it whoever froze it; the agent's frozen state does not change.

        Raises:
            ValueError: not one of :attr:`mountpoints`.
        """
        self._check_mountpoint(mountpoint)
        self._fs_owner.pop(mountpoint, None)

    def set_freeze_error(self, mountpoint: str, strerror: str | None = "Input/output error") -> None:
        """Make freezing ``mountpoint`` fail (``None``: work again).

        Like ``qemu-ga``, a freeze that hits it answers ``failed to freeze <mountpoint>:
        <strerror>`` and thaws every filesystem, whoever froze it.

        Raises:
            ValueError: not one of :attr:`mountpoints`.
        """
        self._check_mountpoint(mountpoint)
        if strerror is None:
            self._freeze_errors.pop(mountpoint, None)
        else:
            self._freeze_errors[mountpoint] = strerror

    def _check_mountpoint(self, mountpoint: str) -> None:
        if mountpoint not in self._mounts:
            raise ValueError(f"{mountpoint!r} is not a mountpoint of this fake guest")

    def _set_agent_frozen(self, frozen: bool) -> None:
        # ga_set_frozen() / ga_unset_frozen() with their enable/disable walks
        if frozen == self._agent_frozen:
            return
        self._agent_frozen = frozen
        if frozen:
            for name in self._commands:
                if name not in FREEZE_ALLOWLIST:
                    self._disabled[name] = self.profile.frozen_reason
        else:
            # Blocked commands stay disabled, with the frozen reason (as in qemu-ga 7.2).
            for name in list(self._disabled):
                if name not in self._blocked:
                    del self._disabled[name]

    def _freeze(self, only: list[str] | None) -> int:
        self._set_agent_frozen(True)
        count = 0
        try:
            for mp in reversed(self._mounts):
                if only is not None and mp not in only:
                    continue
                error = self._freeze_errors.get(mp)
                if error is not None:
                    raise FakeAgentError(f"failed to freeze {mp}: {error}")
                if mp in self._fs_owner:
                    continue  # EBUSY: frozen already, ignored and not counted
                self._fs_owner[mp] = "agent"
                count += 1
        except FakeAgentError:
            self.total_frozen += count
            self._thaw()
            raise
        self.total_frozen += count
        if count == 0:
            self._set_agent_frozen(False)
        return count

    def _thaw(self) -> int:
        count = 0
        for mp in self._mounts:
            if self._fs_owner.pop(mp, None) is not None:
                count += 1
        self._set_agent_frozen(False)
        self.total_thawed += count
        return count

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
        if command not in self._commands:
            self._command_order.insert(0, command)
            if self._agent_frozen and command not in FREEZE_ALLOWLIST:
                self._disabled[command] = self.profile.frozen_reason
        self._commands[command] = _Command(command, success_response, None, handler)

    def set_exec_result(self, path: str, program: ExecProgram) -> None:
        """Set what running ``path`` with ``guest-exec`` does (an :class:`FakeExecResult`, or a
        function of ``(args, input bytes)`` returning one)."""
        self._programs[path] = program

    async def execute(self, message: AgentMessage) -> dict[str, Any] | None:
        """Run the request ``message`` as the agent does; return its reply object.

        The reply includes the echoed ``id``; ``None`` for a command that succeeded without a
        reply (``guest-shutdown``, ``guest-suspend-*``). The command takes effect. For custom
        fault handlers (:meth:`AgentFault.custom`).
        """
        assert message.command is not None, "not a request"
        name = message.command
        reply: dict[str, Any]
        command = self._commands.get(name)
        try:
            if command is None:
                raise FakeAgentError(f"The command {name} has not been found", "CommandNotFound")
            if name in self._disabled:
                reason = self._disabled[name]
                raise FakeAgentError(
                    f"Command {name} has been disabled" + (f": {reason}" if reason else ""),
                    "CommandNotFound",
                )
            if command.run is None:
                raise FakeAgentError("this feature or command is not currently supported")
            arguments = message.arguments
            if command.params is not None:
                arguments = check_arguments(arguments, command.params)
            result = command.run(arguments)
            if inspect.isawaitable(result):
                result = await result
        except FakeAgentError as exc:
            reply = {"error": {"class": exc.error_class, "desc": exc.desc}}
        except Exception as exc:
            log.exception("fake agent: handler of %s failed", name)
            reply = {"error": {"class": "GenericError", "desc": f"fake agent handler failed: {exc!r}"}}
        else:
            if not command.success_response:
                return None
            reply = {"return": {} if result is None else result}
        if message.has_id:
            reply["id"] = message.id
        return reply

    def _install_builtins(self) -> None:
        builtins: dict[str, tuple[tuple[Param, ...], Callable[[dict[str, Any]], Any]]] = {
            "guest-sync-delimited": ((("id", INT, False),), self._cmd_sync_delimited),
            "guest-sync": ((("id", INT, False),), lambda a: a["id"]),
            "guest-ping": ((), lambda a: None),
            "guest-info": ((), self._cmd_info),
            "guest-get-time": ((), lambda a: time.time_ns() // 1000 * 1000),
            "guest-fsfreeze-status": (
                (),
                lambda a: "frozen" if self._agent_frozen else "thawed",
            ),
            "guest-fsfreeze-freeze": ((), lambda a: self._freeze(None)),
            "guest-fsfreeze-freeze-list": (
                (("mountpoints", STR_LIST, True),),
                lambda a: self._freeze(a.get("mountpoints")),
            ),
            "guest-fsfreeze-thaw": ((), lambda a: self._thaw()),
            "guest-get-osinfo": ((), lambda a: dict(self.osinfo)),
            "guest-get-fsinfo": ((), self._cmd_fsinfo),
            "guest-get-host-name": ((), lambda a: {"host-name": self.host_name}),
            "guest-get-timezone": ((), lambda a: {"zone": "UTC", "offset": 0}),
            "guest-get-users": ((), lambda a: []),
            "guest-shutdown": ((("mode", STR, True),), self._cmd_shutdown),
            "guest-suspend-disk": ((), lambda a: self._cmd_suspend("disk")),
            "guest-suspend-ram": ((), lambda a: self._cmd_suspend("ram")),
            "guest-suspend-hybrid": ((), lambda a: self._cmd_suspend("hybrid")),
            "guest-exec": (
                (
                    ("path", STR, False),
                    ("arg", STR_LIST, True),
                    ("env", STR_LIST, True),
                    ("input-data", STR, True),
                    ("capture-output", BOOL, True),
                ),
                self._cmd_exec,
            ),
            "guest-exec-status": ((("pid", INT, False),), self._cmd_exec_status),
            "guest-file-open": (
                (("path", STR, False), ("mode", STR, True)),
                self._cmd_file_open,
            ),
            "guest-file-read": (
                (("handle", INT, False), ("count", INT, True)),
                self._cmd_file_read,
            ),
            "guest-file-write": (
                (("handle", INT, False), ("buf-b64", STR, False), ("count", INT, True)),
                self._cmd_file_write,
            ),
            "guest-file-close": ((("handle", INT, False),), self._cmd_file_close),
        }
        for name, success in self.profile.commands:
            spec = builtins.get(name)
            self._commands[name] = _Command(
                name, success, spec[0] if spec else None, spec[1] if spec else None
            )
            self._command_order.append(name)

    def _cmd_sync_delimited(self, arguments: dict[str, Any]) -> Any:
        self._delimit_next = True
        return arguments["id"]

    def _cmd_info(self, arguments: dict[str, Any]) -> Any:
        return {
            "version": self.version,
            "supported_commands": [
                {
                    "name": name,
                    "enabled": name not in self._disabled,
                    "success-response": self._commands[name].success_response,
                }
                for name in self._command_order
            ],
        }

    def _cmd_fsinfo(self, arguments: dict[str, Any]) -> Any:
        # 10.0 adds the size including the blocks reserved for root (5% of ext4's 50 MiB here).
        privileged = {"total-bytes-privileged": 57381888} if self.profile.fsinfo_privileged else {}
        return [
            {
                "name": f"vd{chr(ord('a') + i)}" if i < 26 else f"vd{i}",
                "mountpoint": mp,
                "type": "ext4",
                "used-bytes": 23552,
                "total-bytes": 52685824,
                **privileged,
                "disk": [
                    {
                        "pci-controller": {"domain": 0, "bus": 0, "slot": 2 + i, "function": 0},
                        "bus-type": "virtio",
                        "bus": 0,
                        "target": 0,
                        "unit": 0,
                        "dev": f"/dev/vd{chr(ord('a') + i)}" if i < 26 else f"/dev/vd{i}",
                    }
                ],
            }
            for i, mp in enumerate(self._mounts)
        ]

    def _cmd_shutdown(self, arguments: dict[str, Any]) -> Any:
        mode = arguments.get("mode", "powerdown")
        if mode not in ("powerdown", "halt", "reboot"):
            # sic: qemu-ga 7.2's message lacks the closing parenthesis
            raise FakeAgentError("mode is invalid (valid values are: halt|powerdown|reboot")
        self._pending_shutdown = mode
        return None

    def _cmd_suspend(self, mode: str) -> Any:
        self._suspended = mode
        self._fire(self._on_suspend, mode)
        return None

    def _find_program(self, path: str) -> ExecProgram | None:
        candidates = [path] if "/" in path else [f"/usr/bin/{path}", f"/bin/{path}", path]
        for candidate in candidates:
            if candidate in self._programs:
                return self._programs[candidate]
        for candidate in candidates:
            base = candidate.rsplit("/", 1)[-1]
            if candidate in (f"/bin/{base}", f"/usr/bin/{base}"):
                builtin = _BUILTIN_PROGRAMS.get(base)
                if builtin is not None:
                    return builtin
        return None

    def _cmd_exec(self, arguments: dict[str, Any]) -> Any:
        path = arguments["path"]
        stdin = _b64decode(arguments["input-data"]) if "input-data" in arguments else b""
        program = self._find_program(path)
        if len(self._processes) >= _MAX_OPEN:
            raise FakeAgentError(
                self.profile.glib_error("Failed to fork (Resource temporarily unavailable)")
            )
        if program is None:
            raise FakeAgentError(self.profile.glib_error(
                f"Failed to execute child process \u201c{path}\u201d (No such file or directory)"
            ))
        result = program if isinstance(program, FakeExecResult) else program(
            list(arguments.get("arg", [])), stdin
        )
        pid = self._next_pid
        self._next_pid += 1
        self._processes[pid] = _Process(
            result, bool(arguments.get("capture-output", False)), time.monotonic(), result.polls
        )
        return {"pid": pid}

    def _cmd_exec_status(self, arguments: dict[str, Any]) -> Any:
        pid = arguments["pid"]
        process = self._processes.get(pid)
        if process is None:
            raise FakeAgentError("Invalid parameter 'pid'")
        result = process.result
        if process.polls_left > 0 or time.monotonic() < process.started + result.duration:
            process.polls_left = max(0, process.polls_left - 1)
            return {"exited": False}
        del self._processes[pid]
        status: dict[str, Any] = {"exited": True}
        if result.signal is not None:
            status["signal"] = result.signal
        else:
            status["exitcode"] = result.exitcode
        if process.capture and result.stdout:
            status["out-data"] = base64.b64encode(result.stdout).decode()
            status["out-truncated"] = False
        if process.capture and result.stderr:
            status["err-data"] = base64.b64encode(result.stderr).decode()
            status["err-truncated"] = False
        return status

    def _cmd_file_open(self, arguments: dict[str, Any]) -> Any:
        path = arguments["path"]
        mode = arguments.get("mode", "r")
        if mode not in _FILE_MODES:
            raise FakeAgentError(f"invalid file open mode '{mode}'")
        plus = "+" in mode
        if len(self._handles) >= _MAX_OPEN:
            raise FakeAgentError(
                f"failed to open file '{path}' (mode: '{mode}'): Too many open files"
            )
        if mode[0] == "r" and path not in self.files:
            raise FakeAgentError(
                f"failed to open file '{path}' (mode: '{mode}'): No such file or directory"
            )
        if mode[0] == "w":
            self.files[path] = b""
        elif mode[0] == "a":
            self.files.setdefault(path, b"")
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = _OpenFile(
            path, readable=mode[0] == "r" or plus, writable=mode[0] != "r" or plus,
            append=mode[0] == "a",
        )
        return handle

    def _open_file(self, handle: int) -> _OpenFile:
        open_file = self._handles.get(handle)
        if open_file is None:
            raise FakeAgentError(f"handle '{handle}' has not been found")
        return open_file

    def _cmd_file_read(self, arguments: dict[str, Any]) -> Any:
        open_file = self._open_file(arguments["handle"])
        count = arguments.get("count", _FILE_READ_DEFAULT)
        if count < 0 or count > _FILE_READ_MAX:
            raise FakeAgentError(f"value '{count}' is invalid for argument count")
        if not open_file.readable:
            raise FakeAgentError("failed to read file: Bad file descriptor")
        content = self.files.get(open_file.path, b"")
        data = content[open_file.position : open_file.position + count]
        open_file.position += len(data)
        if len(data) < count:
            open_file.eof = True
        return {
            "count": len(data),
            "buf-b64": base64.b64encode(data).decode(),
            "eof": open_file.eof,
        }

    def _cmd_file_write(self, arguments: dict[str, Any]) -> Any:
        open_file = self._open_file(arguments["handle"])
        data = _b64decode(arguments["buf-b64"])
        count = arguments.get("count", len(data))
        if count < 0 or count > len(data):
            raise FakeAgentError(f"value '{count}' is invalid for argument count")
        if not open_file.writable:
            raise FakeAgentError("failed to write to file: Bad file descriptor")
        content = self.files.get(open_file.path, b"")
        position = len(content) if open_file.append else open_file.position
        if max(position + count, len(content)) > _MAX_FILE_SIZE:
            raise FakeAgentError("failed to write to file: No space left on device")
        content = content[:position].ljust(position, b"\x00") + data[:count] + content[
            position + count :
        ]
        self.files[open_file.path] = content
        open_file.position = position + count
        return {"count": count, "eof": False}

    def _cmd_file_close(self, arguments: dict[str, Any]) -> Any:
        handle = arguments["handle"]
        self._open_file(handle)
        del self._handles[handle]
        return None

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
        return self._faults.add(command, fault, call=call, times=times)

    def clear_faults(self, command: str | None = None) -> None:
        """Remove the injected faults (of ``command`` only, if given) and :meth:`release` a hang."""
        self._faults.clear(command)
        self.release()

    def release(self) -> None:
        """End a hang (:meth:`AgentFault.hang`): the agent answers again."""
        self._release_epoch += 1
        self._notify()

    @property
    def injections(self) -> list[AgentInjection]:
        """The injections that can still apply."""
        return self._faults.active

    # ---------------------------------------------------------------------------- machinery

    def _new_parser(self) -> QEMUJSONStreamParser:
        return QEMUJSONStreamParser(max_message_size=self._max_input, max_tokens=65536)

    def _restart_agent(self) -> None:
        self._generation += 1
        self._parser = self._new_parser()
        self._inbuf.clear()
        self._delimit_next = False
        self._suspended = None

    def _runnable(self) -> bool:
        return self._port_open and self._suspended is None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def _fire(self, callback: Callable[..., object] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(*args)
        except Exception:
            log.exception("fake agent: callback %r failed", callback)
            return
        if not inspect.isawaitable(result):
            return
        previous = self._callback_task

        async def run(awaitable: Awaitable[object]) -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            try:
                await awaitable
            except Exception:
                log.exception("fake agent: callback %r failed", callback)

        try:
            self._callback_task = asyncio.ensure_future(run(result))
        except RuntimeError:  # no running loop
            if inspect.iscoroutine(result):
                result.close()
            log.warning("fake agent: async callback %r called outside the event loop", callback)

    def _record(self, message: AgentMessage, size: int) -> None:
        self._records.append((message, size))
        self._record_bytes += size
        while self._records and (
            len(self._records) > self._max_records or self._record_bytes > self._max_record_bytes
        ):
            self._record_bytes -= self._records.popleft()[1]
        self._notify()

    def _encode(self, reply: Mapping[str, Any]) -> bytes:
        data = qemu_json(reply).encode("ascii") + b"\n"
        if self._delimit_next:
            self._delimit_next = False
            data = b"\xff" + data
        return data

    async def _send(self, data: bytes, generation: int) -> None:
        if not data or generation != self._generation:
            return  # the agent that produced it has gone
        conn = self._conn
        if conn is None or conn.closed or conn.writer.is_closing():
            self._stash_reply(data)
            return
        async with conn.write_lock:
            try:
                conn.writer.write(data)
                await conn.writer.drain()
            except (ConnectionError, OSError):
                self._close_connection(conn)
                self._stash_reply(data)

    def _stash_reply(self, data: bytes) -> None:
        if len(self._stash) + len(data) <= self._max_input:
            self._stash += data
        else:
            log.debug("fake agent: dropping a %d-byte reply nobody reads", len(data))

    def _close_connection(self, conn: _Connection) -> None:
        conn.closed = True
        conn.writer.close()
        if self._conn is conn:
            self._conn = None
        self._notify()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn: _Connection | None = None
        try:
            # One client at a time: the next one waits, unserved, as with QEMU's chardev.
            async with self._client_lock:
                if self._closed:
                    return
                self._connection_count += 1
                conn = _Connection(self._connection_count, reader, writer)
                self._conn = conn
                self._notify()
                if self._stash:
                    stale, self._stash = bytes(self._stash), bytearray()
                    await self._send(stale, self._generation)
                while not conn.closed:
                    await self._wait_until(
                        lambda: conn is None
                        or conn.closed
                        or self._closed
                        or len(self._inbuf) < self._max_input
                    )
                    if conn.closed or self._closed:
                        break
                    data = await reader.read(_READ_CHUNK)
                    if not data:
                        break
                    if self._conn is conn:
                        self._inbuf += data
                        self._notify()
        except (ConnectionError, OSError):
            pass
        finally:
            if conn is not None:
                if self._conn is conn and not self._port_open:
                    self._inbuf.clear()  # never reached the guest: lost with the socket
                self._close_connection(conn)
            else:
                writer.close()

    async def _agent_loop(self) -> None:
        while True:
            await self._wait_until(lambda: bool(self._inbuf) and self._runnable())
            generation = self._generation
            chunk = bytes(self._inbuf[:_READ_CHUNK])
            del self._inbuf[:_READ_CHUNK]
            self._busy = True
            try:
                def ready(generation: int = generation) -> bool:
                    return self._runnable() or generation != self._generation

                for event in self._parser.feed(chunk):
                    await self._wait_until(ready)
                    if generation != self._generation:
                        break
                    try:
                        await self._process(event, generation)
                    except Exception:
                        log.exception("fake agent: processing %r failed", event)
            finally:
                self._busy = False
                self._notify()

    def _check_request(self, value: Any) -> str | None:
        # qmp_dispatch() / qmp_dispatch_check_obj() with allow_oob=false
        if not isinstance(value, dict):
            return "QMP input must be a JSON object"
        has_execute = False
        for key in qdict_order(list(value)):
            member = value[key]
            if key == "execute":
                if not isinstance(member, str):
                    return "QMP input member 'execute' must be a string"
                has_execute = True
            elif key == "arguments":
                if not isinstance(member, dict):
                    return "QMP input member 'arguments' must be an object"
            elif key != "id":
                return f"QMP input member '{key}' is unexpected"
        if not has_execute:
            return "QMP input lacks member 'execute'"
        return None

    async def _process(self, event: QEMUJSONEvent, generation: int) -> None:
        now = time.monotonic()
        conn_number = self._conn.number if self._conn is not None else None
        value = event.value
        has_id = isinstance(value, dict) and "id" in value
        msg_id = value["id"] if has_id else None
        error = event.error if event.error is not None else self._check_request(value)
        if error is not None:
            self._record(
                AgentMessage(None, {}, msg_id, has_id, now, event.after_sync_byte, 0,
                             conn_number, value, error),
                event.size,
            )
            reply: dict[str, Any] = {"error": {"class": "GenericError", "desc": error}}
            if has_id:
                reply["id"] = msg_id
            await self._send(self._encode(reply), generation)
            return
        command: str = value["execute"]
        arguments: dict[str, Any] = value.get("arguments", {})
        if command in self._call_counts or len(self._call_counts) < _MAX_COUNTED_NAMES:
            self._call_counts[command] += 1
        self._total_calls += 1
        injection = self._faults.take(command, self._call_counts[command], self._total_calls)
        fault = injection.fault if injection is not None else None
        message = AgentMessage(
            command, arguments, msg_id, has_id, now, event.after_sync_byte,
            self._call_counts[command], conn_number, value, None, fault,
        )
        self._record(message, event.size)
        try:
            if fault is None:
                answer = await self.execute(message)
                if answer is not None:
                    await self._send(self._encode(answer), generation)
            else:
                await self._run_fault(fault, message, generation)
        finally:
            self._after_command()

    def _after_command(self) -> None:
        mode, self._pending_shutdown = self._pending_shutdown, None
        if mode is None:
            return
        self.shut_down = True
        self.shutdown_mode = mode
        self._fire(self._on_shutdown, mode)
        self.close_port()
        if self._conn is not None:
            self._close_connection(self._conn)  # QEMU exits

    async def _run_fault(self, fault: Fault, message: AgentMessage, generation: int) -> None:
        kind = fault.kind
        answer: dict[str, Any] | None = None
        if kind is AgentFaultKind.DELAY:
            if fault.effect_first:
                answer = await self.execute(message)
                await asyncio.sleep(fault.seconds)
            else:
                await asyncio.sleep(fault.seconds)
                if generation != self._generation:
                    return
                answer = await self.execute(message)
            if answer is not None:
                await self._send(self._encode(answer), generation)
        elif kind is AgentFaultKind.HANG:
            if fault.apply:
                answer = await self.execute(message)
            epoch = self._release_epoch
            self._hung = True
            self._notify()
            try:
                await self._wait_until(
                    lambda: epoch != self._release_epoch or generation != self._generation
                )
            finally:
                self._hung = False
            if generation != self._generation:
                return
            if not fault.apply:
                answer = await self.execute(message)
            if answer is not None:
                await self._send(self._encode(answer), generation)
        elif kind is AgentFaultKind.CUSTOM:
            assert fault.handler is not None
            result = fault.handler(message, self)
            if inspect.isawaitable(result):
                result = await result
            if result is None:
                return
            if isinstance(result, (bytes, bytearray, memoryview)):
                await self._send(bytes(result), generation)
            elif isinstance(result, Mapping):
                await self._send(self._encode(result), generation)
            else:
                raise TypeError(f"a fault handler returned {type(result).__name__}")
        else:
            real = await self.execute(message) if fault.apply else None
            if kind is AgentFaultKind.REPLY:
                substitute: dict[str, Any] = {"return": fault.value}
            elif kind is AgentFaultKind.ERROR:
                substitute = {"error": {"class": fault.error_class, "desc": fault.desc}}
            else:
                # The real reply is lost (its bytes, 0xFF delimiter included, never arrive).
                real_bytes = self._encode(real) if real is not None else b""
                if kind is AgentFaultKind.GARBAGE:
                    await self._send(fault.data, generation)
                elif kind is AgentFaultKind.OVERSIZED:
                    await self._send(_oversized(fault.size, fault.line), generation)
                elif kind is AgentFaultKind.DISCONNECT and self._conn is not None:
                    if fault.after_bytes:
                        await self._send(real_bytes[: fault.after_bytes], generation)
                    if self._conn is not None:
                        self._close_connection(self._conn)
                return
            if message.has_id:
                substitute["id"] = message.id
            await self._send(self._encode(substitute), generation)


def _oversized(size: int, line: bool) -> bytes:
    head = b'{"return": "'
    if not line:
        return (head + b"A" * max(0, size - len(head)))[:size]
    tail = b'"}\n'
    return (head + b"A" * max(0, size - len(head) - len(tail)) + tail)[-size:] if size else b""


def _echo(args: list[str], stdin: bytes) -> FakeExecResult:
    return FakeExecResult(stdout=(" ".join(args) + "\n").encode())


def _cat(args: list[str], stdin: bytes) -> FakeExecResult:
    return FakeExecResult(stdout=stdin)


_BUILTIN_PROGRAMS: Final[Mapping[str, ExecProgram]] = {
    "true": FakeExecResult(),
    "false": FakeExecResult(exitcode=1),
    "echo": _echo,
    "cat": _cat,
}
