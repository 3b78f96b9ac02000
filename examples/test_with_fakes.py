"""Testing your own orchestration code with qmpagent's fakes (and once on a real VM): copy me.

``backup_vm()`` below stands for your code: it snapshots a VM's disks so that the images
underneath can be copied away while the VM runs on. The tests drive it against a fake VM (a
fake QEMU and a fake guest agent, wired together: ``fake_vm``, from qmpagent's pytest plugin),
break things on purpose, and check what the guest and QEMU saw; the last one runs the same
function on a real throwaway VM (``qemu_guest``; skipped where it cannot be built).

Run it with ``pytest examples/test_with_fakes.py`` (add ``-m "not real_vm"`` to skip the real
VM). It needs pytest-asyncio; the ``asyncio`` mark below makes it work in strict mode too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

import qmpagent
from qmpagent.testing import AgentFault, FakeVM, Guest

pytestmark = pytest.mark.asyncio


# --- the code under test (yours) -----------------------------------------------------------------


@dataclass
class Backup:
    """What ``backup_vm`` did."""

    images: dict[str, str]  # disk -> the image to copy away (the VM no longer writes to it)
    overlays: dict[str, str]  # disk -> the new overlay file the VM now writes to
    consistency: str  # "application" (filesystems frozen) or "crash"
    note: str | None = None


async def backup_vm(
    qmp: str | os.PathLike[str] | tuple[str, int],
    agent: str | os.PathLike[str] | tuple[str, int],
    disks: list[str],
    backup_dir: Path,
    *,
    timeout: float = 10.0,
) -> Backup:
    """Snapshot ``disks`` (block node names) into overlays in ``backup_dir``; quiesced if the
    guest agent allows it, crash-consistent otherwise. Raises qmpagent.ThawError if the guest
    may have been left frozen, qmpagent.SnapshotError if no snapshot was taken."""
    async with await qmpagent.Monitor.connect(qmp, timeout=timeout) as mon:
        images = {n.node_name: n.filename for n in await mon.named_block_nodes()}
        orch = qmpagent.SnapshotOrchestrator(
            mon, agent=agent, agent_timeout=timeout, thaw_timeout=3 * timeout
        )
        n = _count_backups(backup_dir)
        result = await orch.snapshot(
            {d: backup_dir / f"{d}.{n}.qcow2" for d in disks}, quiesce="preferred"
        )
    return Backup(
        images={d: images[d] for d in disks},
        overlays=result.files,
        consistency="application" if result.quiesced else "crash",
        note=result.reason,
    )


def _count_backups(backup_dir: Path) -> int:
    return len(list(backup_dir.glob("*.qcow2")))


# --- tests with the fake VM ----------------------------------------------------------------------


def exists(path: str | Path) -> bool:
    return Path(path).exists()


async def test_backup_is_application_consistent(fake_vm: FakeVM, tmp_path: Path) -> None:
    backup = await backup_vm(fake_vm.qmp_address, fake_vm.agent_address, ["disk0"], tmp_path)
    assert backup.consistency == "application" and backup.note is None
    assert backup.images == {"disk0": str(fake_vm.disk.path)}
    assert exists(backup.overlays["disk0"])
    # What the fakes saw: the snapshot ran inside the freeze, and the freeze was undone.
    assert fake_vm.transactions[-1].guest_frozen
    assert not fake_vm.agent.frozen
    assert fake_vm.active_node("vblk0") != "disk0"  # the VM writes to the overlay now


async def test_backup_survives_a_lost_freeze_reply(fake_vm: FakeVM, tmp_path: Path) -> None:
    # The guest freezes, but the reply never arrives: the orchestrator finds out and thaws.
    fake_vm.agent.inject("guest-fsfreeze-freeze", AgentFault.no_reply(apply=True))
    backup = await backup_vm(
        fake_vm.qmp_address, fake_vm.agent_address, ["disk0"], tmp_path, timeout=0.5
    )
    assert backup.consistency == "application"
    assert not fake_vm.agent.frozen
    assert len(fake_vm.agent.calls("guest-fsfreeze-thaw")) == 1


async def test_backup_without_an_agent_is_crash_consistent(fake_vm: FakeVM, tmp_path: Path) -> None:
    await fake_vm.stop_agent()  # qemu-ga is not running in the guest
    backup = await backup_vm(fake_vm.qmp_address, fake_vm.agent_address, ["disk0"], tmp_path)
    assert backup.consistency == "crash" and "port is closed" in (backup.note or "")
    assert not fake_vm.agent.calls()  # nothing was sent to a closed port


async def test_backup_leaves_someone_elses_freeze_alone(fake_vm: FakeVM, tmp_path: Path) -> None:
    fake_vm.agent.set_frozen(True)  # an admin froze the guest before our backup
    backup = await backup_vm(fake_vm.qmp_address, fake_vm.agent_address, ["disk0"], tmp_path)
    assert backup.consistency == "application"  # quiescent: someone else's freeze
    assert fake_vm.agent.frozen and not fake_vm.agent.calls("guest-fsfreeze-thaw")


async def test_backup_reports_a_guest_it_could_not_thaw(fake_vm: FakeVM, tmp_path: Path) -> None:
    fake_vm.agent.inject("guest-fsfreeze-thaw", AgentFault.hang())  # the agent hangs at the thaw
    with pytest.raises(qmpagent.ThawError):
        await backup_vm(fake_vm.qmp_address, fake_vm.agent_address, ["disk0"], tmp_path, timeout=0.3)
    assert fake_vm.agent.frozen  # ThawError was right: the guest is still frozen
    fake_vm.agent.release()  # (the agent recovers and thaws)
    await fake_vm.agent.wait_idle()
    assert not fake_vm.agent.frozen


async def test_backup_when_qemu_refuses_leaves_nothing_behind(fake_vm: FakeVM, tmp_path: Path) -> None:
    fake_vm.qmp.fail("transaction", "Node 'disk0' is busy: node is used as backing hd of 'x'")
    with pytest.raises(qmpagent.SnapshotError, match="busy"):
        await backup_vm(fake_vm.qmp_address, fake_vm.agent_address, ["disk0"], tmp_path)
    assert _count_backups(tmp_path) == 0  # the overlay files were removed
    assert fake_vm.new_nodes() == set() and fake_vm.active_node("vblk0") == "disk0"
    assert not fake_vm.agent.frozen


async def test_backup_when_qemu_dies(fake_vm: FakeVM, tmp_path: Path) -> None:
    async def die(call: object) -> None:
        await fake_vm.kill()  # QEMU crashes in the middle of the snapshot

    fake_vm.qmp.set_handler("blockdev-add", die)
    with pytest.raises(qmpagent.SnapshotError):
        await backup_vm(fake_vm.qmp_address, fake_vm.agent_address, ["disk0"], tmp_path)


# --- the same function on a real VM (real QEMU, real qemu-ga; marked real_vm automatically) ------


async def test_backup_on_a_real_vm(qemu_guest: Guest, tmp_path: Path) -> None:
    backup = await backup_vm(qemu_guest.qmp_path, qemu_guest.agent_path, ["disk0"], tmp_path,
                             timeout=30)
    assert backup.consistency == "application"
    assert backup.images == {"disk0": str(qemu_guest.disk.overlay)}
    assert exists(backup.overlays["disk0"])
