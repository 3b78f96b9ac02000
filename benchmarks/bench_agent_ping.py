"""Benchmark: ``guest-ping`` round trips on a real guest, for six agent clients, in one run.

Boots one throwaway test guest (real QEMU under TCG, the real ``qemu-ga`` inside, no writer) and
times ``guest-ping`` round trips through:

* ``qmpagent``    -- :meth:`qmpagent.GuestAgent.ping` on one connection (this library);
* ``floor``       -- a bare asyncio stream: one initial 0xFF + ``guest-sync-delimited`` to flush,
  then write ``{"execute":"guest-ping"}\\n`` and read one line: the least any client can do;
* ``qemu.qmp``    -- ``qemu.qmp.QMPClient`` with ``await_greeting = False`` and
  ``negotiate = False`` (the documented way to talk to the agent), ``execute("guest-ping")``;
* ``sync-every``  -- what Proxmox does: before every command, 0xFF + ``guest-sync-delimited``
  with a fresh id, wait for its reply, then the command; written on bare asyncio streams so the
  baseline is not handicapped by this library;
* ``qmpagent+sync`` -- ``GuestAgent.sync()`` before every ``ping()`` (for reference);
* ``floor+id``    -- the floor sending the exact request ``GuestAgent`` sends (with a random
  64-bit ``"id"`` that the agent echoes), to split qmpagent's cost over the floor into what the
  id costs in the guest and what the client itself costs.

The agent's chardev takes one connection at a time: each client connects, warms up, times
``--pings`` round trips, and closes before the next one connects. Rounds rotate the order of
the clients; many short rounds average out the load of a shared machine. Reported: the median
over rounds of each client's median per-ping latency, its ops/s, the client-side CPU time per
ping, and ratios against the floor and against sync-every (ratio of the medians, and the median
of the per-round ratios).

Target (the issue): ``qmpagent`` within 1.2x of the floor, and at most 0.6x of sync-every.

Run: ``.venv/bin/python benchmarks/bench_agent_ping.py [--rounds 25] [--pings 200] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from _common import Report, describe_machine, machine, median, ratio, rotate, verdict
from qemu.qmp import QMPClient

from qmpagent import GuestAgent
from qmpagent.testing import boot_guest

PING = b'{"execute":"guest-ping"}\n'
TARGET_VS_FLOOR = 1.2
TARGET_VS_SYNC_EVERY = 0.6


class BenchError(Exception):
    pass


# --- the clients ---------------------------------------------------------------------------
#
# Each client is an async context manager factory: connect, then `ping()` repeatedly, then close.


class _RawClient:
    """Bare asyncio streams; the common part of the floor and sync-every baselines."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def __aenter__(self) -> _RawClient:
        self.reader, self.writer = await asyncio.open_unix_connection(self.path)
        await self.sync()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def sync(self) -> None:
        """0xFF + guest-sync-delimited with a random id; skip to the 0xFF of the reply, match id.

        The agent answers the 0xFF with a parse-error line first, then ``\\xff{"return": id}``.
        """
        sync_id = secrets.randbits(62)
        self.writer.write(
            b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}).encode()
            + b"\n"
        )
        await self.writer.drain()
        while True:
            await self.reader.readuntil(b"\xff")
            line = await self.reader.readline()
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict) and reply.get("return") == sync_id:
                return

    async def _ping(self) -> None:
        self.writer.write(PING)
        await self.writer.drain()
        line = await self.reader.readline()
        reply = json.loads(line)
        if "return" not in reply:
            raise BenchError(f"guest-ping failed: {line!r}")


class FloorClient(_RawClient):
    async def ping(self) -> None:
        await self._ping()


class FloorIdClient(_RawClient):
    """The floor, but sending what GuestAgent sends: a random signed 64-bit ``"id"``, which the
    agent echoes. Separates the cost of the id (paid in the guest) from the client's own."""

    async def ping(self) -> None:
        request = {"execute": "guest-ping", "id": secrets.randbits(64) - 2**63}
        self.writer.write(json.dumps(request, separators=(",", ":")).encode() + b"\n")
        await self.writer.drain()
        reply = json.loads(await self.reader.readline())
        if reply.get("id") != request["id"] or "return" not in reply:
            raise BenchError(f"guest-ping failed: {reply!r}")


