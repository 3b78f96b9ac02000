"""Pull mode: an NBD export of disks' frozen point-in-time view (image fleecing), for an
external reader (``orch.export``).

The same run as a backup (:mod:`qmpagent.backup`: the snapshot's preflight, freeze rules and
state machine) with other steps: each disk gets a *fleecing* image, a temporary qcow2 whose
backing node is the disk itself, created and attached before the freeze; inside the window one
``transaction`` starts a ``blockdev-backup`` ``sync: "none"`` job per disk into it (from then
on, before the guest overwrites a cluster, QEMU copies the old one into the fleecing image:
reading the fleecing node gives the disk as it was at the transaction); the guest is thawed at
once; then an NBD server (QEMU's own, on a unix socket) exports each fleecing node read-only.

Leaving the ``async with`` block deletes the exports (``mode: hard``: readers are cut off),
stops the NBD server if this export started it, cancels and dismisses the jobs, detaches the
fleecing nodes and removes their files. A failure while setting up does the same.

Not journalled once it is set up: a process that dies while the export is open leaves the
export, the jobs, the fleecing nodes and files in QEMU (``recover`` settles a backup's
entry, not an open export).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import anyio

from ._shield import run_to_completion
from .arguments import new_image_paths, overlay_path, quiesce_mode, seconds
from .backup import BackupOperation, Target
from .errors import MonitorCommandError, MonitorError, QMPAgentError, UsageError
from .operation import OrchestratorView, Overlay, Step
from .snapshot_state import Phase
from .snapshot_types import PhaseCallback, Quiesce, SnapshotResult

__all__ = ["Fleece", "FleeceResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FleeceResult(SnapshotResult):
    """What :meth:`SnapshotOrchestrator.export` set up: the fields of :class:`SnapshotResult`
    (``quiesced``, ``freeze_owner``, ``freeze_window``, ``reason``, ...) and these.

    Attributes:
        uris: disk (as given) -> the NBD URI of its frozen view
            (``nbd+unix:///NAME?socket=PATH``), readable as a raw image, e.g. with
            ``qemu-img convert -f raw URI out.qcow2``.
        exports: disk -> the NBD export name.
        socket: the NBD server's unix socket.
        images: disk -> its fleecing image file (removed when the export ends).
    """

    uris: dict[str, str] = field(default_factory=dict)
    exports: dict[str, str] = field(default_factory=dict)
    socket: str = ""
    images: dict[str, str] = field(default_factory=dict)


class _FleeceOperation(BackupOperation):
    """One export's set-up: a backup's operation whose targets are fleecing images."""

    def __init__(self, *args: Any, socket: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.socket = socket
        self.started_server = False
        self.exported: list[str] = []  # export ids added

    def make_target(self, key: str, ov: Overlay) -> Target:
        t = super().make_target(key, ov)
        t.job_id = f"{ov.node_name}-fleece"
        return t

    def backing_node(self, ov: Overlay) -> str | None:
        # Reads of what the guest has not overwritten go through to the disk itself.
        return ov.node

    def image_options(self, ov: Overlay) -> dict[str, Any]:
        options = super().image_options(ov)
        options["backing-file"] = ov.base.filename
        options["backing-fmt"] = ov.base.driver
        return options

    def actions(self) -> list[dict[str, Any]]:
        return [{"type": "blockdev-backup", "data": {
            "job-id": t.job_id, "device": t.node, "target": t.node_name, "sync": "none",
            "auto-dismiss": False}} for t in self.targets]

    async def after_window(self) -> None:
        await self.release_agent()
        self.stage = "export"
        with self.phase(Phase.COPY):
            try:
                await self._export()
            except QMPAgentError as exc:
                raise self.fail(f"the export failed: {exc}", exc) from exc
        self.succeeded = True

    async def _export(self) -> None:
        ct = self.t.command
        try:
            await self.mon.execute("nbd-server-start", {
                "addr": {"type": "unix", "data": {"path": self.socket}}}, timeout=ct)
            self.started_server = True
        except MonitorCommandError as exc:
            if "already running" not in exc.desc:
                raise
            log.info("an NBD server runs already: the exports are added to it")
        for t in self.targets:
            export_id = f"{t.node_name}-nbd"
            self.exported.append(export_id)
            await self.mon.execute("block-export-add", {
                "type": "nbd", "id": export_id, "node-name": t.node_name, "name": t.key,
                "writable": False}, timeout=ct)

    async def undo(self) -> None:
        await run_to_completion(self.teardown_exports())
        await super().undo()
        # A fleecing image is only ever this export's (it is not journalled, so nothing else
        # would remove it): removed even where the undo could not detach its nodes, e.g. QEMU
        # exited with the guest's shutdown. A QEMU still running keeps its open file.
        if not self.mon.is_open:
            log.warning("QEMU is unreachable: its NBD exports, jobs and fleecing nodes could "
                        "not be removed, if it still runs")
        for t in self.targets:
            if t.step >= Step.FILE and t.path not in self.record.files_removed:
                self.unlink_target(t)

    async def teardown_exports(self) -> None:
        """Delete our exports (readers cut off) and wait until QEMU let go of them, then stop
        the NBD server if we started it. Never raises a MonitorError (it is logged)."""
        ct = self.t.command
        with anyio.CancelScope(shield=True), anyio.move_on_after(ct * 2):
            for export_id in list(self.exported):
                try:
                    await self.mon.execute("block-export-del", {"id": export_id, "mode": "hard"},
                                           timeout=ct)
                except MonitorError as exc:
                    log.warning("block-export-del %s: %s", export_id, exc)
            deadline = time.monotonic() + ct
            while self.exported and time.monotonic() < deadline:
                try:
                    live = {e.get("id") for e in await self.mon.execute("query-block-exports",
                                                                        timeout=ct)
                            if isinstance(e, dict)}
                except MonitorError as exc:
                    log.warning("query-block-exports: %s", exc)
                    break
                self.exported = [e for e in self.exported if e in live]
                if self.exported:
                    await anyio.sleep(0.02)
            if self.started_server:
                try:
                    await self.mon.execute("nbd-server-stop", timeout=ct)
                    self.started_server = False
                except MonitorError as exc:
                    log.warning("nbd-server-stop: %s", exc)

    def result(self) -> Any:
        base = super().result()
        common = {f.name: getattr(base, f.name) for f in dataclasses.fields(SnapshotResult)}
        quoted = urllib.parse.quote(self.socket)
        return FleeceResult(
            **common,
            uris={t.key: f"nbd+unix:///{urllib.parse.quote(t.key)}?socket={quoted}"
                  for t in self.targets},
            exports={t.key: t.key for t in self.targets},
            socket=self.socket,
            images={t.key: t.path for t in self.targets},
        )


class Fleece:
    """An open export of disks' frozen view (see the module docstring): made by
    :meth:`SnapshotOrchestrator.export`, used as ``async with orch.export(...) as result``
    (``result`` a :class:`FleeceResult`); leaving the block tears it down."""

    def __init__(self, lock: asyncio.Lock, op: _FleeceOperation, paths: dict[str, str]) -> None:
        self._lock = lock  # the orchestrator's: one operation at a time
        self._op = op
        self._paths = paths
        self.result: FleeceResult | None = None

    async def __aenter__(self) -> FleeceResult:
        async with self._lock:
            result = await self._op.run(self._paths)
        assert isinstance(result, FleeceResult)
        self.result = result
        return result

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        async def locked() -> None:
            async with self._lock:
                await self.close()

        await run_to_completion(locked())

    async def close(self) -> None:
        """Tear the export down (exports, server, jobs, fleecing nodes and files). Idempotent.
        Never raises a MonitorError (what went wrong is logged)."""
        op = self._op
        await op.teardown_exports()
        # What a failed set-up undoes: the jobs ended, the nodes detached, the files removed.
        await op.undo()


def fleece(
    orch: OrchestratorView,
    lock: asyncio.Lock,
    images: Mapping[str, str | os.PathLike[str]],
    *,
    socket: str | os.PathLike[str],
    quiesce: Quiesce | str,
    freeze_timeout: float,
    on_phase: PhaseCallback | None,
) -> Fleece:
    """Check the arguments of :meth:`SnapshotOrchestrator.export` and make its handle.

    Raises:
        UsageError: see :meth:`SnapshotOrchestrator.export`.
    """
    mode = quiesce_mode(quiesce)
    window = seconds("freeze_timeout", freeze_timeout)
    if not isinstance(images, Mapping) or not images:
        raise UsageError("images must be a non-empty mapping of disk to a fleecing image path")
    if not isinstance(socket, (str, os.PathLike)):
        raise UsageError(f"socket must be a path, not {socket!r}")
    sock = overlay_path("socket", socket)
    paths = new_image_paths(
        images, empty="images must be a non-empty mapping of disk to a fleecing image path",
        entry="image", kind="image", nonempty_keys=True)
    op = _FleeceOperation(
        orch, mode, window, on_phase, orch.timeouts(), since={}, bitmap=None,
        state_dir=os.devnull, on_progress=None, progress_interval=1.0, copy_timeout=None,
        socket=sock,
    )
    return Fleece(lock, op, paths)
