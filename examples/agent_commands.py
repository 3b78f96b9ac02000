#!/usr/bin/env python3
"""Talk to a VM's guest agent: ping, version, freeze state, OS, filesystems, run a program.

With ``--qmp``, first ask QEMU whether the agent's virtio-serial port is open in the guest: a
stopped ``qemu-ga`` is then reported at once instead of after a timeout.

    python examples/agent_commands.py --agent /run/vm1/qga.sock [--qmp /run/vm1/qmp.sock]
    python examples/agent_commands.py --demo   # boot the built-in test guest and use it
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import qmpagent


async def agent_tour(agent: str, qmp: str | None) -> int:
    if qmp is not None:
        async with await qmpagent.Monitor.connect(qmp, timeout=10.0) as mon:
            if not await mon.agent_port_open():
                print("the guest agent is not running (its port is closed)", file=sys.stderr)
                return 1
    try:
        # connect() syncs the channel (guest-sync-delimited) before it returns.
        async with await qmpagent.GuestAgent.connect(agent, timeout=5.0) as ga:
            await ga.ping()
            info = await ga.info()
            freeze_ok = info.is_enabled("guest-fsfreeze-freeze")
            print(f"agent: qemu-ga {info.version}, {len(info.commands)} commands, "
                  f"freeze {'enabled' if freeze_ok else 'disabled'}")
            print(f"filesystems: {(await ga.fsfreeze_status()).value}")
            osinfo = await ga.get_osinfo()
            print(f"os: {osinfo.get('kernel-release', '?')} {osinfo.get('machine', '?')}")
            for fs in await ga.get_fsinfo():
                print(f"mounted: {fs.get('mountpoint')} ({fs.get('type')} on {fs.get('name')})")
            result = await ga.exec("/bin/sh", ["-c", "uname -sr"], timeout=30.0)
            print(f"exec: exit {result.exitcode}, output: {result.text.strip()}")
            uptime = await ga.read_file("/proc/uptime")
            print(f"uptime: {float(uptime.split()[0]):.1f} s")
    except qmpagent.AgentUnavailable as exc:
        print(f"the guest agent is unavailable: {exc}", file=sys.stderr)
        return 1
    except qmpagent.AgentError as exc:  # AgentCommandError, AgentTimeout, AgentProtocolError
        print(f"agent error: {exc}", file=sys.stderr)
        return 1
    return 0


async def demo() -> int:
    from qmpagent.testing import boot_guest

    print("booting the built-in test guest (QEMU under TCG, real qemu-ga)...", flush=True)
    async with boot_guest() as guest:
        return await agent_tour(str(guest.agent_path), str(guest.qmp_path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agent", metavar="PATH", help="the guest agent's unix socket")
    parser.add_argument("--qmp", metavar="PATH", help="QEMU's QMP unix socket (optional)")
    parser.add_argument("--demo", action="store_true", help="boot the built-in test guest and use it")
    args = parser.parse_args()
    if args.demo:
        return asyncio.run(demo())
    if not args.agent:
        parser.error("--agent is needed (or --demo)")
    return asyncio.run(agent_tour(args.agent, args.qmp))


if __name__ == "__main__":
    sys.exit(main())
