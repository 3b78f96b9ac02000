"""Conformance: the same scenarios against the fakes (FakeVM) and the real peers (QEMU 7.2 + qemu-ga
7.2 of Debian 12, QEMU 10.0 + qemu-ga 10.0 of Debian 13, in the test guest), asserting the same
observable bytes, replies and errors.

Each scenario is parametrized over ``peer``: the fakes answering like each real version
(``fake-7.2``, ``fake-10.0``) and the real guest of the peer under test (``real``, chosen by
``$QMPAGENT_PEER``; CI runs both). It compares what it sees with the expected values written
here for that version (captured from the real peers; paths, pids, handles, timestamps and random
names normalised). A fake that drifts from the real peer fails here in CI, and so does a real
peer that changes (then update the expectation, and the fake).

The real guest is booted once for the module (two data disks) and shared by the scenarios,
which leave it as they found it except for what they say; the last one shuts it down. No
fixed sleeps: every wait has a generous timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from agent_golden import ALLOWED_WHILE_FROZEN, FROZEN_BY_VERSION, info_golden

from qmpagent import (
    AgentCommandError,
    FreezeStatus,
    GuestAgent,
    Monitor,
    MonitorCommandError,
    MonitorUnavailable,
    SnapshotError,
    SnapshotOrchestrator,
    UnknownMountpointError,
)
from qmpagent.testing import FakeVM, boot_guest, read_qcow2_header
from qmpagent.testing.pytest_plugin import require_guest_image

pytestmark = pytest.mark.asyncio(loop_scope="module")

PEERS = ["fake-7.2", "fake-10.0", pytest.param("real", marks=pytest.mark.real_vm)]
FAKE_PEER = {"7.2": "debian12", "10.0": "debian13"}  # FakeVM(peer=...) by version
TIMEOUT = 60.0  # generous: the real guest runs under TCG on a loaded machine
MOUNTS = ["/mnt/data", "/mnt/data2"]


# ------------------------------------------------------------------------------------ peers


@dataclass
class Peer:
    """What a scenario needs from either peer."""

    kind: str
    qmp_address: str
    agent_address: str
    workdir: Path
    stop_agent: Callable[[], Awaitable[None]]
    start_agent: Callable[[], Awaitable[None]]
    freeze_foreign: Callable[[str], Awaitable[None]]
    foreign_frozen: Callable[[str], Awaitable[bool]]
    settle_events: Callable[[], Awaitable[None]]
    version: str = "7.2"  # the real QEMU and qemu-ga version ("7.2", "10.0") it answers like
    dead: bool = False  # a scenario ended the VM

    def expect(self, **by_version: Any) -> Any:
        """The expected value for this peer's version: ``expect(v7_2=..., v10_0=...)``."""
        return by_version["v" + self.version.replace(".", "_")]

    @property
    def frozen(self) -> str:
        """The reason text of a command refused while frozen."""
        return FROZEN_BY_VERSION[self.version]
    def norm(self, text: str) -> str:
        """Replace what differs between peers: the working directory, QEMU's node numbers."""
        text = text.replace(str(self.workdir), "<W>")
        return re.sub(r"#block\d+", "#block<N>", text)


@contextlib.asynccontextmanager
async def fake_peer(version: str, **options: Any) -> AsyncIterator[Peer]:
    async with FakeVM(disks=2, peer=FAKE_PEER[version], **options) as vm:

        async def freeze_foreign(mountpoint: str) -> None:
            vm.agent.freeze_foreign(mountpoint)

        async def foreign_frozen(mountpoint: str) -> bool:
            return mountpoint in vm.agent.foreign_frozen

        yield Peer("fake", str(vm.qmp_address), str(vm.agent_address), vm.workdir,
                   vm.stop_agent, vm.start_agent, freeze_foreign, foreign_frozen,
                   vm.qmp.settle_events, version)


@contextlib.asynccontextmanager
async def real_peer() -> AsyncIterator[Peer]:
    require_guest_image()
    async with boot_guest(data_disks=2) as guest:

        async def stop_agent() -> None:
            await guest.stop_agent(TIMEOUT)
            # QEMU serves one client per QMP socket: wait on the rig's own socket.
            rig_qmp = guest.workdir / "rig-qmp.sock"
            async with await Monitor.connect(rig_qmp, timeout=TIMEOUT) as mon:
                await mon.wait_agent_port(timeout=TIMEOUT, open=False)

        async def start_agent() -> None:
            await guest.start_agent(TIMEOUT)

        async def freeze_foreign(mountpoint: str) -> None:
            await guest.run(f"fsfreeze --freeze {mountpoint}", TIMEOUT)

        async def foreign_frozen(mountpoint: str) -> bool:
            # Unfreezing succeeds only if it is still frozen (then freeze it again).
            result = await guest.run(f"fsfreeze --unfreeze {mountpoint}", TIMEOUT, check=False)
            if result.returncode == 0:
                await guest.run(f"fsfreeze --freeze {mountpoint}", TIMEOUT)
            return result.returncode == 0

        async def settle_events() -> None:
            # QEMU's VSERPORT_CHANGE throttle (1 s) cannot be observed; the real scenarios
            # take longer than that between two port changes.
            pass

        major, minor, _ = guest.qemu_version
        yield Peer("real", str(guest.qmp_path), str(guest.agent_path), guest.workdir,
                   stop_agent, start_agent, freeze_foreign, foreign_frozen, settle_events,
                   f"{major}.{minor}")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PEERS)
async def peer(request: pytest.FixtureRequest) -> AsyncIterator[Peer]:
    # no_reboot: the test guest runs QEMU with -no-reboot
    cm = (fake_peer(request.param.removeprefix("fake-"), no_reboot=True)
          if request.param.startswith("fake") else real_peer())
    async with cm as p:
        yield p


@pytest.fixture(autouse=True)
def _peer_alive(request: pytest.FixtureRequest) -> None:
    if "peer" in request.fixturenames and request.getfixturevalue("peer").dead:
        pytest.skip("an earlier scenario shut the shared VM down")


# ------------------------------------------------------------------------------ raw clients


class RawAgent:
    """Bytes to and from the agent's chardev socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\n"), TIMEOUT)

    async def request(self, data: bytes | dict[str, Any]) -> bytes:
        if isinstance(data, dict):
            data = json.dumps(data, separators=(",", ":")).encode()
        await self.send(data)
        return await self.line()

    async def resync(self, sync_id: int) -> None:
        """Skip whatever an earlier client left (stale replies) up to our delimited reply."""
        await self.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":%d}}' % sync_id)
        expected = b'\xff{"return": %d}\n' % sync_id
        while not (await self.line()).endswith(expected):
            pass


@contextlib.asynccontextmanager
async def raw_agent(peer: Peer, sync_id: int = 424242) -> AsyncIterator[RawAgent]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(peer.agent_address, limit=1 << 24), TIMEOUT
    )
    agent = RawAgent(reader, writer)
    try:
        await agent.resync(sync_id)
        yield agent
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class RawQMP:
    """Bytes to and from the QMP socket (events are set aside, timestamps removed)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.greeting = b""
        self.events: list[bytes] = []

    async def line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n"), TIMEOUT)

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
                self.events.append(_untimed(line))
                continue
            return line

    async def event(self, name: bytes) -> bytes:
        """The next event ``name`` (already received or not), without its timestamp."""
        while True:
            for i, ev in enumerate(self.events):
                if b'"event": "' + name + b'"' in ev:
                    return self.events.pop(i)
            line = await self.line()
            if line.startswith(b'{"timestamp"'):
                self.events.append(_untimed(line))


