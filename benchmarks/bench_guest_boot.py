"""Boot-to-agent-ready time and QEMU memory of the test guest, for each real peer.

    .venv/bin/python benchmarks/bench_guest_boot.py [--boots 5] [--peers host debian13]

Boots the guest ``--boots`` times per peer, the peers interleaved (host, debian13, host, ...) so
that the machine's load falls on both alike; for each boot, the seconds from starting QEMU to the
agent's port open (what ``boot_guest`` waits for), and QEMU's resident memory after a guest
agent round trip and a freeze/thaw (VmRSS) and at its peak (VmHWM). Prints medians per peer and
the ratios to the first peer. The Debian 13 peer is provisioned first if needed (not timed).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from qmpagent import GuestAgent
from qmpagent.testing import PEERS, boot_guest, build_guest_image


async def one_boot(peer: str) -> tuple[float, int, int, tuple[int, int, int]]:
    async with boot_guest(peer=peer) as guest:
        async with await GuestAgent.connect(guest.agent_path, timeout=30) as ga:
            await ga.fsfreeze_freeze()
            await ga.fsfreeze_thaw()
        rss, peak = guest.rss()
        return guest.boot_time or 0.0, rss, peak, guest.qemu_version


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    args = parser.parse_args()
    for peer in args.peers:
        build_guest_image(peer=peer)  # not part of the boot time
    rows: dict[str, list[tuple[float, int, int, tuple[int, int, int]]]] = {p: [] for p in args.peers}
    for _ in range(args.boots):
        for peer in args.peers:
            rows[peer].append(await one_boot(peer))
    mib = 1024 * 1024
    first = args.peers[0]
    medians = {
        p: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs),
            statistics.median(r[2] for r in rs))
        for p, rs in rows.items()
    }
    print("| peer | QEMU | boots | agent ready (median) | RSS | peak RSS | x first (ready, RSS) |")
    print("|---|---|---|---|---|---|---|")
    for peer, (t, rss, peak) in medians.items():
        version = ".".join(map(str, rows[peer][0][3]))
        ft, frss, _ = medians[first]
        print(f"| {peer} | {version} | {len(rows[peer])} | {t:.2f} s | {rss / mib:.0f} MiB | "
              f"{peak / mib:.0f} MiB | {t / ft:.2f}, {rss / frss:.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
