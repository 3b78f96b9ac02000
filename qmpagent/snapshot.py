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
import os
from collections.abc import Mapping, Sequence

from .agent import AgentAddress, GuestAgent, check_address
from .arguments import new_image_paths, quiesce_mode, seconds
from .backup import BackupProgressCallback, BackupResult, backup_operation
from .block_jobs import ProgressCallback
from .chain import ChainNode, block_chain
from .commit import CommitResult, commit_disk
from .errors import UsageError
from .fleece import Fleece, fleece
from .journal import Journal
from .monitor import Monitor
from .mountpoints import check_mountpoints
from .operation import FREEZE_COMMANDS as FREEZE_COMMANDS
from .operation import Operation, Timeouts
from .snapshot_state import FreezeOwner, FreezeState, Phase, TransactionState
from .snapshot_state import SnapshotState as SnapshotState
from .snapshot_types import PhaseCallback, PhaseTimings, Quiesce, SnapshotResult

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
        self.agent_timeout = seconds("agent_timeout", agent_timeout)
        self.thaw_timeout = seconds("thaw_timeout", thaw_timeout)
        self.command_timeout = seconds("command_timeout", command_timeout)
        self.job_timeout = seconds("job_timeout", job_timeout)
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

    def _timeouts(self) -> Timeouts:
        # Again at each run: the attributes are public, and may have been changed since.
        return Timeouts(
            agent=seconds("agent_timeout", self.agent_timeout),
            thaw=seconds("thaw_timeout", self.thaw_timeout),
            command=seconds("command_timeout", self.command_timeout),
            job=seconds("job_timeout", self.job_timeout),
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
        mode = quiesce_mode(quiesce)
        timeout = seconds("freeze_timeout", freeze_timeout)
        chosen = check_mountpoints(mountpoints)
        if chosen is not None and mode is Quiesce.OFF:
            raise UsageError('mountpoints= chooses what to freeze: it makes no sense with quiesce="off"')
        timeouts = self._timeouts()
        paths = new_image_paths(
            disks, empty="disks must be a non-empty mapping of node name to overlay path",
            entry="disk", kind="overlay")
        async with self._busy:
            op = Operation(_View(self), mode, timeout, on_phase, timeouts)
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
        ready = self._timeouts().job if timeout is None else seconds("timeout", timeout)
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
        op, paths = backup_operation(
            _View(self), targets, since=since, quiesce=quiesce, freeze_timeout=freeze_timeout,
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
        return fleece(_View(self), self._busy, images, socket=socket, quiesce=quiesce,
                      freeze_timeout=freeze_timeout, on_phase=on_phase)


class _View:
    """The orchestrator as its operations see it (an :class:`~qmpagent.operation.OrchestratorView`):
    each read goes to the orchestrator when it is made."""

    def __init__(self, orch: SnapshotOrchestrator) -> None:
        self._orch = orch

    @property
    def monitor(self) -> Monitor:
        return self._orch.monitor

    @property
    def agent(self) -> GuestAgent | None:
        return self._orch._agent

    @property
    def agent_address(self) -> AgentAddress | None:
        return self._orch._agent_address

    @property
    def has_agent(self) -> bool:
        return self._orch.has_agent

    @property
    def agent_chardev(self) -> str | None:
        return self._orch.agent_chardev

    @property
    def journal(self) -> Journal:
        return self._orch.journal

    @property
    def guard(self) -> bool:
        return self._orch.guard

    def timeouts(self) -> Timeouts:
        return self._orch._timeouts()