def _untimed(line: bytes) -> bytes:
    return re.sub(rb'^\{"timestamp": \{"seconds": \d+, "microseconds": \d+\}, ', b"{", line)


@contextlib.asynccontextmanager
async def raw_qmp(peer: Peer) -> AsyncIterator[RawQMP]:
    # QEMU serves one client per QMP socket: scenarios open one connection at a time.
    reader, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(peer.qmp_address, limit=1 << 24), TIMEOUT
    )
    qmp = RawQMP(reader, writer)
    try:
        qmp.greeting = await qmp.line()
        assert await qmp.request("qmp_capabilities") == b'{"return": {}}\r\n'
        yield qmp
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def monitor(peer: Peer) -> AsyncIterator[Monitor]:
    async with await Monitor.connect(
        peer.qmp_address, timeout=TIMEOUT, command_timeout=TIMEOUT
    ) as mon:
        yield mon


def err(desc: str, error_class: str = "GenericError") -> bytes:
    return json.dumps({"error": {"class": error_class, "desc": desc}}).encode() + b"\n"


def qerr(desc: str, error_class: str = "GenericError") -> bytes:
    return err(desc, error_class)[:-1] + b"\r\n"



# ====================================================================================== agent


async def test_agent_frozen_state_bytes(peer: Peer) -> None:
    async with raw_agent(peer) as a:
        assert await a.request(b'{"execute":"guest-fsfreeze-status"}') == b'{"return": "thawed"}\n'
        assert await a.request(b'{"execute":"guest-info"}') == info_golden(
            lambda n: n != "guest-get-devices", peer.version
        )
        assert await a.request(b'{"execute":"guest-fsfreeze-freeze"}') == b'{"return": 2}\n'
        try:
            assert await a.request(b'{"execute":"guest-fsfreeze-status"}') == (
                b'{"return": "frozen"}\n'
            )
            assert await a.request(b'{"execute":"guest-fsfreeze-freeze","id":"f2"}') == (
                b'{"id": "f2", "error": {"class": "CommandNotFound", "desc": '
                b'"Command guest-fsfreeze-freeze ' + peer.frozen.encode() + b'"}}\n'
            )
            assert await a.request(b'{"execute":"guest-info"}') == info_golden(
                lambda n: n in ALLOWED_WHILE_FROZEN, peer.version
            )
            assert await a.request(b'{"execute":"guest-exec","arguments":{"path":"/bin/true"}}') == (
                err(f"Command guest-exec {peer.frozen}", "CommandNotFound")
            )
            assert await a.request(b'{"execute":"guest-ping"}') == b'{"return": {}}\n'
        finally:
            assert await a.request(b'{"execute":"guest-fsfreeze-thaw"}') == b'{"return": 2}\n'
        assert await a.request(b'{"execute":"guest-fsfreeze-thaw"}') == b'{"return": 0}\n'
        assert await a.request(b'{"execute":"guest-fsfreeze-status"}') == b'{"return": "thawed"}\n'


async def test_agent_frozen_state_through_the_client(peer: Peer) -> None:
    async with await GuestAgent.connect(peer.agent_address, timeout=TIMEOUT) as ga:
        assert await ga.fsfreeze_status() is FreezeStatus.THAWED
        assert (await ga.info()).is_enabled("guest-fsfreeze-freeze")
        assert await ga.fsfreeze_freeze() == 2
        try:
            assert await ga.fsfreeze_status() is FreezeStatus.FROZEN
            with pytest.raises(AgentCommandError) as info:
                await ga.fsfreeze_freeze()
            assert info.value.error_class == "CommandNotFound"
            assert info.value.desc == f"Command guest-fsfreeze-freeze {peer.frozen}"
            frozen_info = await ga.info()
            assert not frozen_info.is_enabled("guest-fsfreeze-freeze")
            assert not frozen_info.is_enabled("guest-fsfreeze-freeze-list")
            assert frozen_info.is_enabled("guest-fsfreeze-thaw")
        finally:
            assert await ga.fsfreeze_thaw() == 2
        assert await ga.fsfreeze_thaw() == 0


async def test_agent_foreign_freeze_is_invisible_and_thawed_by_a_thaw(peer: Peer) -> None:
    # docs/design.md 4: status says thawed, the agent's freeze skips it (not counted), its thaw
    # thaws it (and counts it): why a freeze that froze 0 is not ours.
    await peer.freeze_foreign("/mnt/data")
    try:
        async with await GuestAgent.connect(peer.agent_address, timeout=TIMEOUT) as ga:
            assert await ga.fsfreeze_status() is FreezeStatus.THAWED
            assert await ga.fsfreeze_freeze() == 1  # /mnt/data2 only
            assert await ga.fsfreeze_thaw() == 2  # both: the foreign freeze is gone too
    finally:
        still = await peer.foreign_frozen("/mnt/data")
    assert not still


async def test_agent_request_errors_bytes(peer: Peer) -> None:
    async with raw_agent(peer) as a:
        cases = [
            (b'{"execute":"guest-nope","id":"u"}',
             b'{"id": "u", "error": {"class": "CommandNotFound", '
             b'"desc": "The command guest-nope has not been found"}}\n'),
            (b'{"execute":"guest-sync"}', err("Parameter 'id' is missing")),
            (b'{"execute":"guest-sync","arguments":{"id":"s"}}',
             err("Invalid parameter type for 'id', expected: integer")),
            (b'{"execute":"guest-ping","arguments":{"foo":1}}', err("Parameter 'foo' is unexpected")),
            (b'{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":"x"}}',
             err("Invalid parameter type for 'mountpoints', expected: array")),
            (b'{"id":1}', b'{"id": 1, "error": {"class": "GenericError", '
                          b'"desc": "QMP input lacks member \'execute\'"}}\n'),
            (b'[1,2]', err("QMP input must be a JSON object")),
            (b'{"execute":"guest-ping","foo":1}', err("QMP input member 'foo' is unexpected")),
            (b'{"execute" "guest-ping"}', err("JSON parse error, missing : in object pair")),
            (b'{"execute":"guest-ping","id":null}', b'{"return": {}, "id": null}\n'),
            (b'{"execute":"guest-ping","id":{"b":2,"a":1}}', b'{"return": {}, "id": {"a": 1, "b": 2}}\n'),
            (b'{"execute":"guest-sync","arguments":{"id":-5}}', b'{"return": -5}\n'),
        ]
        for request, expected in cases:
            assert await a.request(request) == expected, request


async def test_agent_sync_delimited_0xff_bytes(peer: Peer) -> None:
    async with raw_agent(peer) as a:
        await a.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":123}}')
        assert await a.line() == (
            b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'
        )
        assert await a.line() == b'\xff{"return": 123}\n'
        assert await a.request(
            b'{"execute":"guest-sync-delimited","arguments":{"id":7},"id":"z"}'
        ) == b'\xff{"return": 7, "id": "z"}\n'
        await a.send(b'{"execute":"guest-pi\xff{"execute":"guest-ping"}')
        assert await a.line() == (
            b'{"error": {"class": "GenericError", '
            b'"desc": "JSON parse error, stray \'\\"guest-pi\\uFFFD\'"}}\n'
        )
        assert await a.line() == b'{"return": {}}\n'


