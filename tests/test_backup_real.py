"""Backups on the real guest (issue 15): real QEMU block jobs and dirty bitmaps, the real
qemu-ga, the in-guest writer running. One guest for the module; the scenarios run in order
(the incremental builds on the full backup) and leave the guest thawed.

Point-in-time consistency is proved from inside: the writer's log read out of the backup is
the live log up to the freeze (continuous, short of at most the one record in flight) and holds
nothing the writer wrote after it; the backup's filesystem passes ``e2fsck -fn``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from qmpagent import (
    BackupError,
    BackupResult,
    FreezeStatus,
    GuestAgent,
    Monitor,
    SnapshotOrchestrator,
)
from qmpagent.testing import Guest, WriterLog, boot_guest, check_backup_chain, read_backup_file
from qmpagent.testing.pytest_plugin import require_guest_image

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope="module")]

TIMEOUT = 60.0
MIB = 1 << 20


@dataclass
class Rig:
    guest: Guest
    mon: Monitor
    ga: GuestAgent
    orch: SnapshotOrchestrator
    state: Path
    backups: dict[str, BackupResult]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    require_guest_image()
    async with (
        boot_guest() as guest,
        await Monitor.connect(guest.qmp_path, command_timeout=TIMEOUT) as mon,
        await GuestAgent.connect(guest.agent_path, timeout=30) as ga,
    ):
        # Data for the copy to copy (a disk of zeros would be copied as zero clusters).
        await guest.run("head -c 24000000 /dev/urandom > /mnt/data/fill.bin; sync", 120)
        orch = SnapshotOrchestrator(mon, agent=ga, agent_timeout=30)
        yield Rig(guest, mon, ga, orch, tmp_path_factory.mktemp("backup-state"), {})


def target(rig: Rig, name: str) -> str:
    return str(rig.guest.workdir / f"{name}.qcow2")


async def bitmap_count(rig: Rig) -> int:
    nodes = {n["node-name"]: n for n in await rig.mon.execute("query-named-block-nodes", {"flat": True})}
    (bm,) = [b for b in nodes["disk0"].get("dirty-bitmaps", []) if b["name"] == "qmpagent"]
    assert bm["persistent"] and not bm["busy"]
    return int(bm["count"])


async def leftovers(rig: Rig) -> tuple[set[str], list[Any]]:
    nodes = {n.node_name for n in await rig.mon.named_block_nodes()}
    ours = {n for n in nodes if n.startswith("qa")}
    return ours, await rig.mon.execute("query-jobs")


@dataclass
class Clock:
    """The guest's uptime (the writer's clock) around the freeze."""

    start: float  # before the backup started
    freeze: float = 0.0  # right before the freeze request was sent
    frozen: float = 0.0  # right after the freeze replied (the guest is frozen)


async def backup_while_writing(rig: Rig, name: str, **kwargs: Any) -> tuple[BackupResult, WriterLog, Clock]:
    """A backup of disk0 while the writer runs: the result, the live log afterwards, and the
    guest's clock around the freeze (read through the rig's control channel, not the agent)."""
    g, ga = rig.guest, rig.ga
    clock = Clock(await g.uptime())
    await g.wait_writer_progress(clock.start + 0.3)
    freeze = ga.fsfreeze_freeze

    async def clocked_freeze(*args: Any, **kw: Any) -> int:
        clock.freeze = await g.uptime()
        n = await freeze(*args, **kw)
        clock.frozen = await g.uptime()
        return n

    setattr(ga, "fsfreeze_freeze", clocked_freeze)  # noqa: B010 - an instance attribute
    try:
        res = await rig.orch.backup({"vblk0": target(rig, name)}, state_dir=rig.state, **kwargs)
    finally:
        delattr(ga, "fsfreeze_freeze")
    after = await g.uptime()
    live = await g.wait_writer_progress(after + 0.3)
    return res, live, clock


async def assert_point_in_time(rig: Rig, res: BackupResult, live: WriterLog, clock: Clock) -> WriterLog:
    """The writer's log inside the backup is the live log up to the freeze, continuous, at most
    one record short of what was written before the freeze, and holds nothing written once
    the guest was frozen; the filesystem is clean."""
    text, fsck = await read_backup_file(res.targets["vblk0"], "/writer.log",
                                        rig.guest.workdir / "check.raw",
                                        qemu_img=rig.guest.command("qemu-img"))
    assert fsck is None, fsck
    inside = WriterLog.parse(text)
    assert inside.entries, text[:200]
    seqs = [n for n, _ in inside.entries]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the backup's log has a hole"
    last = inside.entries[-1]
    by_seq = {n: (n, t) for n, t in live.entries}
    assert all(by_seq.get(n) == (n, t) for n, t in inside.entries), "the backup is not the live log"
    tick = 0.011  # /proc/uptime has 10 ms steps
    # Nothing written once the guest was frozen.
    assert last[1] <= clock.frozen + tick, (last, clock)
    # Everything written before the freeze was requested, but at most one record.
    before = [n for n, t in live.entries if t < clock.freeze - tick]
    assert before and last[0] >= before[-1] - 1, (last, before[-1:], clock)
    return inside


async def test_full_backup_while_the_guest_writes(rig: Rig) -> None:
    res, live, clock = await backup_while_writing(rig, "full", speed=16 * MIB)
    assert res.quiesced and res.freeze_owner == "self" and res.frozen == res.thawed == 1
    assert res.freeze_window is not None and res.freeze_window < 2
    assert res.bytes_copied == {"vblk0": 64 * MIB} and res.incremental == {"vblk0": False}
    # The copy took much longer than the freeze, and the guest was frozen only for the window.
    assert res.timings.copy > 1.0 > res.freeze_window
    assert live.largest_gap(after=clock.start) <= res.timings.freeze + res.freeze_window + 1.0
    report = await check_backup_chain(res.targets["vblk0"], expect_length=1,
                                      qemu_img=rig.guest.command("qemu-img"))
    assert report.ok, report.problems
    await assert_point_in_time(rig, res, live, clock)
    assert await rig.ga.fsfreeze_status() is FreezeStatus.THAWED
    assert await leftovers(rig) == (set(), [])
    rig.backups["full"] = res


async def test_incremental_is_small_and_restores_the_new_contents(rig: Rig) -> None:
    full = rig.backups["full"]
    await rig.guest.run("yes qmpagent-incremental | head -c 1048576 > /mnt/data/inc.bin; sync", TIMEOUT)
    res, live, clock = await backup_while_writing(rig, "inc1", since=full.targets)
    assert res.quiesced and res.incremental == {"vblk0": True}
    assert res.since == full.targets
    # Only what changed: the 1 MiB file, the writer's appends, metadata; far less than the disk.
    assert MIB <= res.bytes_copied["vblk0"] <= 6 * MIB, res.bytes_copied
    assert Path(res.targets["vblk0"]).stat().st_size < 8 * MIB
    report = await check_backup_chain(res.targets["vblk0"], expect_length=2,
                                      qemu_img=rig.guest.command("qemu-img"))
    assert report.ok, report.problems
    assert report.chain == (res.targets["vblk0"], full.targets["vblk0"])
    inside = await assert_point_in_time(rig, res, live, clock)
    text, _ = await read_backup_file(res.targets["vblk0"], "/inc.bin", rig.guest.workdir / "c.raw",
                                     fsck=False, qemu_img=rig.guest.command("qemu-img"))
    assert text == ("qmpagent-incremental\n" * 50000)[:1048576]
    # The chain carries the full backup's data too (the random fill is read through it).
    full_log, _ = await read_backup_file(full.targets["vblk0"], "/writer.log",
                                         rig.guest.workdir / "f.raw", fsck=False,
                                         qemu_img=rig.guest.command("qemu-img"))
    assert len(inside.entries) > len(WriterLog.parse(full_log).entries)
    rig.backups["inc1"] = res


async def test_foreign_freeze_is_kept(rig: Rig) -> None:
    assert await rig.ga.fsfreeze_freeze() == 1  # someone else's freeze
    try:
        res = await rig.orch.backup({"vblk0": target(rig, "frozen")}, state_dir=rig.state,
                                    since=rig.backups["inc1"].targets)
        assert res.quiesced and res.freeze_owner == "external" and res.frozen == res.thawed == 0
        assert await rig.ga.fsfreeze_status() is FreezeStatus.FROZEN
    finally:
        assert await rig.ga.fsfreeze_thaw() == 1
    rig.backups["frozen"] = res


@pytest.mark.parametrize("how", ["cancelled", "failed"])
async def test_a_cancelled_or_failed_incremental_leaves_nothing_and_loses_no_bits(rig: Rig, how: str) -> None:
    last = rig.backups["frozen"]
    await rig.guest.run(f"yes {how} | head -c 2097152 > /mnt/data/{how}.bin; sync", TIMEOUT)
    count = await bitmap_count(rig)
    assert count >= 2 * MIB
    path = target(rig, how)
    task = asyncio.ensure_future(rig.orch.backup(
        {"vblk0": path}, since=last.targets, state_dir=rig.state, speed=256 * 1024,
        progress_interval=0.1))
    # Wait until the copy runs, then stop it: our cancel, or QEMU's job failing under us.
    for _ in range(600):
        jobs = await rig.mon.execute("query-jobs")
        if jobs and jobs[0]["status"] == "running" and jobs[0]["current-progress"] > 0:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the copy did not start")
    if how == "cancelled":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        await rig.mon.execute("job-cancel", {"id": jobs[0]["id"]})  # as if the job failed
        with pytest.raises(BackupError) as err:
            await task
        assert err.value.stage == "copy"
    assert not Path(path).exists()
    assert await leftovers(rig) == (set(), [])
    assert await rig.ga.fsfreeze_status() is FreezeStatus.THAWED
    # No dirty bit lost: at least what was dirty before, and the next incremental has the file.
    assert await bitmap_count(rig) >= count
    res = await rig.orch.backup({"vblk0": path}, since=last.targets, state_dir=rig.state)
    text, _ = await read_backup_file(path, f"/{how}.bin", rig.guest.workdir / "c.raw", fsck=False,
                                     qemu_img=rig.guest.command("qemu-img"))
    assert text == (f"{how}\n" * 400000)[:2097152]
    rig.backups["frozen"] = res


async def test_pull_mode_exports_the_frozen_view_over_nbd(rig: Rig) -> None:
    g, ga = rig.guest, rig.ga
    clock = Clock(await g.uptime())
    await g.wait_writer_progress(clock.start + 0.3)
    freeze = ga.fsfreeze_freeze

    async def clocked_freeze(*args: Any, **kw: Any) -> int:
        clock.freeze = await g.uptime()
        n = await freeze(*args, **kw)
        clock.frozen = await g.uptime()
        return n

    image = target(rig, "fleece")
    setattr(ga, "fsfreeze_freeze", clocked_freeze)  # noqa: B010 - an instance attribute
    try:
        export = rig.orch.export({"vblk0": image}, socket=str(g.workdir / "nbd.sock"))
        async with export as res:
            delattr(ga, "fsfreeze_freeze")
            assert res.quiesced and res.freeze_owner == "self"
            assert await ga.fsfreeze_status() is FreezeStatus.THAWED
            first, fsck = await read_backup_file(res.uris["vblk0"], "/writer.log", g.workdir / "n.raw",
                                                 qemu_img=g.command("qemu-img"))
            assert fsck is None, fsck
            live = await g.wait_writer_progress(clock.frozen + 0.5)  # the guest writes on
            again, _ = await read_backup_file(res.uris["vblk0"], "/writer.log", g.workdir / "n.raw",
                                              fsck=False, qemu_img=g.command("qemu-img"))
            assert again == first  # the view stays at the freeze
            inside = WriterLog.parse(first)
            last = inside.entries[-1]
            assert last[1] <= clock.frozen + 0.011 < live.last_uptime
            before = [n for n, t in live.entries if t < clock.freeze - 0.011]
            assert last[0] >= before[-1] - 1
    finally:
        if hasattr(ga, "fsfreeze_freeze") and "fsfreeze_freeze" in vars(ga):
            delattr(ga, "fsfreeze_freeze")
    assert not Path(image).exists()
    assert await leftovers(rig) == (set(), [])
    assert await rig.mon.execute("query-block-exports") == []


_DRIVER = """
import asyncio, sys
from qmpagent import Monitor, SnapshotOrchestrator

