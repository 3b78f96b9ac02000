"""Issue 15: backups on the fake VM (``orch.backup``): full and incremental, the freeze rules of
snapshots, failure and cancellation leave nothing behind and lose no dirty bits, ``since`` checks."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from qmpagent import (
    BackupChainError,
    BackupError,
    BackupResult,
    FreezeState,
    JobProgress,
    Monitor,
    SnapshotError,
    SnapshotOrchestrator,
    UsageError,
)
from qmpagent.testing import AgentFault, FakeVM, create_qcow2_image
from qmpagent.testing.fake_qmp import FakeBackupJob

MIB = 1 << 20


def targets(vm: FakeVM, name: str) -> dict[str, str]:
    return {d.device_id: str(vm.workdir / f"{name}{i}.qcow2") for i, d in enumerate(vm.disks)}


def assert_clean(vm: FakeVM, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """No node or job of ours left; no file but the completed backups ``keep``."""
    assert vm.new_nodes() == set(), vm.new_nodes()
    assert {str(p) for p in vm.new_files()} == set(keep), vm.new_files()
    assert not vm.qmp.jobs, vm.qmp.jobs
    assert [vm.active_node(i) for i in range(len(vm.disks))] == [d.node_name for d in vm.disks]
    assert not vm.agent.frozen


def backup_transaction(vm: FakeVM) -> list[dict[str, object]]:
    return [t for t in vm.transactions if any(a["type"] == "blockdev-backup" for a in t.actions)][-1].actions


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


async def test_full_backup_inside_one_transaction_under_the_freeze(state: Path) -> None:
    async with FakeVM(disks=2) as vm, await Monitor.connect(vm.qmp_address) as mon:
        phases: list[tuple[str, float | None]] = []
        progress: list[tuple[str, JobProgress]] = []
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        res = await orch.backup(targets(vm, "full"), state_dir=state, progress_interval=0.01,
                                on_phase=lambda n, s: phases.append((n, s)),
                                on_progress=lambda d, p: progress.append((d, p)))
        assert isinstance(res, BackupResult)
        assert res.quiesced and res.freeze_owner == "self" and res.reason is None
        assert res.frozen == res.thawed == 2
        assert res.guarded and res.warnings == ()  # the freeze guard stood by, as for a snapshot
        assert not list(Path(os.environ["XDG_STATE_HOME"], "qmpagent").glob("op-*.json"))
        assert res.freeze_window is not None and res.freeze_window < 1
        assert res.targets == targets(vm, "full")
        assert res.incremental == {"vblk0": False, "vblk1": False}
        assert res.bytes_copied == {"vblk0": 64 * MIB, "vblk1": 64 * MIB}
        # One transaction, inside the freeze: per disk, a persistent bitmap and a full copy.
        tx = [t for t in vm.transactions]
        assert len(tx) == 1 and tx[0].guest_frozen and tx[0].error is None
        kinds = [(a["type"], a["data"]["node"] if "node" in a["data"] else a["data"]["device"])
                 for a in tx[0].actions]
        assert kinds == [("block-dirty-bitmap-add", "disk0"), ("blockdev-backup", "disk0"),
                         ("block-dirty-bitmap-add", "disk1"), ("blockdev-backup", "disk1")]
        assert tx[0].actions[0]["data"]["persistent"] is True
        assert tx[0].actions[1]["data"]["sync"] == "full"
        # The thaw came right after the transaction, before the copy's phase.
        names = [n for n, s in phases if s is None]
        assert names == ["preflight", "prepare", "freeze", "transaction", "thaw", "copy"]
        assert {d for d, _ in progress} == {"vblk0", "vblk1"}
        assert progress[-1][1].current == progress[-1][1].total
        assert res.timings.copy > 0
        # Nothing left but the two complete targets (qcow2 files, nodes detached).
        assert_clean(vm, set(res.targets.values()))
        for path in res.targets.values():
            assert Path(path).read_bytes()[:4] == b"QFI\xfb"
        assert vm.qmp.backups.bitmap("disk0", "qmpagent") is not None


async def test_incremental_copies_only_the_changes_and_resets_the_bitmap(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        full = await orch.backup(targets(vm, "full"), state_dir=state)
        vm.qmp.backups.guest_write("disk0", 0, 3 * 65536)  # three clusters changed
        inc = await orch.backup(targets(vm, "inc"), since=full.targets, state_dir=state)
        assert inc.incremental == {"vblk0": True} and inc.since == full.targets
        assert inc.bytes_copied == {"vblk0": 3 * 65536}
        actions = backup_transaction(vm)
        assert actions == [{"type": "blockdev-backup", "data": {
            "job-id": actions[0]["data"]["job-id"], "device": "disk0",  # type: ignore[index]
            "target": actions[0]["data"]["target"], "sync": "incremental",  # type: ignore[index]
            "auto-dismiss": False, "speed": 1,  # held until the thaw
            "bitmap": "qmpagent", "bitmap-mode": "on-success"}}]
        # Released once the guest was thawed (unlimited: no speed asked for).
        (release,) = vm.qmp.commands("block-job-set-speed")[-1:]
        assert release.arguments == {"device": actions[0]["data"]["job-id"], "speed": 0}  # type: ignore[index]
        bm = vm.qmp.backups.bitmap("disk0", "qmpagent")
        assert bm is not None and bm.dirty == set()  # reset by the completed copy
        # The incremental's backing file is the full backup (a qcow2 header field).
        create = [c for c in vm.qmp.commands("blockdev-create")
                  if c.arguments["options"].get("driver") == "qcow2"][-1]
        assert create.arguments["options"]["backing-file"] == full.targets["vblk0"]
        # And the next one is since the incremental, not the full.
        vm.qmp.backups.guest_write("disk0", 10 * 65536, 1)
        with pytest.raises(BackupChainError, match="not the last backup"):
            await orch.backup(targets(vm, "inc2"), since=full.targets, state_dir=state)
        inc2 = await orch.backup(targets(vm, "inc2"), since=inc.targets, state_dir=state)
        assert inc2.bytes_copied == {"vblk0": 65536}
        assert_clean(vm, {*full.targets.values(), *inc.targets.values(), *inc2.targets.values()})


async def test_writes_during_the_copy_are_kept_for_the_next_incremental(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.qmp.backups.rate = 64 * MIB / 0.3  # the full copy takes 0.3 s

        def write_during_copy(name: str, seconds: float | None) -> None:
            if name == "copy" and seconds is None:
                vm.qmp.backups.guest_write("disk0", 5 * 65536, 10)

        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        await orch.backup(targets(vm, "full"), state_dir=state, on_phase=write_during_copy)
        bm = vm.qmp.backups.bitmap("disk0", "qmpagent")
        assert bm is not None and bm.dirty == {5}


@pytest.mark.parametrize("incremental", [False, True])
async def test_a_failed_copy_leaves_nothing_and_loses_no_dirty_bits(state: Path, incremental: bool) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        keep: set[str] = set()
        since = None
        if incremental:
            since = (await orch.backup(targets(vm, "full"), state_dir=state)).targets
            keep = set(since.values())
        vm.qmp.backups.guest_write("disk0", 0, 2 * 65536)
        vm.qmp.backups.rate = 64 * MIB / 0.2
        vm.qmp.backups.fail_next("Input/output error", after=0.5)
        with pytest.raises(BackupError, match="Input/output error") as err:
            await orch.backup(targets(vm, "b"), since=since, state_dir=state)
        assert err.value.stage == "copy"
        assert err.value.record.phase == "copy"
        assert err.value.record.freeze_state is FreezeState.THAWED  # thawed long before
        assert err.value.record.files_removed == [str(vm.workdir / "b0.qcow2")]
        assert_clean(vm, keep)
        bm = vm.qmp.backups.bitmap("disk0", "qmpagent")
        if incremental:
            # Every bit the failed incremental was to copy is still there.
            assert bm is not None and bm.dirty == {0, 1} and not bm.busy
            again = await orch.backup(targets(vm, "b"), since=since, state_dir=state)
            assert again.bytes_copied == {"vblk0": 2 * 65536}
        else:
            assert bm is None  # the bitmap this failed full backup added is removed again


async def test_a_cancelled_backup_removes_its_targets_and_keeps_the_bits(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        full = await orch.backup(targets(vm, "full"), state_dir=state)
        vm.qmp.backups.guest_write("disk0", 0, 4 * 65536)
        vm.qmp.backups.rate = 65536  # 4 s for the four clusters
        task = asyncio.ensure_future(orch.backup(targets(vm, "inc"), since=full.targets,
                                                 state_dir=state))
        for _ in range(500):  # the copy has begun
            if any(isinstance(j, FakeBackupJob) and j.current > 0 for j in vm.qmp.jobs.values()):
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert vm.qmp.calls("job-cancel")
        assert_clean(vm, set(full.targets.values()))
        bm = vm.qmp.backups.bitmap("disk0", "qmpagent")
        assert bm is not None and bm.dirty == {0, 1, 2, 3} and not bm.busy


async def test_the_copy_is_bounded(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.qmp.backups.rate = 1.0  # never done
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        with pytest.raises(BackupError, match=r"did not complete within 0\.3s") as err:
            await orch.backup(targets(vm, "b"), state_dir=state, timeout=0.3)
        assert err.value.stage == "copy"
        assert_clean(vm)
        vm.qmp.backups.rate = 0.0  # stalled: no progress for job_timeout
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, job_timeout=0.3)
        with pytest.raises(BackupError, match=r"made no progress for 0\.3s"):
            await orch.backup(targets(vm, "b"), state_dir=state)
        assert_clean(vm)


async def test_a_foreign_freeze_is_kept(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.set_frozen(True)  # frozen by someone else (status: frozen)
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        res = await orch.backup(targets(vm, "b"), state_dir=state)
        assert res.quiesced and res.freeze_owner == "external" and res.frozen == res.thawed == 0
        assert vm.agent.frozen  # still frozen: not ours
        assert not vm.agent.calls("guest-fsfreeze-thaw")
        assert not vm.agent.calls("guest-fsfreeze-freeze")


async def test_quiesce_policies(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        await vm.stop_agent()
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        with pytest.raises(BackupError, match="quiesce required") as err:
            await orch.backup(targets(vm, "b"), state_dir=state)
        assert err.value.stage == "window"
        assert_clean(vm)
        res = await orch.backup(targets(vm, "b"), quiesce="preferred", state_dir=state)
        assert not res.quiesced and res.reason and "port is closed" in res.reason
        off = await orch.backup(targets(vm, "c"), quiesce="off", state_dir=state,
                                since=None, bitmap=None)
        assert off.reason == "quiesce is off" and off.bitmap is None
        assert not vm.agent.calls()


async def test_a_failed_transaction_thaws_and_removes_the_targets(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.qmp.fail("transaction", "Source and target image have different sizes")
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        with pytest.raises(BackupError, match="different sizes") as err:
            await orch.backup(targets(vm, "b"), state_dir=state)
        assert err.value.record.freeze_state is FreezeState.THAWED
        assert isinstance(err.value, SnapshotError)
        assert_clean(vm)
        assert vm.qmp.backups.bitmap("disk0", "qmpagent") is None


async def test_a_lost_freeze_reply_is_resolved_and_thawed(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.agent.inject("guest-fsfreeze-freeze", AgentFault.no_reply(apply=True))
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address, agent_timeout=0.5)
        res = await orch.backup(targets(vm, "b"), state_dir=state)
        assert res.quiesced and res.freeze_resolved
        assert not vm.agent.frozen


async def test_since_that_does_not_match_is_refused_before_anything(state: Path, tmp_path: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        t = targets(vm, "inc")
        # No bitmap yet (no full backup), or a file that is not there / not qcow2 / wrong size.
        other = tmp_path / "other.qcow2"
        other.write_bytes(b"not an image")
        small = tmp_path / "small.qcow2"
        create_qcow2_image(small, 1 << 20)
        cases = [
            (str(tmp_path / "missing.qcow2"), "does not exist"),
            (str(other), "not a qcow2 image"),
            (str(small), "virtual size is 1048576 bytes, the disk's is 67108864"),
            (str(vm.disks[0].path), "no dirty bitmap 'qmpagent'"),
        ]
        for since, why in cases:
            before = len(vm.qmp.received)
            with pytest.raises(BackupChainError, match=why) as err:
                await orch.backup(t, since={"vblk0": since}, state_dir=state)
            assert err.value.disk == "vblk0" and isinstance(err.value, UsageError)
            assert not [c for c in vm.qmp.received[before:] if c.command != "query-named-block-nodes"
                        and not c.command.startswith("query")]
            assert not vm.agent.calls("guest-fsfreeze-freeze")
        full = await orch.backup(targets(vm, "full"), state_dir=state)
        # Another image of the right size, but not the last backup with this bitmap.
        with pytest.raises(BackupChainError, match="not the last backup"):
            await orch.backup(t, since={"vblk0": str(vm.disks[0].base)}, state_dir=state)
        # The record is per state directory: without it, no incremental.
        with pytest.raises(BackupChainError, match="no record"):
            await orch.backup(t, since=full.targets, state_dir=tmp_path / "other-state")
        # A since for a disk that is not backed up, or without a bitmap: usage errors.
        with pytest.raises(UsageError, match="not one of the targets"):
            await orch.backup(t, since={"vblk9": full.targets["vblk0"]}, state_dir=state)
        with pytest.raises(UsageError, match="needs a dirty bitmap"):
            await orch.backup(t, since=full.targets, bitmap=None, state_dir=state)
        assert_clean(vm, set(full.targets.values()))


async def test_bad_arguments_are_usage_errors(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        t = targets(vm, "b")
        bad: list[dict[str, object]] = [
            {"targets": {}}, {"targets": {"vblk0": "relative.qcow2"}},
            {"targets": t, "quiesce": "sometimes"}, {"targets": t, "freeze_timeout": 0},
            {"targets": t, "bitmap": ""}, {"targets": t, "timeout": -1},
            {"targets": t, "progress_interval": float("nan")}, {"targets": t, "durable": "yes"},
            {"targets": {"vblk0": str(vm.disks[0].path)}},  # exists
            {"targets": {"nosuchdisk": str(vm.workdir / "x.qcow2")}},
        ]
        for kwargs in bad:
            with pytest.raises(UsageError):
                await orch.backup(state_dir=state, **kwargs)  # type: ignore[arg-type]
        assert_clean(vm)


async def test_a_bitmap_in_use_refuses_a_second_backup(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        full = await orch.backup(targets(vm, "full"), state_dir=state)
        bm = vm.qmp.backups.bitmap("disk0", "qmpagent")
        assert bm is not None
        bm.successor = set()  # as while another tool's backup job uses it
        with pytest.raises(BackupChainError, match="in use"):
            await orch.backup(targets(vm, "inc"), since=full.targets, state_dir=state)
        with pytest.raises(UsageError, match="in use"):
            await orch.backup(targets(vm, "again"), state_dir=state)
        bm.successor = None


async def test_a_second_full_backup_restarts_the_chain_without_losing_bits_on_failure(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        first = await orch.backup(targets(vm, "full1"), state_dir=state)
        vm.qmp.backups.guest_write("disk0", 0, 1)
        vm.qmp.backups.fail_next()
        with pytest.raises(BackupError):
            await orch.backup(targets(vm, "full2"), state_dir=state)
        # The failed full used the bitmap on-success: the bits are still there, and the
        # chain still continues from the first full backup.
        bm = vm.qmp.backups.bitmap("disk0", "qmpagent")
        assert bm is not None and bm.dirty == {0}
        inc = await orch.backup(targets(vm, "inc"), since=first.targets, state_dir=state)
        assert inc.bytes_copied == {"vblk0": 65536}
        second = await orch.backup(targets(vm, "full2"), state_dir=state)
        assert backup_transaction(vm)[0]["data"]["bitmap-mode"] == "on-success"  # type: ignore[index]
        with pytest.raises(BackupChainError):
            await orch.backup(targets(vm, "inc2"), since=inc.targets, state_dir=state)
        await orch.backup(targets(vm, "inc2"), since=second.targets, state_dir=state)


async def test_the_chain_check_on_the_fakes_images(state: Path) -> None:
    from qmpagent.testing import check_backup_chain

    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        full = await orch.backup(targets(vm, "full"), state_dir=state)
        vm.qmp.backups.guest_write("disk0", 0, 1)
        inc = await orch.backup(targets(vm, "inc"), since=full.targets, state_dir=state)
        report = await check_backup_chain(inc.targets["vblk0"], expect_length=2)
        assert report.ok, report.problems
        assert report.chain == (inc.targets["vblk0"], full.targets["vblk0"])
        assert report.formats == ("qcow2", "qcow2") and report.virtual_sizes == (64 * MIB,) * 2
        bad = await check_backup_chain(inc.targets["vblk0"], expect_length=1)
        assert not bad.ok and "2 images, not 1" in bad.problems[0]
        Path(full.targets["vblk0"]).unlink()  # a broken chain
        broken = await check_backup_chain(inc.targets["vblk0"])
        assert not broken.ok and "qemu-img info failed" in broken.problems[0]


async def test_speed_limits_the_copy(state: Path) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        res = await orch.backup(targets(vm, "b"), state_dir=state, speed=256 * MIB)
        assert 0.2 <= res.timings.copy < 5  # 64 MiB at 256 MiB/s
        assert backup_transaction(vm)[1]["data"]["speed"] == 1  # type: ignore[index]
        assert vm.qmp.commands("block-job-set-speed")[-1].arguments["speed"] == 256 * MIB
        with pytest.raises(UsageError, match="speed"):
            await orch.backup(targets(vm, "c"), state_dir=state, speed=0)


def _fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the path of every file descriptor ``os.fsync`` is given."""
    paths: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


