"""``qmpagent recover`` against a FakeVM: after a snapshot process killed in its freeze window, a
freeze that may still be in place, and a snapshot refused because of an unsettled entry."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import anyio
import pytest
from cli_run import qmpagent

from qmpagent import Monitor
from qmpagent.journal import Entry, Journal, identify_vm
from qmpagent.testing import FakeVM

DRIVER = str(Path(__file__).with_name("crash_driver.py"))


async def _killed_in_the_window(vm: FakeVM, journal: Path) -> None:
    """A snapshot process SIGKILLed when its transaction starts (the guest frozen by it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, DRIVER, str(vm.qmp_address), str(vm.agent_address),
        str(vm.workdir / "o.qcow2"), "--disk", "disk0", "--journal", str(journal),
        "--kill", "phase:transaction:start",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    with anyio.fail_after(120):
        assert await proc.wait() == -9
    assert any(isinstance(e, Entry) for e in Journal(journal).scan())


async def test_recover_settles_a_killed_snapshot_then_finds_nothing(
    fake_vm: FakeVM, tmp_path: Path
) -> None:
    await _killed_in_the_window(fake_vm, tmp_path)
    run = await qmpagent("recover", "--qmp", fake_vm.qmp_address, "--agent", fake_vm.agent_address,
                         "--journal", tmp_path)
    assert run.rc == 0, run
    assert run.out.startswith("recovered 1 operation(s)"), run
    assert "UNRESOLVED" not in run.out
    assert not fake_vm.agent.frozen and os.listdir(tmp_path) == []
    assert fake_vm.new_nodes() == set() and fake_vm.new_files() == set()

    again = await qmpagent("recover", "--qmp", fake_vm.qmp_address, "--agent",
                           fake_vm.agent_address, "--journal", tmp_path, "--json")
    assert again.rc == 0, again
    doc = again.json()
    assert doc["clean"] and doc["settled"] == [] and doc["removed_nodes"] == []
    assert doc["thawed"] == 0 and doc["exit_code"] == 0


async def test_recover_without_the_agent_exits_8_and_keeps_the_entry(
    fake_vm: FakeVM, tmp_path: Path
) -> None:
    async with await Monitor.connect(fake_vm.qmp_address) as mon:
        ident = await identify_vm(mon)
    Journal(tmp_path).write(Entry(op="0123456789abcdef", vm=ident, owner_pid=0, owner_start=None,
                                  overlays=[], step="freeze"))
    await fake_vm.stop_agent()
    run = await qmpagent("recover", "--qmp", fake_vm.qmp_address, "--journal", tmp_path, "--json")
    assert run.rc == 8, run
    doc = run.json()
    assert doc["guest_may_be_frozen"] and doc["unresolved"] and doc["exit_code"] == 8

    # A new snapshot on this VM is refused while the entry is unsettled, and says how to settle.
    snap = await qmpagent("snapshot", "--qmp", fake_vm.qmp_address, "--quiesce", "off",
                          "--disk", f"disk0={fake_vm.workdir / 'new.qcow2'}",
                          "--journal", tmp_path)
    assert snap.rc == 7, snap
    assert "snapshot refused in preflight" in snap.err and "qmpagent recover" in snap.err, snap
    assert not (fake_vm.workdir / "new.qcow2").exists()
    assert len(list(Journal(tmp_path).scan())) == 1

    await fake_vm.start_agent()
    run = await qmpagent("recover", "--qmp", fake_vm.qmp_address, "--agent",
                         fake_vm.agent_address, "--journal", tmp_path)
    assert run.rc == 0, run
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [(), ("--qmp", "/nonexistent/qmp.sock")])
async def test_recover_usage_and_unreachable_qmp(args: tuple[str, ...], tmp_path: Path) -> None:
    run = await qmpagent("recover", *args, "--journal", tmp_path)
    assert run.rc == (2 if not args else 4), run
    assert os.listdir(tmp_path) == []
