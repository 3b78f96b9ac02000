"""Benchmark: merging a 64 MiB overlay back with ``SnapshotOrchestrator.commit`` on a running VM,
at rest and under in-guest writes, against ``qemu-img commit`` of the same images offline.

One guest (no writer) with an extra disk ``vbench`` (serial ``bench``, not mounted: the guest
writes to it raw) on a 128 MiB empty qcow2 base. Each round, for each variant in rotated order:

- the overlay: a qcow2 on the base file with ``--size`` MiB (default 64) of data written into it
  offline (``qemu-io``, opened without its backing: whole clusters, no copy-on-write reads);
- ``live``: the overlay is attached (``blockdev-add`` with ``backing: null``, one
  ``blockdev-snapshot`` transaction) and ``orch.commit("vbench", delete_files=True)`` timed
  (start of the call to its return: the job to ready, the pivot, the checks, the merged nodes
  and file removed);
- ``live+writes``: the same while the guest rewrites the disk's first 16 MiB in a loop
  (``dd ... oflag=direct``): the dirty data the commit has to chase;
- ``offline``: ``qemu-img commit`` of an identical overlay on an identical base (files of their
  own, not open in QEMU), timed as a process.

Reported: median seconds and MiB/s per variant, and the ratios live / offline and
live+writes / offline (of the medians). No target: the ratio says what merging while the VM
runs costs over merging a VM that is shut down.

Run: ``python benchmarks/bench_commit.py [--rounds 5] [--size 64] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Report, describe_machine, machine, median, ratio, rotate

from qmpagent import CommitTimeout, Monitor, SnapshotOrchestrator
from qmpagent.testing import Guest, boot_guest

VARIANTS = ["live", "live+writes", "offline"]
BASE_SIZE = 128  # MiB


async def sh(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {err.decode(errors='replace').strip()}")


async def make_overlay(guest: Guest, path: Path, base: Path, size_mib: int) -> None:
    qemu_img = guest.command("qemu-img")
    qemu_io = [*qemu_img[:-1], qemu_img[-1].replace("qemu-img", "qemu-io")]
    await sh(*qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), "-u",
             str(path), f"{BASE_SIZE}M")
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(path)}})
    await sh(*qemu_io, "-c", f"write -P 0x5a 0 {size_mib}M", f"json:{spec}")


async def attach(mon: Monitor, path: Path, name: str, under: str) -> None:
    await mon.execute("blockdev-add", {"driver": "file", "filename": str(path), "node-name": f"{name}f"})
    await mon.execute("blockdev-add", {"driver": "qcow2", "node-name": name, "file": f"{name}f",
                                       "backing": None})
    await mon.execute("transaction", {"actions": [
        {"type": "blockdev-snapshot", "data": {"node": under, "overlay": name}}]})


async def guest_disk(guest: Guest) -> str:
    out = await guest.run("for d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = bench ] "
                          "&& echo ${d##*/}; done")
    name = out.output.strip()
    if not name:
        raise RuntimeError("the bench disk is not visible in the guest")
    return f"/dev/{name}"


async def live(guest: Guest, orch: SnapshotOrchestrator, mon: Monitor, base: Path, n: int,
               size: int, writes: str | None) -> float | None:
    path = guest.workdir / f"live{n}.qcow2"
    await make_overlay(guest, path, base, size)
    await attach(mon, path, f"bov{n}", "bbase")
    if writes is not None:
        await guest.run(f"(while [ ! -e /run/stop-load ]; do dd if=/dev/zero of={writes} bs=64k "
                        "count=256 oflag=direct 2>/dev/null; done; rm -f /run/stop-load) "
                        ">/dev/null 2>&1 &")
        await asyncio.sleep(0.5)
    started = time.perf_counter()
    try:
        res = await orch.commit("vbench", delete_files=True, timeout=120)
        took = time.perf_counter() - started
    except CommitTimeout:
        return None
    finally:
        if writes is not None:
            await guest.run("touch /run/stop-load; while [ -e /run/stop-load ]; do usleep 20000; done")
    assert res.active_node == "bbase" and not path.exists(), res
    return took


async def offline(guest: Guest, n: int, size: int) -> float:
    base = guest.workdir / f"off-base{n}.qcow2"
    top = guest.workdir / f"off{n}.qcow2"
    await sh(*guest.command("qemu-img"), "create", "-q", "-f", "qcow2", str(base), f"{BASE_SIZE}M")
    await make_overlay(guest, top, base, size)
    started = time.perf_counter()
    await sh(*guest.command("qemu-img"), "commit", "-q", str(top))
    took = time.perf_counter() - started
    base.unlink()
    top.unlink()
    return took


async def run(rounds: int, size: int, report: Report) -> dict[str, Any]:
    info = machine()
    # The bench disk's base must exist before QEMU starts: a working directory of our own.
    work = Path(tempfile.mkdtemp(prefix="qmpagent-bench-commit-"))
    try:
        base_file = work / "bench-base.qcow2"
        await sh(shutil.which("qemu-img") or "qemu-img", "create", "-q", "-f", "qcow2",
                 str(base_file), f"{BASE_SIZE}M")
        extra = ["-blockdev", f"driver=file,filename={base_file},node-name=bbasef",
                 "-blockdev", "driver=qcow2,file=bbasef,node-name=bbase",
                 "-device", "virtio-blk-pci,drive=bbase,id=vbench,serial=bench"]
        async with boot_guest(writer=False, extra_args=extra) as guest:
            dev = await guest_disk(guest)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            timeouts = dict.fromkeys(VARIANTS, 0)
            async with await Monitor.connect(guest.qmp_path, command_timeout=60) as mon:
                orch = SnapshotOrchestrator(mon, job_timeout=120, journal_dir=work / "journal")
                n = 0
                for r in range(rounds):
                    for variant in rotate(VARIANTS, r):
                        n += 1
                        if variant == "offline":
                            took: float | None = await offline(guest, n, size)
                        else:
                            took = await live(guest, orch, mon, base_file, n, size,
                                              dev if variant == "live+writes" else None)
                        if took is None:
                            timeouts[variant] += 1
                        else:
                            times[variant].append(took)
                    report.line(f"round {r + 1}: " + ", ".join(
                        f"{v} {times[v][-1]:.3f}s" if times[v] else f"{v} -" for v in VARIANTS))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {v: median(times[v]) for v in VARIANTS}
    rows = [(v, med[v], size / med[v] if med[v] == med[v] else float("nan"), len(times[v]),
             timeouts[v]) for v in VARIANTS]
    report.line()
    describe_machine(report, info)
    report.line(f"commit of a {size} MiB overlay, {rounds} rounds (medians):")
    report.table(["variant", "seconds", "MiB/s", "runs", "timeouts"], rows)
    live_ratio = ratio(med["live"], med["offline"])
    writes_ratio = ratio(med["live+writes"], med["offline"])
    report.line(f"live / offline: {live_ratio:.2f}x; live+writes / offline: {writes_ratio:.2f}x")
    return {"machine": info, "size_mib": size, "rounds": rounds, "seconds": times,
            "median_seconds": med, "timeouts": timeouts,
            "mib_per_s": {v: size / med[v] for v in VARIANTS if med[v] == med[v] and med[v] > 0},
            "live_over_offline": live_ratio, "writes_over_offline": writes_ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="MiB of data in the overlay")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = Report(args.json)
    document = asyncio.run(run(args.rounds, args.size, report))
    report.emit_json(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
