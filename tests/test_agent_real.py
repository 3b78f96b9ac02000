"""GuestAgent against the real qemu-ga inside the real guest."""

from __future__ import annotations

import asyncio
import socket

import anyio
import pytest
from peer_versions import agent_version_prefix, frozen_reason

from qmpagent import (
    AgentCommandError,
    AgentUnavailable,
    FreezeStatus,
    GuestAgent,
    UsageError,
)
from qmpagent.monitor import Monitor
from qmpagent.testing import Guest

pytestmark = pytest.mark.real_vm


async def test_freeze_cycle_and_the_writer_gap(qemu_guest: Guest) -> None:
    async with await GuestAgent.connect(qemu_guest.agent_path, timeout=30) as ga:
        await ga.ping()
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED
        info = await ga.info()
        assert info.version.startswith(agent_version_prefix(qemu_guest))
        assert info.is_enabled("guest-fsfreeze-freeze")
        assert info.is_enabled("guest-fsfreeze-freeze-list")

        before = await qemu_guest.wait_writer_progress(0.0)
        assert await ga.fsfreeze_freeze() == 1
        try:
            assert await ga.fsfreeze_status() is FreezeStatus.FROZEN
            with pytest.raises(AgentCommandError) as err:
                await ga.fsfreeze_freeze()
            assert err.value.error_class == "CommandNotFound"
            assert err.value.desc.endswith(frozen_reason(qemu_guest))
            # guest-info shows the freeze commands disabled while frozen.
            frozen_info = await ga.info()
            assert not frozen_info.is_enabled("guest-fsfreeze-freeze")
            assert frozen_info.is_enabled("guest-fsfreeze-thaw")
            # The writer is blocked: no entry newer than the freeze appears while frozen.
            uptime_frozen = await qemu_guest.uptime()
            await ga.ping()  # the agent still answers
        finally:
            thawed = await ga.fsfreeze_thaw()
        assert thawed == 1
        assert await ga.fsfreeze_thaw() == 0
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED

        after = await qemu_guest.wait_writer_progress(uptime_frozen + 0.2)
        gap = after.largest_gap(after=before.last_uptime - 0.05)
        assert gap >= 0.05, f"the freeze left no gap in the writer log: {gap}"


async def test_freeze_list(qemu_guest: Guest) -> None:
    async with await GuestAgent.connect(qemu_guest.agent_path, timeout=30) as ga:
        assert await ga.fsfreeze_freeze(["/nonexistent"]) == 0
        assert await ga.fsfreeze_thaw() == 0
        assert await ga.fsfreeze_freeze(["/mnt/data"]) == 1
        assert await ga.fsfreeze_status() is FreezeStatus.FROZEN
        assert await ga.fsfreeze_thaw() == 1
        with pytest.raises(UsageError):
            await ga.fsfreeze_freeze("/mnt/data")


async def test_info_osinfo_fsinfo_exec_and_files(qemu_guest: Guest) -> None:
    async with await GuestAgent.connect(qemu_guest.agent_path, timeout=30) as ga:
        await ga.sync()
        osinfo = await ga.get_osinfo()
        assert osinfo["machine"] == "x86_64"
        assert osinfo["kernel-release"] == qemu_guest.image.kernel_version
        fsinfo = await ga.get_fsinfo()
        assert any(fs["mountpoint"] == "/mnt/data" and fs["type"] == "ext4" for fs in fsinfo)

        result = await ga.exec("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"])
        assert (result.exitcode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        assert not result.ok
        result = await ga.exec("/bin/cat", input_data=b"\x00\xffbinary")
        assert result.ok and result.stdout == b"\x00\xffbinary"
        result = await ga.exec("/bin/sh", ["-c", "kill -9 $$"])
        assert result.exitcode is None and result.signal == 9
        with pytest.raises(AgentCommandError):
            await ga.exec("/nonexistent/program")

        await qemu_guest.run("printf 'a\\nb\\n' > /tmp/f; head -c 3000000 /dev/urandom > /tmp/big")
        assert await ga.read_file("/tmp/f") == b"a\nb\n"
        big = await ga.read_file("/tmp/big", timeout=60)
        digest = (await qemu_guest.run("md5sum /tmp/big")).output.split()[0]
        import hashlib

        assert len(big) == 3000000 and hashlib.md5(big).hexdigest() == digest
        with pytest.raises(AgentCommandError):
            await ga.read_file("/nonexistent")
        from qmpagent import AgentProtocolError

        with pytest.raises(AgentProtocolError, match="max_size"):
            await ga.read_file("/tmp/big", max_size=1000)
        # No handle leaked: the agent still opens files fine, and answers.
        assert await ga.read_file("/tmp/f") == b"a\nb\n"

        # A generic command with its own timeout.
        assert await ga.execute("guest-sync", {"id": -5}, timeout=10) == -5
        hostname = await ga.execute("guest-get-host-name")
        assert isinstance(hostname["host-name"], str)
        with pytest.raises(AgentCommandError) as err:
            await ga.execute("guest-no-such-command")
        assert err.value.error_class == "CommandNotFound"
        with pytest.raises(AgentCommandError) as err:
            await ga.execute("guest-fsfreeze-freeze-list", {"mountpoints": "notalist"})
        assert err.value.error_class == "GenericError"
        assert ga.syncs == 2  # connect + the explicit sync: errors are replies, no resync


async def test_shutdown_sends_no_reply_and_qmp_sees_it(qemu_guest: Guest) -> None:
    async with await Monitor.connect(qemu_guest.qmp_path) as mon, mon.listen("SHUTDOWN") as events:
        async with await GuestAgent.connect(qemu_guest.agent_path, timeout=30) as ga:
            with anyio.fail_after(10):
                await ga.shutdown()  # returns once sent
            assert not ga.in_sync  # a late error reply would be stale: resync before the next
        event = await events.get(timeout=120)
    assert event["data"] == {"guest": True, "reason": "guest-shutdown"}


async def test_requests_written_before_the_port_opened_do_not_confuse_a_later_client(
    qemu_guest: Guest,
) -> None:
    await qemu_guest.stop_agent()
    # A client that retried while the agent was down: its requests are buffered by QEMU.
    with pytest.raises(AgentUnavailable):
        await GuestAgent.connect(qemu_guest.agent_path, timeout=1.0)
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(qemu_guest.agent_path))
    raw.sendall(
        b'{"execute":"guest-ping","id":1}\n'
        b'\xff{"execute":"guest-sync-delimited","arguments":{"id":99}}\n'
        b'{"execute":"guest-fsfreeze-status","id":2}\n{"execute":"guest-info"}\n'
    )
    raw.close()
    await qemu_guest.start_agent()
    async with await GuestAgent.connect(qemu_guest.agent_path, timeout=60) as ga:
        await ga.ping()
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED
        assert (await ga.info()).supports("guest-ping")
        for _ in range(20):
            assert await ga.execute("guest-sync", {"id": 7}) == 7


async def test_agent_killed_mid_session_gives_typed_error_then_recovers(qemu_guest: Guest) -> None:
    ga = await GuestAgent.connect(qemu_guest.agent_path, timeout=10)
    try:
        await qemu_guest.stop_agent()
        # The host side of the chardev stays connected; the agent just stops answering.
        with pytest.raises(AgentUnavailable):
            await ga.ping(timeout=1.0)
        await qemu_guest.start_agent()
        with anyio.fail_after(120):
            while True:
                try:
                    await ga.ping(timeout=5)
                    break
                except AgentUnavailable:
                    await asyncio.sleep(0.1)
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED
        assert ga.syncs >= 2  # resynced after the failure
    finally:
        await ga.close()
