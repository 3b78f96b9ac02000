"""The ``qmpagent`` command line without a VM: the parser, addresses, help, exit codes, error
output, and (in a subprocess) the subcommands against the fake QMP server and the fake agent.

The same subcommands against the real guest are in ``test_cli_real.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cli_run import one_line, qmpagent, start

from qmpagent import (
    AgentCommandError,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    EventOverflow,
    JobError,
    MonitorCommandError,
    MonitorError,
    MonitorTimeout,
    MonitorUnavailable,
    SnapshotError,
    SnapshotRecord,
    ThawError,
    UsageError,
    cli,
)
from qmpagent.cli import EXIT_CODE_HELP, ExitCode, exit_code_for, main
from qmpagent.monitor import Monitor
from qmpagent.snapshot import SnapshotOrchestrator
from qmpagent.testing.fake_agent import AgentFault, ExecResult, FakeAgent
from qmpagent.testing.fake_qmp import FakeQMPServer
from qmpagent.testing.image import GuestBuildError

# --- running the command in a subprocess ---------------------------------------------------------


# --- parser and addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/run/vm1/qmp.sock", "/run/vm1/qmp.sock"),
        ("qmp.sock", "qmp.sock"),
        ("localhost:4444", ("localhost", 4444)),
        ("127.0.0.1:4444", ("127.0.0.1", 4444)),
        ("[::1]:4444", ("::1", 4444)),
        ("unix:/run/x:1", "/run/x:1"),
        ("tcp:vmhost:4444", ("vmhost", 4444)),
    ],
)
def test_qmp_address(text: str, expected: object) -> None:
    assert cli.parse_qmp_address(text) == expected
    assert cli.parse_agent_address(text) == expected


def test_agent_address_vsock_and_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.parse_agent_address("vsock:3:1234") == ("vsock", 3, 1234)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vm1:4444").touch()  # an existing file wins over HOST:PORT
    assert cli.parse_qmp_address("vm1:4444") == "vm1:4444"


@pytest.mark.parametrize(
    "text", ["vsock:3", "vsock:x:1", "vsock:1:2:3", "tcp:nohost", "host:99999", "unix:", ""]
)
def test_bad_addresses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_agent_address(text)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nosuch"],
        ["agent"],
        ["agent", "--agent", "/x", "nosuch"],
        ["agent", "--agent", "/x", "--timeout", "0", "ping"],
        ["agent", "--agent", "/x", "--timeout", "soon", "ping"],
        ["agent", "ping"],  # no --agent and no $QMPAGENT_AGENT
        ["agent", "--agent", "vsock:x:1", "ping"],
        ["agent", "--agent", "/x", "fsfreeze"],
        ["agent", "--agent", "/x", "fsfreeze", "melt"],
        ["agent", "--agent", "/x", "execute", "guest-info", "[1]"],
        ["agent", "--agent", "/x", "--wait-port", "5", "ping"],  # --wait-port needs --qmp
        ["qmp", "execute", "query-status"],  # no --qmp
        ["qmp", "--qmp", "/x", "execute", "query-status", "{not json"],
        ["qmp", "--qmp", "/x", "events", "--count", "0"],
        ["qmp", "--qmp", "/x", "wait-event"],
        ["qmp", "--qmp", "/x", "wait-event", "X", "--match", "true"],
        ["snapshot", "--qmp", "/x"],  # no --disk
        ["snapshot", "--qmp", "/x", "--disk", "disk0"],
        ["snapshot", "--qmp", "/x", "--disk", "=/tmp/a"],
        ["snapshot", "--qmp", "/x", "--disk", "disk0=/tmp/a", "--disk", "disk0=/tmp/b"],
        ["snapshot", "--disk", "disk0=/tmp/a"],  # no --qmp
        ["snapshot", "--qmp", "/x", "--disk", "d=/a", "--quiesce", "maybe"],
        ["snapshot", "--qmp", "/x", "--disk", "d=/a", "--freeze-timeout", "-1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(cli.QMP_ENV, raising=False)
    monkeypatch.delenv(cli.AGENT_ENV, raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and int(ExitCode.USAGE) == 2
    err = capsys.readouterr().err
    assert "usage: qmpagent" in err and "error:" in err


def test_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(EXIT_CODE_HELP) == set(ExitCode)
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for code in ExitCode:
        assert f"  {int(code):<4} {code.name.lower().replace('_', '-')}" in out
    for name in ("agent", "qmp", "snapshot", "demo", "--json", "--debug", "vsock:CID:PORT"):
        assert name in out
    assert all(len(line) <= 100 for line in out.splitlines())


def test_snapshot_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["snapshot", "--help"])
    out = capsys.readouterr().out
    for text in ("--disk NODE=OVERLAY", "--quiesce", "--freeze-timeout", "--thaw-timeout",
                 "preferred", "THE GUEST MAY STILL BE FROZEN", "8    thaw-failed"):
        assert text in out
    assert all(len(line) <= 100 for line in out.splitlines())


@pytest.mark.parametrize(
    "argv",
    [["agent", "--help"], ["agent", "exec", "--help"], ["agent", "fsfreeze", "--help"],
     ["qmp", "--help"], ["qmp", "events", "--help"], ["qmp", "wait-event", "--help"],
     ["demo", "--help"]],
)
def test_subcommand_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: qmpagent")
    assert all(len(line) <= 100 for line in out.splitlines())


def test_options_before_or_after_the_subcommand() -> None:
    parser = cli.build_parser()
    a = parser.parse_args(["--json", "agent", "--agent", "/a", "--timeout", "2", "ping"])
    b = parser.parse_args(["agent", "ping", "--agent", "/a", "--timeout", "2", "--json"])
    for args in (a, b):
        assert args.json is True and args.agent == "/a" and args.timeout == 2.0
        assert args.debug is False and args.qmp is None
    c = parser.parse_args(["agent", "--agent", "/a", "exec", "/bin/sh", "-c", "echo --json"])
    assert c.path == "/bin/sh" and c.args == ["-c", "echo --json"] and c.json is False
    d = parser.parse_args(["snapshot", "--qmp", "h:1", "--disk", "disk0=rel.qcow2"])
    assert d.disk == [("disk0", os.path.abspath("rel.qcow2"))] and d.qmp == ("h", 1)


def test_addresses_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.QMP_ENV, "/run/q.sock")
    monkeypatch.setenv(cli.AGENT_ENV, "vsock:3:1234")
    args = cli.build_parser().parse_args(["agent", "ping"])
    assert args.agent == ("vsock", 3, 1234) and args.qmp == "/run/q.sock"
    args = cli.build_parser().parse_args(["agent", "--agent", "/other", "ping"])
    assert args.agent == "/other"


# --- exit codes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ThawError("x", SnapshotRecord(frozen=1)), ExitCode.THAW_FAILED),
        (SnapshotError("x"), ExitCode.SNAPSHOT_FAILED),
        (UsageError("x"), ExitCode.USAGE),
        (AgentUnavailable("x"), ExitCode.AGENT_UNAVAILABLE),
        (MonitorUnavailable("x"), ExitCode.QMP_UNAVAILABLE),
        (AgentTimeout("x"), ExitCode.TIMEOUT),
        (MonitorTimeout("x"), ExitCode.TIMEOUT),
        (AgentCommandError("guest-x", "CommandNotFound", "no"), ExitCode.COMMAND_ERROR),
        (MonitorCommandError("x", "GenericError", "no"), ExitCode.COMMAND_ERROR),
        (JobError("blockdev-create", "j1", "failed"), ExitCode.COMMAND_ERROR),
        (AgentProtocolError("x"), ExitCode.ERROR),
        (EventOverflow(3), ExitCode.ERROR),
        (MonitorError("x"), ExitCode.ERROR),
        (GuestBuildError("x"), ExitCode.ERROR),
        (RuntimeError("x"), ExitCode.ERROR),
    ],
)
def test_exit_code_for(exc: BaseException, code: ExitCode) -> None:
    assert exit_code_for(exc) is code


def test_exit_codes_are_distinct() -> None:
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    assert int(ExitCode.USAGE) == 2  # argparse's own


def test_unreachable_sockets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--agent", str(tmp_path / "none.sock"), "ping"]) == 3
    err = one_line(capsys.readouterr().err)
    assert err.startswith("qmpagent: error: guest agent unavailable: ") and "none.sock" in err
    assert main(["qmp", "--qmp", str(tmp_path / "none.sock"), "execute", "query-status"]) == 4
    assert one_line(capsys.readouterr().err).startswith("qmpagent: error: QMP unavailable: ")
    assert main(["--json", "snapshot", "--qmp", str(tmp_path / "none.sock"),
                 "--disk", f"disk0={tmp_path}/s.qcow2"]) == 4
    captured = capsys.readouterr()
    error = json.loads(captured.out)["error"]
    assert error["exit_code"] == 4 and error["status"] == "qmp_unavailable"
    assert error["type"] == "MonitorUnavailable" and "none.sock" in error["message"]
    one_line(captured.err)


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--agent", str(tmp_path / "none.sock"), "ping", "--debug"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("qmpagent: error: guest agent unavailable")


class _DummyMonitor:
    async def close(self) -> None:
        return None


@pytest.fixture
def failing_snapshot(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Make the snapshot subcommand's orchestrator raise the exception put in the list."""
    raised: list[BaseException] = []

    async def connect(*args: object, **kwargs: object) -> _DummyMonitor:
        return _DummyMonitor()

    async def snapshot(self: SnapshotOrchestrator, *args: object, **kwargs: object) -> None:
        raise raised[0]

    monkeypatch.setattr(Monitor, "connect", connect)
    monkeypatch.setattr(SnapshotOrchestrator, "snapshot", snapshot)
    return raised


