"""Tests of the fake guest agent (qmpagent.testing.fake_agent), with raw sockets as the client.

Expected bytes marked "real" were captured from qemu-ga 7.2 (Debian 12, reports 7.2.22) in the
test guest, over its virtio-serial chardev socket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agent_golden import ALLOWED_WHILE_FROZEN, FROZEN, info_golden

from qmpagent.testing.fake_agent import (
    AgentFault,
    AgentFaultKind,
    AgentMessage,
    FakeAgent,
    FakeAgentError,
    FakeExecResult,
    QEMUJSONStreamParser,
    qemu_json,
)

# --------------------------------------------------------------------------------------- helpers


class Client:
    """A raw socket client of the fake agent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, agent: FakeAgent) -> Client:
        address = agent.address
        if isinstance(address, tuple):
            reader, writer = await asyncio.open_connection(*address, limit=1 << 24)
        else:
            reader, writer = await asyncio.open_unix_connection(address, limit=1 << 24)
        return cls(reader, writer)

    async def send(self, data: bytes | str | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data, separators=(",", ":"))
        if isinstance(data, str):
            data = data.encode()
        self.writer.write(data)
        await self.writer.drain()

    async def line(self, timeout: float = 2.0) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\n"), timeout)

    async def request(self, data: bytes | str | dict[str, Any]) -> bytes:
        await self.send(data)
        return await self.line()

    async def call(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        reply = json.loads(await self.request(request))
        assert "return" in reply, reply
        return reply["return"]

    async def read(self, n: int, timeout: float = 2.0) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def nothing(self, timeout: float = 0.15) -> None:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"expected no data, got {data!r}")

    async def eof(self, timeout: float = 2.0) -> bytes:
        """Read until EOF; return what came before it."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


@pytest.fixture
async def agent() -> AsyncIterator[FakeAgent]:
    async with FakeAgent(mountpoints=["/", "/mnt/data"]) as fake:
        yield fake
    assert fake.path is not None
    assert not os.path.exists(os.path.dirname(fake.path))


@pytest.fixture
async def client(agent: FakeAgent) -> AsyncIterator[Client]:
    c = await Client.open(agent)
    yield c
    await c.close()


def err(desc: str, error_class: str = "GenericError") -> bytes:
    return f'{{"error": {{"class": "{error_class}", "desc": "{desc}"}}}}\n'.encode()


BAD_ID = err("Invalid parameter type for 'id', expected: integer")

# ------------------------------------------------------------------------------------ lifecycle


async def test_unix_socket_in_private_dir_removed_on_close() -> None:
    agent = FakeAgent()
    await agent.start()
    assert agent.address == agent.path
    assert agent.path is not None and os.path.exists(agent.path)
    directory = os.path.dirname(agent.path)
    c = await Client.open(agent)
    assert await c.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'
    await agent.close()
    await agent.close()  # idempotent
    assert not os.path.exists(directory)
    assert await c.eof() == b""
    await c.close()


async def test_explicit_path_and_tcp(tmp_path: Any) -> None:
    path = tmp_path / "agent.sock"
    async with FakeAgent(path) as agent:
        assert agent.address == str(path)
        c = await Client.open(agent)
        assert await c.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'
        await c.close()
    assert not path.exists()
    assert tmp_path.exists()
    async with FakeAgent(host="127.0.0.1") as agent:
        assert agent.path is None
        assert isinstance(agent.address, tuple)
        host, port = agent.address
        assert host == "127.0.0.1" and port > 0
        c = await Client.open(agent)
        assert await c.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'
        await c.close()


async def test_address_before_start_and_double_start() -> None:
    agent = FakeAgent()
    with pytest.raises(RuntimeError):
        _ = agent.address
    async with agent:
        with pytest.raises(RuntimeError):
            await agent.start()


async def test_close_while_hung_and_delayed_and_queued(agent: FakeAgent) -> None:
    first = await Client.open(agent)
    second = await Client.open(agent)  # queued behind the first
    agent.inject("guest-ping", AgentFault.hang())
    await first.send('{"execute":"guest-ping"}')
    await agent.wait_for_call("guest-ping")
    assert agent.hung
    await agent.close()
    assert await first.eof() == b""
    assert await second.eof() == b""
    await first.close()
    await second.close()


# ------------------------------------------------------------------------- protocol, byte-exact


async def test_ping_sync_and_id_placement(client: Client) -> None:
    assert await client.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'  # real
    assert await client.request('{"execute":"guest-ping","id":"a"}') == (
        b'{"return": {}, "id": "a"}\n'  # real
    )
    assert await client.request('{"execute":"guest-ping","id":7}') == b'{"return": {}, "id": 7}\n'
    assert await client.request('{"execute":"guest-sync","arguments":{"id":5}}') == (
        b'{"return": 5}\n'  # real
    )
    assert await client.request('{"execute":"guest-sync","arguments":{"id":-5}}') == (
        b'{"return": -5}\n'
    )
    assert await client.request('{"execute":"guest-nope","id":"b"}') == (  # real
        b'{"id": "b", "error": {"class": "CommandNotFound", '
        b'"desc": "The command guest-nope has not been found"}}\n'
    )
    assert await client.request('{"execute":"guest-ping","id":null}') == (
        b'{"return": {}, "id": null}\n'  # real
    )


async def test_sync_delimited_and_0xff_resync(client: Client) -> None:
    # real: the 0xFF byte is answered with an error line, then the delimited reply
    await client.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":123}}')
    assert await client.line() == (
        b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'
    )
    assert await client.line() == b'\xff{"return": 123}\n'
    assert await client.request(
        '{"execute":"guest-sync-delimited","arguments":{"id":1},"id":"z"}'
    ) == b'\xff{"return": 1, "id": "z"}\n'  # real
    assert await client.request('{"execute":"guest-sync-delimited","arguments":{"id":-1}}') == (
        b'\xff{"return": -1}\n'
    )
    # a failed sync-delimited is not delimited (real)
    assert await client.request('{"execute":"guest-sync-delimited"}') == err(
        "Parameter 'id' is missing"
    )
    # 0xFF in the middle of a request flushes it (real)
    await client.send(b'{"execute":"guest-pi\xff{"execute":"guest-ping"}')
    assert await client.line() == (
        b'{"error": {"class": "GenericError", '
        b'"desc": "JSON parse error, stray \'\\"guest-pi\\uFFFD\'"}}\n'
    )
    assert await client.line() == b'{"return": {}}\n'
    await client.send(b'\xff\xff{"execute":"guest-ping"}')  # real: one error per 0xFF
    stray = err("JSON parse error, stray '\\uFFFD'")
    assert await client.line() == stray
    assert await client.line() == stray
    assert await client.line() == b'{"return": {}}\n'


async def test_stream_framing(client: Client) -> None:
    # no newline needed, several per write, split anywhere (real)
    await client.send('{"execute":"guest-ping"}{"execute":"guest-ping"}\n\n  {"execute":"guest-ping"}')
    for _ in range(3):
        assert await client.line() == b'{"return": {}}\n'
    for byte in b'{"execute": "guest-sync", "arguments": {"id": 42}}':
        await client.send(bytes([byte]))
    assert await client.line() == b'{"return": 42}\n'
    # single-quoted strings are accepted (QEMU extension, real)
    assert await client.request("{'execute':'guest-ping'}") == b'{"return": {}}\n'
    # a top-level number needs a terminator (real)
    await client.send("5")
    await client.nothing()
    await client.send(" ")
    assert await client.line() == err("QMP input must be a JSON object")


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [  # all real
        (b"[1,2]", [err("QMP input must be a JSON object")]),
        (b'"a" ', [err("QMP input must be a JSON object")]),
        (b'{"execute":5}', [err("QMP input member 'execute' must be a string")]),
        (b'{"exec":"guest-ping"}', [err("QMP input member 'exec' is unexpected")]),
        (b'{"execute":"guest-ping","foo":1}', [err("QMP input member 'foo' is unexpected")]),
        (b'{"execute":"guest-ping","foo":1,"bar":2}', [err("QMP input member 'bar' is unexpected")]),
        (b'{"execute":"guest-ping","exec-oob":"x"}', [err("QMP input member 'exec-oob' is unexpected")]),
        (b'{"execute":"guest-ping","arguments":5}', [err("QMP input member 'arguments' must be an object")]),
        (b'{"execute":"guest-ping","arguments":{},"zzz":1}', [err("QMP input member 'zzz' is unexpected")]),
        (
            b'{"id":1}',
            [b'{"id": 1, "error": {"class": "GenericError", '
             b'"desc": "QMP input lacks member \'execute\'"}}\n'],
        ),
        (
            b'{"execute":"guest-nope"}',
            [err("The command guest-nope has not been found", "CommandNotFound")],
        ),
        (b'{"execute":"guest-sync"}', [err("Parameter 'id' is missing")]),
        (b'{"execute":"guest-sync","arguments":{}}', [err("Parameter 'id' is missing")]),
        (b'{"execute":"guest-sync","arguments":{"id":"s"}}', [BAD_ID]),
        (b'{"execute":"guest-sync","arguments":{"id":1.0}}', [BAD_ID]),
        (
            b'{"execute":"guest-sync","arguments":{"id":99999999999999999999}}',
            [err("Invalid parameter type for 'id', expected: integer")],
        ),
        (b'{"execute":"guest-sync","arguments":{"a":1,"id":"x"}}', [BAD_ID]),
        (b'{"execute":"guest-ping","arguments":{"foo":1}}', [err("Parameter 'foo' is unexpected")]),
        (b'{"execute":"guest-ping","arguments":{"a":1,"b":2}}', [err("Parameter 'b' is unexpected")]),
        (
            b'{"execute":"guest-ping","arguments":{"a":1,"b":2,"c":3,"d":4,"e":5}}',
            [err("Parameter 'e' is unexpected")],
        ),
        (
            b'{"execute":"guest-ping","arguments":{"e":1,"d":2,"zz":3,"q":4,"mountpoint":5,'
            b'"x":1,"y":2,"z":3,"w":4}}',
            [err("Parameter 'mountpoint' is unexpected")],
        ),
        (b'{"execute":"guest-fsfreeze-freeze","arguments":{"x":1}}', [err("Parameter 'x' is unexpected")]),
        (
            b'{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":"x"}}',
            [err("Invalid parameter type for 'mountpoints', expected: array")],
        ),
        (
            b'{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":null}}',
            [err("Invalid parameter type for 'mountpoints', expected: array")],
        ),
        (
            b'{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":[1]}}',
            [err("Invalid parameter type for 'mountpoints[0]', expected: string")],
        ),
        (b'{"execute":"guest-exec","arguments":{}}', [err("Parameter 'path' is missing")]),
        (
            b'{"execute":"guest-exec","arguments":{"path":1,"arg":"x"}}',
            [err("Invalid parameter type for 'path', expected: string")],
        ),
        (
            b'{"execute":"guest-file-read","arguments":{"handle":"a"}}',
            [err("Invalid parameter type for 'handle', expected: integer")],
        ),
        (
            b'{"execute":"guest-shutdown","arguments":{"mode":"bogus"}}',
            [err("mode is invalid (valid values are: halt|powerdown|reboot")],
        ),
    ],
)
async def test_request_errors(client: Client, request_bytes: bytes, expected: list[bytes]) -> None:
    await client.send(request_bytes)
    for line in expected:
        assert await client.line() == line
    assert await client.request(b'{"execute":"guest-ping"}') == b'{"return": {}}\n'


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [  # all real
        (b"garbage}", ["invalid keyword 'garbage'", "expecting value"]),
        (b'{"execute":"guest-ping",}', ["expecting value"]),
        (b'{"execute" "guest-ping"}', ["missing : in object pair"]),
        (b'{"execute":"guest-ping" "x":1}', ["expected separator in dict"]),
        (b"{1:2}", ["key is not a string in object"]),
        (b"[1,]", ["expecting value"]),
        (b"[1 2]", ["expected separator in list"]),
        (b'{"execute":"guest-ping","id":"\\x"}', ["invalid escape sequence in string"]),
        (b'{"execute":"guest-ping","id":"\\ud800"}', ["\\\\ud800 is not a valid Unicode character"]),
        (b'{"execute":"guest-ping","id":"\xc3"}', ["invalid UTF-8 sequence in string"]),
        (b'{"execute":"guest-ping","id":"a\x01b"}', ["stray '\\\"a\\u0001'", "expecting value"]),
        (b'{"execute":"guest-ping","id":"\xfe"}', ["stray '\\\"\\uFFFD'", "expecting value"]),
        (b'{"execute":"guest-ping","id":nul}', ["invalid keyword 'nul'"]),
        (b'{"execute":"guest-sync","arguments":{"id":1,"id":2}}', ["duplicate key"]),
        (b'{"execute":"guest-ping","execute":"guest-info"}', ["duplicate key"]),
    ],
)
async def test_json_parse_errors(client: Client, request_bytes: bytes, expected: list[str]) -> None:
    await client.send(request_bytes)
    for desc in expected:
        assert await client.line() == err("JSON parse error, " + desc)
    assert await client.request(b'{"execute":"guest-ping"}') == b'{"return": {}}\n'


async def test_nesting_limit(client: Client) -> None:
    await client.send(b"[" * 1030)  # real
    assert await client.line() == err("JSON nesting depth limit exceeded")
    await client.send(b"]" * 5 + b'\xff{"execute":"guest-ping"}')
    assert (await client.line()).startswith(b'{"error"')
    lines = [await client.line()]
    while lines[-1] != b'{"return": {}}\n':
        lines.append(await client.line())


@pytest.mark.parametrize(
    ("request_id", "echoed"),
    [  # all real
        (b'{"x":[1,2]}', b'{"x": [1, 2]}'),
        (b'[1,{"b":2,"a":1,"exited":3,"id":4}]', b'[1, {"a": 1, "b": 2, "id": 4, "exited": 3}]'),
        (b"1.5", b"1.5"),
        (b"1e400", b"inf"),
        (b"99999999999999999999", b"1e+20"),
        (b"18446744073709551615", b"18446744073709551615"),
        (b"-0", b"0"),
        (b'"\\u00e9\\ud83d\\ude00\\u007f\\/\\t\\u0001"', b'"\\u00E9\\uD83D\\uDE00\\u007F/\\t\\u0001"'),
        (b'"\xc3\xa9"', b'"\\u00E9"'),
    ],
)
async def test_id_echo_format(client: Client, request_id: bytes, echoed: bytes) -> None:
    reply = await client.request(b'{"execute":"guest-ping","id":' + request_id + b"}")
    assert reply == b'{"return": {}, "id": ' + echoed + b"}\n"




async def test_guest_info_thawed_and_frozen(agent: FakeAgent, client: Client) -> None:
    thawed = info_golden(lambda name: name != "guest-get-devices")
    assert await client.request('{"execute":"guest-info"}') == thawed
    assert await client.request('{"execute":"guest-fsfreeze-freeze"}') == b'{"return": 2}\n'
    frozen = info_golden(lambda name: name in ALLOWED_WHILE_FROZEN)
    assert await client.request('{"execute":"guest-info"}') == frozen
    assert await client.request('{"execute":"guest-fsfreeze-thaw"}') == b'{"return": 2}\n'
    assert await client.request('{"execute":"guest-info"}') == thawed


async def test_blocked_command_keeps_frozen_reason_after_thaw(
    agent: FakeAgent, client: Client
) -> None:
    # real quirk: a blocked command's disable reason is overwritten by a freeze
    blocked = b'{"execute":"guest-get-devices"}'
    assert await client.request(blocked) == err(
        "Command guest-get-devices has been disabled", "CommandNotFound"
    )
    await client.call("guest-fsfreeze-freeze")
    await client.call("guest-fsfreeze-thaw")
    assert await client.request(blocked) == err(f"Command guest-get-devices {FROZEN}", "CommandNotFound")


async def test_blocked_commands_option() -> None:
    async with FakeAgent(blocked_commands=["guest-fsfreeze-freeze"]) as agent:
        c = await Client.open(agent)
        info = await c.call("guest-info")
        enabled = {i["name"]: i["enabled"] for i in info["supported_commands"]}
        assert not enabled["guest-fsfreeze-freeze"] and not enabled["guest-get-devices"]
        assert enabled["guest-fsfreeze-freeze-list"]
        assert await c.request('{"execute":"guest-fsfreeze-freeze"}') == err(
            "Command guest-fsfreeze-freeze has been disabled", "CommandNotFound"
        )
        await c.close()


# ------------------------------------------------------------------------------------- freezing


async def test_freeze_thaw_status(agent: FakeAgent, client: Client) -> None:
    assert await client.call("guest-fsfreeze-status") == "thawed"
    assert await client.request('{"execute":"guest-fsfreeze-thaw"}') == b'{"return": 0}\n'
    assert await client.call("guest-fsfreeze-freeze") == 2
    assert agent.frozen and agent.frozen_mountpoints == ["/", "/mnt/data"]
    assert await client.request('{"execute":"guest-fsfreeze-status"}') == b'{"return": "frozen"}\n'
    # everything outside the allowlist is disabled (real desc and class)
    for name in ("guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-get-osinfo",
                 "guest-exec", "guest-file-open", "guest-shutdown", "guest-get-time"):
        assert await client.request({"execute": name, "id": "q"}) == (
            b'{"id": "q", "error": {"class": "CommandNotFound", "desc": "Command '
            + name.encode() + b' has been disabled: the agent is in frozen state"}}\n'
        )
    # even with bad arguments: the disabled check comes first (real)
    assert await client.request(
        '{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":"x"}}'
    ) == err(f"Command guest-fsfreeze-freeze-list {FROZEN}", "CommandNotFound")
    # unknown commands are still unknown
    assert await client.request('{"execute":"guest-nope"}') == err(
        "The command guest-nope has not been found", "CommandNotFound"
    )
    for name in ("guest-ping", "guest-info", "guest-sync", "guest-fsfreeze-status"):
        args = {"arguments": {"id": 1}} if name == "guest-sync" else {}
        assert b'"return"' in await client.request({"execute": name, **args})
    assert await client.call("guest-fsfreeze-thaw") == 2
    assert not agent.frozen and agent.frozen_mountpoints == []
    assert await client.call("guest-fsfreeze-thaw") == 0
    assert agent.total_frozen == 2 and agent.total_thawed == 2


async def test_freeze_list(agent: FakeAgent, client: Client) -> None:
    freeze_list = "guest-fsfreeze-freeze-list"
    assert await client.call(freeze_list, mountpoints=["/nonexistent"]) == 0  # real
    assert await client.call("guest-fsfreeze-status") == "thawed"  # real: 0 frozen -> thawed
    assert await client.call(freeze_list, mountpoints=[]) == 0
    assert await client.call(freeze_list, mountpoints=["/mnt/data/"]) == 0  # real: exact match
    assert await client.call(freeze_list, mountpoints=["/mnt/data", "/mnt/data", "/x"]) == 1
    assert agent.frozen_mountpoints == ["/mnt/data"]
    assert await client.call("guest-fsfreeze-status") == "frozen"
    assert await client.call("guest-fsfreeze-thaw") == 1
    assert await client.call(freeze_list) == 2  # no list: all


async def test_foreign_freeze(agent: FakeAgent, client: Client) -> None:
    agent.freeze_foreign("/mnt/data")
    assert agent.foreign_frozen == ["/mnt/data"] and not agent.frozen
    assert await client.call("guest-fsfreeze-status") == "thawed"
    assert await client.call("guest-fsfreeze-freeze-list", mountpoints=["/mnt/data"]) == 0
    assert await client.call("guest-fsfreeze-status") == "thawed"
    assert await client.call("guest-fsfreeze-freeze") == 1  # "/" only: EBUSY ignored
    assert await client.call("guest-fsfreeze-status") == "frozen"
    # a thaw thaws someone else's freeze too, and counts it
    assert await client.call("guest-fsfreeze-thaw") == 2
    assert agent.foreign_frozen == [] and agent.frozen_mountpoints == []
    agent.freeze_foreign("/mnt/data")
    agent.thaw_foreign("/mnt/data")
    assert agent.frozen_mountpoints == []
    with pytest.raises(ValueError):
        agent.freeze_foreign("/nope")


async def test_set_frozen(agent: FakeAgent, client: Client) -> None:
    agent.set_frozen()
    assert await client.call("guest-fsfreeze-status") == "frozen"
    assert await client.request('{"execute":"guest-fsfreeze-freeze"}') == err(
        f"Command guest-fsfreeze-freeze {FROZEN}", "CommandNotFound"
    )
    info = await client.call("guest-info")
    enabled = {i["name"]: i["enabled"] for i in info["supported_commands"]}
    assert not enabled["guest-fsfreeze-freeze"] and not enabled["guest-fsfreeze-freeze-list"]
    agent.set_frozen(False)
    assert await client.call("guest-fsfreeze-status") == "thawed"
    assert agent.frozen_mountpoints == []


async def test_freeze_error_thaws_everything(agent: FakeAgent, client: Client) -> None:
    agent.freeze_foreign("/")
    agent.set_freeze_error("/mnt/data", "Input/output error")
    assert await client.request('{"execute":"guest-fsfreeze-freeze"}') == err(
        "failed to freeze /mnt/data: Input/output error"
    )
    assert agent.frozen_mountpoints == [] and not agent.frozen  # qemu-ga thaws all on error
    assert await client.call("guest-fsfreeze-status") == "thawed"
    agent.set_freeze_error("/mnt/data", None)
    assert await client.call("guest-fsfreeze-freeze") == 2


# ----------------------------------------------------------------------------- other commands


async def test_info_commands(agent: FakeAgent, client: Client) -> None:
    assert await client.call("guest-get-osinfo") == dict(agent.osinfo)
    assert await client.request('{"execute":"guest-get-host-name"}') == (
        b'{"return": {"host-name": "fake-guest"}}\n'
    )
    assert await client.request('{"execute":"guest-get-timezone"}') == (
        b'{"return": {"zone": "UTC", "offset": 0}}\n'  # real
    )
    assert await client.request('{"execute":"guest-get-users"}') == b'{"return": []}\n'  # real
    before = time.time_ns()
    now = await client.call("guest-get-time")
    assert before - 10**6 <= now <= time.time_ns() and now % 1000 == 0
    fsinfo = await client.request('{"execute":"guest-get-fsinfo"}')
    assert fsinfo.startswith(  # real shape and order for /mnt/data as the 1st disk
        b'{"return": [{"name": "vda", "total-bytes": 52685824, "mountpoint": "/", "disk": '
        b'[{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 2, '
        b'"domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 23552, '
        b'"type": "ext4"}, {"name": "vdb", '
    )
    assert await client.request('{"execute":"guest-get-cpustats"}') == err(
        "this feature or command is not currently supported"
    )


async def test_exec(agent: FakeAgent, client: Client) -> None:
    capture = {"capture-output": True}
    pid = (await client.call("guest-exec", path="/bin/echo", arg=["hi"], **capture))["pid"]
    status = f'{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}'
    assert await client.request(status) == (  # real
        b'{"return": {"exitcode": 0, "out-data": "aGkK", "out-truncated": false, "exited": true}}\n'
    )
    assert await client.request(status) == err("Invalid parameter 'pid'")  # real: reaped
    agent.set_exec_result(
        "/bin/sh", FakeExecResult(exitcode=3, stdout=b"out\n", stderr=b"err\n", polls=1)
    )
    pid = (await client.call("guest-exec", path="/bin/sh", arg=["-c", "x"], **capture))["pid"]
    status = f'{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}'
    assert await client.request(status) == b'{"return": {"exited": false}}\n'  # real
    assert await client.request(status) == (  # real
        b'{"return": {"exitcode": 3, "err-data": "ZXJyCg==", "out-data": "b3V0Cg==", '
        b'"err-truncated": false, "out-truncated": false, "exited": true}}\n'
    )
    agent.set_exec_result("/bin/killme", FakeExecResult(signal=9, stdout=b"x"))
    pid = (await client.call("guest-exec", path="/bin/killme"))["pid"]
    assert await client.call("guest-exec-status", pid=pid) == {"signal": 9, "exited": True}
    pid = (await client.call("guest-exec", path="true"))["pid"]
    status = f'{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}'
    assert await client.request(status) == (
        b'{"return": {"exitcode": 0, "exited": true}}\n'  # real: no capture, no data
    )
    hello = {"input-data": "aGVsbG8=", "capture-output": True}
    pid = (await client.call("guest-exec", path="/bin/cat", **hello))["pid"]
    status = await client.call("guest-exec-status", pid=pid)
    assert base64.b64decode(status["out-data"]) == b"hello"
    agent.set_exec_result("/usr/bin/wc", lambda args, stdin: FakeExecResult(stdout=b"%d\n" % len(stdin)))
    pid = (await client.call("guest-exec", path="wc", **hello))["pid"]
    assert (await client.call("guest-exec-status", pid=pid))["out-data"] == "NQo="
    agent.set_exec_result("/bin/slow", FakeExecResult(duration=0.2))
    pid = (await client.call("guest-exec", path="/bin/slow"))["pid"]
    assert await client.call("guest-exec-status", pid=pid) == {"exited": False}
    await asyncio.sleep(0.25)
    assert await client.call("guest-exec-status", pid=pid) == {"exitcode": 0, "exited": True}
    assert await client.request('{"execute":"guest-exec","arguments":{"path":"/nonexistent"}}') == (
        b'{"error": {"class": "GenericError", "desc": "Guest agent command failed, error was '
        b"'Failed to execute child process \\u201C/nonexistent\\u201D (No such file or directory)'"
        b'"}}\n'  # real
    )
    assert await client.request(
        '{"execute":"guest-exec","arguments":{"path":"/bin/cat","input-data":"!!"}}'
    ) == err("Base64 data contains invalid characters")  # real
    assert await client.request('{"execute":"guest-exec-status","arguments":{"pid":-1}}') == err(
        "Invalid parameter 'pid'"
    )


async def test_files() -> None:
    async with FakeAgent(files={"/run/t.txt": b"hello\nworld\n"}) as agent:
        c = await Client.open(agent)
        assert await c.request('{"execute":"guest-file-open","arguments":{"path":"/run/t.txt"}}') == (
            b'{"return": 1000}\n'  # real: handles start at 1000
        )
        read = '{"execute":"guest-file-read","arguments":{"handle":1000%s}}'
        assert await c.request(read % ',"count":4') == (  # real
            b'{"return": {"count": 4, "buf-b64": "aGVsbA==", "eof": false}}\n'
        )
        assert await c.request(read % "") == (  # real
            b'{"return": {"count": 8, "buf-b64": "bwp3b3JsZAo=", "eof": true}}\n'
        )
        assert await c.request(read % "") == b'{"return": {"count": 0, "buf-b64": "", "eof": true}}\n'
        close = '{"execute":"guest-file-close","arguments":{"handle":1000}}'
        assert await c.request(close) == b'{"return": {}}\n'
        assert await c.request(read % "") == err("handle '1000' has not been found")  # real
        assert await c.request(close) == err("handle '1000' has not been found")  # real
        assert await c.request('{"execute":"guest-file-open","arguments":{"path":"/nonexistent"}}') == (
            err("failed to open file '/nonexistent' (mode: 'r'): No such file or directory")  # real
        )
        assert await c.request(
            '{"execute":"guest-file-open","arguments":{"path":"/run/x","mode":"zz"}}'
        ) == err("invalid file open mode 'zz'")  # real
        assert await c.call("guest-file-open", path="/run/t.txt", mode="r") == 1001
        read = '{"execute":"guest-file-read","arguments":{"handle":1001%s}}'
        assert await c.request(read % ',"count":0') == (  # real
            b'{"return": {"count": 0, "buf-b64": "", "eof": false}}\n'
        )
        assert await c.request(read % ',"count":-1') == err("value '-1' is invalid for argument count")
        assert await c.request(read % ',"count":100000000') == err(
            "value '100000000' is invalid for argument count"  # real
        )
        # write, then read back (real shapes)
        handle = await c.call("guest-file-open", path="/run/new.txt", mode="w")
        assert await c.request(
            {"execute": "guest-file-write", "arguments": {"handle": handle, "buf-b64": "aGVsbG8="}}
        ) == b'{"return": {"count": 5, "eof": false}}\n'
        assert await c.request(
            {"execute": "guest-file-write", "arguments": {"handle": handle, "buf-b64": "!!"}}
        ) == err("Base64 data contains invalid characters")
        assert await c.request(
            {"execute": "guest-file-read", "arguments": {"handle": handle}}
        ) == err("failed to read file: Bad file descriptor")
        await c.call("guest-file-close", handle=handle)
        assert agent.files["/run/new.txt"] == b"hello"
        handle = await c.call("guest-file-open", path="/run/new.txt", mode="a")
        for count in (2, -1):  # real
            assert await c.request(
                {"execute": "guest-file-write",
                 "arguments": {"handle": handle, "buf-b64": "IQ==", "count": count}}
            ) == err(f"value '{count}' is invalid for argument count")
        await c.call("guest-file-write", handle=handle, **{"buf-b64": "IT8=", "count": 1})
        assert agent.files["/run/new.txt"] == b"hello!"
        await c.call("guest-file-close", handle=handle)
        handle = await c.call("guest-file-open", path="/run/new.txt")
        assert await c.request(  # real
            {"execute": "guest-file-write", "arguments": {"handle": handle, "buf-b64": "IQ=="}}
        ) == err("failed to write to file: Bad file descriptor")
        await c.close()


async def test_set_handler(agent: FakeAgent, client: Client) -> None:
    agent.set_handler("guest-get-users", lambda args: [{"user": "root", "login-time": 1.5}])
    assert await client.request('{"execute":"guest-get-users"}') == (
        b'{"return": [{"login-time": 1.5, "user": "root"}]}\n'  # QDict order
    )

    async def custom(args: dict[str, Any]) -> Any:
        if args.get("fail"):
            raise FakeAgentError("it failed", "GenericError")
        return {"echo": args}

    agent.set_handler("guest-custom", custom)
    assert await client.call("guest-custom", x=1) == {"echo": {"x": 1}}
    assert await client.request('{"execute":"guest-custom","arguments":{"fail":true},"id":3}') == (
        b'{"id": 3, "error": {"class": "GenericError", "desc": "it failed"}}\n'
    )
    info = await client.call("guest-info")
    assert info["supported_commands"][0] == {
        "name": "guest-custom", "enabled": True, "success-response": True
    }
    agent.set_handler("guest-quiet", lambda args: None, success_response=False)
    await client.send('{"execute":"guest-quiet","id":1}')
    await client.nothing()

    def broken(args: dict[str, Any]) -> Any:
        raise KeyError("oops")

    agent.set_handler("guest-broken", broken)
    reply = json.loads(await client.request('{"execute":"guest-broken"}'))
    assert "fake agent handler failed" in reply["error"]["desc"]
    await client.call("guest-fsfreeze-freeze")
    assert await client.request('{"execute":"guest-custom"}') == err(
        f"Command guest-custom {FROZEN}", "CommandNotFound"
    )


async def test_shutdown() -> None:
    events: list[Any] = []
    async with FakeAgent(
        on_shutdown=lambda mode: events.append(("shutdown", mode)),
        on_port_change=lambda open_: events.append(("port", open_)),
    ) as agent:
        c = await Client.open(agent)
        await c.send('{"execute":"guest-shutdown","id":"s"}')
        assert await c.eof() == b""  # real: no reply; QEMU exits
        assert agent.shut_down and agent.shutdown_mode == "powerdown"
        assert events == [("shutdown", "powerdown"), ("port", False)]
        assert not agent.port_open
        c2 = await Client.open(agent)  # the port stays closed: nothing is answered
        await c2.send('{"execute":"guest-ping"}')
        await c2.nothing()
        agent.open_port()  # the guest boots again
        assert await c2.line() == b'{"return": {}}\n'
        await c2.send('{"execute":"guest-shutdown","arguments":{"mode":"reboot"}}')
        assert await c2.eof() == b""
        assert agent.shutdown_mode == "reboot"
        await c.close()
        await c2.close()


async def test_suspend_and_wakeup() -> None:
    modes: list[str] = []
    async with FakeAgent(on_suspend=modes.append) as agent:
        c = await Client.open(agent)
        await c.send('{"execute":"guest-suspend-ram","id":1}{"execute":"guest-ping","id":2}')
        await c.nothing()  # real: no reply to a suspend
        assert agent.suspended == "ram" and modes == ["ram"]
        agent.wakeup()
        assert await c.line() == b'{"return": {}, "id": 2}\n'
        assert agent.suspended is None
        await c.close()


# ------------------------------------------------------------------------ port and connections


async def test_port_closed_buffers_then_bursts() -> None:
    changes: list[bool] = []
    async with FakeAgent(port_open=False, on_port_change=changes.append) as agent:
        c = await Client.open(agent)
        await c.send('{"execute":"guest-sync","arguments":{"id":1}}')
        await c.send('{"execute":"guest-sync","arguments":{"id":2}}')
        await c.nothing()
        assert agent.call_count() == 0 and agent.buffered > 0
        agent.open_port()
        assert changes == [True]
        assert await c.line() == b'{"return": 1}\n'  # real: the burst of stale replies
        assert await c.line() == b'{"return": 2}\n'
        agent.close_port()
        agent.close_port()  # no-op
        assert changes == [True, False]
        await c.close()


async def test_close_port_loses_partial_input_and_reply_in_progress(
    agent: FakeAgent, client: Client
) -> None:
    # the ping's reply shows that the agent has read the partial request after it
    assert await client.request('{"execute":"guest-ping","id":1}{"execute":"guest-pi') == (
        b'{"return": {}, "id": 1}\n'
    )
    agent.close_port()
    agent.open_port()
    assert await client.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'
    agent.inject("guest-sync", AgentFault.delay(0.2))
    await client.send('{"execute":"guest-sync","arguments":{"id":1}}')
    await agent.wait_for_call("guest-sync")
    agent.close_port()
    await client.send('{"execute":"guest-sync","arguments":{"id":2}}')
    await client.nothing(0.3)
    agent.open_port()
    assert await client.line() == b'{"return": 2}\n'


async def test_async_port_callback_runs_in_order() -> None:
    seen: list[bool] = []

    async def changed(open_: bool) -> None:
        await asyncio.sleep(0.01 if open_ else 0)
        seen.append(open_)

    async with FakeAgent(on_port_change=changed) as agent:
        agent.close_port()
        agent.open_port()
        agent.close_port()
        await asyncio.sleep(0.1)
        assert seen == [False, True, False]


async def test_one_connection_at_a_time(agent: FakeAgent) -> None:
    first = await Client.open(agent)
    second = await Client.open(agent)
    await second.send('{"execute":"guest-ping","id":"second"}')
    await second.nothing()  # real: queued until the first one goes
    assert await first.request('{"execute":"guest-ping","id":"first"}') == (
        b'{"return": {}, "id": "first"}\n'
    )
    await first.close()
    assert await second.line() == b'{"return": {}, "id": "second"}\n'
    assert agent.connections == 2 and agent.connected
    await second.close()


async def test_partial_input_and_replies_outlive_connections(agent: FakeAgent) -> None:
    a = await Client.open(agent)
    assert await a.request('{"execute":"guest-ping","id":1}{"execute":"guest-pi') == (
        b'{"return": {}, "id": 1}\n'
    )
    await a.close()
    b = await Client.open(agent)
    assert await b.request('ng", "id": "B"}') == b'{"return": {}, "id": "B"}\n'  # real
    agent.inject("guest-fsfreeze-freeze", AgentFault.delay(0.1))
    await b.send('{"execute":"guest-fsfreeze-freeze","id":"F"}')
    await agent.wait_for_call("guest-fsfreeze-freeze")
    await b.close()  # the client goes away before the reply
    await agent.wait_idle()
    c = await Client.open(agent)
    assert await c.line() == b'{"return": 2, "id": "F"}\n'  # real: delivered to the next client
    await c.close()


async def test_drop_connection(agent: FakeAgent, client: Client) -> None:
    await client.call("guest-ping")
    await agent.drop_connection()
    assert await client.eof() == b""
    assert not agent.connected


# --------------------------------------------------------------------------------------- record


async def test_record(agent: FakeAgent, client: Client) -> None:
    await client.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":9},"id":"x"}')
    await client.line()
    await client.line()
    await client.call("guest-fsfreeze-thaw")
    await client.call("guest-fsfreeze-thaw")
    await client.request("[1]")
    received = agent.received
    assert [m.command for m in received] == [
        None, "guest-sync-delimited", "guest-fsfreeze-thaw", "guest-fsfreeze-thaw", None
    ]
    stray, sync = received[0], received[1]
    assert stray.error == "JSON parse error, stray '\ufffd'" and stray.after_sync_byte
    assert sync.after_sync_byte and sync.arguments == {"id": 9}
    assert sync.id == "x" and sync.has_id and sync.call == 1 and sync.connection == 1
    assert sync.message == {"execute": "guest-sync-delimited", "arguments": {"id": 9}, "id": "x"}
    assert received[2].after_sync_byte is False and received[3].call == 2
    assert received[4].error == "QMP input must be a JSON object"
    assert [m.call for m in agent.calls("guest-fsfreeze-thaw")] == [1, 2]
    assert len(agent.calls()) == 3 and agent.call_count() == 3
    assert agent.call_count("guest-fsfreeze-thaw") == 2
    assert received[1].time <= received[2].time
    agent.clear_received()
    assert agent.received == [] and agent.call_count("guest-fsfreeze-thaw") == 2
    with pytest.raises(TimeoutError):
        await agent.wait_for_call("guest-ping", timeout=0.05)


async def test_record_is_bounded() -> None:
    async with FakeAgent(max_records=3) as agent:
        c = await Client.open(agent)
        for i in range(5):
            await c.call("guest-sync", id=i)
        assert [m.arguments["id"] for m in agent.received] == [2, 3, 4]
        assert agent.call_count("guest-sync") == 5
        await c.close()
    async with FakeAgent(max_record_bytes=10_000) as agent:
        c = await Client.open(agent)
        for i in range(5):
            await c.call("guest-sync", id=i)
        big = {"execute": "guest-ping", "id": "x" * 6_000}
        await c.request(big)
        assert [m.command for m in agent.received] == ["guest-sync"] * 5 + ["guest-ping"]
        await c.request(big)  # 12 kB in all: the oldest go until 10 kB are left
        assert [m.command for m in agent.received] == ["guest-ping"]
        await c.close()


async def test_guest_resources_are_bounded(agent: FakeAgent, client: Client) -> None:
    agent.files["/f"] = b"x"
    for _ in range(1024):
        await client.send('{"execute":"guest-file-open","arguments":{"path":"/f"}}')
    for _ in range(1024):
        await client.line()
    assert await client.request('{"execute":"guest-file-open","arguments":{"path":"/f"}}') == err(
        "failed to open file '/f' (mode: 'r'): Too many open files"
    )
    for _ in range(1024):
        await client.send('{"execute":"guest-exec","arguments":{"path":"true"}}')
    for _ in range(1024):
        await client.line()
    reply = await client.request('{"execute":"guest-exec","arguments":{"path":"true"}}')
    assert b"Failed to fork" in reply
    await client.call("guest-file-close", handle=1000)
    agent.files["/big"] = b"\0" * ((64 << 20) - 1)
    handle = await client.call("guest-file-open", path="/big", mode="a")
    write = {"execute": "guest-file-write", "arguments": {"handle": handle, "buf-b64": "AAA="}}
    assert await client.request(write) == err("failed to write to file: No space left on device")
    assert await client.call("guest-file-write", handle=handle, **{"buf-b64": "AA=="}) == {
        "count": 1, "eof": False
    }
    assert len(agent.files["/big"]) == 64 << 20


# --------------------------------------------------------------------------------------- faults


async def test_fault_delay_orders_later_requests(agent: FakeAgent, client: Client) -> None:
    agent.inject("guest-fsfreeze-freeze", AgentFault.delay(0.2))
    start = time.monotonic()
    await client.send('{"execute":"guest-fsfreeze-freeze"}{"execute":"guest-ping"}')
    await agent.wait_for_call("guest-fsfreeze-freeze")
    assert not agent.frozen  # runs after the delay
    assert await client.line() == b'{"return": 2}\n'
    assert time.monotonic() - start >= 0.2
    assert await client.line() == b'{"return": {}}\n'  # the agent did nothing else meanwhile


async def test_fault_delay_effect_first(agent: FakeAgent, client: Client) -> None:
    agent.inject("guest-fsfreeze-freeze", AgentFault.delay(0.3, effect_first=True))
    await client.send('{"execute":"guest-fsfreeze-freeze"}')
    await agent.wait_for_call("guest-fsfreeze-freeze")
    await asyncio.sleep(0.05)
    assert agent.frozen
    await client.nothing(0.1)
    assert await client.line() == b'{"return": 2}\n'


async def test_fault_no_reply(agent: FakeAgent, client: Client) -> None:
    injection = agent.inject("guest-fsfreeze-freeze", AgentFault.no_reply(apply=True))
    await client.send('{"execute":"guest-fsfreeze-freeze","id":1}')
    await client.nothing()
    assert agent.frozen and injection.fired == 1 and not injection.active
    assert agent.calls()[-1].fault == AgentFault.no_reply(apply=True)
    assert await client.call("guest-fsfreeze-thaw") == 2
    agent.inject("guest-fsfreeze-freeze", AgentFault.no_reply(apply=False))
    await client.send('{"execute":"guest-fsfreeze-freeze"}')
    await client.nothing()
    assert not agent.frozen
    # a lost delimited reply does not delimit the next one
    agent.inject("guest-sync-delimited", AgentFault.no_reply())
    await client.send('{"execute":"guest-sync-delimited","arguments":{"id":1}}')
    assert await client.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'


async def test_fault_disconnect(agent: FakeAgent, client: Client) -> None:
    agent.inject("guest-fsfreeze-freeze", AgentFault.disconnect())
    await client.send('{"execute":"guest-fsfreeze-freeze"}')
    assert await client.eof() == b""
    assert agent.frozen
    c = await Client.open(agent)
    assert await c.call("guest-fsfreeze-thaw") == 2
    agent.inject("guest-sync-delimited", AgentFault.disconnect(after_bytes=5))
    await c.send('{"execute":"guest-sync-delimited","arguments":{"id":1234}}')
    assert await c.eof() == b'\xff{"re'
    await c.close()
    c = await Client.open(agent)
    agent.inject("guest-fsfreeze-freeze", AgentFault.disconnect(apply=False))
    await c.send('{"execute":"guest-fsfreeze-freeze"}')
    assert await c.eof() == b""
    assert not agent.frozen
    await c.close()


async def test_fault_garbage_oversized_wrong_type_error(agent: FakeAgent, client: Client) -> None:
    agent.inject("guest-ping", AgentFault.garbage(b"\x00nonsense\n"))
    assert await client.request('{"execute":"guest-ping"}') == b"\x00nonsense\n"
    agent.inject("guest-ping", AgentFault.oversized(100_000))
    await client.send('{"execute":"guest-ping"}')
    data = await client.read(100_000)
    assert data.startswith(b'{"return": "AAAA') and b"\n" not in data
    await client.nothing()
    agent.inject("guest-ping", AgentFault.oversized(70_000, line=True))
    line = await client.request('{"execute":"guest-ping"}')
    assert len(line) == 70_000 and json.loads(line)["return"] == "A" * (70_000 - 15)
    agent.inject("guest-fsfreeze-freeze", AgentFault.reply("x"))
    assert await client.request('{"execute":"guest-fsfreeze-freeze","id":1}') == (
        b'{"return": "x", "id": 1}\n'
    )
    assert agent.frozen
    assert await client.call("guest-fsfreeze-thaw") == 2
    agent.inject("guest-sync-delimited", AgentFault.reply("nope"))
    assert await client.request('{"execute":"guest-sync-delimited","arguments":{"id":3}}') == (
        b'\xff{"return": "nope"}\n'
    )
    agent.inject("guest-fsfreeze-freeze", AgentFault.error("boom", "CommandNotFound"))
    assert await client.request('{"execute":"guest-fsfreeze-freeze","id":"e"}') == (
        b'{"id": "e", "error": {"class": "CommandNotFound", "desc": "boom"}}\n'
    )
    assert not agent.frozen
    agent.inject("guest-fsfreeze-freeze", AgentFault.error(apply=True))
    assert await client.request('{"execute":"guest-fsfreeze-freeze"}') == err("injected fault")
    assert agent.frozen


async def test_fault_hang_and_release(agent: FakeAgent, client: Client) -> None:
    agent.inject("guest-fsfreeze-freeze", AgentFault.hang())
    await client.send('{"execute":"guest-fsfreeze-freeze"}{"execute":"guest-ping"}')
    await agent.wait_for_call("guest-fsfreeze-freeze")
    await client.send('{"execute":"guest-sync","arguments":{"id":7}}')
    await client.nothing(0.2)
    assert agent.hung and not agent.frozen
    with pytest.raises(TimeoutError):
        await agent.wait_idle(0.05)
    agent.release()
    assert await client.line() == b'{"return": 2}\n'
    assert await client.line() == b'{"return": {}}\n'
    assert await client.line() == b'{"return": 7}\n'
    assert not agent.hung
    agent.inject("guest-fsfreeze-thaw", AgentFault.hang(apply=True))
    await client.send('{"execute":"guest-fsfreeze-thaw"}')
    await agent.wait_for_call("guest-fsfreeze-thaw")
    await asyncio.sleep(0.02)
    assert not agent.frozen
    agent.clear_faults()
    assert await client.line() == b'{"return": 2}\n'


async def test_fault_custom(agent: FakeAgent, client: Client) -> None:
    async def wrong_id(message: AgentMessage, fake: FakeAgent) -> Any:
        reply = await fake.execute(message)
        assert reply is not None
        reply["id"] = "someone-else"
        return reply

    agent.inject("guest-ping", AgentFault.custom(wrong_id))
    assert await client.request('{"execute":"guest-ping","id":"mine"}') == (
        b'{"return": {}, "id": "someone-else"}\n'
    )
    agent.inject("guest-ping", AgentFault.custom(lambda m, f: b"raw\n"))
    assert await client.request('{"execute":"guest-ping"}') == b"raw\n"
    agent.inject("guest-ping", AgentFault.custom(lambda m, f: None))
    await client.send('{"execute":"guest-ping"}')
    await client.nothing()
    assert agent.call_count("guest-ping") == 3


async def test_fault_targeting(agent: FakeAgent, client: Client) -> None:
    # the 2nd guest-fsfreeze-freeze only
    agent.inject("guest-fsfreeze-freeze", AgentFault.error("second"), call=2)
    assert await client.call("guest-fsfreeze-freeze") == 2
    await client.call("guest-fsfreeze-thaw")
    assert await client.request('{"execute":"guest-fsfreeze-freeze"}') == err("second")
    assert await client.call("guest-fsfreeze-freeze") == 2
    await client.call("guest-fsfreeze-thaw")
    # twice, then not
    agent.inject("guest-ping", AgentFault.reply(1), times=2)
    replies = [await client.request('{"execute":"guest-ping"}') for _ in range(3)]
    assert replies == [b'{"return": 1}\n', b'{"return": 1}\n', b'{"return": {}}\n']
    # persistent until cleared, for any command
    injection = agent.inject("*", AgentFault.reply("any"), times=None)
    assert await client.request('{"execute":"guest-info"}') == b'{"return": "any"}\n'
    assert await client.request('{"execute":"guest-ping"}') == b'{"return": "any"}\n'
    assert injection.fired == 2 and agent.injections == [injection]
    agent.clear_faults("guest-ping")
    assert injection.active
    agent.clear_faults()
    assert not injection.active and agent.injections == []
    assert await client.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'
    # cancel
    injection = agent.inject("guest-ping", AgentFault.reply(0))
    injection.cancel()
    assert await client.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'
    # "*" with call counts all commands
    total = agent.call_count()
    agent.inject("*", AgentFault.reply("nth"), call=total + 2)
    assert await client.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'
    assert await client.request('{"execute":"guest-ping"}') == b'{"return": "nth"}\n'
    with pytest.raises(ValueError):
        agent.inject("guest-ping", AgentFault.no_reply(), call=0)
    with pytest.raises(ValueError):
        agent.inject("guest-ping", AgentFault.no_reply(), times=0)


def test_fault_constructors() -> None:
    assert AgentFault.delay(1.5).kind is AgentFaultKind.DELAY
    assert AgentFault.no_reply().apply and not AgentFault.error().apply
    assert AgentFault.hang() == AgentFault(AgentFaultKind.HANG, apply=False)
    with pytest.raises(ValueError):
        AgentFault.delay(-1)
    with pytest.raises(ValueError):
        AgentFault.oversized(-1)
    with pytest.raises(ValueError):
        AgentFault.disconnect(after_bytes=-1)
    with pytest.raises(AttributeError):
        AgentFault.delay(1).seconds = 2  # type: ignore[misc]


# ------------------------------------------------------------------------------ bounded memory


async def test_oversized_message_is_cut_and_agent_recovers() -> None:
    async with FakeAgent(max_input=8192) as agent:
        c = await Client.open(agent)
        await c.send(b'{"execute":"guest-ping","id":"' + b"x" * 50_000 + b'"}')
        assert await c.line() == err("JSON token size limit exceeded")
        await c.send(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":77}}')
        while (line := await c.line()) != b'\xff{"return": 77}\n':
            assert line.startswith(b'{"error"')
        assert await c.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'
        await c.close()


async def test_input_buffer_is_bounded_while_hung() -> None:
    async with FakeAgent(max_input=8192) as agent:
        c = await Client.open(agent)
        agent.inject("guest-ping", AgentFault.hang())
        await c.send('{"execute":"guest-ping"}')
        await agent.wait_for_call("guest-ping")
        payload = b'{"execute":"guest-ping"}' * 10_000  # 240 kB
        writing = asyncio.ensure_future(c.send(payload))
        await asyncio.sleep(0.2)
        assert agent.buffered <= 8192 + 4096
        agent.release()
        await asyncio.wait_for(writing, 5)
        for _ in range(10_001):
            assert await c.line() == b'{"return": {}}\n'
        await c.close()


async def test_undelivered_replies_are_bounded() -> None:
    async with FakeAgent(max_input=4096) as agent:
        agent.set_handler("guest-big", lambda args: "B" * 5000)
        c = await Client.open(agent)
        agent.inject("guest-ping", AgentFault.delay(0.2))
        await c.send('{"execute":"guest-ping","id":"late"}' + '{"execute":"guest-big"}' * 3)
        await agent.wait_for_call("guest-ping")
        await c.close()
        await agent.wait_for_call("guest-big", 3)
        await agent.wait_idle()
        assert 0 < agent.undelivered <= 4096
        c = await Client.open(agent)
        assert await c.line() == b'{"return": {}, "id": "late"}\n'
        await c.nothing()
        assert agent.undelivered == 0
        await c.close()


# --------------------------------------------------------------------------- sans-I/O pieces


def test_qemu_json_format() -> None:
    assert qemu_json({"return": {}, "id": 1}) == '{"return": {}, "id": 1}'
    assert qemu_json({"id": 1, "return": {}}) == '{"return": {}, "id": 1}'
    assert qemu_json({"error": {"desc": "d", "class": "c"}, "id": 1}) == (
        '{"id": 1, "error": {"class": "c", "desc": "d"}}'
    )
    # same bucket: the newer key first (QLIST_INSERT_HEAD)
    assert qemu_json({"exited": 3, "id": 4}) == '{"id": 4, "exited": 3}'
    assert qemu_json({"id": 4, "exited": 3}) == '{"exited": 3, "id": 4}'
    assert qemu_json([1.5, 0.1, 1e20, True, None, []]) == '[1.5, 0.10000000000000001, 1e+20, true, null, []]'
    assert qemu_json("\"\\\b\f\n\r\t\x00\x7f\u00e9\U0001f600\ufffe\ud800/") == (
        '"\\"\\\\\\b\\f\\n\\r\\t\\u0000\\u007F\\u00E9\\uD83D\\uDE00\\uFFFD\\uFFFD/"'
    )
    with pytest.raises(TypeError):
        qemu_json({1: 2})
    with pytest.raises(TypeError):
        qemu_json(object())


def test_parser_sans_io() -> None:
    parser = QEMUJSONStreamParser()
    assert parser.feed(b'{"a": [1, 2.5, "x", true') == []
    [event] = parser.feed(b", null, false]}")
    assert event.value == {"a": [1, 2.5, "x", True, None, False]} and event.error is None
    events = parser.feed(b'{"b\xff{"c": 1}')
    assert [(e.value, e.error, e.after_sync_byte) for e in events] == [
        (None, "JSON parse error, stray '\"b\ufffd'", True),
        ({"c": 1}, None, True),
    ]
    [event] = parser.feed(b"[]")
    assert event.value == [] and not event.after_sync_byte
    assert [e.error for e in parser.feed(b"01 ")] == ["JSON parse error, stray '01'"]
    # recovery skips to the next structural character (or control byte, 0xFE, 0xFF)
    assert parser.feed(b'-1e5 "x" ') == []
    assert [e.error for e in parser.feed(b"]")] == ["JSON parse error, expecting value"]
    assert [e.value for e in parser.feed(b"-1e5 ")] == [-100000.0]
    assert [e.value for e in parser.feed(b"'it\\'s' ")] == ["it's"]
    assert [e.value for e in parser.feed(b'"\xc0\x80" ')] == ["\x00"]
    assert [e.error for e in parser.feed(b'"\xed\xa0\x80" ')] == [
        "JSON parse error, invalid UTF-8 sequence in string"
    ]
    limited = QEMUJSONStreamParser(max_tokens=4, max_message_size=100)
    # like QEMU, what follows the cut is parsed afresh: "3" and then a stray "]"
    assert [e.error for e in limited.feed(b"[1,2,3]")] == [
        "JSON token count limit exceeded", None, "JSON parse error, expecting value"
    ]
    assert limited.feed(b"[" + b"1," * 60)[0].error == "JSON token count limit exceeded"
    assert limited.feed(b' ["' + b"x" * 200 + b'"')[-1].error == "JSON token size limit exceeded"


async def test_disconnect_fault_keeps_received_requests_for_next_client(agent: FakeAgent) -> None:
    c = await Client.open(agent)
    agent.inject("guest-sync", AgentFault.disconnect(), call=1)
    await c.send(
        '{"execute":"guest-sync","arguments":{"id":1}}{"execute":"guest-sync","arguments":{"id":2}}'
    )
    assert await c.eof() == b""
    await agent.wait_for_call("guest-sync", 2)
    await agent.wait_idle()
    c2 = await Client.open(agent)
    assert await c2.line() == b'{"return": 2}\n'  # a stale reply: the client must resync
    assert agent.calls("guest-sync")[1].connection is None
    await c.close()
    await c2.close()


async def test_agent_survives_broken_callbacks_and_handlers(caplog: pytest.LogCaptureFixture) -> None:
    def broken_callback(open_: bool) -> None:
        raise RuntimeError("callback bug")

    async with FakeAgent(on_port_change=broken_callback) as agent:
        agent.close_port()
        agent.open_port()
        c = await Client.open(agent)
        agent.set_handler("guest-odd", lambda args: object())  # not JSON
        await c.send('{"execute":"guest-odd"}')
        await agent.wait_for_call("guest-odd")

        def broken_fault(message: AgentMessage, fake: FakeAgent) -> Any:
            raise RuntimeError("fault bug")

        agent.inject("guest-ping", AgentFault.custom(broken_fault))
        await c.send('{"execute":"guest-ping"}')
        await c.nothing()
        agent.inject("guest-ping", AgentFault.custom(lambda m, f: 42))
        await c.send('{"execute":"guest-ping"}')
        await c.nothing()
        assert await c.request('{"execute":"guest-ping"}') == b'{"return": {}}\n'
        await c.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("callback" in m for m in messages)
    assert sum("processing" in m for m in messages) == 3


async def test_wait_for_call_after_clear(agent: FakeAgent, client: Client) -> None:
    await client.call("guest-ping")
    assert (await agent.wait_for_call("guest-ping")).command == "guest-ping"
    agent.clear_received()
    with pytest.raises(LookupError):
        await agent.wait_for_call("guest-ping")