async def test_agent_partial_input_survives_the_connection(peer: Peer) -> None:
    async with raw_agent(peer, 1001) as a:
        await a.send(b'{"execute":"guest-ping","id":"spl')
    async with raw_agent(peer, 1002) as a:
        # The next client's resync flushed the partial request (0xFF); what it sends now is new.
        assert await a.request(b'{"execute":"guest-ping","id":"after"}') == (
            b'{"return": {}, "id": "after"}\n'
        )
    reader, writer = await asyncio.open_unix_connection(peer.agent_address)
    try:
        writer.write(b'{"execute":"guest-sync","arguments":{"id":99')
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        reader, writer = await asyncio.open_unix_connection(peer.agent_address)
        writer.write(b"}}")  # completes the request the previous client started
        await writer.drain()
        assert await asyncio.wait_for(reader.readuntil(b"\n"), TIMEOUT) == b'{"return": 99}\n'
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_agent_exec_bytes(peer: Peer) -> None:
    async with raw_agent(peer) as a:
        reply = await a.request(
            b'{"execute":"guest-exec","arguments":{"path":"/bin/echo","arg":["hi"],'
            b'"capture-output":true}}'
        )
        assert re.fullmatch(rb'\{"return": \{"pid": \d+\}\}\n', reply), reply
        pid = json.loads(reply)["return"]["pid"]
        status = b""
        for _ in range(600):
            status = await a.request({"execute": "guest-exec-status", "arguments": {"pid": pid}})
            if status != b'{"return": {"exited": false}}\n':
                break
            await asyncio.sleep(0.05)  # polling a process in the guest, bounded by the loop
        assert status == (
            b'{"return": {"exitcode": 0, "out-data": "aGkK", "out-truncated": false, '
            b'"exited": true}}\n'
        )
        spawn_failed = (
            b'Failed to execute child process \\u201C/nonexistent\\u201D (No such file or directory)'
        )
        assert await a.request(b'{"execute":"guest-exec","arguments":{"path":"/nonexistent"}}') == (
            b'{"error": {"class": "GenericError", "desc": "'
            + peer.expect(v7_2=b"Guest agent command failed, error was '" + spawn_failed + b"'",
                          v10_0=spawn_failed)
            + b'"}}\n'
        )
    async with await GuestAgent.connect(peer.agent_address, timeout=TIMEOUT) as ga:
        result = await ga.exec("/bin/false", timeout=TIMEOUT)
        assert (result.exitcode, result.signal, result.stdout) == (1, None, b"")
        result = await ga.exec("/bin/echo", ["a", "b"], timeout=TIMEOUT)
        assert result.ok and result.stdout == b"a b\n"


async def test_agent_file_write_read_bytes(peer: Peer) -> None:
    path = "/run/qmpagent-conformance.txt"
    handle = re.compile(rb'\{"return": (\d+)\}\n')
    async with raw_agent(peer) as a:
        reply = await a.request({"execute": "guest-file-open", "arguments": {"path": path, "mode": "w"}})
        match = handle.fullmatch(reply)
        assert match, reply
        h = int(match.group(1))
        payload = base64.b64encode(b"hello\n").decode()
        assert await a.request({"execute": "guest-file-write",
                                "arguments": {"handle": h, "buf-b64": payload}}) == (
            b'{"return": {"count": 6, "eof": false}}\n'
        )
        assert await a.request({"execute": "guest-file-close", "arguments": {"handle": h}}) == (
            b'{"return": {}}\n'
        )
        reply = await a.request({"execute": "guest-file-open", "arguments": {"path": path}})
        match = handle.fullmatch(reply)
        assert match, reply
        h = int(match.group(1))
        read = {"execute": "guest-file-read", "arguments": {"handle": h}}
        assert await a.request(read) == b'{"return": {"count": 6, "buf-b64": "aGVsbG8K", "eof": true}}\n'
        assert await a.request(read) == b'{"return": {"count": 0, "buf-b64": "", "eof": true}}\n'
        assert await a.request({"execute": "guest-file-close", "arguments": {"handle": h}}) == (
            b'{"return": {}}\n'
        )
        assert await a.request({"execute": "guest-file-read", "arguments": {"handle": h}}) == err(
            f"handle '{h}' has not been found"
        )
        assert await a.request({"execute": "guest-file-open", "arguments": {"path": "/nonexistent"}}) == (
            err("failed to open file '/nonexistent' (mode: 'r'): No such file or directory")
        )
    async with await GuestAgent.connect(peer.agent_address, timeout=TIMEOUT) as ga:
        assert await ga.read_file(path) == b"hello\n"
        with pytest.raises(AgentCommandError) as info:
            await ga.read_file("/nonexistent")
        assert info.value.error_class == "GenericError"


async def test_agent_fsinfo_shape(peer: Peer) -> None:
    async with await GuestAgent.connect(peer.agent_address, timeout=TIMEOUT) as ga:
        fsinfo = await ga.get_fsinfo()
    assert sorted(fs["mountpoint"] for fs in fsinfo) == MOUNTS
    for fs in fsinfo:
        assert set(fs) == {"name", "total-bytes", "mountpoint", "disk", "used-bytes", "type"} | (
            peer.expect(v7_2=set(), v10_0={"total-bytes-privileged"})
        )
        assert fs["type"] == "ext4" and fs["disk"][0]["bus-type"] == "virtio"


# ======================================================================================== QMP


async def test_qmp_greeting_status_and_errors_bytes(peer: Peer) -> None:
    async with raw_qmp(peer) as q:
        greeting = re.sub(rb"\d+", b"N", q.greeting)
        greeting = re.sub(rb'"package": "[^"]*"', b'"package": "P"', greeting)
        assert greeting == (
            b'{"QMP": {"version": {"qemu": {"micro": N, "minor": N, "major": N}, '
            b'"package": "P"}, "capabilities": ["oob"]}}\r\n'
        )
        status = peer.expect(  # singlestep is gone in 10.0
            v7_2=b'{"status": "running", "singlestep": false, "running": true}',
            v10_0=b'{"status": "running", "running": true}',
        )
        assert await q.request("query-status") == b'{"return": ' + status + b'}\r\n'
        assert await q.request("query-status", id="s") == b'{"return": ' + status + b', "id": "s"}\r\n'

        assert await q.request("no-such", id=[1]) == (
            b'{"id": [1], "error": {"class": "CommandNotFound", '
            b'"desc": "The command no-such has not been found"}}\r\n'
        )
        assert await q.request("qmp_capabilities") == qerr(
            "Capabilities negotiation is already complete, command ignored", "CommandNotFound"
        )
        assert await q.request("query-block", {"bogus": 1}) == qerr("Parameter 'bogus' is unexpected")
        assert await q.request("blockdev-del", {}) == qerr("Parameter 'node-name' is missing")
        assert await q.request("blockdev-del", {"node-name": 1}) == qerr(
            "Invalid parameter type for 'node-name', expected: string"
        )
        assert await q.request("job-dismiss", {"id": "nope"}) == qerr("Job not found")


