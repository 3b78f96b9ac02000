"""SnapshotOrchestrator on the real guest: real QEMU block layer, real qemu-ga, real freezes."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from qmpagent import (
    USE_CLIENT_DEFAULT,
    FreezeStatus,
    GuestAgent,
    MonitorTimeout,
    SnapshotError,
)
from qmpagent.monitor import Monitor
from qmpagent.snapshot import SnapshotOrchestrator
from qmpagent.testing import Guest
from qmpagent.testing.demo import check_image_fsck

pytestmark = pytest.mark.real_vm


@contextlib.asynccontextmanager
async def connected(guest: Guest) -> AsyncIterator[tuple[Monitor, GuestAgent]]:
    async with await Monitor.connect(guest.qmp_path) as mon, await GuestAgent.connect(
        guest.agent_path, timeout=30
    ) as ga:
        yield mon, ga


async def active_node(mon: Monitor, device: str) -> str | None:
    for dev in await mon.block_devices():
        if dev.qdev_id == device:
            return dev.node_name
    raise AssertionError(f"no device {device}")


async def node_names(mon: Monitor) -> set[str]:
    return {n.node_name for n in await mon.named_block_nodes()}


class SlowTransactionMonitor:
    """A real Monitor whose first ``transaction`` is held back (to put the caller inside the
    freeze window for as long as the test wants)."""

    def __init__(self, inner: Monitor, hold: float) -> None:
        self._inner = inner
        self.hold = hold
        self.holding = asyncio.Event()
        self.transactions = 0

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: Any = USE_CLIENT_DEFAULT
    ) -> Any:
        if command == "transaction":
            self.transactions += 1
            if self.transactions == 1:
                self.holding.set()
                limit = None if timeout is USE_CLIENT_DEFAULT else timeout
                try:
                    with anyio.fail_after(limit):
                        await asyncio.sleep(self.hold)
                except TimeoutError as exc:
                    raise MonitorTimeout("transaction held back by the test") from exc
        return await self._inner.execute(command, arguments, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_quiesced_snapshot_is_consistent_and_brief(qemu_guest: Guest) -> None:
    async with connected(qemu_guest) as (mon, ga):
        before = await qemu_guest.uptime()
        await qemu_guest.wait_writer_progress(before + 0.3)
        snap = qemu_guest.workdir / "snap1.qcow2"
        result = await SnapshotOrchestrator(mon, agent=ga).snapshot({"disk0": str(snap)})
        assert result.quiesced and result.freeze_owner == "self"
        assert result.frozen == 1 and result.thawed == 1
        assert result.reason is None
        assert result.freeze_window is not None and 0 < result.freeze_window < 10
        assert await active_node(mon, "vblk0") == result.overlays["disk0"]
        assert snap.exists()
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED

        after = await qemu_guest.uptime()
        log = await qemu_guest.wait_writer_progress(after + 0.3)  # the writer resumed
        gaps = sorted(
            (b[1] - a[1] for a, b in zip(log.entries, log.entries[1:], strict=False) if a[1] >= before),
            reverse=True,
        )
        # One gap covers the freeze: at least the host-side window (the writer cannot write while
        # frozen), at most the freeze call plus the window plus scheduling noise.
        assert gaps[0] >= result.freeze_window - 0.02
        assert gaps[0] <= result.timings.freeze + result.freeze_window + 1.0

        fsck = await check_image_fsck(str(qemu_guest.disk.overlay), str(qemu_guest.workdir / "b.raw"))
        assert fsck.clean, fsck.output

        # The new overlay records its backing file: the chain opens with qemu-img.
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "info", "-U", "--backing-chain", str(snap), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert str(qemu_guest.disk.overlay) in out.decode()


async def test_two_disks_in_one_transaction(qemu_guest_factory: Any) -> None:
    async with qemu_guest_factory(second_disk=True) as guest, connected(guest) as (mon, ga):
        orch = SnapshotOrchestrator(mon, agent=ga)
        # Disks by node name and by device id.
        result = await orch.snapshot(
            {"disk0": str(guest.workdir / "s0.qcow2"), "vblk1": str(guest.workdir / "s1.qcow2")}
        )
        assert result.quiesced and result.frozen == 2 and result.thawed == 2
        assert set(result.overlays) == {"disk0", "disk1"}
        assert await active_node(mon, "vblk0") == result.overlays["disk0"]
        assert await active_node(mon, "vblk1") == result.overlays["disk1"]


async def test_guest_frozen_beforehand_is_left_frozen(qemu_guest: Guest) -> None:
    async with connected(qemu_guest) as (mon, ga):
        assert await ga.fsfreeze_freeze() == 1  # "someone else" froze it
        try:
            result = await SnapshotOrchestrator(mon, agent=ga).snapshot(
                {"disk0": str(qemu_guest.workdir / "s.qcow2")}
            )
            assert result.quiesced and result.freeze_owner == "external"
            assert result.frozen == 0 and result.thawed == 0
            assert result.freeze_window is None
            assert await active_node(mon, "vblk0") == result.overlays["disk0"]
            assert await ga.fsfreeze_status() is FreezeStatus.FROZEN  # still frozen
        finally:
            assert await ga.fsfreeze_thaw() == 1  # and it was still ours to thaw


@pytest.mark.parametrize("quiesce", ["required", "preferred"])
async def test_filesystem_frozen_by_another_tool_is_not_thawed(qemu_guest: Guest, quiesce: str) -> None:
    async with connected(qemu_guest) as (mon, ga):
        await qemu_guest.run("fsfreeze --freeze /mnt/data")
        try:
            assert await ga.fsfreeze_status() is FreezeStatus.THAWED  # the agent does not know
            orch = SnapshotOrchestrator(mon, agent=ga)
            snap = qemu_guest.workdir / "s.qcow2"
            if quiesce == "required":
                with pytest.raises(SnapshotError, match="froze no filesystems") as err:
                    await orch.snapshot({"disk0": str(snap)}, quiesce="required")
                rec = err.value.record
                assert rec.thawed == 0 and rec.frozen == 0 and not rec.snapshot_taken
                assert rec.overlays_added == rec.overlays_removed
                assert not snap.exists()
                assert await active_node(mon, "vblk0") == "disk0"
                assert not {n for n in await node_names(mon) if n.startswith("qa")}
            else:
                result = await orch.snapshot({"disk0": str(snap)}, quiesce="preferred")
                assert not result.quiesced and result.freeze_owner is None
                assert result.thawed == 0
                assert "froze no filesystems" in (result.reason or "")
                assert await active_node(mon, "vblk0") == result.overlays["disk0"]
        finally:
            # Still frozen by the other tool: unfreezing it succeeds only if nobody thawed it.
            unfreeze = await qemu_guest.run("fsfreeze --unfreeze /mnt/data", check=False)
        assert unfreeze.returncode == 0, "the other tool's freeze was thawed behind its back"


async def test_agent_stopped_required_touches_nothing(qemu_guest: Guest) -> None:
    async with await Monitor.connect(qemu_guest.qmp_path) as mon:
        await qemu_guest.stop_agent()
        await mon.wait_agent_port(timeout=60, open=False)
        snap = qemu_guest.workdir / "s.qcow2"
        orch = SnapshotOrchestrator(mon, agent=str(qemu_guest.agent_path))
        nodes_before = await node_names(mon)
        with pytest.raises(SnapshotError, match="port is closed") as err:
            await orch.snapshot({"disk0": str(snap)}, quiesce="required")
        rec = err.value.record
        assert rec.phase == "preflight"
        assert rec.frozen == 0 and rec.overlays_added == [] and rec.files_created == []
        assert not snap.exists()
        assert await node_names(mon) == nodes_before

        result = await orch.snapshot({"vblk0": str(snap)}, quiesce="preferred")
        assert not result.quiesced and result.freeze_owner is None and result.frozen == 0
        assert "port is closed" in (result.reason or "")
        assert await active_node(mon, "vblk0") == result.overlays["disk0"]

        # By device id: the disk's current active layer (the overlay just made).
        result = await orch.snapshot({"vblk0": str(qemu_guest.workdir / "s2.qcow2")}, quiesce="off")
        assert not result.quiesced and result.reason == "quiesce is off"


async def test_failed_transaction_leaves_original_images_and_thaws(qemu_guest_factory: Any) -> None:
    async with qemu_guest_factory(second_disk=True) as guest, connected(guest) as (mon, ga):
        orch = SnapshotOrchestrator(mon, agent=ga)
        first = await orch.snapshot({"disk0": str(guest.workdir / "a.qcow2")})
        nodes_before = await node_names(mon)
        # disk0 is now the backing node of the first overlay: snapshotting it again fails in
        # QEMU ("node is busy"), and the transaction is atomic, so disk1 is not switched either.
        files = [guest.workdir / "b0.qcow2", guest.workdir / "b1.qcow2"]
        with pytest.raises(SnapshotError, match="transaction failed") as err:
            await orch.snapshot({"disk0": str(files[0]), "disk1": str(files[1])})
        rec = err.value.record
        assert rec.phase == "transaction" and not rec.snapshot_taken
        assert rec.frozen == 2 and rec.thawed == 2
        assert sorted(rec.overlays_added) == sorted(rec.overlays_removed) and rec.overlays_added
        assert sorted(rec.files_created) == sorted(rec.files_removed) == sorted(map(str, files))
        assert not any(f.exists() for f in files)
        assert await node_names(mon) == nodes_before
        assert await active_node(mon, "vblk0") == first.overlays["disk0"]
        assert await active_node(mon, "vblk1") == "disk1"
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED


async def test_cancelled_inside_the_freeze_window_thaws(qemu_guest: Guest) -> None:
    async with connected(qemu_guest) as (mon, ga):
        slow = SlowTransactionMonitor(mon, hold=3600)
        snap = qemu_guest.workdir / "s.qcow2"
        task = asyncio.ensure_future(
            SnapshotOrchestrator(slow, agent=ga).snapshot(  # type: ignore[arg-type]
                {"disk0": str(snap)}, freeze_timeout=3600
            )
        )
        with anyio.fail_after(120):
            await slow.holding.wait()
        # We are inside the window: the guest is frozen by us right now.
        assert await _status_via_second_look(ga) is FreezeStatus.FROZEN
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED
        assert not snap.exists()
        assert await active_node(mon, "vblk0") == "disk0"
        assert not {n for n in await node_names(mon) if n.startswith("qa")}


async def _status_via_second_look(ga: GuestAgent) -> FreezeStatus:
    # The orchestrator is parked in the (held) transaction, not using the agent: we may ask.
    return await ga.fsfreeze_status()


@pytest.mark.parametrize("quiesce", ["required", "preferred"])
async def test_freeze_timeout_is_enforced(qemu_guest: Guest, quiesce: str) -> None:
    async with connected(qemu_guest) as (mon, ga):
        slow = SlowTransactionMonitor(mon, hold=30)
        snap = qemu_guest.workdir / "s.qcow2"
        orch = SnapshotOrchestrator(slow, agent=ga)  # type: ignore[arg-type]
        started = asyncio.get_running_loop().time()
        if quiesce == "required":
            with pytest.raises(SnapshotError, match="exceeded freeze_timeout") as err:
                await orch.snapshot({"disk0": str(snap)}, quiesce="required", freeze_timeout=0.5)
            assert err.value.record.thawed == 1 and not err.value.record.snapshot_taken
            assert not snap.exists()
            assert await active_node(mon, "vblk0") == "disk0"
        else:
            result = await orch.snapshot({"disk0": str(snap)}, quiesce="preferred", freeze_timeout=0.5)
            assert not result.quiesced and "exceeded freeze_timeout" in (result.reason or "")
            assert result.frozen == 1 and result.thawed == 1
            assert await active_node(mon, "vblk0") == result.overlays["disk0"]
        assert asyncio.get_running_loop().time() - started < 25  # not the 30 s hold
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED


async def test_existing_overlay_file_is_refused(qemu_guest: Guest, tmp_path: Path) -> None:
    from qmpagent import UsageError

    target = tmp_path / "exists.qcow2"
    target.write_bytes(b"precious")
    async with connected(qemu_guest) as (mon, ga):
        with pytest.raises(UsageError, match="already exists"):
            await SnapshotOrchestrator(mon, agent=ga).snapshot({"disk0": str(target)})
        with pytest.raises(UsageError, match="no block node"):
            await SnapshotOrchestrator(mon, agent=ga).snapshot({"nope": str(tmp_path / "x")})
        with pytest.raises(UsageError):
            await SnapshotOrchestrator(mon, agent=ga).snapshot({"disk0": "relative.qcow2"})
        with pytest.raises(UsageError):
            await SnapshotOrchestrator(mon, agent=ga).snapshot(
                {"disk0": str(tmp_path / "y")}, quiesce="maybe"
            )
    assert target.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["exists.qcow2"]


# --- cancellation against an agent with injected delays (real QEMU, fake agent) ----------------


async def _start_snapshot(guest: Guest, mon: Monitor, agent_address: str) -> asyncio.Task[Any]:
    orch = SnapshotOrchestrator(mon, agent=agent_address, agent_timeout=10, thaw_timeout=10)
    return asyncio.ensure_future(orch.snapshot({"vblk0": str(guest.workdir / "c.qcow2")}))


async def test_native_cancel_while_the_freeze_is_in_flight_resolves_and_thaws(qemu_guest: Guest) -> None:
    from qmpagent.testing import AgentFault, FakeAgent

    async with FakeAgent() as fake, await Monitor.connect(qemu_guest.qmp_path) as mon:
        # The freeze takes effect at once; its reply comes late, and the caller gives up first.
        fake.inject("guest-fsfreeze-freeze", AgentFault.delay(2.0, effect_first=True))
        task = await _start_snapshot(qemu_guest, mon, fake.address)
        await fake.wait_for_call("guest-fsfreeze-freeze", timeout=60)
        with anyio.fail_after(10):
            while not fake.frozen_mountpoints:  # noqa: ASYNC110 - a condition, bounded
                await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake.frozen_mountpoints == []  # resolved as ours through the status, and thawed
        assert len(fake.calls("guest-fsfreeze-thaw")) == 1
        assert await active_node(mon, "vblk0") == "disk0"


async def test_native_cancel_during_a_slow_thaw_waits_for_the_thaw(qemu_guest: Guest) -> None:
    from qmpagent.testing import AgentFault, FakeAgent

    async with FakeAgent() as fake, await Monitor.connect(qemu_guest.qmp_path) as mon:
        fake.inject("guest-fsfreeze-thaw", AgentFault.delay(1.5))
        task = await _start_snapshot(qemu_guest, mon, fake.address)
        await fake.wait_for_call("guest-fsfreeze-thaw", timeout=60)
        task.cancel()  # native cancellation, twice: neither may abandon the thaw
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake.frozen_mountpoints == []
        assert fake.total_thawed >= 1


async def test_partial_foreign_freeze_is_reported(qemu_guest_factory: Any) -> None:
    """Another tool froze one of two filesystems: our freeze counts 1 of 2. qemu-ga's thaw will
    thaw that one too (nothing can prevent it), and the result says so."""
    async with qemu_guest_factory(second_disk=True) as guest, connected(guest) as (mon, ga):
        await guest.run("fsfreeze --freeze /mnt/data2")
        result = await SnapshotOrchestrator(mon, agent=ga).snapshot(
            {"vblk0": str(guest.workdir / "s.qcow2")}
        )
        assert result.quiesced and result.frozen == 1
        assert any("froze 1 of the guest's 2 filesystems" in w for w in result.warnings)
        # The limitation itself, as observed: the other tool's freeze is gone.
        assert (await guest.run("fsfreeze --unfreeze /mnt/data2", check=False)).returncode != 0
