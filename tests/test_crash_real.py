"""The orchestrator's process dies (SIGKILL) at every phase boundary and inside each step, on
the real guest: the freeze guard thaws what may be ours within 1 s and never what is not;
``recover`` leaves nothing of ours (issue 13).

One guest serves the whole module (a case leaves it thawed, on a consistent chain, with
nothing of ours but the overlays that became its active layers); each case runs the
orchestrator in a child process (``tests/crash_driver.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
import pytest_asyncio

from qmpagent import FreezeStatus, GuestAgent, Monitor, recover
from qmpagent.journal import Journal
from qmpagent.testing import Guest, boot_guest
from qmpagent.testing.demo import check_image_fsck
from qmpagent.testing.pytest_plugin import require_guest_image

pytestmark = [pytest.mark.real_vm, pytest.mark.asyncio(loop_scope="module")]

DRIVER = str(Path(__file__).with_name("crash_driver.py"))


@dataclass
class Rig:
    guest: Guest
    journal: Path
    #: Our nodes that are (now) part of the VM's chain: qcow2 node names.
    chain: set[str] = field(default_factory=set)
    #: The VM's active image file (the base of the next snapshot).
    active_file: str = ""
    n: int = 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    require_guest_image()
    async with boot_guest() as guest:
        r = Rig(guest, tmp_path_factory.mktemp("journal"), active_file=str(guest.disk.overlay))
        yield r


def guard_pids(parent: int) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (any(b"qmpagent._guard_main" in a for a in argv) and b"--parent" in argv
                and argv[argv.index(b"--parent") + 1] == str(parent).encode()):
            found.append(int(pid))
    return found


@dataclass
class Run:
    rc: int
    events: list[dict[str, Any]]
    stderr: str
    overlay: Path
    started_uptime: float
    guard_record: dict[str, Any] | None

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == name), None)

    @property
    def killed(self) -> bool:
        return self.event("kill") is not None


async def drive(r: Rig, *args: str, quiesce: str = "required") -> Run:
    r.n += 1
    overlay = r.guest.workdir / f"crash{r.n}.qcow2"
    started = await r.guest.uptime()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, DRIVER, str(r.guest.qmp_path), str(r.guest.agent_path), str(overlay),
        "--quiesce", quiesce, "--journal", str(r.journal), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    with anyio.fail_after(180):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    # The guard acts (if it must) and exits by itself, promptly.
    with anyio.fail_after(30):
        while guard_pids(proc.pid):  # noqa: ASYNC110 - a condition, bounded
            await asyncio.sleep(0.02)
    events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    record = None
    for path in r.journal.glob("*.guard.json"):
        record = json.loads(path.read_text())
    return Run(proc.returncode, events, err.decode(errors="replace"), overlay, started, record)


async def agent_status(r: Rig) -> FreezeStatus:
    async with await GuestAgent.connect(r.guest.agent_path, timeout=30) as ga:
        return await ga.fsfreeze_status()


async def our_nodes(mon: Monitor) -> set[str]:
    return {n.node_name for n in await mon.named_block_nodes() if n.node_name.startswith("qa")}


async def settle_and_check(r: Rig, run: Run, *, froze: bool, guard: tuple[str, ...] = ()) -> None:
    """After a run: thawed within 1 s (if we froze), recover, nothing of ours left, writer log."""
    kill = run.event("kill")
    sent = run.event("freeze-sent")
    if run.killed and froze and sent is not None:
        # The guard saw the death and wrote what it did (thawed, or: nothing of ours frozen).
        rec = run.guard_record
        assert rec is not None, f"the guard did not act: {run.stderr}"
        assert rec["result"] in ("thawed", "not-frozen"), rec
        assert kill is not None
        assert rec["at"] - kill["at"] < 1.0, (rec, kill)
        if guard:
            assert rec["result"] in guard, rec
        if rec["result"] == "thawed":
            assert rec["thawed"] == 1
    assert await agent_status(r) is FreezeStatus.THAWED
    async with await Monitor.connect(r.guest.qmp_path) as mon:
        report = await recover(mon, agent=str(r.guest.agent_path), journal_dir=r.journal)
        assert report.clean, report.render()
        assert report.exit_code == 0
        assert report.thawed == 0  # the guard had already thawed what had to be
        again = await recover(mon, agent=str(r.guest.agent_path), journal_dir=r.journal)
        assert again.clean and not again.changed, again.render()  # idempotent
        result = run.event("result")
        applied = bool(report.kept_overlays) or result is not None
        if result is not None:
            r.chain |= set(result["overlays"].values())
        r.chain |= set(report.kept_overlays)
        nodes = await our_nodes(mon)
        chain_and_files = r.chain | {"f".join(n.rsplit("o", 1)) for n in r.chain}
        assert nodes == chain_and_files, (nodes, r.chain)
    assert list(r.journal.iterdir()) == [], list(r.journal.iterdir())
    assert run.overlay.exists() == applied
    if applied:
        base, r.active_file = r.active_file, str(run.overlay)
        fsck = await check_image_fsck(base, str(r.guest.workdir / "fsck.raw"))
        assert fsck.clean, fsck.output
    # The writer never stalled longer than the window (freeze written -> killed) plus 1 s.
    wlog = await r.guest.wait_writer_progress(await r.guest.uptime() + 0.2)
    gap = wlog.largest_gap(after=run.started_uptime)
    window = (kill["at"] - sent["at"]) if (kill and sent) else 0.0
    assert gap <= window + 1.0, (gap, window)


# --- SIGKILL at each point --------------------------------------------------------------------

# (where, whether our freeze was sent, what the guard's record must say)
KILL_POINTS: list[tuple[str, bool, tuple[str, ...]]] = [
    ("phase:preflight:start", False, ()),
    ("phase:preflight:end", False, ()),
    ("qmp:blockdev-create:1", False, ()),  # the file job in flight
    ("qmp:blockdev-add:1", False, ()),  # the file node
    ("qmp:blockdev-create:2", False, ()),  # the qcow2 job
    ("qmp:blockdev-add:2", False, ()),  # the qcow2 node (backing: null)
    ("phase:prepare:end", False, ()),
    ("phase:freeze:start", False, ()),  # the journal says "freeze"; not written yet
    ("agent:freeze", True, ("thawed",)),  # freeze in flight
    ("phase:transaction:start", True, ("thawed",)),  # inside the window
    ("qmp:transaction:1", True, ("thawed",)),  # transaction in flight
    ("agent:thaw", True, ("not-frozen", "thawed")),  # thaw in flight
    ("phase:thaw:end", True, ("not-frozen",)),  # thawed and disarmed: the guard says so
]


@pytest.mark.parametrize(("point", "froze", "guard"), KILL_POINTS, ids=[p for p, _, _ in KILL_POINTS])
async def test_sigkill(rig: Rig, point: str, froze: bool, guard: tuple[str, ...]) -> None:
    run = await drive(rig, "--kill", point)
    assert run.killed, (run.events, run.stderr)
    assert (run.event("freeze-sent") is not None) == froze
    await settle_and_check(rig, run, froze=froze, guard=guard)


async def test_sigkill_in_the_window_of_a_foreign_agent_freeze(rig: Rig) -> None:
    """Frozen by someone else through the agent beforehand: never thawed, by nobody of ours."""
    async with await GuestAgent.connect(rig.guest.agent_path, timeout=30) as ga:
        assert await ga.fsfreeze_freeze() == 1
    try:
        run = await drive(rig, "--kill", "phase:transaction:start")
        assert run.killed and run.event("freeze-sent") is None
        assert run.guard_record is None
        assert await agent_status(rig) is FreezeStatus.FROZEN
        async with await Monitor.connect(rig.guest.qmp_path) as mon:
            report = await recover(mon, agent=str(rig.guest.agent_path), journal_dir=rig.journal)
            assert report.clean and report.thawed == 0, report.render()
        assert await agent_status(rig) is FreezeStatus.FROZEN  # still someone else's
    finally:
        async with await GuestAgent.connect(rig.guest.agent_path, timeout=30) as ga:
            thawed = await ga.fsfreeze_thaw()
    assert thawed == 1, "the other party's freeze was thawed behind its back"
    assert not run.overlay.exists() and list(rig.journal.iterdir()) == []


async def test_sigkill_with_the_freeze_in_flight_over_a_foreign_fsfreeze(rig: Rig) -> None:
    """/mnt/data frozen inside the guest by another tool: our freeze freezes 0 (not ours); the
    process dies with it in flight: the guard finds nothing of ours frozen and thaws nothing."""
    await rig.guest.run("fsfreeze --freeze /mnt/data")
    try:
        run = await drive(rig, "--kill", "agent:freeze", quiesce="preferred")
        assert run.killed and run.event("freeze-sent") is not None
        rec = run.guard_record
        assert rec is not None and rec["result"] == "not-frozen", rec
        async with await Monitor.connect(rig.guest.qmp_path) as mon:
            report = await recover(mon, agent=str(rig.guest.agent_path), journal_dir=rig.journal)
            assert report.clean and report.thawed == 0, report.render()
    finally:
        unfreeze = await rig.guest.run("fsfreeze --unfreeze /mnt/data", check=False)
    assert unfreeze.returncode == 0, "the other tool's freeze was thawed behind its back"
    assert not run.overlay.exists() and list(rig.journal.iterdir()) == []


async def test_blocked_loop_is_thawed_by_the_guard_at_the_deadline(rig: Rig) -> None:
    """The orchestrator is alive but its loop is blocked (time.sleep in on_phase) for 4 s with
    freeze_timeout=1: the guard thaws within 1 s of the deadline; the snapshot then fails
    (required) and cleans up."""
    t0 = time.monotonic()
    run = await drive(rig, "--sleep", "transaction:4", "--freeze-timeout", "1")
    assert time.monotonic() - t0 < 60
    err = run.event("error")
    assert err is not None and err["type"] == "SnapshotError", (run.events, run.stderr)
    assert "exceeded freeze_timeout" in err["message"]
    assert err["thawed"] == 1 and err["freeze_state"] == "thawed"
    assert "took over" in run.stderr or "guard" in run.stderr
    assert await agent_status(rig) is FreezeStatus.THAWED
    sent = run.event("freeze-sent")
    assert sent is not None
    wlog = await rig.guest.wait_writer_progress(await rig.guest.uptime() + 0.2)
    gap = wlog.largest_gap(after=run.started_uptime)
    assert 0.5 < gap <= 1.0 + 1.0, gap  # thawed within 1 s of the 1 s deadline, not after 4 s
    assert not run.overlay.exists() and list(rig.journal.iterdir()) == []


async def test_killed_guard_the_orchestrator_thaws_and_says_so(rig: Rig) -> None:
    run = await drive(rig, "--kill-guard", "transaction")
    assert run.event("guard-killed") is not None and run.event("guard-killed")["pids"]  # type: ignore[index]
    res = run.event("result")
    assert res is not None, (run.events, run.stderr)
    assert res["quiesced"] and res["thawed"] == 1 and not res["guarded"]
    assert any("freeze guard died" in w for w in res["warnings"]), res["warnings"]
    assert await agent_status(rig) is FreezeStatus.THAWED
    rig.chain |= set(res["overlays"].values())
    rig.active_file = str(run.overlay)
    assert list(rig.journal.iterdir()) == []


async def test_a_normal_snapshot_is_guarded_and_leaves_no_journal(rig: Rig) -> None:
    run = await drive(rig)
    res = run.event("result")
    assert res is not None and res["quiesced"] and res["guarded"], (run.events, run.stderr)
    rig.chain |= set(res["overlays"].values())
    rig.active_file = str(run.overlay)
    assert list(rig.journal.iterdir()) == []
    assert Journal(rig.journal).directory == rig.journal
