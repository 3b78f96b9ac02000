"""The snapshot lifecycle against the fakes: two-phase jobs (Monitor.block_job), orch.chain,
orch.commit (and finishing an interrupted one), snapshot(mountpoints=)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import qmpagent
from qmpagent import (
    CommitError,
    CommitTimeout,
    GuestAgent,
    JobError,
    JobReadyTimeout,
    Monitor,
    SnapshotOrchestrator,
    UnknownMountpointError,
    UsageError,
)
from qmpagent.testing import FakeVM

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def connected(vm: FakeVM) -> AsyncIterator[tuple[Monitor, GuestAgent, SnapshotOrchestrator]]:
    async with await Monitor.connect(vm.qmp_address, command_timeout=5.0) as mon, \
            await GuestAgent.connect(vm.agent_address, timeout=5.0) as ga:
        yield mon, ga, SnapshotOrchestrator(mon, agent=ga, job_timeout=10.0)


async def snapshots(orch: SnapshotOrchestrator, workdir: Path, n: int) -> list[str]:
    files = []
    for i in range(n):
        path = workdir / f"snap{i + 1}.qcow2"
        await orch.snapshot({"vblk0": str(path)})
        files.append(str(path))
    return files


def commit_args(vm: FakeVM) -> list[dict[str, Any]]:
    return [dict(c.arguments) for c in vm.qmp.calls("block-commit")]


# --- chain -----------------------------------------------------------------------------------


async def test_chain_lists_the_active_layer_first(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        assert [n.node_name for n in await orch.chain("vblk0")] == ["disk0", *(
            n.node_name for n in (await orch.chain("disk0"))[1:])]
        before = await orch.chain("vblk0")
        files = await snapshots(orch, fake_vm.workdir, 2)
        chain = await orch.chain("vblk0")
        assert len(chain) == len(before) + 2
        assert [n.filename for n in chain[:2]] == files[::-1]
        assert chain[2].node_name == "disk0" and chain[2].file_node_name == "file0"
        assert [n.depth for n in chain] == list(range(len(chain)))
        assert all(isinstance(n, qmpagent.BlockNode) for n in chain)
        assert chain[0].format == "qcow2" and chain[0].virtual_size == chain[2].virtual_size
        assert chain[0].backing_node_name == chain[1].node_name
        # by a node name: from that node down
        assert [n.node_name for n in await orch.chain(chain[1].node_name)] == [
            n.node_name for n in chain[1:]]
        with pytest.raises(UsageError, match="no block device or node"):
            await orch.chain("nope")


async def test_chain_without_the_block_graph_follows_file_names(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 2)
        with_graph = [(n.node_name, n.file_node_name) for n in await orch.chain("vblk0")]
        fake_vm.qmp.remove_handler("x-debug-query-block-graph")
        assert [(n.node_name, n.file_node_name) for n in await orch.chain("vblk0")] == with_graph


# --- commit ----------------------------------------------------------------------------------


async def test_commit_merges_the_active_layer_into_the_image_below(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        files = await snapshots(orch, fake_vm.workdir, 2)
        chain = await orch.chain("vblk0")
        res = await orch.commit("vblk0")
        # the default base: directly below, never deeper
        assert res.active_node == chain[1].node_name == fake_vm.active_node("vblk0")
        assert commit_args(fake_vm)[0]["base-node"] == chain[1].node_name
        assert commit_args(fake_vm)[0]["auto-dismiss"] is False
        assert res.removed_nodes == [chain[0].node_name, chain[0].file_node_name]
        assert res.removed_files == [] and res.merged_files == [files[1]]
        assert Path(files[1]).exists()  # kept without delete_files
        assert not fake_vm.qmp.jobs  # dismissed
        assert [n.node_name for n in await orch.chain("vblk0")] == [n.node_name for n in chain[1:]]


async def test_three_snapshots_commit_to_the_original(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        files = await snapshots(orch, fake_vm.workdir, 3)
        progress: list[qmpagent.JobProgress] = []
        res = await orch.commit("vblk0", base="disk0", delete_files=True,
                                on_progress=progress.append, progress_interval=0.01)
        assert res.active_node == "disk0" == fake_vm.active_node("vblk0")
        assert len(res.removed_nodes) == 6
        assert sorted(res.removed_files) == sorted(files)
        assert not any(Path(f).exists() for f in files)
        assert not fake_vm.new_nodes() and not fake_vm.new_files()
        assert "ready" in {p.status for p in progress}
        assert not fake_vm.qmp.nodes["disk0"].read_only


async def test_commit_refuses_bad_input_before_anything(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 1)
        for bad, match in (("nope", "no block device"), ("file0", "not a device")):
            with pytest.raises(UsageError, match=match):
                await orch.commit(bad)
        with pytest.raises(UsageError, match="is not below"):
            await orch.commit("vblk0", base="file0")
        with pytest.raises(UsageError, match="delete_files"):
            await orch.commit("vblk0", delete_files="yes")  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="timeout"):
            await orch.commit("vblk0", timeout=-1)
        assert not fake_vm.qmp.calls("block-commit")


async def test_write_starvation_is_a_typed_timeout_and_the_vm_stays(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 1)
        top = fake_vm.active_node("vblk0")
        fake_vm.qmp.commit_rate = 1 << 20
        fake_vm.qmp.guest_write_rate = 1 << 21  # the guest outwrites the job
        with pytest.raises(CommitTimeout, match=r"not ready within 0.3s") as err:
            await orch.commit("vblk0", timeout=0.3)
        assert isinstance(err.value, TimeoutError)
        rec = err.value.record
        assert rec.stage == "ready" and rec.pivoted is False and rec.active_node == top
        assert "still runs on" in str(err.value)
        assert fake_vm.active_node("vblk0") == top and not fake_vm.qmp.jobs
        # quieter now: the same commit goes through
        fake_vm.qmp.guest_write_rate = 0
        fake_vm.qmp.commit_rate = 1 << 30
        assert (await orch.commit("vblk0")).active_node == "disk0"


async def test_speed_is_passed_and_settable(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 1)
        await orch.commit("vblk0", speed=1 << 40)
        assert commit_args(fake_vm)[0]["speed"] == 1 << 40
        path = fake_vm.workdir / "again.qcow2"
        await orch.snapshot({"vblk0": str(path)})
        top = fake_vm.active_node("vblk0")
        fake_vm.qmp.commit_rate = 1  # crawls until the speed says otherwise... a limit
        async with mon.block_job("block-commit", {"device": top, "base-node": "disk0",
                                                  "auto-dismiss": False}) as job:
            await job.set_speed(4096)
            assert fake_vm.qmp.jobs[job.job_id].speed == 4096  # type: ignore[attr-defined]
            with pytest.raises(UsageError):
                await job.set_speed(-1)
        assert not fake_vm.qmp.jobs and fake_vm.active_node("vblk0") == top


async def test_job_cancelled_from_outside_leaves_the_vm_and_a_later_commit_works(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 1)
        top = fake_vm.active_node("vblk0")
        fake_vm.qmp.commit_rate = 1 << 10
        task = asyncio.ensure_future(orch.commit("vblk0", timeout=30))
        call = await fake_vm.qmp.wait_for_command("block-commit", timeout=5)
        job_id = call.arguments["job-id"]
        await asyncio.sleep(0.05)
        fake_vm.qmp.jobs[job_id].cancel()  # someone else's job-cancel
        with pytest.raises(CommitError, match=r"the job was cancelled before it was ready") as err:
            await task
        assert err.value.record.pivoted is False and err.value.record.stage == "ready"
        assert fake_vm.active_node("vblk0") == top and not fake_vm.qmp.jobs
        fake_vm.qmp.commit_rate = 1 << 30
        assert (await orch.commit("vblk0")).active_node == "disk0"


async def test_caller_cancelled_cancels_and_dismisses_the_job(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 1)
        top = fake_vm.active_node("vblk0")
        fake_vm.qmp.commit_rate = 1 << 10
        task = asyncio.ensure_future(orch.commit("vblk0", timeout=30))
        await fake_vm.qmp.wait_for_command("block-commit", timeout=5)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake_vm.active_node("vblk0") == top and not fake_vm.qmp.jobs
        fake_vm.qmp.commit_rate = 1 << 30
        assert (await orch.commit("vblk0", delete_files=True)).active_node == "disk0"
        assert not fake_vm.new_nodes() and not fake_vm.new_files()


async def test_a_later_commit_finishes_a_ready_job_left_by_a_dead_process(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (mon, _ga, orch):
        files = await snapshots(orch, fake_vm.workdir, 1)
        top = fake_vm.active_node("vblk0")
        # what a process killed while waiting left behind: a ready job of ours
        await mon.execute("block-commit", {"job-id": "qmpagent-commit-0badf00d-vblk0",
                                          "device": top, "base-node": "disk0",
                                          "auto-dismiss": False})
        await mon.wait_event("BLOCK_JOB_READY", timeout=5)
        assert fake_vm.active_node("vblk0") == top
        res = await orch.commit("vblk0", delete_files=True)
        assert res.resumed and res.job_id == "qmpagent-commit-0badf00d-vblk0"
        assert res.active_node == "disk0" and res.removed_files == files
        assert len(fake_vm.qmp.calls("block-commit")) == 1  # completed, not started again
        assert not fake_vm.qmp.jobs and not fake_vm.new_nodes()


async def test_a_later_commit_removes_what_a_pivoted_commit_left(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (mon, _ga, orch):
        files = await snapshots(orch, fake_vm.workdir, 2)
        chain = await orch.chain("vblk0")
        # pivoted, then the process died before dismissing and removing the nodes
        async with mon.block_job("block-commit", {"job-id": "qmpagent-commit-0badf00d-vblk0",
                                                  "device": chain[0].node_name,
                                                  "base-node": chain[1].node_name,
                                                  "auto-dismiss": False}) as job:
            await job.wait_ready(timeout=5)
            await mon.execute("block-job-complete", {"device": job.job_id})
            await mon.wait_event("BLOCK_JOB_COMPLETED", timeout=5)
            job.dismissed = True  # "dies" here: leave the concluded job in QEMU
        assert fake_vm.active_node("vblk0") == chain[1].node_name
        res = await orch.commit("vblk0", delete_files=True)
        # finished, not merged one layer deeper (that base may be shared)
        assert res.resumed and res.active_node == chain[1].node_name == fake_vm.active_node("vblk0")
        assert res.removed_nodes == [chain[0].node_name, chain[0].file_node_name]
        assert res.removed_files == [files[1]] and Path(files[0]).exists()
        assert not fake_vm.qmp.jobs
        # and the next commit merges as usual
        assert (await orch.commit("vblk0")).active_node == "disk0"


async def test_failed_job_is_a_commit_error_and_nothing_changes(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 1)
        top = fake_vm.active_node("vblk0")
        fake_vm.qmp.fail_job("block-commit", "Input/output error")
        with pytest.raises(CommitError, match="Input/output error") as err:
            await orch.commit("vblk0")
        assert err.value.record.pivoted is False and fake_vm.active_node("vblk0") == top
        assert not fake_vm.qmp.jobs
        fake_vm.qmp.fail("block-commit", "Node is busy", "GenericError")
        with pytest.raises(CommitError, match=r"refused the commit.*busy") as err:
            await orch.commit("vblk0")
        assert err.value.record.stage == "start"


async def test_a_node_that_cannot_be_removed_is_reported(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 1)
        top = fake_vm.active_node("vblk0")
        fake_vm.qmp.fail("blockdev-del", "injected", "GenericError")
        with pytest.raises(CommitError, match=r"runs on the base 'disk0'.*still attached") as err:
            await orch.commit("vblk0")
        rec = err.value.record
        assert rec.stage == "cleanup" and rec.pivoted is True and rec.left_nodes == [top]
        assert fake_vm.active_node("vblk0") == "disk0"
        # a later commit removes them (and merges nothing more)
        res = await orch.commit("vblk0")
        assert res.resumed and top in res.removed_nodes and res.active_node == "disk0"


# --- Monitor.block_job -----------------------------------------------------------------------


async def test_block_job_refused_and_attach_unknown(fake_vm: FakeVM) -> None:
    async with await Monitor.connect(fake_vm.qmp_address, command_timeout=5.0) as mon:
        with pytest.raises(qmpagent.MonitorCommandError, match=r"not in this backing file chain"):
            async with mon.block_job("block-commit", {"device": "disk0", "base-node": "file0",
                                                      "auto-dismiss": False}):
                pass
        with pytest.raises(qmpagent.MonitorCommandError, match="no job"):
            async with mon.attach_job("nope"):
                pass
        with pytest.raises(UsageError):
            mon.attach_job("")
        with pytest.raises(UsageError):
            mon.block_job("block-commit", {}, progress_interval=0)


async def test_wait_ready_timeout_cancels_and_dismisses(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 1)
        top = fake_vm.active_node("vblk0")
        fake_vm.qmp.commit_rate = 0
        async with mon.block_job("block-commit", {"device": top, "base-node": "disk0",
                                                  "auto-dismiss": False}) as job:
            with pytest.raises(JobReadyTimeout) as err:
                await job.wait_ready(timeout=0.2)
            assert err.value.job_id == job.job_id and job.dismissed
            assert err.value.progress is not None
        assert not fake_vm.qmp.jobs and fake_vm.active_node("vblk0") == top
        # complete of a job that is not ready: refused; the exit cleans up
        async with mon.block_job("block-commit", {"device": top, "base-node": "disk0",
                                                  "auto-dismiss": False}) as job:
            with pytest.raises(qmpagent.MonitorCommandError, match="verb 'complete'"):
                await job.complete(timeout=1)
        assert not fake_vm.qmp.jobs
        # a ready job cancelled: the VM stays
        fake_vm.qmp.commit_rate = 1 << 30
        async with mon.block_job("block-commit", {"device": top, "base-node": "disk0",
                                                  "auto-dismiss": False}) as job:
            await job.wait_ready(timeout=5)
            await job.cancel(timeout=5)
            assert job.dismissed
        assert not fake_vm.qmp.jobs and fake_vm.active_node("vblk0") == top
        calls = [c.arguments for c in fake_vm.qmp.calls("block-job-cancel")]
        assert calls == [{"device": job.job_id, "force": True}]


async def test_job_failing_before_ready_is_a_job_error(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 1)
        top = fake_vm.active_node("vblk0")
        fake_vm.qmp.fail_job("block-commit", "No space left on device")
        async with mon.block_job("block-commit", {"device": top, "base-node": "disk0",
                                                  "auto-dismiss": False}) as job:
            with pytest.raises(JobError, match="No space left"):
                await job.wait_ready(timeout=5)
        assert not fake_vm.qmp.jobs


# --- mountpoints -----------------------------------------------------------------------------


async def test_mountpoints_freeze_only_the_chosen_filesystem(fake_vm_factory: Any) -> None:
    async with fake_vm_factory(disks=2) as vm, connected(vm) as (_mon, _ga, orch):
        res = await orch.snapshot({"vblk0": str(vm.workdir / "s.qcow2")}, mountpoints=["/mnt/data"])
        assert res.quiesced and res.frozen == 1 and res.thawed == 1 and not res.warnings
        frozen = [m.arguments for m in vm.agent.calls("guest-fsfreeze-freeze-list")]
        assert frozen == [{"mountpoints": ["/mnt/data"]}]
        assert vm.transactions[-1].guest_frozen
        assert not vm.agent.calls("guest-fsfreeze-freeze")
        assert not vm.agent.frozen


async def test_unknown_mountpoint_is_refused_before_freezing(fake_vm_factory: Any) -> None:
    async with fake_vm_factory(disks=2) as vm, connected(vm) as (_mon, _ga, orch):
        path = vm.workdir / "s.qcow2"
        for quiesce in ("required", "preferred"):
            with pytest.raises(UnknownMountpointError) as err:
                await orch.snapshot({"vblk0": str(path)}, quiesce=quiesce,
                                    mountpoints=["/mnt/data", "/mnt/typo"])
            assert err.value.unknown == ["/mnt/typo"] and "/mnt/data2" in err.value.known
            assert isinstance(err.value, UsageError)
        assert not vm.agent.calls("guest-fsfreeze-freeze-list")
        assert not vm.agent.calls("guest-fsfreeze-freeze") and not vm.transactions
        assert not path.exists() and not vm.new_nodes()


async def test_mountpoints_argument_checks(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        path = str(fake_vm.workdir / "s.qcow2")
        for bad in ("/mnt/data", [], ["relative"], ["/a", "/a"], [1]):
            with pytest.raises(UsageError):
                await orch.snapshot({"vblk0": path}, mountpoints=bad)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="quiesce"):
            await orch.snapshot({"vblk0": path}, quiesce="off", mountpoints=["/mnt/data"])
        assert not fake_vm.agent.calls("guest-fsfreeze-freeze-list")


async def test_a_thaw_that_thaws_another_tools_freeze_is_reported(fake_vm_factory: Any) -> None:
    async with fake_vm_factory(disks=2) as vm, connected(vm) as (_mon, _ga, orch):
        vm.agent.freeze_foreign("/mnt/data2")
        res = await orch.snapshot({"vblk0": str(vm.workdir / "s.qcow2")}, mountpoints=["/mnt/data"])
        assert res.frozen == 1
        if res.thawed > 1:  # qemu-ga's thaw takes no list
            assert any("another tool" in w for w in res.warnings)


async def test_freeze_list_that_froze_nothing_is_not_ours(fake_vm_factory: Any) -> None:
    async with fake_vm_factory(disks=2) as vm, connected(vm) as (_mon, _ga, orch):
        vm.agent.freeze_foreign("/mnt/data")
        with pytest.raises(qmpagent.SnapshotError, match="froze no filesystems") as err:
            await orch.snapshot({"vblk0": str(vm.workdir / "s.qcow2")}, mountpoints=["/mnt/data"])
        assert err.value.record.thawed == 0 and not vm.agent.calls("guest-fsfreeze-thaw")
        assert "/mnt/data" in vm.agent.foreign_frozen


# --- the journal: a commit whose process died is settled by recover --------------------------


async def test_a_commit_is_journalled_while_it_runs(fake_vm: FakeVM, tmp_path: Path) -> None:
    async with connected(fake_vm) as (mon, ga, _orch):
        orch = SnapshotOrchestrator(mon, agent=ga, journal_dir=tmp_path)
        await snapshots(orch, fake_vm.workdir, 1)
        seen: list[list[str]] = []
        await orch.commit("vblk0", on_progress=lambda p: seen.append(
            [f.name for f in tmp_path.glob("op-*.json")]), progress_interval=0.01)
        assert seen and all(len(names) == 1 for names in seen)
        assert not list(tmp_path.glob("op-*.json"))  # finished: nothing left
        # a commit that timed out left nothing to settle either
        await orch.snapshot({"vblk0": str(fake_vm.workdir / "t.qcow2")})
        fake_vm.qmp.commit_rate, fake_vm.qmp.guest_write_rate = 1, 2
        with pytest.raises(CommitTimeout):
            await orch.commit("vblk0", timeout=0.1)
        assert not list(tmp_path.glob("op-*.json"))


async def _dead_pid() -> int:
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()
    return proc.pid


@pytest.mark.parametrize("pivoted", [False, True])
async def test_recover_settles_a_commit_whose_process_died(fake_vm: FakeVM, tmp_path: Path,
                                                           pivoted: bool) -> None:
    from qmpagent.journal import Entry, Journal, OverlayRecord, identify_vm

    async with connected(fake_vm) as (mon, ga, _orch):
        orch = SnapshotOrchestrator(mon, agent=ga, journal_dir=tmp_path)
        files = await snapshots(orch, fake_vm.workdir, 1)
        chain = await orch.chain("vblk0")
        top = chain[0]
        job_id = "qmpagent-commit-0badf00d-vblk0"
        # What a commit killed after its journal entry and its job left: a ready job (or,
        # killed after the pivot, a concluded one), the merged nodes attached.
        Journal(tmp_path).write(Entry(
            op="0123456789abcdef", vm=await identify_vm(mon), owner_pid=await _dead_pid(),
            owner_start=None, kind="commit",
            overlays=[OverlayRecord("vblk0", top.node_name, top.file_node_name or "", top.filename)],
            commit={"job": job_id, "device": "vblk0", "base": "disk0", "delete_files": True},
        ))
        async with mon.block_job("block-commit", {"job-id": job_id, "device": top.node_name,
                                                  "base-node": "disk0", "auto-dismiss": False}) as job:
            await job.wait_ready(timeout=5)
            if pivoted:
                await mon.execute("block-job-complete", {"device": job_id})
                await mon.wait_event("BLOCK_JOB_COMPLETED", timeout=5)
            job.dismissed = True  # the process "dies": the job stays in QEMU
        # a snapshot meanwhile is refused: a commit of a dead process is unsettled
        with pytest.raises(qmpagent.UnsettledOperationError, match="still in QEMU"):
            await orch.snapshot({"vblk0": str(fake_vm.workdir / "no.qcow2")})
        report = await qmpagent.recover(mon, agent=ga, journal_dir=tmp_path)
        assert report.clean, report.unresolved
        assert report.settled == ["0123456789abcdef"]
        assert fake_vm.active_node("vblk0") == "disk0" and not fake_vm.qmp.jobs
        assert top.node_name in report.removed_nodes and report.removed_files == files
        assert not list(tmp_path.glob("op-*.json"))
        again = await qmpagent.recover(mon, agent=ga, journal_dir=tmp_path)
        assert again.clean and not again.changed


async def test_a_failed_pivot_leaves_the_vm_on_its_active_layer(fake_vm: FakeVM) -> None:
    async with connected(fake_vm) as (_mon, _ga, orch):
        await snapshots(orch, fake_vm.workdir, 1)
        top = fake_vm.active_node("vblk0")
        fake_vm.qmp.fail("block-job-complete", "injected pivot failure", "GenericError")
        with pytest.raises(CommitError, match="the pivot failed") as err:
            await orch.commit("vblk0")
        rec = err.value.record
        assert rec.stage == "pivot" and rec.pivoted is False and rec.active_node == top
        assert "still runs on" in str(err.value)
        assert fake_vm.active_node("vblk0") == top and not fake_vm.qmp.jobs  # cancelled, dismissed
        assert (await orch.commit("vblk0")).active_node == "disk0"


async def test_connection_lost_at_the_pivot_then_a_later_commit_finishes(fake_vm: FakeVM,
                                                                        tmp_path: Path) -> None:
    from qmpagent.testing import Fault

    async with connected(fake_vm) as (mon, ga, _orch):
        orch = SnapshotOrchestrator(mon, agent=ga, journal_dir=tmp_path)
        files = await snapshots(orch, fake_vm.workdir, 1)
        top = fake_vm.active_node("vblk0")
        # QEMU pivots, and the connection drops before the completion's reply
        fake_vm.qmp.inject("block-job-complete", Fault.disconnect(apply=True))
        with pytest.raises(CommitError, match="could not be read") as err:
            await orch.commit("vblk0", delete_files=True)
        assert err.value.record.pivoted is None and err.value.record.stage == "pivot"
        assert len(list(tmp_path.glob("op-*.json"))) == 1  # kept for recover
    await asyncio.sleep(0.1)
    assert fake_vm.active_node("vblk0") == "disk0"  # it did pivot
    async with connected(fake_vm) as (mon, ga, _orch):
        orch = SnapshotOrchestrator(mon, agent=ga, journal_dir=tmp_path)
        res = await orch.commit("vblk0", delete_files=True)  # the same process, later
        assert res.resumed and res.active_node == "disk0"
        assert top in res.removed_nodes and res.removed_files == files
        assert not fake_vm.qmp.jobs and not fake_vm.new_nodes() and not fake_vm.new_files()
        assert not list(tmp_path.glob("op-*.json"))  # finished: its entry is gone too
        report = await qmpagent.recover(mon, agent=ga, journal_dir=tmp_path)
        assert report.clean and not report.changed
