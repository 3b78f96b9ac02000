"""Boot-to-agent-ready time and QEMU memory of the test guest.

    .venv/bin/python benchmarks/bench_guest_boot.py [--boots 5]

Boots the guest ``--boots`` times one after another; for each, the seconds from starting QEMU to
the agent's port open (what ``boot_guest`` waits for), and QEMU's resident memory after a guest
agent round trip and a freeze/thaw (VmRSS) and at its peak (VmHWM). Prints medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from qmpagent import GuestAgent
from qmpagent.testing import boot_guest, build_guest_image


async def one_boot() -> tuple[float, int, int]:
    async with boot_guest() as guest:
        async with await GuestAgent.connect(guest.agent_path, timeout=30) as ga:
            await ga.fsfreeze_freeze()
            await ga.fsfreeze_thaw()
        rss, peak = guest.rss()
        return guest.boot_time or 0.0, rss, peak


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5)
    args = parser.parse_args()
    build_guest_image()  # not part of the boot time
    rows = [await one_boot() for _ in range(args.boots)]
    mib = 1024 * 1024
    for i, (t, rss, peak) in enumerate(rows, 1):
        print(f"boot {i}: agent ready in {t:.2f} s; QEMU RSS {rss / mib:.0f} MiB, peak {peak / mib:.0f} MiB")
    print(
        f"median: agent ready in {statistics.median(r[0] for r in rows):.2f} s; "
        f"QEMU RSS {statistics.median(r[1] for r in rows) / mib:.0f} MiB, "
        f"peak {statistics.median(r[2] for r in rows) / mib:.0f} MiB"
    )


if __name__ == "__main__":
    asyncio.run(main())
