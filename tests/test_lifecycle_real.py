"""The snapshot lifecycle on the real guest (real QEMU block layer, real qemu-ga), with the
in-guest writer running: snapshots merged back with an active commit, commits under heavy
writes and interrupted, and freezing only chosen filesystems.

One guest (two data disks) is booted for the module and shared: each test leaves it on a
valid chain, as it must. Every commit here is into a node of this boot (the per-boot overlay
``disk0`` at the bottom): never into the cached base image below it, which other guests share.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio

from qmpagent import (
    USE_CLIENT_DEFAULT,
    CommitError,
    CommitTimeout,
    FreezeStatus,
    GuestAgent,
    Monitor,
    SnapshotOrchestrator,
    UnknownMountpointError,
    recover,
)
from qmpagent.testing import Guest, WriterLog, boot_guest
from qmpagent.testing.demo import check_image_fsck
from qmpagent.testing.pytest_plugin import require_guest_image

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope="module")]

TIMEOUT = 60.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest() -> AsyncIterator[Guest]:
    require_guest_image()
    async with boot_guest(data_disks=2) as g:
        yield g


@contextlib.asynccontextmanager
async def connected(
    guest: Guest, **options: Any
) -> AsyncIterator[tuple[Monitor, GuestAgent, SnapshotOrchestrator]]:
    async with await Monitor.connect(guest.qmp_path, command_timeout=TIMEOUT) as mon, \
            await GuestAgent.connect(guest.agent_path, timeout=TIMEOUT) as ga:
        orch = SnapshotOrchestrator(mon, agent=ga, journal_dir=guest.workdir / "journal",
                                    **options)
        yield mon, ga, orch


def rig_qmp(guest: Guest) -> Path:
    return guest.workdir / "rig-qmp.sock"  # the rig's second QMP socket: a second client


async def node_names(mon: Monitor) -> set[str]:
    return {n.node_name for n in await mon.named_block_nodes()}


async def assert_valid_chain(orch: SnapshotOrchestrator, bottom: str = "disk0") -> list[str]:
    """The device runs on a chain that reaches ``bottom`` (the boot's own overlay)."""
    names = [n.node_name for n in await orch.chain("vblk0")]
    assert bottom in names, names
    return names


async def snapshot_n(orch: SnapshotOrchestrator, guest: Guest, n: int, tag: str) -> list[Path]:
    files = []
    for i in range(n):
        path = guest.workdir / f"{tag}{i}.qcow2"
        res = await orch.snapshot({"vblk0": str(path)})
        assert res.quiesced
        files.append(path)
    return files


async def read_log_from_image(guest: Guest, ga: GuestAgent) -> tuple[WriterLog, bool, str]:
    """The writer's log as the image (the chain of vblk0 from disk0 down) holds it, read
    offline while the guest is frozen by us (a consistent image), and whether it is
    e2fsck-clean."""
    scratch = guest.workdir / "check.raw"
    assert await ga.fsfreeze_freeze(["/mnt/data"]) == 1
    try:
        proc = await asyncio.create_subprocess_exec(
            *guest.command("qemu-img"), "convert", "-U", "-O", "raw",
            str(guest.disk.overlay), str(scratch), stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err
    finally:
        assert await ga.fsfreeze_thaw() >= 1
    try:
        proc = await asyncio.create_subprocess_exec(
            "debugfs", "-R", "cat /writer.log", str(scratch),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        fsck = await check_image_fsck(str(scratch), str(guest.workdir / "check2.raw"))
        return WriterLog.parse(out.decode(errors="replace")), fsck.clean, fsck.output
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()


async def test_three_snapshots_then_commit_to_the_original(guest: Guest) -> None:
    async with connected(guest) as (mon, ga, orch):
        below = [n.node_name for n in (await orch.chain("disk0"))[1:]]
        assert await assert_valid_chain(orch) == ["disk0", *below]
        before_nodes = await node_names(mon)
        files = await snapshot_n(orch, guest, 3, "three")
        last_snapshot = await guest.uptime()
        await guest.wait_writer_progress(last_snapshot + 1.0)  # records only the top layer has
        chain = await orch.chain("vblk0")
        assert [n.filename for n in chain[:3]] == [str(f) for f in reversed(files)]
        started = time.monotonic()
        res = await orch.commit("vblk0", base="disk0", delete_files=True)
        took = time.monotonic() - started
        assert res.active_node == "disk0" and res.top == chain[0].node_name
        assert await mon.device_node_name("vblk0") == "disk0"
        assert await node_names(mon) == before_nodes  # no overlay node left
        assert sorted(res.removed_files) == sorted(map(str, files))
        assert not any(f.exists() for f in files)
        assert not [j for j in await mon.execute("query-jobs")]
        assert took < TIMEOUT

        after_commit = await guest.uptime()
        await guest.wait_writer_progress(after_commit + 0.3)  # the writer goes on
        log, clean, output = await read_log_from_image(guest, ga)
        assert clean, output
        seqs = [s for s, _ in log.entries]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap in the sequence"
        # written after the last snapshot (into its overlay), now in the original image
        assert any(up > last_snapshot + 0.5 for _, up in log.entries)
        assert log.last_uptime > after_commit
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED
        assert not list((guest.workdir / "journal").glob("op-*.json"))


async def test_commit_under_heavy_writes_completes_or_times_out_typed(guest: Guest) -> None:
    async with connected(guest) as (mon, _ga, orch):
        await snapshot_n(orch, guest, 1, "heavy")
        top = (await orch.chain("vblk0"))[0].node_name
        # heavy writes into the top layer for as long as the commit runs
        await guest.run("(while [ ! -e /run/stop-load ]; do dd if=/dev/urandom "
                        "of=/mnt/data/load bs=64k count=160 conv=notrunc,fsync 2>/dev/null; "
                        "done; rm -f /run/stop-load) >/dev/null 2>&1 &")
        try:
            await asyncio.sleep(1.0)
            bound = 8.0
            started = time.monotonic()
            try:
                # a copy slower than the guest writes (64 KiB/s): starved, never ready
                res = await orch.commit("vblk0", timeout=bound, speed=64 * 1024)
            except CommitTimeout as exc:
                elapsed = time.monotonic() - started
                assert elapsed < bound + 15, elapsed  # the bound, plus the job's cancel
                assert exc.record.pivoted is False and exc.record.active_node == top
                assert (await orch.chain("vblk0"))[0].node_name == top
                assert not await mon.execute("query-jobs")
                timed_out = True
            else:
                assert res.active_node == "disk0"
                timed_out = False
            await assert_valid_chain(orch)
        finally:
            await guest.run("touch /run/stop-load")
        # once the load is gone, the same commit goes through (or it went through already)
        if timed_out:
            res = await orch.commit("vblk0", delete_files=True)
            assert res.active_node == "disk0"
        assert (await orch.chain("vblk0"))[0].node_name == "disk0"


async def test_commit_cancelled_by_the_caller_then_finished(guest: Guest) -> None:
    async with connected(guest) as (mon, _ga, orch):
        await snapshot_n(orch, guest, 1, "cancel")
        top = (await orch.chain("vblk0"))[0].node_name
        task = asyncio.ensure_future(orch.commit("vblk0", speed=4096, timeout=TIMEOUT))
        await _wait_for_job(mon)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await orch.chain("vblk0"))[0].node_name == top
        assert not await mon.execute("query-jobs")
        res = await orch.commit("vblk0", delete_files=True)
        assert res.active_node == "disk0" and not res.resumed


async def test_commit_job_cancelled_from_outside_then_finished(guest: Guest) -> None:
    async with connected(guest) as (mon, _ga, orch):
        await snapshot_n(orch, guest, 1, "outside")
        top = (await orch.chain("vblk0"))[0].node_name
        task = asyncio.ensure_future(orch.commit("vblk0", speed=4096, timeout=TIMEOUT))
        async with await Monitor.connect(rig_qmp(guest), command_timeout=TIMEOUT) as other:
            job_id = await _wait_for_job(other)
            await other.execute("job-cancel", {"id": job_id})
        with pytest.raises(CommitError) as err:
            await task
        assert err.value.record.pivoted is False and err.value.record.stage == "ready"
        assert (await orch.chain("vblk0"))[0].node_name == top
        assert not await mon.execute("query-jobs")
        res = await orch.commit("vblk0", delete_files=True)
        assert res.active_node == "disk0"


async def test_commit_process_killed_then_a_later_commit_finishes(guest: Guest) -> None:
    async with connected(guest) as (mon, _ga, orch):
        files = await snapshot_n(orch, guest, 1, "killed")
        top = (await orch.chain("vblk0"))[0].node_name
    # The CLI in a process of its own, on the main QMP socket; we watch on the rig's.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpagent", "commit", "--qmp", str(guest.qmp_path),
        "--disk", "vblk0", "--speed", "4K", "--timeout", "600",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "XDG_STATE_HOME": str(guest.workdir / "state")},
    )
    try:
        async with await Monitor.connect(rig_qmp(guest), command_timeout=TIMEOUT) as watch:
            await _wait_for_job(watch)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            jobs = await watch.execute("query-jobs")
            assert len(jobs) == 1  # the dead process's job goes on in QEMU
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    async with connected(guest) as (mon, _ga, orch):
        assert (await orch.chain("vblk0"))[0].node_name == top  # still a valid chain
        res = await orch.commit("vblk0", delete_files=True)
        assert res.resumed and res.active_node == "disk0"
        assert res.removed_files == [str(files[0])] and not files[0].exists()
        assert not await mon.execute("query-jobs")


