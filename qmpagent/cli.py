"""The ``qmpagent`` command line. The only module that prints, configures logging or calls
``asyncio.run``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from .errors import QMPAgentError, ThawError

__all__ = ["main"]


def _print_demo(report: object) -> None:
    from .testing.demo import DemoReport

    assert isinstance(report, DemoReport)
    r = report.result
    t = r.timings
    ok = "quiesced" if r.quiesced else f"NOT quiesced ({r.reason})"
    print(f"Demo guest booted in {report.boot_time:.2f}s (QEMU TCG, real qemu-ga inside).")
    print(f"Snapshot: {ok}; froze {r.frozen} filesystem(s), thawed {r.thawed}; "
          f"freeze owner: {r.freeze_owner}")
    print("Phases:")
    for name in ("preflight", "prepare", "freeze", "transaction", "thaw"):
        print(f"  {name:<12} {getattr(t, name) * 1000:8.1f} ms")
    print(f"  {'total':<12} {t.total * 1000:8.1f} ms")
    window = f"{r.freeze_window * 1000:.1f} ms" if r.freeze_window is not None else "none"
    print(f"Freeze window seen by the host (freeze reply -> thaw reply): {window}")
    print(
        f"Gap seen in the guest's own writer log: {report.guest_gap * 1000:.0f} ms "
        f"(normal period {report.writer_period * 1000:.0f} ms; writer resumed: "
        f"{'yes' if report.writer_resumed else 'NO'})"
    )
    for node, ov in r.overlays.items():
        print(f"Overlay: {node} -> {ov} ({r.files[node]})")
    verdict = "clean" if report.fsck.clean else f"NOT CLEAN (exit {report.fsck.returncode})"
    print(f"e2fsck -fn of the snapshot's base image: {verdict}")
    if not report.fsck.clean:
        print(report.fsck.output)


async def _demo(args: argparse.Namespace) -> int:
    from .testing.demo import run_demo

    report = await run_demo(quiesce=args.quiesce, freeze_timeout=args.freeze_timeout)
    _print_demo(report)
    return 0 if report.fsck.clean and report.writer_resumed else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qmpagent`` command."""
    parser = argparse.ArgumentParser(
        prog="qmpagent",
        description="Talk QMP and the QEMU guest agent; take quiesced live snapshots.",
    )
    parser.add_argument("--debug", action="store_true", help="log debug output and show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo",
        help="boot the built-in demo guest and take a quiesced snapshot of it",
        description="Boot the built-in demo guest (real QEMU, real qemu-ga, a writer logging "
        "every 10 ms), take a quiesced snapshot of its disk and report the phases, the freeze "
        "window seen by the host and by the guest, and e2fsck of the snapshot's base image.",
    )
    demo.add_argument("--quiesce", choices=("required", "preferred", "off"), default="required")
    demo.add_argument("--freeze-timeout", type=float, default=10.0, metavar="SECONDS")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = asyncio.run(args.func(args))
        return code
    except KeyboardInterrupt:
        return 130
    except ThawError as exc:
        if args.debug:
            raise
        print(f"qmpagent: THAW FAILED, THE GUEST MAY STILL BE FROZEN: {exc}", file=sys.stderr)
        return 7
    except QMPAgentError as exc:
        if args.debug:
            raise
        print(f"qmpagent: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
