"""Monitor.connect when QEMU ends a session it has just accepted (a client that connects as the
previous one leaves): tried again within the connect timeout; a socket that always does it, or
that is not QMP at all, is still reported as unavailable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from qmpagent import Monitor, MonitorUnavailable
from qmpagent.monitor import MonitorState

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
                    "capabilities": []}}
ALREADY = {"error": {"class": "CommandNotFound",
                     "desc": "Capabilities negotiation is already complete, command ignored"}}

# How the server treats the n-th connection (0-based): "ok", "refuse" (the negotiation fails),
# "hangup" (closed after the greeting), "mute-hangup" (closed before it), "garbage".
Behaviour = Callable[[int], str]


@asynccontextmanager
async def qmp_server(path: Path, behaviour: Behaviour) -> AsyncIterator[list[str]]:
    seen: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        what = behaviour(len(seen))
        seen.append(what)
        try:
            if what == "mute-hangup":
                return
            if what == "garbage":
                writer.write(b"SSH-2.0-OpenSSH\r\n")
                await writer.drain()
                await reader.read(100)
                return
            writer.write(json.dumps(GREETING).encode() + b"\r\n")
            await writer.drain()
            request = await reader.readuntil(b"}")
            while request.count(b"{") > request.count(b"}"):
                request += await reader.readuntil(b"}")
            if what == "hangup":
                return
            msg = json.loads(request)
            reply = ALREADY if what == "refuse" else {"return": {}}
            writer.write(json.dumps({**reply, "id": msg.get("id")}).encode() + b"\r\n")
            await writer.drain()
            await reader.read()  # until the client leaves
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    try:
        yield seen
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("first", ["refuse", "hangup", "mute-hangup"])
async def test_a_session_ended_at_once_is_tried_again(tmp_path: Path, first: str) -> None:
    sock = tmp_path / "qmp.sock"
    async with qmp_server(sock, lambda n: first if n == 0 else "ok") as seen:
        async with await Monitor.connect(sock, timeout=10) as mon:
            assert mon.state is MonitorState.OPEN
        assert seen == [first, "ok"]


@pytest.mark.parametrize("always", ["refuse", "hangup"])
async def test_a_socket_that_always_does_it_is_unavailable(tmp_path: Path, always: str) -> None:
    sock = tmp_path / "qmp.sock"
    async with qmp_server(sock, lambda n: always) as seen:
        with pytest.raises(MonitorUnavailable):
            await Monitor.connect(sock, timeout=10)
        assert len(seen) == 4  # the first try and three more, no endless loop


async def test_a_socket_that_is_not_qmp_is_not_retried(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    async with qmp_server(sock, lambda n: "garbage") as seen:
        with pytest.raises(MonitorUnavailable):
            await Monitor.connect(sock, timeout=10)
        assert seen == ["garbage"]