async def test_qmp_agent_port_state_and_events(peer: Peer) -> None:
    def qga(chardevs: Any) -> dict[str, Any]:
        entry = next(c for c in chardevs if c["label"] == "qga0")
        return {k: peer.norm(v) if isinstance(v, str) else v for k, v in entry.items()}

    def stamp(event: Mapping[str, Any]) -> float:
        return float(event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6)

    loop = asyncio.get_running_loop()
    async with monitor(peer) as mon:
        assert qga(await mon.execute("query-chardev")) == {
            "frontend-open": True, "filename": "disconnected:unix:<W>/qga.sock,server=on",
            "label": "qga0",
        }
        await peer.settle_events()
        async with mon.listen("VSERPORT_CHANGE", match={"id": "qgaport0"}) as events:
            await peer.stop_agent()
            closed = await events.get(timeout=TIMEOUT)
            closed_at = loop.time()
            assert closed["data"] == {"open": False, "id": "qgaport0"}
            assert qga(await mon.execute("query-chardev"))["frontend-open"] is False
            assert not await mon.agent_port_open()
            await peer.start_agent()
            port = await mon.wait_agent_port(timeout=TIMEOUT)
            assert port.open and port.device_id == "qgaport0" and port.chardev == "qga0"
            opened = await events.get(timeout=TIMEOUT)
            opened_at = loop.time()
            opened_wall = time.time()
            assert opened["data"] == {"open": True, "id": "qgaport0"}
        assert qga(await mon.execute("query-chardev"))["frontend-open"] is True
    # QEMU throttles VSERPORT_CHANGE to one per second per port: an event that happened
    # within the second after the previous one is delivered when that second ends, carrying
    # the time it happened. (query-chardev, read above, was right all along.)
    happened = stamp(opened) - stamp(closed)
    delivered = opened_at - closed_at
    if happened < 0.9:
        # Held until a second after the close was *emitted* (its timestamp, the host's wall
        # clock as ours): measured from when we *received* the close, a slow reader would see
        # less than a second.
        assert opened_wall - stamp(closed) > 0.95, (happened, delivered, opened_wall - stamp(closed))
    # And never before it happened (same clock: the event's timestamp is the host's wall time).
    assert opened_wall >= stamp(opened) - 0.05, (happened, delivered)
    async with await GuestAgent.connect(peer.agent_address, timeout=TIMEOUT) as ga:
        await ga.ping()


def _create(job_id: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"job-id": job_id, "options": options}


async def test_qmp_blockdev_create_jobs_bytes(peer: Peer) -> None:
    path = peer.workdir / "cf.img"
    async with raw_qmp(peer) as q:
        assert await q.request("blockdev-create", _create("cj", {
            "driver": "file", "filename": str(path), "size": 0})) == b'{"return": {}}\r\n'
        statuses = [await q.event(b"JOB_STATUS_CHANGE") for _ in range(5)]
        assert statuses == [
            b'{"event": "JOB_STATUS_CHANGE", "data": {"status": "%s", "id": "cj"}}\r\n' % s
            for s in (b"created", b"running", b"waiting", b"pending", b"concluded")
        ]
        assert await q.request("query-jobs") == (
            b'{"return": [{"current-progress": 1, "status": "concluded", "total-progress": 1, '
            b'"type": "create", "id": "cj"}]}\r\n'
        )
        assert await q.request("blockdev-create", _create("cj", {
            "driver": "file", "filename": str(path), "size": 0})) == qerr("Job ID 'cj' already in use")
        assert await q.request("job-dismiss", {"id": "cj"}) == b'{"return": {}}\r\n'
        assert await q.event(b"JOB_STATUS_CHANGE") == (
            b'{"event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "cj"}}\r\n'
        )
        assert path.stat().st_size == 0
        # A job that fails: aborting, and its error in query-jobs.
        assert await q.request("blockdev-create", _create("bad", {
            "driver": "file", "filename": "/nonexistent/x.img", "size": 0})) == b'{"return": {}}\r\n'
        statuses = [await q.event(b"JOB_STATUS_CHANGE") for _ in range(4)]
        assert [json.loads(s)["data"]["status"] for s in statuses] == [
            "created", "running", "aborting", "concluded"
        ]
        assert await q.request("query-jobs") == (
            b'{"return": [{"current-progress": 1, "status": "concluded", "total-progress": 1, '
            b'"type": "create", "id": "bad", "error": "Could not create \'/nonexistent/x.img\': '
            b'No such file or directory"}]}\r\n'
        )
        assert await q.request("job-dismiss", {"id": "bad"}) == b'{"return": {}}\r\n'
        assert await q.request("blockdev-create", _create("z", {
            "driver": "raw", "file": "file0"})) == qerr("Parameter 'options.file' is unexpected")
    path.unlink()


async def _make_overlay(mon: Monitor, peer: Peer, name: str, disk: int) -> Path:
    path = peer.workdir / f"{name}.qcow2"
    await mon.run_job("blockdev-create", _create(f"{name}-c", {
        "driver": "file", "filename": str(path), "size": 0}))
    await mon.execute("blockdev-add", {"driver": "file", "filename": str(path),
                                       "node-name": f"{name}f"})
    await mon.run_job("blockdev-create", _create(f"{name}-q", {
        "driver": "qcow2", "file": f"{name}f", "size": 64 << 20,
        "backing-file": str(peer.workdir / f"data{disk}.qcow2"), "backing-fmt": "qcow2"}))
    await mon.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                       "file": f"{name}f", "backing": None})
    return path


IMAGE_KEYS = ("filename", "format", "virtual-size", "cluster-size", "backing-filename",
              "full-backing-filename", "backing-filename-format")


def _node_view(peer: Peer, raw: dict[str, Any]) -> dict[str, Any]:
    """A node entry with what is comparable between peers (sizes on disk and caches are not)."""
    view: dict[str, Any] = {
        "keys": list(raw),
        "image-keys": sorted(raw["image"]),
        "image": {k: peer.norm(str(raw["image"][k])) for k in IMAGE_KEYS if k in raw["image"]},
    }
    for key in ("node-name", "drv", "ro", "backing_file_depth", "file", "backing_file",
                "encrypted", "detect_zeroes", "cache"):
        if key in raw:
            view[key] = peer.norm(raw[key]) if isinstance(raw[key], str) else raw[key]
    return view


def _qcow2_view(path: Path, backing: str) -> tuple[int, bytes, int, bytes]:
    """The image's length, its header up to the backing file name (minus the name's length
    field), where the name is, and the metadata clusters after the header cluster."""
    data = path.read_bytes()
    header = read_qcow2_header(path)
    assert header.backing_file == backing
    name = backing.encode()
    at = data.index(name)
    assert int.from_bytes(data[16:20], "big") == len(name)
    assert data[at + len(name) : 65536] == bytes(65536 - at - len(name))
    return len(data), data[:16] + data[20:at], at, data[65536:]


def _sized(line: bytes) -> bytes:
    """An event or reply with its byte counts (which depend on the image's data) as N."""
    return re.sub(rb'"(len|offset|current-progress|total-progress)": \d+', rb'"\1": N', line)


async def _events_until(q: RawQMP, last: bytes) -> list[bytes]:
    """Every event (sized) up to and including the first that contains ``last``."""
    seen: list[bytes] = []
    while not seen or last not in seen[-1]:
        if q.events:
            seen.append(_sized(q.events.pop(0)))
            continue
        line = await q.line()
        if line.startswith(b'{"timestamp"'):
            q.events.append(_untimed(line))
    return seen


def _status(job: bytes, status: bytes) -> bytes:
    return b'{"event": "JOB_STATUS_CHANGE", "data": {"status": "%s", "id": "%s"}}\r\n' % (status, job)


def _block_event(name: bytes, job: bytes, speed: int = 0) -> bytes:
    return (b'{"event": "%s", "data": {"device": "%s", "len": N, "offset": N, "speed": %d, '
            b'"type": "commit"}}\r\n' % (name, job, speed))


