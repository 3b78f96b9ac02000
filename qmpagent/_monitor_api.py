"""What the monitor's helper modules (:mod:`~qmpagent.jobs`, :mod:`~qmpagent.ports`,
:mod:`~qmpagent.block`) use of a :class:`~qmpagent.Monitor`: part of its public API, as a
protocol. They depend on this, not on :mod:`qmpagent.monitor`, which imports them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from .events import EventMatch, EventStream
from .timeouts import USE_CLIENT_DEFAULT, Timeout

__all__ = ["MonitorAPI"]


class MonitorAPI(Protocol):
    """:meth:`~qmpagent.Monitor.execute`, :meth:`~qmpagent.Monitor.listen` and
    :attr:`~qmpagent.Monitor.is_open`, as the helper modules call them."""

    @property
    def is_open(self) -> bool:
        """Whether commands can be sent."""

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> Any:
        """Run a QMP command and return its ``return`` value."""

    def listen(
        self, *names: str, maxsize: int | None = None, match: EventMatch | None = None
    ) -> EventStream:
        """A bounded stream of events, registered when entered."""