async def test_commit_process_killed_then_recover_settles_it(guest: Guest) -> None:
    state = guest.workdir / "state-recover"
    async with connected(guest) as (mon, _ga, orch):
        files = await snapshot_n(orch, guest, 1, "recover")
        top = (await orch.chain("vblk0"))[0].node_name
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmpagent", "commit", "--qmp", str(guest.qmp_path),
        "--disk", "vblk0", "--delete-files", "--speed", "4K", "--timeout", "600",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "XDG_STATE_HOME": str(state)},
    )
    try:
        async with await Monitor.connect(rig_qmp(guest), command_timeout=TIMEOUT) as watch:
            await _wait_for_job(watch)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    journal = state / "qmpagent"
    assert len(list(journal.glob("op-*.json"))) == 1  # written before block-commit
    async with connected(guest) as (mon, ga, orch):
        assert (await orch.chain("vblk0"))[0].node_name == top
        # the dead run's speed stays on its job: lift it, as an operator would, then recover
        job = (await mon.execute("query-jobs"))[0]["id"]
        await mon.execute("block-job-set-speed", {"device": job, "speed": 0})
        report = await recover(mon, agent=ga, journal_dir=journal)
        assert report.clean, report.unresolved
        assert await mon.device_node_name("vblk0") == "disk0"
        assert top in report.removed_nodes and report.removed_files == [str(files[0])]
        assert not await mon.execute("query-jobs") and not list(journal.glob("op-*.json"))


