"""A hostile or broken peer (QEMU or the guest) and malformed addresses: every failure is a typed
``qmpagent`` error, nothing blocks the loop or grows without bound, and nothing is left behind.

Issue 11, holes 8 (typed errors for wrong-typed QMP members and bad addresses), 9 (``Monitor.close``
on a QEMU that stopped reading) and the asyncio side of 10 and 11 (reply limits, bounded steps);
the sans-I/O side is in ``test_agent_protocol_bounds.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmpagent import (
    AgentProtocolError,
    GuestAgent,
    Monitor,
    MonitorProtocolError,
    QMPAgentError,
    UsageError,
)
from qmpagent.testing.fake_qmp import FakeCall, FakeQMPServer


def _returning(value: Any) -> Callable[[FakeCall], Any]:
    return lambda call: value


# --- hole 8: QMP members of the wrong type ------------------------------------------------------

_GOOD_INSERTED = {"node-name": "disk0", "file": "/fake/data0.qcow2", "drv": "qcow2"}
_GOOD_DEVICE = {"qdev": "/machine/peripheral/vblk0/virtio-backend", "inserted": _GOOD_INSERTED}

BAD_QUERY_BLOCK: list[Any] = [
    {"not": "a list"},
    "a string",
    [5],
    [None],
    [{**_GOOD_DEVICE, "device": 5}],
    [{**_GOOD_DEVICE, "device": ["vblk0"]}],
    [{**_GOOD_DEVICE, "qdev": 7}],
    [{**_GOOD_DEVICE, "qdev": {"id": "vblk0"}}],
    [{**_GOOD_DEVICE, "inserted": [1]}],
    [{**_GOOD_DEVICE, "inserted": "disk0"}],
    [{**_GOOD_DEVICE, "inserted": {**_GOOD_INSERTED, "node-name": 5}}],
    [{**_GOOD_DEVICE, "inserted": {**_GOOD_INSERTED, "node-name": None}}],
    [{**_GOOD_DEVICE, "inserted": {**_GOOD_INSERTED, "file": 3}}],
    [{**_GOOD_DEVICE, "inserted": {**_GOOD_INSERTED, "drv": {"x": 1}}}],
]


@pytest.mark.parametrize("reply", BAD_QUERY_BLOCK)
async def test_query_block_with_wrong_types_is_a_protocol_error(
    fake: FakeQMPServer, mon: Monitor, reply: Any
) -> None:
    fake.set_handler("query-block", _returning(reply))
    with pytest.raises(MonitorProtocolError):
        await mon.block_devices()
    for device in ("vblk0", "/machine/peripheral/vblk0", "/machine/peripheral/vblk0/virtio-backend"):
        with pytest.raises(MonitorProtocolError):
            await mon.device_node_name(device)


async def test_query_block_wrong_types_do_not_hide_behind_other_entries(
    fake: FakeQMPServer, mon: Monitor
) -> None:
    # The device asked for is fine; a malformed one elsewhere is still QEMU misbehaving.
    fake.set_handler("query-block", _returning([_GOOD_DEVICE, {"qdev": 7, "inserted": None}]))
    with pytest.raises(MonitorProtocolError):
        await mon.device_node_name("vblk0")


async def test_query_block_absent_optional_members_are_fine(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.set_handler("query-block", _returning([
        {"device": "ide0-cd0", "qdev": "ide0-cd0"},  # an empty drive: no "inserted"
        {"device": "", "qdev": "/machine/peripheral/vblk0/virtio-backend",
         "inserted": {"node-name": "disk0"}},
    ]))
    devices = await mon.block_devices()
    assert [(d.device, d.qdev_id, d.node_name) for d in devices] == [
        ("ide0-cd0", "ide0-cd0", None), (None, "vblk0", "disk0")
    ]
    assert await mon.device_node_name("vblk0") == "disk0"


async def test_device_node_name_of_a_non_string_is_a_usage_error(mon: Monitor) -> None:
    for bad in (5, None, ["vblk0"], b"vblk0"):
        with pytest.raises(UsageError):
            await mon.device_node_name(bad)  # type: ignore[arg-type]


_GOOD_NODE = {"node-name": "disk0", "drv": "qcow2", "file": "/fake/data0.qcow2", "ro": False,
              "backing_file_depth": 0, "image": {"format": "qcow2", "virtual-size": 1 << 20}}

BAD_NAMED_NODES: list[Any] = [
    {"not": "a list"},
    [7],
    [{**_GOOD_NODE, "node-name": 5}],
    [{**_GOOD_NODE, "node-name": None}],
    [{**_GOOD_NODE, "drv": ["qcow2"]}],
    [{k: v for k, v in _GOOD_NODE.items() if k != "drv"}],
    [{**_GOOD_NODE, "file": {"filename": "x"}}],
    [{**_GOOD_NODE, "backing_file": 7}],
    [{**_GOOD_NODE, "ro": "yes"}],
    [{**_GOOD_NODE, "image": [1]}],
    [{**_GOOD_NODE, "image": "qcow2"}],
    [{**_GOOD_NODE, "image": {"format": 5}}],
    [{**_GOOD_NODE, "image": {"format": "qcow2", "virtual-size": "big"}}],
    [{**_GOOD_NODE, "image": {"format": "qcow2", "virtual-size": True}}],
]


@pytest.mark.parametrize("reply", BAD_NAMED_NODES)
async def test_named_block_nodes_with_wrong_types_is_a_protocol_error(
    fake: FakeQMPServer, mon: Monitor, reply: Any
) -> None:
    fake.set_handler("query-named-block-nodes", _returning(reply))
    with pytest.raises(MonitorProtocolError):
        await mon.named_block_nodes()


BAD_CHARDEVS: list[Any] = [
    {"not": "a list"},
    [3],
    [{"label": 5, "filename": "x", "frontend-open": True}],
    [{"label": "qga0", "filename": "x", "frontend-open": "yes"}],
    [{"label": "qga0", "filename": "x", "frontend-open": 1}],
    [{"filename": "x", "frontend-open": True}],
]


@pytest.mark.parametrize("reply", BAD_CHARDEVS)
async def test_query_chardev_with_wrong_types_is_a_protocol_error(
    fake: FakeQMPServer, mon: Monitor, reply: Any
) -> None:
    fake.set_handler("query-chardev", _returning(reply))
    with pytest.raises(MonitorProtocolError):
        await mon.agent_port_open()
    with pytest.raises(MonitorProtocolError):
        await mon.virtio_serial_ports()


async def test_huge_malformed_entries_are_not_echoed_whole(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.set_handler("query-block", _returning([{"qdev": 1, "junk": "x" * 100_000}]))
    with pytest.raises(MonitorProtocolError) as info:
        await mon.block_devices()
    assert len(str(info.value)) < 1000


# --- hole 8: malformed addresses ----------------------------------------------------------------

BAD_AGENT_ADDRESSES: list[Any] = [
    ("127.0.0.1", 70000),
    ("127.0.0.1", 65536),
    ("127.0.0.1", -1),
    ("127.0.0.1", 0),
    ("127.0.0.1", True),
    ("127.0.0.1", 80.0),
    ("127.0.0.1", "80"),
    ("127.0.0.1", 2**70),
    ("", 80),
    ("a\0b", 80),
    ("\ud800", 80),
    ("a" * 64 + ".example", 80),  # an IDNA label longer than 63
    (5, 80),
    ("vsock", -1, 1234),
    ("vsock", 2**32, 1234),
    ("vsock", 3, -1),
    ("vsock", 3, 2**32),
    ("vsock", True, 1234),
    ("vsock", 3, "1234"),
    ("vsock", 3, 1.5),
    ("tcp", 3, 4),
    ("a", 1, 2, 3),
    (),
    "a\0b",
    "/tmp/qmpagent-\0x",
    "\ud800",
    "/tmp/" + "x" * 200,  # longer than sun_path
    "",
    b"/tmp/qmpagent-\0x",
    5,
    None,
    ["127.0.0.1", 80],
]


@pytest.mark.parametrize("address", BAD_AGENT_ADDRESSES, ids=repr)
async def test_bad_agent_address_is_a_usage_error(address: Any) -> None:
    with pytest.raises(UsageError):
        await GuestAgent.connect(address, timeout=2.0)


async def test_bad_agent_path_object_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        await GuestAgent.connect(tmp_path / "a\0b", timeout=2.0)


BAD_QMP_ADDRESSES: list[Any] = [
    ("127.0.0.1", 70000),
    ("127.0.0.1", -1),
    ("127.0.0.1", 0),
    ("127.0.0.1", True),
    ("", 4444),
    ("a\0b", 4444),
    ("\ud800", 4444),
    ("a" * 64 + ".example", 4444),
    "a\0b",
    "\ud800",
    "/tmp/" + "x" * 200,
    "",
]


@pytest.mark.parametrize("address", BAD_QMP_ADDRESSES, ids=repr)
async def test_bad_qmp_address_is_a_usage_error(address: Any) -> None:
    with pytest.raises(UsageError):
        await Monitor.connect(address, timeout=2.0)


async def test_abstract_unix_socket_is_a_valid_agent_address() -> None:
    # Linux's abstract namespace: a leading NUL is not a malformed path.
    name = f"\0qmpagent-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        sock.listen()
        sock.setblocking(False)
        with pytest.raises(QMPAgentError) as info:
            # Nobody answers the sync: AgentUnavailable, not a UsageError.
            await GuestAgent.connect(name, timeout=0.3)
        assert not isinstance(info.value, UsageError)
    finally:
        sock.close()


# --- hole 9: Monitor.close() on a QEMU that stopped reading ---------------------------------------


class _StopsReading:
    """A QMP server on a bare socket: it greets, negotiates, answers one command, then never
    reads again (so the client's writes block once the socket buffers are full)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.listener.setblocking(False)
        self.conn: socket.socket | None = None
        self.stopped_reading = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self.listener)
        conn.setblocking(False)
        self.conn = conn
        greeting = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                        "package": ""}, "capabilities": ["oob"]}}
        await loop.sock_sendall(conn, json.dumps(greeting).encode() + b"\r\n")
        decoder = json.JSONDecoder()
        buf = ""
        answered = 0
        while answered < 2:  # qmp_capabilities, then one command
            chunk = await loop.sock_recv(conn, 65536)
            if not chunk:
                return
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                reply: dict[str, Any] = {"return": {}}
                if "id" in msg:
                    reply["id"] = msg["id"]
                await loop.sock_sendall(conn, json.dumps(reply).encode() + b"\r\n")
                answered += 1
        self.stopped_reading.set()  # and never read again

    async def read_to_eof(self) -> None:
        """Drain what the client wrote; returns once the client's side is closed."""
        assert self.conn is not None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionResetError):
            while await loop.sock_recv(self.conn, 1 << 20):
                pass

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


