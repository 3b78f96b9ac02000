"""Benchmark: backups (issue 15): the freeze window of a backup vs a bare freeze, full-backup
throughput vs ``qemu-img convert`` of the same disk, and what an incremental writes after 1% of
a disk changed, in one run on one throwaway guest (real QEMU under TCG, real ``qemu-ga``, the
in-guest writer on ``/mnt/data``).

* **Window** (``--rounds``, interleaved, order rotated): ``backup`` -- an incremental
  ``SnapshotOrchestrator.backup`` of the data disk (quiesce required; the copy runs after the
  thaw) -- vs ``floor``, freeze then thaw at once. Measured as in ``bench_freeze_window.py``
  (whose measuring code this reuses): the guest-observed gap in the writer's log, the hi-res
  writer's gap, and the host-side window. Target: ``backup`` <= 1.15x ``floor`` (medians).
* **Throughput** (``--tp-rounds``, interleaved): a node of ``--big-mib`` MiB (half of it written
  with a pattern by ``qemu-io`` on the host, attached with ``blockdev-add``; the guest does not
  see it) is backed up in full (quiesce required: the guest's filesystems are frozen for the
  transaction) and converted with ``qemu-img convert -U -O qcow2`` (the same data read, the
  same format written, to the same directory), like for like: ``backup-nofsync``
  (``durable=False``) vs ``convert`` (both leave the data in the page cache: convert's
  default cache mode never flushes), and ``backup`` (durable, the default) vs
  ``convert+fsync`` (convert, then an fsync of its output). The page cache is written out
  (``sync``, untimed) before each method, then ``--settle`` seconds pass (untimed: freed
  memory goes back to the hypervisor on this VM, see the option). Throughput = virtual size /
  time; the backup's time is its whole operation (preflight to the detached, complete
  target). Target: both ratios >= 0.8x (medians).
* **Incremental** (``--inc-rounds``): 1% of the 64 MiB data disk changed from inside the guest
  (a file of random bytes, synced), then an incremental backup. Reported: its ``bytes_copied``
  and the target's allocated size, as a share of the disk's size. Target: <= 3% (median).

Run: ``.venv/bin/python benchmarks/bench_backup.py [--rounds 9] [--tp-rounds 3]
[--inc-rounds 3] [--big-mib 4096] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from _common import Report, describe_machine, machine, median, ratio, rotate, verdict
from bench_freeze_window import Bench, Run

from qmpagent.agent import GuestAgent
from qmpagent.durable import fsync_path
from qmpagent.monitor import Monitor
from qmpagent.snapshot import SnapshotOrchestrator
from qmpagent.testing import boot_guest

TARGET_WINDOW = 1.15
TARGET_THROUGHPUT = 0.8
TARGET_INCREMENTAL = 0.03
MIB = 1 << 20
DISK = 64 * MIB


class BackupBench(Bench):
    """The freeze-window methods of bench_freeze_window plus ``backup``."""

    def __init__(self, *args: Any, state: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = state
        self.backup_orch = SnapshotOrchestrator(self.mon, agent=self.ga)
        self.last: dict[str, str] = {}
        self.last_bytes = 0  # the last backup's bytes_copied

    async def backup(self) -> Run:
        self.seq += 1
        target = os.path.join(self.g.workdir, f"b{self.seq}.qcow2")
        # As in Bench.ours: the guest clock is read right before the freeze is sent, left out
        # of the timings.
        freeze = self.ga.fsfreeze_freeze
        hook_time = 0.0

        async def clock_then_freeze(*args: Any, **kwargs: Any) -> int:
            nonlocal hook_time
            t = time.monotonic()
            self.freeze_clock = await self.clock()
            hook_time = time.monotonic() - t
            return await freeze(*args, **kwargs)

        setattr(self.ga, "fsfreeze_freeze", clock_then_freeze)  # noqa: B010 - an instance attribute
        try:
            t0 = time.monotonic()
            res = await self.backup_orch.backup({"vblk0": target}, since=self.last or None,
                                                state_dir=self.state)
            total = time.monotonic() - t0 - hook_time
        finally:
            delattr(self.ga, "fsfreeze_freeze")
        if not res.quiesced or res.freeze_owner != "self":
            raise RuntimeError(f"backup not quiesced by us: {res}")
        self.last = dict(res.targets)
        self.last_bytes = res.bytes_copied["vblk0"]
        t = res.timings
        phases = {"preflight": t.preflight, "prepare": t.prepare, "freeze": t.freeze - hook_time,
                  "transaction": t.transaction, "thaw": t.thaw, "copy": t.copy}
        return Run(0.0, res.freeze_window, total, phases)


async def run_tool(*argv: str) -> float:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {err.decode(errors='replace')}")
    return time.monotonic() - t0


async def window(b: BackupBench, rounds: int, report: Report) -> dict[str, list[Run]]:
    methods = ("backup", "floor")
    fns = {"backup": b.backup, "floor": b.floor}
    for name in ("floor", "floor", "backup", "backup"):  # warm-up: the first freeze is slow; the full
        await b.measure(fns[name])
    runs: dict[str, list[Run]] = {m: [] for m in methods}
    report.line("  round  " + "  ".join(f"{m:>22}" for m in methods)
                + "   (guest gap / hi-res gap / host window, ms)")
    for r in range(rounds):
        got = {}
        for name in rotate(methods, r):
            got[name] = await b.measure(fns[name])
            runs[name].append(got[name])
        report.line(f"  {r + 1:5d}  " + "  ".join(
            f"{got[m].gap * 1e3:4.0f} /{_ms(got[m].hires_gap):>6} /{_ms(got[m].window):>6}"
            for m in methods))
    return runs


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


#: The throughput methods: (name, what it is).
TP_METHODS = (
    ("backup", "orch.backup, durable (the default: each target fsync'd once complete)"),
    ("backup-nofsync", "orch.backup(durable=False): the data left to the page cache"),
    ("convert", "qemu-img convert -U -O qcow2 (its default cache mode, unsafe: never flushes)"),
    ("convert+fsync", "the same, then an fsync of the output and its directory"),
)


async def throughput(b: BackupBench, args: argparse.Namespace, report: Report) -> dict[str, Any]:
    g, mon = b.g, b.mon
    big = os.path.join(g.workdir, "big.qcow2")
    size = args.big_mib * MIB
    qemu_img = g.command("qemu-img")
    await run_tool(*qemu_img, "create", "-q", "-f", "qcow2", big, str(size))
    chunk = 256 * MIB  # a qemu-io request is at most 2 GiB
    writes = [arg for off in range(0, size // 2, chunk)
              for arg in ("-c", f"write -P 0x5a {off} {min(chunk, size // 2 - off)}")]
    await run_tool(*g.command("qemu-io"), "-f", "qcow2", *writes, big)
    await mon.execute("blockdev-add", {"driver": "file", "filename": big, "node-name": "bigf"})
    await mon.execute("blockdev-add", {"driver": "qcow2", "file": "bigf", "node-name": "big"})
    orch = SnapshotOrchestrator(mon, agent=b.ga)
    names = [name for name, _ in TP_METHODS]
    rows: dict[str, list[float]] = {name: [] for name in names}
    copy: dict[str, list[float]] = {"backup": [], "backup-nofsync": []}

    async def convert(out: str, durable: bool) -> float:
        t = await run_tool(*qemu_img, "convert", "-U", "-O", "qcow2", big, out)
        t0 = time.monotonic()
        if durable:
            await asyncio.to_thread(fsync_path, out)
            await asyncio.to_thread(fsync_path, g.workdir, directory=True)
        return t + time.monotonic() - t0

    try:
        # One untimed read of the node first: every method then reads it from the page cache.
        await run_tool(*qemu_img, "convert", "-U", "-O", "qcow2", big, os.path.join(g.workdir, "warm.qcow2"))
        os.unlink(os.path.join(g.workdir, "warm.qcow2"))
        for r in range(args.tp_rounds):
            for name in rotate(tuple(names), r):
                out = os.path.join(g.workdir, f"tp-{name}{r}.qcow2")
                # Untimed: what the previous method left dirty in the page cache is written
                # out first, so that its write-back does not slow this one down; then the
                # memory it freed is given time to go back to the hypervisor (see --settle).
                await asyncio.to_thread(os.sync)
                await asyncio.sleep(args.settle)
                if name.startswith("convert"):
                    rows[name].append(await convert(out, durable=name == "convert+fsync"))
                else:
                    t0 = time.monotonic()
                    res = await orch.backup({"big": out}, bitmap=None, durable=name == "backup")
                    rows[name].append(time.monotonic() - t0)
                    copy[name].append(res.timings.copy)
                os.unlink(out)
            report.line(f"  round {r + 1}: " + ", ".join(f"{n} {rows[n][-1]:.3f}s" for n in names))
    finally:
        await mon.execute("blockdev-del", {"node-name": "big"})
        await mon.execute("blockdev-del", {"node-name": "bigf"})
        os.unlink(big)
    med = {k: median(v) for k, v in rows.items()}
    tp = {k: size / MIB / v for k, v in med.items()}
    copy_tp = {k: size / MIB / median(v) for k, v in copy.items()}
    return {"virtual_mib": args.big_mib, "written_mib": args.big_mib // 2,
            "methods": dict(TP_METHODS),
            "seconds_median": med, "mib_per_s_median": tp, "copy_phase_mib_per_s_median": copy_tp,
            # Like for like: both leave the data in the page cache; both write it to disk.
            "ratio": ratio(tp["backup-nofsync"], tp["convert"]),
            "ratio_durable": ratio(tp["backup"], tp["convert+fsync"]),
            "ratio_durable_vs_convert": ratio(tp["backup"], tp["convert"]),
            "runs": rows, "copy_runs": copy}


async def incremental(b: BackupBench, rounds: int, report: Report) -> dict[str, Any]:
    shares, alloc_shares = [], []
    change = DISK // 100
    for r in range(rounds):
        await b.g.run(f"head -c {change} /dev/urandom > /mnt/data/pct{r}.bin; sync", 120)
        await b.backup()
        target = b.last["vblk0"]
        res_bytes = b.last_bytes
        alloc = os.stat(target).st_blocks * 512
        shares.append(res_bytes / DISK)
        alloc_shares.append(alloc / DISK)
        report.line(f"  round {r + 1}: changed {change / MIB:.2f} MiB (1%); incremental copied "
                    f"{res_bytes / MIB:.2f} MiB ({100 * shares[-1]:.2f}% of the disk), target "
                    f"allocates {alloc / MIB:.2f} MiB ({100 * alloc_shares[-1]:.2f}%)")
    return {"disk_mib": DISK // MIB, "changed_mib": change / MIB,
            "copied_share_median": median(shares), "allocated_share_median": median(alloc_shares),
            "copied_shares": shares, "allocated_shares": alloc_shares}


async def run(args: argparse.Namespace, report: Report) -> dict[str, Any]:
    info = machine()
    describe_machine(report, info)
    async with boot_guest() as g:
        mon = await Monitor.connect(g.qmp_path, command_timeout=120.0)
        ga = await GuestAgent.connect(g.agent_path, timeout=10.0)
        async with mon, ga:
            b = BackupBench(g, mon, ga, "host", state=os.path.join(g.workdir, "state"))
            await b.start_hires_writer()
            up, mono = await b.clock()
            await b.wait_progress(up, mono)
            report.line()
            report.line(f"=== window: {args.rounds} rounds of backup (incremental), floor "
                        "(order rotated), +warm-up discarded")
            runs = await window(b, args.rounds, report)
            report.line()
            report.line(f"=== throughput: {args.tp_rounds} rounds, a {args.big_mib} MiB node "
                        f"({args.big_mib // 2} MiB written)")
            tp = await throughput(b, args, report)
            report.line()
            report.line(f"=== incremental after 1% of the {DISK // MIB} MiB disk changed: "
                        f"{args.inc_rounds} rounds")
            inc = await incremental(b, args.inc_rounds, report)

    gap = {m: median([r.gap for r in runs[m]]) for m in runs}
    hires = {m: median([r.hires_gap for r in runs[m] if r.hires_gap is not None]) for m in runs}
    win = {m: median([r.window for r in runs[m] if r.window is not None]) for m in runs}
    report.line()
    report.line("medians:")
    report.table(["", "gap ms", "hi-res gap ms", "host window ms"], [
        [m, f"{gap[m] * 1e3:.0f}", _ms(hires[m]), _ms(win[m])] for m in runs])
    phases = ", ".join(f"{k} {median([r.phases[k] for r in runs['backup']]) * 1e3:.1f}"
                       for k in runs["backup"][0].phases)
    report.line(f"  backup phases (median ms): {phases}")
    w_ratio, w_hires, w_host = (ratio(gap["backup"], gap["floor"]), ratio(hires["backup"], hires["floor"]),
                                ratio(win["backup"], win["floor"]))
    report.line()
    report.line("Targets (ratios of medians, same run):")
    report.line(f"  window: backup / floor gap {w_ratio:.3f} (hi-res {w_hires:.3f}, host window "
                f"{w_host:.3f}); target <= {TARGET_WINDOW}: {verdict(w_ratio <= TARGET_WINDOW)}"
                f" (hi-res: {verdict(w_hires <= TARGET_WINDOW)})")
    tpm = tp["mib_per_s_median"]
    tp_met = min(tp["ratio"], tp["ratio_durable"]) >= TARGET_THROUGHPUT
    report.line("  throughput (MiB/s, whole operation): " + ", ".join(
        f"{n} {tpm[n]:.0f}" for n, _ in TP_METHODS))
    report.line(f"    backup-nofsync / convert {tp['ratio']:.3f}x (both leave the data in the page "
                f"cache); backup / convert+fsync {tp['ratio_durable']:.3f}x (both write it to "
                f"disk); target >= {TARGET_THROUGHPUT}: {verdict(tp_met)}; durable backup / "
                f"plain convert {tp['ratio_durable_vs_convert']:.3f}x")
    share = inc["copied_share_median"]
    report.line(f"  incremental after 1%: copied {100 * share:.2f}% of the disk (target allocates "
                f"{100 * inc['allocated_share_median']:.2f}%); target <= 3%: "
                f"{verdict(share <= TARGET_INCREMENTAL)}")
    return {
        "benchmark": "backup",
        "machine": info,
        "window": {
            "rounds": args.rounds,
            "gap_ms_median": {m: v * 1e3 for m, v in gap.items()},
            "hires_gap_ms_median": {m: v * 1e3 for m, v in hires.items()},
            "host_window_ms_median": {m: v * 1e3 for m, v in win.items()},
            "ratio": w_ratio, "ratio_hires": w_hires, "ratio_host_window": w_host,
        },
        "throughput": tp,
        "incremental": inc,
        "targets": {
            "window": {"limit": TARGET_WINDOW, "value": w_ratio, "met": w_ratio <= TARGET_WINDOW,
                       "hires_value": w_hires, "hires_met": w_hires <= TARGET_WINDOW},
            "throughput": {"limit": TARGET_THROUGHPUT, "value": tp["ratio"],
                           "durable_value": tp["ratio_durable"], "met": tp_met},
            "incremental": {"limit": TARGET_INCREMENTAL, "value": share,
                            "met": share <= TARGET_INCREMENTAL},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="window rounds (default 9)")
    parser.add_argument("--tp-rounds", type=int, default=3, help="throughput rounds (default 3)")
    parser.add_argument("--inc-rounds", type=int, default=3, help="incremental rounds (default 3)")
    parser.add_argument("--big-mib", type=int, default=4096,
                        help="virtual size of the throughput node in MiB (default 4096; half of it "
                             "is written: large enough that the backup's fixed cost of ~0.25 s "
                             "does not dominate)")
    parser.add_argument("--settle", type=float, default=4.0,
                        help="seconds to wait (untimed) before each throughput method, after "
                             "the previous one's output was removed and synced (default 4). On a "
                             "VM with free page reporting (virtio-balloon, as this build machine) "
                             "memory freed more than ~2 s earlier has gone back to the host and is "
                             "faulted in again by the next 2 GiB written, which adds about a second "
                             "to whichever method comes at the wrong moment; waiting puts every "
                             "method in the same state (0: no wait, a bimodal spread)")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON result on stdout (the report goes to stderr)")
    args = parser.parse_args()
    if min(args.rounds, args.tp_rounds, args.inc_rounds) < 1 or args.big_mib < 2 or args.settle < 0:
        parser.error("rounds must be positive, --big-mib at least 2 and --settle not negative")
    report = Report(args.json)
    document = asyncio.run(run(args, report))
    report.emit_json(document)


if __name__ == "__main__":
    main()
