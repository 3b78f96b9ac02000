"""Tests of FakeVM and of the fake QMP server's block model, power and port wiring (no QEMU).

How close the fakes are to real QEMU and qemu-ga is checked by tests/test_conformance.py; the
orchestrator under faults by tests/test_fault_matrix.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import qmpagent
from qmpagent import (
    AgentTimeout,
    FreezeStatus,
    GuestAgent,
    JobError,
    Monitor,
    MonitorCommandError,
    MonitorUnavailable,
    SnapshotError,
    SnapshotOrchestrator,
)
from qmpagent.testing import (
    FakeQMPServer,
    FakeVM,
    create_qcow2_image,
    read_qcow2_header,
)

ROOT = Path(__file__).resolve().parent.parent
QEMU_IMG = shutil.which("qemu-img")


# ------------------------------------------------------------------------------------ helpers


class RawQMP:
    """A raw QMP client: bytes in, bytes out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, address: str | tuple[str, int]) -> RawQMP:
        if isinstance(address, tuple):
            reader, writer = await asyncio.open_connection(*address, limit=1 << 24)
        else:
            reader, writer = await asyncio.open_unix_connection(address, limit=1 << 24)
        return cls(reader, writer)

    async def line(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)

    async def request(self, command: str, arguments: dict[str, Any] | None = None,
                      **extra: Any) -> bytes:
        msg: dict[str, Any] = {"execute": command, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        self.writer.write(json.dumps(msg).encode())
        await self.writer.drain()
        while True:
            line = await self.line()
            if line.startswith(b'{"timestamp"'):
                self.events.append(json.loads(line))
                continue
            return line

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def vm() -> AsyncIterator[FakeVM]:
    async with FakeVM(disks=2) as fake:
        yield fake


async def collect(stream: Any, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with anyio.fail_after(timeout):
        while len(events) < count:
            events.append(await stream.get(timeout=None))
    return events


# ------------------------------------------------------------------------------- qcow2 images


def test_qcow2_image_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    create_qcow2_image(path, 1 << 30, backing_file="/x/base.qcow2", backing_format="qcow2")
    header = read_qcow2_header(path)
    assert (header.version, header.size, header.cluster_size) == (3, 1 << 30, 65536)
    assert (header.backing_file, header.backing_format) == ("/x/base.qcow2", "qcow2")
    assert path.stat().st_size == 196608 + 16  # like QEMU's blockdev-create: 3 clusters + L1
    create_qcow2_image(path, 512)
    assert read_qcow2_header(path).backing_file is None
    (tmp_path / "raw").write_bytes(b"not an image" * 10)
    with pytest.raises(ValueError, match="Image is not in qcow2 format"):
        read_qcow2_header(tmp_path / "raw")
    with pytest.raises(ValueError):
        create_qcow2_image(path, 1000)


@pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img")
def test_qcow2_image_is_what_qemu_img_makes(tmp_path: Path) -> None:
    assert QEMU_IMG is not None
    base, ours, theirs = tmp_path / "base.qcow2", tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    create_qcow2_image(base, 64 << 20)
    create_qcow2_image(ours, 64 << 20, backing_file=str(base), backing_format="qcow2")
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(theirs), "64M"], check=True)
    assert ours.read_bytes() == theirs.read_bytes()  # byte for byte
    check = subprocess.run([QEMU_IMG, "check", str(ours)], capture_output=True, text=True)
    assert check.returncode == 0 and "No errors" in check.stdout
    info = json.loads(subprocess.run([QEMU_IMG, "info", "--output=json", str(ours)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 64 << 20 and info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"


# ------------------------------------------------------------------------------- the fake VM


async def test_fake_vm_layout_and_cleanup() -> None:
    async with FakeVM(disks=2) as vm:
        workdir = vm.workdir
        assert [d.node_name for d in vm.disks] == ["disk0", "disk1"]
        assert [d.mountpoint for d in vm.disks] == ["/mnt/data", "/mnt/data2"]
        assert vm.agent.mountpoints == ["/mnt/data", "/mnt/data2"]
        assert vm.active_node(0) == "disk0" and vm.active_node("vblk1") == "disk1"
        assert vm.status == "running" and not vm.exited
        async with await Monitor.connect(vm.qmp_address) as mon:
            nodes = {n.node_name: n for n in await mon.named_block_nodes()}
            assert {"disk0", "file0", "disk1", "file1"} <= set(nodes)
            assert nodes["disk0"].backing_file == str(vm.disk.base)
            assert nodes["disk0"].virtual_size == 64 << 20
            auto = [n for n in nodes.values() if n.auto_named]
            assert len(auto) == 4 and all(n.read_only for n in auto)
            assert await mon.device_node_name("vblk1") == "disk1"
            port = await mon.agent_port()
            assert (port.device_id, port.chardev, port.open) == ("qgaport0", "qga0", True)
            async with await GuestAgent.connect(vm.agent_address) as ga:
                assert (await ga.info()).version == "7.2.22"
        assert vm.new_nodes() == set() and vm.new_files() == set()
    assert not workdir.exists() and vm.exited


async def test_fake_vm_given_workdir_and_tcp(tmp_path: Path) -> None:
    async with FakeVM(workdir=tmp_path / "vm", tcp=True, backing_images=False) as vm:
        assert isinstance(vm.qmp_address, tuple) and isinstance(vm.agent_address, tuple)
        async with await Monitor.connect(vm.qmp_address) as mon:
            nodes = {n.node_name for n in await mon.named_block_nodes()}
            assert nodes == {"disk0", "file0"}
            chardevs = {c["label"]: c for c in await mon.execute("query-chardev")}
            assert chardevs["qga0"]["filename"].startswith("disconnected:tcp:127.0.0.1:")
    assert (tmp_path / "vm" / "data0.qcow2").exists()
    with pytest.raises(ValueError):
        FakeVM(disks=0)


async def test_snapshot_end_to_end_two_disks(vm: FakeVM) -> None:
    async with await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        files = {"disk0": vm.workdir / "s0.qcow2", "vblk1": vm.workdir / "s1.qcow2"}
        result = await orch.snapshot(files)
    assert result.quiesced and result.freeze_owner == "self"
    assert result.frozen == 2 and result.thawed == 2
    assert vm.active_node(0) == result.overlays["disk0"]
    assert vm.active_node(1) == result.overlays["disk1"]
    [tx] = vm.transactions
    assert tx.error is None and tx.guest_frozen
    assert tx.frozen_mountpoints == ("/mnt/data", "/mnt/data2")
    assert not vm.agent.frozen and vm.agent.total_thawed == 2
    assert vm.new_files() == {vm.workdir / "s0.qcow2", vm.workdir / "s1.qcow2"}
    header = read_qcow2_header(vm.workdir / "s0.qcow2")
    assert header.backing_file == str(vm.disk.path) and header.backing_format == "qcow2"
    # disk0 is a backing node now: a second snapshot of it is refused, atomically.
    async with await Monitor.connect(vm.qmp_address) as mon:
        with pytest.raises(SnapshotError, match="Node 'disk0' is busy") as err:
            await SnapshotOrchestrator(mon, agent=vm.agent_address).snapshot(
                {"disk0": vm.workdir / "t0.qcow2", "disk1": vm.workdir / "t1.qcow2"}
            )
    assert err.value.record.thawed == 2 and not err.value.record.snapshot_taken
    assert vm.active_node(1) == result.overlays["disk1"]  # not switched either
    assert vm.transactions[-1].error is not None
    assert not (vm.workdir / "t0.qcow2").exists() and not (vm.workdir / "t1.qcow2").exists()


@pytest.mark.skipif(QEMU_IMG is None, reason="needs qemu-img")
async def test_snapshot_chain_opens_with_qemu_img(vm: FakeVM) -> None:
    async with await Monitor.connect(vm.qmp_address) as mon:
        orch = SnapshotOrchestrator(mon, agent=vm.agent_address)
        await orch.snapshot({"vblk0": vm.workdir / "a.qcow2"})
        await orch.snapshot({"vblk0": vm.workdir / "b.qcow2"})
    assert QEMU_IMG is not None
    proc = await asyncio.create_subprocess_exec(
        QEMU_IMG, "info", "-U", "--backing-chain", "--output=json", str(vm.workdir / "b.qcow2"),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    chain = [i["filename"] for i in json.loads(out)]
    assert chain == [str(vm.workdir / "b.qcow2"), str(vm.workdir / "a.qcow2"),
                     str(vm.disk.path), str(vm.disk.base)]


# --------------------------------------------------------------------------- agent port events


async def test_agent_port_stop_start_events_and_chardev(vm: FakeVM) -> None:
    async with await Monitor.connect(vm.qmp_address) as mon, mon.listen("VSERPORT_CHANGE") as ev:
        vm.qmp.rate_limits["VSERPORT_CHANGE"] = 0.05
        await vm.qmp.settle_events()  # the boot's port-open event started a throttle period
        await vm.stop_agent()
        assert not await mon.agent_port_open()
        event = await ev.get(timeout=5)
        assert event["data"] == {"id": "qgaport0", "open": False}
        await vm.start_agent()
        assert await mon.agent_port_open()
        event = await ev.get(timeout=5)
        assert event["data"] == {"id": "qgaport0", "open": True}
        chardev = {c["label"]: c for c in await mon.execute("query-chardev")}["qga0"]
        assert chardev["filename"] == f"disconnected:unix:{vm.agent_address},server=on"
        async with await GuestAgent.connect(vm.agent_address):
            chardev = {c["label"]: c for c in await mon.execute("query-chardev")}["qga0"]
            assert chardev["filename"] == f"unix:{vm.agent_address},server=on"


async def test_vserport_change_is_rate_limited_like_qemu() -> None:
    async with FakeVM(vserport_rate_limit=0.5) as vm, await Monitor.connect(vm.qmp_address) as mon:
        async with mon.listen("VSERPORT_CHANGE") as ev:
            # The agent opened its port at boot (no client saw it): a throttle period runs.
            with pytest.raises(TimeoutError):
                await vm.qmp.settle_events(timeout=0.1)
            await vm.qmp.settle_events()
            started = time.monotonic()
            await vm.stop_agent()   # sent at once
            await vm.start_agent()  # within the period: held ...
            await vm.stop_agent()   # ... and replaced by the latest
            await vm.start_agent()
            first = await ev.get(timeout=5)
            assert first["data"]["open"] is False and time.monotonic() - started < 0.4
            second = await ev.get(timeout=5)
            delivered = time.monotonic() - started
            assert second["data"]["open"] is True and 0.4 < delivered < 3
            # It carries the time it happened, not the time it was sent.
            stamp = second["timestamp"]["seconds"] + second["timestamp"]["microseconds"] / 1e6
            assert time.time() - stamp > 0.3
            assert ev.get_nowait() is None
            await vm.qmp.settle_events()
            assert ev.get_nowait() is None
        # query-chardev was right all along
        assert await mon.agent_port_open()


# --------------------------------------------------------------------------------- power


async def test_guest_shutdown_via_agent_emits_shutdown_and_qemu_exits(vm: FakeVM) -> None:
    mon = await Monitor.connect(vm.qmp_address)
    try:
        # Past the throttle period of the boot's port-open event: the port-close event is sent
        # at once (within it, it would be held, and lost when QEMU exits, as with QEMU).
        await vm.qmp.settle_events()
        async with mon.listen("VSERPORT_CHANGE", "SHUTDOWN") as ev:
            async with await GuestAgent.connect(vm.agent_address) as ga:
                await ga.shutdown()
            port, shutdown = await collect(ev, 2)
            assert port["data"] == {"id": "qgaport0", "open": False}
            assert shutdown["event"] == "SHUTDOWN"
            assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
            await vm.wait_exit()
            with pytest.raises(MonitorUnavailable):
                await ev.get(timeout=5)
        assert vm.exited and vm.status == "exited" and vm.agent.shut_down
        with pytest.raises(MonitorUnavailable):
            await Monitor.connect(vm.qmp_address, timeout=2)
    finally:
        await mon.close()


async def test_no_shutdown_keeps_qemu(fake_vm_factory: Callable[..., FakeVM]) -> None:
    async with fake_vm_factory(no_shutdown=True) as vm, await Monitor.connect(vm.qmp_address) as mon:
        async with await GuestAgent.connect(vm.agent_address) as ga:
            await ga.shutdown("halt")
        event = await mon.wait_event("SHUTDOWN", timeout=5)
        assert event["data"]["reason"] == "guest-shutdown"
        assert (await mon.execute("query-status"))["status"] == "shutdown"
        assert not await mon.agent_port_open()
        assert not vm.exited


async def test_reboot_via_agent_resets_freeze_and_reopens_port(
    fake_vm_factory: Callable[..., FakeVM],
) -> None:
    async with (
        fake_vm_factory(boot_time=0.1, vserport_rate_limit=0.2) as vm,
        await Monitor.connect(vm.qmp_address) as mon,
        mon.listen("VSERPORT_CHANGE", "RESET") as ev,
    ):
        vm.agent.freeze_foreign("/mnt/data")
        await vm.qmp.settle_events()
        async with await GuestAgent.connect(vm.agent_address) as ga:
            await ga.shutdown("reboot")
        closed, reset, opened = await collect(ev, 3)
        assert closed["data"]["open"] is False
        assert reset["data"] == {"guest": True, "reason": "guest-reset"}
        assert opened["data"]["open"] is True
        assert await mon.agent_port_open() and vm.status == "running"
        assert vm.agent.foreign_frozen == [] and not vm.agent.frozen
        async with await GuestAgent.connect(vm.agent_address) as ga:
            assert await ga.fsfreeze_status() is FreezeStatus.THAWED


async def test_reboot_with_no_reboot_is_a_shutdown(fake_vm_factory: Callable[..., FakeVM]) -> None:
    async with fake_vm_factory(no_reboot=True) as vm:
        mon = await Monitor.connect(vm.qmp_address)
        try:
            async with mon.listen("SHUTDOWN") as ev:
                await vm.reboot()
                event = await ev.get(timeout=5)
            assert event["data"] == {"guest": True, "reason": "guest-reset"}
            await vm.wait_exit()
        finally:
            await mon.close()


async def test_system_reset_quit_and_powerdown(fake_vm_factory: Callable[..., FakeVM]) -> None:
    async with fake_vm_factory(boot_time=0.05) as vm:
        async with await Monitor.connect(vm.qmp_address) as mon, mon.listen("RESET") as ev:
            await mon.execute("system_reset")
            assert (await ev.get(timeout=5))["data"] == {
                "guest": False, "reason": "host-qmp-system-reset"
            }
            await vm.wait_agent_port(open=True)
        raw = await RawQMP.open(vm.qmp_address)
        await raw.line()
        await raw.request("qmp_capabilities")
        assert await raw.request("quit") == b'{"return": {}}\r\n'
        await _shutdown_line(raw, b"host-qmp-quit")
        assert await asyncio.wait_for(raw.reader.read(), 5) == b""  # QEMU exited
        await vm.wait_exit()
        await raw.close()
    async with fake_vm_factory() as vm, await Monitor.connect(vm.qmp_address) as mon:
        async with mon.listen("POWERDOWN", "SHUTDOWN") as ev:
            await mon.execute("system_powerdown")
            powerdown, shutdown = await collect(ev, 2)
        assert powerdown["event"] == "POWERDOWN"
        assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}
        await vm.wait_exit()


async def _shutdown_line(raw: RawQMP, reason: bytes) -> None:
    line = await raw.line()
    assert line.endswith(b'"event": "SHUTDOWN", "data": {"guest": false, "reason": "' + reason
                         + b'"}}\r\n'), line


async def test_pause_stops_the_agent_and_the_orchestrator_sees_it(vm: FakeVM) -> None:
    async with (
        await Monitor.connect(vm.qmp_address) as mon,
        await GuestAgent.connect(vm.agent_address) as ga,
    ):
        await mon.execute("stop")
        assert vm.status == "paused"
        with pytest.raises(AgentTimeout):
            await ga.execute("guest-get-osinfo", timeout=0.2)
        orch = SnapshotOrchestrator(mon, agent=ga, agent_timeout=0.3)
        with pytest.raises(SnapshotError, match="not running"):
            await orch.snapshot({"disk0": vm.workdir / "p.qcow2"})
        result = await orch.snapshot({"disk0": vm.workdir / "p.qcow2"}, quiesce="preferred")
        assert not result.quiesced and result.reason == "the VM is not running"
        await mon.execute("cont")
        await ga.sync(timeout=5)
        await ga.ping(timeout=5)


async def test_kill_drops_every_connection(vm: FakeVM) -> None:
    mon = await Monitor.connect(vm.qmp_address)
    ga = await GuestAgent.connect(vm.agent_address)
    try:
        await vm.kill()
        with pytest.raises(MonitorUnavailable):
            await mon.execute("query-status", timeout=5)
        with pytest.raises(qmpagent.AgentError):
            await ga.ping(timeout=5)
        assert vm.exited
    finally:
        await ga.close()
        await mon.close()


# ---------------------------------------------------------------------- the block model


@pytest.fixture
async def mon(vm: FakeVM) -> AsyncIterator[Monitor]:
    async with await Monitor.connect(vm.qmp_address) as monitor:
        yield monitor


async def make_overlay(mon: Monitor, vm: FakeVM, name: str, disk: int = 0) -> Path:
    path = vm.workdir / f"{name}.qcow2"
    await mon.run_job("blockdev-create", {"job-id": f"{name}-c", "options": {
        "driver": "file", "filename": str(path), "size": 0}})
    await mon.execute("blockdev-add", {"driver": "file", "filename": str(path),
                                       "node-name": f"{name}f"})
    await mon.run_job("blockdev-create", {"job-id": f"{name}-q", "options": {
        "driver": "qcow2", "file": f"{name}f", "size": 64 << 20,
        "backing-file": str(vm.disks[disk].path), "backing-fmt": "qcow2"}})
    await mon.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                       "file": f"{name}f", "backing": None})
    return path


async def error_of(mon: Monitor, command: str, arguments: dict[str, Any]) -> str:
    with pytest.raises(MonitorCommandError) as info:
        await mon.execute(command, arguments)
    assert info.value.error_class == "GenericError"
    return info.value.desc


async def test_blockdev_add_del_errors(vm: FakeVM, mon: Monitor) -> None:
    path = await make_overlay(mon, vm, "ov0")
    node = {n.node_name: n for n in await mon.named_block_nodes()}["ov0"]
    assert node.filename.startswith('json:{"backing": null, "driver": "qcow2", "file": ')
    assert node.backing_file is None and node.raw["image"]["backing-filename"] == str(vm.disk.path)
    assert await error_of(mon, "blockdev-add", {"driver": "qcow2", "node-name": "ov0b",
                                                "file": "ov0f", "backing": None}) == (
        "Permission conflict on node 'ov0f': permissions 'write, resize' are both required by "
        "node 'ov0' (uses node 'ov0f' as 'file' child) and unshared by node 'ov0b' (uses node "
        "'ov0f' as 'file' child)."
    )
    cases = [
        ({"driver": "file", "filename": str(path), "node-name": "disk0"},
         "Duplicate nodes with node-name='disk0'"),
        ({"driver": "file", "filename": "/nonexistent/x", "node-name": "x"},
         "Could not open '/nonexistent/x': No such file or directory"),
        ({"driver": "qcow2", "node-name": "q", "file": "nonode"},
         "Cannot find device='nonode' nor node-name='nonode'"),
        ({"driver": "qcow2", "node-name": "#x", "file": "file0"}, "Invalid node-name: '#x'"),
        ({"driver": "qcow2", "node-name": "a" * 40, "file": "file0"}, "Node name too long"),
        ({"driver": "nope", "node-name": "n"}, "Parameter 'driver' does not accept value 'nope'"),
        ({"driver": "file", "filename": str(path)},
         "'node-name' must be specified for the root node"),
    ]
    for arguments, expected in cases:
        assert await error_of(mon, "blockdev-add", arguments) == expected
    (vm.workdir / "junk").write_bytes(b"precious")
    await mon.execute("blockdev-add", {"driver": "file", "filename": str(vm.workdir / "junk"),
                                       "node-name": "jf"})
    assert await error_of(mon, "blockdev-add", {"driver": "qcow2", "node-name": "jq",
                                                "file": "jf"}) == "Image is not in qcow2 format"
    assert await error_of(mon, "blockdev-del", {"node-name": "nope"}) == (
        "Failed to find node with node-name='nope'"
    )
    assert await error_of(mon, "blockdev-del", {"node-name": "ov0f"}) == "Block device ov0f is in use"
    assert await error_of(mon, "blockdev-del", {"node-name": "disk0"}) == "Node disk0 is in use"
    auto = next(n for n in vm.qmp.nodes if n.startswith("#") and vm.qmp.nodes[n].driver == "qcow2")
    assert await error_of(mon, "blockdev-del", {"node-name": auto}) == (
        f"Node '{auto}' is busy: node is used as backing hd of 'disk0'"
    )
    for name in ("ov0", "ov0f", "jf"):
        await mon.execute("blockdev-del", {"node-name": name})
    assert vm.new_nodes() == set()
    assert path.exists()  # QEMU does not delete files


async def test_transaction_is_atomic_with_qemus_errors(vm: FakeVM, mon: Monitor) -> None:
    await make_overlay(mon, vm, "ov0", 0)
    await make_overlay(mon, vm, "ov1", 1)

    def snap(node: str, overlay: str) -> dict[str, Any]:
        return {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}

    cases = [
        ([snap("nonode", "ov0")], "Cannot find device='nonode' nor node-name='nonode'"),
        ([snap("disk0", "nonode")], "Cannot find device='nonode' nor node-name='nonode'"),
        ([snap("disk0", "ov0f")], "The overlay is already in use"),
        ([snap("disk0", "disk1")], "The overlay is already in use"),
        ([snap("disk0", "ov0"), snap("disk1", "nonode")],
         "Cannot find device='nonode' nor node-name='nonode'"),
        ([snap("disk0", "ov0"), snap("disk0", "ov1")],
         "Node 'disk0' is busy: node is used as backing hd of 'ov0'"),
        ([{"type": "abort", "data": {}}], "Transaction aborted using Abort action"),
    ]
    for actions, expected in cases:
        assert await error_of(mon, "transaction", {"actions": actions}) == expected
        assert vm.active_node(0) == "disk0" and vm.active_node(1) == "disk1"  # all or nothing
    await mon.execute("transaction", {"actions": []})
    await mon.execute("transaction", {"actions": [snap("disk0", "ov0"), snap("disk1", "ov1")]})
    assert (vm.active_node(0), vm.active_node(1)) == ("ov0", "ov1")
    assert await error_of(mon, "transaction", {"actions": [snap("disk0", "ov1")]}) == (
        "Node 'disk0' is busy: node is used as backing hd of 'ov0'"
    )
    flat = {n.node_name: n for n in await mon.named_block_nodes()}
    deep = {n["node-name"]: n for n in await mon.execute("query-named-block-nodes")}
    assert flat["ov0"].raw["backing_file_depth"] == 0  # QEMU: flat output has no depth
    assert deep["ov0"]["backing_file_depth"] == 2  # ov0 -> disk0 -> base0
    assert flat["ov0"].filename == str(vm.workdir / "ov0.qcow2")
    assert flat["ov0"].backing_file == str(vm.disk.path)
    assert flat["disk0"].read_only and not flat["file0"].read_only
    assert await mon.device_node_name("vblk0") == "ov0"
    assert await error_of(mon, "blockdev-del", {"node-name": "ov0"}) == "Node ov0 is in use"
    assert await error_of(mon, "blockdev-del", {"node-name": "disk0"}) == (
        "Node 'disk0' is busy: node is used as backing hd of 'ov0'"
    )
    qom = await mon.execute("qom-get", {"path": "/machine/peripheral/vblk0", "property": "drive"})
    assert qom == "ov0"


async def test_blockdev_create_jobs(vm: FakeVM, mon: Monitor) -> None:
    async with mon.listen("JOB_STATUS_CHANGE") as ev:
        await mon.execute("blockdev-create", {"job-id": "j", "options": {
            "driver": "file", "filename": str(vm.workdir / "new"), "size": 0}})
        statuses = [e["data"]["status"] for e in await collect(ev, 5)]
        assert statuses == ["created", "running", "waiting", "pending", "concluded"]
        assert await error_of(mon, "blockdev-create", {"job-id": "j", "options": {
            "driver": "file", "filename": str(vm.workdir / "other"), "size": 0}}) == (
            "Job ID 'j' already in use"
        )
        await mon.execute("job-dismiss", {"id": "j"})
        assert (await ev.get(timeout=5))["data"] == {"id": "j", "status": "null"}
    assert (vm.workdir / "new").stat().st_size == 0
    (vm.workdir / "precious").write_bytes(b"data")  # QEMU truncates an existing file
    await mon.run_job("blockdev-create", {"options": {
        "driver": "file", "filename": str(vm.workdir / "precious"), "size": 0}})
    assert (vm.workdir / "precious").read_bytes() == b""
    with pytest.raises(JobError) as info:
        await mon.run_job("blockdev-create", {"options": {
            "driver": "file", "filename": "/nonexistent/x.qcow2", "size": 0}})
    assert info.value.desc == "Could not create '/nonexistent/x.qcow2': No such file or directory"
    with pytest.raises(JobError) as info:
        await mon.run_job("blockdev-create", {"options": {
            "driver": "qcow2", "file": "nonode", "size": 1 << 20}})
    assert info.value.desc == "Cannot find device='nonode' nor node-name='nonode'"
    assert await error_of(mon, "blockdev-create", {"job-id": "z", "options": {
        "driver": "raw", "file": "file0"}}) == "Parameter 'options.file' is unexpected"
    assert await error_of(mon, "job-dismiss", {"id": "nope"}) == "Job not found"
    assert vm.qmp.jobs == {}


async def test_qmp_fault_kinds(vm: FakeVM, mon: Monitor) -> None:
    qmp = vm.qmp
    qmp.fail("blockdev-add", "Could not open '/x': Permission denied")
    with pytest.raises(MonitorCommandError, match="Permission denied"):
        await mon.execute("blockdev-add", {"driver": "file", "filename": str(vm.disk.path),
                                           "node-name": "zz"})
    assert "zz" not in qmp.nodes  # no effect
    qmp.fail_job("blockdev-create", "Could not create '/y': Disk quota exceeded")
    with pytest.raises(JobError, match="quota"):
        await mon.run_job("blockdev-create", {"options": {
            "driver": "file", "filename": str(vm.workdir / "q"), "size": 0}})
    assert not (vm.workdir / "q").exists()
    qmp.delay_job("blockdev-create", 0.3)
    started = time.monotonic()
    await mon.run_job("blockdev-create", {"options": {
        "driver": "file", "filename": str(vm.workdir / "slow"), "size": 0}})
    assert time.monotonic() - started >= 0.3
    qmp.never_answer("blockdev-add", times=1, apply=True)
    with pytest.raises(qmpagent.MonitorTimeout):
        await mon.execute("blockdev-add", {"driver": "file", "filename": str(vm.disk.path),
                                           "node-name": "applied"}, timeout=0.3)
    assert "applied" in qmp.nodes  # it took effect; only the reply was lost
    qmp.disconnect_on("blockdev-del", apply=True)
    with pytest.raises(MonitorUnavailable):
        await mon.execute("blockdev-del", {"node-name": "applied"})
    assert "applied" not in qmp.nodes


async def test_output_is_formatted_like_qemu(vm: FakeVM) -> None:
    raw = await RawQMP.open(vm.qmp_address)
    try:
        assert await raw.line() == (
            b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
            b'"package": "qmpagent-fake"}, "capabilities": ["oob"]}}\r\n'
        )
        assert await raw.request("qmp_capabilities") == b'{"return": {}}\r\n'
        assert await raw.request("query-status", id=1) == (
            b'{"return": {"status": "running", "singlestep": false, "running": true}, "id": 1}\r\n'
        )
        assert await raw.request("no-such", id=[1]) == (
            b'{"id": [1], "error": {"class": "CommandNotFound", '
            b'"desc": "The command no-such has not been found"}}\r\n'
        )
    finally:
        await raw.close()


async def test_legacy_fake_server_api_still_works() -> None:
    async with FakeQMPServer() as server, await Monitor.connect(server.address) as mon:
        assert [n.node_name for n in await mon.named_block_nodes()] == ["disk0", "file0"]
        with pytest.raises(MonitorCommandError) as info:
            await mon.execute("blockdev-add", {})
        assert info.value.error_class == "CommandNotFound"  # block commands are opt-in
        server.block_nodes = [{"node-name": "x", "drv": "raw"}]
        assert [n.node_name for n in await mon.named_block_nodes()] == ["x"]
        server.block_nodes = None
        assert len(await mon.named_block_nodes()) == 2


# ------------------------------------------------------------------------- plugin fixtures


async def test_fake_vm_fixture(fake_vm: FakeVM) -> None:
    assert fake_vm.status == "running" and len(fake_vm.disks) == 1
    async with await GuestAgent.connect(fake_vm.agent_address) as ga:
        assert await ga.fsfreeze_freeze() == 1
        assert await ga.fsfreeze_thaw() == 1


async def test_fake_vm_factory_closes_what_the_test_left_open(
    fake_vm_factory: Callable[..., FakeVM],
) -> None:
    vm = fake_vm_factory(disks=3)
    await vm.start()  # not closed here: the fixture does it
    assert len(vm.disks) == 3 and os.path.isdir(vm.workdir)


def _run_example(marker: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
         str(ROOT / "examples" / "test_with_fakes.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def test_example_test_file_passes_under_pytest() -> None:
    """examples/test_with_fakes.py (a file users copy) runs green in CI: its fake-VM tests..."""
    proc = _run_example("not real_vm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "7 passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout


@pytest.mark.real_vm
def test_example_test_file_real_vm_part_passes() -> None:
    """... and its real-VM test."""
    proc = _run_example("real_vm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout, proc.stdout


async def test_qmp_serves_one_client_at_a_time_like_qemu(vm: FakeVM) -> None:
    first = await Monitor.connect(vm.qmp_address)
    waiting = asyncio.ensure_future(Monitor.connect(vm.qmp_address, timeout=10))
    try:
        await asyncio.sleep(0.2)  # give the second client every chance to be (wrongly) served
        assert not waiting.done()
        await first.close()
        second = await asyncio.wait_for(waiting, 10)
        assert (await second.execute("query-status"))["running"]
        await second.close()
    finally:
        await first.close()
        if not waiting.done():
            waiting.cancel()


def test_docs_quick_start_runs(tmp_path: Path) -> None:
    """The code of docs/testing.md's quick start, pasted into a test file, passes (its fake-VM
    tests; the real-VM one is deselected)."""
    text = (ROOT / "docs" / "testing.md").read_text()
    section = text.split("## A test of your own code", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 3
    test_file = tmp_path / "test_docs_quick_start.py"
    test_file.write_text("\n\n".join(blocks))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
         "-m", "not real_vm", str(test_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed, 1 deselected" in proc.stdout, proc.stdout


async def test_blockdev_add_inline_file_child(vm: FakeVM, mon: Monitor) -> None:
    path = await make_overlay(mon, vm, "inl")
    await mon.execute("blockdev-del", {"node-name": "inl"})
    await mon.execute("blockdev-del", {"node-name": "inlf"})
    assert await error_of(mon, "blockdev-add", {
        "driver": "qcow2", "node-name": "inl", "backing": None,
        "file": {"driver": "file", "filename": str(path), "node-name": "disk0"}}) == (
        "Duplicate nodes with node-name='disk0'"
    )
    assert "inl" not in vm.qmp.nodes
    await mon.execute("blockdev-add", {"driver": "qcow2", "node-name": "inl", "backing": None,
                                       "file": {"driver": "file", "filename": str(path)}})
    child = vm.qmp.nodes["inl"].file
    assert child is not None and child.startswith("#block") and vm.qmp.nodes[child].auto_named
    await mon.execute("blockdev-del", {"node-name": "inl"})
    assert child not in vm.qmp.nodes  # an implicit child goes with its parent
