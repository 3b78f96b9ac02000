"""The exception tree of qmpagent.

Every error the library raises on purpose derives from :class:`QMPAgentError`::

    QMPAgentError
    ├── AgentError                      the guest agent (the guest is at fault or gone)
    │   ├── AgentUnavailable            not connected, port closed, no answer to sync/ping
    │   ├── AgentTimeout                a command got no reply in time (also a TimeoutError)
    │   ├── AgentCommandError           the agent answered with an error (.error_class, .desc)
    │   └── AgentProtocolError          malformed, mistyped or oversized guest output
    ├── MonitorError                    QMP (QEMU is at fault or gone)
    │   ├── MonitorUnavailable          cannot connect, or the connection was lost
    │   ├── MonitorTimeout              a command or a wait got no answer in time (also a TimeoutError)
    │   │   └── JobReadyTimeout         a two-phase job was not ready in time (cancelled, dismissed)
    │   ├── MonitorCommandError         QEMU answered with an error (.error_class, .desc)
    │   │   └── JobError                a job concluded with an error (.job_id, .desc)
    │   ├── MonitorProtocolError        QEMU's reply did not have the expected shape
    │   └── EventOverflow               an event queue overflowed; events were lost (.dropped)
    ├── SnapshotError                   a snapshot was not taken (carries what was done)
    │   ├── BackupError                 a backup did not complete (targets removed, no dirty bit lost)
    │   ├── ThawError                   our freeze could not be thawed: the guest MAY STILL BE FROZEN
    │   └── UnsettledOperationError     a dead operation on this VM could not be settled, or one is live
    ├── JournalError                    a journal file is torn, foreign or unwritable (.path)
    ├── CommitError                     a commit did not finish (says where the VM stands)
    │   └── CommitTimeout               it was not ready in time (also a TimeoutError)
    └── UsageError                      the caller misused the API (bad argument, wrong state)
        ├── BackupChainError            an incremental backup's ``since`` does not match its disk
        └── UnknownMountpointError      snapshot(mountpoints=) named a filesystem the guest lacks

Lower-layer exceptions (``OSError``, ``qemu.qmp`` errors, ``json`` errors) are re-raised as one of
these with ``raise ... from exc``, so the original is always available as ``__cause__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .snapshot_state import FreezeOwner, FreezeState, Phase, TransactionState

__all__ = [
    "AgentCommandError",
    "AgentError",
    "AgentProtocolError",
    "AgentTimeout",
    "AgentUnavailable",
    "BackupChainError",
    "BackupError",
    "CommitError",
    "CommitRecord",
    "CommitTimeout",
    "EventOverflow",
    "JobError",
    "JobReadyTimeout",
    "JournalError",
    "MonitorCommandError",
    "MonitorError",
    "MonitorProtocolError",
    "MonitorTimeout",
    "MonitorUnavailable",
    "QMPAgentError",
    "SnapshotError",
    "SnapshotRecord",
    "ThawError",
    "UnknownMountpointError",
    "UnsettledOperationError",
    "UsageError",
]


class QMPAgentError(Exception):
    """Base class of every error qmpagent raises on purpose."""


class UsageError(QMPAgentError, ValueError):
    """The caller used the API wrongly: a bad argument, or a call in the wrong state."""


# --- guest agent -------------------------------------------------------------------------------


class AgentError(QMPAgentError):
    """Base class of errors talking to the guest agent."""


class AgentUnavailable(AgentError):
    """The agent cannot be reached: not connected, port closed in the guest, or no answer to
    ``guest-sync-delimited`` / ``guest-ping``."""


class AgentTimeout(AgentError, TimeoutError):
    """An agent command got no reply within its timeout.

    The channel is out of sync afterwards; the client resynchronises before its next command.
    """


class AgentCommandError(AgentError):
    """The agent answered a command with an error.

    Attributes:
        command: the command that failed.
        error_class: the QAPI error class, e.g. ``"GenericError"`` or ``"CommandNotFound"``.
        desc: the agent's human-readable description.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class AgentProtocolError(AgentError):
    """The guest sent something the protocol does not allow: not JSON, the wrong JSON types,
    an oversized line, or an unexpected end of stream. The guest is untrusted; nothing it sends
    is used before it has been checked."""


# --- QMP -----------------------------------------------------------------------------------------


class MonitorError(QMPAgentError):
    """Base class of errors talking to QEMU over QMP."""


class MonitorUnavailable(MonitorError):
    """QMP cannot be reached, or the connection to QEMU was lost (QEMU exited or crashed)."""


class MonitorTimeout(MonitorError, TimeoutError):
    """A QMP command, a job or a wait for an event did not finish within its timeout.

    After a command timeout the connection stays usable; the late reply is discarded.
    """