async def test_close_on_a_qemu_that_stopped_reading_is_bounded_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    peer = _StopsReading(tmp_path / "qmp.sock")
    try:
        before = asyncio.all_tasks()
        mon = await Monitor.connect(peer.path, timeout=5.0, command_timeout=5.0, close_timeout=0.5)
        await mon.execute("query-status")
        await asyncio.wait_for(peer.stopped_reading.wait(), 5.0)
        transport = mon.client._writer.transport  # type: ignore[union-attr]
        # Fill the socket buffers: qemu.qmp's writer blocks in drain() for good.
        big = "x" * (8 << 20)
        with pytest.raises(QMPAgentError):
            await mon.execute("query-status", {"pad": big}, timeout=0.2)
        with contextlib.suppress(QMPAgentError):
            await mon.execute("query-status", {"pad": big}, timeout=0.05)
        assert not transport.is_closing()
        await asyncio.wait_for(mon.close(), 5.0)  # the bound is 0.5 s: 5 s means it hung

        assert transport.is_closing()
        assert transport.get_extra_info("socket").fileno() == -1
        await asyncio.wait_for(peer.read_to_eof(), 5.0)  # the peer sees the socket closed
        leftover = [t for t in asyncio.all_tasks() if t not in before and not t.done()]
        assert leftover == [], leftover
    finally:
        await peer.close()


