"""The ``qmpagent`` command line against the real guest (real QEMU, real qemu-ga), run in a
subprocess as a script writer runs it. Several subcommands share each booted guest."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import pytest
from cli_run import Run, one_line, qmpagent, start
from peer_versions import frozen_reason, unsupported_agent_commands

from qmpagent import GuestAgent
from qmpagent.testing import Guest
from qmpagent.testing.fake_agent import AgentFault, FakeAgent
from qmpagent.testing.pytest_plugin import require_guest_image

pytestmark = pytest.mark.real_vm

OK, USAGE, AGENT_UNAVAILABLE, QMP_UNAVAILABLE, TIMEOUT, COMMAND_ERROR = 0, 2, 3, 4, 5, 6
SNAPSHOT_FAILED, THAW_FAILED = 7, 8


async def toggle_agent_while(guest: Guest, running: Callable[[], bool], limit: float = 90.0) -> None:
    """Stop and restart qemu-ga (VSERPORT_CHANGE events) until ``running()`` is false. QEMU
    sends at most one VSERPORT_CHANGE per second per port, hence the pauses."""
    deadline = time.monotonic() + limit
    try:
        while running():
            assert time.monotonic() < deadline, "no event seen"
            await guest.stop_agent()
            await asyncio.sleep(1.1)
            await guest.start_agent()
            await asyncio.sleep(1.1)
    finally:
        await guest.start_agent()


async def run_while_toggling(guest: Guest, *args: object) -> Run:
    proc = await start(*args)
    task: asyncio.Task[tuple[bytes, bytes]] = asyncio.create_task(proc.communicate())
    await toggle_agent_while(guest, lambda: not task.done())
    out, err = await task
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def wait_for_agent(guest: Guest) -> None:
    r = await qmpagent("agent", "--agent", guest.agent_path, "--qmp", guest.qmp_path,
                       "--wait-port", "60", "--timeout", "30", "ping")
    assert r.rc == OK, r


async def test_agent_subcommands(qemu_guest: Guest) -> None:
    g = qemu_guest
    agent: Callable[..., Awaitable[Run]] = lambda *a, **k: qmpagent(  # noqa: E731
        "agent", "--agent", g.agent_path, *a, **k
    )

    r = await agent("ping")
    assert r.rc == OK and r.out.startswith("ok: the guest agent answers ("), r
    r = await qmpagent("--json", "agent", "--agent", g.agent_path, "--qmp", g.qmp_path, "ping")
    assert r.rc == OK and r.json()["ok"] is True and r.json()["seconds"] < 5, r

    r = await agent("info", "--json")
    assert r.rc == OK, r
    info = r.json()
    assert isinstance(info["version"], str)
    names = {c["name"]: c["enabled"] for c in info["supported_commands"]}
    assert names["guest-fsfreeze-freeze"] is True and "guest-exec" in names
    r = await agent("info")
    assert r.rc == OK and r.out.startswith(f"qemu-ga {info['version']}: "), r
    assert "guest-ping" in r.out
    for name in unsupported_agent_commands(g):  # listed but disabled (7.2); absent in 10.0
        assert f"disabled: {name}" in r.out

    # freeze cycle; while frozen, most commands are disabled: a command error
    r = await agent("fsfreeze", "status")
    assert (r.rc, r.out) == (OK, "thawed\n"), r
    r = await agent("--json", "fsfreeze", "freeze")
    assert r.rc == OK and r.json()["frozen"] >= 1, r
    frozen = r.json()["frozen"]
    try:
        r = await agent("--json", "fsfreeze", "status")
        assert r.rc == OK and r.json() == {"status": "frozen"}, r
        r = await agent("osinfo", "--json")
        assert r.rc == COMMAND_ERROR, r
        assert r.json()["error"]["error_class"] == "CommandNotFound"
        assert one_line(r.err).endswith(frozen_reason(g))
    finally:
        r = await agent("fsfreeze", "thaw", "--json")
    assert r.rc == OK and r.json() == {"thawed": frozen}, r
    r = await agent("fsfreeze", "freeze", "--mountpoint", "/nonexistent")
    assert r.rc == OK and r.out.startswith("froze 0 filesystems"), r

    r = await agent("osinfo", "--json")
    assert r.rc == OK and r.json()["machine"] == "x86_64", r
    r = await agent("osinfo")
    assert r.rc == OK and "kernel-release:" in r.out, r
    r = await agent("fsinfo", "--json")
    assert r.rc == OK and "/mnt/data" in [fs["mountpoint"] for fs in r.json()], r
    r = await agent("fsinfo")
    assert r.rc == OK and r.out.startswith("MOUNTPOINT") and "/mnt/data" in r.out, r

    r = await agent("exec", "/bin/sh", "-c", "echo out; echo err >&2")
    assert (r.rc, r.out, r.err) == (OK, "out\n", "err\n"), r
    r = await agent("--json", "exec", "/bin/sh", "-c", "echo out; exit 3")
    assert r.rc == COMMAND_ERROR and r.json()["exitcode"] == 3 and r.json()["stdout"] == "out\n", r
    assert one_line(r.err).endswith("exited with status 3")
    r = await agent("exec", "--stdin", "/bin/cat", stdin=b"hello from the host")
    assert (r.rc, r.out) == (OK, "hello from the host"), r
    r = await agent("exec", "--env", "GREETING=hi", "/bin/sh", "-c", "echo $GREETING")
    assert (r.rc, r.out) == (OK, "hi\n"), r
    r = await agent("exec", "--exec-timeout", "0.5", "/bin/sleep", "5")
    assert r.rc == TIMEOUT and "did not finish in 0.5s" in one_line(r.err), r
    r = await agent("exec", "/nonexistent")
    assert r.rc == COMMAND_ERROR and "Failed to execute child process" in one_line(r.err), r

    r = await agent("--json", "execute", "guest-get-time")
    assert r.rc == OK and isinstance(r.json(), int), r
    r = await agent("execute", "guest-fsfreeze-freeze-list", '{"mountpoints": ["/nonexistent"]}')
    assert (r.rc, r.out) == (OK, "0\n"), r
    r = await agent("execute", "guest-no-such-command")
    assert r.rc == COMMAND_ERROR, r
    assert one_line(r.err) == ("qmpagent: error: guest-no-such-command: CommandNotFound: "
                               "The command guest-no-such-command has not been found")

    # qemu-ga stopped: its port is closed in the guest
    await g.stop_agent()
    started = time.monotonic()
    r = await agent("--qmp", g.qmp_path, "ping")
    assert r.rc == AGENT_UNAVAILABLE and "port is closed" in one_line(r.err), r
    assert time.monotonic() - started < 5  # the port check fails fast, without a timeout
    r = await agent("--timeout", "1", "ping")  # without --qmp: no answer to the sync
    assert r.rc == AGENT_UNAVAILABLE and "guest-sync-delimited" in one_line(r.err), r
    r = await agent("--qmp", g.qmp_path, "--wait-port", "1", "--json", "ping")
    assert r.rc == AGENT_UNAVAILABLE and r.json()["error"]["status"] == "agent_unavailable", r
    proc = await start("agent", "--agent", g.agent_path, "--qmp", g.qmp_path,
                       "--wait-port", "60", "ping")
    await asyncio.sleep(0.5)
    await g.start_agent()
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == OK and out.startswith(b"ok: the guest agent answers"), err

    # last: shut the guest down (QEMU exits: -no-reboot), watched by `qmp events` until QEMU goes
    watcher = await start("--json", "qmp", "--qmp", g.qmp_path, "events", "VSERPORT_CHANGE",
                          "SHUTDOWN")
    assert watcher.stdout is not None
    try:
        first: asyncio.Task[bytes] = asyncio.create_task(watcher.stdout.readline())
        await toggle_agent_while(g, lambda: not first.done())  # the watcher is subscribed now
        assert json.loads(await first)["event"] == "VSERPORT_CHANGE"
        # (the watcher holds the QMP socket: no --qmp port check; the sync waits for qemu-ga)
        r = await agent("--timeout", "60", "shutdown")
        assert r.rc == OK and "guest-shutdown (powerdown) sent" in r.out, r
        out, err = await asyncio.wait_for(watcher.communicate(), 60)
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
    *_, shutdown, error = [json.loads(line) for line in out.splitlines()]
    assert shutdown["event"] == "SHUTDOWN" and shutdown["data"]["reason"] == "guest-shutdown"
    # the stream ends when QEMU goes away
    assert watcher.returncode == QMP_UNAVAILABLE and error["error"]["status"] == "qmp_unavailable"
    assert one_line(err.decode()).startswith("qmpagent: error: QMP unavailable: ")
    deadline = time.monotonic() + 60
    while g.returncode is None:
        assert time.monotonic() < deadline, "the guest did not power off"
        await asyncio.sleep(0.1)
    r = await qmpagent("qmp", "--qmp", g.qmp_path, "--connect-timeout", "2",
                       "execute", "query-status")
    assert r.rc == QMP_UNAVAILABLE, r


async def test_qmp_subcommands(qemu_guest: Guest) -> None:
    g = qemu_guest
    q = ("qmp", "--qmp", g.qmp_path)

    r = await qmpagent(*q, "execute", "query-status")
    assert r.rc == OK and json.loads(r.out)["status"] == "running", r
    assert r.out.startswith("{\n  ")  # pretty for humans
    r = await qmpagent("--json", *q, "execute", "query-status")
    assert r.rc == OK and r.json()["running"] is True and r.out.count("\n") == 1, r
    r = await qmpagent(*q, "execute", "qom-get",
                       '{"path": "/machine/peripheral/qgaport0", "property": "name"}')
    assert (r.rc, r.out) == (OK, '"org.qemu.guest_agent.0"\n'), r
    r = await qmpagent(*q, "--json", "execute", "query-block", "-", stdin=b"{}")
    assert r.rc == OK and any(d["qdev"].endswith("vblk0/virtio-backend") for d in r.json()), r

    r = await qmpagent(*q, "execute", "query-no-such-command")
    assert r.rc == COMMAND_ERROR, r
    assert one_line(r.err) == ("qmpagent: error: query-no-such-command: CommandNotFound: "
                               "The command query-no-such-command has not been found")
    r = await qmpagent(*q, "--json", "execute", "blockdev-del", '{"node-name": "nosuch"}')
    assert r.rc == COMMAND_ERROR and r.json()["error"]["error_class"] == "GenericError", r
    r = await qmpagent(*q, "execute", "query-status", "{bad json")
    assert r.rc == USAGE and "not valid JSON" in r.err, r
    r = await qmpagent(*q, "wait-event", "SHUTDOWN", "--timeout", "0.5")
    assert r.rc == TIMEOUT, r
    assert one_line(r.err) == "qmpagent: error: timeout: no SHUTDOWN event within 0.5s"

    # events, JSON lines: real VSERPORT_CHANGE from stopping and restarting qemu-ga
    r = await run_while_toggling(g, "--json", *q, "events", "VSERPORT_CHANGE", "--count", "2")
    assert r.rc == OK, r
    events = [json.loads(line) for line in r.out.splitlines()]
    assert len(events) == 2
    for event in events:
        assert event["event"] == "VSERPORT_CHANGE" and event["data"]["id"] == "qgaport0"
        assert isinstance(event["timestamp"]["seconds"], int)
    # human lines
    r = await run_while_toggling(g, *q, "events", "--count", "1")
    assert r.rc == OK and " VSERPORT_CHANGE {" in r.out and r.out.count("\n") == 1, r
    # wait-event with a match
    r = await run_while_toggling(g, "--json", *q, "wait-event", "VSERPORT_CHANGE",
                                 "--match", '{"open": false}', "--timeout", "90")
    assert r.rc == OK and r.json()["data"] == {"id": "qgaport0", "open": False}, r
    # --duration ends the stream with status 0
    started = time.monotonic()
    r = await qmpagent(*q, "events", "--duration", "1")
    assert r.rc == OK and time.monotonic() - started < 10, r


async def test_snapshot_subcommand(qemu_guest: Guest) -> None:
    g = qemu_guest
    snap = ("snapshot", "--qmp", g.qmp_path, "--agent", g.agent_path)
    overlay1 = g.workdir / "snap1.qcow2"

    r = await qmpagent(*snap, "--disk", f"disk0={overlay1}")
    assert r.rc == OK, r
    lines = r.out.splitlines()
    assert [line.split()[0] for line in lines[:6]] == [
        "preflight", "prepare", "freeze", "transaction", "thaw", "total"
    ]
    assert lines[6].startswith("Snapshot taken, quiesced: froze 1 filesystem(s), thawed 1; "
                               "freeze window ")
    assert lines[7].startswith(f"  disk0 -> {overlay1} (node ")
    assert overlay1.exists() and r.err == ""

    # disk0 now backs the new overlay: address the disk by its device id (vblk0) from now on;
    # a relative overlay path is relative to the caller, not to QEMU
    r = await qmpagent("--json", *snap, "--disk", "vblk0=snap2.qcow2", cwd=g.workdir)
    assert r.rc == OK, r
    result = r.json()
    assert result["quiesced"] is True and result["freeze_owner"] == "self", result
    assert result["frozen"] == result["thawed"] == 1 and 0 < result["freeze_window"] < 10
    assert list(result["files"].values()) == [str(g.workdir / "snap2.qcow2")]
    assert set(result["timings"]) >= {"preflight", "prepare", "freeze", "transaction", "thaw"}
    assert (g.workdir / "snap2.qcow2").exists()

    r = await qmpagent(*snap, "--disk", f"vblk0={overlay1}")
    assert r.rc == USAGE and "already exists" in one_line(r.err), r
    r = await qmpagent(*snap, "--disk", f"nosuchdisk={g.workdir}/x.qcow2")
    assert r.rc == USAGE and "nosuchdisk" in one_line(r.err), r

    # frozen beforehand by someone else: snapshot without freeze or thaw, left frozen
    r = await qmpagent("agent", "--agent", g.agent_path, "fsfreeze", "freeze")
    assert r.rc == OK, r
    try:
        r = await qmpagent(*snap, "--disk", f"vblk0={g.workdir}/snap3.qcow2")
        assert r.rc == OK and "freeze owner: external" in r.out and "left frozen" in r.out, r
        r = await qmpagent("agent", "--agent", g.agent_path, "fsfreeze", "status")
        assert r.out == "frozen\n", r
    finally:
        r = await qmpagent("agent", "--agent", g.agent_path, "fsfreeze", "thaw")
    assert r.rc == OK, r

    # qemu-ga stopped: required fails (no snapshot), preferred and off take a crash-consistent one
    await g.stop_agent()
    try:
        overlay4 = g.workdir / "snap4.qcow2"
        r = await qmpagent("--json", *snap, "--disk", f"vblk0={overlay4}")
        assert r.rc == SNAPSHOT_FAILED, r
        assert one_line(r.err).startswith("qmpagent: snapshot failed in preflight: quiesce "
                                          "required but not possible: ")
        assert one_line(r.err).endswith("(no snapshot was taken)")
        error = r.json()["error"]
        assert error["status"] == "snapshot_failed" and error["record"]["snapshot_taken"] is False
        assert not overlay4.exists()
        r = await qmpagent(*snap, "--disk", f"vblk0={overlay4}", "--quiesce", "preferred")
        assert r.rc == OK and "Snapshot taken, NOT quiesced (crash-consistent): " in r.out, r
        assert "port is closed" in r.out
        r = await qmpagent("--json", "snapshot", "--qmp", g.qmp_path, "--quiesce", "off",
                           "--disk", f"vblk0={g.workdir}/snap5.qcow2")
        assert r.rc == OK and r.json()["quiesced"] is False, r
        assert r.json()["reason"] == "quiesce is off"
    finally:
        await g.start_agent()
    await wait_for_agent(g)

    # A thaw that fails (from a fake agent: a real qemu-ga thaws): the guest MAY STILL BE FROZEN
    async with FakeAgent() as fake:
        fake.inject("guest-fsfreeze-thaw", AgentFault.error("injected thaw failure"), times=None)
        r = await qmpagent("--json", "snapshot", "--qmp", g.qmp_path, "--agent", fake.address,
                           "--disk", f"vblk0={g.workdir}/snap6.qcow2", "--thaw-timeout", "1")
        assert r.rc == THAW_FAILED, r
        line = one_line(r.err)
        assert line.startswith("qmpagent: THAW FAILED - THE GUEST MAY STILL BE FROZEN (froze 1, "
                               "thawed 0): ")
        assert "injected thaw failure" in line
        assert f"`qmpagent agent --agent {fake.address} fsfreeze thaw`" in line
        error = r.json()["error"]
        assert error["exit_code"] == THAW_FAILED and error["type"] == "ThawError"
        assert error["record"]["frozen"] == 1 and error["record"]["snapshot_taken"] is True
        assert fake.frozen_mountpoints == ["/"]

        # SIGTERM (twice) while our thaw is in flight: the thaw is not abandoned, and as the
        # snapshot is complete by then, it is reported as taken
        fake.clear_faults()
        await fake_thaw(fake)
        fake.inject("guest-fsfreeze-thaw", AgentFault.delay(1.5))
        proc = await start("snapshot", "--qmp", g.qmp_path, "--agent", fake.address,
                           "--disk", f"vblk0={g.workdir}/snap7.qcow2")
        await fake.wait_for_call("guest-fsfreeze-thaw", count=len(fake.calls("guest-fsfreeze-thaw")) + 1,
                                 timeout=60)
        assert fake.frozen_mountpoints == ["/"]
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)  # ignored while it thaws
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == OK, err
        assert b"Snapshot taken, quiesced: froze 1 filesystem(s), thawed 1" in out
        assert err == b"qmpagent: still cleaning up (a thaw of ours is never skipped); please wait\n"
        assert fake.frozen_mountpoints == []

        # SIGTERM before the freeze (in preflight): no snapshot, no freeze, exit 143
        fake.clear_faults()
        fake.inject("guest-info", AgentFault.delay(2.0))
        proc = await start("snapshot", "--qmp", g.qmp_path, "--agent", fake.address,
                           "--disk", f"vblk0={g.workdir}/snap8.qcow2")
        await fake.wait_for_call("guest-info", count=len(fake.calls("guest-info")) + 1, timeout=60)
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert (proc.returncode, out, err) == (143, b"", b"qmpagent: terminated\n")
        assert not (g.workdir / "snap8.qcow2").exists()
        assert fake.frozen_mountpoints == [] and fake.total_frozen == 2


async def fake_thaw(fake: FakeAgent) -> None:
    async with await GuestAgent.connect(fake.address) as ga:
        await ga.fsfreeze_thaw()


async def test_sigterm_during_the_freeze_leaves_the_guest_thawed(qemu_guest: Guest) -> None:
    g = qemu_guest
    async with FakeAgent() as fake:
        # The freeze takes effect at once but its reply comes late: SIGTERM lands in between.
        fake.inject("guest-fsfreeze-freeze", AgentFault.delay(2.0, effect_first=True))
        proc = await start("snapshot", "--qmp", g.qmp_path, "--agent", fake.address,
                           "--disk", f"vblk0={g.workdir}/snap1.qcow2")
        await fake.wait_for_call("guest-fsfreeze-freeze", timeout=60)
        await asyncio.sleep(0.3)
        assert fake.frozen_mountpoints == ["/"]
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 143, err
        assert fake.frozen_mountpoints == []


async def test_demo_subcommand() -> None:
    require_guest_image()  # skip (fail under CI) where the test guest cannot be built
    r = await qmpagent("--json", "demo")
    assert r.rc == OK, r
    report = r.json()
    assert report["result"]["quiesced"] is True and report["result"]["freeze_owner"] == "self"
    assert report["fsck"]["returncode"] == 0 and report["writer_resumed"] is True
    r = await qmpagent("demo", "--quiesce", "off")
    # not quiesced: e2fsck of the crash-consistent image may find the journal to replay (exit 1)
    assert r.rc in (OK, 1), r
    assert "Snapshot: NOT quiesced (quiesce is off)" in r.out
    assert "e2fsck -fn of the snapshot's base image: " in r.out


async def test_export_subcommand_serves_the_frozen_view_to_a_reader(qemu_guest: Guest) -> None:
    """``qmpagent export ... -- COMMAND``: the reader (here ``qemu-img convert`` of the NBD URI)
    copies the view of the freeze while the guest writes on; then everything is removed."""
    from qmpagent import Monitor
    from qmpagent.testing import WriterLog, read_backup_file

    g = qemu_guest
    await g.wait_writer_progress(await g.uptime() + 0.3)
    image, out = g.workdir / "fleece.qcow2", g.workdir / "pulled.raw"
    reader = ("import json, os, subprocess, sys; subprocess.run([*json.loads(sys.argv[1]), "
              "'convert', '-f', 'raw', '-O', 'raw', os.environ['QMPAGENT_NBD_URI'], sys.argv[2]], "
              "check=True)")
    r = await qmpagent("export", "--qmp", g.qmp_path, "--agent", g.agent_path,
                       "--disk", f"vblk0={image}", "--socket", g.workdir / "nbd.sock",
                       "--", sys.executable, "-c", reader, json.dumps(list(g.command("qemu-img"))),
                       out, timeout=300)
    assert r.rc == OK, r
    assert r.out.startswith("Exported the frozen view, quiesced: froze 1 filesystem(s), thawed 1"), r
    after = await g.uptime()
    text, fsck = await read_backup_file(out, "/writer.log", g.workdir / "pulled.scratch",
                                        qemu_img=g.command("qemu-img"))
    assert fsck is None, fsck
    entries = WriterLog.parse(text).entries
    assert entries and entries[-1][1] < after  # the view of before the command ended
    assert not image.exists()
    async with await Monitor.connect(g.qmp_path) as mon:
        assert await mon.execute("query-block-exports") == []
        assert await mon.execute("query-jobs") == []
        assert not [n for n in await mon.named_block_nodes() if "fleece" in (n.filename or "")]
    out.unlink()
