"""QMP events: bounded :class:`EventStream` queues and the :class:`EventHub` that feeds them.

``qemu.qmp`` dispatches every event to every registered listener and, by default, also into a
listener of its own that is never drained (it grows without bound). Here the default listener
is switched off (:func:`silence_default_listener`), and each stream registers a listener that
never blocks and keeps no history; what does not fit in a stream's queue is reported to its
consumer as :class:`~qmpagent.EventOverflow` at the point of loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypedDict

from qemu.qmp import EventListener, Message, QMPClient
from qemu.qmp.error import QMPError

from .errors import EventOverflow, MonitorTimeout, MonitorUnavailable, UsageError
from .timeouts import USE_CLIENT_DEFAULT, Timeout, deadline_raising, resolve_timeout

__all__ = [
    "EventHub",
    "EventMatch",
    "EventStream",
    "QMPEvent",
    "data_matches",
    "silence_default_listener",
]

log = logging.getLogger("qmpagent.monitor")  # the logger these messages always had


class QMPEvent(TypedDict):
    """A QMP event as :class:`EventStream` yields it (a plain ``dict`` at run time).

    ``data`` is ``{}`` for events QEMU sends without data; ``timestamp`` is QEMU's
    ``{"seconds": ..., "microseconds": ...}``.
    """

    event: str
    data: dict[str, Any]
    timestamp: dict[str, int]


#: Filters of :meth:`Monitor.listen`: a dict that must be a subset of the event's ``data``, or a
#: predicate on the whole event.
EventMatch = Mapping[str, Any] | Callable[[QMPEvent], bool]


def _reject_all(_event: Message) -> bool:
    return False


def silence_default_listener(client: QMPClient) -> None:
    """Switch off ``qemu.qmp``'s default listener (``client.events``), which takes every event
    and is never drained, and drop what it holds. (``qemu.qmp`` refuses to remove it.)"""
    client.events.event_filter = _reject_all
    client.events.clear()


def data_matches(expected: Mapping[str, Any], actual: object) -> bool:
    """Whether ``expected`` is a subset of ``actual``, recursively for nested dicts.

    Values compare with ``==``, except that a bool never matches a number (``True != 1`` here).
    """
    if not isinstance(actual, Mapping):
        return False
    for key, want in expected.items():
        if key not in actual:
            return False
        have = actual[key]
        if isinstance(want, Mapping):
            if not data_matches(want, have):
                return False
        elif isinstance(want, bool) is not isinstance(have, bool) or have != want:
            return False
    return True


def _predicate(match: EventMatch | None) -> Callable[[QMPEvent], bool] | None:
    """The predicate a ``match=`` argument stands for (``None``: accept every event)."""
    if match is None or callable(match):
        return match
    if isinstance(match, Mapping):
        expected = dict(match)  # a snapshot: the caller may change its dict afterwards
        return lambda event: data_matches(expected, event["data"])
    raise UsageError(f"match must be a dict or a callable, not {type(match).__name__}")


def _to_event(msg: Message) -> QMPEvent:
    data = msg.get("data")
    timestamp = msg.get("timestamp")
    return {
        "event": str(msg["event"]),
        "data": data if isinstance(data, dict) else {},
        "timestamp": timestamp if isinstance(timestamp, dict) else {},
    }


class _Gap:
    """Marks where events were dropped in an :class:`EventStream`'s queue."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 1


class _StreamListener(EventListener):
    """The ``qemu.qmp`` listener behind an :class:`EventStream`.

    ``qemu.qmp`` dispatches events by awaiting ``put`` on every registered listener; this one
    never blocks and keeps no history (the base class keeps both unbounded).
    """

    def __init__(self, stream: EventStream, names: tuple[str, ...]) -> None:
        super().__init__(names or None)
        self._stream = stream

    async def put(self, event: Message) -> None:
        if self.accept(event):
            self._stream._push(event)


