"""Merging a disk's overlays back: :func:`commit_disk` (behind
:meth:`~qmpagent.SnapshotOrchestrator.commit`) and :class:`CommitResult`.

An active commit (docs/design.md section 4): ``block-commit`` of the active layer into a node
below it, a job that copies until it is *ready*, then ``block-job-complete`` pivots the device
to the base, the job concludes and is dismissed; the merged nodes (qcow2 node and file node,
top first) stay attached until ``blockdev-del``, and their files on disk until deleted.

What can go wrong, and where the VM is then:

* not ready in time (the guest writes faster than the job copies), a job cancelled from
  outside, our caller cancelled, the job failed: the job is cancelled (if it still runs) and
  dismissed, and the VM runs on its active layer as before (only the base's content below it
  changed, which the layers above it hide);
* the pivot fails: the VM runs on the active layer (read back from QEMU, never assumed);
* the pivot succeeds and removing the merged nodes or files fails: the VM runs on the base,
  the nodes stay attached, and the error lists them.

Our jobs are named ``qmpagent-commit-<token>-<device>``. A later commit of the same disk
finishes what an interrupted one left: a job of ours still running or ready is completed, a
concluded one dismissed, and merged nodes of ours left attached after a pivot are removed
(then nothing more is merged: that commit is finished, not repeated one layer deeper).

Each commit is journalled like a snapshot (:mod:`qmpagent.journal`, ``kind: "commit"``): before
``block-commit`` is sent, the entry names the job, the device, the base and the nodes and files
to be removed; it is removed when the commit finished or left nothing to settle. Whatever a
process that died mid-commit left, :func:`qmpagent.recover` settles it with
:func:`settle_commit_entry`: a job of ours still in QEMU is completed (or, not ready within the
timeout, cancelled), and once the device runs on the base the merged nodes are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ._shield import run_to_completion
from .block_jobs import ENDED_STATUSES, ProgressCallback
from .chain import BlockGraph, ChainNode, read_block_graph, resolve_device, walk_chain
from .errors import (
    CommitError,
    CommitRecord,
    CommitTimeout,
    JobError,
    JobReadyTimeout,
    JournalError,
    MonitorError,
    MonitorProtocolError,
    UsageError,
)
from .journal import Entry, Journal, OverlayRecord, identify_vm, new_op_id, process_start_time

if TYPE_CHECKING:
    from .block_jobs import BlockJob
    from .monitor import Monitor

__all__ = ["JOB_PREFIX", "CommitResult", "commit_disk", "remove_merged", "settle_commit_entry"]

log = logging.getLogger(__name__)

#: The start of the id of every commit job qmpagent starts.
JOB_PREFIX: Final = "qmpagent-commit-"
_JOB_ID: Final = re.compile(re.escape(JOB_PREFIX) + r"[0-9a-f]{8}-(?P<device>.+)\Z")
# Our snapshots' overlay nodes (snapshot.py names them qa<token>o<i>, file nodes qa<token>f<i>).
_OUR_OVERLAY: Final = re.compile(r"qa[0-9a-f]{8}[of]\d+\Z")


@dataclass(frozen=True)
class CommitResult:
    """What :meth:`~qmpagent.SnapshotOrchestrator.commit` did.

    Attributes:
        active_node: the node the device now runs on (the base).
        removed_nodes: the merged nodes detached (qcow2 nodes and their file nodes, top first).
        removed_files: the merged images' files deleted (only with ``delete_files``).
        device: the device whose disk was committed.
        top: the active layer the commit merged from.
        merged_files: the files of the merged images (deleted or not).
        job_id: the commit job's id (None when only leftovers were removed).
        resumed: this call finished a commit an interrupted one had started.
        duration: seconds the call took.
    """

    active_node: str
    removed_nodes: list[str]
    removed_files: list[str]
    device: str | None = None
    top: str | None = None
    merged_files: list[str] = field(default_factory=list)
    job_id: str | None = None
    resumed: bool = False
    duration: float = 0.0


async def remove_merged(
    mon: Monitor, layers: list[tuple[str, str | None, str]], *, delete_files: bool, timeout: float,
) -> tuple[list[str], list[str], list[str], list[str]]:
    """blockdev-del each merged layer's node, then its file node, top first (a node of QEMU's
    own naming goes with its parent); then, if asked, their files, once no node has them open.

    Args:
        layers: ``(node, file node, file)`` of each merged image, top first.

    Returns:
        The nodes removed, the files removed, the layers' nodes still attached, and what failed.

    Raises:
        MonitorError: the nodes cannot be listed afterwards.
    """
    removed: list[str] = []
    failures: list[str] = []
    present = {n.node_name for n in await mon.named_block_nodes()}
    for node, file_node, _ in layers:
        for name in (node, file_node):
            if name is None or name.startswith("#") or name not in present:
                continue
            try:
                await mon.execute("blockdev-del", {"node-name": name}, timeout=timeout)
            except MonitorError as exc:
                failures.append(f"blockdev-del {name}: {exc}")
                break  # the file node stays while its qcow2 node does
            removed.append(name)
    still = {n.node_name: n for n in await mon.named_block_nodes()}
    left = [node for node, _, _ in layers if node in still]
    files: list[str] = []
    if delete_files:
        open_files = {n.filename for n in still.values()}
        for _, _, path in layers:
            if path in open_files or path in files or not os.path.isabs(path):
                continue  # still open in QEMU, or not a local file: left alone
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                failures.append(f"cannot delete {path}: {exc}")
                continue
            files.append(path)
    return removed, files, left, failures


def _device_key(device_id: str | None) -> str | None:
    return device_id if device_id and re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", device_id) else None


def is_our_job(job_id: object, device: str | None = None) -> bool:
    """Whether ``job_id`` names a commit job of ours (for ``device``, if given). Raises nothing."""
    if not isinstance(job_id, str):
        return False
    m = _JOB_ID.match(job_id)
    return m is not None and (device is None or m.group("device") == device)


class _Commit:
    """One run of :func:`commit_disk`: the record it keeps, and its steps."""

    def __init__(self, mon: Monitor, *, ready_timeout: float | None, command_timeout: float,
                 job_timeout: float, delete_files: bool, speed: int | None,
                 on_progress: ProgressCallback | None, progress_interval: float,
                 journal: Journal | None = None) -> None:
        self.mon = mon
        self.journal = journal
        self.entry: Entry | None = None
        self.ready_timeout = ready_timeout
        self.ct = command_timeout
        self.jt = job_timeout
        self.delete_files = delete_files
        self.speed = speed
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        self.record = CommitRecord()
        self.started = time.monotonic()
        self.resumed = False
        self.merged: list[ChainNode] = []

    def fail(self, message: str, cause: BaseException | None = None,
             kind: type[CommitError] = CommitError) -> CommitError:
        rec = self.record
        where = {
            True: f"the VM runs on the base {rec.base!r}",
            False: f"the VM still runs on {rec.active_node or rec.top!r}",
            None: "where the VM runs could not be read",
        }[rec.pivoted]
        left = f"; merged nodes still attached: {', '.join(rec.left_nodes)}" if rec.left_nodes else ""
        err = kind(f"commit failed in {rec.stage}: {message} ({where}{left})", rec)
        err.__cause__ = cause
        return err

    # --- reading QEMU ----------------------------------------------------------------------

    async def state(self, start: str) -> tuple[dict[str, Any], BlockGraph | None, list[ChainNode]]:
        nodes = {n.node_name: n for n in await self.mon.named_block_nodes()}
        graph = await read_block_graph(self.mon)
        return nodes, graph, walk_chain(start, nodes, graph)

    async def active_of(self, device: str) -> str | None:
        for dev in await self.mon.block_devices():
            if device in (dev.qdev_id, dev.qdev, dev.device):
                return dev.node_name
        return None

    async def our_jobs(self, device: str) -> list[dict[str, Any]]:
        jobs = await self.mon.execute("query-jobs", timeout=self.ct)
        if not isinstance(jobs, list):
            raise MonitorProtocolError(f"query-jobs: expected a list, got {type(jobs).__name__}")
        return [j for j in jobs if isinstance(j, dict) and is_our_job(j.get("id"), device)]

    # --- the run ---------------------------------------------------------------------------

    async def run(self, disk: str, base: str | None) -> CommitResult:
        rec = self.record
        dev, top = await resolve_device(self.mon, disk)
        if dev is None:
            raise UsageError(
                f"{disk!r} is not a device or the active layer of one: commit merges a device's "
                "active layer down; name the device"
            )
        device = dev.qdev_id or dev.device or dev.qdev
        assert device is not None
        rec.device, rec.top, rec.active_node = device, top, top
        key = _device_key(dev.qdev_id or dev.device)
        jobs = await self.our_jobs(key) if key is not None else []
        for found in jobs:
            # An interrupted commit of ours: finish it before anything else.
            finished = await self.resume(found, device, base)
            if finished is not None:
                return finished
        top = await self.active_of(device) or top
        rec.top = rec.active_node = top
        nodes, graph, chain = await self.state(top)
        leftovers = self.leftovers(chain[0].node_name, nodes, graph, jobs)
        if leftovers:
            return await self.remove_leftovers(device, chain[0], leftovers)
        if len(chain) < 2:
            raise UsageError(f"nothing to commit: {top!r} has no backing image")
        base_node = self.pick_base(chain, base)
        rec.base = base_node.node_name
        self.merged = chain[:base_node.depth]
        job_id = f"{JOB_PREFIX}{secrets.token_hex(4)}-{key or 'disk'}"
        args: dict[str, object] = {
            "job-id": job_id, "device": top, "base-node": base_node.node_name,
            "auto-dismiss": False,
        }
        if self.speed:
            args["speed"] = self.speed
        rec.stage = "start"
        await self.journal_start(device, job_id)
        job = self.mon.block_job("block-commit", args, on_progress=self.on_progress,
                                 progress_interval=self.progress_interval)
        try:
            try:
                async with job:
                    rec.job_id = job_id
                    await self.ready_and_pivot(job)
            except MonitorError as exc:
                if rec.stage == "start":
                    raise self.fail(f"QEMU refused the commit: {exc}", exc) from exc
                raise
            result = await self.finish(device)
        except BaseException as exc:
            if (isinstance(exc, MonitorError) and rec.stage in ("pivot", "verify")
                    and rec.pivoted is not True):
                rec.pivoted = None  # QEMU stopped answering once the completion was sent
            # Keep the entry only if something is left for recover (nodes, or a pivot whose
            # outcome is unknown); otherwise the VM runs where it ran, and nothing is left.
            self.journal_end(keep=bool(rec.left_nodes) or rec.pivoted is None)
            raise
        self.journal_end(keep=False)
        return result

    # --- the journal -----------------------------------------------------------------------

    async def journal_start(self, device: str, job_id: str) -> None:
        """Write the commit's entry before ``block-commit`` is sent. A journal that cannot be
        written is logged, not fatal: a later commit of the disk finishes what a dead one left
        even without it."""
        if self.journal is None:
            return
        rec = self.record
        assert rec.base is not None
        entry = Entry(
            op=new_op_id(), vm=await identify_vm(self.mon, timeout=self.ct),
            owner_pid=os.getpid(), owner_start=process_start_time(os.getpid()), kind="commit",
            overlays=[OverlayRecord(disk=device, node=n.node_name, file_node=n.file_node_name or "",
                                    path=n.filename) for n in self.merged],
            commit={"job": job_id, "device": device, "base": rec.base,
                    "delete_files": self.delete_files},
        )
        try:
            self.journal.write(entry)
        except JournalError as exc:
            log.warning("commit not journalled: %s", exc)
            return
        self.entry = entry

    def journal_end(self, *, keep: bool) -> None:
        entry, self.entry = self.entry, None
        if entry is None or self.journal is None or keep:
            return
        try:
            self.journal.remove(entry.op)
        except JournalError as exc:
            log.warning("cannot remove the commit's journal entry: %s", exc)

    async def forget_settled(self, device: str) -> None:
        """Remove the journal entries of earlier commits of ``device`` that left nothing (their
        job gone, none of their merged nodes attached): this call finished them. Whether their
        process lives does not matter: a commit that still runs has its merged nodes attached
        until its very end."""
        if self.journal is None:
            return
        try:
            jobs = {j.get("id") for j in await self.mon.execute("query-jobs", timeout=self.ct)
                    if isinstance(j, dict)}
            nodes = {n.node_name for n in await self.mon.named_block_nodes()}
        except MonitorError:
            return
        for item in self.journal.scan():
            if (isinstance(item, Entry) and item.kind == "commit" and item.commit is not None
                    and item.commit.get("device") == device
                    and item.commit.get("job") not in jobs
                    and not any(o.node in nodes for o in item.overlays)):
                with contextlib.suppress(JournalError):
                    self.journal.remove(item.op)

    def pick_base(self, chain: list[ChainNode], base: str | None) -> ChainNode:
        if base is None:
            return chain[1]  # never deeper by default: bases are often shared
        if not isinstance(base, str):
            raise UsageError(f"base must be a node name, not {base!r}")
        for node in chain[1:]:
            if base in (node.node_name, node.filename):
                return node
        raise UsageError(
            f"{base!r} is not below {chain[0].node_name!r} in its chain "
            f"({' -> '.join(n.node_name for n in chain)})"
        )

    async def ready_and_pivot(self, job: BlockJob) -> None:
        """READY (bounded), then the pivot, which runs to its end once sent."""
        rec = self.record
        rec.stage = "ready"
        try:
            await job.wait_ready(timeout=self.ready_timeout)
        except JobReadyTimeout as exc:
            rec.active_node = await self._read_active()
            raise self.fail(str(exc), exc, CommitTimeout) from exc
        except JobError as exc:
            rec.active_node = await self._read_active()
            raise self.fail(str(exc), exc) from exc
        rec.stage = "pivot"
        # Once the completion is sent, the pivot happens or not in QEMU whatever we do: a
        # cancellation of the caller must not leave the job and the nodes half-handled.
        await run_to_completion(self._complete(job))

    async def _complete(self, job: BlockJob) -> None:
        rec = self.record
        try:
            await job.complete(timeout=self.jt)
        except (JobError, MonitorError) as exc:
            rec.active_node = await self._read_active()
            rec.pivoted = rec.active_node == rec.base if rec.active_node is not None else None
            if rec.pivoted:
                log.warning("the completion reported %s, but the device runs on the base", exc)
                return
            raise self.fail(f"the pivot failed: {exc}", exc) from exc

    async def _read_active(self) -> str | None:
        assert self.record.device is not None
        try:
            return await self.active_of(self.record.device)
        except MonitorError:
            return None

    async def finish(self, device: str) -> CommitResult:
        """Verify the device runs on the base, then remove the merged nodes (and files)."""
        rec = self.record
        rec.stage = "verify"
        try:
            active = await self.active_of(device)
        except MonitorError as exc:
            rec.pivoted = None
            raise self.fail(f"cannot read the device's node: {exc}", exc) from exc
        rec.active_node = active
        rec.pivoted = active == rec.base
        if not rec.pivoted:
            raise self.fail(f"the job concluded, but the device runs on {active!r}, not the base")
        rec.stage = "cleanup"
        await run_to_completion(self.remove(self.merged))
        if self.resumed:
            await self.forget_settled(device)
        return self.result(device)

    def result(self, device: str) -> CommitResult:
        rec = self.record
        assert rec.active_node is not None
        return CommitResult(
            active_node=rec.active_node, removed_nodes=list(rec.removed_nodes),
            removed_files=list(rec.removed_files), device=device, top=rec.top,
            merged_files=[n.filename for n in self.merged], job_id=rec.job_id,
            resumed=self.resumed, duration=time.monotonic() - self.started,
        )

    async def remove(self, merged: list[ChainNode]) -> None:
        """Remove the merged nodes (and files, if asked); CommitError with what is left."""
        rec = self.record
        layers = [(n.node_name, n.file_node_name, n.filename) for n in merged]
        try:
            removed, files, left, failures = await remove_merged(
                self.mon, layers, delete_files=self.delete_files, timeout=self.ct)
        except MonitorError as exc:
            rec.left_nodes = [n.node_name for n in merged]
            raise self.fail(f"cannot list the block nodes after removing: {exc}", exc) from exc
        rec.removed_nodes.extend(removed)
        rec.removed_files.extend(files)
        rec.left_nodes = left
        if failures or left:
            raise self.fail("; ".join(failures) or "merged nodes are still attached")

    # --- finishing an interrupted commit ---------------------------------------------------

    async def resume(self, info: Mapping[str, Any], device: str, base: str | None) -> CommitResult | None:
        """Finish a commit job of ours left by an interrupted run: complete it if it is (or
        becomes) ready, dismiss it if it concluded. None: nothing was merged by it (failed or
        cancelled), go on with a fresh commit."""
        rec = self.record
        job_id = str(info["id"])
        log.info("found commit job %s of ours (status %s): finishing it", job_id, info.get("status"))
        self.resumed = True
        rec.job_id = job_id
        top = await self.active_of(device)
        if top is None:
            raise UsageError(f"device {device!r} has no medium")
        rec.top = rec.active_node = top
        _, graph, chain = await self.state(top)
        target = (graph.job_children.get(job_id, {}).get("target") if graph is not None else None)
        if target is not None and base is not None and base != target:
            raise self.fail(f"a commit of ours into {target!r} is under way; finish it first "
                            f"(commit without --base, or with {target!r})")
        names = [n.node_name for n in chain]
        base_name = target or base or (names[1] if len(names) > 1 else None)
        if base_name in names[1:]:
            rec.base = base_name
            self.merged = chain[:names.index(base_name)]
        job = self.mon.attach_job(job_id, on_progress=self.on_progress,
                                  progress_interval=self.progress_interval)
        async with job:
            if job.status in ENDED_STATUSES:
                if job.status == "concluded":
                    await job.dismiss()
                else:
                    await job.cancel(timeout=self.jt)
                # Failed or cancelled: it merged nothing for good. Concluded fine: it pivoted
                # iff it left the merged nodes (it was not dismissed, so they were not
                # removed yet): run() finds them next. Either way, this job is done.
                self.resumed = False
                rec.job_id = None
                return None
            if rec.base is None:
                raise self.fail(f"cannot tell which node commit job {job_id} merges into")
            # The dead run's speed limit is not this call's: this call's applies (none: none).
            try:
                await job.set_speed(self.speed or 0)
            except MonitorError as exc:
                log.info("cannot change the speed of job %s: %s", job_id, exc)
            await self.ready_and_pivot(job)
        return await self.finish(device)

    def leftovers(self, active: str, nodes: Mapping[str, Any], graph: BlockGraph | None,
                  jobs: list[dict[str, Any]]) -> list[ChainNode]:
        """Merged nodes a pivoted commit of ours left attached: nodes nothing uses whose
        backing chain leads to the device's active node, down to it (top first)."""
        if graph is None:
            return []
        found: list[ChainNode] = []
        for name in nodes:
            if name in graph.parents or name == active:
                continue  # used by something (or the disk itself): not a leftover
            try:
                chain = walk_chain(name, nodes, graph)
            except (UsageError, MonitorProtocolError):
                continue
            below = [n.node_name for n in chain]
            if active not in below[1:]:
                continue
            layers = chain[:below.index(active)]
            ours = bool(jobs) or all(_OUR_OVERLAY.match(n.node_name) for n in layers)
            if ours:
                found.extend(layers)
        return found

    async def remove_leftovers(self, device: str, active: ChainNode, left: list[ChainNode]) -> CommitResult:
        rec = self.record
        log.info("removing nodes an interrupted commit left: %s", ", ".join(n.node_name for n in left))
        self.resumed = True
        rec.base = rec.active_node = active.node_name
        rec.pivoted = True
        rec.stage = "cleanup"
        self.merged = left
        await run_to_completion(self.remove(left))
        await self.forget_settled(device)
        return self.result(device)


