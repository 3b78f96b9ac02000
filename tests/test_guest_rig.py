"""The test rig is real: real QEMU boots the guest, the real qemu-ga answers, and it all goes away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from pathlib import Path

import anyio
import pytest
from qemu.qmp import EventListener, QMPClient

import qmpagent.testing.image as image_mod
from qmpagent.testing import Guest, GuestBuildError, WriterLog, boot_guest, build_guest_image

pytestmark = pytest.mark.real_vm


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie would still answer kill(0); boot_guest reaps, so check the state too.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _raw_agent_sync(path: Path, sync_id: int) -> bytes:
    """guest-sync-delimited over a plain blocking socket: what arrives up to our reply."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(str(path))
        s.sendall(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":%d}}\n' % sync_id)
        data = b""
        want = b'\xff{"return": %d}\n' % sync_id
        while want not in data:
            chunk = s.recv(4096)
            assert chunk, f"agent closed the socket; got {data!r}"
            data += chunk
        return data


async def test_boot_qmp_event_agent_writer_and_cleanup(qemu_guest_factory) -> None:
    """Boot paused so the whole boot is visible over raw QMP: greeting, running, the agent's
    port opening; a raw agent sync answers; the writer's log grows; everything is gone after."""
    async with qemu_guest_factory(paused=True) as guest:
        guest: Guest
        qmp = QMPClient("test")
        await qmp.connect(str(guest.qmp_path))
        try:
            assert qmp.greeting is not None
            version = qmp.greeting.QMP.version["qemu"]
            assert version["major"] >= 7
            assert "oob" in qmp.greeting.QMP.capabilities
            assert (await qmp.execute("query-status"))["status"] == "prelaunch"
            listener = EventListener("VSERPORT_CHANGE")
            with qmp.listen(listener):
                await qmp.execute("cont")
                assert (await qmp.execute("query-status"))["status"] == "running"
                with anyio.fail_after(120):
                    while True:
                        event = await listener.get()
                        if event["data"]["id"] == guest.agent_port_id and event["data"]["open"]:
                            break
        finally:
            await qmp.disconnect()

        data = await anyio.to_thread.run_sync(_raw_agent_sync, guest.agent_path, 4242)
        assert data.endswith(b'\xff{"return": 4242}\n')

        first = await guest.writer_log()
        later = await guest.wait_writer_progress(first.last_uptime + 0.5, timeout=120)
        assert len(later.entries) > len(first.entries)
        seqs = [seq for seq, _ in later.entries]
        assert seqs == list(range(len(seqs)))

        pid, workdir = guest.pid, guest.workdir
        assert _pid_alive(pid)
        assert workdir.exists()
        assert guest.disk.overlay.exists()
    assert not _pid_alive(pid)
    assert not workdir.exists()
    assert guest.returncode is not None


async def test_two_guests_side_by_side(qemu_guest_factory) -> None:
    async with qemu_guest_factory() as a, qemu_guest_factory(second_disk=True) as b:
        assert a.workdir != b.workdir and a.pid != b.pid
        replies = await asyncio.gather(
            anyio.to_thread.run_sync(_raw_agent_sync, a.agent_path, 1),
            anyio.to_thread.run_sync(_raw_agent_sync, b.agent_path, 2),
        )
        assert replies[0].endswith(b'\xff{"return": 1}\n')
        assert replies[1].endswith(b'\xff{"return": 2}\n')
        mounts = (await b.run("cat /proc/mounts")).output
        assert " /mnt/data ext4 " in mounts and " /mnt/data2 ext4 " in mounts
        assert [d.node_name for d in b.disks] == ["disk0", "disk1"]
        pids = (a.pid, b.pid)
    assert not any(_pid_alive(p) for p in pids)


async def test_cancellation_inside_the_guest_still_cleans_up(qemu_guest_factory) -> None:
    seen: dict[str, object] = {}
    inside = asyncio.Event()

    async def use_guest() -> None:
        async with qemu_guest_factory(wait_for_agent=False) as guest:
            seen["pid"], seen["workdir"] = guest.pid, guest.workdir
            inside.set()
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(use_guest())
    with anyio.fail_after(120):
        await inside.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not _pid_alive(int(str(seen["pid"])))
    assert not Path(str(seen["workdir"])).exists()


async def test_error_during_boot_cleans_up(tmp_path: Path) -> None:
    """QEMU that exits at once (bad argument) gives a GuestError with its stderr, and no leftovers."""
    from qmpagent.testing import GuestError

    parent = tmp_path / "guests"
    parent.mkdir()
    with pytest.raises(GuestError, match="nonsense"):
        async with boot_guest(extra_args=["-nonsense-option"], workdir_parent=parent):
            pass  # pragma: no cover
    assert list(parent.iterdir()) == []


async def test_writer_can_be_disabled(qemu_guest_factory) -> None:
    async with qemu_guest_factory(writer=False) as guest:
        result = await guest.run("ls /mnt/data", check=False)
        assert "writer.log" not in result.output


def test_image_is_cached() -> None:
    first = build_guest_image()
    started = time.monotonic()
    again = build_guest_image()
    assert again == first
    assert time.monotonic() - started < 5
    assert first.kernel.read_bytes()[:4] == b"\x7fELF"  # the PVH vmlinux, not the bzImage


def test_missing_package_names_the_apt_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(image_mod, "QEMU_GA_PATH", "/nonexistent/qemu-ga")
    with pytest.raises(GuestBuildError, match=r"apt-get install .*qemu-guest-agent"):
        build_guest_image(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_writer_log_parsing() -> None:
    log = WriterLog.parse("0 1.00\n1 1.01\n2 1.31\n3 1.32\n4 1.")
    assert log.entries[-1] == (3, 1.32)
    assert round(log.largest_gap(), 2) == 0.30
    assert round(log.largest_gap(after=1.31), 2) == 0.01
    assert WriterLog.parse("garbage\n\n1 x\n").entries == ()
