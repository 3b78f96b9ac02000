"""Benchmark: what a hostile guest-agent reply costs the client: the longest event-loop stall and
the peak memory per reply, against a benign reply of the same size in the same run.

No guest is booted. A peer process (so that its work does not run on the client's loop nor take
the client's GIL) plays the agent on a unix socket: it answers ``guest-sync-delimited`` properly and answers
the benchmarked command with the case's bytes. The client is ``qmpagent.GuestAgent``; a ticker
task on the same loop records the longest gap between two of its ticks while the reply is read
(the loop stall a read causes to every other task, e.g. another VM's freeze window), in the
loop thread's CPU time (``time.thread_time``: the work done on the loop between two ticks, which
the OS preempting the process on a busy machine does not inflate) and in wall time.

Cases (each reply followed, where it makes sense, by a valid one the client then accepts):

- ``ff_newlines``: 256 KiB of ``\\xff\\n`` (the review's case: ~400 ms stall).
- ``a_ff``: 256 KiB of ``a\\xff`` (each 0xFF restarts the line: an operation per 2 bytes).
- ``sync_noise``: 256 KiB of ``\\xffa\\n`` before the answer to a sync (a line per 3 bytes).
- ``stale_lines``: 256 KiB of ``{"return": 1, "id": 9}\\n`` (replies to somebody else).
- ``deep_nesting``: 256 KiB of ``[``.
- ``tiny_objects``: a 10 MiB ``guest-info`` of ``{}`` objects (the review's case: ~27x RSS).
- ``tiny_objects_exec``: the same to ``guest-exec-status`` (whose size limit is 10 MiB).
- ``oversized``: 12 MiB in one line (above the 10 MiB connection limit).
- ``benign_256k`` / ``benign_10m``: a valid reply of that size (one base64 string), the baselines.

Memory: each case also runs in a fresh subprocess that feeds the same bytes to the protocol core
in 256 KiB reads (as ``GuestAgent`` reads them) and reports the growth of peak RSS
(``ru_maxrss``) over the process's peak before the reply.

``--before REF`` also feeds every case to the protocol core of git revision ``REF``
(``qmpagent/agent_protocol.py`` at that commit), directly (no loop): its longest single call, and
its peak RSS, for a before/after in the same run.

Run: ``python benchmarks/bench_hostile_reads.py [--rounds 5] [--before REF] [--json]``.
Targets: every hostile case's stall (median over rounds) <= 5 ms; every hostile case's peak RSS
growth <= that of its benign baseline (+1 MiB). The ``x benign`` column is the stall over the benign
reply of the same size, for scale (a benign 256 KiB reply is one decode of ~0.3 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import Report, describe_machine, machine, median, ratio, verdict

from qmpagent import GuestAgent, QMPAgentError

KIB = 1024
MIB = 1024 * 1024
READ = 256 * KIB  # GuestAgent's read size
REPLY_OK = b'{"return": {}}\n'
STALL_TARGET_MS = 5.0  # "a few milliseconds"


@dataclass(frozen=True)
class Case:
    name: str
    command: str  # "sync" for a case played during the sync
    build: Callable[[], bytes]
    baseline: str  # the benign case of the same size


def _benign(size: int) -> bytes:
    head, tail = b'{"return": {"exited": true, "out-data": "', b'"}}\n'
    return head + b"QUJD" * ((size - len(head) - len(tail)) // 4) + tail


CASES = [
    Case("benign_256k", "guest-exec-status", lambda: _benign(256 * KIB), "benign_256k"),
    Case("benign_10m", "guest-exec-status", lambda: _benign(10 * MIB - 64), "benign_10m"),
    Case("ff_newlines", "guest-exec-status", lambda: b"\xff\n" * (128 * KIB) + REPLY_OK,
         "benign_256k"),
    Case("a_ff", "guest-exec-status", lambda: b"a\xff" * (128 * KIB) + REPLY_OK, "benign_256k"),
    Case("sync_noise", "sync", lambda: b"\xffa\n" * (256 * KIB // 3), "benign_256k"),
    Case("stale_lines", "guest-exec-status",
         lambda: b'{"return": 1, "id": 9}\n' * (256 * KIB // 23) + REPLY_OK, "benign_256k"),
    Case("deep_nesting", "guest-exec-status", lambda: b'{"return": ' + b"[" * (256 * KIB) + b"\n",
         "benign_256k"),
    Case("tiny_objects", "guest-info",
         lambda: b'{"return": {"version": "7", "supported_commands": ['
         + b"{}," * ((10 * MIB - 64) // 3) + b"{}]}}\n", "benign_10m"),
    Case("tiny_objects_exec", "guest-exec-status",
         lambda: b'{"return": [' + b"{}," * ((10 * MIB - 64) // 3) + b"{}]}\n", "benign_10m"),
    Case("oversized", "guest-exec-status", lambda: _benign(12 * MIB), "benign_10m"),
]
BY_NAME = {c.name: c for c in CASES}


# --- the peer ----------------------------------------------------------------------------------


class Peer:
    """A fake agent on a unix socket, run in a process of its own (``--_peer PATH``) so that
    neither its work nor the GIL it takes shows up in the client's loop."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.payloads: dict[str, bytes] = {}

    def serve_forever(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            with conn:
                self._client(conn)

    def _payload(self, case: Case) -> bytes:
        if case.name not in self.payloads:
            self.payloads[case.name] = case.build()
        return self.payloads[case.name]

    def _client(self, conn: socket.socket) -> None:
        buf = b""
        case: Case | None = None
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line.lstrip(b"\xff"))
                command = msg["execute"]
                try:
                    if command == "bench-select":  # the client names the next case
                        case = BY_NAME[msg["arguments"]["case"]]
                        conn.sendall(REPLY_OK)
                    elif command == "guest-sync-delimited":
                        noise = b""
                        if case is not None and case.command == "sync":
                            noise, case = self._payload(case), None
                        conn.sendall(noise + b'\xff{"return": %d}\n' % msg["arguments"]["id"])
                    elif case is not None and command == case.command:
                        conn.sendall(self._payload(case))
                        case = None
                    else:
                        conn.sendall(REPLY_OK)
                except OSError:
                    return