class EventHub:
    """The event streams of one QMP connection (one per :class:`~qmpagent.Monitor`).

    It registers each :class:`EventStream` with the ``qemu.qmp`` client while the stream is
    entered, and ends them all with :class:`~qmpagent.MonitorUnavailable` when the connection
    ends (:meth:`fail_all`).

    Args:
        client: the connected client.
        require_open: raises :class:`~qmpagent.MonitorUnavailable` (naming its argument) unless
            the connection is open; called when a stream is entered.
        default_timeout: the current default timeout of :meth:`EventStream.get` and
            :meth:`EventStream.wait` (read at each call: it may change).
        queue_size: the default bound of a stream's queue.
    """

    __slots__ = ("_client", "_default_timeout", "_require_open", "_streams", "queue_size")

    def __init__(
        self,
        client: QMPClient,
        *,
        require_open: Callable[[str], None],
        default_timeout: Callable[[], float | None],
        queue_size: int,
    ) -> None:
        self._client = client
        self._require_open = require_open
        self._default_timeout = default_timeout
        self._streams: set[EventStream] = set()
        self.queue_size = queue_size

    def stream(
        self, names: tuple[str, ...], maxsize: int | None, match: EventMatch | None
    ) -> EventStream:
        """A new stream (see :meth:`~qmpagent.Monitor.listen`), registered when entered.

        Raises:
            UsageError: a name is not a string, ``maxsize`` < 1, or ``match`` is neither a dict
                nor callable.
        """
        for name in names:
            if not isinstance(name, str):
                raise UsageError(f"event names are strings, not {name!r}")
        return EventStream(self, names, self.queue_size if maxsize is None else maxsize, match)

    def default_timeout(self) -> float | None:
        """The streams' default timeout right now, in seconds (``None``: none)."""
        return self._default_timeout()

    def fail_all(self, message: str, cause: BaseException | None) -> None:
        """End every stream: after its queued events, it raises
        :class:`~qmpagent.MonitorUnavailable` with ``message`` (from ``cause``)."""
        for stream in list(self._streams):
            stream._fail(message, cause)

    def _register(self, stream: EventStream) -> None:
        self._require_open("listen")
        self._client.register_listener(stream._listener)
        self._streams.add(stream)

    def _unregister(self, stream: EventStream) -> None:
        self._streams.discard(stream)
        with contextlib.suppress(ValueError, QMPError):  # already gone with the connection
            self._client.remove_listener(stream._listener)


