"""The one place where ``qemu.qmp``'s errors become qmpagent's (as httpx's
``map_httpcore_exceptions`` does for httpcore's).

Each table maps a lower-layer exception type to the qmpagent error raised in its place, with
its message; :class:`map_qmp_errors` applies a table to the errors of a block. The lookup goes
along the exception's MRO, so the most specific row wins (``StateError`` before ``QMPError``,
``TimeoutError`` before ``OSError``), whatever the order of the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from qemu.qmp import ExecInterruptedError, ExecuteError, StateError
from qemu.qmp.error import QMPError
from qemu.qmp.protocol import ConnectError

from .errors import (
    MonitorCommandError,
    MonitorProtocolError,
    MonitorTimeout,
    MonitorUnavailable,
    QMPAgentError,
    UsageError,
)

__all__ = ["COMMAND_ERRORS", "CONNECT_ERRORS", "Build", "ErrorTable", "Raise", "map_qmp_errors"]


@dataclass(frozen=True, slots=True)
class Raise:
    """A row of an error table: raise ``error(message)``.

    ``message`` is a :meth:`str.format` template with the fields ``what`` (the command or the
    address), ``exc`` (the lower-layer exception), ``timeout`` (seconds) and ``gone`` (why the
    connection is unusable, read when the error happens).
    """

    error: type[QMPAgentError]
    message: str

    def build(self, exc: BaseException, fields: Mapping[str, object]) -> QMPAgentError:
        """The error to raise for ``exc``."""
        return self.error(self.message.format(exc=exc, **fields))


def _command_error(exc: BaseException, fields: Mapping[str, object]) -> QMPAgentError:
    # QEMU's own {"error": {"class": ..., "desc": ...}}: the error keeps both, not a message.
    assert isinstance(exc, ExecuteError)
    return MonitorCommandError(str(fields["what"]), exc.error_class, exc.error.error.desc)


#: Builds the error for a lower-layer exception, given the fields of :class:`Raise`.
Build = Callable[[BaseException, Mapping[str, object]], QMPAgentError]
#: A table: lower-layer exception type -> a :class:`Raise` row, or a function building the error.
ErrorTable = Mapping[type[BaseException], Raise | Build]

#: Errors of connecting and negotiating (``QMPClient.connect`` under a deadline).
CONNECT_ERRORS: Final[ErrorTable] = {
    TimeoutError: Raise(MonitorTimeout, "QMP handshake with {what!r} timed out after {timeout:g}s"),
    ConnectError: Raise(MonitorUnavailable, "cannot connect to QMP at {what!r}: {exc}"),
    # ConnectError wraps these; kept should a qemu.qmp version let one through.
    QMPError: Raise(MonitorUnavailable, "cannot connect to QMP at {what!r}: {exc!r}"),
    OSError: Raise(MonitorUnavailable, "cannot connect to QMP at {what!r}: {exc!r}"),
    EOFError: Raise(MonitorUnavailable, "cannot connect to QMP at {what!r}: {exc!r}"),
}

#: Errors of one command (``QMPClient.execute``).
COMMAND_ERRORS: Final[ErrorTable] = {
    ExecuteError: _command_error,
    # The connection ended while the command waited, or before it was sent.
    ExecInterruptedError: Raise(MonitorUnavailable, "{what}: {gone}"),
    StateError: Raise(MonitorUnavailable, "{what}: {gone}"),
    QMPError: Raise(MonitorProtocolError, "{what}: bad reply from QEMU: {exc}"),
    # json.dumps of the arguments, inside qemu.qmp.
    TypeError: Raise(UsageError, "{what}: arguments are not JSON-serialisable: {exc}"),
    ValueError: Raise(UsageError, "{what}: arguments are not JSON-serialisable: {exc}"),
}


class map_qmp_errors:
    """A context manager that raises, in place of a lower-layer exception listed in ``table``,
    the qmpagent error its row gives (``from`` the original). qmpagent's own errors, exceptions
    not in the table and ``BaseException`` (cancellation) pass through unchanged.

    Args:
        table: :data:`CONNECT_ERRORS`, :data:`COMMAND_ERRORS`, ...
        what: the command or address the messages name.
        timeout: the deadline, for messages that give it.
        gone: says why the connection is unusable; called only when an error needs it (the
            state may change while the block waits).

    A class, not a generator: it wraps every command, where a generator costs microseconds.
    """

    __slots__ = ("_gone", "_table", "_timeout", "_what")

    def __init__(
        self,
        table: ErrorTable,
        what: object,
        *,
        timeout: float | None = None,
        gone: Callable[[], str] | None = None,
    ) -> None:
        self._table = table
        self._what = what
        self._timeout = timeout
        self._gone = gone

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, QMPAgentError):
            return
        row = next((self._table[t] for t in type(exc).__mro__ if t in self._table), None)
        if row is None:
            return
        fields: dict[str, Any] = {"what": self._what, "timeout": self._timeout}
        fields["gone"] = self._gone() if self._gone is not None else "the connection is unusable"
        error = row.build(exc, fields) if isinstance(row, Raise) else row(exc, fields)
        raise error from exc
