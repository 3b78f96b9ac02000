"""``qmpagent export`` (pull mode over NBD) against the fake VM, in a subprocess: ``-- COMMAND``
with the URIs in its environment and its exit status passed on, serving until SIGTERM, and
everything torn down on every path."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from cli_run import clean_env, qmpagent, start

from qmpagent.cli import main
from qmpagent.cli.cmd_export import URI_ENV, URIS_ENV
from qmpagent.testing import FakeVM

# What the child sees of the export, printed as one JSON line.
SHOW_ENV = (f"import json, os, sys; print(json.dumps({{'uri': os.environ.get('{URI_ENV}'), "
            f"'uris': json.loads(os.environ['{URIS_ENV}'])}})); sys.exit(int(sys.argv[1]))")


def env(state: Path) -> dict[str, str]:
    return {**clean_env(), "XDG_STATE_HOME": str(state)}


def assert_torn_down(vm: FakeVM) -> None:
    assert vm.qmp.backups.nbd_server is None and not vm.qmp.backups.exports
    assert vm.new_nodes() == set() and not vm.new_files() and not vm.qmp.jobs
    assert not vm.agent.frozen


@pytest.mark.parametrize("status", [0, 3])
async def test_command_runs_with_the_uris_and_its_status_is_passed_on(tmp_path: Path, status: int) -> None:
    async with FakeVM(disks=2) as vm:
        sock = tmp_path / "nbd.sock"
        r = await qmpagent("export", "--qmp", vm.qmp_address, "--agent", vm.agent_address,
                           "--disk", f"vblk0={tmp_path / 'f0.qcow2'}", "--socket", sock,
                           "--", sys.executable, "-c", SHOW_ENV, status, env=env(tmp_path))
        assert r.rc == status, r
        lines = r.out.splitlines()
        assert lines[0].startswith("Exported the frozen view, quiesced: froze 2 filesystem(s), thawed 2")
        assert lines[1] == f"  vblk0: nbd+unix:///vblk0?socket={sock}"
        seen = json.loads(lines[-1])
        assert seen == {"uri": f"nbd+unix:///vblk0?socket={sock}",
                        "uris": {"vblk0": f"nbd+unix:///vblk0?socket={sock}"}}
        (tx,) = vm.transactions
        assert tx.guest_frozen and [a["data"]["sync"] for a in tx.actions] == ["none"]
        assert_torn_down(vm)
        # Two disks: no single URI, both in the JSON object; --json prints the result first.
        r = await qmpagent("--json", "export", "--qmp", vm.qmp_address, "--agent", vm.agent_address,
                           "--disk", f"vblk0={tmp_path / 'f0.qcow2'}",
                           "--disk", f"vblk1={tmp_path / 'f1.qcow2'}", "--socket", sock,
                           "--", sys.executable, "-c", SHOW_ENV, "0", env=env(tmp_path))
        assert r.rc == 0, r
        first, child = (json.loads(line) for line in r.out.splitlines())
        assert first["quiesced"] and set(first["uris"]) == {"vblk0", "vblk1"}
        assert child["uri"] is None and child["uris"] == first["uris"]
        assert_torn_down(vm)


async def test_serves_until_sigterm(tmp_path: Path) -> None:
    async with FakeVM() as vm:
        proc = await start("--json", "export", "--qmp", vm.qmp_address, "--agent", vm.agent_address,
                           "--disk", f"vblk0={tmp_path / 'f.qcow2'}", "--socket", tmp_path / "nbd.sock",
                           env=env(tmp_path))
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert json.loads(line)["uris"]["vblk0"].startswith("nbd+unix:///vblk0?socket=")
        assert len(vm.qmp.backups.exports) == 1 and vm.qmp.jobs  # open while it serves
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 143, err
        assert_torn_down(vm)


async def test_a_command_that_cannot_run_exits_127_or_126_and_tears_down(tmp_path: Path) -> None:
    not_executable = tmp_path / "not-executable"
    not_executable.write_text("#!/bin/sh\n")
    async with FakeVM() as vm:
        for program, status in ((tmp_path / "no-such-program", 127), (not_executable, 126)):
            r = await qmpagent("export", "--qmp", vm.qmp_address, "--agent", vm.agent_address,
                               "--disk", f"vblk0={tmp_path / 'f.qcow2'}", "--socket", tmp_path / "s",
                               "--", program, env=env(tmp_path))
            assert r.rc == status, r
            assert "cannot run" in r.err and program.name in r.err
            assert_torn_down(vm)


async def test_a_stop_reaches_every_process_of_the_command(tmp_path: Path) -> None:
    """SIGTERM to qmpagent: the command's whole process group is stopped (here the shell and
    the reader it started), then the export is torn down."""
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"
    async with FakeVM() as vm:
        proc = await start("export", "--qmp", vm.qmp_address, "--agent", vm.agent_address,
                           "--disk", f"vblk0={tmp_path / 'f.qcow2'}", "--socket", tmp_path / "s",
                           "--", "sh", "-c", script, env=env(tmp_path))
        async with asyncio.timeout(60):
            while not pids.exists():  # noqa: ASYNC110 - a condition, bounded
                await asyncio.sleep(0.05)
        reader = int(pids.read_text())
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 143, err
        with pytest.raises(ProcessLookupError):  # gone (and reaped by its parent's end)
            for _ in range(100):
                os.kill(reader, 0)
                await asyncio.sleep(0.05)
        assert_torn_down(vm)


async def test_a_closed_stdout_still_runs_the_command(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    read_end, write_end = os.pipe()
    os.close(read_end)  # whoever reads our output has gone before the first line
    try:
        async with FakeVM() as vm:
            proc = await start("export", "--qmp", vm.qmp_address, "--agent", vm.agent_address,
                               "--disk", f"vblk0={tmp_path / 'f.qcow2'}", "--socket", tmp_path / "s",
                               "--", "sh", "-c", f"touch {ran}", env=env(tmp_path), stdout=write_end)
            _, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err
            assert ran.exists()
            assert_torn_down(vm)
    finally:
        os.close(write_end)


async def test_a_failed_set_up_exits_10_and_leaves_nothing(tmp_path: Path) -> None:
    async with FakeVM() as vm:
        vm.qmp.fail("nbd-server-start", "Failed to bind socket: Permission denied")
        r = await qmpagent("export", "--qmp", vm.qmp_address, "--agent", vm.agent_address,
                           "--disk", f"vblk0={tmp_path / 'f.qcow2'}", "--socket", tmp_path / "s",
                           "--", "true", env=env(tmp_path))
        assert r.rc == 10, r
        assert "Permission denied" in r.err and r.out == ""
        assert_torn_down(vm)


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "--disk", "d=/a", "--socket", "/s"],  # no --qmp
        ["export", "--qmp", "/x", "--disk", "d=/a", "--disk", "d=/b", "--socket", "/s"],
        ["export", "--qmp", "/x", "--disk", "d=/a"],  # no --socket
        ["export", "--qmp", "/x", "--socket", "/s"],  # no --disk
        ["export", "--qmp", "/x", "--disk", "d=/a", "--socket", "/s", "--"],  # -- and no COMMAND
    ],
)
def test_usage_errors(argv: list[str], monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("QMPAGENT_QMP", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: qmpagent" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["shutdown", "kill"])
async def test_qemu_gone_while_serving_leaves_no_image(tmp_path: Path, how: str) -> None:
    from qmpagent import GuestAgent

    async with FakeVM() as vm:
        image = tmp_path / "f.qcow2"
        proc = await start("--json", "export", "--qmp", vm.qmp_address, "--agent", vm.agent_address,
                           "--disk", f"vblk0={image}", "--socket", tmp_path / "nbd.sock",
                           env=env(tmp_path))
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 60)
        assert image.exists()
        if how == "shutdown":  # the guest powers off; QEMU exits after SHUTDOWN
            async with await GuestAgent.connect(vm.agent_address) as ga:
                await ga.shutdown()
        else:  # QEMU dies without an event
            await vm.kill()
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        if how == "shutdown":
            assert proc.returncode == 0, err
            assert b"the VM shut down: ending the export" in err
        else:
            assert proc.returncode == 4, err  # QMP unavailable
        # Nothing holds the fleecing image any more, and nothing else would remove it.
        assert not image.exists()