async def test_qmp_active_commit_bytes(peer: Peer) -> None:
    """docs/design.md 4: an active block-commit: running -> ready -> block-job-complete pivots;
    cancelled: aborting; its errors; the job's edges in x-debug-query-block-graph."""
    async with monitor(peer) as mon:
        path = await _make_overlay(mon, peer, "ccm", 1)
        await mon.execute("transaction", {"actions": [
            {"type": "blockdev-snapshot", "data": {"node": "disk1", "overlay": "ccm"}}]})
    try:
        async with raw_qmp(peer) as q:
            unknown = qerr("Block job 'nope' not found", "DeviceNotActive")
            assert await q.request("block-job-complete", {"device": "nope"}) == unknown
            assert await q.request("block-job-cancel", {"device": "nope"}) == unknown
            assert await q.request("block-job-set-speed", {"device": "nope", "speed": 1}) == unknown
            commit = {"job-id": "cc1", "device": "ccm", "base-node": "disk1", "auto-dismiss": False}
            assert await q.request("block-commit", {**commit, "base-node": "file1"}) == qerr(
                "'file1' is not in this backing file chain")
            assert await q.request("block-commit", {**commit, "base-node": "nope"}) == qerr(
                "Cannot find device='' nor node-name='nope'")
            assert await q.request("block-commit", commit) == b'{"return": {}}\r\n'
            assert await q.request("block-commit", {**commit, "job-id": "cc2"}) == qerr(
                "Need a root block node")
            graph = json.loads(await q.request("x-debug-query-block-graph"))["return"]
            names = {n["id"]: (n["type"], n["name"]) for n in graph["nodes"]}
            job_edges = {(e["name"], names[e["child"]][1]) for e in graph["edges"]
                         if names[e["parent"]] == ("block-job", "cc1")}
            assert {("source", "ccm"), ("target", "disk1")} <= job_edges
            assert await q.request("block-job-set-speed", {"device": "cc1", "speed": 0}) == (
                b'{"return": {}}\r\n')
            # (an empty overlay: ready at once on both)
            assert await _events_until(q, b"BLOCK_JOB_READY") == [
                _status(b"cc1", b"created"), _status(b"cc1", b"running"),
                _status(b"cc1", b"ready"), _block_event(b"BLOCK_JOB_READY", b"cc1")]
            assert _sized(await q.request("query-jobs")) == (
                b'{"return": [{"current-progress": N, "status": "ready", "total-progress": N, '
                b'"type": "commit", "id": "cc1"}]}\r\n')
            assert await q.request("block-job-complete", {"device": "cc1"}) == b'{"return": {}}\r\n'
            assert await _events_until(q, b'"concluded"') == [
                _status(b"cc1", b"waiting"), _status(b"cc1", b"pending"),
                _block_event(b"BLOCK_JOB_COMPLETED", b"cc1"), _status(b"cc1", b"concluded")]
            assert _sized(await q.request("query-jobs")) == (
                b'{"return": [{"current-progress": N, "status": "concluded", "total-progress": N, '
                b'"type": "commit", "id": "cc1"}]}\r\n')
            assert await q.request("job-dismiss", {"id": "cc1"}) == b'{"return": {}}\r\n'
        async with monitor(peer) as mon:
            assert await mon.device_node_name("vblk1") == "disk1"  # pivoted
            nodes = {n.node_name: n for n in await mon.named_block_nodes()}
            assert not nodes["disk1"].read_only and not nodes["ccm"].read_only
            # A second overlay, and a ready commit cancelled (force: no final sync).
            await mon.execute("blockdev-del", {"node-name": "ccm"})
            await mon.execute("blockdev-del", {"node-name": "ccmf"})
            path.unlink()
            path = await _make_overlay(mon, peer, "ccm", 1)
            await mon.execute("transaction", {"actions": [
                {"type": "blockdev-snapshot", "data": {"node": "disk1", "overlay": "ccm"}}]})
        async with raw_qmp(peer) as q:
            assert await q.request("block-commit", commit) == b'{"return": {}}\r\n'
            await _events_until(q, b"BLOCK_JOB_READY")
            assert await q.request("block-job-cancel", {"device": "cc1", "force": True}) == (
                b'{"return": {}}\r\n')
            assert await _events_until(q, b'"concluded"') == [
                _status(b"cc1", b"aborting"), _block_event(b"BLOCK_JOB_CANCELLED", b"cc1"),
                _status(b"cc1", b"concluded")]
            assert _sized(await q.request("query-jobs")) == (
                b'{"return": [{"current-progress": N, "status": "concluded", "total-progress": N, '
                b'"type": "commit", "id": "cc1", "error": "Operation canceled"}]}\r\n')
            assert await q.request("job-dismiss", {"id": "cc1"}) == b'{"return": {}}\r\n'
        async with monitor(peer) as mon:
            assert await mon.device_node_name("vblk1") == "ccm"  # cancelled: not pivoted
    finally:
        # Leave the VM as found: disk1 the root again, the overlay gone.
        async with monitor(peer) as mon:
            for job in await mon.execute("query-jobs"):
                async with mon.attach_job(job["id"]):
                    pass  # cancelled and dismissed on the way out
            orch = SnapshotOrchestrator(mon, journal_dir=peer.workdir / "journal")
            if await mon.device_node_name("vblk1") == "ccm":
                await orch.commit("vblk1", delete_files=True)
            for name in ("ccm", "ccmf"):
                with contextlib.suppress(MonitorCommandError):
                    await mon.execute("blockdev-del", {"node-name": name})
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


async def test_orchestrator_lifecycle_results(peer: Peer) -> None:
    """chain, commit and snapshot(mountpoints=) give the same results on both peers."""
    async with monitor(peer) as mon, await GuestAgent.connect(peer.agent_address, timeout=TIMEOUT) as ga:
        orch = SnapshotOrchestrator(mon, agent=ga, journal_dir=peer.workdir / "journal")
        before = [n.node_name for n in await orch.chain("vblk1")]
        assert before[0] == "disk1"
        res = await orch.snapshot({"vblk1": str(peer.workdir / "lc1.qcow2")}, mountpoints=["/mnt/data2"])
        assert (res.quiesced, res.frozen, res.thawed, res.warnings) == (True, 1, 1, ())
        chain = await orch.chain("vblk1")
        assert [n.node_name for n in chain[1:]] == before
        assert [n.depth for n in chain] == list(range(len(chain)))
        assert (chain[0].format, chain[0].driver, chain[0].filename) == (
            "qcow2", "qcow2", str(peer.workdir / "lc1.qcow2"))
        assert chain[0].file_node_name is not None and chain[1].file_node_name == "file1"
        assert chain[0].virtual_size == chain[1].virtual_size == 64 << 20
        with pytest.raises(UnknownMountpointError) as info:
            await orch.snapshot({"vblk1": str(peer.workdir / "lc2.qcow2")}, mountpoints=["/mnt/x"])
        assert info.value.known == sorted(set(info.value.known)) and "/mnt/data2" in info.value.known
        merged = await orch.commit("vblk1", delete_files=True)
        assert (merged.active_node, merged.top, merged.resumed) == ("disk1", chain[0].node_name, False)
        assert merged.removed_nodes == [chain[0].node_name, chain[0].file_node_name]
        assert merged.removed_files == [str(peer.workdir / "lc1.qcow2")]
        assert [n.node_name for n in await orch.chain("vblk1")] == before
        assert not await mon.execute("query-jobs")


