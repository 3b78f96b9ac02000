"""Issue 11: the holes an adversarial review found in the orchestrator, one class per section,
each on the fake VM (no real guest). The hole numbers are the issue's."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import anyio
import pytest

from qmpagent import (
    AgentProtocolError,
    FreezeState,
    GuestAgent,
    Monitor,
    MonitorProtocolError,
    SnapshotError,
    SnapshotOrchestrator,
    SnapshotResult,
    ThawError,
    TransactionState,
    UsageError,
)
from qmpagent.testing import AgentFault, FakeVM

MODES = ("required", "preferred")


def snap(vm: FakeVM, name: str = "s") -> dict[str, str]:
    return {d.node_name: str(vm.workdir / f"{name}{i}.qcow2") for i, d in enumerate(vm.disks)}


def assert_clean(vm: FakeVM) -> None:
    """No overlay node, file or job of ours left, the disks on their original images."""
    assert vm.new_nodes() == set(), vm.new_nodes()
    assert vm.new_files() == set(), vm.new_files()
    assert not vm.qmp.jobs, vm.qmp.jobs
    assert [vm.active_node(i) for i in range(len(vm.disks))] == [d.node_name for d in vm.disks]


def freeze_thaw_gap(vm: FakeVM) -> float:
    """How long the fake guest was frozen by the (one) freeze: its arrival to the thaw's."""
    freezes = vm.agent.calls("guest-fsfreeze-freeze")
    thaws = vm.agent.calls("guest-fsfreeze-thaw")
    assert len(freezes) == 1 and thaws, (freezes, thaws)
    return thaws[-1].time - freezes[0].time


# --------------------------------------------------------------- 1: "was OUR freeze sent?"


@pytest.mark.parametrize("mode", MODES)
async def test_1_another_callers_freeze_on_a_shared_agent_is_not_taken_as_ours(mode: str) -> None:
    """The orchestrator shares its GuestAgent with other code. Another caller's freeze leaves
    while ours waits for the connection, and ours gives up before it is written: the other
    freeze must not be "resolved" as ours and thawed (the connection-wide counters said
    "a freeze was written meanwhile")."""
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        ga = await GuestAgent.connect(vm.agent_address, timeout=5)
        try:
            vm.agent.inject("guest-ping", AgentFault.delay(0.3), call=2)  # holds the channel
            vm.agent.inject("guest-fsfreeze-freeze", AgentFault.delay(1.0, effect_first=True))
            others: list[asyncio.Task[Any]] = []

            def other_code(name: str, seconds: float | None) -> None:
                if name == "prepare" and seconds is not None:  # after our preflight
                    others.append(asyncio.ensure_future(ga.ping(timeout=5)))
                    others.append(asyncio.ensure_future(ga.fsfreeze_freeze(timeout=5)))

            orch = SnapshotOrchestrator(mon, agent=ga, agent_timeout=0.5, thaw_timeout=3)
            if mode == "required":
                with pytest.raises(SnapshotError, match="could not be sent") as err:
                    await orch.snapshot(snap(vm), quiesce=mode, on_phase=other_code)
                assert err.value.record.freeze_state is FreezeState.SKIPPED
            else:
                result = await orch.snapshot(snap(vm), quiesce=mode, on_phase=other_code)
                assert not result.quiesced and result.freeze_state is FreezeState.SKIPPED
            assert await others[1] == 1  # the other caller froze, and its freeze is intact
            await others[0]
            assert vm.agent.frozen
            assert not vm.agent.calls("guest-fsfreeze-thaw")
            assert len(vm.agent.calls("guest-fsfreeze-freeze")) == 1  # only theirs
        finally:
            await ga.close()


