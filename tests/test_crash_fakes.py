"""Crash safety with the fakes (issue 13): the journal's files, recover's decisions, the
freeze guard's protocol, the orchestrator killed or stuck in a child process (tests/crash_driver.py)
against a FakeVM served by this process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import qmpagent
from qmpagent import (
    GuestAgent,
    JournalError,
    Monitor,
    SnapshotOrchestrator,
    UnsettledOperationError,
    recover,
)
from qmpagent.guard import GRACE, FreezeGuard
from qmpagent.journal import Entry, GuardRecord, Journal, OverlayRecord, VMIdentity, identify_vm
from qmpagent.testing import FakeVM

DRIVER = str(Path(__file__).with_name("crash_driver.py"))


# --- the journal ------------------------------------------------------------------------------


def _entry(op: str = "0123456789abcdef", **kw: Any) -> Entry:
    fields: dict[str, Any] = {
        "op": op, "vm": VMIdentity(qmp="/x/qmp.sock", pid=4242, pid_start=7),
        "owner_pid": 0, "owner_start": None,
        "overlays": [OverlayRecord("disk0", "qa1o0", "qa1f0", "/x/o.qcow2")],
    }
    fields.update(kw)
    return Entry(**fields)


def test_journal_round_trip_and_removal(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    e = _entry()
    j.write(e)
    (got,) = list(j.scan())
    assert isinstance(got, Entry) and got.op == e.op and got.overlays == e.overlays
    assert got.vm == e.vm and got.step == "prepare"
    j.write_guard(GuardRecord(op=e.op, result="thawed", thawed=1, reason="x", at=1.0))
    assert [type(x) for x in j.scan()] == [Entry]  # the guard record goes with its entry
    rec = j.guard_record(e.op)
    assert rec is not None and rec.thawed == 1
    j.remove(e.op)
    assert list(j.scan()) == [] and os.listdir(j.directory) == []
    assert list(Journal(tmp_path / "none").scan()) == []  # no directory: nothing


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("op-0123456789abcdef.json", b'{"format": "qmpagent-journal", "vers'),  # torn
        ("op-0123456789abcdef.json", b'{"format": "something-else"}'),  # foreign
        ("op-0123456789abcdef.json", b'{"format": "qmpagent-journal", "version": 99}'),
        ("op-0123456789abcdef.json", b"\xff\xfe garbage"),
        ("op-0123456789abcdef.json", b"[]"),
        ("op-0123456789abcdef.json", b"x" * 300_000),  # too big to be ours
        ("notes.txt", b"hello"),
        ("op-fedcba9876543210.guard.json", b"{}"),  # a guard record without its entry
    ],
)
def test_torn_or_foreign_files_are_named_errors_and_left_alone(
    tmp_path: Path, name: str, content: bytes
) -> None:
    (tmp_path / name).write_bytes(content)
    (err,) = list(Journal(tmp_path).scan())
    assert isinstance(err, JournalError)
    assert err.path == str(tmp_path / name) and name in str(err)
    assert (tmp_path / name).read_bytes() == content


def test_wrong_types_in_an_entry_are_errors(tmp_path: Path) -> None:
    raw = _entry().to_json()
    raw["overlays"] = [{"disk": 1}]
    (tmp_path / "op-0123456789abcdef.json").write_text(json.dumps(raw))
    (err,) = list(Journal(tmp_path).scan())
    assert (isinstance(err, JournalError) and "overlay" in str(err)) or "disk" in str(err)
    raw = _entry().to_json()
    (tmp_path / "op-0123456789abcdef.json").write_text(json.dumps(raw))
    (tmp_path / "op-0123456789abcdef.json").rename(tmp_path / "op-1111111111111111.json")
    (err,) = list(Journal(tmp_path).scan())
    assert isinstance(err, JournalError) and "file name" in str(err)


def test_stale_temporary_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / ".op-0123456789abcdef.json.999999999.ab12.tmp"
    mine = tmp_path / f".op-0123456789abcdef.json.{os.getpid()}.ab12.tmp"
    dead.write_text("{")
    mine.write_text("{")
    assert list(Journal(tmp_path).scan()) == []
    assert not dead.exists() and mine.exists()


def test_vm_identity_matching() -> None:
    a = VMIdentity(qmp="/a", pid=10, pid_start=5, name=None, uuid="u")
    assert a.matches(VMIdentity(qmp="/a", pid=10, pid_start=5, uuid="u"))
    assert not a.matches(VMIdentity(qmp="/a", pid=10, pid_start=6, uuid="u"))  # restarted QEMU
    assert not a.matches(VMIdentity(qmp="/b", pid=10, pid_start=5, uuid="u"))
    assert not a.matches(VMIdentity(qmp="/a", pid=11, pid_start=5, uuid="u"))
    assert not a.matches(VMIdentity(qmp="/a", pid=10, pid_start=5, uuid="v"))
    assert not VMIdentity().matches(VMIdentity())  # nothing known: never a match


# --- recover's decisions ----------------------------------------------------------------------


async def _identity(vm: FakeVM) -> VMIdentity:
    async with await Monitor.connect(vm.qmp_address) as mon:
        return await identify_vm(mon)


async def test_recover_when_nothing_is_wrong_changes_nothing(fake_vm: FakeVM, tmp_path: Path) -> None:
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        report = await recover(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
    assert report.clean and not report.changed and report.exit_code == 0
    assert report.to_dict()["clean"] is True and "nothing to recover" in report.render()
    assert fake_vm.agent.calls() == []  # the agent was not even connected


async def test_recover_reports_a_torn_file_and_leaves_it(fake_vm: FakeVM, tmp_path: Path) -> None:
    torn = tmp_path / "op-0123456789abcdef.json"
    torn.write_bytes(b'{"format": "qmpagent-jou')
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        report = await recover(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
    assert not report.clean and report.exit_code == 1
    assert str(torn) in report.unresolved[0] and torn.exists()


async def test_recover_thaws_a_dead_freeze_of_ours_and_removes_its_nodes(
    fake_vm: FakeVM, tmp_path: Path
) -> None:
    """A dead operation: overlay attached, freeze sent, no guard record, guest frozen."""
    ident = await _identity(fake_vm)
    path = fake_vm.workdir / "dead.qcow2"
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        await mon.run_job("blockdev-create", {"job-id": "j1", "options": {
            "driver": "file", "filename": str(path), "size": 0}})
        await mon.execute("blockdev-add", {"driver": "file", "filename": str(path), "node-name": "qadeadf0"})
        await mon.run_job("blockdev-create", {"job-id": "j2", "options": {
            "driver": "qcow2", "file": "qadeadf0", "size": 1 << 20}})
        await mon.execute("blockdev-add", {"driver": "qcow2", "node-name": "qadeado0", "file": "qadeadf0",
                                           "backing": None})
    async with await GuestAgent.connect(fake_vm.agent_address) as ga:
        assert await ga.fsfreeze_freeze() > 0
    j = Journal(tmp_path)
    j.write(_entry(vm=ident, step="freeze", freeze="not-tried",
                   overlays=[OverlayRecord("disk0", "qadeado0", "qadeadf0", str(path))]))
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        # A new snapshot refuses: it never thaws on a guess.
        orch = SnapshotOrchestrator(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
        with pytest.raises(UnsettledOperationError, match="recover"):
            await orch.snapshot({"disk0": str(fake_vm.workdir / "new.qcow2")})
        assert fake_vm.agent.frozen
        report = await recover(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
        assert report.clean, report.render()
        assert report.thawed > 0 and not fake_vm.agent.frozen
        assert report.removed_nodes == ["qadeado0", "qadeadf0"]
        assert report.removed_files == [str(path)] and not path.exists()
        assert list(j.scan()) == []
        again = await recover(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
        assert again.clean and not again.changed
        # Now the snapshot goes ahead.
        result = await orch.snapshot({"disk0": str(fake_vm.workdir / "new.qcow2")})
        assert result.quiesced and result.guarded
    assert fake_vm.new_nodes() == set(result.overlays.values()) | {
        "f".join(n.rsplit("o", 1)) for n in result.overlays.values()
    }


async def test_a_guard_record_or_a_foreign_entry_prevents_any_thaw(fake_vm: FakeVM, tmp_path: Path) -> None:
    ident = await _identity(fake_vm)
    j = Journal(tmp_path)
    j.write(_entry(op="1" * 16, vm=ident, step="freeze", overlays=[]))
    j.write_guard(GuardRecord(op="1" * 16, result="not-frozen", reason="the orchestrator died"))
    other = VMIdentity(qmp="/elsewhere/qmp.sock", pid=ident.pid, pid_start=ident.pid_start)
    j.write(_entry(op="2" * 16, vm=other, step="freeze", overlays=[]))
    async with await GuestAgent.connect(fake_vm.agent_address) as ga:
        assert await ga.fsfreeze_freeze() > 0  # someone else's freeze, later
        async with await Monitor.connect(fake_vm.qmp_address) as mon:
            report = await recover(mon, agent=ga, journal_dir=tmp_path)
        assert report.clean and report.thawed == 0 and report.settled == ["1" * 16]
        assert report.other_vms == 1 and "other VMs" in report.render()
        assert fake_vm.agent.frozen
        await ga.fsfreeze_thaw()
    assert [e.op for e in j.scan() if isinstance(e, Entry)] == ["2" * 16]  # not this VM's


async def test_an_operation_still_running_is_left_alone(fake_vm: FakeVM, tmp_path: Path) -> None:
    ident = await _identity(fake_vm)
    j = Journal(tmp_path)
    from qmpagent.journal import process_start_time

    j.write(_entry(vm=ident, owner_pid=os.getpid(), owner_start=process_start_time(os.getpid())))
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        report = await recover(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
        assert not report.clean and report.in_progress and report.exit_code == 1
        orch = SnapshotOrchestrator(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
        with pytest.raises(UnsettledOperationError, match="still running"):
            await orch.snapshot({"disk0": str(fake_vm.workdir / "n.qcow2")})
    assert len(list(j.scan())) == 1


async def test_a_torn_file_does_not_block_snapshots_but_is_reported(fake_vm: FakeVM, tmp_path: Path) -> None:
    (tmp_path / "op-0123456789abcdef.json").write_text("{")
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
        result = await orch.snapshot({"disk0": str(fake_vm.workdir / "n.qcow2")})
    assert result.quiesced
    assert any("op-0123456789abcdef.json" in w for w in result.warnings)


async def test_a_finished_snapshot_leaves_no_journal(fake_vm: FakeVM, tmp_path: Path) -> None:
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
        result = await orch.snapshot({"disk0": str(fake_vm.workdir / "n.qcow2")})
        assert result.guarded and result.quiesced
        fake_vm.qmp.fail("transaction", "refused by the test")
        with pytest.raises(qmpagent.SnapshotError):
            await orch.snapshot({"vblk0": str(fake_vm.workdir / "m.qcow2")})
    assert os.listdir(tmp_path) == []


# --- the guard's protocol, with a fake agent -----------------------------------------------


async def test_guard_thaws_a_stuck_orchestrator_and_reports(fake_vm: FakeVM, tmp_path: Path) -> None:
    async with await GuestAgent.connect(fake_vm.agent_address) as ga:
        fd = ga.socket_fileno()
        assert fd is not None
        guard = FreezeGuard()
        guard.start(fd, "a" * 16, tmp_path, thaw_timeout=5.0)
        try:
            assert await guard.wait_ready(timeout=30)
            deadline = time.monotonic() + 0.3
            assert guard.arm(deadline)
            assert await ga.fsfreeze_freeze() > 0
            ga.hold_reading(True)  # what the orchestrator does after its freeze
            # "Stuck": we do not touch the agent; the guard acts at the deadline + grace.
            with anyio.fail_after(10):
                while fake_vm.agent.frozen:  # noqa: ASYNC110 - a condition, bounded
                    await asyncio.sleep(0.01)
            assert time.monotonic() - deadline < GRACE + 1.0
            with guard.turn() as mine:
                assert not mine  # the guard has the agent now
            res = await guard.wait_result(timeout=10)
            assert res is not None and res.result == "thawed" and res.thawed > 0
            rec = Journal(tmp_path).guard_record("a" * 16)
            assert rec is not None and rec.result == "thawed" and rec.reason == "deadline"
        finally:
            await guard.close()
        assert not guard.alive
        # Our connection still works after a resync (the guard's replies were its own).
        ga.hold_reading(False)
        await ga.sync()
        assert await ga.fsfreeze_status() == "thawed"


async def test_guard_disarmed_then_done_does_nothing(fake_vm: FakeVM, tmp_path: Path) -> None:
    async with await GuestAgent.connect(fake_vm.agent_address) as ga:
        guard = FreezeGuard()
        fd = ga.socket_fileno()
        assert fd is not None
        guard.start(fd, "b" * 16, tmp_path, thaw_timeout=5.0)
        assert await guard.wait_ready(timeout=30)
        guard.arm(time.monotonic() + 0.1)
        await ga.fsfreeze_freeze()
        with guard.turn() as mine:
            assert mine
            await ga.fsfreeze_thaw()
            guard.disarm()
        await ga.fsfreeze_freeze()  # somebody else's freeze now (same agent)
        await asyncio.sleep(0.1 + GRACE + 0.2)
        assert fake_vm.agent.frozen  # never thawed by the guard
        await guard.close()
        assert not guard.alive and guard.result is None
        await ga.fsfreeze_thaw()
    assert os.listdir(tmp_path) == []


# --- the orchestrator in a child process, killed or stuck --------------------------------------


async def _drive(vm: FakeVM, journal: Path, *args: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, DRIVER, str(vm.qmp_address), str(vm.agent_address),
        str(vm.workdir / "o.qcow2"), "--disk", "disk0", "--journal", str(journal), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    with anyio.fail_after(120):
        out, err = await proc.communicate()
    events = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
    assert proc.returncode is not None
    return proc.returncode, events, err.decode(errors="replace")


async def _wait_thawed(vm: FakeVM, timeout: float = 5.0) -> float:
    t = time.monotonic()
    with anyio.fail_after(timeout):
        while vm.agent.frozen:  # noqa: ASYNC110 - a condition, bounded
            await asyncio.sleep(0.005)
    return time.monotonic() - t


@pytest.mark.parametrize("point", ["agent:freeze", "phase:transaction:start", "qmp:transaction:1",
                                   "qmp:blockdev-add:2"])
async def test_killed_orchestrator_is_thawed_and_recovered(
    fake_vm: FakeVM, tmp_path: Path, point: str
) -> None:
    rc, events, err = await _drive(fake_vm, tmp_path, "--kill", point)
    assert rc == -9, (events, err)
    await _wait_thawed(fake_vm)
    kill = next(e for e in events if e["event"] == "kill")
    if any(e["event"] == "freeze-sent" for e in events):
        rec = Journal(tmp_path).guard_record(next(
            e.op for e in Journal(tmp_path).scan() if isinstance(e, Entry)))
        assert rec is not None and rec.at - kill["at"] < 1.0
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        report = await recover(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
    assert report.clean, report.render()
    assert os.listdir(tmp_path) == []
    applied = bool(report.kept_overlays)
    assert (fake_vm.active_node(0) != "disk0") == applied
    if not applied:
        assert fake_vm.new_nodes() == set() and fake_vm.new_files() == set()


async def test_stuck_loop_is_thawed_at_the_deadline(fake_vm: FakeVM, tmp_path: Path) -> None:
    rc, events, err = await _drive(fake_vm, tmp_path, "--sleep", "transaction:2.5",
                                   "--freeze-timeout", "0.5")
    error = next(e for e in events if e["event"] == "error")
    assert rc == 1 and "exceeded freeze_timeout" in error["message"], (events, err)
    assert error["thawed"] > 0 and error["freeze_state"] == "thawed"
    freeze = fake_vm.agent.calls("guest-fsfreeze-freeze")[-1]
    thaws = fake_vm.agent.calls("guest-fsfreeze-thaw")
    assert len(thaws) == 1  # the guard's; the orchestrator never sent one of its own
    assert thaws[0].time - freeze.time < 0.5 + 1.0
    assert os.listdir(tmp_path) == [] and fake_vm.new_nodes() == set()


async def test_killed_guard_is_reported(fake_vm: FakeVM, tmp_path: Path) -> None:
    rc, events, err = await _drive(fake_vm, tmp_path, "--kill-guard", "transaction")
    res = next(e for e in events if e["event"] == "result")
    assert rc == 0 and res["quiesced"] and not res["guarded"], (events, err)
    assert any("freeze guard died" in w for w in res["warnings"])
    assert not fake_vm.agent.frozen and os.listdir(tmp_path) == []


async def test_killed_with_the_freeze_in_flight_over_a_foreign_freeze(
    fake_vm: FakeVM, tmp_path: Path
) -> None:
    mp = fake_vm.agent.mountpoints[0]
    fake_vm.agent.freeze_foreign(mp)
    rc, _, err = await _drive(fake_vm, tmp_path, "--kill", "agent:freeze", "--quiesce", "preferred")
    assert rc == -9, err
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        report = await recover(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
    assert report.clean and report.thawed == 0, report.render()
    assert fake_vm.agent.foreign_frozen == [mp]  # left alone by the guard and by recover


async def test_recover_without_an_agent_says_the_guest_may_be_frozen(fake_vm: FakeVM, tmp_path: Path) -> None:
    ident = await _identity(fake_vm)
    Journal(tmp_path).write(_entry(vm=ident, step="freeze", overlays=[]))
    await fake_vm.stop_agent()
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        report = await recover(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
        assert report.guest_may_be_frozen and report.exit_code == 8
        assert "MAY BE FROZEN" in report.render()
        doc = json.loads(json.dumps(report.to_dict()))
        assert doc["exit_code"] == 8 and doc["unresolved"]
        report = await recover(mon, agent=None, journal_dir=tmp_path)
        assert report.exit_code == 8
    assert len(list(Journal(tmp_path).scan())) == 1  # kept for a later recover
    await fake_vm.start_agent()
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        report = await recover(mon, agent=fake_vm.agent_address, journal_dir=tmp_path)
    assert report.clean and report.thawed == 0 and report.exit_code == 0


async def test_loop_blocked_with_the_transaction_in_flight(fake_vm: FakeVM, tmp_path: Path) -> None:
    """The transaction is applied while this process is stuck; the guard thaws at the deadline:
    the snapshot exists but is not guaranteed quiesced (required: an error saying so)."""
    rc, events, err = await _drive(fake_vm, tmp_path, "--block", "qmp:transaction:1:2.5",
                                   "--freeze-timeout", "0.5")
    error = next((e for e in events if e["event"] == "error"), None)
    assert rc == 1 and error is not None, (events, err)
    assert "not guaranteed quiesced" in error["message"] and error["snapshot_taken"] is True
    assert error["thawed"] > 0 and not fake_vm.agent.frozen
    assert len(fake_vm.agent.calls("guest-fsfreeze-thaw")) == 1  # the guard's
    assert fake_vm.active_node(0) != "disk0"  # the VM runs on the overlay: a consistent chain
    assert os.listdir(tmp_path) == []
