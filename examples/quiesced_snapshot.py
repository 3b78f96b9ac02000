#!/usr/bin/env python3
"""Take a quiesced (application-consistent) external snapshot of a running VM's disks.

The guest's filesystems are frozen through the guest agent only for the one QMP ``transaction``
that switches every disk to its new overlay; the overlays are created before the freeze. A guest
frozen beforehand by someone else is snapshotted as it is and left frozen.

    python examples/quiesced_snapshot.py --qmp /run/vm1/qmp.sock --agent /run/vm1/qga.sock \\
        --disk disk0=/var/lib/vm1/disk0.snap1.qcow2

    python examples/quiesced_snapshot.py --demo     # boot the built-in test guest and use it

Exit status: 0 snapshot taken, 1 no snapshot taken, 2 THAW FAILED (the guest may still be frozen).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import qmpagent


async def take_snapshot(
    qmp: str, agent: str | None, disks: dict[str, str], quiesce: str, freeze_timeout: float
) -> int:
    async with await qmpagent.Monitor.connect(qmp, timeout=10.0) as mon:
        # Given an address, the orchestrator checks the agent's port is open in the guest,
        # connects, syncs and pings before it freezes anything, and closes it afterwards.
        orch = qmpagent.SnapshotOrchestrator(mon, agent=agent)
        try:
            result = await orch.snapshot(disks, quiesce=quiesce, freeze_timeout=freeze_timeout)
        except qmpagent.ThawError as exc:  # a SnapshotError too: catch it first
            print(f"THAW FAILED, THE GUEST MAY STILL BE FROZEN: {exc}", file=sys.stderr)
            return 2
        except qmpagent.SnapshotError as exc:
            print(f"snapshot failed in {exc.record.phase}: {exc}", file=sys.stderr)
            return 1
    if result.quiesced:
        print(f"quiesced snapshot: froze {result.frozen} filesystem(s), thawed {result.thawed}, "
              f"freeze owner {result.freeze_owner}")
        if result.freeze_window is not None:
            print(f"freeze window: {result.freeze_window * 1000:.1f} ms")
    else:
        print(f"crash-consistent snapshot (not quiesced): {result.reason}")
    for node, overlay_node in result.overlays.items():
        print(f"{node} -> {result.files[node]} (new active node {overlay_node})")
    return 0


async def demo(quiesce: str, freeze_timeout: float) -> int:
    from qmpagent.testing import boot_guest

    print("booting the built-in test guest (QEMU under TCG, real qemu-ga)...", flush=True)
    async with boot_guest() as guest:
        overlay = str(guest.workdir / "data0.snap1.qcow2")
        return await take_snapshot(
            str(guest.qmp_path), str(guest.agent_path), {guest.disk.node_name: overlay},
            quiesce, freeze_timeout,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qmp", metavar="PATH", help="QEMU's QMP unix socket")
    parser.add_argument("--agent", metavar="PATH", help="the guest agent's unix socket")
    parser.add_argument("--disk", action="append", default=[], metavar="NODE=OVERLAY",
                        help="block node (or device id) and the new overlay file (repeatable)")
    parser.add_argument("--quiesce", choices=("required", "preferred", "off"), default="required")
    parser.add_argument("--freeze-timeout", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--demo", action="store_true", help="boot the built-in test guest and use it")
    args = parser.parse_args()
    if args.demo:
        return asyncio.run(demo(args.quiesce, args.freeze_timeout))
    if not args.qmp or not args.disk:
        parser.error("--qmp and at least one --disk are needed (or --demo)")
    disks = {}
    for item in args.disk:
        node, _, path = item.partition("=")
        if not node or not path:
            parser.error(f"--disk expects NODE=OVERLAY, not {item!r}")
        disks[node] = os.path.abspath(path)  # QEMU opens it: relative to us, not to QEMU
    return asyncio.run(take_snapshot(args.qmp, args.agent, disks, args.quiesce, args.freeze_timeout))


if __name__ == "__main__":
    sys.exit(main())
