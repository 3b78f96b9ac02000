"""Run one SnapshotOrchestrator.snapshot() in a process of its own, and die where told to.

    python tests/crash_driver.py QMP AGENT OVERLAY [--quiesce Q] [--freeze-timeout S]
                                 [--kill POINT] [--sleep PHASE:SECONDS] [--kill-guard PHASE]

POINT (SIGKILL of this process, the freeze guard's parent):
  ``phase:<name>:start`` / ``phase:<name>:end``  in ``on_phase`` (preflight, prepare, freeze,
                                                 transaction, thaw)
  ``qmp:<command>:<n>``     while the n-th ``<command>`` (1-based) is in flight in QEMU
                            (written, its reply not yet read): ``blockdev-create:1`` is the
                            file job, ``blockdev-add:2`` the qcow2 node, ``transaction:1``...
  ``agent:freeze``          right after the freeze request was handed to the transport
  ``agent:thaw``            while the thaw is in flight

``--block qmp:transaction:1:3`` blocks the event loop for 3 s with that command in flight.
``--sleep transaction:3`` blocks the event loop (``time.sleep``) for 3 s in ``on_phase`` at
the start of that phase. ``--kill-guard transaction`` SIGKILLs the freeze guard there.

Prints JSON lines on stdout: ``{"event": "kill", "at": <time.time()>, ...}`` right before a
kill, ``{"event": "freeze-sent", "at": ...}``, and at the end ``{"event": "result", ...}`` or
``{"event": "error", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qmpagent import GuestAgent, Monitor, QMPAgentError, SnapshotError, SnapshotOrchestrator


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def die(point: str) -> None:
    emit(event="kill", at=time.time(), point=point)
    os.kill(os.getpid(), signal.SIGKILL)


def guard_pids() -> list[int]:
    me = str(os.getpid())
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
                and argv[argv.index(b"--parent") + 1].decode() == me):
            found.append(int(pid))
    return found


def kill_guard() -> None:
    pids = guard_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while guard_pids() and time.monotonic() < deadline:
        time.sleep(0.005)
    emit(event="guard-killed", pids=pids)


class KillingMonitor:
    """A Monitor whose n-th ``command`` is left in flight when this process is killed (or,
    with ``block``, while the event loop is blocked for that many seconds)."""

    def __init__(self, inner: Monitor, command: str, n: int, block: float = 0.0) -> None:
        self._inner = inner
        self._command = command
        self._n = n
        self._seen = 0
        self._block = block

    async def execute(self, command: str, arguments: Any = None, **kw: Any) -> Any:
        if command == self._command:
            self._seen += 1
            if self._seen == self._n:
                task = asyncio.ensure_future(self._inner.execute(command, arguments, **kw))
                await asyncio.sleep(0.002)  # written to QEMU; its reply not read
                if self._block:
                    emit(event="block", at=time.time(), seconds=self._block)
                    time.sleep(self._block)
                    return await task
                die(f"qmp:{command}:{self._n}")
                await task
        return await self._inner.execute(command, arguments, **kw)

    async def run_job(self, command: str, arguments: Any = None, **kw: Any) -> Any:
        if command == self._command:
            self._seen += 1
            if self._seen == self._n:
                task = asyncio.ensure_future(self._inner.run_job(command, arguments, **kw))
                await asyncio.sleep(0.002)
                die(f"qmp:{command}:{self._n}")
                await task
        return await self._inner.run_job(command, arguments, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("qmp")
    p.add_argument("agent")
    p.add_argument("overlay")
    p.add_argument("--disk", default="vblk0")
    p.add_argument("--quiesce", default="required")
    p.add_argument("--freeze-timeout", type=float, default=10.0)
    p.add_argument("--kill", default="")
    p.add_argument("--sleep", default="")
    p.add_argument("--kill-guard", default="")
    p.add_argument("--block", default="", help="qmp:<command>:<n>:<seconds>")
    p.add_argument("--journal", default=None)
    args = p.parse_args()
    kill = args.kill
    sleep_phase, _, sleep_s = args.sleep.partition(":")

    def on_phase(phase: str, seconds: float | None) -> None:
        edge = "start" if seconds is None else "end"
        emit(event="phase", phase=str(phase), edge=edge, at=time.time())
        if kill == f"phase:{phase}:{edge}":
            die(kill)
        if seconds is None and str(phase) == sleep_phase:
            emit(event="sleep", at=time.time(), seconds=float(sleep_s))
            time.sleep(float(sleep_s))
            emit(event="woke", at=time.time())
        if seconds is None and str(phase) == args.kill_guard:
            kill_guard()

    mon = await Monitor.connect(args.qmp, command_timeout=60)
    ga = await GuestAgent.connect(args.agent, timeout=30)
    target: Any = mon
    if kill.startswith("qmp:"):
        _, command, n = kill.split(":")
        target = KillingMonitor(mon, command, int(n))
    elif args.block:
        _, command, n, seconds = args.block.split(":")
        target = KillingMonitor(mon, command, int(n), float(seconds))

    freeze = ga.fsfreeze_freeze
    thaw = ga.fsfreeze_thaw

    async def freeze_hook(*a: Any, on_sent: Any = None, **kw: Any) -> int:
        def sent() -> None:
            if on_sent is not None:
                on_sent()
            emit(event="freeze-sent", at=time.time())
            if kill == "agent:freeze":
                die(kill)
        return await freeze(*a, on_sent=sent, **kw)

    async def thaw_hook(*a: Any, **kw: Any) -> int:
        if kill == "agent:thaw":
            task = asyncio.ensure_future(thaw(*a, **kw))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            die(kill)
            await task
        return await thaw(*a, **kw)

    ga.fsfreeze_freeze = freeze_hook  # type: ignore[method-assign]
    ga.fsfreeze_thaw = thaw_hook  # type: ignore[method-assign]
    orch = SnapshotOrchestrator(target, agent=ga, agent_timeout=10, thaw_timeout=10,
                                journal_dir=args.journal)
    try:
        res = await orch.snapshot({args.disk: args.overlay}, quiesce=args.quiesce,
                                  freeze_timeout=args.freeze_timeout, on_phase=on_phase)
    except SnapshotError as exc:
        emit(event="error", type=type(exc).__name__, message=str(exc),
             freeze_state=str(exc.record.freeze_state), snapshot_taken=exc.record.snapshot_taken,
             thawed=exc.record.thawed)
        return 1
    except QMPAgentError as exc:
        emit(event="error", type=type(exc).__name__, message=str(exc))
        return 1
    finally:
        await ga.close()
        await mon.close()
    emit(event="result", quiesced=res.quiesced, freeze_owner=res.freeze_owner, frozen=res.frozen,
         thawed=res.thawed, window=res.freeze_window, warnings=list(res.warnings),
         guarded=res.guarded, overlays=res.overlays, freeze_state=str(res.freeze_state))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
