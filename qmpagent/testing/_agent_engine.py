"""The fake agent's protocol engine, sans I/O: bytes in, requests and replies out.

It reads the byte stream with QEMU's JSON reader (a 0xFF byte flushing partial input, error
recovery), checks each value like ``qmp_dispatch``, numbers the calls, finds the injected
fault that applies, keeps the bounded record of what was received, and formats replies like
QEMU (the 0xFF delimiter before the reply that follows a ``guest-sync-delimited``). It knows
nothing of sockets, tasks or the guest: the agent around it does the waiting and the effects.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._faults import AGENT_KINDS, Fault, FaultTable
from ._json_reader import QEMUJSONEvent, QEMUJSONStreamParser
from ._json_writer import qdict_order, qemu_json

__all__ = ["AgentEngine", "AgentMessage"]

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


class AgentEngine:
    """One agent's protocol state (see the module doc).

    Args:
        max_input: the most bytes of tokens one message may hold (QEMU's reader limit).
        max_records: how many received messages the record keeps (the oldest go first).
        max_record_bytes: how many bytes of JSON those messages may hold together.
    """

    def __init__(self, *, max_input: int, max_records: int, max_record_bytes: int) -> None:
        self._max_input = max_input
        self._parser = self._new_parser()
        self._delimit_next = False
        #: The injected faults.
        self.faults = FaultTable(AGENT_KINDS)
        self._records: deque[tuple[AgentMessage, int]] = deque()
        self._record_bytes = 0
        self._max_records = max_records
        self._max_record_bytes = max_record_bytes

    @property
    def total_calls(self) -> int:
        """Requests received in total."""
        return self.faults.total_calls

    def _new_parser(self) -> QEMUJSONStreamParser:
        return QEMUJSONStreamParser(max_message_size=self._max_input, max_tokens=65536)

    def feed(self, data: bytes) -> list[QEMUJSONEvent]:
        """Read ``data``; return the values and errors it completed, in order."""
        return self._parser.feed(data)

    def restart(self) -> None:
        """The agent process restarted: its partial input and a pending delimiter are lost."""
        self._parser = self._new_parser()
        self._delimit_next = False

    def take(self, event: QEMUJSONEvent, *, connection: int | None, now: float) -> AgentMessage:
        """Take one event as the agent's next input: check it, number it, find its fault,
        record it. A message with ``error`` set is answered with :meth:`rejection`."""
        value = event.value
        has_id = isinstance(value, dict) and "id" in value
        msg_id = value["id"] if has_id else None
        error = event.error if event.error is not None else _check_request(value)
        if error is not None:
            message = AgentMessage(None, {}, msg_id, has_id, now, event.after_sync_byte, 0,
                                   connection, value, error)
            self._record(message, event.size)
            return message
        command: str = value["execute"]
        arguments: dict[str, Any] = value.get("arguments", {})
        injection, number = self.faults.call(command)
        fault: Fault | None = injection.fault if injection is not None else None
        message = AgentMessage(
            command, arguments, msg_id, has_id, now, event.after_sync_byte,
            number, connection, value, None, fault,
        )
        self._record(message, event.size)
        return message

    def rejection(self, message: AgentMessage) -> bytes:
        """The error reply to input the agent rejected (``message.error``), ``id`` echoed."""
        reply: dict[str, Any] = {"error": {"class": "GenericError", "desc": message.error}}
        if message.has_id:
            reply["id"] = message.id
        return self.encode(reply)

    def delimit(self, sync_id: Any) -> Any:
        """``guest-sync-delimited``: the next reply gets the 0xFF delimiter; returns the id."""
        self._delimit_next = True
        return sync_id

    def encode(self, reply: Mapping[str, Any]) -> bytes:
        """A reply's bytes as the agent writes them (the delimiter first if one is due)."""
        data = qemu_json(reply).encode("ascii") + b"\n"
        if self._delimit_next:
            self._delimit_next = False
            data = b"\xff" + data
        return data

    @property
    def received(self) -> list[AgentMessage]:
        """Everything received (requests and rejected input) still in the record, oldest first."""
        return [m for m, _ in self._records]

    def calls(self, command: str | None = None) -> list[AgentMessage]:
        """The requests in the record, optionally only of ``command``."""
        return [
            m
            for m, _ in self._records
            if m.command is not None and (command is None or m.command == command)
        ]

    def call_count(self, command: str | None = None) -> int:
        """How many requests of ``command`` (or of any command) were received in total."""
        return self.faults.call_count(command)

    def clear_received(self) -> None:
        """Forget the record; call numbers keep counting."""
        self._records.clear()
        self._record_bytes = 0

    def _record(self, message: AgentMessage, size: int) -> None:
        self._records.append((message, size))
        self._record_bytes += size
        while self._records and (
            len(self._records) > self._max_records or self._record_bytes > self._max_record_bytes
        ):
            self._record_bytes -= self._records.popleft()[1]


def _check_request(value: Any) -> str | None:
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

