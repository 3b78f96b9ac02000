"""The orchestrator at the edges a review found: cancellations at every awkward moment, replies
lost after QEMU applied a command, a hostile guest's odd types. All on the fake VM."""

from __future__ import annotations

import asyncio
import contextlib
import os

import anyio
import pytest

from qmpagent import (
    Monitor,
    MonitorTimeout,
    SnapshotError,
    SnapshotOrchestrator,
    ThawError,
    UsageError,
)
from qmpagent.testing import AgentFault, FakeVM


def snap(vm: FakeVM) -> dict[str, str]:
    return {"disk0": str(vm.workdir / "s.qcow2")}


@pytest.mark.parametrize("how", ["native", "anyio"])
async def test_cancel_while_a_lost_freeze_is_being_resolved_still_thaws(how: str) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject("guest-fsfreeze-freeze", AgentFault.no_reply(apply=True))
        # The status read that resolves it is slow (call 1 was at preflight).
        vm.agent.inject("guest-fsfreeze-status", AgentFault.delay(1.0), call=2)
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=0.5, thaw_timeout=5)
        coro = orch.snapshot(snap(vm), quiesce="required")
        if how == "native":
            task = asyncio.ensure_future(coro)
            await vm.agent.wait_for_call("guest-fsfreeze-status", 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(TimeoutError), anyio.fail_after(0.8):  # fires mid-resolution
                await coro
        assert not vm.agent.frozen
        assert len(vm.agent.calls("guest-fsfreeze-thaw")) == 1


@pytest.mark.parametrize("cancels", [1, 2])
async def test_cancels_while_the_freeze_is_in_flight_still_thaw(cancels: int) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject("guest-fsfreeze-freeze", AgentFault.delay(0.5, effect_first=True))
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=2, thaw_timeout=3)
        task = asyncio.ensure_future(orch.snapshot(snap(vm), quiesce="required"))
        await vm.agent.wait_for_call("guest-fsfreeze-freeze")
        task.cancel()  # the freeze is in flight
        for _ in range(cancels - 1):
            await asyncio.sleep(0.05)
            task.cancel()  # again, while the resolution runs
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not vm.agent.frozen
        assert len(vm.agent.calls("guest-fsfreeze-thaw")) == 1


async def test_a_freeze_that_was_never_sent_is_never_resolved_as_ours() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        # guest-get-fsinfo gets no reply at preflight (tolerated): the channel is out of sync,
        # and the resync before the freeze gets no answer: the freeze is never written.
        vm.agent.inject("guest-get-fsinfo", AgentFault.no_reply(apply=False))
        vm.agent.inject("guest-sync-delimited", AgentFault.no_reply(), call=2)

        def admin_freezes(name: str, seconds: float | None) -> None:
            if name == "freeze" and seconds is None:
                vm.agent.set_frozen(True)  # somebody else, after our preflight

        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=0.5, thaw_timeout=3)
        result = await orch.snapshot(snap(vm), quiesce="preferred", on_phase=admin_freezes)
        assert not result.quiesced and "could not be sent" in (result.reason or "")
        assert not vm.agent.calls("guest-fsfreeze-freeze")
        assert not vm.agent.calls("guest-fsfreeze-thaw")
        assert vm.agent.frozen  # the admin's freeze is untouched


async def test_a_lost_freeze_reply_counts_its_wait_against_freeze_timeout() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject("guest-fsfreeze-freeze", AgentFault.no_reply(apply=True))
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=1.0)
        with pytest.raises(SnapshotError, match="exceeded freeze_timeout") as err:
            await orch.snapshot(snap(vm), quiesce="required", freeze_timeout=0.3)
        assert err.value.record.thawed >= 0 and not err.value.record.snapshot_taken
        assert not vm.agent.frozen
        assert not vm.transactions  # nothing was snapshotted outside the allowed window
        assert vm.new_nodes() == set() and vm.new_files() == set()


