"""Backups whose freeze holds only the transaction that starts them (``orch.backup``).

A backup is a snapshot's run (:mod:`qmpagent.operation`, the order :mod:`qmpagent.snapshot`
describes: the same preflight, freeze, thaw rules and state machine, :mod:`qmpagent.snapshot_state`)
with other steps, through the operation's hooks, in four places:

1. **Preflight** also checks each incremental's ``since`` (:mod:`qmpagent.backup_chain`) and the
   disk's dirty bitmap; a mismatch is a :class:`~qmpagent.BackupChainError` before anything
   is made.
2. **Prepare**: each target is created (``blockdev-create``: a qcow2 of the disk's virtual size;
   for an incremental, with the ``since`` file as its backing file) and attached
   (``blockdev-add``, ``backing: null``) before the freeze, like an overlay.
3. **The transaction** inside the window holds, per disk, ``blockdev-backup`` (``sync`` full,
   or incremental with the bitmap) and, where the disk has no such bitmap yet,
   ``block-dirty-bitmap-add`` (persistent): the bitmap starts at exactly the point in time the
   copy starts from. The guest is thawed as soon as the transaction returns; copy-before-write
   keeps the jobs' view at that point while the guest writes on.
4. **The copy** (phase ``copy``, after the thaw): the jobs are waited for, with progress
   (``on_progress``), bounded (``timeout``, and a stall limit), cancellable (cancel the task).

No dirty bit is ever lost: the bitmap is never cleared by hand. Every ``blockdev-backup``
given the bitmap uses QEMU's ``on-success`` bitmap mode (the default of ``sync:
"incremental"``, and given explicitly for a full backup of a disk that has the bitmap): at
the transaction QEMU freezes the bitmap and records new writes in a successor; when the job
succeeds, the successor *becomes* the bitmap (reset at the copy's point in time); when it fails
or is cancelled, the successor is merged back (nothing lost). So a failed or cancelled backup
leaves the bitmap as the last completed backup left it, plus every write since.

A failed backup (any phase, the copy included, or a cancellation of the caller) cancels and
dismisses its jobs, detaches its targets' nodes and removes their files, and removes a bitmap
its own transaction added; the guest is thawed on every path (or :class:`~qmpagent.ThawError`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anyio

from ._shield import run_to_completion
from .arguments import new_image_paths, overlay_path, quiesce_mode, seconds
from .backup_chain import (
    ChainRecord,
    bitmap_info,
    check_bitmap_name,
    check_since,
    clear_pending,
    default_state_dir,
    mark_pending,
    write_record,
)
from .block_jobs import JobProgress
from .durable import fsync_path
from .errors import (
    BackupError,
    JobError,
    MonitorCommandError,
    MonitorError,
    MonitorTimeout,
    QMPAgentError,
    UsageError,
)
from .jobs import query_job
from .journal import Entry
from .monitor import BlockNode, Monitor
from .operation import Operation, OrchestratorView, Overlay, Timeouts, all_or_none
from .snapshot_state import FreezeState, Phase, TransactionState
from .snapshot_types import PhaseCallback, Quiesce, SnapshotResult

__all__ = ["BackupProgressCallback", "BackupResult", "end_backup_job", "settle_backup_entry"]

log = logging.getLogger(__name__)

#: ``on_progress(disk, progress)``: called at every progress poll of a disk's copy job
#: (``progress`` a :class:`~qmpagent.JobProgress`: bytes ``current`` of ``total``); must not
#: block. An exception it raises is logged and ignored.
BackupProgressCallback = Callable[[str, JobProgress], None]

#: The speed (bytes a second) a backup job starts with, until the guest is thawed: QEMU's rate
#: limit lets its first chunk through, then it waits (a speed change wakes it at once).
_HELD: Final = 1

#: Seconds between two looks at a job's progress for a stall.
_STALL_CHECK: Final = 1.0


@dataclass(frozen=True)
class BackupResult(SnapshotResult):
    """What :meth:`SnapshotOrchestrator.backup` did: the fields of :class:`SnapshotResult`
    (``quiesced``, ``freeze_owner``, ``freeze_window``, ``reason``, ``frozen``, ``thawed``,
    ``timings``, ``warnings``, ...; ``overlays`` and ``files`` are empty: a backup adds no
    overlay) and these.

    Attributes:
        targets: disk (as given) -> the target file, complete.
        bytes_copied: disk -> bytes the copy job copied (its final progress): the whole
            virtual size for a full backup (clusters that read as zero are written as zero
            clusters, not data), the changed clusters for an incremental one.
        incremental: disk -> whether its backup is incremental.
        since: disk -> the backing file of an incremental target.
        bitmap: the dirty bitmap that tracks changes (None: not tracked).
        nodes: disk -> its block node name.
    """

    targets: dict[str, str] = field(default_factory=dict)
    bytes_copied: dict[str, int] = field(default_factory=dict)
    incremental: dict[str, bool] = field(default_factory=dict)
    since: dict[str, str] = field(default_factory=dict)
    bitmap: str | None = None
    nodes: dict[str, str] = field(default_factory=dict)


@dataclass
class Target(Overlay):
    """One disk's backup target (an :class:`Overlay` whose image is the target)."""

    key: str = ""  # the disk as the caller named it
    since: str | None = None  # an incremental's backing file
    job_id: str = ""
    add_bitmap: bool = False  # the transaction adds the bitmap (the disk has none)
    use_bitmap: bool = False  # blockdev-backup is given the bitmap (on-success)
    progress: JobProgress | None = None
    advanced_at: float = 0.0  # when its progress last moved
    copied: int | None = None  # its final progress, once concluded
    detached: bool = False  # its nodes were detached after success
    # How its job ended: True completed (the bitmap was reset), False failed or cancelled
    # (the bitmap got its bits back), None not known (or never started).
    job_ok: bool | None = None
    pending: bool = False  # its chain record is marked pending (by us)


