"""The fake QEMU's backups: dirty bitmaps (``block-dirty-bitmap-add``/``-remove``/``-clear``/
``-merge``, as commands and as ``transaction`` actions, listed in ``query-named-block-nodes``
``dirty-bitmaps``), and ``blockdev-backup`` jobs (in a ``transaction``; type ``"backup"``,
with progress), with QEMU 7.2's error texts.

A bitmap is modelled as the set of its dirty clusters (``granularity`` bytes each); the guest's
writes are :meth:`FakeBackups.guest_write`. A ``blockdev-backup`` given a bitmap freezes it
(``busy``) and records new writes in a successor, as QEMU does; when the job concludes, the
bitmap mode decides: ``on-success`` (the default of ``sync: "incremental"``) makes the
successor the bitmap if the job succeeded, and merges it back if it failed or was cancelled;
``always`` always does the former, ``never`` always the latter.

The copy is modelled by a rate, not bytes: a job copies :attr:`FakeBackups.rate` bytes a second
(capped by its ``speed``) of its total (the virtual size for ``full``, the dirty clusters for
``incremental``; ``none``, fleecing, runs until cancelled). :meth:`FakeBackups.fail_next`
makes the next job fail part-way. NBD exports (``nbd-server-start``/``-stop``,
``block-export-add``/``-del``, ``query-block-exports``) are state only: nothing is served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ._qmp_error import FakeQMPError, generic_error
from ._qmp_jobs import FakeJob

if TYPE_CHECKING:  # the server imports this module: its types only for the checker
    from .fake_qmp import FakeCall, FakeQMPServer, Handler

__all__ = ["BACKUP_ACTIONS", "FakeBackupJob", "FakeBackups", "FakeBitmap"]

_TICK: Final = 0.01
_GRANULARITY: Final = 65536

#: The ``transaction`` action types this module applies.
BACKUP_ACTIONS: Final = frozenset({
    "blockdev-backup", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear", "block-dirty-bitmap-merge",
})


@dataclass
class FakeBitmap:
    """A dirty bitmap of the fake server.

    Attributes:
        name: its name.
        granularity: bytes per bit.
        persistent: stored in the qcow2 image.
        recording: records writes (not ``disabled``).
        dirty: the dirty clusters (indexes).
        successor: while a backup job uses it: the writes since the job started (then the
            bitmap is ``busy``), else None.
    """

    name: str
    granularity: int = _GRANULARITY
    persistent: bool = False
    recording: bool = True
    dirty: set[int] = field(default_factory=set)
    successor: set[int] | None = None

    @property
    def busy(self) -> bool:
        """In use by a job (frozen, with a successor). Raises nothing."""
        return self.successor is not None

    def count(self, size: int) -> int:
        """Dirty bytes (as ``count`` in ``query-named-block-nodes``). Raises nothing."""
        return min(size, len(self.dirty) * self.granularity)

    def info(self, size: int) -> dict[str, Any]:
        """The ``dirty-bitmaps`` entry (``BlockDirtyInfo``). Raises nothing."""
        return {"name": self.name, "recording": self.recording, "persistent": self.persistent,
                "busy": self.busy, "granularity": self.granularity, "count": self.count(size)}


@dataclass
class FakeBackupJob(FakeJob):
    """A ``blockdev-backup`` job of the fake server (``type`` ``"backup"``).

    Attributes:
        device: the source node.
        target: the target node.
        sync: ``"full"`` or ``"incremental"`` (``"bitmap"``).
        bitmap: the bitmap it uses, if any.
        bitmap_mode: ``"on-success"``, ``"always"`` or ``"never"``.
        speed: the speed limit in bytes per second (0: none).
        current: bytes copied.
        total: bytes to copy.
        fail_at: fail once this many bytes are copied (None: never).
        fail_desc: the error it fails with then.
    """

    device: str = ""
    target: str = ""
    sync: str = "full"
    bitmap: str | None = None
    bitmap_mode: str = "on-success"
    speed: int = 0
    current: float = 0.0
    total: float = 0.0
    fail_at: float | None = None
    fail_desc: str = "Input/output error"

    def info(self) -> dict[str, Any]:
        """The job as ``query-jobs`` shows it. Raises nothing."""
        info: dict[str, Any] = {
            "id": self.id, "type": "backup", "status": self.status,
            "current-progress": int(self.current), "total-progress": int(self.total),
        }
        if self.status == "concluded" and self.error is not None:
            info["error"] = self.error
        return info

    def block_info(self) -> dict[str, Any]:
        """The ``BLOCK_JOB_*`` event data of the job."""
        return {"device": self.id, "len": int(self.total), "offset": int(self.current),
                "speed": self.speed, "type": "backup"}


class FakeBackups:
    """Bitmaps and backup jobs of one :class:`FakeQMPServer` (``server.backups``).

    Attributes:
        bitmaps: node name -> bitmap name -> :class:`FakeBitmap`.
        rate: bytes a second a backup job copies (before its ``speed``).
        nbd_server: the NBD server's socket while it runs.
        exports: the block exports (pull mode) by id; nothing is served on the socket.
    """

    def __init__(self, server: FakeQMPServer) -> None:
        self._server = server
        self.bitmaps: dict[str, dict[str, FakeBitmap]] = {}
        self.rate: float = float(1 << 30)
        self._failures: list[tuple[str, float]] = []
        #: The NBD server's unix socket while it runs (``nbd-server-start``), else None.
        self.nbd_server: str | None = None
        #: Block exports by id (``block-export-add``).
        self.exports: dict[str, dict[str, Any]] = {}

    # test API ---------------------------------------------------------------------------------

    def guest_write(self, node: str, offset: int, length: int) -> None:
        """The guest wrote ``length`` bytes at ``offset`` of ``node``: every recording bitmap
        of the node (its successor while a job uses it) marks the clusters. Raises nothing."""
        for bm in self.bitmaps.get(node, {}).values():
            if not bm.recording:
                continue
            first, last = offset // bm.granularity, (offset + max(length, 1) - 1) // bm.granularity
            (bm.successor if bm.successor is not None else bm.dirty).update(range(first, last + 1))

    def fail_next(self, desc: str = "Input/output error", *, after: float = 0.5) -> None:
        """Make the next backup job fail with ``desc`` once it copied ``after`` (a fraction)
        of its total. Raises nothing."""
        self._failures.append((desc, after))

    def bitmap(self, node: str, name: str) -> FakeBitmap | None:
        """The bitmap, or None. Raises nothing."""
        return self.bitmaps.get(node, {}).get(name)

    def dirty_bitmaps(self, node: str) -> list[dict[str, Any]]:
        """The node's ``dirty-bitmaps`` entries (empty: QEMU then omits the member)."""
        size = self._size(node)
        return [bm.info(size) for bm in self.bitmaps.get(node, {}).values()]

    def busy_job(self, node: str) -> FakeBackupJob | None:
        """A backup job that is not over and uses ``node`` (source or target)."""
        for job in self._server.jobs.values():
            if isinstance(job, FakeBackupJob) and job.status not in ("concluded", "null") and (
                node in (job.device, job.target)
            ):
                return job
        return None

    # helpers ----------------------------------------------------------------------------------

    def _size(self, node: str) -> int:
        try:
            info = self._server.node_info(node)
        except KeyError:
            return 0
        size = info.get("image", {}).get("virtual-size", 0)
        return size if isinstance(size, int) else 0

    def _node(self, node: object, *, lookup: bool = False) -> str:
        if not isinstance(node, str):
            raise generic_error("Invalid parameter type for 'node', expected: string")
        if node not in self._server.nodes:
            if lookup:
                raise generic_error(f"Node '{node}' not found")
            raise generic_error(f"Cannot find device='{node}' nor node-name='{node}'")
        return node

    def _lookup(self, bitmaps: dict[str, dict[str, FakeBitmap]], data: Mapping[str, Any],
                key: str = "name") -> FakeBitmap:
        node = self._node(data.get("node"), lookup=True)
        name = data.get(key)
        if not isinstance(name, str):
            raise generic_error(f"Parameter '{key}' is missing")
        bm = bitmaps.get(node, {}).get(name)
        if bm is None:
            raise generic_error(f"Dirty bitmap '{name}' not found")
        return bm

    @staticmethod
    def _check_free(bm: FakeBitmap) -> None:
        if bm.busy:
            raise generic_error(
                f"Bitmap '{bm.name}' is currently in use by another operation and cannot be used"
            )

    # the actions (on a copy of the bitmaps: a transaction is all or nothing) -------------------

    def _add(self, bitmaps: dict[str, dict[str, FakeBitmap]], data: Mapping[str, Any]) -> None:
        node = self._node(data.get("node"))
        name = data.get("name")
        if not isinstance(name, str):
            raise generic_error("Parameter 'name' is missing")
        if not name:
            raise generic_error("Bitmap name cannot be empty")
        if name in bitmaps.get(node, {}):
            raise generic_error(f"Bitmap already exists: {name}")
        persistent = bool(data.get("persistent", False))
        if persistent and self._server.nodes[node].driver != "qcow2":
            raise generic_error(
                f"Cannot store dirty bitmaps in {self._server.nodes[node].driver} format"
            )
        granularity = data.get("granularity", _GRANULARITY)
        if not isinstance(granularity, int) or granularity < 512 or granularity & (granularity - 1):
            raise generic_error("Granularity must be power of 2 and at least 512")
        bitmaps.setdefault(node, {})[name] = FakeBitmap(
            name, granularity, persistent, recording=not data.get("disabled", False))

    def _remove(self, bitmaps: dict[str, dict[str, FakeBitmap]], data: Mapping[str, Any]) -> None:
        bm = self._lookup(bitmaps, data)
        self._check_free(bm)
        del bitmaps[data["node"]][bm.name]

    def _clear(self, bitmaps: dict[str, dict[str, FakeBitmap]], data: Mapping[str, Any]) -> None:
        bm = self._lookup(bitmaps, data)
        self._check_free(bm)
        bm.dirty = set()

    def _merge(self, bitmaps: dict[str, dict[str, FakeBitmap]], data: Mapping[str, Any]) -> None:
        target = self._lookup(bitmaps, data, "target")
        self._check_free(target)
        sources = data.get("bitmaps")
        if not isinstance(sources, list):
            raise generic_error("Parameter 'bitmaps' is missing")
        merged = set(target.dirty)
        for src in sources:
            if isinstance(src, str):
                bm = self._lookup(bitmaps, {"node": data["node"], "name": src})
            elif isinstance(src, dict):
                bm = self._lookup(bitmaps, src)
            else:
                raise generic_error("Invalid parameter type for 'bitmaps', expected: array")
            merged |= bm.dirty
        target.dirty = merged

    def _backup(self, bitmaps: dict[str, dict[str, FakeBitmap]], data: Mapping[str, Any],
                job_ids: set[str]) -> FakeBackupJob:
        allowed = {"job-id", "device", "target", "sync", "bitmap", "bitmap-mode", "speed",
                   "compress", "on-source-error", "on-target-error", "auto-finalize",
                   "auto-dismiss", "filter-node-name", "x-perf", "discard-source"}
        for key in data:
            if key not in allowed:
                raise generic_error(f"Parameter '{key}' is unexpected")
        sync = data.get("sync")
        if sync not in ("full", "incremental", "bitmap", "top", "none"):
            raise generic_error("Parameter 'sync' is missing" if sync is None
                                else f"Parameter 'sync' does not accept value '{sync}'")
        if sync in ("bitmap", "incremental") and "bitmap" not in data:
            raise generic_error(f"must provide a valid bitmap name for '{sync}' sync mode")
        if sync not in ("full", "incremental", "bitmap", "none"):
            raise generic_error(f"fake QMP: blockdev-backup sync '{sync}' is not modelled")
        mode = data.get("bitmap-mode")
        if sync == "incremental":
            if mode not in (None, "on-success"):
                raise generic_error(
                    "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")
            mode = "on-success"
        elif "bitmap" in data and mode is None:
            if sync == "bitmap":
                raise generic_error("Bitmap sync mode must be given when providing a bitmap")
            mode = "on-success"
        elif "bitmap" not in data and mode is not None:
            raise generic_error("Cannot specify bitmap sync mode without a bitmap")
        device = self._node(data.get("device"))
        target = self._node(data.get("target"))
        job_id = data.get("job-id", device)
        if not isinstance(job_id, str):
            raise generic_error("Invalid parameter type for 'job-id', expected: string")
        if job_id in self._server.jobs or job_id in job_ids:
            raise generic_error(f"Job ID '{job_id}' already in use")
        if data.get("auto-dismiss", True) is not False:
            raise generic_error("fake QMP: only auto-dismiss: false is modelled for blockdev-backup")
        bitmap: FakeBitmap | None = None
        if "bitmap" in data:
            bitmap = bitmaps.get(device, {}).get(data["bitmap"])
            if bitmap is None:
                raise generic_error(f"Bitmap '{data['bitmap']}' could not be found")
            self._check_free(bitmap)
        if self._size(device) != self._size(target):
            raise generic_error("Source and target image have different sizes")
        for node in (device, target):
            busy = self.busy_job(node)
            if busy is not None:
                raise generic_error(f"Node '{node}' is busy: block device is in use by block job: backup")
        size = self._size(device)
        total = size if bitmap is None or sync == "full" else bitmap.count(size)
        if sync == "none":
            # Fleecing: it copies only what the guest overwrites, until it is cancelled.
            if self._server.nodes[target].backing != device:
                raise generic_error("fake QMP: sync 'none' is modelled for a target backed by the source")
            total = 0
        speed = data.get("speed", 0)
        if not isinstance(speed, int) or speed < 0:
            raise generic_error("Parameter 'speed' expects a non-negative value")
        job = FakeBackupJob(job_id, "backup", device=device, target=target,
                            sync=sync if sync in ("full", "none") else "incremental",
                            bitmap=bitmap.name if bitmap is not None else None,
                            bitmap_mode=str(mode), speed=speed, total=float(total))
        if bitmap is not None:
            bitmap.successor = set()  # frozen: new writes go to the successor
        job_ids.add(job_id)
        return job

    def transaction(self, actions: Sequence[Mapping[str, Any]]) -> list[FakeBackupJob]:
        """Apply bitmap and ``blockdev-backup`` actions as one ``transaction``, all or
        nothing; returns the jobs to start.

        Raises:
            FakeQMPError: what QEMU would answer (nothing was applied).
        """
        work = {node: {name: FakeBitmap(bm.name, bm.granularity, bm.persistent, bm.recording,
                                        set(bm.dirty), None if bm.successor is None else set(bm.successor))
                       for name, bm in by_name.items()} for node, by_name in self.bitmaps.items()}
        jobs: list[FakeBackupJob] = []
        job_ids: set[str] = set()
        for action in actions:
            kind = action.get("type")
            data = action.get("data")
            if not isinstance(data, dict):
                raise generic_error("Parameter 'data' is missing")
            if kind == "block-dirty-bitmap-add":
                self._add(work, data)
            elif kind == "block-dirty-bitmap-remove":
                self._remove(work, data)
            elif kind == "block-dirty-bitmap-clear":
                self._clear(work, data)
            elif kind == "block-dirty-bitmap-merge":
                self._merge(work, data)
            elif kind == "blockdev-backup":
                jobs.append(self._backup(work, data, job_ids))
            elif kind == "abort":
                raise generic_error("Transaction aborted using Abort action")
            else:
                raise generic_error(
                    f"fake QMP: transaction action '{kind}' with backup actions is not modelled")
        self.bitmaps = work
        return jobs

    async def start(self, jobs: list[FakeBackupJob]) -> None:
        """Start the jobs a transaction made (``created``, ``running``)."""
        for job in jobs:
            if self._failures:
                desc, after = self._failures.pop(0)
                job.fail_at, job.fail_desc = job.total * after, desc
            self._server.jobs[job.id] = job
            await self._set(job, "created")
            await self._set(job, "running")
            job._task = asyncio.ensure_future(self._run(job))

    async def _set(self, job: FakeJob, status: str) -> None:
        job.status = status
        await self._server.emit("JOB_STATUS_CHANGE", {"id": job.id, "status": status})

    async def _run(self, job: FakeBackupJob) -> None:
        await asyncio.sleep(0)  # the transaction's reply goes out first
        last = time.monotonic()
        error: str | None = None
        while not job._cancelled.is_set() and (
            job.current < job.total or job.fail_at is not None or job.sync == "none"
        ):
            await asyncio.sleep(_TICK)
            now = time.monotonic()
            rate = self.rate if job.speed == 0 else min(self.rate, job.speed)
            job.current = min(job.total, job.current + rate * (now - last))
            last = now
            if job.fail_at is not None and job.current >= job.fail_at:
                job.current = job.fail_at
                error = job.fail_desc
                break
        if job._cancelled.is_set():
            error = "Operation cancelled"
        job.error = error
        self._conclude_bitmap(job, ok=error is None)
        if error is not None:
            await self._set(job, "aborting")
        else:
            await self._set(job, "waiting")
            await self._set(job, "pending")
        await self._set(job, "concluded")
        event = "BLOCK_JOB_CANCELLED" if job._cancelled.is_set() else "BLOCK_JOB_COMPLETED"
        data = job.block_info()
        if error is not None and event == "BLOCK_JOB_COMPLETED":
            data["error"] = error
        await self._server.emit(event, data)

    def _conclude_bitmap(self, job: FakeBackupJob, *, ok: bool) -> None:
        if job.bitmap is None:
            return
        bm = self.bitmap(job.device, job.bitmap)
        if bm is None or bm.successor is None:
            return
        if job.bitmap_mode == "always" or (ok and job.bitmap_mode == "on-success"):
            bm.dirty = bm.successor  # the bits copied are gone; new writes stay
        else:
            bm.dirty |= bm.successor  # nothing lost
        bm.successor = None

    # NBD exports (pull mode) -------------------------------------------------------------------

    def nbd_server_start(self, call: FakeCall) -> dict[str, Any]:
        addr = call.arg("addr", dict)
        if self.nbd_server is not None:
            raise generic_error("NBD server already running")
        data = addr.get("data")
        if addr.get("type") != "unix" or not isinstance(data, dict) or not isinstance(data.get("path"), str):
            raise generic_error("fake QMP: only a unix socket address is modelled for nbd-server-start")
        self.nbd_server = data["path"]
        return {}

    def nbd_server_stop(self, call: FakeCall) -> dict[str, Any]:
        if self.nbd_server is None:
            raise generic_error("NBD server not running")
        self.nbd_server = None
        self.exports.clear()
        return {}

    def block_export_add(self, call: FakeCall) -> dict[str, Any]:
        if call.arg("type", str) != "nbd":
            raise generic_error("fake QMP: only NBD exports are modelled")
        export_id = call.arg("id", str)
        node = call.arg("node-name", str)
        if self.nbd_server is None:
            raise generic_error("NBD server not running")
        if export_id in self.exports:
            raise generic_error(f"Block export id '{export_id}' is already in use")
        if node not in self._server.nodes:
            raise generic_error(f"Cannot find device='{node}' nor node-name='{node}'")
        self.exports[export_id] = {"id": export_id, "type": "nbd", "node-name": node,
                                   "shutting-down": False,
                                   "name": call.arg("name", str, node),
                                   "writable": call.arg("writable", bool, False)}
        return {}

    async def block_export_del(self, call: FakeCall) -> dict[str, Any]:
        export_id = call.arg("id", str)
        if export_id not in self.exports:
            raise generic_error(f"Export '{export_id}' is not found")
        del self.exports[export_id]
        await self._server.emit("BLOCK_EXPORT_DELETED", {"id": export_id})
        return {}

    def query_block_exports(self, call: FakeCall) -> list[dict[str, Any]]:
        return [{k: v for k, v in e.items() if k in ("id", "type", "node-name", "shutting-down")}
                for e in self.exports.values()]

    # commands ---------------------------------------------------------------------------------

    def handlers(self, query_nodes: Handler, blockdev_del: Handler | None) -> dict[str, Handler]:
        """The bitmap commands, and ``query-named-block-nodes`` / ``blockdev-del`` wrapped
        (``dirty-bitmaps`` listed; a node a backup job uses is busy)."""

        def one(kind: str) -> Handler:
            def handler(call: FakeCall) -> dict[str, Any]:
                self.transaction([{"type": kind, "data": dict(call.arguments)}])
                return {}
            return handler

        def query(call: FakeCall) -> Any:
            nodes = query_nodes(call)
            for entry in nodes:
                if isinstance(entry, dict):
                    bitmaps = self.dirty_bitmaps(str(entry.get("node-name")))
                    if bitmaps:
                        entry["dirty-bitmaps"] = bitmaps
            return nodes

        handlers: dict[str, Handler] = {
            kind: one(kind) for kind in BACKUP_ACTIONS if kind != "blockdev-backup"
        }
        handlers["query-named-block-nodes"] = query
        set_speed = self._server.handlers.get("block-job-set-speed")

        def job_set_speed(call: FakeCall) -> Any:
            job = self._server.jobs.get(call.arguments.get("device"))  # type: ignore[arg-type]
            if not isinstance(job, FakeBackupJob):
                if set_speed is None:
                    device = call.arguments.get("device")
                    raise FakeQMPError("DeviceNotActive", f"Block job '{device}' not found")
                return set_speed(call)
            speed = call.arg("speed", int)
            if speed < 0:
                raise generic_error("Parameter 'speed' expects a non-negative value")
            job.speed = speed
            return {}

        handlers["block-job-set-speed"] = job_set_speed
        handlers.update({
            "nbd-server-start": self.nbd_server_start, "nbd-server-stop": self.nbd_server_stop,
            "block-export-add": self.block_export_add, "block-export-del": self.block_export_del,
            "query-block-exports": self.query_block_exports,
        })
        if blockdev_del is not None:
            inner = blockdev_del

            def delete(call: FakeCall) -> Any:
                name = call.arguments.get("node-name")
                if isinstance(name, str) and self.busy_job(name) is not None:
                    raise FakeQMPError(
                        "GenericError", f"Node '{name}' is busy: block device is in use by block job: backup")
                if isinstance(name, str) and any(e["node-name"] == name for e in self.exports.values()):
                    raise FakeQMPError("GenericError", f"Node '{name}' is in use")  # by an export
                result = inner(call)
                if isinstance(name, str) and name not in self._server.nodes:
                    self.bitmaps.pop(name, None)
                return result
            handlers["blockdev-del"] = delete
        return handlers