@pytest.mark.parametrize("lost", ["file-node", "format-node"])
async def test_a_blockdev_add_whose_reply_was_lost_is_cleaned_up(lost: str) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        adds = 0
        real = mon.execute

        async def execute(command: str, arguments: object = None, **kw: object) -> object:
            nonlocal adds
            if command == "blockdev-add":
                adds += 1
                if (adds == 1) == (lost == "file-node"):
                    vm.qmp.never_answer("blockdev-add", times=1, apply=True)
            return await real(command, arguments, **kw)  # type: ignore[arg-type]

        mon.execute = execute  # type: ignore[method-assign]
        orch = SnapshotOrchestrator(mon, agent=None, command_timeout=0.5, job_timeout=2)
        with pytest.raises(SnapshotError):
            await orch.snapshot(snap(vm), quiesce="off")
        assert vm.new_nodes() == set() and vm.new_files() == set()


async def test_cancel_while_the_overlay_job_finishes_removes_its_file() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.qmp.delay("job-dismiss", 0.5, times=1)  # the file job's dismissal is slow
        task = asyncio.ensure_future(
            SnapshotOrchestrator(mon, agent=None).snapshot(snap(vm), quiesce="off")
        )
        await vm.qmp.wait_for_command("job-dismiss")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not os.path.exists(snap(vm)["disk0"])
        assert vm.new_nodes() == set()


@pytest.mark.parametrize("how", ["native", "anyio"])
async def test_a_thaw_error_is_not_replaced_by_a_late_cancellation(how: str) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject("guest-fsfreeze-thaw", AgentFault.error("thaw failed"), times=None)
        vm.qmp.fail("transaction", "injected")  # so the cleanup has overlays to remove
        vm.qmp.delay("blockdev-del", 1.0, times=1)  # and takes a moment
        orch = SnapshotOrchestrator(
            mon, agent=vm.agent_address, agent_timeout=0.5, thaw_timeout=1.0, command_timeout=3
        )
        deadline = asyncio.timeout(1.5) if how == "native" else _anyio_deadline(1.5)
        with pytest.raises(ThawError):
            async with deadline:  # fires during the cleanup, after the ThawError
                await orch.snapshot(snap(vm))
        assert vm.agent.frozen  # truly still frozen: the error says so


@contextlib.asynccontextmanager
async def _anyio_deadline(seconds: float):  # type: ignore[no-untyped-def]
    with anyio.fail_after(seconds):
        yield


async def test_odd_types_from_a_hostile_guest_are_typed_errors() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject("guest-get-fsinfo", AgentFault.reply([{"mountpoint": ["/x"]}]))
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=1.0)
        result = await orch.snapshot(snap(vm), quiesce="preferred")
        assert result.quiesced  # fsinfo is only a cross-check: its failure is not fatal


async def test_a_slow_qemu_is_not_reported_as_the_callers_mistake() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address, command_timeout=0.3) as mon:
        vm.qmp.never_answer("query-block", times=1)
        orch = SnapshotOrchestrator(mon, agent=None, command_timeout=0.3)
        with pytest.raises(SnapshotError) as err:
            await orch.snapshot({"vblk0": str(vm.workdir / "s.qcow2")}, quiesce="off")
        assert isinstance(err.value.__cause__, MonitorTimeout)
        with pytest.raises(UsageError):
            await orch.snapshot({"nosuchdevice": str(vm.workdir / "t.qcow2")}, quiesce="off")


@pytest.mark.parametrize(
    ("disks", "freeze_timeout"),
    [({"disk0": 123}, 10.0), ({1: "/x"}, 10.0), ({"disk0": "/x"}, "10"), ({}, 10.0), ("disk0", 10.0)],
)
async def test_bad_arguments_are_usage_errors(disks: object, freeze_timeout: object) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        with pytest.raises(UsageError):
            await SnapshotOrchestrator(mon).snapshot(
                disks, freeze_timeout=freeze_timeout  # type: ignore[arg-type]
            )
        assert not vm.qmp.commands("blockdev-create")  # refused before anything was done
