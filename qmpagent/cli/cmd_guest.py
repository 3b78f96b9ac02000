"""``qmpagent demo`` and ``qmpagent build-guest``: the built-in test guest
(:mod:`qmpagent.testing`, imported only when one of them runs)."""

from __future__ import annotations

import argparse
import dataclasses

import anyio

from . import argtypes
from .command import Command, CommonOptions
from .exit_codes import ExitCode
from .output import emit_json, err, out

__all__ = ["BUILD_GUEST", "DEMO"]


@dataclasses.dataclass(frozen=True)
class _DemoOptions(CommonOptions):
    quiesce: str
    freeze_timeout: float


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiesce", choices=("required", "preferred", "off"), default="required")
    p.add_argument("--freeze-timeout", type=argtypes.seconds, default=10.0, metavar="SECONDS")


def _print_demo(report: object) -> None:
    from ..testing.demo import DemoReport

    assert isinstance(report, DemoReport)
    r = report.result
    t = r.timings
    ok = "quiesced" if r.quiesced else f"NOT quiesced ({r.reason})"
    out(f"Demo guest booted in {report.boot_time:.2f}s (QEMU TCG, real qemu-ga inside).")
    out(f"Snapshot: {ok}; froze {r.frozen} filesystem(s), thawed {r.thawed}; "
        f"freeze owner: {r.freeze_owner}")
    out("Phases:")
    for name in ("preflight", "prepare", "freeze", "transaction", "thaw"):
        out(f"  {name:<12} {getattr(t, name) * 1000:8.1f} ms")
    out(f"  {'total':<12} {t.total * 1000:8.1f} ms")
    window = f"{r.freeze_window * 1000:.1f} ms" if r.freeze_window is not None else "none"
    out(f"Freeze window seen by the host (freeze reply -> thaw reply): {window}")
    out(
        f"Gap seen in the guest's own writer log: {report.guest_gap * 1000:.0f} ms "
        f"(normal period {report.writer_period * 1000:.0f} ms; writer resumed: "
        f"{'yes' if report.writer_resumed else 'NO'})"
    )
    for node, ov in r.overlays.items():
        out(f"Overlay: {node} -> {ov} ({r.files[node]})")
    verdict = "clean" if report.fsck.clean else f"NOT CLEAN (exit {report.fsck.returncode})"
    out(f"e2fsck -fn of the snapshot's base image: {verdict}")
    if not report.fsck.clean:
        out(report.fsck.output)


async def _demo(opts: _DemoOptions) -> int:
    from ..testing.demo import run_demo

    report = await run_demo(quiesce=opts.quiesce, freeze_timeout=opts.freeze_timeout)
    if opts.json:
        emit_json(dataclasses.asdict(report))
    else:
        _print_demo(report)
    ok = report.fsck.clean and report.writer_resumed
    if not ok:
        err("error: the demo's checks failed (see above)")
    return ExitCode.OK if ok else ExitCode.ERROR


@dataclasses.dataclass(frozen=True)
class _BuildGuestOptions(CommonOptions):
    peer: str | None


def _build_guest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer", choices=("host", "debian13"), default=None,
                   help="whose QEMU, qemu-ga and kernel (default: $QMPAGENT_PEER, else host)")


async def _build_guest(opts: _BuildGuestOptions) -> int:
    from ..testing.image import build_guest_image

    image = await anyio.to_thread.run_sync(lambda: build_guest_image(peer=opts.peer))
    if opts.json:
        emit_json({"directory": str(image.directory), "kernel": str(image.kernel),
                   "initrd": str(image.initrd), "kernel_version": image.kernel_version,
                   "peer": image.peer})
    else:
        out(str(image.directory))
    return ExitCode.OK


#: ``qmpagent demo``.
DEMO: Command[_DemoOptions] = Command(
    name="demo",
    help="boot the built-in demo guest and take a quiesced snapshot of it",
    description="Boot the built-in demo guest (real QEMU, real qemu-ga, a writer logging "
    "every 10 ms), take a quiesced snapshot of its disk and report the phases, the freeze "
    "window seen by the host and by the guest, and e2fsck of the snapshot's base image.",
    options=_DemoOptions,
    run=_demo,
    add_arguments=_demo_arguments,
)

#: ``qmpagent build-guest``.
BUILD_GUEST: Command[_BuildGuestOptions] = Command(
    name="build-guest",
    help="build (or find in the cache) the test guest the demo and the tests boot",
    description="Build the minimal test guest (kernel, initramfs with busybox and "
    "qemu-ga, ext4 data disks) from a peer's Debian packages into the cache "
    "($QMPAGENT_GUEST_CACHE or ~/.cache/qmpagent/guest) and print its directory. Fast when "
    "the inputs are unchanged. The peer 'host' is this machine's own packages; 'debian13' "
    "is a Debian 13 root (QEMU 10.0, qemu-ga 10.0) provisioned with debootstrap on first use "
    "(as root, about a minute).",
    options=_BuildGuestOptions,
    run=_build_guest,
    add_arguments=_build_guest_arguments,
)
