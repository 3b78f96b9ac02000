"""How a failure is reported: ONE table, :data:`ERRORS`, from an exception class to its exit
status, the start of its message and its extra ``--json`` fields. An exception is reported by
the first class of its MRO (``type(exc).__mro__``) in the table, so a subclass is reported as its
nearest listed ancestor unless it has a row of its own: no hand-kept order of isinstance checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import traceback
from collections.abc import Callable
from typing import Any, Final

from ..errors import (
    AgentCommandError,
    AgentTimeout,
    AgentUnavailable,
    BackupChainError,
    BackupError,
    CommitError,
    CommitTimeout,
    JobReadyTimeout,
    JournalError,
    MonitorCommandError,
    MonitorTimeout,
    MonitorUnavailable,
    QMPAgentError,
    SnapshotError,
    ThawError,
    UnknownMountpointError,
    UnsettledOperationError,
    UsageError,
)
from .argtypes import address_text
from .exit_codes import ExitCode
from .output import PROG, emit_json, err

__all__ = ["ERRORS", "ErrorRow", "exit_code_for", "report"]


def _text(exc: BaseException, agent: object) -> str:
    return str(exc)


def _no_fields(exc: BaseException) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class ErrorRow:
    """How one class of error is reported.

    Attributes:
        code: the exit status.
        prefix: the start of the message (``guest agent unavailable: ``).
        detail: the rest of the message, from the exception and the ``--agent`` address the
            command was given (None if none): ``str(exc)`` by default.
        fields: what the ``--json`` error object has beyond its ``exit_code``, ``status``,
            ``type`` and ``message``.
        label: what precedes the message on stderr only (after ``qmpagent: ``); a snapshot's
            failure stands on its own, the rest reads as argparse's errors.
    """

    code: ExitCode
    prefix: str = ""
    # Any: a row's functions take the row's own class (ThawError...), which the lookup ensures.
    detail: Callable[[Any, object], str] = _text
    fields: Callable[[Any], dict[str, Any]] = _no_fields
    label: str = "error: "

    def message(self, exc: BaseException, agent: object) -> str:
        """The one-line description of ``exc`` (without ``qmpagent: `` and the label)."""
        return self.prefix + self.detail(exc, agent)


def _thaw_detail(exc: ThawError, agent: object) -> str:
    how = f"{PROG} agent --agent {address_text(agent)}" if agent is not None else f"{PROG} agent"
    detail = str(exc)
    for advice in (": THE GUEST MAY STILL BE FROZEN", ": the guest MAY BE FROZEN"):
        detail = detail.split(advice, 1)[0]  # the library's own advice: ours follows
    return (f"(froze {exc.frozen}, thawed {exc.thawed}): {detail}; check with `{how} fsfreeze "
            f"status`, thaw with `{how} fsfreeze thaw`")


def _snapshot_detail(exc: SnapshotError, agent: object) -> str:
    rec = exc.record
    if rec.snapshot_taken:
        what = "the snapshot WAS taken: the VM runs on the new overlays"
    else:
        what = "no snapshot was taken"
        left = [f for f in rec.files_created if f not in rec.files_removed]
        if left:
            what += f"; files left behind: {', '.join(left)}"
    return f"{rec.phase}: {exc} ({what})"


def _backup_detail(exc: BackupError, agent: object) -> str:
    rec = exc.record
    left = [f for f in rec.files_created if f not in rec.files_removed]
    what = f"files left behind: {', '.join(left)}" if left else "its files were removed"
    return f"{rec.phase}: {exc} ({what}; no tracked change was lost)"


def _backup_fields(exc: BackupError) -> dict[str, Any]:
    return {"stage": exc.stage, "record": dataclasses.asdict(exc.record)}


def _chain_fields(exc: BackupChainError) -> dict[str, Any]:
    return {"disk": exc.disk, "since": exc.since, "why": exc.why}


def _unsettled_detail(exc: UnsettledOperationError, agent: object) -> str:
    how = f" --agent {address_text(agent)}" if agent is not None else ""
    return f"{_snapshot_detail(exc, agent)}; settle it with `{PROG} recover --qmp ...{how}`"


def _unsettled(exc: UnsettledOperationError) -> dict[str, Any]:
    return {**_record(exc), "unresolved": list(exc.unresolved)}


def _journal(exc: JournalError) -> dict[str, Any]:
    return {"path": exc.path}


def _commit_fields(exc: CommitError) -> dict[str, Any]:
    return {"record": dataclasses.asdict(exc.record)}


def _job_fields(exc: JobReadyTimeout) -> dict[str, Any]:
    progress = exc.progress
    return {"job_id": exc.job_id,
            "progress": dataclasses.asdict(progress) if dataclasses.is_dataclass(progress)
            and not isinstance(progress, type) else None}


def _mountpoint_fields(exc: UnknownMountpointError) -> dict[str, Any]:
    return {"unknown": exc.unknown, "known": exc.known}


def _internal_detail(exc: BaseException, agent: object) -> str:
    return f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"


def _record(exc: SnapshotError) -> dict[str, Any]:
    return {"record": dataclasses.asdict(exc.record)}


def _command(exc: AgentCommandError | MonitorCommandError) -> dict[str, Any]:
    return {"command": exc.command, "error_class": exc.error_class, "desc": exc.desc}


_TIMEOUT: Final = ErrorRow(ExitCode.TIMEOUT, "timeout: ")

#: Exception class -> how it is reported; see the module's docstring for the lookup.
ERRORS: Final[dict[type[BaseException], ErrorRow]] = {
    ThawError: ErrorRow(ExitCode.THAW_FAILED, "THAW FAILED - THE GUEST MAY STILL BE FROZEN ",
                        _thaw_detail, _record, label=""),
    # Before SnapshotError's row (its base): a backup's failure says what a backup left.
    BackupError: ErrorRow(ExitCode.BACKUP_FAILED, "backup failed in ", _backup_detail,
                          _backup_fields, label=""),
    SnapshotError: ErrorRow(ExitCode.SNAPSHOT_FAILED, "snapshot failed in ", _snapshot_detail,
                            _record, label=""),
    UnsettledOperationError: ErrorRow(ExitCode.SNAPSHOT_FAILED, "snapshot refused in ",
                                      _unsettled_detail, _unsettled, label=""),
    JournalError: ErrorRow(ExitCode.ERROR, "journal: ", fields=_journal),


    # Listed before UsageError's row, and CommitTimeout before TimeoutError: the MRO decides.
    CommitTimeout: ErrorRow(ExitCode.TIMEOUT, "timeout: ", fields=_commit_fields),
    CommitError: ErrorRow(ExitCode.COMMIT_FAILED, fields=_commit_fields, label=""),
    UnknownMountpointError: ErrorRow(ExitCode.USAGE, fields=_mountpoint_fields),
    BackupChainError: ErrorRow(ExitCode.USAGE, fields=_chain_fields),
    UsageError: ErrorRow(ExitCode.USAGE),
    AgentUnavailable: ErrorRow(ExitCode.AGENT_UNAVAILABLE, "guest agent unavailable: "),
    MonitorUnavailable: ErrorRow(ExitCode.QMP_UNAVAILABLE, "QMP unavailable: "),
    # Listed themselves: along their MRO, QMPAgentError comes before TimeoutError.
    AgentTimeout: _TIMEOUT,
    JobReadyTimeout: ErrorRow(ExitCode.TIMEOUT, "timeout: ", fields=_job_fields),
    MonitorTimeout: _TIMEOUT,
    TimeoutError: _TIMEOUT,
    AgentCommandError: ErrorRow(ExitCode.COMMAND_ERROR, fields=_command),
    MonitorCommandError: ErrorRow(ExitCode.COMMAND_ERROR, fields=_command),  # JobError too
    QMPAgentError: ErrorRow(ExitCode.ERROR),
    BaseException: ErrorRow(ExitCode.ERROR, "internal error: ", _internal_detail),
}


def _row(exc: BaseException) -> ErrorRow:
    # BaseException is in every MRO and in the table: the lookup always finds a row.
    return next(ERRORS[cls] for cls in type(exc).__mro__ if cls in ERRORS)


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit status for an error raised by a subcommand."""
    return _row(exc).code


def report(exc: BaseException, *, as_json: bool, debug: bool, agent: object) -> ExitCode:
    """Report a subcommand's failure: its traceback with ``debug``, its JSON object on stdout
    with ``as_json``, one line on stderr; return its exit status. ``agent`` is the command's
    ``--agent`` address (None if it has none), named in the advice after a failed thaw."""
    row = _row(exc)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    message = row.message(exc, agent)
    if as_json:
        error: dict[str, Any] = {
            "exit_code": int(row.code),
            "status": row.code.name.lower(),
            "type": type(exc).__name__,
            "message": message,
            **row.fields(exc),
        }
        with contextlib.suppress(OSError):
            emit_json({"error": error})
    err(row.label + message)
    return row.code