async def test_1_on_sent_is_called_per_call_right_after_the_write() -> None:
    async with FakeVM() as vm, await GuestAgent.connect(vm.agent_address, timeout=2) as ga:
        seen: list[int] = []
        assert await ga.fsfreeze_freeze(on_sent=lambda: seen.append(vm.agent.call_count())) == 1
        assert len(seen) == 1
        assert await ga.execute("guest-fsfreeze-thaw", on_sent=lambda: seen.append(2)) == 1
        assert seen[-1] == 2
        # A call that times out before its request can be written (another call holds the
        # channel) never calls it.
        vm.agent.inject("guest-ping", AgentFault.delay(0.5))
        pings = vm.agent.call_count("guest-ping")
        slow = asyncio.ensure_future(ga.ping(timeout=2))
        await vm.agent.wait_for_call("guest-ping", pings + 1)
        not_sent: list[bool] = []
        with pytest.raises(TimeoutError):
            await ga.fsfreeze_freeze(timeout=0.1, on_sent=lambda: not_sent.append(True))
        assert not not_sent
        await slow
        # A call whose reply is lost did write its request.
        vm.agent.inject("guest-fsfreeze-freeze", AgentFault.no_reply(apply=True))
        sent: list[bool] = []
        with pytest.raises(TimeoutError):
            await ga.fsfreeze_freeze(timeout=0.2, on_sent=lambda: sent.append(True))
        assert sent == [True]
        await ga.fsfreeze_thaw()


# ----------------------------------------- 2: an external freeze that ends before the transaction


def _thaw_during_prepare(vm: FakeVM) -> Callable[[str, float | None], None]:
    def on_phase(name: str, seconds: float | None) -> None:
        if name == "prepare" and seconds is None:
            vm.agent.set_frozen(False)  # the other tool thaws while the overlays are made

    return on_phase


async def test_2_external_freeze_thawed_meanwhile_required_takes_no_snapshot() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.set_frozen(True)
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=0.5)
        with pytest.raises(SnapshotError, match="thawed before the transaction") as err:
            await orch.snapshot(snap(vm), quiesce="required", on_phase=_thaw_during_prepare(vm))
        rec = err.value.record
        assert rec.freeze_state is FreezeState.EXTERNAL_ENDED and not rec.snapshot_taken
        assert not vm.transactions and not vm.agent.calls("guest-fsfreeze-thaw")
        assert_clean(vm)


async def test_2_external_freeze_thawed_meanwhile_preferred_is_crash_consistent() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.set_frozen(True)
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=0.5)
        result = await orch.snapshot(snap(vm), quiesce="preferred", on_phase=_thaw_during_prepare(vm))
        assert not result.quiesced and result.freeze_owner is None
        assert "thawed before the transaction" in (result.reason or "")
        assert vm.transactions and not vm.transactions[-1].guest_frozen
        assert not vm.agent.calls("guest-fsfreeze-thaw") and not vm.agent.calls("guest-fsfreeze-freeze")


@pytest.mark.parametrize("mode", MODES)
async def test_2_external_freeze_that_cannot_be_rechecked_is_not_called_quiesced(mode: str) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.set_frozen(True)
        vm.agent.inject("guest-fsfreeze-status", AgentFault.error("injected"), call=2)
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=0.5)
        if mode == "required":
            with pytest.raises(SnapshotError, match="cannot be read before the transaction"):
                await orch.snapshot(snap(vm), quiesce=mode)
            assert not vm.transactions
        else:
            result = await orch.snapshot(snap(vm), quiesce=mode)
            assert not result.quiesced and result.freeze_state is FreezeState.EXTERNAL_ENDED
        assert vm.agent.frozen and not vm.agent.calls("guest-fsfreeze-thaw")


async def test_2_external_freeze_still_there_is_quiesced() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.set_frozen(True)
        result = await SnapshotOrchestrator(mon, agent=vm.agent_address).snapshot(snap(vm))
        assert result.quiesced and result.freeze_owner == "external"
        assert result.freeze_state is FreezeState.EXTERNAL
        assert len(vm.agent.calls("guest-fsfreeze-status")) == 2  # preflight, and right before
        assert vm.transactions[-1].guest_frozen and vm.agent.frozen


# ------------------------------------------ 3: on_phase raising a BaseException never skips the thaw

POINTS = [(p, end) for p in ("preflight", "prepare", "freeze", "transaction", "thaw")
          for end in (False, True)]


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, asyncio.CancelledError])
@pytest.mark.parametrize(
    ("phase", "at_end"), POINTS, ids=[f"{p}-{'end' if e else 'start'}" for p, e in POINTS]
)
async def test_3_on_phase_raising_a_base_exception_never_skips_the_thaw(
    phase: str, at_end: bool, exc_type: type[BaseException]
) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        raised: list[BaseException] = []

        def on_phase(name: str, seconds: float | None) -> None:
            if name == phase and (seconds is not None) == at_end and not raised:
                raised.append(exc_type())
                raise raised[0]

        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=1, thaw_timeout=2)
        with pytest.raises(exc_type) as info:
            await orch.snapshot(snap(vm), on_phase=on_phase)
        assert info.value is raised[0]  # what propagates is what on_phase raised ...
        assert not vm.agent.frozen  # ... once the guest is thawed
        assert len(vm.agent.calls("guest-fsfreeze-thaw")) == len(vm.agent.calls("guest-fsfreeze-freeze"))
        if vm.active_node(0) == "disk0":  # not taken: nothing left behind
            assert_clean(vm)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, asyncio.CancelledError])