async def main(qmp, target, since, state, journal):
    async with await Monitor.connect(qmp) as mon:
        orch = SnapshotOrchestrator(mon, journal_dir=journal)
        await orch.backup({"vblk0": target}, since={"vblk0": since}, quiesce="off",
                          state_dir=state, speed=128 * 1024)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_recover_settles_a_backup_whose_process_was_killed(rig: Rig) -> None:
    """A backup process SIGKILLed during its copy (on the rig's second QMP socket): its job
    goes on in QEMU until recover ends it; the target node and file are removed, the bitmap
    keeps every bit, and the next incremental since the last completed backup is whole."""
    import sys

    from qmpagent import recover

    g = rig.guest
    last = rig.backups["frozen"]
    await g.run("yes killed | head -c 1048576 > /mnt/data/killed.bin; sync", TIMEOUT)
    count = await bitmap_count(rig)
    path = target(rig, "killed")
    journal = rig.state / "journal"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DRIVER, str(g.workdir / "rig-qmp.sock"), path,
        last.targets["vblk0"], str(rig.state), str(journal))
    try:
        for _ in range(600):
            jobs = await rig.mon.execute("query-jobs")
            if jobs and jobs[0]["status"] == "running" and jobs[0]["current-progress"] > 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the copy did not start")
    finally:
        proc.kill()
        await proc.wait()
    assert Path(path).exists() and (await rig.mon.execute("query-jobs"))[0]["status"] == "running"
    # Through the socket the dead process used: its journal entry names the VM by it.
    async with await Monitor.connect(g.workdir / "rig-qmp.sock", command_timeout=TIMEOUT) as mon:
        report = await recover(mon, agent=rig.ga, journal_dir=journal)
    assert report.clean, report.render()
    assert path in report.removed_files and not Path(path).exists()
    assert await leftovers(rig) == (set(), [])
    assert await bitmap_count(rig) >= count
    res = await rig.orch.backup({"vblk0": path}, since=last.targets, state_dir=rig.state)
    text, _ = await read_backup_file(path, "/killed.bin", g.workdir / "c.raw", fsck=False,
                                     qemu_img=g.command("qemu-img"))
    assert text == ("killed\n" * 200000)[:1048576]
    rig.backups["frozen"] = res


async def test_zz_backup_files_are_left_for_the_caller(rig: Rig) -> None:
    for res in rig.backups.values():
        assert Path(res.targets["vblk0"]).exists()
    with contextlib.suppress(FileNotFoundError):
        (rig.guest.workdir / "check.raw").unlink()
