"""``SnapshotOrchestrator``: atomic, application-consistent external snapshots.

The order, and why (docs/design.md section 2):

1. **Preflight**, before anything is changed: the arguments and every timeout are valid; the VM
   is running; the block nodes exist; the overlay files do not, and no two of them are one file;
   and, unless ``quiesce="off"``, the agent's virtio-serial port is open in the guest (QMP
   ``query-chardev``), the channel is in sync (``guest-sync-delimited`` with a fresh random id),
   the agent answers ``guest-ping``, ``guest-fsfreeze-status`` says ``thawed`` (``frozen`` means
   someone else froze it: we snapshot without freezing and never thaw), and ``guest-info`` lists
   the freeze commands as enabled. Any failure: no freeze is attempted.
2. **Prepare**: every overlay is created (``blockdev-create`` jobs, qcow2 with the current image
   recorded as its backing file) and attached (``blockdev-add``, ``backing: null``) *before* the
   freeze, so the freeze window holds nothing that can wait. The steps run as one task group:
   none is still running when the snapshot returns or cleans up.
3. **Freeze** (``guest-fsfreeze-freeze``, its reply awaited for at most ``freeze_timeout``). Only
   a freeze that returned a count > 0 is ours. A freeze whose request was written (known per
   call, never from the connection's counters) but whose reply was lost is resolved by resync +
   ``guest-fsfreeze-status``: frozen (it was thawed at preflight) means ours.
4. **Transaction**: one QMP ``transaction`` of ``blockdev-snapshot`` actions, atomic across all
   disks, bounded by what is left of ``freeze_timeout`` counted from when the freeze request was
   written. A freeze of someone else's is re-read right before it: if it is gone, the snapshot is
   not quiesced.
5. **Thaw**, if and only if this operation froze something (or may have: a lost reply not yet
   resolved), on every exit path (error, deadline, cancellation of the caller, an ``on_phase``
   that raises), shielded from cancellation and bounded, every step in it, by ``thaw_timeout``.
   A thaw that fails raises :class:`~qmpagent.ThawError`: the guest may still be frozen.

The state of a run is two small state machines (:mod:`qmpagent.snapshot_state`); the record of
a failure and the result of a success are derived from them.

A failed snapshot leaves the VM on its original images and detaches the overlays it attached and
removes the files it created.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import numbers
import os
import secrets
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio

from ._shield import run_to_completion
from .agent import AgentAddress, FreezeStatus, GuestAgent, check_address
from .block_jobs import ProgressCallback
from .chain import ChainNode, block_chain
from .commit import CommitResult, commit_disk
from .errors import (
    AgentCommandError,
    AgentError,
    JournalError,
    MonitorCommandError,
    MonitorError,
    MonitorProtocolError,
    MonitorTimeout,
    MonitorUnavailable,
    QMPAgentError,
    SnapshotError,
    SnapshotRecord,
    ThawError,
    UnsettledOperationError,
    UsageError,
)
from .guard import FreezeGuard
from .journal import Entry, Journal, OverlayRecord, VMIdentity, identify_vm, new_op_id, process_start_time
from .monitor import BlockNode, Monitor
from .mountpoints import check_mountpoints, require_known
from .snapshot_state import (
    FreezeOwner,
    FreezeState,
    Phase,
    SnapshotState,
    TransactionState,
)

if TYPE_CHECKING:  # backup and fleece build on this module
    from .backup import BackupProgressCallback, BackupResult
    from .fleece import Fleece

__all__ = [
    "FreezeOwner",
    "FreezeState",
    "Phase",
    "PhaseCallback",
    "PhaseTimings",
    "Quiesce",
    "SnapshotOrchestrator",
    "SnapshotResult",
    "TransactionState",
]

log = logging.getLogger(__name__)

#: Agent commands the freeze path needs; ``guest-info`` must list them as enabled.
FREEZE_COMMANDS: Final = ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status")


#: ``on_phase(name, seconds)``: ``seconds`` is None when the phase starts, its duration at the
#: end; ``name`` is a :class:`Phase` (a str enum: ``"preflight"``, ``"prepare"``, ...).
PhaseCallback = Callable[[str, float | None], None]


class Quiesce(str, enum.Enum):
    """How hard to try for an application-consistent snapshot."""

    #: Freeze the guest's filesystems or take no snapshot at all (raise).
    REQUIRED = "required"
    #: Freeze if possible; otherwise take a crash-consistent snapshot and say why.
    PREFERRED = "preferred"
    #: Never talk to the agent: a crash-consistent snapshot.
    OFF = "off"


@dataclass(frozen=True, slots=True)
class PhaseTimings:
    """Seconds spent in each phase of a snapshot (0.0 for phases that did not run)."""

    preflight: float = 0.0
    prepare: float = 0.0
    freeze: float = 0.0
    transaction: float = 0.0
    thaw: float = 0.0
    copy: float = 0.0  # a backup's copy, after the thaw (0.0 for snapshots)
    cleanup: float = 0.0
    total: float = 0.0


@dataclass(frozen=True)
class SnapshotResult:
    """What :meth:`SnapshotOrchestrator.snapshot` did.

    Attributes:
        quiesced: the filesystems were frozen (by us, or by someone else and re-checked right
            before it) while the transaction ran.
        freeze_owner: ``"self"``, ``"external"`` (a :class:`FreezeOwner` value) or None: who
            had the guest frozen while the transaction ran.
        frozen: filesystems this operation froze (0 if it froze none).
        thawed: filesystems this operation thawed (0 unless it froze some).
        freeze_window: seconds from the freeze reply to the thaw reply, or None. Counted from
            when the freeze request was written if its reply was lost or late (took longer
            than ``snapshot_state.LATE_FREEZE_REPLY``), so that it never under-reports.
        overlays: block node name -> node name of its new overlay (now the active layer).
        reason: why the snapshot is not quiesced, when it is not.
        files: block node name -> the new overlay's file.
        timings: per-phase durations.
        freeze_resolved: a freeze whose reply was lost was found (by its status) to be ours.
        warnings: things the caller should know although the snapshot succeeded, e.g. that
            the freeze froze fewer filesystems than the guest has (another tool may have frozen
            one, and qemu-ga's thaw thaws every frozen filesystem, that one included).
        freeze_state: where the freeze ended (a :class:`FreezeState`: ``THAWED``,
            ``EXTERNAL``, ``SKIPPED``, ``NOT_FROZEN``, ...).
        transaction_state: where the transaction ended (``APPLIED`` for every result).
        guarded: the freeze guard (a process of its own, :mod:`qmpagent.guard`) stood by for
            the whole freeze, ready to thaw had this process died or got stuck. False when no
            freeze was sent, or when the guard could not be started or died (then
            ``warnings`` says so: the snapshot was thawed by this process, as without a guard).
    """

    quiesced: bool
    freeze_owner: str | None
    frozen: int
    thawed: int
    freeze_window: float | None
    overlays: dict[str, str]
    reason: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    timings: PhaseTimings = field(default_factory=PhaseTimings)
    freeze_resolved: bool = False
    warnings: tuple[str, ...] = ()
    freeze_state: FreezeState = FreezeState.NOT_TRIED
    transaction_state: TransactionState = TransactionState.APPLIED
    guarded: bool = False


class _Step(enum.IntEnum):
    """How far one overlay's preparation got. Each step counts as (maybe) done as soon as it
    is sent: a lost reply or a caller that gives up must not hide a file or a node from the
    cleanup, which checks what really exists before it removes anything."""

    NONE = 0
    FILE = 1  # blockdev-create of the file sent: a file of ours may exist
    FILE_NODE = 2  # blockdev-add of the file node sent
    NODE = 3  # blockdev-add of the qcow2 node sent


@dataclass
class _Overlay:
    """One disk's overlay while it is being prepared (internal bookkeeping)."""

    node: str  # the disk's format node
    path: str  # the overlay file
    base: BlockNode
    node_name: str  # the overlay's qcow2 node
    file_node_name: str  # the overlay's file node
    step: _Step = _Step.NONE


@dataclass(frozen=True, slots=True)
class _Timeouts:
    """The orchestrator's timeouts, validated, as one run uses them."""

    agent: float
    thaw: float
    command: float
    job: float


class _Unquiescable(Exception):
    """Preflight found that no freeze can be attempted (internal)."""


def _seconds(name: str, value: object) -> float:
    """``value`` as a positive, finite number of seconds, or UsageError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name} must be a positive number of seconds, not {value!r}")
    try:
        seconds = float(value)
    except (OverflowError, ValueError):
        raise UsageError(f"{name} must be a positive finite number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise UsageError(f"{name} must be a positive finite number of seconds, not {value!r}")
    return seconds


def _overlay_path(key: str, value: object) -> str:
    """Static checks of an overlay path (no file system access): text QEMU can take (UTF-8, no
    NUL), absolute, naming a file. UsageError otherwise."""
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"bad disk entry {key!r}: {value!r} (expected str: path)")
    try:
        path = os.fspath(value)
    except TypeError as exc:
        raise UsageError(f"bad overlay path for {key!r}: {exc}") from None
    if not isinstance(path, str):
        raise UsageError(f"overlay path for {key!r} must be text, not {type(path).__name__}")
    if "\0" in path:
        raise UsageError(f"overlay path for {key!r} contains a NUL byte: {path!r}")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"overlay path for {key!r} is not valid Unicode (a lone surrogate?): {path!r}"
        ) from None
    if not os.path.isabs(path):
        raise UsageError(f"overlay path must be absolute: {path!r}")
    if os.path.basename(path) in ("", ".", ".."):
        raise UsageError(f"overlay path must name a file: {path!r}")
    return path


def _path_identities(path: str) -> set[tuple[object, ...]]:
    """What makes two overlay paths one file (the files do not exist yet): the same basename in
    the same directory, by its real path (``.``, ``..``, ``//`` and symlinks resolved) and, when
    it exists, by its device and inode (bind mounts)."""
    parent, base = os.path.split(path)
    try:
        ids: set[tuple[object, ...]] = {("path", os.path.realpath(parent), base)}
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot resolve the directory of overlay path {path!r}: {exc}") from None
    try:
        st = os.stat(parent)
    except (OSError, ValueError):
        pass  # no such directory: QEMU will fail to create the file, and say so
    else:
        ids.add(("inode", st.st_dev, st.st_ino, base))
    return ids


def _new_image_paths(images: object, *, empty: str, entry: str, kind: str) -> dict[str, str]:
    """The checked paths of the images an operation is to create (overlays, backup targets):
    each a new file, none the same file as another's; UsageError otherwise. ``empty`` is the
    message for a mapping that is not one or is empty, ``entry`` and ``kind`` name an entry
    and its file in the others."""
    if not isinstance(images, Mapping) or not images:
        raise UsageError(empty)
    paths: dict[str, str] = {}
    seen: set[tuple[object, ...]] = set()
    for key, path in images.items():
        if not isinstance(key, str):
            raise UsageError(f"bad {entry} entry {key!r}: {path!r} (expected str: path)")
        paths[key] = checked = _overlay_path(key, path)
        ids = _path_identities(checked)
        if ids & seen:
            raise UsageError(f"{kind} {checked!r} is the same file as another disk's {kind}")
        seen |= ids
        _check_absent(checked)
    return paths


def _check_absent(path: str) -> None:
    """UsageError unless ``path`` is known not to exist (never overwrite a file)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot check overlay path {path!r}: {exc}") from None
    raise UsageError(f"overlay file {path} already exists; refusing to overwrite it")


class SnapshotOrchestrator:
    """Takes quiesced external snapshots of a running VM's disks.

    Args:
        monitor: a connected :class:`~qmpagent.Monitor` of the VM.
        agent: a connected :class:`~qmpagent.GuestAgent`, the agent's address (connected when
            needed, after its port is seen open, and closed afterwards), or None (no agent:
            only ``quiesce="preferred"`` or ``"off"`` can succeed).
        agent_timeout: timeout of each agent command (sync, ping, status, info, freeze).
        thaw_timeout: the longest the thaw phase may take, every step in it (retries,
            resyncs, reconnects, port checks, the resolution of a freeze whose reply was lost)
            included, before :class:`~qmpagent.ThawError` is raised.
        command_timeout: timeout of each QMP command outside the freeze window.
        job_timeout: timeout of each overlay-creating job.
        agent_chardev: the agent's chardev label, if the port is not the usual
            ``org.qemu.guest_agent.0``.
        journal_dir: where each operation's journal entry is written durably before each of
            its steps (default ``$XDG_STATE_HOME/qmpagent``, else ``~/.local/state/qmpagent``;
            see :mod:`qmpagent.journal`); :func:`qmpagent.recover` settles what a dead
            operation left. A finished operation leaves nothing there.
        guard: start the freeze guard (:mod:`qmpagent.guard`) before each freeze: a separate
            process that thaws the guest if this process dies, or its event loop is blocked
            past ``freeze_timeout``, while a freeze of ours may be in place.

    Raises:
        UsageError: a timeout that is not a positive finite number of seconds (a bool, a
            string or None included), or an ``agent_chardev`` that is not a string.
    """

    def __init__(
        self,
        monitor: Monitor,
        agent: GuestAgent | AgentAddress | None = None,
        *,
        agent_timeout: float = 10.0,
        thaw_timeout: float = 30.0,
        command_timeout: float = 30.0,
        job_timeout: float = 120.0,
        agent_chardev: str | None = None,
        journal_dir: str | os.PathLike[str] | None = None,
        guard: bool = True,
    ) -> None:
        self.monitor = monitor
        self._agent: GuestAgent | None = agent if isinstance(agent, GuestAgent) else None
        # A bad address is the caller's mistake, said here rather than in the middle of a
        # snapshot (where, under quiesce="preferred", it would only become a reason).
        self._agent_address: AgentAddress | None = (
            None if agent is None or isinstance(agent, GuestAgent) else check_address(agent)
        )
        self.agent_timeout = _seconds("agent_timeout", agent_timeout)
        self.thaw_timeout = _seconds("thaw_timeout", thaw_timeout)
        self.command_timeout = _seconds("command_timeout", command_timeout)
        self.job_timeout = _seconds("job_timeout", job_timeout)
        if agent_chardev is not None and not isinstance(agent_chardev, str):
            raise UsageError(f"agent_chardev must be a string or None, not {agent_chardev!r}")
        self.agent_chardev = agent_chardev
        if journal_dir is not None and not isinstance(journal_dir, (str, os.PathLike)):
            raise UsageError(f"journal_dir must be a path or None, not {journal_dir!r}")
        self.journal = Journal(journal_dir)
        self.guard = bool(guard)
        # One snapshot at a time through this orchestrator: two interleaved freeze/thaw
        # sequences on one guest would thaw each other's freeze.
        self._busy = asyncio.Lock()

    @property
    def has_agent(self) -> bool:
        """Whether an agent (connection or address) was given."""
        return self._agent is not None or self._agent_address is not None

    def _timeouts(self) -> _Timeouts:
        # Again at each run: the attributes are public, and may have been changed since.
        return _Timeouts(
            agent=_seconds("agent_timeout", self.agent_timeout),
            thaw=_seconds("thaw_timeout", self.thaw_timeout),
            command=_seconds("command_timeout", self.command_timeout),
            job=_seconds("job_timeout", self.job_timeout),
        )

    async def snapshot(
        self,
        disks: Mapping[str, str | os.PathLike[str]],
        quiesce: Quiesce | str = Quiesce.REQUIRED,
        *,
        freeze_timeout: float = 10.0,
        on_phase: PhaseCallback | None = None,
        mountpoints: Sequence[str] | None = None,
    ) -> SnapshotResult:
        """Take one atomic external snapshot of ``disks``.

        Concurrent calls on one orchestrator run one after the other.

        Args:
            disks: block node name (or the qdev id of its device) -> the new overlay file, which
                must not exist yet; it is created as qcow2 with the current image as backing file.
                No two overlay paths may name one file.
            quiesce: ``"required"``, ``"preferred"`` or ``"off"`` (see :class:`Quiesce`).
            freeze_timeout: the longest allowed freeze window, in seconds, counted from when
                the freeze request is written (the wait for the freeze's own reply included). If
                the transaction has not completed by then, the guest is thawed and the snapshot
                is not quiesced.
            on_phase: called as ``on_phase(name, None)`` when a phase starts and
                ``on_phase(name, seconds)`` when it ends (``name`` a :class:`Phase`: ``preflight``,
                ``prepare``, ``freeze``, ``transaction``, ``thaw``), e.g. for progress output. It
                must not block. An ``Exception`` it raises is logged and ignored. A
                ``BaseException`` that is not an ``Exception`` (``KeyboardInterrupt``,
                ``SystemExit``, ``asyncio.CancelledError``) stops the snapshot at the next phase
                boundary, but never skips a thaw: a freeze of ours is thawed (and the clean-up
                done) first, then that exception propagates, unless a :class:`ThawError` does
                (the guest may still be frozen: that is what the caller must learn; the
                interrupt is logged).
            mountpoints: freeze only these filesystems (``guest-fsfreeze-freeze-list``), e.g.
                ``["/mnt/data"]``; default: all of them. Each must be one the guest reports in
                ``guest-get-fsinfo`` (checked before the freeze; qemu-ga would ignore an
                unknown one); the rules are the same (only a freeze of ours is thawed).
                Note that qemu-ga's thaw takes no list: it thaws every frozen filesystem, so a
                filesystem another tool froze is thawed too (reported in ``warnings``).

        Returns:
            A :class:`SnapshotResult`.

        Raises:
            UsageError: bad arguments (unknown quiesce mode, empty ``disks``, a bad timeout, an
                overlay path that is not absolute UTF-8 text without NUL, an existing file, two
                paths that are one file, a bad ``mountpoints`` list or one given with
                ``quiesce="off"``), raised before anything is sent.
            UnknownMountpointError: a mountpoint the guest does not have (a UsageError),
                raised before anything is frozen or created.
            SnapshotError: no snapshot was taken, or (``quiesce="required"``) it could not be
                quiesced; ``.record`` says what was done and undone.
            ThawError: this operation froze the guest and could not thaw it: THE GUEST MAY STILL
                BE FROZEN.
        """
        mode = _quiesce_mode(quiesce)
        timeout = _seconds("freeze_timeout", freeze_timeout)
        chosen = check_mountpoints(mountpoints)
        if chosen is not None and mode is Quiesce.OFF:
            raise UsageError('mountpoints= chooses what to freeze: it makes no sense with quiesce="off"')
        timeouts = self._timeouts()
        paths = _new_image_paths(
            disks, empty="disks must be a non-empty mapping of node name to overlay path",
            entry="disk", kind="overlay")
        async with self._busy:
            op = _Operation(self, mode, timeout, on_phase, timeouts)
            op.mountpoints = chosen
            return await op.run(paths)

    async def chain(self, disk: str) -> list[ChainNode]:
        """The backing chain of a device or node, active layer first: a list of
        :class:`~qmpagent.ChainNode` (a :class:`~qmpagent.BlockNode` with ``file_node_name``,
        ``backing_node_name`` and ``depth``): node names, files, formats, virtual sizes.

        Args:
            disk: a device id (``"vblk0"``: its active layer first) or a node name.

        Raises:
            UsageError: no such device or node.
            MonitorError: a query failed, or QEMU's replies have the wrong shape.
        """
        return await block_chain(self.monitor, disk)

    async def commit(
        self,
        disk: str,
        base: str | None = None,
        delete_files: bool = False,
        timeout: float | None = None,
        *,
        speed: int | None = None,
        on_progress: ProgressCallback | None = None,
        progress_interval: float = 1.0,
    ) -> CommitResult:
        """Merge the device's active layer (and every layer between) down into ``base``,
        pivot the device to it, check that it runs on it, and remove the merged nodes (qcow2
        and file nodes, top first) and, with ``delete_files``, their files.

        Runs after (never during) a snapshot of this orchestrator. A later call on the same
        disk finishes what an interrupted one left (its job completed or dismissed, merged
        nodes left attached removed) instead of merging one layer more.

        Args:
            disk: the device id (or its active layer's node name).
            base: the node to merge into; default the image directly below the active layer.
                A deeper one only when named: bases are often shared by several VMs, and a
                commit into one changes all of them.
            delete_files: delete the merged images' files once no node has them open.
            timeout: the longest wait for the job to be ready (default :attr:`job_timeout`);
                the guest's writes can keep it from converging.
            speed: limit the copy to this many bytes per second (``block-commit``'s
                ``speed``); a limit can help neither the guest nor the job starve the other.
            on_progress: called with a :class:`~qmpagent.JobProgress` at each poll.
            progress_interval: seconds between progress polls.

        Returns:
            A :class:`~qmpagent.CommitResult` (``active_node``, ``removed_nodes``,
            ``removed_files``, ...).

        Raises:
            UsageError: bad arguments, no such device, nothing to commit, or a ``base`` that
                is not below the active layer.
            CommitTimeout: not ready in time: the job was cancelled and dismissed; the VM
                still runs on its active layer.
            CommitError: the job failed or was cancelled from outside, the pivot failed, or
                removing the merged nodes or files failed; ``.record`` and the message say
                where the VM runs (on the active layer, or on the base with nodes left).
        """
        ready = self._timeouts().job if timeout is None else _seconds("timeout", timeout)
        t = self._timeouts()
        async with self._busy:
            return await commit_disk(
                self.monitor, disk, base=base, delete_files=delete_files, timeout=ready,
                command_timeout=t.command, job_timeout=t.job, speed=speed,
                on_progress=on_progress, progress_interval=progress_interval,
                journal=self.journal,
            )

    async def backup(
        self,
        targets: Mapping[str, str | os.PathLike[str]],
        since: Mapping[str, str | os.PathLike[str]] | None = None,
        quiesce: Quiesce | str = Quiesce.REQUIRED,
        *,
        freeze_timeout: float = 10.0,
        bitmap: str | None = "qmpagent",
        on_phase: PhaseCallback | None = None,
        on_progress: BackupProgressCallback | None = None,
        progress_interval: float = 1.0,
        timeout: float | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        speed: int | None = None,
        durable: bool = True,
    ) -> BackupResult:
        """Back up ``targets``: a point-in-time copy of each disk, application-consistent (the
        guest frozen only while one ``transaction`` starts the copy jobs), returned when the
        copy is complete. See :mod:`qmpagent.backup` for how, and why no dirty bit is lost.

        Every rule of :meth:`snapshot` holds: the same preflight (agent port, sync, ping,
        status, freeze commands), ``quiesce`` policies, ``freeze_timeout`` window, a foreign
        freeze kept, only our freeze thawed, on every exit path. Concurrent calls on one
        orchestrator (snapshots included) run one after the other.

        Args:
            targets: disk (block node name or device id) -> the backup file, which must not
                exist yet; created as qcow2 (the disk's virtual size). No two may be one file.
            since: disk -> its previous backup (the last one made with ``bitmap``): those
                disks' backups are incremental (only the clusters changed since; the target's
                backing file is that backup). Other disks get a full backup.
            quiesce: ``"required"``, ``"preferred"`` or ``"off"`` (see :class:`Quiesce`).
            freeze_timeout: the longest allowed freeze window, as for :meth:`snapshot`.
            bitmap: the persistent dirty bitmap that tracks each disk's changes for the next
                incremental (added by the first full backup; needs a qcow2 disk); None: no
                tracking (full backups only).
            on_phase: as for :meth:`snapshot`; a backup adds the phase ``copy``.
            on_progress: ``on_progress(disk, JobProgress)`` at each progress poll of the copy.
            progress_interval: seconds between progress polls.
            timeout: the longest the copy may take (None: no limit, but a copy that makes no
                progress for ``job_timeout`` seconds fails).
            state_dir: where the record of each disk's last backup is kept (default
                ``$XDG_STATE_HOME/qmpagent-backups``); an incremental is allowed only since that one.
            speed: limit each copy job to this many bytes per second (``blockdev-backup``
                ``speed``), e.g. to spare the guest's I/O; None: no limit.
            durable: the complete targets are written to stable storage (``fsync`` of each
                file and its directory) before the backup is reported complete. False leaves
                that to the operating system, as ``qemu-img convert`` does: faster, but a
                power loss soon after may lose the backup. (QEMU writes a target without
                flushing it either way: see :mod:`qmpagent.backup`.)

        Returns:
            A :class:`~qmpagent.BackupResult` (``targets``, ``bytes_copied``, ``quiesced``,
            ``freeze_window``, ...).

        Raises:
            UsageError: bad arguments (as for :meth:`snapshot`; a ``since`` for a disk not in
                ``targets``, a bad bitmap name, a disk that cannot hold a persistent bitmap).
            BackupChainError: a ``since`` that does not match its disk (missing, not qcow2,
                another size, no bitmap, not the last backup): nothing was done.
            BackupError: the backup failed, timed out or was cancelled by QEMU (``.stage``
                ``"window"`` or ``"copy"``); its targets were removed, no dirty bit was lost.
            ThawError: the guest may still be frozen (as for :meth:`snapshot`).
        """
        from .backup import backup_operation  # it builds on this module

        op, paths = backup_operation(
            self, targets, since=since, quiesce=quiesce, freeze_timeout=freeze_timeout,
            bitmap=bitmap, on_phase=on_phase, on_progress=on_progress,
            progress_interval=progress_interval, timeout=timeout, state_dir=state_dir,
            timeouts=self._timeouts(), speed=speed, durable=durable,
        )
        async with self._busy:
            return await op.run_backup(paths)

    def export(
        self,
        images: Mapping[str, str | os.PathLike[str]],
        *,
        socket: str | os.PathLike[str],
        quiesce: Quiesce | str = Quiesce.REQUIRED,
        freeze_timeout: float = 10.0,
        on_phase: PhaseCallback | None = None,
    ) -> Fleece:
        """Pull mode: export each disk's frozen point-in-time view over NBD for an external
        reader (image fleecing: ``blockdev-backup`` ``sync: "none"`` into a temporary image
        backed by the disk, started in one transaction inside the freeze; the guest is thawed
        at once). Use as ``async with orch.export(...) as res``: ``res.uris[disk]`` is readable
        as a raw image until the block ends; then everything is removed. See
        :mod:`qmpagent.fleece`.

        Args:
            images: disk (node name or device id) -> its temporary fleecing image, which must
                not exist yet (it holds the clusters the guest overwrites meanwhile).
            socket: the unix socket QEMU's NBD server listens on (if this starts it).
            quiesce, freeze_timeout, on_phase: as for :meth:`snapshot`.

        Raises:
            UsageError: bad arguments (raised here, before anything is sent).
            BackupError: on entry: the export could not be set up (everything was removed).
            ThawError: on entry: the guest may still be frozen.
        """
        from .fleece import fleece  # it builds on this module

        return fleece(self, self._busy, images, socket=socket, quiesce=quiesce,
                      freeze_timeout=freeze_timeout, on_phase=on_phase)


async def _keeping_thaw_error(failure: BaseException | None, step: Coroutine[Any, Any, None]) -> None:
    """Run a clean-up step to completion while ``failure`` propagates. If that failure is a
    ThawError, nothing that happens meanwhile (a late cancellation, a timeout of the caller)
    may replace it: the caller must learn that the guest may still be frozen."""
    try:
        await run_to_completion(step)
    except BaseException as late:
        if isinstance(failure, ThawError):
            log.warning("ignored during clean-up after a failed thaw: %r", late)
            return
        raise


async def _all_or_none(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``coros`` as one task group: each in a task of its own; the first failure cancels
    the others; a cancellation of the caller (native, or re-delivered again and again by an
    anyio cancel scope) cancels each of them once. Either way every one of them has finished
    (its own clean-up, e.g. a job's cancel and dismiss, included) before this returns or
    raises: nothing goes on behind the caller's back. Each must bound its own duration."""
    if not coros:
        return
    tasks = [asyncio.ensure_future(c) for c in coros]
    interrupted: BaseException | None = None
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException as exc:  # the caller was cancelled
        interrupted = exc
    failed = any(t.done() and not t.cancelled() and t.exception() is not None for t in tasks)
    if interrupted is not None or failed:
        for t in tasks:
            t.cancel()  # once each; a done task ignores it
    with anyio.CancelScope(shield=True):
        while not all(t.done() for t in tasks):
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError as exc:  # native cancellation goes through a shield
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    for t in tasks:
        if not t.cancelled() and (error := t.exception()) is not None:
            raise error


def _quiesce_mode(value: Quiesce | str) -> Quiesce:
    try:
        return Quiesce(value)
    except ValueError:
        raise UsageError(f"quiesce must be one of required, preferred, off; not {value!r}") from None


def _checked_node(node: BlockNode) -> BlockNode:
    """A node from ``query-named-block-nodes`` whose members this module uses have the right
    types (QEMU's replies are checked, not trusted), else MonitorProtocolError."""
    raw = node.raw
    if (
        not isinstance(raw, Mapping)
        or not isinstance(raw.get("node-name"), str)
        or not isinstance(raw.get("drv"), str)
        or not isinstance(raw.get("file", ""), str)
        or not isinstance(raw.get("backing_file") or "", str)
        or isinstance(node.virtual_size, bool)
        or (node.virtual_size is not None and node.virtual_size < 0)
    ):
        raise MonitorProtocolError(
            f"query-named-block-nodes: an entry with members of the wrong type: {raw!r:.300}"
        )
    return node


class _Operation:
    """One snapshot run: its state (a :class:`SnapshotState`, the one writer of its record),
    and the phases in order."""

    def __init__(
        self,
        orch: SnapshotOrchestrator,
        mode: Quiesce,
        freeze_timeout: float,
        on_phase: PhaseCallback | None,
        timeouts: _Timeouts,
    ) -> None:
        self.orch = orch
        self.on_phase = on_phase
        self.mon = orch.monitor
        self.mode = mode
        self.freeze_timeout = freeze_timeout
        self.t = timeouts
        self.state = SnapshotState(SnapshotRecord())
        self.record = self.state.record
        self.agent: GuestAgent | None = None
        self.own_agent = False  # we connected it, we close it
        self.stale_agents: list[GuestAgent] = []  # ours, replaced by a reconnect: closed at the end
        self.overlays: list[_Overlay] = []
        self.times: dict[str, float] = {}
        self.token = secrets.token_hex(4)
        self.vm_running = False
        self.warnings: list[str] = []
        self.filesystems: int | None = None  # what guest-get-fsinfo lists, if it answers
        self.mountpoints: tuple[str, ...] | None = None  # freeze only these (None: all)
        # The last agent error that hid the freeze's outcome or failed a thaw (for messages).
        self.agent_error: BaseException | None = None
        # When the resolution of a freeze without reply must give up (thaw_timeout from its
        # first attempt, wherever it continues).
        self.resolve_deadline: float | None = None
        # A BaseException raised by on_phase, held until it is safe to raise (see _checkpoint).
        self.interrupt: BaseException | None = None
        # Crash safety (issue 13): the VM's identity, this operation's journal entry, and the
        # freeze guard (None: not started).
        self.identity: VMIdentity | None = None
        self.entry: Entry | None = None
        self.guard: FreezeGuard | None = None
        self.guarded = False

    # --- driver ---------------------------------------------------------------------------

    async def run(self, disks: dict[str, str]) -> SnapshotResult:
        started = time.monotonic()
        try:
            try:
                with self._phase(Phase.PREFLIGHT):
                    await self._preflight_vm(disks)
                    await self._check_journal()
                    if self.mode is Quiesce.OFF:
                        self.state.skip("quiesce is off")
                    else:
                        await self._preflight_agent()
                # Durably, before anything is created: what this operation is about to make.
                self._journal_prepare()
                # The guard's start-up (~0.1 s) overlaps the prepare phase.
                self._start_guard()
                with self._phase(Phase.PREPARE):
                    await self._prepare()
                await self._freeze_snapshot_thaw()
                await self._after_window()
            except BaseException as exc:
                await _keeping_thaw_error(exc, self._cleanup(exc))
                raise
            finally:
                await _keeping_thaw_error(sys.exc_info()[1], self._finish_journal())
                await _keeping_thaw_error(sys.exc_info()[1], self._close_agents())
        except BaseException as exc:
            held = self.interrupt
            if held is not None and held is not exc:
                if not isinstance(exc, ThawError):
                    # What on_phase raised, now that nothing of ours is frozen; ``exc`` is
                    # its __context__.
                    raise held  # noqa: B904
                log.warning("on_phase raised %r; a ThawError takes precedence", held)
            raise
        self._checkpoint()
        self.times["total"] = time.monotonic() - started
        return self._result()

    async def _after_window(self) -> None:
        """Hook (:mod:`qmpagent.backup` overrides it: the copy): what runs after the window
        closed (thawed); a failure is cleaned up like any other."""

    def _result(self) -> SnapshotResult:
        st = self.state
        return SnapshotResult(
            quiesced=st.quiesced,
            freeze_owner=st.quiesced_by.value if st.quiesced_by is not None else None,
            frozen=st.frozen,
            thawed=st.thawed,
            freeze_window=st.freeze_window,
            overlays={o.node: o.node_name for o in self.overlays},
            reason=None if st.quiesced else st.reason,
            files={o.node: o.path for o in self.overlays},
            timings=PhaseTimings(**self.times),
            freeze_resolved=st.resolved,
            warnings=tuple(self.warnings),
            freeze_state=st.freeze,
            transaction_state=st.transaction,
            guarded=self.guarded,
        )

    @contextlib.contextmanager
    def _phase(self, phase: Phase) -> Iterator[None]:
        """Time a phase and name it in the record. A phase run while another one's failure is
        propagating (the thaw in a ``finally``) leaves the failed phase named, unless it fails
        itself. Its start and (unless it fails) its end are checkpoints (see _checkpoint),
        except the start of the thaw: nothing may keep the thaw from running."""
        failing = sys.exc_info()[1] is not None
        previous = self.state.phase
        self.state.enter_phase(phase)
        self._notify(phase, None)
        t = time.monotonic()
        try:
            if phase is not Phase.THAW:
                self._checkpoint()
            yield
        except BaseException:
            raise
        else:
            if failing:
                self.state.enter_phase(previous)
        finally:
            elapsed = time.monotonic() - t
            self.times[phase.value] = self.times.get(phase.value, 0.0) + elapsed
            self._notify(phase, elapsed)
        if not failing:
            self._checkpoint()

    def _notify(self, phase: Phase, seconds: float | None) -> None:
        if self.on_phase is None:
            return
        try:
            self.on_phase(phase, seconds)
        except Exception:
            log.exception("on_phase callback failed (ignored)")
        except BaseException as exc:  # KeyboardInterrupt, SystemExit, CancelledError
            log.warning("on_phase raised %r: the snapshot stops once that is safe", exc)
            if self.interrupt is None:
                self.interrupt = exc

    def _checkpoint(self) -> None:
        """Raise what on_phase raised, if anything: called at phase boundaries, never between
        a freeze and the thaw's end (the thaw runs in a ``finally`` if this raises earlier)."""
        if self.interrupt is not None:
            raise self.interrupt

    def _fail(self, message: str, cause: BaseException | None = None) -> SnapshotError:
        err = SnapshotError(message, self.record)
        err.__cause__ = cause
        return err

    def _policy(self, cause: BaseException | None = None) -> None:
        """No quiesce is possible (``state.reason`` says why): fail if it is required."""
        log.info("snapshot cannot be quiesced: %s", self.state.reason)
        if self.mode is Quiesce.REQUIRED:
            raise self._fail(f"quiesce required but not possible: {self.state.reason}", cause)

    # --- crash safety: journal and guard (issue 13) -----------------------------------------

    async def _check_journal(self) -> None:
        """Identify the VM; settle what earlier, dead operations on it left (the same work as
        :func:`qmpagent.recover`), or refuse (UnsettledOperationError) if that is not
        possible or one of them is still running."""
        from .recovery import settle_journal

        try:
            self.identity = await identify_vm(self.mon, timeout=self.t.command)
            orch = self.orch
            agent: GuestAgent | AgentAddress | None = None
            if self.mode is not Quiesce.OFF:
                agent = orch._agent if orch._agent is not None else orch._agent_address
            report = await settle_journal(
                self.mon, agent, orch.journal, self.identity, timeout=self.t.command,
                agent_chardev=orch.agent_chardev, may_thaw=False,
            )
        except MonitorError as exc:
            raise self._fail(f"preflight: cannot query QEMU: {exc}", exc) from exc
        for err in report.journal_errors:
            self.warnings.append(f"journal: {err}")
            log.warning("journal: %s", err)
        if report.unresolved:
            raise UnsettledOperationError(
                "an earlier snapshot operation on this VM is unsettled: "
                + "; ".join(report.unresolved)
                + " (nothing was changed; settle it with qmpagent.recover() or `qmpagent recover`)",
                report.unresolved,
            )
        if report.settled:
            text = report.render().replace("\n", ";")
            self.warnings.append(f"settled an earlier operation on this VM that had died: {text}")
            log.warning("%s", self.warnings[-1])

    def _journal_prepare(self) -> None:
        assert self.identity is not None
        me = os.getpid()
        self.entry = Entry(
            op=new_op_id(),
            vm=self.identity,
            owner_pid=me,
            owner_start=process_start_time(me),
            overlays=[OverlayRecord(o.node, o.node_name, o.file_node_name, o.path) for o in self.overlays],
        )
        self._describe(self.entry)
        self._journal_write("prepare")

    def _describe(self, entry: Entry) -> None:
        """Hook (:mod:`qmpagent.backup` overrides it): what else the journal entry must say,
        before its first write."""

    def _journal_write(self, step: str, *, required: bool = True) -> None:
        """Write the entry durably, announcing ``step`` (before it is taken). A failure is a
        SnapshotError when ``required`` (before a step), else a warning."""
        entry = self.entry
        if entry is None:
            return
        entry.step = step
        entry.freeze = self.state.freeze.value
        entry.transaction = self.state.transaction.value
        try:
            self.orch.journal.write(entry)
        except JournalError as exc:
            if required:
                raise self._fail(f"cannot write the journal: {exc}", exc) from exc
            self.warnings.append(f"cannot write the journal: {exc}")
            log.warning("%s", self.warnings[-1])

    def _leaves_something(self) -> bool:
        """Whether this operation (now ending) may leave something for recovery: a freeze
        that may be in place, a transaction of unknown outcome, nodes or files it could not
        remove."""
        st, rec = self.state, self.record
        if st.must_settle or st.freeze is FreezeState.THAW_FAILED:
            return True
        if st.transaction in (TransactionState.SENT, TransactionState.UNKNOWN):
            return True
        if st.snapshot_taken is False:
            if set(rec.overlays_added) - set(rec.overlays_removed):
                return True
            if set(rec.files_created) - set(rec.files_removed):
                return True
            if any(o.step > _Step.NONE and o.path not in rec.files_removed and os.path.lexists(o.path)
                   for o in self.overlays):
                return True
        return False

    async def _finish_journal(self) -> None:
        """At the very end: stop the guard; remove the journal entry, or (something is left)
        hand it over to recovery (owner 0: nobody runs it any more)."""
        await self._stop_guard()
        entry = self.entry
        if entry is None:
            return
        try:
            if self._leaves_something():
                entry.owner_pid, entry.owner_start = 0, None
                self._journal_write(entry.step, required=False)
                log.warning("operation %s left something unsettled: journal entry %s kept for "
                            "qmpagent recover", entry.op, entry.path)
            else:
                self.orch.journal.remove(entry.op)
        except JournalError as exc:
            self.warnings.append(f"journal: {exc}")
            log.warning("journal: %s", exc)

    async def _stop_guard(self) -> None:
        """Stop the freeze guard (if started; idempotent), disarmed first unless a freeze of
        ours may still be in place."""
        guard, self.guard = self.guard, None
        if guard is not None:
            if not self.state.must_settle:
                guard.disarm()
            await guard.close()
            agent = self.agent
            if agent is not None and agent.is_connected:
                agent.hold_reading(False)
                if guard.took_over is not None:
                    # The guard spoke on this connection: resync before it is used again.
                    with contextlib.suppress(AgentError):
                        await agent.sync(timeout=self.t.agent)

    def _start_guard(self) -> None:
        """Start the freeze guard if a freeze will be attempted (outside the window)."""
        if not self.orch.guard or self.state.freeze is not FreezeState.NOT_TRIED or self.agent is None:
            return
        assert self.entry is not None
        fd = self.agent.socket_fileno()
        if fd is None:
            self._guard_warning("the agent connection has no socket to hand to the freeze guard")
            return
        guard = FreezeGuard()
        try:
            guard.start(fd, self.entry.op, self.orch.journal.directory, thaw_timeout=self.t.thaw)
        except OSError as exc:
            self._guard_warning(f"the freeze guard could not be started: {exc}")
            return
        self.guard = guard

    def _guard_warning(self, why: str) -> None:
        self.warnings.append(
            f"{why}: had this process died inside the freeze window, the guest would have stayed "
            "frozen (this process thawed it itself)"
        )
        log.warning("%s", self.warnings[-1])

    async def _guard_ready(self) -> None:
        guard = self.guard
        if guard is not None and not guard.ready and not await guard.wait_ready(timeout=10.0):
            self._guard_warning(guard.lost or "the freeze guard did not start")
            self.guard = None
            await guard.close()

    def _arm_guard(self) -> None:
        """Right before the freeze is written: one non-blocking send."""
        guard = self.guard
        if guard is not None:
            self.guarded = guard.arm(time.monotonic() + self.freeze_timeout)

    def _disarm_guard(self) -> None:
        """Nothing of ours is frozen any more: tell the guard, and learn whether it was
        still there."""
        guard = self.guard
        if guard is None or not guard.armed:
            return
        guard.poll()
        if guard.lost is None and not guard.alive:
            guard.lost = "the freeze guard exited"
        if guard.lost is not None:
            self.guarded = False
            self._guard_warning(f"the freeze guard died during the freeze ({guard.lost})")
        guard.disarm()

    def _settled(self) -> None:
        """Nothing of ours is frozen any more (if so): disarm the guard and say so durably
        (after the thaw: outside the window)."""
        if self.state.must_settle:
            return
        self._disarm_guard()
        if self.entry is not None and self.entry.step == "freeze":
            self._journal_write("settled", required=False)

    @contextlib.contextmanager
    def _turn(self) -> Iterator[bool]:
        """Around an agent command after the guard was armed: True if ours to send. Between
        such commands our connection does not read from the agent socket (the guard may be
        reading its duplicate): reading resumes for the command only."""
        guard, agent = self.guard, self.agent
        if guard is None or not guard.armed or agent is None:
            yield True
            return
        with guard.turn() as mine:
            if not mine:
                yield False
                return
            agent.hold_reading(False)
            try:
                yield True
            finally:
                if guard.armed and agent is self.agent:
                    agent.hold_reading(True)

    def _hold_agent(self) -> None:
        """The freeze is ours (or may be) and the guard is armed: stop reading the agent
        socket until our next command (one syscall, in the window)."""
        if self.guard is not None and self.guard.armed and self.agent is not None:
            self.agent.hold_reading(True)

    def _guard_has_it(self) -> bool:
        guard = self.guard
        if guard is None:
            return False
        guard.poll()
        return guard.took_over is not None

    async def _take_guard_result(self, deadline: float) -> None:
        """The guard took the agent over (this process was stuck past the deadline): wait for
        what it did and record it."""
        guard = self.guard
        assert guard is not None
        st = self.state
        res = await guard.wait_result(timeout=max(0.0, deadline - time.monotonic()))
        why = f"the freeze guard took over ({guard.took_over})"
        if res is None or res.result == "failed":
            self.agent_error = AgentError(f"{why} and could not thaw: {res.detail if res else 'no report'}")
            return
        self.warnings.append(f"{why}: this process did not thaw within freeze_timeout; "
                             f"the guard {'thawed' if res.result == 'thawed' else 'found the guest thawed'}")
        log.warning("%s", self.warnings[-1])
        now = time.monotonic()
        if res.result == "thawed":
            if st.freeze is FreezeState.SENT_UNRESOLVED:
                st.freeze_resolved(True, "")
            st.thaw_confirmed(res.thawed, now)
        elif st.freeze is FreezeState.SENT_UNRESOLVED:
            st.freeze_resolved(False, f"{why}: the freeze had not frozen the guest")
        elif st.freeze is FreezeState.OURS:
            st.thaw_confirmed(None, now)

    # --- preflight ------------------------------------------------------------------------

    async def _block_nodes(self) -> dict[str, BlockNode]:
        return {n.node_name: n for n in await self.mon.named_block_nodes()}

    async def _preflight_vm(self, disks: dict[str, str]) -> None:
        timeout = self.t.command
        try:
            status = await self.mon.execute("query-status", timeout=timeout)
            nodes = await self._block_nodes()
        except MonitorError as exc:
            raise self._fail(f"preflight: cannot query QEMU: {exc}", exc) from exc
        self.vm_running = isinstance(status, dict) and status.get("status") == "running"
        for i, (key, path) in enumerate(disks.items()):
            node = await self._resolve_node(key, nodes)
            base = nodes.get(node)
            if base is None:
                raise UsageError(f"no block node named {node!r}")
            try:
                base = _checked_node(base)
            except MonitorProtocolError as exc:
                raise self._fail(f"preflight: {exc}", exc) from exc
            if any(o.node == node for o in self.overlays):
                raise UsageError(f"disk {key!r} given twice")
            _check_absent(path)  # again: just before it is made
            if base.virtual_size is None:
                raise UsageError(f"block node {node!r} reports no virtual size")
            self.overlays.append(
                _Overlay(
                    node=node,
                    path=path,
                    base=base,
                    node_name=f"qa{self.token}o{i}",
                    file_node_name=f"qa{self.token}f{i}",
                )
            )

    async def _resolve_node(self, key: str, nodes: Mapping[str, BlockNode]) -> str:
        """The format node of ``key``: a node name, or a device's qdev id."""
        if key in nodes:
            return key
        try:
            node = await self.mon.device_node_name(key)
        except MonitorCommandError as exc:
            raise UsageError(f"no block node or device named {key!r}") from exc
        except MonitorError as exc:
            raise self._fail(f"preflight: cannot resolve device {key!r}: {exc}", exc) from exc
        except (AttributeError, KeyError, TypeError) as exc:
            # query-block members of the wrong type, met while the monitor parsed them
            err = MonitorProtocolError(f"query-block: a malformed entry ({exc!r})")
            err.__cause__ = exc
            raise self._fail(f"preflight: cannot resolve device {key!r}: {err}", err) from err
        if not isinstance(node, str):
            err = MonitorProtocolError(f"query-block: node-name of {key!r} is not a string: {node!r:.100}")
            raise self._fail(f"preflight: {err}", err)
        return node

    async def _preflight_agent(self) -> None:
        try:
            await self._check_agent()
        except _Unquiescable as exc:
            self.state.skip(str(exc))
            self._policy(exc.__cause__)

    async def _check_agent(self) -> None:
        orch = self.orch
        if not orch.has_agent:
            raise _Unquiescable("no guest agent was given")
        if not self.vm_running:
            raise _Unquiescable("the VM is not running")
        # Invariant 2: the port first; a request written to a closed port would be queued and
        # answered much later, to whoever is connected then.
        try:
            port_open = await self.mon.agent_port_open(orch.agent_chardev)
        except (AgentError, MonitorError) as exc:
            raise _Unquiescable(f"cannot read the agent port state: {exc}") from exc
        if not port_open:
            raise _Unquiescable("the guest agent's port is closed in the guest (agent not running)")
        t = self.t.agent
        try:
            if orch._agent is not None:
                self.agent = orch._agent
                await self.agent.sync(timeout=t)
            else:
                assert orch._agent_address is not None
                self.agent = await GuestAgent.connect(orch._agent_address, timeout=t)
                self.own_agent = True
            await self.agent.ping(timeout=t)
            status = await self.agent.fsfreeze_status(timeout=t)
        except AgentError as exc:
            raise _Unquiescable(f"the guest agent does not answer: {exc}") from exc
        if status is FreezeStatus.FROZEN:
            # Invariant 3: frozen by someone else. Quiescent, but not ours: never thaw it.
            self.state.external()
            log.info("guest already frozen by someone else: snapshot without freeze or thaw")
            return
        try:
            info = await self.agent.info(timeout=t)
        except AgentError as exc:
            raise _Unquiescable(f"guest-info failed: {exc}") from exc
        disabled = [c for c in FREEZE_COMMANDS if not info.is_enabled(c)]
        if disabled:
            raise _Unquiescable(f"the guest agent has {', '.join(disabled)} disabled")
        if self.mountpoints is not None:
            await self._check_mountpoints(info)
        elif info.is_enabled("guest-get-fsinfo"):
            # To notice a freeze that freezes fewer filesystems than there are (see _freeze).
            try:
                fsinfo = await self.agent.get_fsinfo(timeout=t)
                self.filesystems = len({fs.get("mountpoint") for fs in fsinfo})
            except AgentError as exc:
                log.info("guest-get-fsinfo failed (%s); freeze counts are not cross-checked", exc)

    async def _check_mountpoints(self, info: Any) -> None:
        """Every chosen mountpoint is one the guest has (before anything is frozen or made):
        qemu-ga would skip an unknown one silently. UnknownMountpointError otherwise."""
        assert self.agent is not None and self.mountpoints is not None
        for command in ("guest-fsfreeze-freeze-list", "guest-get-fsinfo"):
            if not info.is_enabled(command):
                raise _Unquiescable(f"mountpoints= needs {command}, which the agent has disabled")
        try:
            fsinfo = await self.agent.get_fsinfo(timeout=self.t.agent)
        except AgentError as exc:
            raise _Unquiescable(f"guest-get-fsinfo failed, the mountpoints cannot be checked: {exc}") from exc
        require_known(self.mountpoints, fsinfo)
        self.filesystems = len(self.mountpoints)

    # --- prepare --------------------------------------------------------------------------

    async def _prepare(self) -> None:
        try:
            await _all_or_none([self._prepare_one(o) for o in self.overlays])
        except QMPAgentError as exc:
            raise self._fail(f"preparing the overlays failed: {exc}", exc) from exc

    async def _prepare_one(self, ov: _Overlay) -> None:
        mon, jt, ct = self.mon, self.t.job, self.t.command
        ov.step = _Step.FILE  # preflight saw no file there: whatever is there now is ours
        await mon.run_job(
            "blockdev-create",
            {
                "job-id": f"{ov.node_name}-cf",
                "options": {"driver": "file", "filename": ov.path, "size": 0},
            },
            timeout=jt,
        )
        self.state.file_created(ov.path)
        ov.step = _Step.FILE_NODE
        await mon.execute("blockdev-add", self._file_options(ov), timeout=ct)
        await mon.run_job(
            "blockdev-create",
            {"job-id": f"{ov.node_name}-cq", "options": self._image_options(ov)},
            timeout=jt,
        )
        ov.step = _Step.NODE
        await mon.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": ov.node_name, "file": ov.file_node_name,
             "backing": self._backing_node(ov)},
            timeout=ct,
        )
        self.state.overlay_added(ov.node_name)

    def _file_options(self, ov: _Overlay) -> dict[str, Any]:
        """Hook (:mod:`qmpagent.backup` overrides it): the ``blockdev-add`` options of the
        new image's file node."""
        return {"driver": "file", "filename": ov.path, "node-name": ov.file_node_name}

    def _backing_node(self, ov: _Overlay) -> str | None:
        """Hook (:mod:`qmpagent.fleece` overrides it): the backing node the new image is
        attached with; None (``backing: null``) for an overlay, which gets its backing node
        from ``blockdev-snapshot``."""
        return None

    def _image_options(self, ov: _Overlay) -> dict[str, Any]:
        """Hook (:mod:`qmpagent.backup` overrides it): the ``blockdev-create`` options of the
        new image: a qcow2 overlay whose backing file is the current image."""
        options: dict[str, Any] = {
            "driver": "qcow2",
            "file": ov.file_node_name,
            "size": ov.base.virtual_size,
            "backing-file": ov.base.filename,
        }
        if ov.base.driver in ("qcow2", "raw", "qed", "vmdk", "vpc", "vdi", "luks"):
            options["backing-fmt"] = ov.base.driver
        return options

    # --- the window -----------------------------------------------------------------------

    async def _freeze_snapshot_thaw(self) -> None:
        st = self.state
        try:
            if st.freeze is FreezeState.NOT_TRIED:
                # Port state again, right before the freeze: prepare may have taken a while.
                await self._check_port_still_open()
            if st.freeze is FreezeState.NOT_TRIED:
                # Durably, before the freeze is written (outside the window), and the guard up.
                self._journal_write("freeze")
                await self._guard_ready()
                with self._phase(Phase.FREEZE):
                    try:
                        await self._freeze()
                    finally:
                        if not st.must_settle:
                            self._disarm_guard()
                        else:
                            self._hold_agent()
            with self._phase(Phase.TRANSACTION):
                await self._snapshot()
        finally:
            # Whatever happened above (an error, the deadline, the caller cancelled, once or
            # more, on_phase raised): a freeze that was sent and not yet known to be ours or
            # not is resolved now, and ours is thawed, to completion.
            if st.must_settle:
                with self._phase(Phase.THAW):
                    await run_to_completion(self._settle())
                    self._settled()
            self._settled()

    async def _check_port_still_open(self) -> None:
        try:
            port_open = await self.mon.agent_port_open(self.orch.agent_chardev)
        except (AgentError, MonitorError) as exc:
            self.state.skip(f"cannot read the agent port state before the freeze: {exc}")
            self._policy(exc)
            return
        if not port_open:
            self.state.skip("the guest agent's port closed before the freeze (agent stopped)")
            self._policy()

    def _freeze_written(self) -> None:
        """``on_sent`` of our freeze: this call's request was handed to the transport."""
        self.state.freeze_sent(time.monotonic())

    def _window_end(self) -> float:
        """When the freeze window closes: ``freeze_timeout`` after the freeze request left."""
        sent = self.state.freeze_sent_at
        assert sent is not None
        return sent + self.freeze_timeout

    async def _freeze(self) -> None:
        """Freeze: SENT_UNRESOLVED as soon as the request is written, then OURS or NOT_FROZEN
        from its reply or, if the reply is lost, from the status (within the window)."""
        assert self.agent is not None
        st = self.state
        # The freeze's own wait is part of the window.
        wait = min(self.t.agent, self.freeze_timeout)
        self._arm_guard()
        try:
            n = await self.agent.fsfreeze_freeze(
                self.mountpoints, timeout=wait, on_sent=self._freeze_written
            )
        except AgentCommandError as exc:
            # The agent answered: it thaws by itself when a freeze fails part-way, and a
            # CommandNotFound here means someone froze it since preflight. Not ours either way.
            if st.freeze is FreezeState.SENT_UNRESOLVED:
                st.freeze_refused(f"the freeze failed: {exc}")
            else:  # pragma: no cover - an answer implies the request left
                st.skip(f"the freeze failed: {exc}")
            self._policy(exc)
            return
        except BaseException as exc:
            if st.freeze is FreezeState.NOT_TRIED:
                # Timed out or cancelled before *this* request left (waiting for the channel,
                # or for another caller of a shared agent): nothing of ours can be frozen, and
                # a frozen status would be somebody else's.
                st.skip(f"the freeze could not be sent: {exc}")
                if isinstance(exc, AgentError):
                    self._policy(exc)
                    return
                raise
            # Invariant 5: a timeout, a lost connection, garbage instead of the reply, or the
            # caller cancelled while the freeze was in flight: it may or may not have frozen
            # the guest. A cancellation goes on (the finally resolves it); an agent error is
            # resolved now, within what is left of the window.
            self.agent_error = exc
            if not isinstance(exc, AgentError):
                raise
            log.warning("the freeze got no reply (%s): reading the status", exc)
            await self._resolve(self._window_end())
            if st.freeze is FreezeState.NOT_FROZEN:
                self._policy(exc)
            return
        st.freeze_answered(
            n, time.monotonic(), "the freeze froze no filesystems (none, or frozen by another tool)"
        )
        if n == 0:
            # Invariant 1: a freeze that froze nothing is not ours (another tool may hold a
            # freeze the agent would otherwise thaw on our behalf).
            self._policy()
            return
        if self.filesystems is not None and n < self.filesystems:
            # qemu-ga skips a filesystem that is already frozen (EBUSY) without a word, and its
            # thaw thaws every frozen filesystem: nothing can keep ours from thawing it too.
            which = "chosen" if self.mountpoints is not None else "guest's"
            self.warnings.append(
                f"the freeze froze {n} of the {which} {self.filesystems} filesystems: the others "
                "may be frozen by another tool in the guest, and qemu-ga's thaw thaws them too"
            )
            log.warning("%s", self.warnings[-1])

    async def _resolve(self, until: float) -> None:
        """After a freeze with no reply: resync and read the status, until ``until`` at the
        latest (and within the resolution's own budget, ``thaw_timeout`` from its first
        attempt). Frozen means ours (it was thawed at preflight): SENT_UNRESOLVED -> OURS, or
        NOT_FROZEN; still SENT_UNRESOLVED if time ran out. Never raises an AgentError."""
        st = self.state
        if self.resolve_deadline is None:
            self.resolve_deadline = time.monotonic() + self.t.thaw
        deadline = min(until, self.resolve_deadline)
        pause = 0.05
        while st.freeze is FreezeState.SENT_UNRESOLVED and time.monotonic() < deadline:
            agent = self.agent
            assert agent is not None
            try:
                with self._turn() as mine:
                    if not mine:
                        return  # the guard has the agent: _settle takes its result
                    # Resyncs first: the late freeze reply, if any, is dropped as stale.
                    status = await agent.fsfreeze_status(timeout=self._attempt_timeout(deadline))
            except AgentError as exc:
                self.agent_error = exc
                if not agent.is_connected and await self._reconnect_agent(deadline) is None:
                    return
                await anyio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, 1.0)
                continue
            log.warning("freeze reply lost; status is %s", status.value)
            st.freeze_resolved(
                status is FreezeStatus.FROZEN,
                f"the freeze got no reply ({self.agent_error}) and did not freeze",
            )

    async def _snapshot(self) -> None:
        """The transaction phase: under our freeze (bounded by the window), under someone
        else's (re-checked first), or crash-consistent."""
        st = self.state
        if st.freeze is FreezeState.EXTERNAL:
            await self._recheck_external()
        if st.freeze is FreezeState.SENT_UNRESOLVED:
            await self._window_exceeded(
                None,
                f"{self._window_reason()}: the freeze got no reply, and what it did could not "
                "be learnt in time",
            )
        elif st.freeze is FreezeState.OURS:
            await self._transaction(self._window_end())
        else:
            await self._transaction(None)

    async def _recheck_external(self) -> None:
        """Someone else's freeze may have ended since preflight: read the status right before
        the transaction; if it is not frozen (or cannot be read), the snapshot is not
        quiesced."""
        assert self.agent is not None
        try:
            status = await self.agent.fsfreeze_status(timeout=self.t.agent)
        except AgentError as exc:
            self.state.external_ended(
                f"the guest was frozen by someone else at preflight, and whether it still is "
                f"cannot be read before the transaction: {exc}"
            )
            self._policy(exc)
            return
        if status is not FreezeStatus.FROZEN:
            self.state.external_ended(
                "the guest was frozen by someone else at preflight, but was thawed before "
                "the transaction"
            )
            self._policy()

    def _window_reason(self) -> str:
        return f"the freeze window exceeded freeze_timeout ({self.freeze_timeout:g}s)"

    def _actions(self) -> list[dict[str, Any]]:
        """Hook (:mod:`qmpagent.backup` overrides it): the actions of the one transaction
        inside the window."""
        return [
            {"type": "blockdev-snapshot", "data": {"node": o.node, "overlay": o.node_name}}
            for o in self.overlays
        ]

    async def _transaction(self, deadline: float | None) -> None:
        """Send the transaction; ``deadline``: when the freeze window closes (None: not
        frozen by us, ``command_timeout``)."""
        st = self.state
        actions = self._actions()
        if deadline is None:
            timeout = self.t.command
        else:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                # Frozen longer than allowed already (a lost freeze reply waited for): no
                # transaction inside this window.
                await self._window_exceeded(None, self._window_reason())
                return
        st.transaction_sent()
        try:
            await self.mon.execute("transaction", {"actions": actions}, timeout=timeout)
        except MonitorTimeout as exc:
            if deadline is not None:
                await self._window_exceeded(exc, self._window_reason())
                return
            # Nothing of ours is frozen: take the time to find out what QEMU did.
            if await self._learn_transaction():
                return
            raise self._fail(f"the transaction got no answer and was not applied: {exc}", exc) from exc
        except MonitorUnavailable as exc:
            st.transaction_outcome(TransactionState.UNKNOWN)
            raise self._fail(
                "the connection to QEMU was lost after the transaction was sent: the outcome is "
                "unknown (the VM may run on the overlays or on its original images)",
                exc,
            ) from exc
        except MonitorCommandError as exc:
            st.transaction_outcome(TransactionState.NOT_APPLIED)
            raise self._fail(f"the transaction failed: {exc}", exc) from exc
        except MonitorError as exc:
            # An answer of the wrong shape: still SENT; the cleanup asks QEMU what it did,
            # once our freeze is thawed.
            raise self._fail(f"the transaction failed: {exc}", exc) from exc
        if deadline is not None and self._guard_has_it():
            # This process was stuck past the deadline while the transaction ran, and the
            # guard thawed: the transaction may have been applied after the thaw.
            await self._take_guard_result(time.monotonic() + self.t.thaw)
            reason = (f"{self._window_reason()}: this process was stuck and the freeze guard "
                      "thawed the guest while the transaction ran")
            st.not_quiesced(reason)
            st.transaction_outcome(TransactionState.APPLIED)
            if self.mode is Quiesce.REQUIRED and not st.quiesced:
                raise self._fail(f"{reason}; the snapshot was taken but is not guaranteed quiesced: "
                                 "the VM now runs on the overlays")
            return
        st.transaction_outcome(TransactionState.APPLIED)

    async def _window_exceeded(self, exc: MonitorTimeout | None, reason: str) -> None:
        """The transaction did not complete within the window (``exc``), or there was no
        time left to send it (None): thaw now, then find out whether a sent transaction was
        applied (QMP runs commands in order, so a query answers after it)."""
        st = self.state
        st.not_quiesced(reason)
        if st.must_settle:
            with self._phase(Phase.THAW):
                await run_to_completion(self._settle())
        applied = st.transaction is TransactionState.SENT and await self._learn_transaction()
        if applied:
            # The snapshot exists but may have been taken after the thaw: not quiesced.
            if self.mode is Quiesce.REQUIRED:
                raise self._fail(
                    f"{reason}; the snapshot was taken after all but is not guaranteed "
                    "quiesced: the VM now runs on the overlays",
                    exc,
                )
            return
        if self.mode is Quiesce.REQUIRED:
            raise self._fail(f"{reason}; no snapshot was taken", exc)
        # preferred: a crash-consistent snapshot, unfrozen.
        await self._transaction(None)

    async def _applied(self, nodes: Mapping[str, BlockNode]) -> bool:
        """Hook (:mod:`qmpagent.backup` overrides it): whether the transaction was applied,
        asked after it (QMP runs commands in order). Raises MonitorError."""
        # The transaction is atomic: the first overlay tells for all. It was added with
        # backing: null, so it reports a backing file only once blockdev-snapshot attached
        # it. (Not backing_file_depth: with flat=true QEMU reports 0 for every node.)
        ov = nodes.get(self.overlays[0].node_name)
        return ov is not None and _checked_node(ov).backing_file is not None

    async def _learn_transaction(self) -> bool:
        """Whether a transaction whose reply was not seen was applied: SENT -> APPLIED or
        NOT_APPLIED. QMP runs commands in order, so the query is answered after it. Raises
        SnapshotError (UNKNOWN: ``record.snapshot_taken`` None) if QEMU cannot tell us."""
        st = self.state
        try:
            with anyio.fail_after(self.t.command):
                nodes = await self._block_nodes()
                applied = await self._applied(nodes)
        except (TimeoutError, MonitorError) as exc:
            st.transaction_outcome(TransactionState.UNKNOWN)
            raise self._fail(
                "the transaction got no answer and its outcome cannot be read: the VM may run "
                "on the overlays or on its original images",
                exc,
            ) from exc
        st.transaction_outcome(TransactionState.APPLIED if applied else TransactionState.NOT_APPLIED)
        return applied

    # --- the thaw phase -------------------------------------------------------------------

    async def _settle(self) -> None:
        """The thaw phase: resolve a freeze whose outcome is not known, then thaw ours.
        Shielded from cancellation and bounded, every step in it, by ``thaw_timeout`` (a hard
        deadline on top of each step's own timeout). Raises ThawError if the guest may still
        be frozen by us."""
        st = self.state
        if not st.must_settle:
            return
        deadline = time.monotonic() + self.t.thaw
        if self.guard is not None:
            self.guard.extend(deadline)  # we are thawing: the guard waits for us until then
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self.t.thaw
            if st.freeze is FreezeState.SENT_UNRESOLVED and not self._guard_has_it():
                await self._resolve(deadline)
            if st.freeze is FreezeState.OURS and not self._guard_has_it():
                await self._thaw(deadline)
            if st.must_settle and self._guard_has_it():
                await self._take_guard_result(deadline)
        last = self.agent_error
        if st.freeze is FreezeState.SENT_UNRESOLVED:
            st.thaw_failed()
            raise ThawError(
                f"a freeze got no reply and its outcome cannot be read ({last}): "
                "the guest MAY BE FROZEN; check guest-fsfreeze-status and thaw it",
                self.record,
            ) from last
        if st.freeze is FreezeState.OURS:
            st.thaw_failed()
            raise ThawError(
                f"thawing the guest failed ({last}): THE GUEST MAY STILL BE FROZEN; check "
                "guest-fsfreeze-status and thaw it (qmpagent agent fsfreeze thaw)",
                self.record,
            ) from last

    async def _thaw(self, deadline: float) -> None:
        """Thaw our freeze, resyncing, re-reading the status and reconnecting after a
        failure, until ``deadline``: OURS -> THAWED, or still OURS if it cannot be confirmed."""
        st = self.state
        agent = self.agent
        assert agent is not None
        pause = 0.05
        while time.monotonic() < deadline:
            try:
                with self._turn() as mine:
                    if not mine:
                        return  # the guard has the agent: _settle takes its result
                    n = await agent.fsfreeze_thaw(timeout=self._attempt_timeout(deadline))
                    st.thaw_confirmed(n, time.monotonic())
                    self._disarm_guard()  # before the turn ends: the guard never acts after it
                if n > st.frozen:
                    # qemu-ga's thaw takes no list: it thawed a freeze that was not ours.
                    self.warnings.append(
                        f"the thaw thawed {n} filesystems, {n - st.frozen} more than this "
                        "snapshot froze: another tool's freeze in the guest was thawed too"
                    )
                    log.warning("%s", self.warnings[-1])
                return
            except AgentError as exc:
                self.agent_error = exc
                log.warning("thaw failed: %s", exc)
            # Did it thaw anyway (a lost reply)? The status decides.
            if time.monotonic() >= deadline:
                break
            try:
                with self._turn() as mine:
                    if not mine:
                        return
                    status = await agent.fsfreeze_status(timeout=self._attempt_timeout(deadline))
                    if status is FreezeStatus.THAWED:
                        # The thaw went through; its count was lost with the reply: it thawed
                        # (at least) what we froze.
                        st.thaw_confirmed(None, time.monotonic())
                        self._disarm_guard()
                        log.warning("thaw reply lost, but the guest is thawed")
                        return
            except AgentError as exc:
                self.agent_error = exc
            if not agent.is_connected:
                reconnected = await self._reconnect_agent(deadline)
                if reconnected is None:
                    return
                agent = reconnected
            await anyio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)

    def _attempt_timeout(self, deadline: float) -> float:
        """One thaw or status attempt may take the agent timeout, or half of what is left of
        the budget if that is longer, but never more than what is left."""
        remaining = deadline - time.monotonic()
        return max(0.001, min(remaining, max(self.t.agent, remaining / 2)))

    async def _reconnect_agent(self, deadline: float) -> GuestAgent | None:
        """Connect to the agent's address again (if we have one and its port is open), within
        ``deadline``; the connection replaced is closed at the end of the run."""
        address = self.orch._agent_address
        if address is None:
            return None
        # Invariant 2 holds for a reconnect too: never write to a port nobody reads.
        try:
            with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                port_open = await self.mon.agent_port_open(self.orch.agent_chardev)
        except (AgentError, MonitorError, TimeoutError):
            return None
        left = deadline - time.monotonic()
        if not port_open or left <= 0:
            return None
        try:
            agent = await GuestAgent.connect(address, timeout=min(self.t.agent, left))
        except AgentError:
            return None
        agent.timeout = self.t.agent
        if self.own_agent and self.agent is not None:
            self.stale_agents.append(self.agent)
        self.agent = agent
        self.own_agent = True
        return agent

    async def _close_agents(self) -> None:
        agents = list(self.stale_agents)
        if self.own_agent and self.agent is not None:
            agents.append(self.agent)
        self.stale_agents.clear()
        for agent in agents:
            await agent.close()

    # --- cleanup --------------------------------------------------------------------------

    async def _cleanup(self, exc: BaseException) -> None:
        """After a failure: detach the overlays and remove their files, unless the snapshot
        was taken (then they are the VM's active layers)."""
        t = time.monotonic()
        try:
            await run_to_completion(self._undo())
        finally:
            self.times[Phase.CLEANUP.value] = time.monotonic() - t
        log.info("snapshot failed (%s); record: %s", exc, self.record)

    async def _undo(self) -> None:
        st = self.state
        with anyio.CancelScope(shield=True):
            if st.transaction is TransactionState.SENT:
                # E.g. cancelled while the transaction was in flight: QEMU may have applied it.
                with contextlib.suppress(SnapshotError):
                    await self._learn_transaction()
            if st.snapshot_taken is not False:
                return  # the overlays are the VM's active layers now, or may be
            with anyio.move_on_after(self.t.command * 2):
                try:
                    existing: set[str] | None = set(await self._block_nodes())
                except MonitorError as exc:
                    log.warning("cleanup: cannot list the block nodes (%s)", exc)
                    existing = None
                for ov in reversed(self.overlays):
                    await self._remove_overlay(ov, existing)

    async def _remove_overlay(self, ov: _Overlay, existing: set[str] | None) -> None:
        """Detach the overlay's nodes that exist, then remove its file, but only once no node
        of ours can hold it open (``existing``: the node names QEMU has, None if unknown)."""
        st = self.state
        t = self.t.command
        for step, name in ((_Step.NODE, ov.node_name), (_Step.FILE_NODE, ov.file_node_name)):
            if ov.step < step or (existing is not None and name not in existing):
                continue  # never sent, or sent and not applied
            if name == ov.node_name:
                st.overlay_added(name)  # its reply may have been lost, but it is there
            try:
                await self.mon.execute("blockdev-del", {"node-name": name}, timeout=t)
            except MonitorError as exc:
                log.warning("cleanup: blockdev-del %s failed: %s", name, exc)
                return  # the file may still be open in QEMU: leave it
            if name == ov.node_name:
                st.overlay_removed(name)
        if ov.step >= _Step.FILE:
            try:
                os.unlink(ov.path)
            except FileNotFoundError:
                return  # the job never made it
            except (OSError, ValueError) as exc:
                log.warning("cleanup: cannot remove %s: %s", ov.path, exc)
                return
            st.file_removed(ov.path)
