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

The guest is untrusted, so everything it can make the client do is bounded:

* **Memory.** A reply longer than its command's limit is an error (:func:`reply_limit`: a few KiB
  for ``guest-ping``, ``guest-sync`` and the ``guest-fsfreeze-*`` commands, 1 MiB for
  ``guest-info`` and the other inventory commands, the requested ``count`` for
  ``guest-file-read``, ``max_reply_size`` for the rest). At most one partial line is buffered
  (and none while nothing is awaited), stale lines are dropped as they complete.
* **Decoding.** While a reply accumulates, its JSON shape is counted at C speed (values outside
  strings, nesting depth): more than ``max_reply_values`` values or nesting deeper than
  ``max_reply_depth`` is refused before the line is complete, so a reply of millions of tiny
  objects is never decoded (decoding 10 MiB of them raised peak RSS ~27x).
* **Work per call.** :meth:`~AgentConnection.receive_data` only stores the bytes;
  :meth:`~AgentConnection.next_event` processes them in steps of at most :data:`STEP_BYTES`
  bytes and :data:`STEP_OPS` parser operations, and returns :data:`YIELD` when it stopped with
  input left: an asyncio caller yields to the event loop and calls it again, so no read blocks
  the loop for long however hostile the bytes (a 256 KiB chunk of ``\\xff\\n`` used to take
  ~400 ms in one go). Runs of 0xFF bytes and blank lines, input while nothing is awaited and
  input while out of sync are skipped at C speed. The one operation whose cost grows with the
  input is decoding a complete reply, bounded by the command's limit and ``max_reply_values``.

Nothing is parsed before it has been checked for type. Any violation is raised as
:class:`~qmpagent.AgentProtocolError` from :meth:`~AgentConnection.next_event` and puts the
connection in :attr:`State.DESYNCED`: what follows is discarded until the next sync.

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
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Final

from .errors import AgentProtocolError, AgentUnavailable, UsageError

__all__ = [
    "DEFAULT_MAX_REPLY_DEPTH",
    "DEFAULT_MAX_REPLY_SIZE",
    "DEFAULT_MAX_REPLY_VALUES",
    "DELIMITER",
    "MODERATE_REPLY_COMMANDS",
    "MODERATE_REPLY_SIZE",
    "NEED_DATA",
    "SMALL_REPLY_COMMANDS",
    "SMALL_REPLY_SIZE",
    "STEP_BYTES",
    "STEP_OPS",
    "YIELD",
    "AgentConnection",
    "ErrorReply",
    "Event",
    "NeedData",
    "Reply",
    "State",
    "Synced",
    "Yield",
    "new_sync_id",
    "reply_limit",
]

#: The byte that starts a sync: the agent flushes its input on it and prefixes its
#: ``guest-sync-delimited`` reply with it.
DELIMITER: Final = 0xFF
_DELIM_BYTES: Final = b"\xff"

#: Longest reply line accepted, in bytes (``guest-file-read`` of 4 MiB is ~5.6 MB of base64).
DEFAULT_MAX_REPLY_SIZE: Final = 10 * 1024 * 1024
#: Most JSON values (array elements, object members, containers; counted outside strings) in
#: one reply. Decoding costs up to ~0.1 us per value and ~70 bytes of memory per tiny object:
#: this bounds a reply's decoding to a few ms and a few MiB. qemu-ga's ``guest-info`` has ~500,
#: ``guest-get-fsinfo`` ~20 per filesystem.
DEFAULT_MAX_REPLY_VALUES: Final = 50_000
#: Deepest nesting of arrays and objects accepted in one reply (qemu-ga's replies nest at most
#: 5 deep; deep nesting costs recursion in every consumer of the value).
DEFAULT_MAX_REPLY_DEPTH: Final = 32

#: The most input bytes one :meth:`AgentConnection.next_event` call processes.
STEP_BYTES: Final = 64 * 1024
#: The most parser operations (a line completed or dropped, a 0xFF, a segment of a line) one
#: :meth:`AgentConnection.next_event` call performs.
STEP_OPS: Final = 128