def test_thaw_failure_stands_out(failing_snapshot: list[BaseException],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    record = SnapshotRecord(phase="thaw", freeze_owner="self", frozen=2, snapshot_taken=True,
                            overlays_added=["ov0"])
    failing_snapshot.append(ThawError(
        "thawing the guest failed (guest-fsfreeze-thaw: no reply within 30s): THE GUEST MAY STILL "
        "BE FROZEN; check guest-fsfreeze-status and thaw it (qmpagent agent fsfreeze thaw)", record
    ))
    argv = ["snapshot", "--qmp", "/q", "--agent", "/run/vm1/qga.sock", "--disk", "disk0=/s.qcow2"]
    assert main(argv) == 8 and int(ExitCode.THAW_FAILED) == 8
    err = one_line(capsys.readouterr().err)
    assert err.startswith("qmpagent: THAW FAILED - THE GUEST MAY STILL BE FROZEN (froze 2, thawed 0)")
    assert "`qmpagent agent --agent /run/vm1/qga.sock fsfreeze thaw`" in err
    assert "(guest-fsfreeze-thaw: no reply within 30s); check with " in err
    assert err.count("MAY STILL BE FROZEN") == 1  # the library's own advice is not repeated

    assert main([*argv, "--json"]) == 8
    captured = capsys.readouterr()
    error = json.loads(captured.out)["error"]
    assert error["status"] == "thaw_failed" and error["type"] == "ThawError"
    assert error["record"]["frozen"] == 2 and error["record"]["snapshot_taken"] is True
    one_line(captured.err)


def test_snapshot_failure(failing_snapshot: list[BaseException],
                          capsys: pytest.CaptureFixture[str]) -> None:
    failing_snapshot.append(SnapshotError("quiesce required but not possible: no agent",
                                          SnapshotRecord(phase="preflight")))
    assert main(["snapshot", "--qmp", "/q", "--disk", "disk0=/s.qcow2"]) == 7
    assert one_line(capsys.readouterr().err) == (
        "qmpagent: snapshot failed in preflight: quiesce required but not possible: no agent "
        "(no snapshot was taken)"
    )
    failing_snapshot[0] = SnapshotError("the transaction failed: busy", SnapshotRecord(
        phase="transaction", files_created=["/a.qcow2", "/b.qcow2"], files_removed=["/a.qcow2"]
    ))
    assert main(["snapshot", "--qmp", "/q", "--disk", "disk0=/s.qcow2"]) == 7
    assert one_line(capsys.readouterr().err).endswith(
        "(no snapshot was taken; files left behind: /b.qcow2)"
    )
    failing_snapshot[0] = SnapshotError("the freeze window exceeded freeze_timeout (1s)",
                                        SnapshotRecord(phase="transaction", snapshot_taken=True))
    assert main(["snapshot", "--qmp", "/q", "--disk", "disk0=/s.qcow2"]) == 7
    assert one_line(capsys.readouterr().err).endswith(
        "(the snapshot WAS taken: the VM runs on the new overlays)"
    )
    failing_snapshot[0] = RuntimeError("a bug")
    assert main(["snapshot", "--qmp", "/q", "--disk", "disk0=/s.qcow2"]) == 1
    assert "internal error: RuntimeError: a bug" in one_line(capsys.readouterr().err)


# --- against the fakes, in a subprocess ----------------------------------------------------------


@pytest.fixture
async def fake_agent() -> AsyncIterator[FakeAgent]:
    programs = {"/bin/sh": ExecResult(exitcode=3, stdout=b"out\n", stderr=b"err\n")}
    async with FakeAgent(mountpoints=["/", "/mnt/data"], programs=programs) as agent:
        yield agent


async def test_agent_subcommands_on_the_fake(fake_agent: FakeAgent) -> None:
    a = fake_agent.address
    r = await qmpagent("--json", "agent", "--agent", a, "ping")
    assert r.rc == 0 and r.json()["ok"] is True, r
    r = await qmpagent("agent", "--agent", a, "fsfreeze", "freeze", "--json")
    assert r.rc == 0 and r.json() == {"frozen": 2}, r
    assert fake_agent.frozen_mountpoints == ["/", "/mnt/data"]
    r = await qmpagent("agent", "--agent", a, "fsfreeze", "status")
    assert (r.rc, r.out) == (0, "frozen\n"), r
    r = await qmpagent("agent", "--agent", a, "fsfreeze", "thaw")
    assert (r.rc, r.out) == (0, "thawed 2 filesystem(s)\n"), r
    r = await qmpagent("agent", "--agent", a, "exec", "/bin/sh", "-c", "whatever")
    assert (r.rc, r.out) == (6, "out\n"), r
    assert r.err.startswith("err\nqmpagent: error: /bin/sh (pid ")
    assert r.err.endswith(" in the guest) exited with status 3\n")
    r = await qmpagent("agent", "--agent", a, "--json", "exec", "/bin/echo", "hi", "--json")
    assert r.rc == 0 and r.json()["stdout"] == "hi --json\n" and r.json()["exitcode"] == 0, r


async def test_agent_not_answering(fake_agent: FakeAgent) -> None:
    fake_agent.close_port()  # qemu-ga stopped: requests queue up unanswered
    r = await qmpagent("agent", "--agent", fake_agent.address, "--timeout", "0.5", "ping")
    assert r.rc == ExitCode.AGENT_UNAVAILABLE, r
    assert "guest-sync-delimited" in one_line(r.err)


async def test_agent_command_error(fake_agent: FakeAgent) -> None:
    fake_agent.inject("guest-get-osinfo", AgentFault.error("no such thing", "GenericError"))
    r = await qmpagent("--json", "agent", "--agent", fake_agent.address, "osinfo")
    assert r.rc == ExitCode.COMMAND_ERROR, r
    error = r.json()["error"]
    assert error["command"] == "guest-get-osinfo" and error["error_class"] == "GenericError"
    assert error["desc"] == "no such thing"
    assert one_line(r.err) == "qmpagent: error: guest-get-osinfo: GenericError: no such thing"


async def test_agent_port_check_with_qmp(fake_agent: FakeAgent) -> None:
    async with FakeQMPServer(agent_port_open=False) as qmp:
        args = ("agent", "--agent", fake_agent.address, "--qmp", qmp.address)
        r = await qmpagent(*args, "ping")
        assert r.rc == ExitCode.AGENT_UNAVAILABLE, r
        assert "port is closed in the guest" in one_line(r.err)
        assert not fake_agent.calls()  # nothing was sent to a closed port

        proc = await start(*args, "--wait-port", "30", "ping")
        await qmp.wait_for_command("query-chardev", timeout=30)
        await qmp.set_port_open("qgaport0", True)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        assert out.decode().startswith("ok: the guest agent answers")


async def test_qmp_subcommands_on_the_fake() -> None:
    async with FakeQMPServer() as qmp:
        q = qmp.address
        r = await qmpagent("--json", "qmp", "--qmp", q, "execute", "query-status")
        assert r.rc == 0 and r.json()["status"] == "running", r
        r = await qmpagent("qmp", "--qmp", q, "execute", "qom-get", "-",
                           stdin=b'{"path": "/machine/peripheral/qgaport0", "property": "name"}')
        assert r.rc == 0 and r.out == '"org.qemu.guest_agent.0"\n', r
        r = await qmpagent("qmp", "--qmp", q, "execute", "query-nothing")
        assert r.rc == ExitCode.COMMAND_ERROR and "CommandNotFound" in one_line(r.err), r
        r = await qmpagent("qmp", "--qmp", q, "wait-event", "SHUTDOWN", "--timeout", "0.3")
        assert r.rc == ExitCode.TIMEOUT, r
        assert one_line(r.err) == "qmpagent: error: timeout: no SHUTDOWN event within 0.3s"


async def _emit_until_output(qmp: FakeQMPServer, proc: asyncio.subprocess.Process,
                             name: str, data: dict[str, Any]) -> bytes:
    """Emit an event every 50 ms until the process prints a line (it may subscribe late)."""
    assert proc.stdout is not None

    async def emit() -> None:
        while True:
            await qmp.emit(name, data)
            await asyncio.sleep(0.05)

    emitter = asyncio.create_task(emit())
    try:
        return await asyncio.wait_for(proc.stdout.readline(), 30)
    finally:
        emitter.cancel()


async def test_events_until_sigterm_or_sigint() -> None:
    async with FakeQMPServer() as qmp:
        for sig in (signal.SIGTERM, signal.SIGINT):
            proc = await start("qmp", "--qmp", qmp.address, "events", "--json")
            line = await _emit_until_output(qmp, proc, "BLOCK_IO_ERROR", {"device": "vblk0"})
            event = json.loads(line)
            assert event["event"] == "BLOCK_IO_ERROR" and event["data"] == {"device": "vblk0"}
            assert set(event["timestamp"]) == {"seconds", "microseconds"}
            proc.send_signal(sig)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err  # stopping the stream is how it ends


async def test_events_human_count_and_filter() -> None:
    async with FakeQMPServer() as qmp:
        proc = await start("qmp", "--qmp", qmp.address, "events", "RESET", "--count", "2")
        line = await _emit_until_output(qmp, proc, "RESET", {"guest": True})
        assert line.decode().endswith(' RESET {"guest": true}\n')
        await qmp.emit("STOP")  # filtered out
        await qmp.emit("RESET", {"guest": False})
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err
        assert out.decode().endswith(' RESET {"guest": false}\n') and "STOP" not in out.decode()


async def test_wait_event_interrupted() -> None:
    async with FakeQMPServer() as qmp:
        for sig, code in ((signal.SIGINT, ExitCode.INTERRUPTED), (signal.SIGTERM, ExitCode.TERMINATED)):
            proc = await start("qmp", "--qmp", qmp.address, "wait-event", "SHUTDOWN")
            await qmp.wait_for_command("qmp_capabilities", timeout=30)
            await asyncio.sleep(0.3)
            proc.send_signal(sig)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == code, err
            assert err.decode() in ("qmpagent: interrupted\n", "qmpagent: terminated\n")
            qmp.received.clear()


async def test_wait_event_match() -> None:
    async with FakeQMPServer() as qmp:
        proc = await start("--json", "qmp", "--qmp", qmp.address, "wait-event", "VSERPORT_CHANGE",
                           "--match", '{"open": true}')
        assert proc.stdout is not None

        async def emit() -> None:
            while True:
                await qmp.emit("VSERPORT_CHANGE", {"id": "qgaport0", "open": False})
                await asyncio.sleep(0.05)
                await qmp.emit("VSERPORT_CHANGE", {"id": "qgaport0", "open": True})

        emitter = asyncio.create_task(emit())
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            emitter.cancel()
        assert proc.returncode == 0, err
        assert json.loads(out)["data"] == {"id": "qgaport0", "open": True}


async def test_console_script_and_module() -> None:
    script = Path(sys.executable).parent / "qmpagent"
    if script.exists():
        proc = await asyncio.create_subprocess_exec(
            str(script), "--version", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0 and out.decode().startswith("qmpagent ")
    r = await qmpagent("--version")
    assert r.rc == 0 and r.out.startswith("qmpagent 0.")