@pytest.mark.parametrize("at_end", [False, True])
async def test_3_on_phase_raising_when_the_window_runs_out_still_thaws(
    at_end: bool, exc_type: type[BaseException]
) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.qmp.never_answer("transaction", times=1)

        def on_phase(name: str, seconds: float | None) -> None:
            if name == "thaw" and (seconds is not None) == at_end:
                raise exc_type()

        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=1, thaw_timeout=2,
                                    command_timeout=1)
        with pytest.raises(exc_type):
            await orch.snapshot(snap(vm), quiesce="preferred", freeze_timeout=0.3, on_phase=on_phase)
        assert not vm.agent.frozen and len(vm.agent.calls("guest-fsfreeze-thaw")) == 1
        if vm.active_node(0) == "disk0":
            assert_clean(vm)


async def test_3_a_thaw_error_wins_over_what_on_phase_raised() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject("guest-fsfreeze-thaw", AgentFault.error("thaw failed"), times=None)

        def on_phase(name: str, seconds: float | None) -> None:
            if name == "thaw" and seconds is None:
                raise KeyboardInterrupt

        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=0.3, thaw_timeout=0.6)
        with pytest.raises(ThawError):
            await orch.snapshot(snap(vm), on_phase=on_phase)
        assert vm.agent.frozen


# ------------------------------------------------------------- 4: every timeout validated up front

BAD_TIMEOUTS: list[Any] = [None, "5", b"5", 0, 0.0, -1, True, False, math.nan, math.inf, -math.inf,
                           10**400, [1.0]]


@pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=repr)
@pytest.mark.parametrize("name", ["agent_timeout", "thaw_timeout", "command_timeout", "job_timeout"])
async def test_4_bad_constructor_timeouts_are_usage_errors(name: str, bad: Any) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        with pytest.raises(UsageError, match=name):
            SnapshotOrchestrator(mon, agent=vm.agent_address, **{name: bad})
        # Set afterwards (the attributes are public): refused before anything is sent.
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        setattr(orch, name, bad)
        vm.agent.clear_received()
        with pytest.raises(UsageError, match=name):
            await orch.snapshot(snap(vm))
        assert not vm.agent.calls() and not vm.qmp.commands("query-status")
        assert not vm.agent.frozen


@pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=repr)
async def test_4_bad_freeze_timeouts_are_usage_errors(bad: Any) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        with pytest.raises(UsageError, match="freeze_timeout"):
            await SnapshotOrchestrator(mon, agent=vm.agent_address).snapshot(snap(vm), freeze_timeout=bad)
        assert not vm.agent.calls() and not vm.qmp.commands("query-status")


async def test_4_good_timeouts_of_any_real_type() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=2,
                                    thaw_timeout=Fraction(5, 2), command_timeout=3.5)
        assert orch.thaw_timeout == 2.5
        result = await orch.snapshot(snap(vm), freeze_timeout=Fraction(3))
        assert result.quiesced


# ---------------------------------------------------- 5: thaw_timeout bounds the whole thaw phase