async def test_targets_are_written_without_flushes_then_made_durable(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsynced = _fsynced(monkeypatch)
    async with FakeVM(disks=2) as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        res = await orch.backup(targets(vm, "b"), state_dir=state)
        # The targets' file nodes are opened with cache.no-flush (QEMU's qcow2 would flush
        # them many times a second); the disks' nodes are never touched.
        files = [c.arguments for c in vm.qmp.commands("blockdev-add")
                 if c.arguments.get("driver") == "file"]
        assert [f["filename"] for f in files] == sorted(res.targets.values())
        assert all(f["cache"] == {"no-flush": True} for f in files)
        # Once complete and closed, each target and its directory went to stable storage.
        # (The journal and the chain records fsync their own files, elsewhere.)
        ours = [p for p in fsynced if p.startswith(str(vm.workdir))]
        assert sorted(ours) == sorted([*res.targets.values(), str(vm.workdir)])
        fsynced.clear()
        fast = await orch.backup(targets(vm, "c"), state_dir=state, durable=False)
        assert not [p for p in fsynced if p.startswith(str(vm.workdir))]
        assert set(fast.targets.values()) <= {str(p) for p in vm.new_files()}


async def test_a_failed_fsync_fails_the_backup_and_the_next_must_be_full(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        full = await orch.backup(targets(vm, "full"), state_dir=state)

        real = os.fsync

        def fsync(fd: int) -> None:  # the targets' disk fails (the journal's does not)
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(vm.workdir)):
                raise OSError(5, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(BackupError, match=r"stable storage.*Input/output error") as err:
            await orch.backup(targets(vm, "inc"), since=full.targets, state_dir=state)
        monkeypatch.undo()
        assert err.value.stage == "copy"
        assert err.value.record.files_removed == [str(vm.workdir / "inc0.qcow2")]
        assert_clean(vm, set(full.targets.values()))
        # Its job completed (the bitmap was reset): an incremental since the full one would
        # miss those changes, so it is refused; a full backup starts the chain again.
        with pytest.raises(BackupChainError):
            await orch.backup(targets(vm, "inc2"), since=full.targets, state_dir=state)
        await orch.backup(targets(vm, "full2"), state_dir=state)


async def test_the_directory_fsynced_is_the_one_the_kernel_resolves(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsynced = _fsynced(monkeypatch)
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        (vm.workdir / "real" / "sub").mkdir(parents=True)
        (vm.workdir / "other").mkdir()
        (vm.workdir / "other" / "link").symlink_to(vm.workdir / "real" / "sub")
        target = str(vm.workdir / "other" / "link" / ".." / "t.qcow2")  # is real/t.qcow2
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        await orch.backup({"vblk0": target}, state_dir=state)
        assert (vm.workdir / "real" / "t.qcow2").exists()
        ours = sorted(p for p in fsynced if p.startswith(str(vm.workdir)))
        assert ours == [str(vm.workdir / "real"), str(vm.workdir / "real" / "t.qcow2")]


async def test_an_fsync_that_hangs_is_bounded_and_fails_the_backup(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    release = threading.Event()
    real = os.fsync

    def fsync(fd: int) -> None:  # storage that stops answering (a hung NFS server, say)
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(vm.workdir)):
            release.wait(30)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
            orch = SnapshotOrchestrator(mon, agent=vm.agent_address, job_timeout=1.0)
            with pytest.raises(BackupError, match=r"fsync did not finish within 1s") as err:
                await asyncio.wait_for(orch.backup(targets(vm, "b"), state_dir=state), 20)
            assert err.value.stage == "copy"
            assert_clean(vm)
            # Cancelled while the fsync hangs: the caller gets control back at once.
            dels = len(vm.qmp.commands("blockdev-del"))
            task = asyncio.ensure_future(orch.backup(targets(vm, "c"), state_dir=state))
            async with asyncio.timeout(20):
                while len(vm.qmp.commands("blockdev-del")) < dels + 2:  # noqa: ASYNC110 - a condition, bounded
                    await asyncio.sleep(0.01)  # (until its target is detached)
            await asyncio.sleep(0.2)  # now in the fsync
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
            assert_clean(vm)
    finally:
        release.set()


_DRIVER = """
import asyncio, sys
from qmpagent import Monitor, SnapshotOrchestrator

async def main(qmp, agent, target, since, state, journal):
    async with await Monitor.connect(qmp) as mon:
        orch = SnapshotOrchestrator(mon, agent=agent, journal_dir=journal)
        await orch.backup({"vblk0": target}, since={"vblk0": since}, state_dir=state)
        print("done", flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_recover_settles_a_backup_whose_process_died(state: Path, tmp_path: Path) -> None:
    """A backup process SIGKILLed during its copy: recover cancels and dismisses its job
    (the bitmap keeps every bit), removes its target node and file, clears its pending mark;
    the next incremental since the last completed backup is whole."""
    import subprocess
    import sys

    from qmpagent import recover

    journal = tmp_path / "journal"
    async with FakeVM() as vm:
        async with await Monitor.connect(vm.qmp_address) as mon:
            full = await SnapshotOrchestrator(mon, agent=vm.agent_address, journal_dir=journal).backup(
                targets(vm, "full"), state_dir=state)
        vm.qmp.backups.guest_write("disk0", 0, 3 * 65536)
        vm.qmp.backups.rate = 1024.0  # the copy takes minutes
        target = str(vm.workdir / "inc.qcow2")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _DRIVER, str(vm.qmp_address), str(vm.agent_address), target,
            full.targets["vblk0"], str(state), str(journal), stdout=subprocess.PIPE)
        try:
            for _ in range(1000):
                if any(isinstance(j, FakeBackupJob) and j.current > 0 for j in vm.qmp.jobs.values()):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the copy did not start")
        finally:
            proc.kill()
            await proc.wait()
        bm = vm.qmp.backups.bitmap("disk0", "qmpagent")
        assert bm is not None and bm.busy  # the job still runs in QEMU
        assert Path(target).exists()
        async with await Monitor.connect(vm.qmp_address) as mon:
            orch = SnapshotOrchestrator(mon, agent=vm.agent_address, journal_dir=journal)
            # Until it is settled, no incremental since the last completed backup.
            with pytest.raises(BackupChainError, match="in use by another operation"):
                await orch.backup({"vblk0": str(vm.workdir / "x.qcow2")}, since=full.targets,
                                  state_dir=state)
            report = await recover(mon, agent=vm.agent_address, journal_dir=journal)
            assert report.clean, report.render()
            assert not Path(target).exists() and target in report.removed_files
            assert vm.qmp.calls("job-cancel") and not vm.qmp.jobs
            assert vm.new_nodes() == set()
            bm = vm.qmp.backups.bitmap("disk0", "qmpagent")
            assert bm is not None and not bm.busy and bm.dirty == {0, 1, 2}
            vm.qmp.backups.rate = float(1 << 30)
            inc = await orch.backup({"vblk0": target}, since=full.targets, state_dir=state)
            assert inc.bytes_copied == {"vblk0": 3 * 65536}


async def test_a_pending_record_refuses_incrementals(state: Path) -> None:
    """A backup that started and whose end is not known (its process died after the job
    completed) leaves its record pending: no incremental since the older backup."""
    from qmpagent.backup_chain import mark_pending, read_record

    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        full = await orch.backup(targets(vm, "full"), state_dir=state)
        disk_file = str(vm.disks[0].path)
        mark_pending(str(state), disk_file, "qmpagent", "/elsewhere/dead.qcow2", 64 * MIB)
        with pytest.raises(BackupChainError, match=r"into /elsewhere/dead\.qcow2 did not finish"):
            await orch.backup(targets(vm, "inc"), since=full.targets, state_dir=state)
        # A full backup starts a new chain (and clears the mark).
        again = await orch.backup(targets(vm, "full2"), state_dir=state)
        rec = read_record(str(state), disk_file, "qmpagent")
        assert rec is not None and rec.pending is None and rec.target == again.targets["vblk0"]
        # A failed backup clears its own mark: the chain goes on from the last completed one.
        vm.qmp.backups.fail_next()
        with pytest.raises(BackupError):
            await orch.backup(targets(vm, "inc"), since=again.targets, state_dir=state)
        rec = read_record(str(state), disk_file, "qmpagent")
        assert rec is not None and rec.pending is None and rec.target == again.targets["vblk0"]
        await orch.backup(targets(vm, "inc"), since=again.targets, state_dir=state)


async def test_export_the_frozen_view_over_nbd_and_tear_it_down(tmp_path: Path) -> None:
    """Pull mode on the fakes: one transaction of sync=none jobs under the freeze, thawed at
    once, then NBD exports of the fleecing nodes; leaving the block removes everything."""
    from qmpagent import FleeceResult

    async with FakeVM(disks=2) as vm, await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        sock = str(tmp_path / "nbd.sock")
        images = {d.device_id: str(vm.workdir / f"fleece{i}.qcow2") for i, d in enumerate(vm.disks)}
        async with orch.export(images, socket=sock) as res:
            assert isinstance(res, FleeceResult)
            assert res.quiesced and res.freeze_owner == "self" and not vm.agent.frozen
            assert res.uris == {k: f"nbd+unix:///{k}?socket={sock}" for k in images}
            (tx,) = vm.transactions
            assert tx.guest_frozen
            assert [a["data"]["sync"] for a in tx.actions] == ["none", "none"]
            assert vm.qmp.backups.nbd_server == sock
            assert sorted(e["name"] for e in vm.qmp.backups.exports.values()) == ["vblk0", "vblk1"]
            assert all(not e["writable"] for e in vm.qmp.backups.exports.values())
            adds = [c.arguments for c in vm.qmp.commands("blockdev-add") if c.arguments["driver"] == "qcow2"]
            assert [a["backing"] for a in adds] == ["disk0", "disk1"]  # backed by the disks
            assert len(vm.qmp.jobs) == 2  # the fleecing jobs run until the end
        assert vm.qmp.backups.nbd_server is None and not vm.qmp.backups.exports
        assert_clean(vm)
        # A set-up that fails (here: the NBD server cannot start) removes everything too.
        vm.qmp.fail("nbd-server-start", "Failed to bind socket: Permission denied")
        with pytest.raises(BackupError, match="Permission denied") as err:
            async with orch.export(images, socket=sock):
                raise AssertionError("not reached")
        assert err.value.stage == "export"
        assert_clean(vm)
        with pytest.raises(UsageError):
            orch.export({}, socket=sock)


@pytest.mark.parametrize("mode", ["required", "preferred"])
async def test_a_transaction_past_the_window(state: Path, mode: str) -> None:
    """The transaction does not return within freeze_timeout: thawed at the deadline; under
    "required" the backup it started anyway is cancelled and removed, under "preferred" it
    goes on, not quiesced."""
    async with FakeVM() as vm, await Monitor.connect(vm.qmp_address) as mon:
        vm.qmp.delay("transaction", 0.6, times=1)
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        if mode == "required":
            with pytest.raises(BackupError, match=r"no backup was started|the backup was started") as err:
                await orch.backup(targets(vm, "b"), state_dir=state, freeze_timeout=0.3)
            assert "snapshot" not in str(err.value)
            assert err.value.record.freeze_state is FreezeState.THAWED
            assert_clean(vm)
            assert vm.qmp.backups.bitmap("disk0", "qmpagent") is None
        else:
            res = await orch.backup(targets(vm, "b"), quiesce="preferred", state_dir=state,
                                    freeze_timeout=0.3)
            assert not res.quiesced and res.reason and "freeze window" in res.reason
            assert res.bytes_copied == {"vblk0": 64 * MIB}
            assert_clean(vm, set(res.targets.values()))
        assert not vm.agent.frozen
        gap = vm.agent.calls("guest-fsfreeze-thaw")[0].time - vm.agent.calls("guest-fsfreeze-freeze")[0].time
        assert gap < 0.55  # thawed at the deadline, not when the transaction returned