#: Limit of the replies of commands whose replies are small by nature (a count, a status, an
#: empty object, a handle, a short error).
SMALL_REPLY_SIZE: Final = 16 * 1024
SMALL_REPLY_COMMANDS: Final = frozenset({
    "guest-ping", "guest-sync", "guest-sync-delimited",
    "guest-fsfreeze-status", "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-file-open", "guest-file-close", "guest-file-write", "guest-file-seek",
    "guest-file-flush",
    "guest-exec", "guest-get-host-name", "guest-get-time", "guest-set-time",
    "guest-get-timezone", "guest-set-user-password", "guest-set-vcpus",
    "guest-get-memory-block-info", "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
    "guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid",
})
#: Limit of the replies of inventory commands: lists that grow with the guest, not with data.
MODERATE_REPLY_SIZE: Final = 1024 * 1024
MODERATE_REPLY_COMMANDS: Final = frozenset({
    "guest-info", "guest-get-osinfo", "guest-get-fsinfo", "guest-get-users",
    "guest-network-get-interfaces", "guest-network-get-route", "guest-get-vcpus",
    "guest-get-memory-blocks", "guest-set-memory-blocks", "guest-get-devices",
    "guest-get-disks", "guest-get-diskstats", "guest-get-cpustats", "guest-get-load",
    "guest-ssh-get-authorized-keys", "guest-fstrim",
})
# guest-file-read: qemu-ga reads 4 KiB when no count is given; its reply carries the data in
# base64 plus a few small members.
_FILE_READ_DEFAULT_COUNT: Final = 4096
_FILE_READ_OVERHEAD: Final = 1024
# A sync reply is {"return": <int64>}: a longer line after a 0xFF is noise, not buffered.
_SYNC_LINE_LIMIT: Final = 256


def reply_limit(
    command: str, arguments: Mapping[str, Any] | None = None, default: int = DEFAULT_MAX_REPLY_SIZE
) -> int:
    """The longest reply, in bytes, that ``command`` (with ``arguments``) can legitimately send,
    capped at ``default``. Raises nothing."""
    if command == "guest-file-read":
        count = _FILE_READ_DEFAULT_COUNT if arguments is None else arguments.get(
            "count", _FILE_READ_DEFAULT_COUNT
        )
        if type(count) is int and count >= 0:
            return min(default, 4 * ((count + 2) // 3) + _FILE_READ_OVERHEAD)
        return default
    if command in SMALL_REPLY_COMMANDS:
        return min(default, SMALL_REPLY_SIZE)
    if command in MODERATE_REPLY_COMMANDS:
        return min(default, MODERATE_REPLY_SIZE)
    return default


# At the start of a line: 0xFF bytes (each starts a line afresh) and whitespace, skipped at once.
_LINE_START: Final = re.compile(rb"[\xff \t\r\n]*")
_JSON_WS: Final = re.compile(r"[ \t\n\r]*")
# Everything but what the JSON shape scan looks at: quotes, brackets and commas.
_NOT_STRUCTURAL: Final = bytes(b for b in range(256) if b not in b'"[]{},')
_NESTING: Final = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))

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


class Yield:
    """The type of :data:`YIELD`."""

    _instance: Yield | None = None

    def __new__(cls) -> Yield:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "YIELD"


#: Returned by :meth:`AgentConnection.next_event` when it stopped to bound its work with input
#: still to process: let other tasks run, then call it again (no new bytes are needed).
YIELD: Final = Yield()


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


