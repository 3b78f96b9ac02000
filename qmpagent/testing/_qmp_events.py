"""QMP events as the fake QEMU sends them: the message (:func:`make_event`) and QEMU's
per-event throttle (``monitor_qapi_event_queue``: the first event of a key goes out at once,
later ones within the period replace each other and the latest goes out when it ends, with
the timestamp of when it happened).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["EventThrottle", "make_event"]


def make_event(name: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An event message as QEMU sends it, timestamped now."""
    now = time.time()
    event: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1_000_000)},
    }
    if data is not None:
        event["data"] = dict(data)
    return event


@dataclass
class _RateLimit:
    """QEMU's per-event-key throttle state (``MonitorQAPIEventState``)."""

    pending: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None


class EventThrottle:
    """Throttles events per key; sends with ``send``.

    Args:
        send: sends one event message to the clients.
        period: event name -> minimum seconds between two events of one key (0: none);
            asked at each event, so the owner may change its limits at any time.
    """

    def __init__(
        self,
        send: Callable[[Mapping[str, Any]], Awaitable[None]],
        period: Callable[[str], float],
    ) -> None:
        self._send = send
        self._period = period
        self._limits: dict[tuple[str, str], _RateLimit] = {}

    @property
    def settled(self) -> bool:
        """Whether no throttle period is running."""
        return not self._limits

    async def queue(
        self, name: str, data: Mapping[str, Any] | None = None, *, key: str | None = None
    ) -> None:
        """Send the event now, or hold it until its key's period ends (see the module doc).

        Raises:
            TypeError: ``data`` is not JSON-serialisable.
        """
        event = make_event(name, data)
        period = self._period(name)
        if period <= 0:
            await self._send(event)
            return
        if key is None:
            key = str((data or {}).get("id", ""))
        state = self._limits.get((name, key))
        if state is not None:
            state.pending = event  # the latest wins; sent when the period ends
            return
        state = _RateLimit()
        self._limits[(name, key)] = state
        await self._send(event)
        state.task = asyncio.ensure_future(self._timer(name, key, state, period))

    async def settle(self, timeout: float) -> None:
        """Wait until every held event has been sent and every period has passed.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while self._limits:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake QMP: events still throttled after {timeout}s")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Drop the held events and stop the timers. Idempotent."""
        tasks = [lim.task for lim in self._limits.values() if lim.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._limits.clear()

    async def _timer(self, name: str, key: str, state: _RateLimit, period: float) -> None:
        try:
            while True:
                await asyncio.sleep(period)
                if state.pending is None:
                    break
                event, state.pending = state.pending, None
                await self._send(event)
        finally:
            if self._limits.get((name, key)) is state:
                del self._limits[(name, key)]