async def _wait_for_job(mon: Monitor) -> str:
    with anyio.fail_after(TIMEOUT):
        while True:
            jobs = await mon.execute("query-jobs")
            if jobs and jobs[0].get("status") == "running":
                return str(jobs[0]["id"])
            await asyncio.sleep(0.05)


class HeldTransaction:
    """A real Monitor whose ``transaction`` waits until released (the freeze window held open)."""

    def __init__(self, inner: Monitor) -> None:
        self._inner = inner
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                      timeout: Any = USE_CLIENT_DEFAULT) -> Any:
        if command == "transaction":
            self.holding.set()
            await self.release.wait()
        return await self._inner.execute(command, arguments, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_mountpoints_freeze_and_thaw_only_the_chosen_filesystem(guest: Guest) -> None:
    async with connected(guest) as (mon, ga, _orch):
        held = HeldTransaction(mon)
        orch = SnapshotOrchestrator(held, agent=ga,  # type: ignore[arg-type]
                                    journal_dir=guest.workdir / "journal")
        path = guest.workdir / "mp.qcow2"
        with pytest.raises(UnknownMountpointError):
            await orch.snapshot({"vblk1": str(path)}, mountpoints=["/mnt/data2", "/mnt/nope"])
        assert not held.holding.is_set() and not path.exists()
        task = asyncio.ensure_future(orch.snapshot({"vblk1": str(path)}, mountpoints=["/mnt/data2"],
                                                   freeze_timeout=TIMEOUT))
        with anyio.fail_after(TIMEOUT):
            await held.holding.wait()
        try:
            # inside the window: /mnt/data2 is frozen (a second freeze is refused: busy) ...
            busy = await guest.run("fsfreeze --freeze /mnt/data2", check=False)
            assert busy.returncode != 0
            # ... and /mnt/data is not: the writer goes on, a write there completes
            now = await guest.uptime()
            await guest.wait_writer_progress(now + 0.2, timeout=10)
            await guest.run("echo x > /mnt/data/probe && sync", timeout=10)
        finally:
            held.release.set()
        res = await task
        assert res.quiesced and res.frozen == 1 and res.thawed == 1 and not res.warnings
        # thawed: another tool may freeze it now (and we unfreeze it again)
        await guest.run("fsfreeze --freeze /mnt/data2 && fsfreeze --unfreeze /mnt/data2")
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED
        merged = await orch.commit("vblk1", delete_files=True)
        assert merged.active_node == "disk1" and not path.exists()