async def commit_disk(
    mon: Monitor,
    disk: str,
    *,
    base: str | None,
    delete_files: bool,
    timeout: float,
    command_timeout: float,
    job_timeout: float,
    speed: int | None = None,
    on_progress: ProgressCallback | None = None,
    progress_interval: float = 1.0,
    journal: Journal | None = None,
) -> CommitResult:
    """Commit ``disk``'s active layer into ``base``: see
    :meth:`~qmpagent.SnapshotOrchestrator.commit`.

    Args:
        timeout: for reaching READY.
        command_timeout: for each QMP command.
        job_timeout: for the completion (the pivot) once ready.
        journal: where the commit is journalled (None: not journalled).
    """
    if not isinstance(delete_files, bool):
        raise UsageError(f"delete_files must be a bool, not {delete_files!r}")
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, int) or speed < 0):
        raise UsageError(f"speed must be an int >= 0 (bytes per second), not {speed!r}")
    run = _Commit(mon, ready_timeout=timeout, command_timeout=command_timeout,
                  job_timeout=job_timeout, delete_files=delete_files, speed=speed,
                  on_progress=on_progress, progress_interval=progress_interval,
                  journal=journal)
    try:
        return await run.run(disk, base)
    except (CommitError, UsageError):
        raise
    except MonitorError as exc:
        with contextlib.suppress(Exception):
            run.record.active_node = await run._read_active() if run.record.device else None
        raise run.fail(str(exc), exc) from exc