async def test_close_on_a_healthy_qemu_is_prompt_and_leaves_no_task(fake: FakeQMPServer) -> None:
    before = asyncio.all_tasks()
    mon = await Monitor.connect(fake.address, close_timeout=0.5)
    await mon.execute("query-status")
    await mon.close()
    leftover = [
        t for t in asyncio.all_tasks()
        if t not in before and not t.done()
        and not t.get_coro().__qualname__.startswith("FakeQMP")  # type: ignore[union-attr]
    ]
    assert leftover == [], leftover


async def test_close_bound_must_be_a_number(fake: FakeQMPServer) -> None:
    for bad in (-1.0, "5", None, float("nan")):
        with pytest.raises(UsageError):
            await Monitor.connect(fake.address, close_timeout=bad)  # type: ignore[arg-type]
# --- hole 10: per-command reply limits reach the wire ------------------------------------------


async def test_a_big_guest_info_is_refused_and_the_agent_stays_usable() -> None:
    from qmpagent.testing import AgentFault, FakeAgent

    entry = b'{"name": "guest-ping", "enabled": true},'
    body = b'{"return": {"version": "7.2", "supported_commands": [' + entry * 60_000
    async with FakeAgent() as agent:
        agent.inject("guest-info", AgentFault.garbage(body + entry[:-1] + b"]}}\n"))
        async with await GuestAgent.connect(agent.address, timeout=5.0) as ga:
            with pytest.raises(AgentProtocolError, match="guest-info"):
                await ga.info()
            await ga.ping()  # resynced, usable
            assert (await ga.info()).version


# --- hole 11: a hostile read does not stall the event loop --------------------------------------


async def test_other_tasks_run_while_a_hostile_reply_is_processed() -> None:
    """1 MiB of ``a\\xff`` (each 0xFF restarts the line) before the real reply: processed in
    bounded steps with the loop running other tasks in between, not in a few long stalls."""
    from qmpagent.testing import AgentFault, FakeAgent

    hostile = b"a\xff" * (512 * 1024) + b'{"return": {}}\n'
    async with FakeAgent() as agent:
        agent.inject("guest-ping", AgentFault.garbage(hostile))
        async with await GuestAgent.connect(agent.address, timeout=10.0) as ga:
            ticks = 0
            done = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not done.is_set():
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(ticker())
            try:
                await ga.ping()
            finally:
                done.set()
                await task
            steps = ga._conn.steps
    # Every bounded step of the parser gave the ticker a turn: 1 MiB needs hundreds of steps
    # (one read of 256 KiB used to be processed in one go: a handful of ticks in all).
    assert steps >= len(hostile) // (64 * 1024)
    assert ticks >= steps // 2, (ticks, steps)
