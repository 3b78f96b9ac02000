#!/usr/bin/env python3
"""The whole cycle of an external snapshot on a running VM: snapshot, copy, commit back.

1. A quiesced snapshot of the disk: the guest's writes now go to a new overlay, and the image
   below it is read-only, consistent, and can be copied while the VM runs.
2. That image is copied (here with ``qemu-img convert``: a backup, a clone, a test fixture).
3. The overlay is merged back into it (an active ``block-commit``: ready, then the pivot), so
   the chain does not grow with every snapshot; the overlay's nodes and file are removed.

    python examples/snapshot_lifecycle.py --qmp /run/vm1/qmp.sock --agent /run/vm1/qga.sock \\
        --disk vblk0 --overlay /var/lib/vm1/disk0.snap.qcow2 --copy /backups/disk0.qcow2

    python examples/snapshot_lifecycle.py --demo     # boot the built-in test guest and use it

Exit status: 0 done, 1 a step failed (the message says where the VM runs), 2 THAW FAILED (the
guest may still be frozen).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time

import qmpagent


async def copy_image(source: str, target: str) -> None:
    """Copy the (now read-only) image with its backing chain flattened into one qcow2."""
    qemu_img = shutil.which("qemu-img") or "qemu-img"
    proc = await asyncio.create_subprocess_exec(
        qemu_img, "convert", "-U", "-O", "qcow2", source, target,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-img convert failed: {err.decode(errors='replace').strip()}")


async def lifecycle(qmp: str, agent: str | None, disk: str, overlay: str, copy: str) -> int:
    async with await qmpagent.Monitor.connect(qmp, timeout=10.0) as mon:
        orch = qmpagent.SnapshotOrchestrator(mon, agent=agent)
        before = await orch.chain(disk)
        print(f"chain before: {' -> '.join(n.node_name for n in before)}")
        try:
            snap = await orch.snapshot({disk: overlay}, quiesce="required")
        except qmpagent.ThawError as exc:  # a SnapshotError too: catch it first
            print(f"THAW FAILED, THE GUEST MAY STILL BE FROZEN: {exc}", file=sys.stderr)
            return 2
        except qmpagent.SnapshotError as exc:
            print(f"snapshot failed in {exc.record.phase}: {exc}", file=sys.stderr)
            return 1
        print(f"snapshot: froze {snap.frozen} filesystem(s), thawed {snap.thawed}; "
              f"freeze window {(snap.freeze_window or 0) * 1000:.1f} ms")
        chain = await orch.chain(disk)
        base = chain[1]  # the image the snapshot was taken of: read-only now
        started = time.monotonic()
        await copy_image(base.filename, copy)
        print(f"copied {base.node_name} ({base.filename}) to {copy} "
              f"in {time.monotonic() - started:.2f}s")
        try:
            res = await orch.commit(disk, delete_files=True)
        except qmpagent.CommitError as exc:  # CommitTimeout too
            print(f"commit failed: {exc}", file=sys.stderr)
            return 1
        print(f"commit: {res.top} merged into {res.active_node} in {res.duration:.2f}s; "
              f"removed nodes {', '.join(res.removed_nodes)}; removed files "
              f"{', '.join(res.removed_files)}")
        after = await orch.chain(disk)
        print(f"chain after: {' -> '.join(n.node_name for n in after)}")
        return 0 if [n.node_name for n in after] == [n.node_name for n in before] else 1


async def demo() -> int:
    from qmpagent.testing import boot_guest

    print("booting the built-in test guest (QEMU under TCG, real qemu-ga)...", flush=True)
    async with boot_guest() as guest:
        w = guest.workdir
        return await lifecycle(str(guest.qmp_path), str(guest.agent_path), guest.disk.device_id,
                               str(w / "data0.snap.qcow2"), str(w / "data0.copy.qcow2"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qmp", metavar="PATH", help="QEMU's QMP unix socket")
    parser.add_argument("--agent", metavar="PATH", help="the guest agent's unix socket")
    parser.add_argument("--disk", metavar="DEVICE", help="the disk's device id (e.g. vblk0)")
    parser.add_argument("--overlay", metavar="FILE", help="the snapshot's overlay file (created)")
    parser.add_argument("--copy", metavar="FILE", help="where the copy of the base goes (created)")
    parser.add_argument("--demo", action="store_true", help="boot the built-in test guest and use it")
    args = parser.parse_args()
    if args.demo:
        return asyncio.run(demo())
    if not (args.qmp and args.disk and args.overlay and args.copy):
        parser.error("--qmp, --disk, --overlay and --copy are needed (or --demo)")
    return asyncio.run(lifecycle(args.qmp, args.agent, args.disk, os.path.abspath(args.overlay),
                                 os.path.abspath(args.copy)))


if __name__ == "__main__":
    sys.exit(main())