@pytest.mark.parametrize("slow", ["query-chardev", "reconnect-sync", "thaw-hangs", "status-hangs"])
async def test_5_thaw_timeout_bounds_every_step_of_the_thaw(slow: str) -> None:
    async with FakeVM(vserport_rate_limit=0) as vm, await Monitor.connect(vm.qmp_address) as mon:
        thaw_seconds: list[float] = []

        def on_phase(name: str, seconds: float | None) -> None:
            if name != "thaw":
                return
            if seconds is not None:
                thaw_seconds.append(seconds)
            elif slow == "query-chardev":
                vm.qmp.delay("query-chardev", 3.0, times=None)  # for the reconnect's port check
            elif slow == "reconnect-sync":
                vm.agent.inject("guest-sync-delimited", AgentFault.hang())

        if slow in ("query-chardev", "reconnect-sync"):
            vm.agent.inject("guest-fsfreeze-thaw", AgentFault.disconnect(apply=False))
        elif slow == "thaw-hangs":
            vm.agent.inject("guest-fsfreeze-thaw", AgentFault.hang())
        else:  # the thaw's reply is lost, and the status read that should tell hangs
            vm.agent.inject("guest-fsfreeze-thaw", AgentFault.no_reply(apply=False))
            vm.agent.inject("guest-fsfreeze-status", AgentFault.hang(), call=2)
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=2.0,
                                    command_timeout=5.0, thaw_timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ThawError, match="MAY STILL BE FROZEN"):
            await orch.snapshot(snap(vm), on_phase=on_phase)
        assert thaw_seconds and thaw_seconds[0] < 0.5 + 0.25, thaw_seconds
        assert time.monotonic() - started < 2.5
        vm.agent.clear_faults()
        vm.qmp.clear_faults()


# -------------------------------- 6: a cancel scope during prepare leaves nothing running behind


@pytest.mark.parametrize("disks", [1, 2])
@pytest.mark.parametrize("at", ["file-job", "qcow2-job", "blockdev-add"])
async def test_6_anyio_cancel_during_prepare_leaves_no_job_node_or_file(disks: int, at: str) -> None:
    async with FakeVM(disks=disks) as vm, await Monitor.connect(vm.qmp_address) as mon:
        command, count = {"file-job": ("blockdev-create", 1), "qcow2-job": ("blockdev-create", 2),
                          "blockdev-add": ("blockdev-add", 1)}[at]
        if at == "blockdev-add":
            vm.qmp.delay("blockdev-add", 5.0, times=1)
        else:
            vm.qmp.delay_job("blockdev-create", 5.0, times=None)
        vm.qmp.delay("job-cancel", 0.2, times=None)  # QEMU takes a moment to cancel a job
        orch = SnapshotOrchestrator(mon, agent=None, command_timeout=3, job_timeout=10)
        with anyio.CancelScope() as scope:

            async def cancel_when_sent() -> None:
                while len(vm.qmp.commands(command)) < count:
                    await vm.qmp.wait_for_command(command, timeout=10)
                    await asyncio.sleep(0)
                scope.cancel()  # anyio re-delivers this at every await until the scope exits

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_when_sent)
                await orch.snapshot(snap(vm), quiesce="off")
        assert scope.cancelled_caught
        # Right at return, not "eventually": nothing of ours is left (a job clean-up still
        # running behind the caller's back would still have its job in QEMU).
        assert_clean(vm)


# ------------------------------------------------------------------- 7: lost or late freeze replies


@pytest.mark.parametrize("mode", MODES)
async def test_7_a_lost_freeze_reply_waits_at_most_freeze_timeout(mode: str) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject("guest-fsfreeze-freeze", AgentFault.no_reply(apply=True))
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=5.0, thaw_timeout=2)
        thaw: list[float] = []

        def cb(name: str, seconds: float | None) -> None:
            if name == "thaw" and seconds is not None:
                thaw.append(seconds)

        if mode == "required":
            with pytest.raises(SnapshotError, match="freeze_timeout"):
                await orch.snapshot(snap(vm), quiesce=mode, freeze_timeout=0.5, on_phase=cb)
        else:
            result = await orch.snapshot(snap(vm), quiesce=mode, freeze_timeout=0.5, on_phase=cb)
            assert not result.quiesced and result.freeze_window is not None
            assert result.freeze_window >= freeze_thaw_gap(vm) - 0.05
        assert not vm.agent.frozen
        assert freeze_thaw_gap(vm) < 0.5 + sum(thaw) + 0.1
        assert not [t for t in vm.transactions if t.guest_frozen]


async def test_7_a_late_freeze_reply_is_counted_from_the_request() -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject("guest-fsfreeze-freeze", AgentFault.delay(1.0, effect_first=True))
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=5.0)
        result = await orch.snapshot(snap(vm), freeze_timeout=10)
        assert result.quiesced and result.freeze_window is not None
        assert result.freeze_window >= freeze_thaw_gap(vm) - 0.05 >= 0.95


