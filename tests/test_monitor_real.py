"""qmpagent.Monitor against real QEMU (TCG) with the real qemu-ga in a throwaway guest.

The guest fixtures mark these tests ``real_vm``. The machine is small and loaded: every wait
has a generous timeout and nothing sleeps for a fixed time to let something happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from qmpagent.errors import (
    JobError,
    MonitorCommandError,
    MonitorTimeout,
    MonitorUnavailable,
)
from qmpagent.monitor import Monitor, MonitorState
from qmpagent.testing import AGENT_PORT_NAME, Guest

GuestFactory = Callable[..., AbstractAsyncContextManager[Guest]]


@pytest.fixture
async def mon(qemu_guest: Guest) -> AsyncIterator[Monitor]:
    monitor = await Monitor.connect(qemu_guest.qmp_path, timeout=30.0, command_timeout=60.0)
    try:
        yield monitor
    finally:
        await monitor.close()


def _leak_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()
    bad = ("never retrieved", "was destroyed but it is pending", "Unhandled error")
    return [r.getMessage() for r in caplog.records if any(b in r.getMessage() for b in bad)]


@contextlib.contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """SIGSTOP QEMU (it stops answering QMP) and SIGCONT it again on exit."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def _qemu_img_info(path: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "-U", "--output=json", path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    info: dict[str, Any] = json.loads(out)
    return info


async def test_error_mapping(mon: Monitor) -> None:
    with pytest.raises(MonitorCommandError) as info:
        await mon.execute("no-such-command")
    assert info.value.error_class == "CommandNotFound"
    assert "no-such-command" in info.value.desc

    with pytest.raises(MonitorCommandError) as info:
        await mon.execute("query-block", {"bogus": 1})
    assert info.value.error_class == "GenericError"
    assert "bogus" in info.value.desc

    with pytest.raises(MonitorCommandError) as info:
        await mon.execute("blockdev-add", {"driver": "no-such-driver", "node-name": "x"})
    assert info.value.error_class == "GenericError"

    status = await mon.execute("query-status")
    assert status["status"] == "running"
    assert mon.qemu_version is not None and mon.qemu_version >= (7, 0, 0)


async def test_events_stop_and_resume(mon: Monitor) -> None:
    async with mon.listen("STOP", "RESUME") as events:
        await mon.execute("stop")
        stop = await events.get(timeout=30.0)
        await mon.execute("cont")
        resume = await events.get(timeout=30.0)
    assert stop["event"] == "STOP" and isinstance(stop["data"], dict)
    assert stop["timestamp"]["seconds"] > 0
    assert resume["event"] == "RESUME"


async def test_timeout_against_stopped_qemu_then_usable(qemu_guest: Guest, mon: Monitor) -> None:
    assert (await mon.execute("query-status"))["running"]
    with _stopped(qemu_guest.pid):
        started = time.monotonic()
        with pytest.raises(MonitorTimeout):
            await mon.execute("query-status", timeout=0.5)
        assert time.monotonic() - started < 5.0
    # QEMU runs again: the late reply to the timed-out command is discarded, and this one
    # gets its own.
    assert (await mon.execute("query-version"))["qemu"]["major"] >= 7
    assert (await mon.execute("query-status"))["status"] == "running"
    assert mon.state is MonitorState.OPEN


