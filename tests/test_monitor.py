"""Unit tests of qmpagent.Monitor against the fake QMP server (fast, no QEMU)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

import qmpagent.monitor as monitor_module
from qmpagent.errors import (
    AgentUnavailable,
    EventOverflow,
    JobError,
    MonitorCommandError,
    MonitorError,
    MonitorTimeout,
    MonitorUnavailable,
    UsageError,
)
from qmpagent.monitor import (
    USE_CLIENT_DEFAULT,
    BlockNode,
    JobResult,
    Monitor,
    MonitorState,
    VirtioSerialPort,
    _CommandDeadlines,
    data_matches,
)
from qmpagent.testing.fake_qmp import FakeCall, FakeQMPError, FakeQMPServer, Fault, FaultKind


def _state(mon: Monitor) -> MonitorState:
    return mon.state


def _leak_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    gc.collect()
    bad = ("never retrieved", "was destroyed but it is pending", "Unhandled error")
    return [r.getMessage() for r in caplog.records if any(b in r.getMessage() for b in bad)]


# --- connecting ----------------------------------------------------------------------------------


async def test_connect_unix_execute_and_close(fake: FakeQMPServer) -> None:
    async with await Monitor.connect(Path(str(fake.address))) as mon:
        assert _state(mon) is MonitorState.OPEN and mon.is_open
        assert mon.qemu_version == (7, 2, 0)
        assert await mon.execute("query-status") == {
            "status": "running", "singlestep": False, "running": True,
        }
    assert _state(mon) is MonitorState.CLOSED
    await mon.close()  # idempotent
    with pytest.raises(MonitorUnavailable, match="closed"):
        await mon.execute("query-status")
    assert [c.command for c in fake.received] == ["qmp_capabilities", "query-status"]
    assert fake.received[0].arguments == {"enable": ["oob"]}


async def test_connect_tcp() -> None:
    async with FakeQMPServer(tcp=True) as server:
        assert isinstance(server.address, tuple)
        async with await Monitor.connect(server.address) as mon:
            assert (await mon.execute("query-status"))["running"] is True


async def test_connect_to_nothing_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(MonitorUnavailable) as info:
        await Monitor.connect(tmp_path / "missing.sock", timeout=2.0)
    assert info.value.__cause__ is not None


async def test_connect_bad_address_is_usage_error() -> None:
    with pytest.raises(UsageError):
        await Monitor.connect(("localhost", "4444"))  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        await Monitor.connect(1234)  # type: ignore[arg-type]


async def test_connect_timeout_when_no_greeting(tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    path = tmp_path / "silent.sock"
    server = await asyncio.start_unix_server(silent, str(path))
    try:
        started = time.monotonic()
        with pytest.raises(MonitorTimeout):
            await Monitor.connect(path, timeout=0.3)
        assert time.monotonic() - started < 3.0
    finally:
        server.close()
        await server.wait_closed()
        path.unlink(missing_ok=True)


async def test_from_client_wraps_and_disables_default_listener(fake: FakeQMPServer) -> None:
    client = QMPClient("wrapped")
    await client.connect(fake.address)
    await fake.emit("EARLY")
    await client.execute("query-status")
    assert not client.events.empty()  # qemu.qmp's default listener took it
    mon = Monitor.from_client(client, command_timeout=2.0)
    assert client.events.empty()
    async with mon:
        assert mon.client is client
        assert mon.command_timeout == 2.0
        await fake.emit("LATER")
        await mon.execute("query-status")
        assert client.events.empty()
    assert client.runstate.name == "IDLE"


async def test_from_client_requires_connected_client() -> None:
    with pytest.raises(UsageError):
        Monitor.from_client(QMPClient("idle"))


# --- commands ------------------------------------------------------------------------------------


async def test_arguments_reach_the_server(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.set_handler("echo", lambda call: {"got": call.arguments})
    assert await mon.execute("echo", {"a": [1, 2], "b": {"c": None}}) == {
        "got": {"a": [1, 2], "b": {"c": None}}
    }
    assert fake.commands("echo")[0].arguments == {"a": [1, 2], "b": {"c": None}}


async def test_command_not_found_maps_to_monitor_command_error(mon: Monitor) -> None:
    with pytest.raises(MonitorCommandError) as info:
        await mon.execute("no-such-command")
    err = info.value
    assert err.command == "no-such-command"
    assert err.error_class == "CommandNotFound"
    assert "has not been found" in err.desc
    assert err.__cause__ is not None


async def test_handler_error_maps_to_monitor_command_error(
    fake: FakeQMPServer, mon: Monitor
) -> None:
    def broken(call: FakeCall) -> None:
        raise FakeQMPError("GenericError", "Parameter 'x' is unexpected")

    fake.set_handler("x-thing", broken)
    with pytest.raises(MonitorCommandError) as info:
        await mon.execute("x-thing", {"x": 1})
    assert (info.value.error_class, info.value.desc) == (
        "GenericError", "Parameter 'x' is unexpected"
    )
    assert (await mon.execute("query-status"))["running"]


async def test_unserialisable_arguments_are_usage_errors(mon: Monitor) -> None:
    with pytest.raises(UsageError):
        await mon.execute("echo", {"x": object()})
    assert (await mon.execute("query-status"))["running"]  # the connection survived


async def test_timeout_leaves_connection_usable(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.never_answer("query-status", times=1)
    started = time.monotonic()
    with pytest.raises(MonitorTimeout) as info:
        await mon.execute("query-status", timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - started < 2.0
    assert (await mon.execute("query-status"))["status"] == "running"
    assert mon.state is MonitorState.OPEN


async def test_late_reply_is_discarded(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.set_handler("echo", lambda call: call.arguments["n"])
    fake.delay("echo", 0.3, times=1)
    with pytest.raises(MonitorTimeout):
        await mon.execute("echo", {"n": 1}, timeout=0.05)
    # QEMU runs in-band commands in order: this one waits behind the slow one, and must get
    # its own reply, not the late one.
    assert await mon.execute("echo", {"n": 2}) == 2
    assert await mon.execute("echo", {"n": 3}) == 3


async def test_default_timeout_none_and_override(fake: FakeQMPServer) -> None:
    fake.delay("query-status", 0.3)
    async with await Monitor.connect(fake.address, command_timeout=0.05) as mon:
        with pytest.raises(MonitorTimeout):
            await mon.execute("query-status")
        with pytest.raises(MonitorTimeout):
            await mon.execute("query-status", timeout=USE_CLIENT_DEFAULT)
        assert (await mon.execute("query-status", timeout=None))["running"]
        assert (await mon.execute("query-status", timeout=5.0))["running"]
        mon.command_timeout = None
        assert (await mon.execute("query-status"))["running"]


async def test_concurrent_commands_have_their_own_deadlines(
    fake: FakeQMPServer, mon: Monitor
) -> None:
    fake.set_handler("echo", lambda call: call.arguments["n"])
    fake.never_answer("echo", times=1)
    fake.add_fault("slow", Fault(FaultKind.DELAY, 0.3))
    fake.set_handler("slow", lambda call: "slow")
    long = asyncio.create_task(mon.execute("echo", {"n": 1}, timeout=30.0))
    await fake.wait_for_command("echo")
    started = time.monotonic()
    with pytest.raises(MonitorTimeout):  # the shared timer is re-armed for the earlier deadline
        await mon.execute("slow", timeout=0.1)
    assert time.monotonic() - started < 1.0
    assert not long.done()
    assert await mon.execute("slow", timeout=5.0) == "slow"
    assert await mon.execute("echo", {"n": 3}, timeout=5.0) == 3
    many = [mon.execute("echo", {"n": n}, timeout=0.5 + n / 100) for n in range(10)]
    assert await asyncio.gather(*many) == list(range(10))
    long.cancel()
    with pytest.raises(asyncio.CancelledError):
        await long


async def test_deadline_with_simultaneous_outside_cancel_propagates_cancel() -> None:
    loop = asyncio.get_running_loop()
    deadlines = _CommandDeadlines(loop)
    entries: list[Any] = []

    async def command() -> str:
        entry = deadlines.add(0.05)
        entries.append(entry)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if _CommandDeadlines.timed_out(entry):
                return "timeout"
            raise
        finally:
            deadlines.discard(entry)
        return "done"

    alone = asyncio.create_task(command())
    assert await alone == "timeout"

    both = asyncio.create_task(command())
    await asyncio.sleep(0)
    loop.call_at(entries[-1].deadline, both.cancel)  # fires in the same loop iteration
    with pytest.raises(asyncio.CancelledError):
        await both
    deadlines.close()


async def test_caller_cancellation_propagates(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.never_answer("query-status", times=1)
    task = asyncio.create_task(mon.execute("query-status", timeout=None))
    await fake.wait_for_command("query-status")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await mon.execute("query-status"))["running"]


async def test_disconnect_mid_command_is_unavailable(
    fake: FakeQMPServer, mon: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    fake.disconnect_on("query-status")
    started = time.monotonic()
    with pytest.raises(MonitorUnavailable, match="lost"):
        await mon.execute("query-status", timeout=30.0)
    assert time.monotonic() - started < 2.0
    with pytest.raises(MonitorUnavailable):
        await mon.execute("query-version")
    for _ in range(100):  # the monitor reaps the client in the background
        if mon.client.runstate.name == "IDLE":
            break
        await asyncio.sleep(0.01)
    assert _state(mon) is MonitorState.LOST
    assert mon.client.runstate.name == "IDLE"
    await mon.close()
    assert _state(mon) is MonitorState.CLOSED
    assert _leak_records(caplog) == []


async def test_pending_commands_all_fail_when_server_goes_away(
    fake: FakeQMPServer, mon: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    fake.never_answer("query-status")
    tasks = [asyncio.create_task(mon.execute("query-status", timeout=None)) for _ in range(5)]
    await fake.wait_for_command("query-status", count=5)
    await fake.disconnect_all()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5.0)
    assert all(isinstance(r, MonitorUnavailable) for r in results), results
    assert _leak_records(caplog) == []


# --- events --------------------------------------------------------------------------------------


async def test_listen_yields_event_dicts(fake: FakeQMPServer, mon: Monitor) -> None:
    async with mon.listen("STOP", "RESUME") as events:
        await mon.execute("stop")  # the fake emits STOP (no data) while running the command
        await fake.emit("OTHER", {"x": 1})
        await mon.execute("cont")
        stop = await events.get(timeout=2.0)
        resume = await events.get(timeout=2.0)
    assert stop["event"] == "STOP" and stop["data"] == {}
    assert set(stop["timestamp"]) == {"seconds", "microseconds"}
    assert resume["event"] == "RESUME"
    assert type(stop) is dict


async def test_listen_all_events_and_async_for(fake: FakeQMPServer, mon: Monitor) -> None:
    async with mon.listen() as events:
        for i in range(3):
            await fake.emit(f"E{i}", {"i": i})
        seen = []
        async for event in events:
            seen.append(event["event"])
            if len(seen) == 3:
                break
    assert seen == ["E0", "E1", "E2"]


async def test_listen_is_registered_before_the_command(fake: FakeQMPServer, mon: Monitor) -> None:
    # The event is sent before the command's reply: a listener registered after execute()
    # returned would miss it.
    async def fire(call: FakeCall) -> dict[str, Any]:
        await fake.emit("FIRED", {"n": call.arguments["n"]})
        return {}

    fake.set_handler("fire", fire)
    async with mon.listen("FIRED") as events:
        await mon.execute("fire", {"n": 7})
        assert (await events.get(timeout=1.0))["data"] == {"n": 7}


async def test_overflow_raised_at_point_of_loss(fake: FakeQMPServer, mon: Monitor) -> None:
    async with mon.listen("TICK", maxsize=10) as events:
        await fake.flood("TICK", 100, lambda i: {"i": i})
        await mon.execute("query-status")  # every event before the reply has been dispatched
        got = [(await events.get(timeout=1.0))["data"]["i"] for _ in range(10)]
        assert got == list(range(10))
        with pytest.raises(EventOverflow) as info:
            await events.get(timeout=1.0)
        assert info.value.dropped == 90
        assert events.dropped == 90
        # after the gap, the stream goes on
        await fake.emit("TICK", {"i": 1000})
        assert (await events.get(timeout=1.0))["data"]["i"] == 1000
        # async for raises it too, and can be resumed
        await fake.flood("TICK", 15, lambda i: {"i": 2000 + i})
        await mon.execute("query-status")
        seen: list[int] = []
        with pytest.raises(EventOverflow) as info:
            async for event in events:
                seen.append(event["data"]["i"])
        assert seen == list(range(2000, 2010)) and info.value.dropped == 5
        assert events.qsize() == 0


async def test_overflow_ordering_with_interleaved_consumption(
    fake: FakeQMPServer, mon: Monitor
) -> None:
    async with mon.listen("TICK", maxsize=2) as events:
        await fake.flood("TICK", 4, lambda i: {"i": i})  # 0 1 [lost 2 3]
        await mon.execute("query-status")
        assert (await events.get(timeout=1.0))["data"]["i"] == 0
        await fake.flood("TICK", 3, lambda i: {"i": 10 + i})  # 10 [lost 11 12]
        await mon.execute("query-status")
        assert (await events.get(timeout=1.0))["data"]["i"] == 1
        with pytest.raises(EventOverflow) as info:
            await events.get(timeout=1.0)
        assert info.value.dropped == 2
        assert (await events.get(timeout=1.0))["data"]["i"] == 10
        with pytest.raises(EventOverflow) as info:
            await events.get(timeout=1.0)
        assert info.value.dropped == 2


async def test_default_listener_never_grows(fake: FakeQMPServer, mon: Monitor) -> None:
    # Control: a bare qemu.qmp client keeps every event in its default listener.
    bare = QMPClient("bare")
    await bare.connect(fake.address)
    try:
        await fake.flood("BLOCK_IO_ERROR", 20_000, {"device": "vblk0", "action": "report"})
        await mon.execute("query-status")
        await bare.execute("query-status")
        assert not bare.events.empty()
        assert len(bare.events.history) == 20_000
        assert mon.client.events.empty()
        assert mon.client.events.history == ()
    finally:
        await bare.disconnect()


async def test_wait_event_match_subset(fake: FakeQMPServer, mon: Monitor) -> None:
    async def later() -> None:
        await asyncio.sleep(0.05)
        await fake.emit("VSERPORT_CHANGE", {"id": "other", "open": True})
        await fake.emit("VSERPORT_CHANGE", {"id": "qgaport0", "open": 1})  # not a bool
        await fake.emit("VSERPORT_CHANGE", {"id": "qgaport0", "open": True, "x": {"y": 1}})

    task = asyncio.create_task(later())
    event = await mon.wait_event(
        "VSERPORT_CHANGE", match={"id": "qgaport0", "open": True}, timeout=5.0
    )
    await task
    assert event["data"] == {"id": "qgaport0", "open": True, "x": {"y": 1}}


async def test_wait_event_predicate_and_timeout(fake: FakeQMPServer, mon: Monitor) -> None:
    with pytest.raises(MonitorTimeout):
        await mon.wait_event("NEVER", timeout=0.1)
    task = asyncio.create_task(
        mon.wait_event("N", match=lambda e: e["data"].get("n", 0) > 2, timeout=5.0)
    )
    await asyncio.sleep(0.05)
    for n in range(5):
        await fake.emit("N", {"n": n})
    assert (await task)["data"]["n"] == 3


async def test_wait_event_unavailable_when_server_goes_away(
    fake: FakeQMPServer, mon: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    task = asyncio.create_task(mon.wait_event("SHUTDOWN", timeout=None))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await fake.disconnect_all()
    with pytest.raises(MonitorUnavailable):
        await asyncio.wait_for(task, 5.0)
    assert time.monotonic() - started < 2.0
    assert _leak_records(caplog) == []


async def test_stream_delivers_queued_events_before_unavailable(
    fake: FakeQMPServer, mon: Monitor
) -> None:
    async with mon.listen("A") as events:
        await fake.emit("A", {"n": 1})
        await mon.execute("query-status")
        await fake.disconnect_all()
        assert (await events.get(timeout=2.0))["data"] == {"n": 1}
        with pytest.raises(MonitorUnavailable):
            await events.get(timeout=2.0)


async def test_stream_wait_and_misuse(fake: FakeQMPServer, mon: Monitor) -> None:
    stream = mon.listen("A", "B")
    with pytest.raises(UsageError):
        await stream.get(timeout=0.1)
    async with stream:
        await fake.emit("A", {"n": 1})
        await fake.emit("B", {"n": 2})
        await fake.emit("B", {"n": 3})
        assert (await stream.wait("B", {"n": 3}, timeout=2.0))["data"] == {"n": 3}
        assert stream.get_nowait() is None
        with pytest.raises(MonitorTimeout):
            await stream.wait("A", timeout=0.05)
    with pytest.raises(UsageError):
        await stream.__aenter__()
    with pytest.raises(UsageError):
        mon.listen("A", maxsize=0)
    with pytest.raises(UsageError):
        mon.listen("A", match=42)  # type: ignore[arg-type]


async def test_listen_after_loss_is_unavailable(fake: FakeQMPServer, mon: Monitor) -> None:
    await fake.disconnect_all()
    with pytest.raises(MonitorUnavailable):
        await mon.execute("query-status")
    with pytest.raises(MonitorUnavailable):
        async with mon.listen("X"):
            pass


def test_data_matches() -> None:
    assert data_matches({}, {"a": 1})
    assert data_matches({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}, "d": 3})
    assert not data_matches({"a": {"b": 2}}, {"a": {"b": 1}})
    assert not data_matches({"open": True}, {"open": 1})
    assert not data_matches({"x": 1}, {})
    assert not data_matches({"x": 1}, None)


# --- jobs ----------------------------------------------------------------------------------------


async def test_run_job_success_dismisses(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.add_job_command("blockdev-create", duration=0.05)
    result = await mon.run_job(
        "blockdev-create", {"job-id": "c1", "options": {"driver": "file"}}
    )
    assert isinstance(result, JobResult)
    assert (result.job_id, result.command, result.job_type) == ("c1", "blockdev-create", "create")
    assert result.duration >= 0.05
    assert fake.jobs == {}
    assert [c.command for c in fake.received][-3:] == ["blockdev-create", "query-jobs",
                                                       "job-dismiss"]


async def test_run_job_generates_job_id(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.add_job_command("snapshot-save", job_type="snapshot-save")
    result = await mon.run_job("snapshot-save", {"tag": "t"})
    assert result.job_id.startswith("qmpagent-")
    assert fake.commands("snapshot-save")[0].arguments["job-id"] == result.job_id
    with pytest.raises(UsageError):
        await mon.run_job("snapshot-save", {"job-id": "a"}, job_id="b")


async def test_run_job_error_text_surfaces(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.add_job_command(
        "blockdev-create", error="Could not create '/nope/x': No such file or directory"
    )
    with pytest.raises(JobError) as info:
        await mon.run_job("blockdev-create", {"job-id": "bad", "options": {}})
    assert info.value.job_id == "bad"
    assert info.value.desc == "Could not create '/nope/x': No such file or directory"
    assert isinstance(info.value, MonitorCommandError)
    assert fake.jobs == {}  # dismissed


async def test_run_job_refused_command(fake: FakeQMPServer, mon: Monitor) -> None:
    with pytest.raises(MonitorCommandError) as info:
        await mon.run_job("blockdev-create", {"options": {}})
    assert info.value.error_class == "CommandNotFound"
    assert not fake.commands("job-dismiss") and not fake.commands("job-cancel")


async def test_run_job_timeout_cancels_and_dismisses(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.add_job_command("blockdev-create", duration=None)
    started = time.monotonic()
    with pytest.raises(MonitorTimeout):
        await mon.run_job("blockdev-create", {"job-id": "slow", "options": {}}, timeout=0.2)
    assert time.monotonic() - started < 3.0
    assert fake.jobs == {}
    assert fake.commands("job-cancel")[0].arguments == {"id": "slow"}
    assert fake.commands("job-dismiss")[0].arguments == {"id": "slow"}


async def test_run_job_timeout_before_the_reply_still_cleans_up(
    fake: FakeQMPServer, mon: Monitor
) -> None:
    fake.add_job_command("blockdev-create", duration=None)
    fake.delay("blockdev-create", 0.3, times=1)  # QEMU busy: the job starts late
    with pytest.raises(MonitorTimeout):
        await mon.run_job("blockdev-create", {"job-id": "late", "options": {}}, timeout=0.1)
    assert fake.jobs == {}
    assert fake.commands("job-dismiss")[0].arguments == {"id": "late"}


async def test_run_job_caller_cancellation_cancels_and_dismisses(
    fake: FakeQMPServer, mon: Monitor
) -> None:
    fake.add_job_command("blockdev-create", duration=None)
    task = asyncio.create_task(mon.run_job("blockdev-create", {"job-id": "j", "options": {}}))
    for _ in range(200):
        if "j" in fake.jobs and fake.jobs["j"].status == "running":
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.jobs == {}
    assert fake.commands("job-dismiss")


async def test_run_job_server_gone(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.add_job_command("blockdev-create", duration=None)
    task = asyncio.create_task(mon.run_job("blockdev-create", {"options": {}}, timeout=30))
    await fake.wait_for_command("blockdev-create")
    await asyncio.sleep(0.05)
    await fake.disconnect_all()
    with pytest.raises(MonitorUnavailable):
        await asyncio.wait_for(task, 5.0)


# --- agent port ----------------------------------------------------------------------------------


async def test_agent_port_found_and_state(fake: FakeQMPServer, mon: Monitor) -> None:
    port = await mon.agent_port()
    assert port == VirtioSerialPort(
        "qgaport0", "qga0", "org.qemu.guest_agent.0", True, "/machine/peripheral/qgaport0"
    )
    assert await mon.agent_port_open() is True
    await fake.set_port_open("qgaport0", False)
    assert await mon.agent_port_open() is False
    assert await mon.agent_port_open(chardev="qga0") is False
    ports = await mon.virtio_serial_ports()
    assert [(p.device_id, p.open) for p in ports] == [("qgaport0", False)]
    assert (await mon.serial_port("qgaport0")).chardev == "qga0"
    with pytest.raises(MonitorCommandError) as info:
        await mon.serial_port("nope")
    assert info.value.error_class == "DeviceNotFound"


async def test_wait_agent_port_follows_events(
    fake: FakeQMPServer, mon: Monitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitor_module, "_PORT_POLL_INTERVAL", 60.0)  # only the event can wake it
    await fake.set_port_open("qgaport0", False)

    async def reopen() -> None:
        await asyncio.sleep(0.1)
        await fake.set_port_open("qgaport0", True)

    task = asyncio.create_task(reopen())
    port = await mon.wait_agent_port(timeout=10.0)
    await task
    assert port.open and port.chardev == "qga0"


async def test_wait_agent_port_polls_without_events(
    fake: FakeQMPServer, mon: Monitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitor_module, "_PORT_POLL_INTERVAL", 0.05)

    async def close_quietly() -> None:
        await asyncio.sleep(0.1)
        await fake.set_port_open("qgaport0", False, emit=False)

    task = asyncio.create_task(close_quietly())
    port = await mon.wait_agent_port(timeout=5.0, open=False)
    await task
    assert not port.open
    with pytest.raises(MonitorTimeout):
        await mon.wait_agent_port(timeout=0.2)


async def test_agent_port_missing() -> None:
    async with (
        FakeQMPServer(agent_port=False) as server,
        await Monitor.connect(server.address) as mon,
    ):
        with pytest.raises(AgentUnavailable):
            await mon.agent_port_open()
        with pytest.raises(AgentUnavailable):
            await mon.agent_port_open(chardev="nope")
        with pytest.raises(AgentUnavailable):
            await mon.wait_agent_port(timeout=0.5)


async def test_agent_port_anonymous_device() -> None:
    async with FakeQMPServer(agent_port=False) as server:
        server.add_serial_port("x", "org.qemu.guest_agent.0", "chr9", open=True)
        server.qom["/machine/peripheral-anon/device[3]"] = server.qom.pop(
            "/machine/peripheral/x"
        )
        async with await Monitor.connect(server.address) as mon:
            port = await mon.agent_port()
            assert port.device_id is None and port.chardev == "chr9" and port.open


# --- block ---------------------------------------------------------------------------------------


async def test_named_block_nodes(fake: FakeQMPServer, mon: Monitor) -> None:
    nodes = await mon.named_block_nodes()
    assert [n.node_name for n in nodes] == ["disk0", "file0"]
    disk0 = nodes[0]
    assert isinstance(disk0, BlockNode)
    assert (disk0.driver, disk0.filename, disk0.format, disk0.read_only) == (
        "qcow2", "/fake/data0.qcow2", "qcow2", False
    )
    assert disk0.backing_file is None and not disk0.auto_named
    assert fake.commands("query-named-block-nodes")[0].arguments == {"flat": True}


async def test_named_block_nodes_without_flat(fake: FakeQMPServer, mon: Monitor) -> None:
    def old_qemu(call: FakeCall) -> list[dict[str, Any]]:
        if "flat" in call.arguments:
            raise FakeQMPError("GenericError", "Parameter 'flat' is unexpected")
        return fake.block_nodes

    fake.set_handler("query-named-block-nodes", old_qemu)
    assert len(await mon.named_block_nodes()) == 2
    assert len(await mon.named_block_nodes()) == 2
    assert [c.arguments for c in fake.commands("query-named-block-nodes")] == [
        {"flat": True}, {}, {}
    ]


async def test_device_node_name(mon: Monitor) -> None:
    assert await mon.device_node_name("vblk0") == "disk0"
    assert await mon.device_node_name("/machine/peripheral/vblk0") == "disk0"
    assert await mon.device_node_name("/machine/peripheral/vblk0/virtio-backend") == "disk0"
    devices = await mon.block_devices()
    assert devices[0].qdev_id == "vblk0" and devices[0].device is None
    with pytest.raises(MonitorCommandError) as info:
        await mon.device_node_name("vblk9")
    assert info.value.error_class == "DeviceNotFound"


async def test_malformed_block_reply(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.set_handler("query-named-block-nodes", lambda call: [{"drv": "qcow2"}])
    with pytest.raises(MonitorError):
        await mon.named_block_nodes()


# --- the fake server itself ----------------------------------------------------------------------


async def _raw_exchange(
    address: str, chunks: list[bytes], replies: int
) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(address)
    try:
        greeting = json.loads(await reader.readline())
        assert greeting["QMP"]["capabilities"] == ["oob"]
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.01)
        return [json.loads(await asyncio.wait_for(reader.readline(), 2.0))
                for _ in range(replies)]
    finally:
        writer.close()
        await writer.wait_closed()


async def test_fake_parses_a_json_stream_without_newlines(fake: FakeQMPServer) -> None:
    stream = b'{"execute":"qmp_capabilities"}{"execute": "query-status", "id": 1}  {"exec'
    replies = await _raw_exchange(
        str(fake.address), [stream[:20], stream[20:], b'ute":"query-version","id":"v"}'], 3
    )
    assert replies[0] == {"return": {}}
    assert replies[1]["id"] == 1 and replies[1]["return"]["status"] == "running"
    assert replies[2]["id"] == "v" and replies[2]["return"]["qemu"]["major"] == 7


async def test_fake_protocol_errors(fake: FakeQMPServer) -> None:
    replies = await _raw_exchange(
        str(fake.address),
        [b'{"execute":"query-status","id":1}', b"[1]", b'{"execute":"qmp_capabilities"}',
         b'{"execute":"qmp_capabilities","id":2}', b'{"exec-oob":"query-status","id":3}',
         b'{"a": ]', b'{"execute":"query-status","id":4}'],
        7,
    )
    assert replies[0]["error"]["class"] == "CommandNotFound"  # before negotiation
    assert replies[1]["error"]["desc"] == "QMP input must be a JSON object"
    assert replies[2] == {"return": {}}
    assert replies[3]["error"]["class"] == "CommandNotFound" and replies[3]["id"] == 2
    assert replies[4]["error"]["class"] == "GenericError"  # oob not enabled
    assert "JSON parse error" in replies[5]["error"]["desc"] and "id" not in replies[5]
    assert replies[6]["id"] == 4 and "return" in replies[6]


async def test_fake_oob_runs_past_a_slow_command(fake: FakeQMPServer, mon: Monitor) -> None:
    fake.delay("query-status", 0.5, times=1)
    slow = asyncio.create_task(mon.execute("query-status"))
    await fake.wait_for_command("query-status")
    started = time.monotonic()
    await mon.client.execute("query-version", oob=True)
    assert time.monotonic() - started < 0.4
    await slow
    assert fake.commands("query-version")[0].oob