def run_peer(path: str) -> None:
    peer = Peer(path)
    print("ready", flush=True)
    peer.serve_forever()


# --- the loop stall ------------------------------------------------------------------------------


async def _stall_once(path: str, case: Case) -> tuple[float, float, float, str]:
    """(longest gap between ticks in wall time, the same in the loop thread's CPU time, total
    wall time, outcome) for one reply of the case."""
    ga = await GuestAgent.connect(path, timeout=30.0)
    try:
        await ga.execute("bench-select", {"case": case.name})
        gap = cpu_gap = 0.0
        stop = False

        async def ticker() -> None:
            nonlocal gap, cpu_gap
            last, last_cpu = time.perf_counter(), time.thread_time()
            while not stop:
                await asyncio.sleep(0)
                now, now_cpu = time.perf_counter(), time.thread_time()
                gap = max(gap, now - last)
                cpu_gap = max(cpu_gap, now_cpu - last_cpu)
                last, last_cpu = now, now_cpu

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        started = time.perf_counter()
        try:
            if case.command == "sync":
                await ga.sync()
            else:
                await ga.execute(case.command, timeout=30.0)
            outcome = "ok"
        except QMPAgentError as exc:
            outcome = type(exc).__name__
        total = time.perf_counter() - started
        stop = True
        await task
        return gap, cpu_gap, total, outcome
    finally:
        await ga.close()