def decode_line(line: bytes | bytearray) -> dict[str, Any]:
    """Decode one reply line into a JSON object.

    Raises:
        AgentProtocolError: not UTF-8, not JSON, or not a JSON object.
    """
    try:
        text = line.decode("utf-8")
        ws = _JSON_WS.match(text)
        obj, end = _decoder.raw_decode(text, ws.end() if ws is not None else 0)
        tail = _JSON_WS.match(text, end)
        if tail is None or tail.end() != len(text):
            raise ValueError("trailing data after the JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AgentProtocolError(f"malformed agent output: {exc}") from exc
    if not isinstance(obj, dict):
        raise AgentProtocolError(f"agent output is not a JSON object: {type(obj).__name__}")
    return obj


class _Shape:
    """The JSON shape of a reply line as it accumulates, counted at C speed over each segment:
    values outside strings and nesting depth, so that a reply too costly to decode is refused
    before it is complete (and before it is decoded)."""

    __slots__ = ("depth", "escape", "in_string", "max_depth", "max_values", "quotes", "values")

    def __init__(self, max_values: int, max_depth: int) -> None:
        self.max_values = max_values
        self.max_depth = max_depth
        self.reset()

    def reset(self) -> None:
        self.values = 0
        self.depth = 0
        self.quotes = 0
        self.in_string = False
        self.escape = False  # the previous segment ended inside an escape (a lone backslash)

    def feed(self, seg: bytes) -> str | None:
        """Account for the next segment of the line; returns why it is refused, or None."""
        if self.escape and seg:
            seg = seg[1:]  # the escaped character
            self.escape = False
        if b"\\" in seg:
            # Escapes are backslash pairs: drop them so that an escaped quote is not a quote.
            seg = seg.replace(b"\\\\", b"")
            if seg.endswith(b"\\"):
                self.escape = True
                seg = seg[:-1]
            seg = seg.replace(b'\\"', b"")
        kept = seg.translate(None, _NOT_STRUCTURAL)
        quotes = kept.count(b'"')
        if quotes:
            self.quotes += quotes
            if self.quotes > 4 * (self.max_values + 2):  # each value or key is one string at most
                return f"more than {self.max_values} JSON values"
            parts = kept.split(b'"')
            kept = b"".join(parts[1::2] if self.in_string else parts[0::2])
            self.in_string ^= quotes % 2 == 1
        elif self.in_string:
            return None
        if not kept:
            return None
        opens = kept.count(b"[") + kept.count(b"{")
        self.values += opens + kept.count(b",")
        if self.values > self.max_values:
            return f"more than {self.max_values} JSON values"
        closes = kept.count(b"]") + kept.count(b"}")
        if self.depth + opens > self.max_depth and self._peak(kept) > self.max_depth:
            return f"JSON nested deeper than {self.max_depth}"
        self.depth += opens - closes
        return None

    def _peak(self, kept: bytes) -> int:
        """The deepest nesting reached in this segment (only brackets and commas in ``kept``)."""
        brackets = kept.translate(None, b",")
        # Empty pairs ([] {}, e.g. a list of tiny objects) go first, at C speed: removing one
        # pass of them lowers the peak by at most one, so the rest bounds it cheaply.
        reduced = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(reduced) * 2 < len(brackets):
            slack = 2 if len(reduced) < len(brackets) else 0
            bound = max(accumulate(map(_NESTING.__getitem__, reduced), initial=self.depth))
            if bound + slack <= self.max_depth:
                return bound + slack
        return max(accumulate(map(_NESTING.__getitem__, brackets), initial=self.depth))


class AgentConnection:
    """The guest-agent protocol state of one connection, without I/O.

    Args:
        max_reply_size: the longest reply line accepted, in bytes (each command's own limit,
            :func:`reply_limit`, is applied below it); longer output raises
            :class:`~qmpagent.AgentProtocolError` and is discarded as it arrives, so memory stays
            bounded by about this much however the bytes are chunked.
        request_ids: tag each command with a random ``"id"`` and accept only the reply that
            echoes it.
        max_reply_values: the most JSON values one reply may hold (see
            :data:`DEFAULT_MAX_REPLY_VALUES`).
        max_reply_depth: the deepest nesting one reply may have.
        reply_limits: per-command reply limits in bytes that replace :func:`reply_limit`'s
            (still capped at ``max_reply_size``).

    Raises:
        UsageError: a limit out of range.
    """

    def __init__(
        self,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
        *,
        request_ids: bool = False,
        max_reply_values: int = DEFAULT_MAX_REPLY_VALUES,
        max_reply_depth: int = DEFAULT_MAX_REPLY_DEPTH,
        reply_limits: Mapping[str, int] | None = None,
    ) -> None:
        if type(max_reply_size) is not int or max_reply_size < 64:
            raise UsageError("max_reply_size must be an int of at least 64 bytes")
        if type(max_reply_values) is not int or max_reply_values < 1:
            raise UsageError("max_reply_values must be a positive int")
        if type(max_reply_depth) is not int or max_reply_depth < 1:
            raise UsageError("max_reply_depth must be a positive int")
        limits = dict(reply_limits or {})
        for name, limit in limits.items():
            if type(limit) is not int or limit < 64:
                raise UsageError(f"reply limit of {name!r} must be an int of at least 64 bytes")
        self.max_reply_size = max_reply_size
        self.max_reply_values = max_reply_values
        self.max_reply_depth = max_reply_depth
        self.request_ids = request_ids
        self._reply_limits = limits
        self._state = State.DESYNCED
        # Input received and not yet processed: _input[_pos:].
        self._input = b""
        self._pos = 0
        self._eof = False  # the peer closed; applied once the input before it is processed
        self._line = bytearray()
        self._shape = _Shape(max_reply_values, max_reply_depth)
        # True while the rest of a dropped line is being skipped (oversized, stale, refused).
        self._skipping = False
        # The line being skipped began before the command in flight was sent: when it ends, the
        # reply (if it was on that line) is lost; fail at once rather than time out.
        self._tainted = False
        # SYNCING: whether the delimiter was seen (then _line collects the sync reply).
        self._delimited = False
        self._sync_id = 0
        self._command = ""
        self._reply_limit = max_reply_size
        self._request_id = 0
        self._events: deque[Event | BaseException] = deque()
        #: Complete lines dropped as stale or unsolicited (for diagnostics and tests; while
        #: nothing is awaited, each newline counts).
        self.discarded_lines = 0
        #: Parser steps run so far (one per :meth:`next_event` call that had input to
        #: process) and parser operations performed in them: diagnostics of the work bound.
        self.steps = 0
        self.operations = 0

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
        """Bytes held for an incomplete line (never more than the reply limit)."""
        return len(self._line)

    @property
    def pending(self) -> int:
        """Bytes received and not processed yet (by :meth:`next_event`, in bounded steps)."""
        return len(self._input) - self._pos

    # --- sending --------------------------------------------------------------------------

    def start_sync(self, sync_id: int | None = None) -> bytes:
        """Begin a resync; returns the bytes to send (0xFF + ``guest-sync-delimited``).

        Allowed in any state but CLOSED; whatever was in flight is abandoned, and input not
        processed yet is dropped (it arrived before the sync was sent: it cannot answer it).
        """
        self._check_open()
        self._sync_id = new_sync_id() if sync_id is None else sync_id
        if not _INT64_MIN <= self._sync_id <= _INT64_MAX:
            raise UsageError("sync id must fit in a signed 64-bit integer")
        self._drop_input()
        self._state = State.SYNCING
        self._delimited = False
        self._clear_line()
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

        Input received before (not processed yet) is processed first, as stale.

        Args:
            command: the agent command, e.g. ``"guest-ping"``.
            arguments: its arguments (a JSON object), if any.
            max_reply_size: a smaller limit for this reply than the connection's and the
                command's own (:func:`reply_limit`).
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
        if self.pending:
            self._step(bounded=False)  # idle: stale, dropped at C speed
        if expect_reply:
            limit = self._reply_limits.get(command)
            if limit is None:
                limit = reply_limit(command, arguments, self.max_reply_size)
            if max_reply_size is not None:
                limit = min(limit, max_reply_size)
            self._command = command
            self._reply_limit = min(limit, self.max_reply_size)
            self._state = State.AWAITING_REPLY
            self._shape.reset()
            # A stale partial line is in progress: whatever completes it is not our reply.
            self._tainted = self._skipping
        elif not self.request_ids:
            self._desync()
        return data

    def abandon(self) -> None:
        """The caller stopped waiting (timeout, cancellation, write failure): the stream may
        still carry the reply, so the connection is out of sync until the next sync."""
        if self._state is not State.CLOSED and self._state is not State.IDLE:
            self._desync()
        elif self._state is State.IDLE and (self._line or self._skipping):
            # A partial line may belong to anything: resync to be safe.
            self._desync()

    # --- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the stream. They are only stored: :meth:`next_event` processes
        them, in bounded steps. Feed the next bytes once it returned :data:`NEED_DATA`; bytes
        fed before that make this call process the earlier ones to the end first (memory stays
        bounded by one chunk plus the reply limit, but the work of this call does not)."""
        if self._state is State.CLOSED or self._eof:
            return
        if self.pending:
            self._step(bounded=False)
        if self._state is State.DESYNCED or not data:
            return  # nothing is expected: everything is stale
        self._input = bytes(data)
        self._pos = 0

    def receive_eof(self) -> None:
        """The peer closed the stream. A command in flight fails with
        :class:`~qmpagent.AgentUnavailable` (once the input received before is processed)."""
        self._eof = True
        if not self.pending:
            self._close()

    def next_event(self) -> Event | NeedData | Yield:
        """The next event; :data:`NEED_DATA` when more bytes are needed; :data:`YIELD` when this
        call did its share of work (:data:`STEP_BYTES`, :data:`STEP_OPS`) with input left.

        Raises:
            AgentProtocolError: the guest sent something invalid for the reply in flight
                (the connection is DESYNCED afterwards).
            AgentUnavailable: the stream closed while a reply was expected.
        """
        if not self._events and self.pending:
            self._step(bounded=True)
        if self._events:
            item = self._events.popleft()
            if isinstance(item, BaseException):
                raise item
            return item
        if self.pending:
            return YIELD
        return NEED_DATA

    # --- internals ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state is State.CLOSED or self._eof:
            raise AgentUnavailable("the agent connection is closed")

    def _close(self) -> None:
        if self._state in (State.AWAITING_REPLY, State.SYNCING):
            what = "sync" if self._state is State.SYNCING else repr(self._command)
            self._events.append(AgentUnavailable(f"the agent closed the connection during {what}"))
        self._state = State.CLOSED
        self._drop_input()
        self._clear_line()

    def _drop_input(self) -> None:
        self._input = b""
        self._pos = 0

    def _clear_line(self) -> None:
        self._line.clear()
        self._shape.reset()
        self._skipping = False
        self._tainted = False

    def _desync(self) -> None:
        self._state = State.DESYNCED
        self._drop_input()
        self._clear_line()

    def _fail(self, message: str) -> None:
        self._events.append(AgentProtocolError(message))
        self._desync()

    def _line_limit(self) -> int:
        if self._state is State.AWAITING_REPLY:
            return self._reply_limit
        return _SYNC_LINE_LIMIT

    def _step(self, *, bounded: bool) -> None:
        """Process input: with ``bounded``, at most STEP_BYTES bytes and STEP_OPS operations
        in the states where a line must be examined (SYNCING, AWAITING_REPLY); input in the
        other states is consumed whole, at C speed."""
        self.steps += 1
        data = self._input
        pos = self._pos
        end = len(data)
        window = min(end, pos + STEP_BYTES) if bounded else end
        ops = 0
        ff = -1  # the next 0xFF at or after pos before window (window: none); -1: not searched
        while pos < end:
            st = self._state
            if st is State.IDLE:
                pos = self._consume_idle(data, pos, end)
                break
            if st is State.DESYNCED or st is State.CLOSED:
                pos = end  # nothing is expected: everything is stale
                break
            if pos >= window or (bounded and ops >= STEP_OPS):
                break
            ops += 1
            self.operations += 1
            if st is State.SYNCING and not self._delimited:
                i = data.find(_DELIM_BYTES, pos, window)
                if i < 0:
                    pos = window
                    continue
                pos = i + 1
                self._delimited = True
                self._clear_line()
                continue
            # Line mode (AWAITING_REPLY, SYNCING after the delimiter).
            if not self._line and not self._skipping:
                start = _LINE_START.match(data, pos, window)
                if start is not None and start.end() > pos:
                    pos = start.end()  # 0xFF bytes and blank lines before a line: nothing to drop
                    continue
            if ff < pos:
                ff = data.find(_DELIM_BYTES, pos, window)
                if ff < 0:
                    ff = window
            nl = data.find(b"\n", pos, ff)
            if nl < 0 and ff < window:
                # A 0xFF never occurs inside valid UTF-8 JSON: it starts a new (delimited) line,
                # and whatever preceded it on this line is dropped.
                if self._line or self._skipping:
                    self.discarded_lines += 1
                self._clear_line()
                pos = ff + 1
                continue
            stop = nl if nl >= 0 else window
            if not self._skipping and stop > pos and not self._append(data, pos, stop):
                continue  # refused (DESYNCED: dropped) or not a sync reply (find the next 0xFF)
            if nl < 0:
                pos = window
                continue
            pos = nl + 1
            if self._skipping:
                tainted = self._tainted
                self._clear_line()
                if tainted and self._state is State.AWAITING_REPLY:
                    self._fail(
                        f"reply to {self._command!r}: it shares a line with output that began "
                        "before the command was sent"
                    )
                continue
            self._complete_line()
        if pos >= end:
            self._drop_input()
            if self._eof:
                self._close()
        else:
            self._pos = pos

    def _consume_idle(self, data: bytes, pos: int, end: int) -> int:
        """IDLE: every line is stale. Drop them all at once; a partial line at the end is
        stale too and is skipped when it completes."""
        last_nl = data.rfind(b"\n", pos, end)
        if last_nl >= 0:
            self.discarded_lines += data.count(b"\n", pos, last_nl + 1)
            self._clear_line()
            pos = last_nl + 1
        last_ff = data.rfind(_DELIM_BYTES, pos, end)
        if last_ff >= 0:  # a 0xFF starts a line afresh: what preceded it is dropped
            self._clear_line()
            pos = last_ff + 1
        blank = _LINE_START.match(data, pos, end)
        if blank is not None and blank.end() < end:
            self._skipping = True  # a stale partial line
        return end

    def _append(self, data: bytes, pos: int, stop: int) -> bool:
        """Add ``data[pos:stop]`` to the line; False if the line was refused instead."""
        if len(self._line) + (stop - pos) > self._line_limit():
            self._oversized()
            return False
        seg = data[pos:stop]
        if self._state is State.AWAITING_REPLY:
            refused = self._shape.feed(seg)
            if refused is not None:
                self._fail(f"reply to {self._command!r} refused: {refused}")
                return False
        self._line += seg
        return True

    def _oversized(self) -> None:
        self._line.clear()
        if self._state is State.AWAITING_REPLY:
            self._fail(
                f"reply to {self._command!r} exceeds the maximum reply size "
                f"({self._reply_limit} bytes)"
            )
        else:  # SYNCING: not our sync reply; look for the next delimiter
            self._delimited = False
            self.discarded_lines += 1

    def _complete_line(self) -> None:
        line = self._line  # never empty or blank: blank input at a line start is skipped
        st = self._state
        if st is State.SYNCING:
            self._delimited = False
            if line[:1] != b"{" or b'"return"' not in line:  # noise: not worth decoding
                self.discarded_lines += 1
                self._clear_line()
                return
            try:
                obj = decode_line(line)
            except AgentProtocolError:
                self.discarded_lines += 1
                self._clear_line()
                return
            self._clear_line()
            value = obj.get("return")
            if type(value) is int and value == self._sync_id and "error" not in obj:
                self._state = State.IDLE
                self._events.append(Synced(self._sync_id))
            else:
                self.discarded_lines += 1  # a stale sync reply or noise
            return
        # AWAITING_REPLY
        head = bytes(line[:200])
        try:
            obj = decode_line(line)
        except AgentProtocolError as exc:
            self._fail(f"reply to {self._command!r}: {exc}")
            return
        finally:
            self._clear_line()
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
                self._fail(f"malformed error reply to {self._command!r}: {head!r}")
                return
            self._state = State.IDLE
            self._events.append(ErrorReply(self._command, err["class"], err["desc"]))
        else:
            self._fail(f"reply to {self._command!r} has neither return nor error: {head!r}")