async def test_qmp_overlay_nodes_and_image(peer: Peer) -> None:
    async with monitor(peer) as mon:
        path = await _make_overlay(mon, peer, "cov1", 1)
        try:
            entries = {n["node-name"]: n for n in await mon.execute(
                "query-named-block-nodes", {"flat": True})}
            assert _node_view(peer, entries["cov1"]) == {
                "keys": ["iops_rd", "detect_zeroes", *peer.expect(v7_2=[], v10_0=["active"]),
                         "image", "iops_wr", "ro", "node-name",
                         "backing_file_depth", "drv", "iops", "bps_wr", "write_threshold",
                         "encrypted", "bps", "bps_rd", "cache", "file"],
                "image-keys": ["actual-size", "backing-filename", "backing-filename-format",
                               "cluster-size", "dirty-flag", "filename", "format",
                               "format-specific", "full-backing-filename", "virtual-size"],
                "image": {
                    "filename": 'json:{"backing": null, "driver": "qcow2", "file": {"driver": '
                                '"file", "filename": "<W>/cov1.qcow2"}}',
                    "format": "qcow2", "virtual-size": "67108864", "cluster-size": "65536",
                    "backing-filename": "<W>/data1.qcow2",
                    "full-backing-filename": "<W>/data1.qcow2",
                    "backing-filename-format": "qcow2",
                },
                "node-name": "cov1", "drv": "qcow2", "ro": False, "backing_file_depth": 0,
                "file": 'json:{"backing": null, "driver": "qcow2", "file": {"driver": "file", '
                        '"filename": "<W>/cov1.qcow2"}}',
                "encrypted": False, "detect_zeroes": "off",
                "cache": {"no-flush": False, "direct": False, "writeback": True},
            }
            file_view = _node_view(peer, entries["cov1f"])
            assert file_view["image"] == {"filename": "<W>/cov1.qcow2", "format": "file",
                                          "virtual-size": "197120"}
            assert file_view["file"] == "<W>/cov1.qcow2"
            assert entries["disk1"]["backing_file"].endswith(".qcow2")
            assert [n["node-name"] for n in entries.values()][:2] == ["cov1", "cov1f"]  # newest first
            assert _qcow2_view(path, str(peer.workdir / "data1.qcow2")) == _golden_qcow2()
        finally:
            await mon.execute("blockdev-del", {"node-name": "cov1"})
            await mon.execute("blockdev-del", {"node-name": "cov1f"})
            path.unlink()


def _golden_qcow2() -> tuple[int, bytes, int, bytes]:
    """What QEMU 7.2's blockdev-create writes for a 64 MiB qcow2 with a qcow2 backing file."""
    import struct

    header = struct.pack(">4sIQ", b"QFI\xfb", 3, 0x210)  # magic, version, backing offset
    header += struct.pack(">IIQIIQQIIQQQQII", 0, 16, 64 << 20, 0, 1, 0x30000, 0x10000, 1, 0, 0,
                          0, 0, 0, 4, 112) + b"\0" * 8
    features = [(0, 0, b"dirty bit"), (0, 1, b"corrupt bit"), (0, 2, b"external data file"),
                (0, 3, b"compression type"), (0, 4, b"extended L2 entries"),
                (1, 0, b"lazy refcounts"), (2, 0, b"bitmaps"), (2, 1, b"raw external data")]
    table = b"".join(struct.pack(">BB", t, b) + n.ljust(46, b"\0") for t, b, n in features)
    ext = struct.pack(">II", 0xE2792ACA, 5) + b"qcow2\0\0\0"
    ext += struct.pack(">II", 0x6803F857, len(table)) + table + struct.pack(">II", 0, 0)
    rest = bytearray(196616 - 65536)
    rest[:8] = struct.pack(">Q", 0x20000)  # refcount table -> refcount block
    rest[0x10000:0x10008] = struct.pack(">4H", 1, 1, 1, 1)  # clusters 0-3 in use
    return 196616, header[:16] + header[20:] + ext, 0x210, bytes(rest)


async def test_qmp_blockdev_add_errors_bytes(peer: Peer) -> None:
    junk = peer.workdir / "junk.img"
    junk.write_bytes(b"not an image\n" * 100)
    async with monitor(peer) as mon:
        await mon.execute("blockdev-add", {"driver": "file", "filename": str(junk), "node-name": "jf"})
        path = await _make_overlay(mon, peer, "cov2", 1)
    try:
        async with raw_qmp(peer) as q:
            cases: list[tuple[dict[str, Any], str]] = [
                ({"driver": "file", "filename": str(junk), "node-name": "disk0"},
                 "Duplicate nodes with node-name='disk0'"),
                ({"driver": "file", "filename": "/nonexistent/zz", "node-name": "zz"},
                 "Could not open '/nonexistent/zz': No such file or directory"),
                ({"driver": "qcow2", "node-name": "q0", "file": "nonode", "backing": None},
                 "Cannot find device='nonode' nor node-name='nonode'"),
                ({"driver": "qcow2", "node-name": "jq", "file": "jf", "backing": None},
                 "Image is not in qcow2 format"),
                ({"driver": "qcow2", "node-name": "cov2b", "file": "cov2f", "backing": None},
                 "Permission conflict on node 'cov2f': permissions 'write, resize' are both "
                 "required by node 'cov2' (uses node 'cov2f' as 'file' child) and unshared by "
                 "node 'cov2b' (uses node 'cov2f' as 'file' child)."),
                ({"driver": "qcow2", "node-name": "#x", "file": "jf"}, "Invalid node-name: '#x'"),
                ({"driver": "qcow2", "node-name": "a" * 40, "file": "jf"}, "Node name too long"),
                ({"driver": "nope", "node-name": "n"},
                 "Parameter 'driver' does not accept value 'nope'"),
                ({"driver": "file", "filename": str(junk)},
                 "'node-name' must be specified for the root node"),
                ({"driver": "file", "filename": str(junk), "node-name": "c1",
                  "cache": {"no-flush": "yes"}},
                 "Invalid parameter type for 'cache.no-flush', expected: boolean"),
                ({"driver": "file", "filename": str(junk), "node-name": "c1",
                  "cache": {"writeback": True}}, "Parameter 'cache.writeback' is unexpected"),
                ({"driver": "file", "filename": str(junk), "node-name": "c1", "cache": True},
                 "Invalid parameter type for 'cache', expected: object"),
            ]
            for arguments, desc in cases:
                assert await q.request("blockdev-add", arguments) == qerr(desc), arguments
            # blockdev-del: refused while the node is in use, with QEMU's texts
            nodes = json.loads(await q.request("query-named-block-nodes", {"flat": True}))["return"]
            disk1_backing = next(n["backing_file"] for n in nodes if n["node-name"] == "disk1")
            base = next(n["node-name"] for n in nodes if n["node-name"].startswith("#")
                        and n["drv"] == "qcow2" and n["file"] == disk1_backing)
            assert await q.request("blockdev-del", {"node-name": "nope"}) == qerr(
                "Failed to find node with node-name='nope'")
            assert await q.request("blockdev-del", {"node-name": "cov2f"}) == qerr(
                "Block device cov2f is in use")
            assert await q.request("blockdev-del", {"node-name": "disk1"}) == qerr(
                "Node disk1 is in use")
            assert await q.request("blockdev-del", {"node-name": base}) == qerr(
                f"Node '{base}' is busy: node is used as backing hd of 'disk1'")
            for name in ("cov2", "cov2f", "jf"):
                assert await q.request("blockdev-del", {"node-name": name}) == b'{"return": {}}\r\n'
    finally:
        path.unlink(missing_ok=True)
        junk.unlink()


def _snap(node: str, overlay: str) -> dict[str, Any]:
    return {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}