async def measure_stalls(rounds: int) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="qmpagent-bench-") as tmp:
        path = os.path.join(tmp, "qga.sock")
        peer = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--_peer", path, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert peer.stdout is not None
            if (await asyncio.wait_for(peer.stdout.readline(), 60)).strip() != b"ready":
                raise RuntimeError("the peer process did not start")
            sizes = {c.name: len(c.build()) for c in CASES}
            results: dict[str, dict[str, Any]] = {}
            gaps: dict[str, list[float]] = {c.name: [] for c in CASES}
            cpu_gaps: dict[str, list[float]] = {c.name: [] for c in CASES}
            totals: dict[str, list[float]] = {c.name: [] for c in CASES}
            outcomes: dict[str, str] = {}
            for case in CASES:  # warm-up: the peer builds its payloads
                await _stall_once(path, case)
            for r in range(rounds):
                order = CASES[r % len(CASES):] + CASES[: r % len(CASES)]
                for case in order:
                    gap, cpu_gap, total, outcome = await _stall_once(path, case)
                    gaps[case.name].append(gap)
                    cpu_gaps[case.name].append(cpu_gap)
                    totals[case.name].append(total)
                    outcomes[case.name] = outcome
            for case in CASES:
                results[case.name] = {
                    "bytes": sizes[case.name],
                    "stall_ms": median(cpu_gaps[case.name]) * 1e3,
                    "stall_ms_max": max(cpu_gaps[case.name]) * 1e3,
                    "wall_stall_ms": median(gaps[case.name]) * 1e3,
                    "total_ms": median(totals[case.name]) * 1e3,
                    "outcome": outcomes[case.name],
                }
            return results
        finally:
            peer.kill()
            await peer.wait()


# --- the protocol core alone (this tree, or another revision) and its memory ---------------------


def load_core(ref: str | None) -> types.ModuleType:
    if ref is None:
        import qmpagent.agent_protocol as current

        return current
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{ref}:qmpagent/agent_protocol.py"],
        check=True, capture_output=True,
    ).stdout
    tmp = Path(tempfile.mkdtemp(prefix="qmpagent-bench-core-")) / "agent_protocol.py"
    tmp.write_bytes(source)
    name = f"qmpagent._bench_core_{abs(hash(ref))}"
    spec = importlib.util.spec_from_file_location(name, tmp)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "qmpagent"
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def core_connection(core: types.ModuleType, case: Case) -> Any:
    conn = core.AgentConnection()
    if case.command == "sync":
        conn.start_sync(5)
    else:
        conn.start_sync(7)
        conn.receive_data(b'\xff{"return": 7}\n')
        conn.next_event()
        conn.send_command(case.command)
    return conn


def core_payload(case: Case) -> bytes:
    """The bytes the core receives: for a sync case, the noise then the answer to the sync."""
    return case.build() + (b'\xff{"return": 5}\n' if case.command == "sync" else b"")


def feed(core: types.ModuleType, conn: Any, payload: bytes) -> tuple[float, str]:
    """Feed the payload in reads of 256 KiB, as GuestAgent does; the longest single call."""
    need_data = core.NEED_DATA
    yield_ = getattr(core, "YIELD", None)
    longest = 0.0
    outcome = "incomplete"
    for i in range(0, len(payload), READ):
        started = time.perf_counter()
        conn.receive_data(payload[i:i + READ])
        longest = max(longest, time.perf_counter() - started)
        while True:
            started = time.perf_counter()
            try:
                event = conn.next_event()
            except QMPAgentError as exc:
                longest = max(longest, time.perf_counter() - started)
                return longest, type(exc).__name__
            longest = max(longest, time.perf_counter() - started)
            if event is need_data:
                break
            if event is not yield_:
                outcome = type(event).__name__
    return longest, outcome


def core_stalls(ref: str | None, rounds: int) -> dict[str, dict[str, Any]]:
    core = load_core(ref)
    out: dict[str, dict[str, Any]] = {}
    for case in CASES:
        payload = core_payload(case)
        calls = []
        outcome = ""
        for _ in range(rounds):
            longest, outcome = feed(core, core_connection(core, case), payload)
            calls.append(longest)
        out[case.name] = {"call_ms": median(calls) * 1e3, "outcome": outcome}
    return out


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_child(case_name: str, ref: str | None) -> None:
    """In a fresh process: how far RSS peaks above its level before the reply, while one reply
    of the case is read and processed."""
    import gc

    case = BY_NAME[case_name]
    core = load_core(ref)
    payload = core_payload(case)
    conn = core_connection(core, case)
    gc.collect()
    before = _proc_status_kib("VmRSS")
    try:  # reset the peak (VmHWM) to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak_reset = True
    except OSError:
        peak_reset = False
    if before is None or not peak_reset:  # elsewhere: the process's peak so far
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    feed(core, conn, payload)
    after = _proc_status_kib("VmHWM") if peak_reset else None
    if after is None:
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump({"before_kib": before, "after_kib": after}, sys.stdout)


