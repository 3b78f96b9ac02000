"""The guest-agent wire protocol, sans I/O: bytes in, replies out.

This module imports no asyncio and no socket. The client writes the bytes that
:meth:`AgentConnection.send_command` and :meth:`AgentConnection.start_sync` return, feeds what it
reads to :meth:`AgentConnection.receive_data`, and takes events from
:meth:`AgentConnection.next_event` until it gets :data:`NEED_DATA`.

The agent protocol is JSON objects, one per line, over a byte stream with no greeting and no
framing beyond the newline. Because a previous client, a timed-out command or a guest that
booted while requests were queued can leave replies in the stream that belong to nobody, the
client resynchronises with ``guest-sync-delimited``: it sends a 0xFF byte (the agent discards
partial input on it and answers it with a parse-error line) followed by the sync request with an
unpredictable id; the agent answers ``\\xff{"return": <id>}\\n``. Everything before the 0xFF is
discarded, and a sync reply with another id (a stale one) is discarded too.

After a sync the channel stays in sync across commands without a round trip per command: one
request, one reply, in order. Whatever can leave a reply that belongs to nobody puts the
connection out of sync, so the next command resyncs first: a timeout or cancellation
(:meth:`AgentConnection.abandon`), a protocol error, and a command that sends no reply on success
(``guest-shutdown``, ``guest-suspend-*``: if it fails, its error reply comes later). Optionally
(``request_ids=True``) every request also carries a fresh random ``"id"``, which the agent echoes,
and a reply without it is dropped as stale: defence in depth, at about 10% of a round trip (the
agent's JSON handling of the member, measured on qemu-ga 7.2 under TCG). Without ids, a reply
that carries an ``"id"`` is never ours and is dropped.

The guest is untrusted: a line longer than ``max_reply_size`` is an error, at most one partial
line is buffered, stale lines are dropped as they complete, and nothing is parsed before it has
been checked for type. Any violation is raised as :class:`~qmpagent.AgentProtocolError` from
:meth:`~AgentConnection.next_event` and puts the connection in :attr:`State.DESYNCED`: what
follows is discarded until the next sync.

State machine (the whole of it)::

    DESYNCED --start_sync--> SYNCING --Synced--> IDLE --send_command--> AWAITING_REPLY
        ^                      |                  ^                          |
        |                      +---- error -------+-------- Reply/ErrorReply-+
        +--- abandon() / protocol error / timeout -------------------------+
    any --receive_eof--> CLOSED
"""

from __future__ import annotations

import enum
import json
import re
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from .errors import AgentProtocolError, AgentUnavailable, UsageError

__all__ = [
    "DEFAULT_MAX_REPLY_SIZE",
    "DELIMITER",
    "NEED_DATA",
    "AgentConnection",
    "ErrorReply",
    "Event",
    "NeedData",
    "Reply",
    "State",
    "Synced",
    "new_sync_id",
]

#: The byte that starts a sync: the agent flushes its input on it and prefixes its
#: ``guest-sync-delimited`` reply with it.
DELIMITER: Final = 0xFF
_DELIM_BYTES: Final = b"\xff"

#: Longest reply line accepted, in bytes (``guest-file-read`` of 4 MiB is ~5.6 MB of base64).
DEFAULT_MAX_REPLY_SIZE: Final = 10 * 1024 * 1024

_BLANK_LINES: Final = re.compile(rb"[ \t\r]*\n(?:[ \t\r]*\n)*")

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


def new_sync_id() -> int:
    """A random id for ``guest-sync-delimited``: 64 random bits as a signed int64, from
    :mod:`secrets` so that a stale reply cannot be mistaken for ours."""
    return secrets.randbits(64) + _INT64_MIN


class State(enum.Enum):
    """Where the connection is in the protocol."""

    #: Not known to be in sync (fresh connection, after a timeout or a protocol error): incoming
    #: bytes are discarded; the next step must be :meth:`AgentConnection.start_sync`.
    DESYNCED = "desynced"
    #: A sync was sent: discarding everything until ``\\xff{"return": <our id>}``.
    SYNCING = "syncing"
    #: In sync, nothing expected: complete lines that arrive are stale and dropped.
    IDLE = "idle"
    #: A command was sent and its reply (matched by id) is expected.
    AWAITING_REPLY = "awaiting_reply"
    #: The peer closed the stream.
    CLOSED = "closed"


class NeedData:
    """The type of :data:`NEED_DATA`."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`AgentConnection.next_event` when more bytes are needed.
NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Reply:
    """A successful reply to the command in flight: ``{"return": value}``."""

    command: str
    value: Any


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An error reply to the command in flight: ``{"error": {"class": ..., "desc": ...}}``."""

    command: str
    error_class: str
    desc: str


@dataclass(frozen=True, slots=True)
class Synced:
    """The sync completed: the channel is in sync."""

    sync_id: int