class SyncEveryClient(_RawClient):
    async def ping(self) -> None:
        await self.sync()
        await self._ping()


class QmpagentClient:
    def __init__(self, path: str, sync_first: bool = False) -> None:
        self.path = path
        self.sync_first = sync_first
        self.ga: GuestAgent

    async def __aenter__(self) -> QmpagentClient:
        self.ga = await GuestAgent.connect(self.path, timeout=10.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ga.close()

    async def ping(self) -> None:
        if self.sync_first:
            await self.ga.sync()
        await self.ga.ping()


class QemuQmpClient:
    def __init__(self, path: str) -> None:
        self.path = path
        self.client = QMPClient("bench-qga")
        # The agent sends no greeting and knows no qmp_capabilities.
        self.client.await_greeting = False
        self.client.negotiate = False

    async def __aenter__(self) -> QemuQmpClient:
        await self.client.connect(self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.disconnect()

    async def ping(self) -> None:
        await self.client.execute("guest-ping")


Factory = Callable[[str], Any]

CLIENTS: dict[str, Factory] = {
    "floor": FloorClient,
    "floor+id": FloorIdClient,
    "qmpagent": QmpagentClient,
    "qemu.qmp": QemuQmpClient,
    "sync-every": SyncEveryClient,
    "qmpagent+sync": lambda path: QmpagentClient(path, sync_first=True),
}

DESCRIPTIONS = {
    "floor": "bare asyncio stream, request + readline",
    "floor+id": "the floor with qmpagent's request (random 64-bit id)",
    "qmpagent": "GuestAgent.ping()",
    "qemu.qmp": "QMPClient(negotiate=False).execute",
    "sync-every": "bare streams, 0xFF+sync-delimited before each",
    "qmpagent+sync": "GuestAgent.sync() + ping()",
}


@dataclass
class Sample:
    median_s: float  # median per-ping latency in this round
    mean_s: float  # wall time / pings
    cpu_s: float  # process CPU time / pings

    @property
    def ops(self) -> float:
        return 1.0 / self.mean_s


@dataclass
class Results:
    samples: dict[str, list[Sample]] = field(default_factory=dict)


async def measure(name: str, path: str, pings: int, warmup: int) -> Sample:
    async with CLIENTS[name](path) as client:
        ping: Callable[[], Awaitable[None]] = client.ping
        for _ in range(warmup):
            await ping()
        lat = []
        perf = time.perf_counter
        cpu0, t0 = time.process_time(), perf()
        for _ in range(pings):
            s = perf()
            await ping()
            lat.append(perf() - s)
        wall, cpu = perf() - t0, time.process_time() - cpu0
    return Sample(statistics.median(lat), wall / pings, cpu / pings)


async def check_qemu_qmp(path: str) -> None:
    """qemu.qmp talks to the agent once greeting and negotiation are off: prove it."""
    async with QemuQmpClient(path) as c:
        reply = await c.client.execute("guest-info")
        if not isinstance(reply, dict) or "version" not in reply:
            raise BenchError(f"qemu.qmp guest-info: unexpected reply {reply!r}")


async def run(args: argparse.Namespace, report: Report) -> dict[str, Any]:
    info = machine()
    names = list(CLIENTS)
    results = Results({n: [] for n in names})
    per_round_ratio: dict[str, list[float]] = {"floor": [], "sync-every": []}
    describe_machine(report, info)
    async with boot_guest(writer=False) as guest:
        path = str(guest.agent_path)
        report.line(f"guest booted in {guest.boot_time or 0.0:.2f}s; {args.rounds} rounds x "
                    f"{args.pings} pings per client (+{args.warmup} warm-up pings per connection); "
                    "one connection at a time, client order rotated each round")
        await check_qemu_qmp(path)
        for name in names:  # round 0: warm everything up (imports, caches, guest paths), discarded
            await measure(name, path, args.warmup, args.warmup)
        report.line()
        report.line("  round " + "".join(f"{n:>15}" for n in names) + "   (median us/ping)")
        for r in range(args.rounds):
            got = {}
            for name in rotate(names, r):
                got[name] = await measure(name, path, args.pings, args.warmup)
                results.samples[name].append(got[name])
            per_round_ratio["floor"].append(got["qmpagent"].median_s / got["floor"].median_s)
            per_round_ratio["sync-every"].append(got["qmpagent"].median_s / got["sync-every"].median_s)
            report.line(f"  {r + 1:5d} " + "".join(f"{got[n].median_s * 1e6:15.0f}" for n in names))

    med = {n: median([s.median_s for s in results.samples[n]]) for n in names}
    mean = {n: median([s.mean_s for s in results.samples[n]]) for n in names}
    cpu = {n: median([s.cpu_s for s in results.samples[n]]) for n in names}
    report.line()
    report.line("Medians over rounds:")
    report.table(
        ["client", "us/ping (median)", "us/ping (mean)", "ops/s", "client CPU us/ping",
         "x floor", "x sync-every", "what"],
        [
            [n, f"{med[n] * 1e6:.0f}", f"{mean[n] * 1e6:.0f}", f"{1 / mean[n]:.0f}", f"{cpu[n] * 1e6:.0f}",
             f"{ratio(med[n], med['floor']):.2f}", f"{ratio(med[n], med['sync-every']):.2f}", DESCRIPTIONS[n]]
            for n in names
        ],
        left=(0, 7),
    )
    vs_floor = ratio(med["qmpagent"], med["floor"])
    vs_sync = ratio(med["qmpagent"], med["sync-every"])
    pr_floor = median(per_round_ratio["floor"])
    pr_sync = median(per_round_ratio["sync-every"])
    ok_floor = vs_floor <= TARGET_VS_FLOOR
    ok_sync = vs_sync <= TARGET_VS_SYNC_EVERY
    report.line()
    report.line(f"qmpagent / floor      = {vs_floor:.3f}  (median of per-round ratios {pr_floor:.3f}); "
                f"target <= {TARGET_VS_FLOOR}: {verdict(ok_floor)}")
    report.line(f"qmpagent / sync-every = {vs_sync:.3f}  (median of per-round ratios {pr_sync:.3f}); "
                f"target <= {TARGET_VS_SYNC_EVERY}: {verdict(ok_sync)}")
    extra, id_cost = med["qmpagent"] - med["floor"], med["floor+id"] - med["floor"]
    report.line(f"of qmpagent's {extra * 1e6:+.0f} us/ping over the floor: {id_cost * 1e6:+.0f} us is the "
                "request id the agent parses and echoes (floor+id - floor), "
                f"{(extra - id_cost) * 1e6:+.0f} us the client itself (qmpagent - floor+id)")
    return {
        "benchmark": "agent_ping",
        "machine": info,
        "rounds": args.rounds,
        "pings": args.pings,
        "clients": {
            n: {
                "description": DESCRIPTIONS[n],
                "median_us": med[n] * 1e6,
                "mean_us": mean[n] * 1e6,
                "ops_per_s": 1 / mean[n],
                "cpu_us_per_ping": cpu[n] * 1e6,
                "ratio_vs_floor": ratio(med[n], med["floor"]),
                "ratio_vs_sync_every": ratio(med[n], med["sync-every"]),
                "rounds_median_us": [s.median_s * 1e6 for s in results.samples[n]],
            }
            for n in names
        },
        "id_cost_us": (med["floor+id"] - med["floor"]) * 1e6,
        "client_cost_us": (med["qmpagent"] - med["floor+id"]) * 1e6,
        "qmpagent_vs_floor": vs_floor,
        "qmpagent_vs_floor_per_round_median": pr_floor,
        "qmpagent_vs_sync_every": vs_sync,
        "qmpagent_vs_sync_every_per_round_median": pr_sync,
        "targets": {
            "vs_floor": {"limit": TARGET_VS_FLOOR, "value": vs_floor, "met": ok_floor},
            "vs_sync_every": {"limit": TARGET_VS_SYNC_EVERY, "value": vs_sync, "met": ok_sync},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="measured rounds (default 25)")
    parser.add_argument("--pings", type=int, default=200, help="timed pings per client per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed pings after each connect")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON result on stdout (the report goes to stderr)")
    args = parser.parse_args()
    if args.rounds < 1 or args.pings < 1:
        parser.error("--rounds and --pings must be positive")
    report = Report(args.json)
    document = asyncio.run(run(args, report))
    report.emit_json(document)


if __name__ == "__main__":
    main()
