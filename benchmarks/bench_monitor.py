"""Benchmark: ``query-status`` round trips per second, ``Monitor.execute`` vs bare ``qemu.qmp``.

Boots a throwaway test guest (real QEMU under TCG), connects one ``qemu.qmp.QMPClient`` to its
QMP socket and wraps it in a :class:`qmpagent.Monitor` (``Monitor.from_client``), so both paths
share the same connection and QEMU. Each round makes ``--calls`` calls per path, interleaved in
blocks of ``--block`` calls (so drifts in machine load hit both paths alike), and rounds
alternate which path goes first. Prints each round, the medians, and the overhead ratio (time
per call through the monitor / time per call bare).

Run: ``python benchmarks/bench_monitor.py [--rounds 5] [--calls 2000] [--block 100]``.
Target: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from qemu.qmp import QMPClient

from qmpagent.monitor import Monitor
from qmpagent.testing import boot_guest

Execute = Callable[[str], Awaitable[object]]


async def _timed(execute: Execute, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await execute("query-status")
    return time.perf_counter() - started


async def _round(paths: dict[str, Execute], order: list[str], calls: int, block: int
                 ) -> dict[str, float]:
    """Calls per second of each path, blocks interleaved in ``order``."""
    spent = dict.fromkeys(order, 0.0)
    done = 0
    while done < calls:
        n = min(block, calls - done)
        for name in order:
            spent[name] += await _timed(paths[name], n)
        done += n
    return {name: calls / spent[name] for name in order}


async def run(rounds: int, calls: int, warmup: int, block: int) -> float:
    async with boot_guest(writer=False) as guest:
        client = QMPClient("bench")
        await client.connect(str(guest.qmp_path))
        mon = Monitor.from_client(client, command_timeout=30.0)
        try:
            paths: dict[str, Execute] = {"bare": client.execute, "monitor": mon.execute}
            for execute in paths.values():
                await _timed(execute, warmup)
            rates: dict[str, list[float]] = {name: [] for name in paths}
            ratios: list[float] = []
            print(f"QEMU {'.'.join(map(str, mon.qemu_version or ()))}, Python "
                  f"{sys.version.split()[0]}, {rounds} rounds x {calls} query-status calls per "
                  f"path, in blocks of {block}")
            for r in range(rounds):
                order = ["bare", "monitor"] if r % 2 == 0 else ["monitor", "bare"]
                got = await _round(paths, order, calls, block)
                for name, value in got.items():
                    rates[name].append(value)
                ratios.append(got["bare"] / got["monitor"])
                print(f"round {r + 1} ({order[0]} first): bare {got['bare']:8.0f}/s  "
                      f"monitor {got['monitor']:8.0f}/s  ratio {ratios[-1]:.3f}")
        finally:
            await mon.close()
    bare = statistics.median(rates["bare"])
    monitor = statistics.median(rates["monitor"])
    ratio = bare / monitor
    print(f"median: bare {bare:.0f} calls/s ({1e6 / bare:.1f} us/call), "
          f"monitor {monitor:.0f} calls/s ({1e6 / monitor:.1f} us/call)")
    print(f"overhead ratio (monitor time / bare time), of medians: {ratio:.3f}; "
          f"median of per-round ratios: {statistics.median(ratios):.3f} (target <= 1.05)")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--block", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.calls, args.warmup, args.block))


if __name__ == "__main__":
    main()