async def settle_commit_entry(
    mon: Monitor, entry: Entry, *, timeout: float, may_finish: bool,
) -> tuple[list[str], list[str], list[str]]:
    """Settle what a commit whose process died left (for :func:`qmpagent.recover`): a job of
    ours still in QEMU is completed once ready (not ready within ``timeout``: cancelled, and
    the VM stays on its active layer); once the device runs on the base, the merged nodes (and,
    if that commit was to delete them, files) still there are removed.

    Args:
        may_finish: False (a snapshot's preflight): a job still in QEMU is reported, not acted
            on.

    Returns:
        The nodes removed, the files removed, and what is unresolved (empty: settled).

    Raises:
        MonitorUnavailable: the connection to QEMU is lost.
    """
    info = entry.commit or {}
    job_id, device, base = str(info.get("job")), str(info.get("device")), str(info.get("base"))
    jobs = await mon.execute("query-jobs", timeout=timeout)
    if any(isinstance(j, dict) and j.get("id") == job_id for j in jobs or []):
        if not may_finish:
            return [], [], [f"operation {entry.op}: its commit job {job_id} is still in QEMU: run "
                            f"qmpagent recover (or qmpagent commit --disk {device}) to finish it"]
        async with mon.attach_job(job_id) as job:
            if job.status == "concluded":
                await job.dismiss()
            elif job.status in ENDED_STATUSES:
                await job.cancel(timeout=timeout)
            else:
                try:
                    await job.wait_ready(timeout=timeout)
                    await job.complete(timeout=timeout)
                except (JobReadyTimeout, JobError) as exc:
                    log.info("recover: commit job %s not finished (%s)", job_id, exc)
    active = None
    for dev in await mon.block_devices():
        if device in (dev.qdev_id, dev.qdev, dev.device):
            active = dev.node_name
    if active != base:
        # Not pivoted: the merged nodes are still the device's chain; they stay.
        return [], [], []
    layers = [(o.node, o.file_node or None, o.path) for o in entry.overlays]
    removed, files, left, failures = await remove_merged(
        mon, layers, delete_files=bool(info.get("delete_files")), timeout=timeout)
    unresolved = [f"operation {entry.op}: {f}" for f in failures]
    if left:
        unresolved.append(f"operation {entry.op}: merged nodes still attached: {', '.join(left)}")
    return removed, files, unresolved