async def test_qmp_transaction_atomic_and_busy_bytes(peer: Peer) -> None:
    async with monitor(peer) as mon:
        await _make_overlay(mon, peer, "tov0", 0)
        await mon.execute("blockdev-add", {"driver": "file", "node-name": "tfile",
                                           "filename": str(peer.workdir / "tov0.qcow2"),
                                           "read-only": True})
    async with raw_qmp(peer) as q:

        async def roots() -> dict[str, str]:
            devices = json.loads(await q.request("query-block"))["return"]
            return {d["qdev"].split("/")[3]: d["inserted"]["node-name"] for d in devices}

        before = await roots()
        assert before == {"vblk0": "disk0", "vblk1": "disk1"}
        failing = [
            ([_snap("nonode", "tov0")], "Cannot find device='nonode' nor node-name='nonode'"),
            ([_snap("disk0", "nonode")], "Cannot find device='nonode' nor node-name='nonode'"),
            ([_snap("disk0", "disk1")], "The overlay is already in use"),
            ([_snap("disk0", "tfile")], "The overlay does not support backing images"),
            ([_snap("disk0", "tov0"), _snap("disk1", "nonode")],
             "Cannot find device='nonode' nor node-name='nonode'"),
            ([_snap("disk0", "tov0"), _snap("disk0", "tov0")],
             "Node 'disk0' is busy: node is used as backing hd of 'tov0'"),
        ]
        for actions, desc in failing:
            assert await q.request("transaction", {"actions": actions}) == qerr(desc), actions
            assert await roots() == before  # all or nothing
        assert await q.request("transaction", {"actions": [_snap("disk0", "tov0")]}) == (
            b'{"return": {}}\r\n'
        )
        assert await roots() == {"vblk0": "tov0", "vblk1": "disk1"}
        flat = {n["node-name"]: n for n in json.loads(
            await q.request("query-named-block-nodes", {"flat": True}))["return"]}
        deep = {n["node-name"]: n for n in json.loads(
            await q.request("query-named-block-nodes"))["return"]}
        assert flat["tov0"]["backing_file_depth"] == 0  # flat: QEMU reports no depth at all
        assert deep["tov0"]["backing_file_depth"] == 2
        assert peer.norm(flat["tov0"]["file"]) == "<W>/tov0.qcow2"
        assert peer.norm(flat["tov0"]["backing_file"]) == "<W>/data0.qcow2"
        assert (flat["disk0"]["ro"], flat["file0"]["ro"]) == (True, False)
        # The busy-node error: repeating the snapshot (docs/design.md 4)
        assert await q.request("transaction", {"actions": [_snap("disk0", "tov0")]}) == qerr(
            "Node 'disk0' is busy: node is used as backing hd of 'tov0'")
        assert await q.request("blockdev-del", {"node-name": "tov0"}) == qerr("Node tov0 is in use")
        assert await q.request("blockdev-del", {"node-name": "disk0"}) == qerr(
            "Node 'disk0' is busy: node is used as backing hd of 'tov0'")
        assert await q.request("blockdev-del", {"node-name": "tfile"}) == b'{"return": {}}\r\n'
        drive = await q.request("qom-get", {"path": "/machine/peripheral/vblk0", "property": "drive"})
        assert drive == b'{"return": "tov0"}\r\n'


async def _make_target(mon: Monitor, peer: Peer, name: str, size: int = 64 << 20,
                       backing: Path | None = None) -> Path:
    """A backup target like the orchestrator's: qcow2 (on the previous backup, if given),
    attached with ``backing: null``."""
    path = peer.workdir / f"{name}.qcow2"
    await mon.run_job("blockdev-create", _create(f"{name}-c", {
        "driver": "file", "filename": str(path), "size": 0}))
    await mon.execute("blockdev-add", {"driver": "file", "filename": str(path),
                                       "node-name": f"{name}f"})
    options: dict[str, Any] = {"driver": "qcow2", "file": f"{name}f", "size": size}
    if backing is not None:
        options.update({"backing-file": str(backing), "backing-fmt": "qcow2"})
    await mon.run_job("blockdev-create", _create(f"{name}-q", options))
    await mon.execute("blockdev-add", {"driver": "qcow2", "node-name": name,
                                       "file": f"{name}f", "backing": None})
    return path


def _backup(job: str, target: str, sync: str = "full", **extra: Any) -> dict[str, Any]:
    return {"type": "blockdev-backup", "data": {"job-id": job, "device": "disk1", "target": target,
                                                "sync": sync, "auto-dismiss": False, **extra}}


async def _bitmaps(mon: Monitor, node: str) -> dict[str, dict[str, Any]]:
    nodes = {n["node-name"]: n for n in await mon.execute("query-named-block-nodes", {"flat": True})}
    return {b["name"]: b for b in nodes[node].get("dirty-bitmaps", [])}