class MonitorCommandError(MonitorError):
    """QEMU answered a command with an error.

    Attributes:
        command: the command that failed.
        error_class: the QAPI error class, e.g. ``"GenericError"`` or ``"CommandNotFound"``.
        desc: QEMU's human-readable description.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class MonitorProtocolError(MonitorError):
    """QEMU answered with something of the wrong shape (e.g. a query that returned no list)."""


class JobError(MonitorCommandError):
    """A QMP job (``blockdev-create``, ``snapshot-save``, ...) concluded with an error.

    Attributes:
        job_id: the job's id.
    """

    def __init__(self, command: str, job_id: str, desc: str) -> None:
        super().__init__(command, "JobError", desc)
        self.job_id = job_id


class JobReadyTimeout(MonitorTimeout):
    """A two-phase job (an active ``block-commit``, a mirror) was not ready to be completed in
    time, e.g. because the guest writes faster than the job copies. The job was cancelled and
    dismissed: the VM stays on the node it ran on.

    Attributes:
        job_id: the job's id.
        progress: its last :class:`~qmpagent.JobProgress` (bytes copied of the total), if read.
    """

    def __init__(self, message: str, *, job_id: str, progress: object = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.progress = progress


class EventOverflow(MonitorError):
    """The consumer of an event stream fell behind and its bounded queue overflowed.

    Attributes:
        dropped: how many events were lost.
    """

    def __init__(self, dropped: int) -> None:
        super().__init__(f"event queue overflowed: {dropped} event(s) dropped")
        self.dropped = dropped


# --- snapshots -----------------------------------------------------------------------------------


@dataclass
class SnapshotRecord:
    """What a snapshot operation did before it failed (see :class:`SnapshotError`).

    Attributes:
        phase: the phase that failed, a :class:`~qmpagent.Phase` (a str enum: ``"preflight"``,
            ``"prepare"``, ``"freeze"``, ``"transaction"``, ``"thaw"``, ``"cleanup"``).
        freeze_owner: :attr:`FreezeOwner.SELF <qmpagent.FreezeOwner>` (``"self"``) if this
            operation froze the guest, ``EXTERNAL`` (``"external"``) if it was frozen
            beforehand by someone else, else ``None``.
        frozen: filesystems this operation froze.
        thawed: filesystems this operation thawed.
        overlays_added: overlay node names attached by this operation.
        overlays_removed: overlay node names this operation detached again.
        files_created: overlay image files this operation created.
        files_removed: overlay image files this operation removed again.
        snapshot_taken: whether the ``transaction`` was committed: True, False, or None when
            its outcome could not be learned (QEMU stopped answering after it was sent): then
            the VM may run on the overlays, which were left in place.
        freeze_state: where the freeze ended (a :class:`~qmpagent.FreezeState`), e.g.
            ``THAWED``, ``NOT_FROZEN`` or ``THAW_FAILED``.
        transaction_state: where the transaction ended (a :class:`~qmpagent.TransactionState`).

    The orchestrator writes it from its state as it goes (one writer); the counts, the owner and
    ``snapshot_taken`` are derived from ``freeze_state`` and ``transaction_state``.
    """

    phase: Phase = Phase.PREFLIGHT
    freeze_owner: FreezeOwner | None = None
    frozen: int = 0
    thawed: int = 0
    overlays_added: list[str] = field(default_factory=list)
    overlays_removed: list[str] = field(default_factory=list)
    files_created: list[str] = field(default_factory=list)
    files_removed: list[str] = field(default_factory=list)
    snapshot_taken: bool | None = False
    freeze_state: FreezeState = FreezeState.NOT_TRIED
    transaction_state: TransactionState = TransactionState.NOT_SENT


class SnapshotError(QMPAgentError):
    """A snapshot could not be taken as asked.

    Attributes:
        record: a :class:`SnapshotRecord` of what was done before and after the failure
            (frozen, thawed, overlays added and removed, files created and removed).
    """

    def __init__(self, message: str, record: SnapshotRecord | None = None) -> None:
        super().__init__(message)
        self.record = record if record is not None else SnapshotRecord()

    @property
    def frozen(self) -> int:
        """Filesystems this operation froze."""
        return self.record.frozen

    @property
    def thawed(self) -> int:
        """Filesystems this operation thawed."""
        return self.record.thawed


class BackupError(SnapshotError):
    """A backup (:meth:`~qmpagent.SnapshotOrchestrator.backup`) did not complete: it was
    refused, its copy failed, timed out or was cancelled. Its partial targets were removed
    (``record.files_removed``; a file that could not be removed is named in the message),
    the guest was thawed (or a :class:`ThawError` is raised instead), and the disks' dirty
    bitmaps lost no bits: the next incremental backup still copies everything that changed
    since the last *completed* one.

    Attributes:
        record: a :class:`SnapshotRecord` (``overlays_added``/``files_created`` list the
            backup's target nodes and files).
        stage: ``"window"`` (preflight, prepare, freeze or the transaction failed),
            ``"copy"`` (the copy jobs, after the thaw) or ``"export"`` (pull mode: starting
            the NBD exports, after the thaw).
    """

    def __init__(self, message: str, record: SnapshotRecord | None = None, *, stage: str = "window") -> None:
        super().__init__(message, record)
        self.stage = stage


class BackupChainError(UsageError):
    """An incremental backup's ``since`` does not match the disk: the file is missing, is not
    a qcow2 image, has another virtual size, the disk has no (usable) dirty bitmap of that
    name, or the file is not the last backup made with that bitmap. Raised before anything is
    created or frozen: never a silently wrong backup. Take a full backup (``since=None``) to
    start a new chain.

    Attributes:
        disk: the disk concerned.
        since: the ``since`` file given for it.
        why: what does not match, in a few words.
    """

    def __init__(self, disk: str, since: str, why: str) -> None:
        super().__init__(
            f"cannot take an incremental backup of {disk!r} since {since}: {why} "
            "(take a full backup, since=None, to start a new chain)"
        )
        self.disk = disk
        self.since = since
        self.why = why


class ThawError(SnapshotError):
    """Thawing a freeze this operation made failed or timed out.

    THE GUEST MAY STILL BE FROZEN. Check with ``guest-fsfreeze-status`` and thaw by hand
    (``qmpagent agent fsfreeze thaw``) once the agent answers again.
    """


class UnknownMountpointError(UsageError):
    """``snapshot(mountpoints=...)`` named a mountpoint the guest does not have mounted
    (checked against ``guest-get-fsinfo`` before anything is frozen; qemu-ga itself would
    ignore it silently and freeze less than asked).

    Attributes:
        unknown: the mountpoints the guest does not have.
        known: the guest's mountpoints.
    """

    def __init__(self, unknown: list[str], known: list[str]) -> None:
        super().__init__(
            f"the guest has no filesystem mounted at {', '.join(unknown)} "
            f"(mounted: {', '.join(known) or 'none'}); nothing was frozen"
        )
        self.unknown = unknown
        self.known = known


# --- commits -------------------------------------------------------------------------------------


@dataclass
class CommitRecord:
    """Where a commit stood when it stopped (see :class:`CommitError`).

    Attributes:
        stage: the step that failed: ``"preflight"``, ``"start"``, ``"ready"``, ``"pivot"``,
            ``"verify"`` or ``"cleanup"``.
        device: the device (qdev id) whose disk was committed, if known.
        job_id: the commit job's id, once one was started or found.
        top: the active node the commit merged from.
        base: the node it merged into.
        active_node: the node the device runs on now, as last read (None if unknown).
        pivoted: whether the device runs on ``base`` now: True, False, or None if unknown.
        removed_nodes: the merged nodes (and their file nodes) detached.
        removed_files: the merged images' files deleted.
        left_nodes: merged nodes still attached (a later commit of the disk removes them).
    """

    stage: str = "preflight"
    device: str | None = None
    job_id: str | None = None
    top: str | None = None
    base: str | None = None
    active_node: str | None = None
    pivoted: bool | None = False
    removed_nodes: list[str] = field(default_factory=list)
    removed_files: list[str] = field(default_factory=list)
    left_nodes: list[str] = field(default_factory=list)


class CommitError(QMPAgentError):
    """A commit did not finish. Its message and :attr:`record` say where the VM stands: on
    its original active layer (nothing changed but the base's content below it), or on the
    base with merged nodes left attached. Either way it runs on a valid chain, and a later
    ``commit`` of the same disk finishes what is left.

    Attributes:
        record: a :class:`CommitRecord`.
    """

    def __init__(self, message: str, record: CommitRecord | None = None) -> None:
        super().__init__(message)
        self.record = record if record is not None else CommitRecord()


class CommitTimeout(CommitError, TimeoutError):
    """The commit job was not ready within the timeout (the guest's writes may keep it from
    converging: try a quieter moment, or a ``speed`` limit). It was cancelled and dismissed:
    the VM still runs on its active layer."""
class UnsettledOperationError(SnapshotError):
    """A new snapshot was refused because an earlier operation on the same VM is unsettled:
    one whose process died and that could not be settled (see :func:`qmpagent.recover` and
    ``qmpagent recover``), or one that is still running in another process (two freeze/thaw
    sequences on one guest would thaw each other's freeze). Nothing was changed.

    Attributes:
        unresolved: what could not be settled, one sentence each.
    """

    def __init__(self, message: str, unresolved: list[str] | None = None) -> None:
        super().__init__(message)
        self.unresolved = list(unresolved or [])


# --- journal -------------------------------------------------------------------------------------


class JournalError(QMPAgentError):
    """A journal file (``$XDG_STATE_HOME/qmpagent``) cannot be used: torn (not complete JSON),
    foreign (not a qmpagent journal, or of another format version), or the directory cannot be
    written. Such a file is never acted on, and never removed by qmpagent.

    Attributes:
        path: the file (or directory) concerned.
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
