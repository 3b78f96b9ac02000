"""The fake agent's callbacks to its owner (e.g. a fake VM's QMP server): the port opened or
closed, the guest shut down, the guest suspended.

A callback may return an awaitable (a fake QMP server's async ``set_port_open``): it is run
as a task, the callbacks' tasks one after the other, so the owner sees them in order. A
callback that fails is logged and does not stop the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["AgentCallbacks"]

log = logging.getLogger("qmpagent.testing.fake_agent")  # the agent's log, as before the split


class AgentCallbacks:
    """The callbacks of one fake agent (each may be ``None``).

    Args:
        on_port_change: called with ``True``/``False`` when the port opens/closes.
        on_shutdown: called with the mode after a successful ``guest-shutdown``.
        on_suspend: called with the mode after ``guest-suspend-*``.
    """

    def __init__(
        self,
        on_port_change: Callable[[bool], object] | None,
        on_shutdown: Callable[[str], object] | None,
        on_suspend: Callable[[str], object] | None,
    ) -> None:
        self._on_port_change = on_port_change
        self._on_shutdown = on_shutdown
        self._on_suspend = on_suspend
        self._task: asyncio.Task[None] | None = None

    def port_changed(self, open: bool) -> None:
        """The agent's port opened (``True``) or closed."""
        self._fire(self._on_port_change, open)

    def shut_down(self, mode: str) -> None:
        """The guest shut down (``mode``: powerdown, halt, reboot)."""
        self._fire(self._on_shutdown, mode)

    def suspended(self, mode: str) -> None:
        """The guest was suspended (``mode``: disk, ram, hybrid)."""
        self._fire(self._on_suspend, mode)

    async def close(self) -> None:
        """Cancel the callback task still running, if any, and wait for it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _fire(self, callback: Callable[..., object] | None, *args: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(*args)
        except Exception:
            log.exception("fake agent: callback %r failed", callback)
            return
        if not inspect.isawaitable(result):
            return
        previous = self._task

        async def run(awaitable: Awaitable[object]) -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            try:
                await awaitable
            except Exception:
                log.exception("fake agent: callback %r failed", callback)

        try:
            self._task = asyncio.ensure_future(run(result))
        except RuntimeError:  # no running loop
            if inspect.iscoroutine(result):
                result.close()
            log.warning("fake agent: async callback %r called outside the event loop", callback)