async def _concluded(mon: Monitor, job_id: str) -> dict[str, Any]:
    """Wait for a backup job to conclude; its query-jobs entry then (before its dismissal)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        jobs = {j["id"]: j for j in await mon.execute("query-jobs")}
        if jobs[job_id]["status"] == "concluded":
            await mon.execute("job-dismiss", {"id": job_id})
            return dict(jobs[job_id])
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} did not conclude")


async def test_qmp_backup_bitmaps_and_jobs(peer: Peer) -> None:
    """Issue 15's commands: persistent dirty bitmaps, blockdev-backup in a transaction with
    a bitmap-add, a full and an incremental job (type, progress), and their errors."""
    async with monitor(peer) as mon:
        full = await _make_target(mon, peer, "bkf")
        small = await _make_target(mon, peer, "bks", size=1 << 20)
        inc = await _make_target(mon, peer, "bki", backing=full)

        async def error(command: str, args: dict[str, Any]) -> str:
            with pytest.raises(MonitorCommandError) as info:
                await mon.execute(command, args)
            assert info.value.error_class == "GenericError"
            return info.value.desc

        try:
            assert await mon.execute("block-dirty-bitmap-add", {
                "node": "disk1", "name": "cb", "persistent": True}) == {}
            bm = (await _bitmaps(mon, "disk1"))["cb"]
            assert {k: v for k, v in bm.items() if k != "count"} == {
                "name": "cb", "recording": True, "persistent": True, "busy": False,
                "granularity": 65536}
            assert isinstance(bm["count"], int)
            assert await error("block-dirty-bitmap-add", {"node": "disk1", "name": "cb"}) == (
                "Bitmap already exists: cb")
            assert await error("block-dirty-bitmap-add", {"node": "nonode", "name": "cb"}) == (
                "Cannot find device='nonode' nor node-name='nonode'")
            assert await error("block-dirty-bitmap-remove", {"node": "disk1", "name": "nope"}) == (
                "Dirty bitmap 'nope' not found")
            assert await error("block-dirty-bitmap-clear", {"node": "nonode", "name": "cb"}) == (
                "Node 'nonode' not found")
            for actions, desc in [
                ([_backup("bj", "bki", "incremental")],
                 "must provide a valid bitmap name for 'incremental' sync mode"),
                ([_backup("bj", "bki", "incremental", bitmap="zz")], "Bitmap 'zz' could not be found"),
                ([_backup("bj", "bks")], "Source and target image have different sizes"),
                ([_backup("bj", "bkf"), _backup("bj", "bki")], "Job ID 'bj' already in use"),
            ]:
                assert await error("transaction", {"actions": actions}) == desc, actions
                assert not await mon.execute("query-jobs")  # all or nothing
            # The full backup and the bitmap that starts with it, in one transaction.
            assert await mon.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {
                    "node": "disk1", "name": "cb2", "persistent": True}},
                _backup("bjf", "bkf")]}) == {}
            job = await _concluded(mon, "bjf")
            assert (job["type"], job["current-progress"], job["total-progress"]) == (
                "backup", 64 << 20, 64 << 20)
            assert "error" not in job
            # The incremental, since it: on-success; the bitmap is free again afterwards.
            assert await mon.execute("transaction", {"actions": [
                _backup("bji", "bki", "incremental", bitmap="cb2")]}) == {}
            job = await _concluded(mon, "bji")
            assert job["type"] == "backup" and "error" not in job
            assert job["current-progress"] == job["total-progress"]
            bm2 = (await _bitmaps(mon, "disk1"))["cb2"]
            assert bm2["busy"] is False and bm2["persistent"] is True
            # merge, clear and remove, as commands.
            assert await mon.execute("block-dirty-bitmap-merge", {
                "node": "disk1", "target": "cb", "bitmaps": ["cb2"]}) == {}
            assert await mon.execute("block-dirty-bitmap-clear", {"node": "disk1", "name": "cb"}) == {}
            assert (await _bitmaps(mon, "disk1"))["cb"]["count"] == 0 or peer.kind != "fake"
        finally:
            for name in ("cb", "cb2"):
                with contextlib.suppress(MonitorCommandError):
                    await mon.execute("block-dirty-bitmap-remove", {"node": "disk1", "name": name})
            for name in ("bki", "bkif", "bkf", "bkff", "bks", "bksf"):
                with contextlib.suppress(MonitorCommandError):
                    await mon.execute("blockdev-del", {"node-name": name})
            for path in (full, small, inc):
                path.unlink(missing_ok=True)
        assert await _bitmaps(mon, "disk1") == {}


async def test_qmp_nbd_exports(peer: Peer) -> None:
    """Pull mode's commands: QEMU's NBD server on a unix socket, a read-only block export,
    its listing and removal, and their errors."""
    sock = str(peer.workdir / "cnbd.sock")
    async with monitor(peer) as mon:

        async def error(command: str, args: dict[str, Any] | None = None) -> str:
            with pytest.raises(MonitorCommandError) as info:
                await mon.execute(command, args)
            assert info.value.error_class == "GenericError"
            return info.value.desc

        assert await error("nbd-server-stop") == "NBD server not running"
        assert await mon.execute("nbd-server-start", {
            "addr": {"type": "unix", "data": {"path": sock}}}) == {}
        try:
            assert await error("nbd-server-start", {
                "addr": {"type": "unix", "data": {"path": sock}}}) == "NBD server already running"
            export = {"type": "nbd", "id": "ce", "node-name": "disk1", "name": "vblk1", "writable": False}
            assert await mon.execute("block-export-add", export) == {}
            assert await error("block-export-add", export) == "Block export id 'ce' is already in use"
            assert await mon.execute("query-block-exports") == [
                {"type": "nbd", "id": "ce", "node-name": "disk1", "shutting-down": False}]
            assert await mon.execute("block-export-del", {"id": "ce", "mode": "hard"}) == {}
            for _ in range(int(TIMEOUT / 0.02)):  # the deletion completes asynchronously
                if not await mon.execute("query-block-exports"):
                    break
                await asyncio.sleep(0.02)
            assert await mon.execute("query-block-exports") == []
            assert await error("block-export-del", {"id": "ce"}) == "Export 'ce' is not found"
        finally:
            await mon.execute("nbd-server-stop")


async def test_orchestrator_observable_results(peer: Peer) -> None:
    def tokenless(text: str) -> str:
        return re.sub(r"qa[0-9a-f]{8}", "qa<T>", text)

    async with monitor(peer) as mon:
        orch = SnapshotOrchestrator(mon, agent=peer.agent_address, agent_timeout=TIMEOUT)
        first = peer.workdir / "orch1.qcow2"
        result = await orch.snapshot({"vblk1": first})
        assert (result.quiesced, result.freeze_owner, result.frozen, result.thawed) == (
            True, "self", 2, 2)
        assert tokenless(result.overlays["disk1"]) == "qa<T>o0" and result.reason is None
        with pytest.raises(SnapshotError) as info:
            await orch.snapshot({"disk1": peer.workdir / "orch2.qcow2"})
        assert tokenless(str(info.value)) == (
            "the transaction failed: transaction: GenericError: Node 'disk1' is busy: node is "
            "used as backing hd of 'qa<T>o0'"
        )
        rec = info.value.record
        assert (rec.phase, rec.frozen, rec.thawed, rec.snapshot_taken) == ("transaction", 2, 2, False)
        assert rec.overlays_added == rec.overlays_removed and len(rec.overlays_added) == 1
        assert rec.files_created == rec.files_removed == [str(peer.workdir / "orch2.qcow2")]
        assert not (peer.workdir / "orch2.qcow2").exists()
        async with await GuestAgent.connect(peer.agent_address, timeout=TIMEOUT) as ga:
            assert await ga.fsfreeze_freeze() == 2  # someone else's freeze
            try:
                # (the agent channel serves one client at a time: the orchestrator uses ours)
                ext = await SnapshotOrchestrator(mon, agent=ga).snapshot(
                    {"vblk1": peer.workdir / "orch3.qcow2"})
                assert (ext.quiesced, ext.freeze_owner, ext.frozen, ext.thawed) == (
                    True, "external", 0, 0)
                assert await ga.fsfreeze_status() is FreezeStatus.FROZEN
            finally:
                assert await ga.fsfreeze_thaw() == 2
        nodes = {n.node_name: n for n in await mon.named_block_nodes()}
        chain = [nodes[result.overlays["disk1"]].filename]
        assert peer.norm(chain[0]) == "<W>/orch1.qcow2"


# ================================================================================ power


async def _shutdown_events(peer: Peer, mode: str) -> list[dict[str, Any]]:
    mon = await Monitor.connect(peer.qmp_address, timeout=TIMEOUT, command_timeout=TIMEOUT)
    seen: list[dict[str, Any]] = []
    try:
        async with mon.listen("VSERPORT_CHANGE", "SHUTDOWN") as events:
            async with await GuestAgent.connect(peer.agent_address, timeout=TIMEOUT) as ga:
                await ga.shutdown(mode)
            with pytest.raises(MonitorUnavailable):  # QEMU exits after SHUTDOWN
                while True:
                    event = await events.get(timeout=TIMEOUT)
                    if event["event"] == "SHUTDOWN" or event["data"].get("id") == "qgaport0":
                        seen.append({"event": event["event"], "data": event["data"]})
    finally:
        await mon.close()
    return seen


def _check_shutdown(seen: list[dict[str, Any]], reason: str) -> None:
    # The port closes as the guest goes down; its VSERPORT_CHANGE is throttled (and lost when
    # QEMU exits) if the port changed within the last second, e.g. at boot.
    assert seen[-1] == {"event": "SHUTDOWN", "data": {"guest": True, "reason": reason}}
    assert seen[:-1] in ([], [{"event": "VSERPORT_CHANGE", "data": {"open": False, "id": "qgaport0"}}])


# Not here: a reboot through the agent. The test guest's /sbin/shutdown powers off for every
# mode, so the real peer cannot show QEMU's reboot (RESET, or SHUTDOWN "guest-reset" with
# -no-reboot); the fake's model of it is tested in tests/test_fake_vm.py.


async def test_zz_guest_shutdown_via_agent(peer: Peer) -> None:
    """Last of the shared peer's scenarios: it ends the VM."""
    peer.dead = True
    await peer.settle_events()
    seen = await _shutdown_events(peer, "powerdown")
    _check_shutdown(seen, "guest-shutdown")
    if peer.kind == "fake":  # no port change in the last second: the event goes out
        assert len(seen) == 2
