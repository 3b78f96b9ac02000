"""The main job, end to end: boot the built-in demo guest, take a quiesced snapshot, check it.

``qmpagent demo`` (and ``scripts/demo``) runs :func:`run_demo` and prints its
:class:`DemoReport`. Everything is real: QEMU under TCG, ``qemu-ga`` in the guest, the guest's
own timestamp writer showing the freeze as a gap, and ``e2fsck -fn`` of the snapshot's base image.
"""

from __future__ import annotations

import asyncio
import statistics
from dataclasses import dataclass

import anyio

from ..agent import GuestAgent
from ..monitor import Monitor
from ..snapshot import SnapshotOrchestrator, SnapshotResult
from .guest import boot_guest
from .image import find_tool

__all__ = ["DemoReport", "FsckResult", "check_image_fsck", "run_demo"]


@dataclass(frozen=True)
class FsckResult:
    """``e2fsck -fn`` of an image (converted to raw first): clean when the exit status is 0."""

    image: str
    returncode: int
    output: str

    @property
    def clean(self) -> bool:
        """Whether e2fsck found nothing to fix."""
        return self.returncode == 0


@dataclass(frozen=True)
class DemoReport:
    """What :func:`run_demo` saw.

    Attributes:
        boot_time: seconds from starting QEMU to the agent port open.
        result: the orchestrator's result.
        guest_gap: the largest gap in the guest writer's log around the snapshot, in seconds.
        writer_period: the writer's median period outside the freeze, in seconds.
        writer_resumed: the writer logged new entries after the snapshot.
        fsck: ``e2fsck -fn`` of the snapshot's base image.
        overlay_chain: ``qemu-img info --backing-chain`` of the new overlay.
    """

    boot_time: float
    result: SnapshotResult
    guest_gap: float
    writer_period: float
    writer_resumed: bool
    fsck: FsckResult
    overlay_chain: str


async def check_image_fsck(image: str, scratch: str) -> FsckResult:
    """Convert ``image`` (any format qemu-img reads, backing chain followed) to raw at
    ``scratch`` and run ``e2fsck -fn`` on it. ``scratch`` is removed afterwards."""
    import os

    qemu_img = find_tool("qemu-img")
    e2fsck = find_tool("e2fsck")
    try:
        proc = await asyncio.create_subprocess_exec(
            qemu_img, "convert", "-U", "-O", "raw", image, scratch,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            return FsckResult(image, proc.returncode or 1, out.decode(errors="replace"))
        proc = await asyncio.create_subprocess_exec(
            e2fsck, "-fn", scratch, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        return FsckResult(image, proc.returncode or 0, out.decode(errors="replace"))
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


async def _qemu_img_info(path: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        find_tool("qemu-img"), "info", "-U", "--backing-chain", path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return out.decode(errors="replace")


async def run_demo(quiesce: str = "required", *, freeze_timeout: float = 10.0) -> DemoReport:
    """Boot the demo guest (writer on), take a snapshot of its data disk, check the result.

    Raises:
        GuestBuildError, GuestError: the guest cannot be built or booted.
        SnapshotError, ThawError: as :meth:`SnapshotOrchestrator.snapshot`.
    """
    async with boot_guest() as guest:
        async with await Monitor.connect(guest.qmp_path) as mon, await GuestAgent.connect(
            guest.agent_path, timeout=30
        ) as agent:
            # Let the writer run a moment so the log has a baseline before the snapshot.
            start = await guest.uptime()
            await guest.wait_writer_progress(start + 0.5)
            base_image = str(guest.disk.overlay)
            snap = str(guest.workdir / "data0.snap1.qcow2")
            orch = SnapshotOrchestrator(mon, agent=agent)
            result = await orch.snapshot(
                {guest.disk.node_name: snap}, quiesce=quiesce, freeze_timeout=freeze_timeout
            )
            after = await guest.uptime()
            log = await guest.wait_writer_progress(after + 0.3)
            with anyio.fail_after(60):
                fsck = await check_image_fsck(base_image, str(guest.workdir / "base.raw"))
            chain = await _qemu_img_info(snap)
        gaps = [
            b[1] - a[1]
            for a, b in zip(log.entries, log.entries[1:], strict=False)
            if a[1] >= start - 0.05
        ]
        return DemoReport(
            boot_time=guest.boot_time or 0.0,
            result=result,
            guest_gap=max(gaps, default=0.0),
            writer_period=statistics.median(gaps) if gaps else 0.0,
            writer_resumed=log.last_uptime > after,
            fsck=fsck,
            overlay_chain=chain,
        )