class EventStream:
    """A bounded stream of QMP events; made by :meth:`Monitor.listen`.

    Use it as an async context manager: the stream is registered on entry (so events of a
    command issued inside the block cannot be missed) and unregistered on exit. Inside, iterate
    it (``async for event in stream``) or call :meth:`get` / :meth:`wait`.

    The queue holds at most :attr:`maxsize` events. When it is full, newer events are dropped and
    the loss is reported in order: the consumer first receives every event queued before the
    loss, then :class:`~qmpagent.EventOverflow` (with ``.dropped``) is raised, then the events
    that arrived after room was made again follow. Iteration may be resumed after the error.
    """

    def __init__(
        self,
        hub: EventHub,
        names: tuple[str, ...],
        maxsize: int,
        match: EventMatch | None,
    ) -> None:
        """Made by :meth:`Monitor.listen` (see there).

        Raises:
            UsageError: ``maxsize`` < 1, or ``match`` is neither a dict nor callable.
        """
        if maxsize < 1:
            raise UsageError(f"maxsize must be at least 1, not {maxsize}")
        self._hub = hub
        self._names = names
        self._maxsize = maxsize
        self._predicate = _predicate(match)
        self._listener = _StreamListener(self, names)
        self._items: deque[QMPEvent | _Gap] = deque()
        self._queued = 0  # events (not gaps) in _items
        self._dropped = 0
        self._waiter: asyncio.Future[None] | None = None
        self._active = False
        self._exited = False
        self._error: str | None = None
        self._error_cause: BaseException | None = None

    def __repr__(self) -> str:
        names = ",".join(self._names) or "*"
        return f"<EventStream {names} queued={self._queued} dropped={self._dropped}>"

    @property
    def names(self) -> tuple[str, ...]:
        """The event names this stream accepts (empty: all events). Raises nothing."""
        return self._names

    @property
    def maxsize(self) -> int:
        """The most events the queue holds. Raises nothing."""
        return self._maxsize

    @property
    def dropped(self) -> int:
        """How many events were dropped so far because the queue was full. Raises nothing."""
        return self._dropped

    def qsize(self) -> int:
        """How many events are queued (not counting overflow markers). Raises nothing."""
        return self._queued

    # registration -------------------------------------------------------------------------

    async def __aenter__(self) -> EventStream:
        if self._active or self._exited:
            raise UsageError("an EventStream can be entered only once")
        self._hub._register(self)
        self._active = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._active:
            self._active = False
            self._exited = True
            self._hub._unregister(self)
            self._items.clear()
            self._queued = 0
            self._wake()

    # producer side (called from qemu.qmp's reader task) ---------------------------------

    def _push(self, msg: Message) -> None:
        event = _to_event(msg)
        if self._predicate is not None:
            try:
                wanted = self._predicate(event)
            except Exception as exc:
                # A caller's predicate runs in qemu.qmp's reader task: if it raised there it
                # would drop the whole connection. It ends this stream instead.
                self._fail(f"the event filter of {self!r} raised {exc!r}", exc)
                return
            if not wanted:
                return
        items = self._items
        if self._queued >= self._maxsize:
            self._dropped += 1
            tail = items[-1] if items else None
            if isinstance(tail, _Gap):
                tail.count += 1
            else:
                items.append(_Gap())
                log.debug("%r is full: dropping events until the consumer catches up", self)
        else:
            items.append(event)
            self._queued += 1
        self._wake()

    def _fail(self, message: str, cause: BaseException | None = None) -> None:
        if self._error is None:
            self._error = message
            self._error_cause = cause
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # consumer side ---------------------------------------------------------------------

    def _take(self) -> QMPEvent:
        item = self._items.popleft()
        if isinstance(item, _Gap):
            raise EventOverflow(item.count)
        self._queued -= 1
        return item

    def _raise_closed(self) -> NoReturn:
        if self._error is not None:
            raise MonitorUnavailable(self._error) from self._error_cause
        raise UsageError("the EventStream is not active (use it inside `async with`)")

    def get_nowait(self) -> QMPEvent | None:
        """The next queued event, or ``None`` if none is queued.

        Raises:
            EventOverflow: events were lost at this point of the stream.
            MonitorUnavailable: nothing is queued and the connection is lost or closed.
            UsageError: the stream is not active.
        """
        if self._items:
            return self._take()
        if self._error is not None or not self._active:
            self._raise_closed()
        return None

    async def get(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> QMPEvent:
        """Wait for the next event.

        Args:
            timeout: seconds to wait; ``None`` waits forever; by default the monitor's
                :attr:`~Monitor.command_timeout`.

        Raises:
            EventOverflow: events were lost at this point of the stream.
            MonitorTimeout: no event arrived in time.
            MonitorUnavailable: the connection was lost or closed (after queued events).
            UsageError: the stream is not active.
        """
        if self._items:
            return self._take()
        if self._error is not None or not self._active:
            self._raise_closed()
        limit = resolve_timeout(timeout, self._hub.default_timeout())
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            if limit is None:
                await waiter  # no timer at all: the common case of `async for`
            else:
                names = ", ".join(self._names) or "any"
                async with deadline_raising(
                    limit, lambda: MonitorTimeout(f"no {names} event within {limit:g}s")
                ):
                    await waiter
        finally:
            self._waiter = None
        if self._items:
            return self._take()
        self._raise_closed()

    async def wait(
        self,
        name: str | None = None,
        match: EventMatch | None = None,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> QMPEvent:
        """Skip events until one named ``name`` (if given) matches ``match`` (if given).

        Args:
            name: the event name to wait for; ``None`` accepts any name the stream accepts.
            match: a dict that must be a subset of the event's ``data``, or a predicate.
            timeout: for the whole wait; ``None`` waits forever; by default the monitor's
                :attr:`~Monitor.command_timeout`.

        Raises:
            EventOverflow: events were lost while waiting (the awaited one may be among them).
            MonitorTimeout: no such event arrived in time.
            MonitorUnavailable: the connection was lost or closed.
            UsageError: the stream is not active, or ``match`` is neither a dict nor callable.
        """
        predicate = _predicate(match)
        limit = resolve_timeout(timeout, self._hub.default_timeout())
        async with deadline_raising(
            limit, lambda: MonitorTimeout(f"no {name or 'matching'} event within {limit:g}s")
        ):
            while True:
                event = await self.get(timeout=None)
                if name is not None and event["event"] != name:
                    continue
                if predicate is None or predicate(event):
                    return event

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> QMPEvent:
        """The next event, waiting as long as it takes.

        Raises:
            EventOverflow: events were lost at this point of the stream.
            MonitorUnavailable: the connection was lost or closed (after queued events).
            UsageError: the stream is not active.
        """
        return await self.get(timeout=None)