Event = Reply | ErrorReply | Synced


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def decode_line(line: bytes) -> dict[str, Any]:
    """Decode one reply line into a JSON object.

    Raises:
        AgentProtocolError: not UTF-8, not JSON, or not a JSON object.
    """
    try:
        text = line.decode("utf-8")
        obj, end = _decoder.raw_decode(text.strip())
        if end != len(text.strip()):
            raise ValueError("trailing data after the JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AgentProtocolError(f"malformed agent output: {exc}") from exc
    if not isinstance(obj, dict):
        raise AgentProtocolError(f"agent output is not a JSON object: {type(obj).__name__}")
    return obj


class AgentConnection:
    """The guest-agent protocol state of one connection, without I/O.

    Args:
        max_reply_size: the longest reply line accepted, in bytes; longer output raises
            :class:`~qmpagent.AgentProtocolError` and is discarded as it arrives, so memory stays
            bounded by about this much however the bytes are chunked.
        request_ids: tag each command with a random ``"id"`` and accept only the reply that
            echoes it.
    """

    def __init__(
        self, max_reply_size: int = DEFAULT_MAX_REPLY_SIZE, *, request_ids: bool = False
    ) -> None:
        if max_reply_size < 64:
            raise UsageError("max_reply_size must be at least 64 bytes")
        self.max_reply_size = max_reply_size
        self.request_ids = request_ids
        self._state = State.DESYNCED
        self._line = bytearray()
        # True while the rest of an oversized or otherwise dropped line is being skipped.
        self._skipping = False
        # SYNCING: whether the delimiter was seen (then _line collects the sync reply).
        self._delimited = False
        self._sync_id = 0
        self._command = ""
        self._reply_limit = max_reply_size
        self._request_id = 0
        self._events: deque[Event | BaseException] = deque()
        #: Complete lines dropped as stale or unsolicited (for diagnostics and tests).
        self.discarded_lines = 0

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._state

    @property
    def in_sync(self) -> bool:
        """Whether a command can be sent without a sync first."""
        return self._state is State.IDLE

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete line (never more than ``max_reply_size``)."""
        return len(self._line)

    # --- sending --------------------------------------------------------------------------

    def start_sync(self, sync_id: int | None = None) -> bytes:
        """Begin a resync; returns the bytes to send (0xFF + ``guest-sync-delimited``).

        Allowed in any state but CLOSED; whatever was in flight is abandoned.
        """
        self._check_open()
        self._sync_id = new_sync_id() if sync_id is None else sync_id
        if not _INT64_MIN <= self._sync_id <= _INT64_MAX:
            raise UsageError("sync id must fit in a signed 64-bit integer")
        self._state = State.SYNCING
        self._delimited = False
        self._line.clear()
        self._skipping = False
        self._events.clear()
        request = {"execute": "guest-sync-delimited", "arguments": {"id": self._sync_id}}
        return _DELIM_BYTES + json.dumps(request, separators=(",", ":")).encode() + b"\n"

    def send_command(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        expect_reply: bool = True,
        max_reply_size: int | None = None,
    ) -> bytes:
        """Encode a command; returns the bytes to send.

        Args:
            command: the agent command, e.g. ``"guest-ping"``.
            arguments: its arguments (a JSON object), if any.
            max_reply_size: a smaller limit for this reply than the connection's (for
                commands whose replies are small by nature).
            expect_reply: False for commands that send no reply on success
                (``guest-shutdown``, ``guest-suspend-*``): nothing is awaited, and the
                connection is DESYNCED (an error reply may come later) unless request ids are
                on, which tell such a late reply apart.

        Raises:
            UsageError: not in sync (call :meth:`start_sync` first), a command is already in
                flight, or the arguments are not JSON-serialisable.
        """
        self._check_open()
        if self._state is not State.IDLE:
            raise UsageError(f"cannot send {command!r} in state {self._state.value}")
        if not isinstance(command, str) or not command:
            raise UsageError("command must be a non-empty string")
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            if not isinstance(arguments, dict):
                raise UsageError("arguments must be a dict")
            request["arguments"] = arguments
        if self.request_ids:
            self._request_id = new_sync_id()
            request["id"] = self._request_id
        try:
            data = json.dumps(request, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise UsageError(f"arguments of {command!r} are not JSON: {exc}") from exc
        if expect_reply:
            self._command = command
            self._reply_limit = min(max_reply_size or self.max_reply_size, self.max_reply_size)
            self._state = State.AWAITING_REPLY
        elif not self.request_ids:
            self._desync()
        return data

    def abandon(self) -> None:
        """The caller stopped waiting (timeout, cancellation, write failure): the stream may
        still carry the reply, so the connection is out of sync until the next sync."""
        if self._state is not State.CLOSED and self._state is not State.IDLE:
            self._desync()
        elif self._state is State.IDLE and self._line:
            # A partial line may belong to anything: resync to be safe.
            self._desync()

    # --- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the stream. Processing happens here, so the memory held is
        bounded by ``max_reply_size`` however much is fed."""
        if self._state is State.CLOSED:
            return
        view = memoryview(data)
        pos, end = 0, len(data)
        # The next 0xFF at or after pos (-1: none left). Found once and reused until passed, so
        # a chunk of many short lines is scanned once, not once per line.
        ff = data.find(_DELIM_BYTES)
        while pos < end:
            if 0 <= ff < pos:
                ff = data.find(_DELIM_BYTES, pos)
            st = self._state
            if st is State.DESYNCED:
                return  # nothing is expected: everything is stale
            if st is State.SYNCING and not self._delimited:
                if ff < 0:
                    return
                pos = ff + 1
                self._delimited = True
                self._line.clear()
                self._skipping = False
                continue
            # Line mode (IDLE, AWAITING_REPLY, SYNCING after the delimiter).
            if not self._line and not self._skipping:
                blank = _BLANK_LINES.match(data, pos)
                if blank is not None:  # skip a run of empty lines at C speed
                    pos = blank.end()
                    continue
            nl = data.find(b"\n", pos)
            if ff >= 0 and (nl < 0 or ff < nl):
                # A 0xFF never occurs inside valid UTF-8 JSON: it starts a new (delimited) line,
                # and whatever preceded it on this line is dropped.
                self._line_dropped()
                pos = ff + 1
                if self._state is State.SYNCING:
                    self._delimited = True
                continue
            stop = nl if nl >= 0 else end
            if not self._skipping:
                if len(self._line) + (stop - pos) > self._line_limit():
                    self._oversized()
                else:
                    self._line += view[pos:stop]
            if nl < 0:
                return
            pos = nl + 1
            if self._skipping:
                self._skipping = False
                continue
            line = bytes(self._line)
            self._line.clear()
            self._complete_line(line)

    def receive_eof(self) -> None:
        """The peer closed the stream. A command in flight fails with
        :class:`~qmpagent.AgentUnavailable`."""
        if self._state in (State.AWAITING_REPLY, State.SYNCING):
            what = "sync" if self._state is State.SYNCING else repr(self._command)
            self._events.append(AgentUnavailable(f"the agent closed the connection during {what}"))
        self._state = State.CLOSED
        self._line.clear()

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA`.

        Raises:
            AgentProtocolError: the guest sent something invalid for the reply in flight
                (the connection is DESYNCED afterwards).
            AgentUnavailable: the stream closed while a reply was expected.
        """
        if not self._events:
            return NEED_DATA
        item = self._events.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    # --- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state is State.CLOSED:
            raise AgentUnavailable("the agent connection is closed")

    def _desync(self) -> None:
        self._state = State.DESYNCED
        self._line.clear()
        self._skipping = False

    def _fail(self, message: str) -> None:
        self._events.append(AgentProtocolError(message))
        self._desync()

    def _line_dropped(self) -> None:
        if self._line or self._skipping:
            self.discarded_lines += 1
        self._line.clear()
        self._skipping = False

    def _line_limit(self) -> int:
        return self._reply_limit if self._state is State.AWAITING_REPLY else self.max_reply_size

    def _oversized(self) -> None:
        self._line.clear()
        if self._state is State.AWAITING_REPLY:
            self._fail(
                f"reply to {self._command!r} exceeds the maximum reply size "
                f"({self._reply_limit} bytes)"
            )
        elif self._state is State.SYNCING:
            self._delimited = False  # not our sync reply: look for the next delimiter
            self.discarded_lines += 1
        else:
            self._skipping = True
            self.discarded_lines += 1

    def _complete_line(self, line: bytes) -> None:
        if not line.strip():
            return
        st = self._state
        if st is State.SYNCING:
            self._delimited = False
            try:
                obj = decode_line(line)
            except AgentProtocolError:
                self.discarded_lines += 1
                return
            value = obj.get("return")
            if type(value) is int and value == self._sync_id and "error" not in obj:
                self._state = State.IDLE
                self._events.append(Synced(self._sync_id))
            else:
                self.discarded_lines += 1  # a stale sync reply or noise
            return
        if st is State.IDLE:
            self.discarded_lines += 1  # nobody asked: stale
            return
        # AWAITING_REPLY
        try:
            obj = decode_line(line)
        except AgentProtocolError as exc:
            self._fail(f"reply to {self._command!r}: {exc}")
            return
        if self.request_ids:
            if obj.get("id") != self._request_id or type(obj.get("id")) is not int:
                self.discarded_lines += 1  # a reply to somebody else (or to no id): stale
                return
        elif "id" in obj:
            self.discarded_lines += 1  # we sent no id: this answers somebody else
            return
        if "return" in obj and "error" not in obj:
            self._state = State.IDLE
            self._events.append(Reply(self._command, obj["return"]))
        elif "error" in obj and "return" not in obj:
            err = obj["error"]
            if (
                not isinstance(err, dict)
                or not isinstance(err.get("class"), str)
                or not isinstance(err.get("desc"), str)
            ):
                self._fail(f"malformed error reply to {self._command!r}: {line[:200]!r}")
                return
            self._state = State.IDLE
            self._events.append(ErrorReply(self._command, err["class"], err["desc"]))
        else:
            self._fail(f"reply to {self._command!r} has neither return nor error: {line[:200]!r}")