@pytest.mark.parametrize("mode", MODES)
async def test_7_a_reply_later_than_freeze_timeout_never_holds_the_guest_longer(mode: str) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject("guest-fsfreeze-freeze", AgentFault.delay(1.5, effect_first=True))
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=5.0, thaw_timeout=3)
        seconds: dict[str, float] = {}

        def cb(name: str, s: float | None) -> None:
            if s is not None:
                seconds[name] = seconds.get(name, 0.0) + s

        if mode == "required":
            with pytest.raises(SnapshotError, match="freeze_timeout") as err:
                await orch.snapshot(snap(vm), quiesce=mode, freeze_timeout=0.5, on_phase=cb)
            assert err.value.record.freeze_state is FreezeState.THAWED
            assert err.value.record.thawed == 1
        else:
            result = await orch.snapshot(snap(vm), quiesce=mode, freeze_timeout=0.5, on_phase=cb)
            assert not result.quiesced
            assert result.freeze_window is not None
            assert result.freeze_window >= freeze_thaw_gap(vm) - 0.05
        assert seconds["freeze"] < 0.5 + 0.1
        assert freeze_thaw_gap(vm) < 0.5 + seconds["thaw"] + 0.1
        assert not vm.agent.frozen and not [t for t in vm.transactions if t.guest_frozen]


# ---------------------------------------------------- 8: typed errors for odd paths and odd QEMU


class _BytesPath(os.PathLike[str]):
    def __fspath__(self) -> Any:
        return b"/tmp/x.qcow2"


BAD_PATHS: list[Any] = [
    "/tmp/a\0b.qcow2", "/tmp/\ud800.qcow2", "/tmp/\udc80.qcow2", "relative.qcow2", "/tmp/dir/",
    "/tmp/.", "/tmp/..", _BytesPath(), "/tmp/" + "x" * 300 + ".qcow2",
    "/etc/passwd/x.qcow2",  # a path component that is a file
]


@pytest.mark.parametrize("bad", BAD_PATHS, ids=lambda p: repr(p)[:30])
@pytest.mark.parametrize("mode", MODES)
async def test_8_bad_overlay_paths_are_usage_errors_before_anything_is_done(mode: str, bad: Any) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.clear_received()
        with pytest.raises(UsageError):
            await SnapshotOrchestrator(mon, agent=vm.agent_address).snapshot({"disk0": bad}, quiesce=mode)
        assert not vm.qmp.commands("query-status") and not vm.agent.calls()  # nothing was sent


MALFORMED_NODES: list[dict[str, Any]] = [
    {"virtual-size": True}, {"virtual-size": -1}, {"drv": 5}, {"file": ["x"]},
    {"backing_file": {"a": 1}}, {"node-name": ["disk0"]},
]


@pytest.mark.parametrize("change", MALFORMED_NODES, ids=repr)
async def test_8_block_nodes_of_the_wrong_type_are_typed_errors(change: dict[str, Any]) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        nodes = vm.qmp.block_nodes
        for entry in nodes:
            if entry["node-name"] == "disk0":
                for k, v in change.items():
                    if k == "virtual-size":
                        entry["image"] = dict(entry["image"], **{k: v})
                    else:
                        entry[k] = v
        vm.qmp.block_nodes = nodes
        with pytest.raises((SnapshotError, UsageError)) as err:
            await SnapshotOrchestrator(mon, agent=None).snapshot(snap(vm), quiesce="off")
        if isinstance(err.value, SnapshotError):
            assert isinstance(err.value.__cause__, MonitorProtocolError)
        assert_clean(vm)


@pytest.mark.parametrize(
    ("key", "change"),
    [("vblk0", {"inserted": {"node-name": ["disk0"]}}), ("vblk0", {"inserted": {"node-name": 5}}),
     ("/machine/peripheral/vblk0", {"qdev": 5}), ("vblk0", {"inserted": "disk0"})],
    ids=repr,
)
async def test_8_query_block_of_the_wrong_type_is_a_typed_error(key: str, change: dict[str, Any]) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.qmp.block_devices = [dict(d, **change) for d in vm.qmp.block_devices]
        with pytest.raises(SnapshotError) as err:
            await SnapshotOrchestrator(mon, agent=None).snapshot(
                {key: str(vm.workdir / "s.qcow2")}, quiesce="off"
            )
        assert isinstance(err.value.__cause__, MonitorProtocolError)
        assert_clean(vm)


