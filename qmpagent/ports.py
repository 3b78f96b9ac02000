"""Virtio-serial ports and the guest agent's port state, as QMP shows them: :class:`AgentPorts`
(behind :meth:`~qmpagent.Monitor.agent_port` and friends).

Which chardev backs which ``virtserialport`` is found once with ``qom-list``/``qom-get`` and
cached; whether the guest has a port open is always read afresh from ``query-chardev``
(``frontend-open``), the authoritative source. ``VSERPORT_CHANGE`` is only a hint: QEMU
rate-limits and coalesces it, and sends none for ports without an id.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Final

from ._monitor_api import MonitorAPI
from ._replies import entries, member
from .errors import AgentUnavailable, EventOverflow, MonitorCommandError, MonitorTimeout
from .events import EventMatch
from .timeouts import deadline_raising

__all__ = ["AGENT_PORT_NAME", "PORT_POLL_INTERVAL", "AgentPorts", "VirtioSerialPort"]

log = logging.getLogger("qmpagent.monitor")  # the logger these messages always had

#: The virtio-serial port name the QEMU guest agent opens in the guest.
AGENT_PORT_NAME: Final = "org.qemu.guest_agent.0"

#: How often, in seconds, waits for the agent port re-read ``query-chardev`` when no
#: ``VSERPORT_CHANGE`` arrives (the event is rate-limited and coalesced by QEMU, and not sent at
#: all for ports without an id).
PORT_POLL_INTERVAL: Final = 1.0

_PERIPHERAL: Final = "/machine/peripheral"  # devices with an id; "-anon": those without


@dataclass(frozen=True, slots=True)
class VirtioSerialPort:
    """A ``virtserialport`` device and the state of its chardev.

    Attributes:
        device_id: the device's qdev id (what ``VSERPORT_CHANGE`` names), or ``None`` for a
            device without an id (QEMU sends no ``VSERPORT_CHANGE`` for those).
        chardev: the label of the chardev behind the port (e.g. ``"qga0"``).
        name: the port name the guest sees (e.g. ``"org.qemu.guest_agent.0"``), if known.
        open: whether a program in the guest has the port open right now (``frontend-open``
            of the chardev in ``query-chardev``).
        qom_path: the device's QOM path, if known.
    """

    device_id: str | None
    chardev: str
    name: str | None
    open: bool
    qom_path: str | None = None

    def with_open(self, open: bool) -> VirtioSerialPort:
        """This port, with its open state set to ``open``. Raises nothing."""
        return VirtioSerialPort(self.device_id, self.chardev, self.name, open, self.qom_path)


class AgentPorts:
    """The virtio-serial ports of one QEMU, and the guest agent's among them.

    Args:
        mon: the monitor to query (its public API only).
    """

    __slots__ = ("_mon", "_ports")

    def __init__(self, mon: MonitorAPI) -> None:
        self._mon = mon
        self._ports: list[VirtioSerialPort] | None = None  # found once; None: find again

    async def virtio_serial_ports(self, *, refresh: bool = False) -> list[VirtioSerialPort]:
        """See :meth:`~qmpagent.Monitor.virtio_serial_ports`."""
        if self._ports is None or refresh:
            self._ports = await self._discover()
        states = await self._chardev_states()
        return [p.with_open(states.get(p.chardev, False)) for p in self._ports]

    async def serial_port(self, device_id: str) -> VirtioSerialPort:
        """See :meth:`~qmpagent.Monitor.serial_port`."""
        for refresh in (False, True):
            for port in await self.virtio_serial_ports(refresh=refresh):
                if port.device_id == device_id:
                    return port
        raise MonitorCommandError(
            "qom-list", "DeviceNotFound", f"no virtserialport with id {device_id!r}"
        )

    async def agent_port(self, chardev: str | None) -> VirtioSerialPort:
        """See :meth:`~qmpagent.Monitor.agent_port`."""
        port = await self._agent_port_info(chardev)
        states = await self._chardev_states()
        if port.chardev not in states:
            self._ports = None  # the device may have been replaced: find it again next time
            raise AgentUnavailable(f"QEMU has no chardev {port.chardev!r}")
        return port.with_open(states[port.chardev])

    async def wait_agent_port(
        self, *, timeout: float | None, open: bool, chardev: str | None, poll_interval: float
    ) -> VirtioSerialPort:
        """See :meth:`~qmpagent.Monitor.wait_agent_port`; ``poll_interval``: seconds between
        re-reads of ``query-chardev`` when no event comes."""
        want = "open" if open else "closed"
        async with deadline_raising(timeout, lambda: MonitorTimeout(
            f"the agent port ({chardev or AGENT_PORT_NAME}) was not {want} within {timeout:g}s"
        )):
            port = await self._agent_port_info(chardev)
            hint: EventMatch | None = None
            if port.device_id is not None:
                hint = {"id": port.device_id}
            # Listen first, then read the state: no change can slip between the two.
            async with self._mon.listen("VSERPORT_CHANGE", maxsize=8, match=hint) as events:
                while True:
                    port = await self.agent_port(chardev)
                    if port.open is open:
                        return port
                    with contextlib.suppress(MonitorTimeout, EventOverflow):
                        await events.get(timeout=poll_interval)
                    while True:  # one re-read covers every queued hint
                        with contextlib.suppress(EventOverflow):
                            if events.get_nowait() is None:
                                break

    async def _agent_port_info(self, chardev: str | None) -> VirtioSerialPort:
        fresh = self._ports is None
        while True:
            if self._ports is None:
                self._ports = await self._discover()
            if chardev is None:
                found = [p for p in self._ports if p.name == AGENT_PORT_NAME]
            else:
                found = [p for p in self._ports if p.chardev == chardev]
            if found:
                return found[0]
            if fresh:
                break
            self._ports, fresh = None, True  # the cached list may be stale: look again
        if chardev is not None:  # not a virtserialport we can see: go by the chardev alone
            return VirtioSerialPort(None, chardev, None, False)
        raise AgentUnavailable(f"QEMU has no virtserialport named {AGENT_PORT_NAME!r}")

    async def _discover(self) -> list[VirtioSerialPort]:
        ports = []
        for base in (_PERIPHERAL, _PERIPHERAL + "-anon"):
            for node in await self._port_nodes(base):
                port = await self._read_port(base, node)
                if port is not None:
                    ports.append(port)
        log.debug("virtio-serial ports: %s", ports)
        return ports

    async def _port_nodes(self, base: str) -> list[str]:
        """The names of the ``virtserialport`` children of QOM path ``base``."""
        try:
            children = await self._mon.execute("qom-list", {"path": base})
        except MonitorCommandError:
            return []
        if not isinstance(children, list):
            return []
        return [
            child["name"] for child in children
            if isinstance(child, dict)
            and child.get("type") == "child<virtserialport>"
            and isinstance(child.get("name"), str)
        ]

    async def _read_port(self, base: str, node: str) -> VirtioSerialPort | None:
        path = f"{base}/{node}"
        try:
            name = await self._mon.execute("qom-get", {"path": path, "property": "name"})
            chardev = await self._mon.execute("qom-get", {"path": path, "property": "chardev"})
        except MonitorCommandError as exc:
            log.debug("skipping %s: %s", path, exc)
            return None
        if not isinstance(chardev, str) or not chardev:
            return None
        return VirtioSerialPort(
            device_id=node if base == _PERIPHERAL else None,
            chardev=chardev,
            name=name if isinstance(name, str) and name else None,
            open=False,
            qom_path=path,
        )

    async def _chardev_states(self) -> dict[str, bool]:
        what = "query-chardev"
        states = {}
        for cd in entries(what, await self._mon.execute(what)):
            label = member(what, cd, "label", str, required=True)
            states[label] = member(what, cd, "frontend-open", bool) is True
        return states
