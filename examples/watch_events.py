#!/usr/bin/env python3
"""Watch a VM's QMP events: print each one as it arrives.

The stream is bounded: if this script fell behind, the events it lost are reported
(``EventOverflow``) at the point of loss, and it carries on.

    python examples/watch_events.py --qmp /run/vm1/qmp.sock                  # all, until Ctrl-C
    python examples/watch_events.py --qmp /run/vm1/qmp.sock --duration 60 SHUTDOWN RESET
    python examples/watch_events.py --qmp /run/vm1/qmp.sock --count 1 VSERPORT_CHANGE

    python examples/watch_events.py --demo   # boot the test guest and make it send some events
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

import qmpagent


async def watch(
    mon: qmpagent.Monitor,
    names: list[str],
    count: int | None,
    ready: asyncio.Event | None = None,
) -> int:
    seen = 0
    async with mon.listen(*names) as events:  # registered here: nothing after this is missed
        if ready is not None:
            ready.set()
        while count is None or seen < count:
            try:
                event = await events.get(timeout=None)
            except qmpagent.EventOverflow as exc:
                print(f"warning: {exc.dropped} event(s) lost", file=sys.stderr)
                continue
            ts = event["timestamp"]
            stamp = f"{ts.get('seconds', 0)}.{ts.get('microseconds', 0):06d}"
            print(f"{stamp} {event['event']} {json.dumps(event['data'])}", flush=True)
            seen += 1
    return seen


async def watch_socket(qmp: str, names: list[str], count: int | None, duration: float | None) -> int:
    async with await qmpagent.Monitor.connect(qmp, timeout=10.0) as mon:
        with contextlib.suppress(asyncio.TimeoutError):  # --duration is over
            await asyncio.wait_for(watch(mon, names, count), duration)
    return 0


async def demo() -> int:
    from qmpagent.testing import boot_guest

    print("booting the built-in test guest (QEMU under TCG, real qemu-ga)...", flush=True)
    async with boot_guest() as guest, await qmpagent.Monitor.connect(guest.qmp_path) as mon:
        ready = asyncio.Event()
        watcher = asyncio.create_task(watch(mon, [], None, ready))
        await ready.wait()
        await mon.execute("stop")  # STOP
        await mon.execute("cont")  # RESUME
        await guest.stop_agent()  # qemu-ga exits in the guest: VSERPORT_CHANGE open=false
        await mon.wait_agent_port(open=False, timeout=30)
        # QEMU sends at most one VSERPORT_CHANGE per second per port, keeping the latest state:
        # a quick close and reopen would show as a single open=true.
        await asyncio.sleep(1.1)
        await guest.start_agent()  # ... and comes back: VSERPORT_CHANGE open=true
        await mon.wait_agent_port(open=True, timeout=30)
        # Give the last (rate-limited) event time to arrive, then stop watching.
        await asyncio.sleep(1.5)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", metavar="EVENT", nargs="*", help="only these events")
    parser.add_argument("--qmp", metavar="PATH", help="QEMU's QMP unix socket")
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="stop after SECONDS")
    parser.add_argument("--count", type=int, metavar="N", help="stop after N events")
    parser.add_argument("--demo", action="store_true", help="boot the built-in test guest and use it")
    args = parser.parse_args()
    if args.demo:
        return asyncio.run(demo())
    if not args.qmp:
        parser.error("--qmp is needed (or --demo)")
    try:
        return asyncio.run(watch_socket(args.qmp, args.names, args.count, args.duration))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