# ---------------------------------------------------------------- 12: overlay paths that alias


@pytest.mark.parametrize("how", ["dot", "double-slash", "dotdot", "symlinked-dir", "same-string"])
async def test_12_two_overlays_that_are_one_file_are_refused(how: str, tmp_path: Path) -> None:
    async with FakeVM(disks=2) as vm, await Monitor.connect(vm.qmp_address) as mon:
        (tmp_path / "d" / "sub").mkdir(parents=True)
        (tmp_path / "link").symlink_to(tmp_path / "d")
        first = f"{tmp_path}/d/a.qcow2"
        second = {
            "dot": f"{tmp_path}/d/./a.qcow2",
            "double-slash": f"{tmp_path}/d//a.qcow2",
            "dotdot": f"{tmp_path}/d/sub/../a.qcow2",
            "symlinked-dir": f"{tmp_path}/link/a.qcow2",
            "same-string": first,
        }[how]
        disks = {vm.disks[0].node_name: first, vm.disks[1].node_name: second}
        vm.agent.clear_received()
        with pytest.raises(UsageError, match="same file"):
            await SnapshotOrchestrator(mon, agent=vm.agent_address).snapshot(disks)
        assert not vm.qmp.commands("query-status") and not vm.agent.calls()  # nothing was sent


async def test_12_distinct_overlays_in_one_directory_are_fine(tmp_path: Path) -> None:
    async with FakeVM(disks=2) as vm, await Monitor.connect(vm.qmp_address) as mon:
        disks = {vm.disks[0].node_name: tmp_path / "a.qcow2", vm.disks[1].node_name: tmp_path / "b.qcow2"}
        result = await SnapshotOrchestrator(mon, agent=vm.agent_address).snapshot(disks)
        assert result.quiesced and len(result.overlays) == 2


# --------------------------------------------------------------- 13: counts outside int64


@pytest.mark.parametrize("count", [2**63, 2**70, -1, -(2**70)], ids=repr)
async def test_13_freeze_counts_outside_int64_are_protocol_errors(count: int) -> None:
    async with FakeVM() as vm, await GuestAgent.connect(vm.agent_address, timeout=2) as ga:
        for command, call in (("guest-fsfreeze-freeze", ga.fsfreeze_freeze),
                              ("guest-fsfreeze-thaw", ga.fsfreeze_thaw)):
            vm.agent.inject(command, AgentFault.reply(count))
            with pytest.raises(AgentProtocolError, match="count"):
                await call()
        vm.agent.inject("guest-fsfreeze-freeze-list", AgentFault.reply(count))
        with pytest.raises(AgentProtocolError):
            await ga.fsfreeze_freeze(["/"])
        vm.agent.inject("guest-fsfreeze-thaw", AgentFault.reply(2**63 - 1))
        assert await ga.fsfreeze_thaw() == 2**63 - 1  # the largest int64 is a count


@pytest.mark.parametrize("where", ["freeze", "thaw"])
async def test_13_an_out_of_range_count_is_never_reported(where: str) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject(f"guest-fsfreeze-{where}", AgentFault.reply(2**70, apply=True))
        result: SnapshotResult = await SnapshotOrchestrator(
            mon, agent=vm.agent_address, agent_timeout=1
        ).snapshot(snap(vm))
        assert result.quiesced and result.frozen == 1 and result.thawed == 1
        assert result.freeze_resolved is (where == "freeze")
        assert result.freeze_state is FreezeState.THAWED
        assert result.transaction_state is TransactionState.APPLIED
        assert not vm.agent.frozen


@pytest.mark.parametrize(
    "address",
    [("127.0.0.1", 70000), ("127.0.0.1", -1), ("127.0.0.1", True), "/tmp/a\0b", "/tmp/\ud800",
     ("vsock", 2**32, 1), ("vsock", 3, -1)],
    ids=["port-70000", "port-minus-1", "port-bool", "nul-in-path", "surrogate", "cid", "vsock-port"],
)
async def test_8_a_bad_agent_address_is_refused_when_the_orchestrator_is_made(
    fake_vm: FakeVM, address: object
) -> None:
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        with pytest.raises(UsageError):
            SnapshotOrchestrator(mon, agent=address)  # type: ignore[arg-type]