def _fsync_all(files: list[str]) -> None:
    """Write each of ``files``, then each of their directories (once), to stable storage.

    A directory is opened as the kernel resolves the file's path (``dirname`` as written, not
    normalised: ``link/..`` is where the link leads). A directory that cannot be fsync'd by its
    filesystem (EINVAL) is not an error: the file's own fsync is what holds its data.

    Raises:
        OSError: naming the file or directory whose fsync failed.
    """
    seen: set[tuple[int, int]] = set()
    for path, is_dir in [(f, False) for f in files] + [(os.path.dirname(f), True) for f in files]:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open {path} to fsync it: {exc.strerror}") from exc
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            fsync_path(path, directory=is_dir)
        except OSError as exc:
            if is_dir and exc.errno == errno.EINVAL:
                continue
            raise OSError(exc.errno, f"fsync of {path} failed: {exc.strerror}") from exc


class BackupOperation(Operation):
    """One backup run: a snapshot's :class:`~qmpagent.operation.Operation` with the backup's
    steps (see the module docstring), through the operation's hooks. Made (and its arguments
    checked) by :func:`backup_operation`.

    A hook of its own, for :mod:`qmpagent.fleece`: :meth:`make_target`."""

    def __init__(
        self,
        orch: OrchestratorView,
        mode: Quiesce,
        freeze_timeout: float,
        on_phase: PhaseCallback | None,
        timeouts: Timeouts,
        *,
        since: dict[str, str],
        bitmap: str | None,
        state_dir: str,
        on_progress: BackupProgressCallback | None,
        progress_interval: float,
        copy_timeout: float | None,
        speed: int | None = None,
        durable: bool = True,
    ) -> None:
        super().__init__(orch, mode, freeze_timeout, on_phase, timeouts)
        self.speed = speed
        self.durable = durable
        self.since = since
        self.bitmap = bitmap
        self.state_dir = state_dir
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        self.copy_timeout = copy_timeout
        self.targets: list[Target] = []
        self.stage = "window"
        self.succeeded = False

    async def run_backup(self, targets: dict[str, str]) -> BackupResult:
        """Run the backup (see :meth:`SnapshotOrchestrator.backup`)."""
        result = await self.run(targets)
        assert isinstance(result, BackupResult)
        return result

    # --- preflight (a hook of Operation) ----------------------------------------------------

    async def preflight_vm(self, disks: dict[str, str]) -> None:
        await super().preflight_vm(disks)
        # The base made one Overlay per disk, in the order given: make them targets.
        for key, ov in zip(disks, self.overlays, strict=True):
            self.targets.append(self.make_target(key, ov))
        self.overlays = list(self.targets)

    def make_target(self, key: str, ov: Overlay) -> Target:
        """Hook (:mod:`qmpagent.fleece` overrides it): the :class:`Target` of the disk ``key``
        (as the caller named it) from the base preflight's overlay ``ov``, at preflight.
        Default: a backup target, its bitmap and ``since`` checked (UsageError,
        BackupChainError)."""
        base: BlockNode = ov.base
        since = self.since.get(key)
        t = Target(node=ov.node, path=ov.path, base=base, node_name=ov.node_name,
                    file_node_name=ov.file_node_name, key=key, since=since,
                    job_id=f"{ov.node_name}-backup")
        if self.bitmap is None:
            return t
        if base.driver != "qcow2":
            raise UsageError(
                f"disk {key!r} is a {base.driver} node: a persistent dirty bitmap needs qcow2 "
                "(pass bitmap=None for a full backup without change tracking)"
            )
        assert base.virtual_size is not None  # checked by the base preflight
        existing = bitmap_info(base.raw, self.bitmap)
        if since is not None:
            check_since(key, since, node_raw=base.raw, disk_file=base.filename,
                        virtual_size=base.virtual_size, bitmap=self.bitmap, state_dir=self.state_dir)
            t.use_bitmap = True
        elif existing is None:
            t.add_bitmap = True
        else:
            if existing.get("busy") is True:
                raise UsageError(f"the dirty bitmap {self.bitmap!r} of disk {key!r} is in use by "
                                 "another operation (a backup running?)")
            t.use_bitmap = True  # full, and the bitmap restarts with it (on success)
        return t

    # --- journal (hooks) --------------------------------------------------------------------

    def describe_entry(self, entry: Entry) -> None:
        # What recover needs to settle a backup whose process died: its jobs, its targets
        # (the overlays of the entry), the chain records it marked pending.
        entry.kind = "backup"
        entry.backup = {
            "bitmap": self.bitmap,
            "state_dir": self.state_dir,
            "targets": [{"node": t.node, "disk_file": t.base.filename, "job": t.job_id}
                        for t in self.targets],
        }

    def leaves_something(self) -> bool:
        st, rec = self.state, self.record
        if st.must_settle or st.freeze is FreezeState.THAW_FAILED:
            return True
        if st.transaction in (TransactionState.SENT, TransactionState.UNKNOWN):
            return True
        if self.succeeded:
            return False
        if set(rec.overlays_added) - set(rec.overlays_removed):
            return True
        if set(rec.files_created) - set(rec.files_removed):
            return True
        return any(t.step > 0 and t.path not in rec.files_removed and os.path.lexists(t.path)
                   for t in self.targets)

    # --- prepare (hooks) --------------------------------------------------------------------

    async def prepare(self) -> None:
        # Durably, before anything is made: a backup with the bitmap is under way, so no
        # incremental is taken since the last one until this one is settled.
        if self.bitmap is not None:
            for t in self.targets:
                assert t.base.virtual_size is not None
                try:
                    mark_pending(self.state_dir, t.base.filename, self.bitmap, t.path,
                                 t.base.virtual_size)
                except OSError as exc:
                    raise self.fail(f"cannot write the backup record in {self.state_dir}: {exc}",
                                     exc) from exc
                t.pending = True
        await super().prepare()

    def file_options(self, ov: Overlay) -> dict[str, Any]:
        # A target is written without QEMU's flushes (cache.no-flush): qcow2 flushes its file
        # to order metadata updates, many times a second (about 15% of the copy's time). A
        # partly written target is never a backup (a failed one is removed, a dead one by
        # recover), so ordering within it buys nothing; a complete one is made durable once,
        # after its nodes are closed, by _make_durable, whose errors fail the backup (the
        # flush of blockdev-del ignores them). (Fleecing images, fleece's, inherit this: a
        # temporary image needs no durability at all.)
        options = super().file_options(ov)
        options["cache"] = {"no-flush": True}
        return options

    def image_options(self, ov: Overlay) -> dict[str, Any]:
        assert isinstance(ov, Target)
        options: dict[str, Any] = {"driver": "qcow2", "file": ov.file_node_name,
                                   "size": ov.base.virtual_size}
        if ov.since is not None:
            # The restore reads unchanged clusters from the previous backup.
            options["backing-file"] = ov.since
            options["backing-fmt"] = "qcow2"
        return options

    # --- the transaction (hooks) ------------------------------------------------------------

    def actions(self) -> list[dict[str, Any]]:
        actions: list[dict[str, Any]] = []
        for t in self.targets:
            if t.add_bitmap:
                actions.append({"type": "block-dirty-bitmap-add", "data": {
                    "node": t.node, "name": self.bitmap, "persistent": True}})
            data: dict[str, Any] = {"job-id": t.job_id, "device": t.node, "target": t.node_name,
                                    "sync": "incremental" if t.since is not None else "full",
                                    "auto-dismiss": False}
            # Held to a crawl until the thaw (then set to ``speed``, or unlimited): the copy's
            # I/O would otherwise compete with the thaw for QEMU's main loop, in the window.
            data["speed"] = _HELD
            if t.use_bitmap:
                # on-success: a failed or cancelled job merges the writes it saw back into
                # the bitmap; a completed one leaves only the writes since its start.
                data["bitmap"] = self.bitmap
                data["bitmap-mode"] = "on-success"
            actions.append({"type": "blockdev-backup", "data": data})
        return actions

    async def applied(self, nodes: Mapping[str, BlockNode]) -> bool:
        # Atomic: the first job tells for all (auto-dismiss is off, so it is still listed).
        return await query_job(self.mon, self.targets[0].job_id) is not None

    # --- the copy (hook) --------------------------------------------------------------------

    async def after_window(self) -> None:
        # The agent is not needed any more: closed now, not after the copy.
        await self.release_agent()
        self.stage = "copy"
        with self.phase(Phase.COPY):
            try:
                for t in self.targets:
                    await self.mon.execute("block-job-set-speed", {
                        "device": t.job_id, "speed": self.speed or 0}, timeout=self.t.command)
                await all_or_none([self._copy(t) for t in self.targets])
                for t in self.targets:
                    await self._detach(t)
            except QMPAgentError as exc:
                raise self.fail(f"the copy failed: {exc}", exc) from exc
            except TimeoutError as exc:
                raise self.fail(f"the copy timed out: {exc}", exc) from exc
            if self.durable:
                try:
                    await self._make_durable()
                except OSError as exc:
                    raise self.fail(
                        f"the copy is complete but cannot be written to stable storage: {exc} "
                        "(durable=False, CLI --no-fsync, leaves it to the page cache instead)",
                        exc) from exc
        self._record_chains()
        self.succeeded = True

    async def _copy(self, t: Target) -> None:
        started = time.monotonic()
        t.advanced_at = started
        until = None if self.copy_timeout is None else started + self.copy_timeout
        stall = self.t.job

        def progress(p: JobProgress) -> None:
            if t.progress is None or p.current != t.progress.current:
                t.advanced_at = time.monotonic()
            t.progress = p
            if self.on_progress is not None:
                try:
                    self.on_progress(t.key, p)
                except Exception:
                    log.exception("on_progress callback failed (ignored)")

        async with self.mon.attach_job(t.job_id, on_progress=progress,
                                       progress_interval=self.progress_interval) as job:
            try:
                final = await self._wait(t, job, started, until, stall)
            except JobError:
                t.job_ok = False  # it concluded with an error (dismissed): the bits are back
                raise
            except BaseException:
                # Cancelled (or timed out) here: end the job ourselves, to learn how it ended.
                await run_to_completion(self._end(t))
                raise
        t.job_ok = True
        t.progress = final
        t.copied = final.current

    async def _end(self, t: Target) -> None:
        t.job_ok = await end_backup_job(self.mon, t.job_id, timeout=self.t.command)

    async def _wait(self, t: Target, job: Any, started: float, until: float | None,
                    stall: float) -> JobProgress:
        """Wait for the job with progress, bounded by ``until`` and by ``stall`` seconds
        without progress."""
        while True:
            now = time.monotonic()
            if until is not None and now >= until:
                raise MonitorTimeout(
                    f"the backup of {t.key!r} did not complete within {self.copy_timeout:g}s "
                    f"({self._done(t)}); it was cancelled"
                )
            if now - t.advanced_at > stall:
                raise MonitorTimeout(
                    f"the backup of {t.key!r} made no progress for {stall:g}s (job_timeout; "
                    f"{self._done(t)}); it was cancelled"
                )
            chunk = min(_STALL_CHECK, stall)
            if until is not None:
                chunk = min(chunk, max(0.001, until - now))
            try:
                progress: JobProgress = await job.wait_concluded(timeout=chunk)
                return progress
            except MonitorTimeout:
                continue

    @staticmethod
    def _done(t: Target) -> str:
        p = t.progress
        return f"{p.current} of {p.total} bytes copied" if p is not None else "no progress read"

    async def _detach(self, t: Target) -> None:
        """After success: the target's nodes are detached (the file is complete and kept)."""
        ct = self.t.command
        await self.mon.execute("blockdev-del", {"node-name": t.node_name}, timeout=ct)
        await self.mon.execute("blockdev-del", {"node-name": t.file_node_name}, timeout=ct)
        t.detached = True

    async def _make_durable(self) -> None:
        """After the targets are closed (QEMU wrote out its caches): their data, metadata and
        directory entries are written to stable storage (``fsync``), in a worker thread,
        within ``job_timeout`` seconds. A cancellation (or the timeout) returns at once; the
        thread finishes its fsync on its own (the failed backup then removes the files, which
        is safe while the thread still has one open).

        Raises:
            OSError: an ``fsync`` failed or did not finish in time (the backup may not be on
                stable storage).
        """
        limit = self.t.job
        with anyio.move_on_after(limit) as scope:
            await anyio.to_thread.run_sync(_fsync_all, [t.path for t in self.targets],
                                           abandon_on_cancel=True)
        if scope.cancelled_caught:
            raise OSError(errno.ETIMEDOUT, f"the fsync did not finish within {limit:g}s "
                          "(job_timeout)")

    def _record_chains(self) -> None:
        """The completed backups are now the ``since`` of the next incrementals."""
        if self.bitmap is None:
            return
        for t in self.targets:
            assert t.base.virtual_size is not None
            try:
                st = os.stat(t.path)
                write_record(self.state_dir, ChainRecord(
                    disk_file=t.base.filename, bitmap=self.bitmap, target=t.path,
                    dev=st.st_dev, ino=st.st_ino, virtual_size=t.base.virtual_size))
            except OSError as exc:
                self.warnings.append(
                    f"cannot record {t.path} as the last backup of {t.key!r} in {self.state_dir} "
                    f"({exc}): the next backup of it must be a full one"
                )
                log.warning("%s", self.warnings[-1])

    # --- failure (hooks) --------------------------------------------------------------------

    #: The snapshot's words for what its transaction did, and a backup's.
    _WORDS: Final = (
        ("the snapshot was taken after all but is not guaranteed quiesced: the VM now runs on "
         "the overlays", "the backup was started after all but is not guaranteed quiesced: it "
         "is cancelled and its targets removed"),
        ("the snapshot was taken but is not guaranteed quiesced: the VM now runs on the overlays",
         "the backup was started but is not guaranteed quiesced: it is cancelled and its "
         "targets removed"),
        ("no snapshot was taken", "no backup was started"),
    )

    def fail(self, message: str, cause: BaseException | None = None) -> BackupError:
        for snapshot_words, backup_words in self._WORDS:
            message = message.replace(snapshot_words, backup_words)
        err = BackupError(message, self.record, stage=self.stage)
        err.__cause__ = cause
        return err

    async def undo(self) -> None:
        """After a failure: cancel and dismiss the jobs, remove a bitmap our transaction added,
        detach the targets and remove their files (whatever the transaction did: a backup's
        targets are never the VM's)."""
        st = self.state
        limit = self.t.command
        with anyio.CancelScope(shield=True):
            if st.transaction is TransactionState.SENT:
                # E.g. cancelled while it was in flight: QEMU may have started the jobs.
                try:
                    with anyio.fail_after(limit):
                        applied = await self.applied({})
                    st.transaction_outcome(
                        TransactionState.APPLIED if applied else TransactionState.NOT_APPLIED)
                except (TimeoutError, MonitorError) as exc:
                    log.warning("cleanup: cannot learn whether the backup started (%s)", exc)
                    st.transaction_outcome(TransactionState.UNKNOWN)
            with anyio.move_on_after(limit * 4):
                if st.transaction is not TransactionState.NOT_SENT:
                    for t in self.targets:
                        if t.job_ok is None:
                            # A job of ours that still exists: cancelled (on-success: its
                            # bitmap gets the writes it saw back) and dismissed.
                            await self._end(t)
                if st.snapshot_taken:
                    await self._remove_added_bitmaps()
                self._clear_pending()
                try:
                    existing: set[str] | None = set(await self.block_nodes())
                except MonitorError as exc:
                    log.warning("cleanup: cannot list the block nodes (%s)", exc)
                    existing = None
                for t in reversed(self.targets):
                    if not t.detached:
                        await self.remove_overlay(t, existing)
                    else:
                        self.unlink_target(t)

    def _clear_pending(self) -> None:
        """After a failure: a target whose job did not complete (or never started) lost no
        bit of the bitmap, so the last completed backup is the ``since`` again. One whose
        job completed (the bitmap was reset) or may have stays pending: the next incremental
        is refused, a full backup restarts the chain."""
        started = self.state.transaction not in (TransactionState.NOT_SENT,
                                                  TransactionState.NOT_APPLIED)
        for t in self.targets:
            if not t.pending or self.bitmap is None:
                continue
            if started and t.job_ok is not False:
                self.warnings.append(
                    f"the backup job of {t.key!r} {'completed' if t.job_ok else 'may have completed'} "
                    "(resetting the bitmap) before the backup failed: the next backup of it must be full"
                )
                log.warning("%s", self.warnings[-1])
                continue
            try:
                clear_pending(self.state_dir, t.base.filename, self.bitmap, t.path)
                t.pending = False
            except OSError as exc:
                log.warning("cleanup: cannot clear the backup record of %s: %s", t.key, exc)

    def unlink_target(self, t: Target) -> None:
        """Remove the file of a target (a complete backup that failed later, or a fleecing
        image, which nothing needs once its export ended). Never raises (an error is logged)."""
        try:
            os.unlink(t.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cleanup: cannot remove %s: %s", t.path, exc)
            return
        self.state.file_removed(t.path)

    async def _remove_added_bitmaps(self) -> None:
        for t in self.targets:
            if not t.add_bitmap:
                continue
            try:
                await self.mon.execute("block-dirty-bitmap-remove",
                                       {"node": t.node, "name": self.bitmap}, timeout=self.t.command)
            except MonitorError as exc:
                log.warning("cleanup: cannot remove the bitmap %s of %s: %s", self.bitmap, t.node, exc)

    # --- result (hook) ----------------------------------------------------------------------

    def result(self) -> BackupResult:
        base = super().result()
        # Every field of the snapshot's result (guarded, warnings, ...), but no overlays.
        common = {f.name: getattr(base, f.name) for f in dataclasses.fields(SnapshotResult)}
        common.update(overlays={}, files={})
        return BackupResult(
            **common,
            targets={t.key: t.path for t in self.targets},
            bytes_copied={t.key: t.copied or 0 for t in self.targets},
            incremental={t.key: t.since is not None for t in self.targets},
            since={t.key: t.since for t in self.targets if t.since is not None},
            bitmap=self.bitmap,
            nodes={t.key: t.node for t in self.targets},
        )


async def end_backup_job(mon: Monitor, job_id: str, *, timeout: float) -> bool | None:
    """End a backup job of ours (cancel it unless it concluded), learn how it ended, dismiss
    it; within ``timeout`` seconds. Never raises a MonitorError (what went wrong is logged).

    Returns:
        True: it completed (its bitmap, if any, was reset); False: it failed or was cancelled
        (QEMU merged the bitmap's new writes back: nothing lost); None: there is no such job
        (any more), or its end could not be learnt.
    """
    try:
        with anyio.fail_after(timeout):
            info = await query_job(mon, job_id)
            if info is None:
                return None
            if info.get("status") not in ("concluded", "null"):
                log.info("cancelling backup job %s (status %s)", job_id, info.get("status"))
                try:
                    await mon.execute("job-cancel", {"id": job_id}, timeout=None)
                except MonitorCommandError as exc:  # it concluded meanwhile?
                    log.debug("job-cancel %s: %s", job_id, exc)
                while info is not None and info.get("status") != "concluded":
                    await anyio.sleep(0.02)
                    info = await query_job(mon, job_id)
                if info is None:
                    return None
            ok = not info.get("error")
            await mon.execute("job-dismiss", {"id": job_id}, timeout=None)
            return ok
    except (MonitorError, TimeoutError) as exc:
        log.warning("could not end backup job %s: %r", job_id, exc)
        return None


async def settle_backup_entry(mon: Monitor, entry: Entry, *, timeout: float) -> list[str]:
    """Recovery's part for a dead backup (journal ``kind`` ``"backup"``), after its freeze was
    settled: its copy jobs ended (cancelled: their bitmaps keep every bit) and dismissed, and
    the chain records it marked pending cleared where its job did not complete. (Its target
    nodes and files are then removed like a snapshot's overlays that were not applied: a
    backup's targets are never the VM's.)

    Returns:
        What could not be settled, one sentence each.
    """
    info = entry.backup or {}
    bitmap, state_dir = info.get("bitmap"), info.get("state_dir")
    started = entry.transaction not in ("not-sent", "not-applied")
    unresolved: list[str] = []
    for rec, target in zip(info.get("targets", []), entry.overlays, strict=False):
        ok = await end_backup_job(mon, rec["job"], timeout=timeout)
        if bitmap is None or not isinstance(state_dir, str):
            continue
        if started and ok is not False:
            log.warning("recover: the backup into %s %s; its chain record stays pending (the "
                        "next backup of that disk must be full)", target.path,
                        "completed" if ok else "may have completed")
            continue
        try:
            clear_pending(state_dir, rec["disk_file"], bitmap, target.path)
        except OSError as exc:
            unresolved.append(f"operation {entry.op}: cannot clear the backup record in "
                              f"{state_dir}: {exc}")
    return unresolved


def backup_operation(
    orch: OrchestratorView,
    targets: Mapping[str, str | os.PathLike[str]],
    *,
    since: Mapping[str, str | os.PathLike[str]] | None,
    quiesce: Quiesce | str,
    freeze_timeout: float,
    bitmap: str | None,
    on_phase: PhaseCallback | None,
    on_progress: BackupProgressCallback | None,
    progress_interval: float,
    timeout: float | None,
    state_dir: str | os.PathLike[str] | None,
    timeouts: Timeouts,
    speed: int | None = None,
    durable: bool = True,
) -> tuple[BackupOperation, dict[str, str]]:
    """Check the arguments of :meth:`SnapshotOrchestrator.backup` (before anything is sent)
    and make its operation; returns it and the targets' paths.

    Raises:
        UsageError: see :meth:`SnapshotOrchestrator.backup`.
    """
    mode = quiesce_mode(quiesce)
    window = seconds("freeze_timeout", freeze_timeout)
    interval = seconds("progress_interval", progress_interval)
    copy_timeout = None if timeout is None else seconds("timeout", timeout)
    name = check_bitmap_name(bitmap)
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, int) or speed <= 0):
        raise UsageError(f"speed must be a positive number of bytes per second or None, not {speed!r}")
    if on_progress is not None and not callable(on_progress):
        raise UsageError("on_progress must be callable or None")
    if not isinstance(durable, bool):
        raise UsageError(f"durable must be True or False, not {durable!r}")
    paths = new_image_paths(
        targets, empty="targets must be a non-empty mapping of disk to target path",
        entry="target", kind="target")
    chosen: dict[str, str] = {}
    if since is not None:
        if not isinstance(since, Mapping):
            raise UsageError("since must be a mapping of disk to the previous backup, or None")
        if name is None and since:
            raise UsageError(
                "an incremental backup (since=) needs a dirty bitmap: bitmap=None tracks no changes"
            )
        for key, path in since.items():
            if not isinstance(key, str) or key not in paths:
                raise UsageError(f"since names {key!r}, which is not one of the targets' disks")
            chosen[key] = overlay_path(key, path)
    if state_dir is not None and not isinstance(state_dir, (str, os.PathLike)):
        raise UsageError(f"state_dir must be a path or None, not {state_dir!r}")
    directory = os.fspath(state_dir) if state_dir is not None else default_state_dir()
    if not isinstance(directory, str):
        raise UsageError("state_dir must be a text path")
    op = BackupOperation(
        orch, mode, window, on_phase, timeouts, since=chosen, bitmap=name, state_dir=directory,
        on_progress=on_progress, progress_interval=interval, copy_timeout=copy_timeout,
        speed=speed, durable=durable,
    )
    return op, paths