def measure_rss(ref: str | None) -> dict[str, float]:
    out = {}
    for case in CASES:
        args = [sys.executable, __file__, "--_rss", case.name]
        if ref is not None:
            args += ["--_ref", ref]
        res = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
        out[case.name] = (res["after_kib"] - res["before_kib"]) / 1024
    return out


# --- report --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", metavar="REF", help="also measure the core of this git revision")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_rss", help=argparse.SUPPRESS)
    parser.add_argument("--_ref", help=argparse.SUPPRESS)
    parser.add_argument("--_peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._peer:
        run_peer(args._peer)
        return 0
    if args._rss:
        rss_child(args._rss, args._ref)
        return 0

    report = Report(args.json)
    info = machine()
    report.line("bench_hostile_reads: loop stall and peak RSS per hostile agent reply")
    describe_machine(report, info)
    stalls = asyncio.run(measure_stalls(args.rounds))
    rss = measure_rss(None)
    before_core = core_stalls(args.before, args.rounds) if args.before else None
    before_rss = measure_rss(args.before) if args.before else None
    now_core = core_stalls(None, args.rounds) if args.before else None

    rows = []
    ok_stall = ok_rss = True
    for case in CASES:
        s = stalls[case.name]
        base = stalls[case.baseline]
        x_stall = ratio(s["stall_ms"], base["stall_ms"])
        hostile = not case.name.startswith("benign")
        if hostile:
            ok_stall &= s["stall_ms"] <= STALL_TARGET_MS
            ok_rss &= rss[case.name] <= rss[case.baseline] + 1.0
        row: list[object] = [
            case.name, case.command, f"{s['bytes'] / KIB:.0f}", s["outcome"],
            f"{s['stall_ms']:.2f}", f"{s['stall_ms_max']:.2f}", f"{x_stall:.2f}",
            f"{s['wall_stall_ms']:.2f}",
            f"{s['total_ms']:.1f}", f"{rss[case.name]:.1f}",
        ]
        if before_core is not None and before_rss is not None and now_core is not None:
            row += [
                f"{now_core[case.name]['call_ms']:.2f}",
                f"{before_core[case.name]['call_ms']:.2f}", before_core[case.name]["outcome"],
                f"{before_rss[case.name]:.1f}",
            ]
        rows.append(row)
    header = ["case", "command", "KiB", "outcome", "stall ms", "max", "x benign", "wall ms",
              "total ms", "RSS +MiB"]
    if before_core is not None:
        header += ["core call ms", f"{args.before} call ms", f"{args.before} outcome",
                   f"{args.before} RSS +MiB"]
    report.line()
    report.line(f"Median over {args.rounds} rounds. stall: the longest gap between two ticks of a "
                "task on the same loop while the reply is read, in the loop thread's CPU time "
                "(work that blocked the loop; max: the worst round); wall: the same gap in wall "
                "time (also counts the OS running other processes: noisy on a shared machine).")
    report.table(header, rows, left=(0, 1, 3))
    report.line()
    report.line(f"- every hostile case's stall <= {STALL_TARGET_MS:g} ms: {verdict(ok_stall)}")
    report.line("- every hostile case's peak RSS growth <= its benign baseline's (+1 MiB): "
                f"{verdict(ok_rss)}")
    report.line(f"- the benign 10 MiB reply: {stalls['benign_10m']['stall_ms']:.1f} ms, the decode of "
                "one complete reply (bounded by the command's size limit), the one step that "
                "grows with the input")
    report.emit_json({
        "machine": info, "rounds": args.rounds, "stalls": stalls, "rss_mib": rss,
        "before": None if before_core is None else {
            "ref": args.before, "core": before_core, "rss_mib": before_rss, "now_core": now_core,
        },
        "targets": {"stall": ok_stall, "rss": ok_rss},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
