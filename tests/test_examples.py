"""Every script in examples/ runs as written: against a guest booted by the fixture (socket paths
as arguments), and on its own with ``--demo`` (it boots the built-in test guest itself)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from peer_versions import agent_version_prefix

from qmpagent.testing import Guest
from qmpagent.testing.pytest_plugin import require_guest_image

pytestmark = pytest.mark.real_vm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


async def start(script: str, *args: object) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / script), *map(str, args),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def run(script: str, *args: object, timeout: float = 180.0) -> tuple[int, str, str]:
    proc = await start(script, *args)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_every_example_is_tested() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")} - {"test_with_fakes.py"}
    assert scripts == {"agent_commands.py", "quiesced_snapshot.py", "snapshot_lifecycle.py",
                       "watch_events.py"}


async def test_examples_against_a_guest(qemu_guest: Guest) -> None:
    g = qemu_guest

    rc, out, err = await run("agent_commands.py", "--agent", g.agent_path, "--qmp", g.qmp_path)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"agent: qemu-ga {agent_version_prefix(g)}")
    assert lines[0].endswith("freeze enabled")
    assert "filesystems: thawed" in lines and "mounted: /mnt/data (ext4 on vda)" in lines
    assert "exec: exit 0, output: Linux " in out and "uptime: " in out

    overlay = g.workdir / "example.snap1.qcow2"
    rc, out, err = await run("quiesced_snapshot.py", "--qmp", g.qmp_path, "--agent", g.agent_path,
                             "--disk", f"disk0={overlay}")
    assert rc == 0, err
    assert out.startswith("quiesced snapshot: froze 1 filesystem(s), thawed 1, freeze owner self")
    assert f"disk0 -> {overlay} (new active node " in out and overlay.exists()
    rc, out, err = await run("quiesced_snapshot.py", "--qmp", g.qmp_path, "--agent", g.agent_path,
                             "--disk", f"disk0={g.workdir}/again.qcow2")
    assert rc == 1 and err.startswith("snapshot failed in transaction: "), (out, err)

    # snapshot_lifecycle: snapshot -> copy of the base -> commit back (on top of the above)
    rc, out, err = await run("snapshot_lifecycle.py", "--qmp", g.qmp_path, "--agent", g.agent_path,
                             "--disk", "vblk0", "--overlay", g.workdir / "cycle.qcow2",
                             "--copy", g.workdir / "copy.qcow2")
    assert rc == 0, (out, err)
    assert out.startswith(f"chain before: {overlay_node(out)} -> disk0 -> ")
    assert "snapshot: froze 1 filesystem(s), thawed 1" in out
    assert f"to {g.workdir}/copy.qcow2 in " in out and (g.workdir / "copy.qcow2").exists()
    assert f"removed files {g.workdir}/cycle.qcow2" in out
    assert not (g.workdir / "cycle.qcow2").exists()

    # watch_events: VSERPORT_CHANGE from stopping and restarting qemu-ga (at most one event a
    # second per port, so keep toggling until the watcher has seen one)
    proc = await start("watch_events.py", "--qmp", g.qmp_path, "--count", "1", "VSERPORT_CHANGE")
    task: asyncio.Task[tuple[bytes, bytes]] = asyncio.create_task(proc.communicate())
    await _toggle_agent_while(g, lambda: not task.done())
    out_b, err_b = await task
    assert proc.returncode == 0, err_b
    assert b' VSERPORT_CHANGE {"' in out_b and b'"id": "qgaport0"' in out_b
    rc, out, err = await run("watch_events.py", "--qmp", g.qmp_path, "--duration", "0.5")
    assert rc == 0, err

    # the agent stopped: agent_commands says so (the port check), without waiting for a timeout
    await g.stop_agent()
    try:
        rc, out, err = await run("agent_commands.py", "--agent", g.agent_path, "--qmp", g.qmp_path)
        assert rc == 1 and err == "the guest agent is not running (its port is closed)\n", err
        rc, out, err = await run("quiesced_snapshot.py", "--qmp", g.qmp_path, "--agent",
                                 g.agent_path, "--disk", f"vblk0={g.workdir}/s2.qcow2",
                                 "--quiesce", "preferred")
        assert rc == 0 and out.startswith("crash-consistent snapshot (not quiesced): "), err
    finally:
        await g.start_agent()


def overlay_node(out: str) -> str:
    """The first node of the "chain before:" line (the earlier snapshot's overlay)."""
    return out.split("\n", 1)[0].split(": ", 1)[1].split(" -> ")[0]


async def _toggle_agent_while(guest: Guest, running: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 90
    try:
        while running():
            assert time.monotonic() < deadline, "no event seen"
            await guest.stop_agent()
            await asyncio.sleep(1.1)
            await guest.start_agent()
            await asyncio.sleep(1.1)
    finally:
        with contextlib.suppress(Exception):
            await guest.start_agent()


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("agent_commands.py", ["agent: qemu-ga {agent}", "mounted: /mnt/data (ext4 on vda)"]),
        ("quiesced_snapshot.py", ["quiesced snapshot: froze 1 filesystem(s), thawed 1, "
                                  "freeze owner self", "disk0 -> "]),
        ("snapshot_lifecycle.py", ["chain before: disk0 -> ", "snapshot: froze 1 filesystem(s)",
                                   "commit: ", " merged into disk0 in ", "chain after: disk0 -> "]),
        ("watch_events.py", [" STOP {}", " RESUME {}", ' VSERPORT_CHANGE {"open": false, ',
                             ' VSERPORT_CHANGE {"open": true, ']),
    ],
)
async def test_example_demo(script: str, expected: list[str]) -> None:
    require_guest_image()  # skip (fail under CI) where the test guest cannot be built
    rc, out, err = await run(script, "--demo")
    assert rc == 0, err
    assert out.startswith("booting the built-in test guest")
    for text in expected:
        if "{agent}" in text:
            text = text.format(agent=agent_version_prefix())
        assert text in out, out