async def test_qemu_killed_mid_command(
    qemu_guest: Guest, mon: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    await mon.execute("query-status")
    os.kill(qemu_guest.pid, signal.SIGSTOP)  # QEMU cannot answer: the command stays pending
    command = asyncio.create_task(mon.execute("query-status", timeout=120.0))
    waiting = asyncio.create_task(mon.wait_event("SHUTDOWN", timeout=120.0))
    for _ in range(5):  # let both start: the command is queued, the listener registered
        await asyncio.sleep(0)
    started = time.monotonic()
    os.kill(qemu_guest.pid, signal.SIGKILL)
    results = await asyncio.wait_for(
        asyncio.gather(command, waiting, return_exceptions=True), 30.0
    )
    elapsed = time.monotonic() - started
    assert all(isinstance(r, MonitorUnavailable) for r in results), results
    assert elapsed < 10.0
    with pytest.raises(MonitorUnavailable):
        await mon.execute("query-status")
    assert mon.state is MonitorState.LOST
    await mon.close()
    assert _leak_records(caplog) == []


async def test_blockdev_create_qcow2(qemu_guest: Guest, mon: Monitor) -> None:
    image = str(qemu_guest.workdir / "created.qcow2")
    file_job = await mon.run_job(
        "blockdev-create",
        {"job-id": "mkfile", "options": {"driver": "file", "filename": image, "size": 0}},
        timeout=120.0,
    )
    assert file_job.job_id == "mkfile" and file_job.job_type == "create"
    await mon.execute("blockdev-add", {"driver": "file", "filename": image, "node-name": "newf"})
    try:
        fmt_job = await mon.run_job(
            "blockdev-create",
            {"options": {"driver": "qcow2", "file": "newf", "size": 64 * 1024 * 1024}},
            timeout=120.0,
        )
        assert fmt_job.duration > 0
        assert await mon.execute("query-jobs") == []
    finally:
        await mon.execute("blockdev-del", {"node-name": "newf"})
    info = await _qemu_img_info(image)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 64 * 1024 * 1024


async def test_failing_job_surfaces_its_error(qemu_guest: Guest, mon: Monitor) -> None:
    missing = str(qemu_guest.workdir / "no-such-dir" / "x.qcow2")
    with pytest.raises(JobError) as info:
        await mon.run_job(
            "blockdev-create",
            {"job-id": "bad", "options": {"driver": "file", "filename": missing, "size": 0}},
            timeout=120.0,
        )
    assert info.value.job_id == "bad"
    assert "No such file or directory" in info.value.desc
    assert await mon.execute("query-jobs") == []  # dismissed


async def test_agent_port_follows_the_agent(qemu_guest: Guest, mon: Monitor) -> None:
    port = await mon.agent_port()
    assert (port.device_id, port.chardev, port.name) == (
        qemu_guest.agent_port_id, qemu_guest.agent_chardev, AGENT_PORT_NAME
    )
    assert port.open
    assert await mon.agent_port_open() is True

    async with mon.listen("VSERPORT_CHANGE") as events:
        await qemu_guest.stop_agent()
        closed = await mon.wait_agent_port(timeout=120.0, open=False)
        assert not closed.open
        assert await mon.agent_port_open() is False

        await qemu_guest.start_agent()
        reopened = await mon.wait_agent_port(timeout=120.0)
        assert reopened.open and reopened.chardev == qemu_guest.agent_chardev
        assert await mon.agent_port_open(chardev=qemu_guest.agent_chardev) is True
        # the hint events came (possibly coalesced, possibly late: wait for at least one)
        first = await events.wait(
            "VSERPORT_CHANGE", {"id": qemu_guest.agent_port_id}, timeout=30.0
        )
        assert isinstance(first["data"]["open"], bool)
        port = await mon.serial_port(first["data"]["id"])  # event id -> chardev
        assert port.chardev == qemu_guest.agent_chardev


async def test_agent_port_after_agent_killed(qemu_guest: Guest, mon: Monitor) -> None:
    async with mon.listen("VSERPORT_CHANGE", match={"id": qemu_guest.agent_port_id}) as events:
        await qemu_guest.kill_agent()
        # init restarts qemu-ga; the close and reopen may coalesce into one open:true event
        await events.get(timeout=60.0)
        port = await mon.wait_agent_port(timeout=120.0)
        assert port.open


async def test_block_helpers(qemu_guest_factory: GuestFactory) -> None:
    async with (
        qemu_guest_factory(second_disk=True, writer=False) as guest,
        await Monitor.connect(guest.qmp_path, command_timeout=60.0) as mon,
    ):
        nodes = {n.node_name: n for n in await mon.named_block_nodes()}
        for disk in guest.disks:
            fmt = nodes[disk.node_name]
            assert fmt.driver == "qcow2" and fmt.format == "qcow2"
            assert fmt.filename == str(disk.overlay)
            assert fmt.backing_file is not None and not fmt.read_only
            assert nodes[disk.file_node_name].driver == "file"
            assert await mon.device_node_name(disk.device_id) == disk.node_name
        assert any(n.auto_named for n in nodes.values())  # the backing images
        with pytest.raises(MonitorCommandError) as info:
            await mon.device_node_name("no-such-device")
        assert info.value.error_class == "DeviceNotFound"
        ports = await mon.virtio_serial_ports()
        assert {p.device_id for p in ports} >= {guest.agent_port_id}
