"""The QMP client: :class:`Monitor`, built on :mod:`qemu.qmp`.

``qemu.qmp`` does the protocol (greeting, capability negotiation, id matching, event dispatch).
:class:`Monitor` adds what its users otherwise write by hand:

* a timeout on every command (a per-monitor default, overridable per call; ``None`` means no
  timeout), after which the connection stays usable and the late reply is discarded;
* errors of qmpagent's own tree (:class:`~qmpagent.MonitorCommandError`,
  :class:`~qmpagent.MonitorTimeout`, :class:`~qmpagent.MonitorUnavailable`), including a prompt
  :class:`~qmpagent.MonitorUnavailable` for every pending command, wait and event stream when
  QEMU goes away;
* bounded event streams (:meth:`Monitor.listen`) that report lost events as
  :class:`~qmpagent.EventOverflow` at the point of loss, and :meth:`Monitor.wait_event`; the
  never-drained default listener of ``qemu.qmp`` is switched off (it grows without bound);
* jobs run to completion and always dismissed (:meth:`Monitor.run_job`);
* the state of the guest agent's virtio-serial port (:meth:`Monitor.agent_port_open`,
  :meth:`Monitor.wait_agent_port`);
* the block queries a snapshot needs (:meth:`Monitor.named_block_nodes`,
  :meth:`Monitor.device_node_name`).

Example::

    async with await Monitor.connect("/run/vm/qmp.sock", command_timeout=10.0) as mon:
        status = await mon.execute("query-status")
        async with mon.listen("JOB_STATUS_CHANGE") as events:   # registered before the command
            await mon.execute("blockdev-create", {...})
            async for event in events:
                ...
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NoReturn, TypedDict

from qemu.qmp import (
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    Runstate,
    StateError,
)
from qemu.qmp.error import QMPError
from qemu.qmp.protocol import ConnectError

from . import _addresses
from .errors import (
    AgentUnavailable,
    EventOverflow,
    JobError,
    MonitorCommandError,
    MonitorError,
    MonitorProtocolError,
    MonitorTimeout,
    MonitorUnavailable,
    UsageError,
)
from .timeouts import USE_CLIENT_DEFAULT, Timeout, deadline

__all__ = [
    "AGENT_PORT_NAME",
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_EVENT_QUEUE_SIZE",
    "BlockDevice",
    "BlockNode",
    "EventStream",
    "JobResult",
    "Monitor",
    "MonitorState",
    "QMPEvent",
    "VirtioSerialPort",
    "data_matches",
]

log = logging.getLogger(__name__)

#: The virtio-serial port name the QEMU guest agent opens in the guest.
AGENT_PORT_NAME: Final = "org.qemu.guest_agent.0"
#: Seconds :meth:`Monitor.connect` waits for the connection, greeting and negotiation.
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: The default per-command timeout of a :class:`Monitor`, in seconds.
DEFAULT_COMMAND_TIMEOUT: Final = 30.0
#: The default bound of an :class:`EventStream`'s queue, in events.
DEFAULT_EVENT_QUEUE_SIZE: Final = 1024

#: Seconds :meth:`Monitor.close` lets ``qemu.qmp``'s graceful disconnect (which flushes what is
#: still queued) take before it aborts the connection.
DEFAULT_CLOSE_TIMEOUT: Final = 5.0
# After the graceful bound: how long the forced teardown (transport aborted, qemu.qmp's stuck
# disconnect cancelled) may take in all. It takes milliseconds; this only bounds the pathological.
_ABORT_GRACE: Final = 1.0

# How often waits for the agent port re-read query-chardev when no VSERPORT_CHANGE arrives
# (the event is rate-limited and coalesced by QEMU, and not sent at all for ports without an id).
_PORT_POLL_INTERVAL = 1.0




class MonitorState(str, enum.Enum):
    """The lifecycle of a :class:`Monitor`."""

    OPEN = "open"
    """Connected; commands can be sent."""
    LOST = "lost"
    """QEMU closed the connection (exited, crashed or hung up); nothing can be sent any more."""
    CLOSED = "closed"
    """Closed by :meth:`Monitor.close`."""


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


@dataclass(frozen=True, slots=True)
class JobResult:
    """A job that :meth:`Monitor.run_job` ran to successful completion (and dismissed).

    Attributes:
        job_id: the job's id.
        command: the command that started it.
        job_type: the job type QEMU reported (``"create"``, ``"snapshot-save"``, ...), if known.
        duration: seconds from issuing the command to the job's conclusion.
    """

    job_id: str
    command: str
    job_type: str | None
    duration: float


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


@dataclass(frozen=True, slots=True)
class BlockNode:
    """A named block node, from ``query-named-block-nodes``.

    Attributes:
        node_name: the node name (``#block123`` for nodes QEMU named itself).
        driver: the block driver (``"qcow2"``, ``"file"``, ...).
        filename: the node's file name as QEMU reports it.
        backing_file: the backing file name, if the node has one.
        read_only: whether the node is read-only.
        format: the image format (``image.format``), if reported.
        virtual_size: the image's virtual size in bytes, if reported.
        raw: the whole entry as QEMU sent it.
    """

    node_name: str
    driver: str
    filename: str
    backing_file: str | None
    read_only: bool
    format: str | None
    virtual_size: int | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False)

    @property
    def auto_named(self) -> bool:
        """Whether QEMU generated the node name (it starts with ``#``). Raises nothing."""
        return self.node_name.startswith("#")


@dataclass(frozen=True, slots=True)
class BlockDevice:
    """A block backend, from ``query-block``.

    Attributes:
        device: the legacy drive name, or ``None`` for devices attached with ``-blockdev``.
        qdev: the qdev id or, for devices without an id, QOM path of the attached device
            (e.g. ``"/machine/peripheral/vblk0/virtio-backend"``).
        qdev_id: the id of the user-created device, derived from ``qdev`` (e.g. ``"vblk0"``).
        node_name: the root (format) node of the inserted medium, or ``None`` if empty.
        filename: the inserted medium's file name, if any.
        driver: the inserted root node's driver, if any.
        raw: the whole entry as QEMU sent it.
    """

    device: str | None
    qdev: str | None
    qdev_id: str | None
    node_name: str | None
    filename: str | None
    driver: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, hash=False)


# --- timeouts ------------------------------------------------------------------------------------

class _Pending:
    """One command waiting under a :class:`_CommandDeadlines` deadline."""

    __slots__ = ("cancelling", "deadline", "expired", "task")

    def __init__(self, deadline: float, task: asyncio.Task[Any], cancelling: int) -> None:
        self.deadline = deadline
        self.task = task
        self.cancelling = cancelling
        self.expired = False


class _CommandDeadlines:
    """Per-command timeouts for :meth:`Monitor.execute`, all on one loop timer.

    ``asyncio.timeout`` arms and cancels a loop timer per call; at thousands of QMP round trips
    per second that costs about 10 us per call (measured: ~5% of a ``query-status`` round trip),
    while this costs about 1 us. The single timer is armed for the earliest deadline; a command
    that finishes just leaves the pending set. When the timer fires, every expired command's
    task is cancelled and marked; the command turns that cancellation into
    :class:`~qmpagent.MonitorTimeout` (with ``Task.uncancel`` where Python has it, as
    ``asyncio.timeout`` does, so a concurrent outside cancellation still propagates).
    """

    __slots__ = ("_loop", "_pending", "_timer", "_timer_when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: set[_Pending] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0

    def add(self, delay: float) -> _Pending:
        """Register the current task's command, due in ``delay`` seconds."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - execute() always runs in a task
            raise UsageError("Monitor.execute must run in an asyncio task")
        cancelling = 0
        if sys.version_info >= (3, 11):
            cancelling = task.cancelling()
        entry = _Pending(self._loop.time() + delay, task, cancelling)
        self._pending.add(entry)
        if self._timer is None or entry.deadline < self._timer_when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(entry.deadline, self._fire)
            self._timer_when = entry.deadline
        return entry

    def discard(self, entry: _Pending) -> None:
        """The command finished (in any way)."""
        self._pending.discard(entry)

    @staticmethod
    def timed_out(entry: _Pending) -> bool:
        """Whether a ``CancelledError`` the command got is its timeout (and not also an outside
        cancellation)."""
        if not entry.expired:
            return False
        if sys.version_info >= (3, 11):
            return entry.task.uncancel() <= entry.cancelling
        return True  # pragma: no cover - Python 3.10 has no uncancel()

    def close(self) -> None:
        """Disarm the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        soonest: float | None = None
        for entry in list(self._pending):
            if entry.deadline <= now:
                entry.expired = True
                self._pending.discard(entry)
                entry.task.cancel()
            elif soonest is None or entry.deadline < soonest:
                soonest = entry.deadline
        if soonest is not None:
            self._timer = self._loop.call_at(soonest, self._fire)
            self._timer_when = soonest


# --- events --------------------------------------------------------------------------------------


def _reject_all(_event: Message) -> bool:
    return False


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
        monitor: Monitor,
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
        self._monitor = monitor
        self._names = names
        self._maxsize = maxsize
        if match is None or callable(match):
            self._predicate: Callable[[QMPEvent], bool] | None = match
        elif isinstance(match, Mapping):
            expected = dict(match)
            self._predicate = lambda event: data_matches(expected, event["data"])
        else:
            raise UsageError(f"match must be a dict or a callable, not {type(match).__name__}")
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
        self._monitor._register_stream(self)
        self._active = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self._active:
            self._active = False
            self._exited = True
            self._monitor._unregister_stream(self)
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

    async def get(self, timeout: Timeout = USE_CLIENT_DEFAULT) -> QMPEvent:
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
        if timeout is USE_CLIENT_DEFAULT:
            timeout = self._monitor.command_timeout
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            if timeout is None:
                await waiter
            else:
                try:
                    async with deadline(timeout):
                        await waiter
                except TimeoutError as exc:
                    names = ", ".join(self._names) or "any"
                    raise MonitorTimeout(f"no {names} event within {timeout:g}s") from exc
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
        if match is None:
            predicate: Callable[[QMPEvent], bool] | None = None
        elif callable(match):
            predicate = match
        elif isinstance(match, Mapping):
            expected = dict(match)

            def predicate(event: QMPEvent) -> bool:
                return data_matches(expected, event["data"])
        else:
            raise UsageError(f"match must be a dict or a callable, not {type(match).__name__}")
        if timeout is USE_CLIENT_DEFAULT:
            timeout = self._monitor.command_timeout
        try:
            async with deadline(timeout):
                while True:
                    event = await self.get(timeout=None)
                    if name is not None and event["event"] != name:
                        continue
                    if predicate is None or predicate(event):
                        return event
        except MonitorError:
            raise
        except TimeoutError as exc:
            raise MonitorTimeout(f"no {name or 'matching'} event within {timeout:g}s") from exc

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


# --- the monitor ---------------------------------------------------------------------------------


def _address(address: object) -> str | tuple[str, int]:
    what = "QMP address"
    if isinstance(address, (str, os.PathLike)):
        path = os.fspath(address)
        if isinstance(path, bytes):
            raise UsageError("a QMP socket path must be a str path, not bytes")
        checked = _addresses.unix_path(path, what)
        assert isinstance(checked, str)
        return checked
    if isinstance(address, tuple) and len(address) == 2:
        return (_addresses.host(address[0], what), _addresses.tcp_port(address[1], what))
    raise UsageError(
        f"a QMP address is a unix socket path or a (host, port) tuple, not {address!r:.100}"
    )


class Monitor:
    """A QMP connection to one QEMU process, on top of ``qemu.qmp``'s :class:`QMPClient`.

    Make one with :meth:`connect` or :meth:`from_client`; use it as an async context manager
    or call :meth:`close`. Every command and every wait has a timeout: the per-call
    ``timeout=``, else :attr:`command_timeout`. ``None`` means no timeout.

    When QEMU goes away, the monitor notices at once (its state becomes
    :attr:`MonitorState.LOST`): pending commands, waits and event streams raise
    :class:`~qmpagent.MonitorUnavailable`, and so does everything after.

    Attributes:
        command_timeout: the default timeout, in seconds, of commands and waits
            (``None``: none).
        close_timeout: how long, in seconds, :meth:`close` lets the graceful disconnect take
            before it aborts the connection.
    """

    def __init__(
        self,
        client: QMPClient,
        *,
        command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        event_queue_size: int = DEFAULT_EVENT_QUEUE_SIZE,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        """Wrap a connected client; prefer :meth:`connect` or :meth:`from_client`.

        Raises:
            UsageError: the client is not connected, there is no running event loop, or
                ``close_timeout`` is not a number of seconds.
        """
        close_timeout = _check_close_timeout(close_timeout)
        if client.runstate is not Runstate.RUNNING:
            raise UsageError(f"the QMPClient is not connected ({client.runstate.name})")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError as exc:
            raise UsageError("a Monitor must be made inside a running event loop") from exc
        self._client = client
        self.command_timeout = command_timeout
        self.close_timeout = close_timeout
        self._event_queue_size = event_queue_size
        self._name = client.name or "qmp"
        self._state = MonitorState.OPEN
        self._streams: set[EventStream] = set()
        self._reap_task: asyncio.Task[None] | None = None
        self._cause: BaseException | None = None
        self._ports: list[VirtioSerialPort] | None = None
        self._flat_nodes = True
        self._deadlines = _CommandDeadlines(loop)
        # qemu.qmp's default listener takes every event and is never drained: switch it off
        # (qemu.qmp refuses to remove it) and drop whatever it holds.
        client.events.event_filter = _reject_all
        client.events.clear()
        self._watcher = loop.create_task(self._watch(), name=f"qmpagent-monitor-{self._name}")

    @classmethod
    async def connect(
        cls,
        address: str | os.PathLike[str] | tuple[str, int],
        timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        *,
        command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        event_queue_size: int = DEFAULT_EVENT_QUEUE_SIZE,
        name: str | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> Monitor:
        """Connect to QEMU's QMP socket and negotiate capabilities.

        Args:
            address: a unix socket path, or a ``(host, port)`` tuple.
            timeout: seconds for connecting, the greeting and negotiation (``None``: no limit).
            command_timeout: the default timeout of commands and waits (``None``: none).
            event_queue_size: the default bound of :meth:`listen` queues.
            name: a name for log messages (``qemu.qmp`` logs under ``qemu.qmp.protocol.NAME``).
            close_timeout: see :meth:`close`.

        Raises:
            MonitorUnavailable: the socket cannot be reached, or QEMU hung up or did not
                speak QMP.
            MonitorTimeout: QEMU did not complete the handshake within ``timeout``.
            UsageError: ``address`` is neither a path nor a ``(host, port)`` tuple (or a port
                outside 1..65535, a NUL in a path, an unencodable path or host), or
                ``close_timeout`` is not a number of seconds; raised before connecting.
        """
        addr = _address(address)
        close_timeout = _check_close_timeout(close_timeout)
        client = QMPClient(name)
        client.events.event_filter = _reject_all
        try:
            async with deadline(timeout):
                await client.connect(addr)
        except TimeoutError as exc:
            raise MonitorTimeout(f"QMP handshake with {addr!r} timed out after {timeout:g}s") from exc
        except ConnectError as exc:
            raise MonitorUnavailable(f"cannot connect to QMP at {addr!r}: {exc}") from exc
        except (QMPError, OSError, EOFError) as exc:  # pragma: no cover - ConnectError wraps these
            raise MonitorUnavailable(f"cannot connect to QMP at {addr!r}: {exc!r}") from exc
        log.debug("connected to QMP at %r", addr)
        return cls(client, command_timeout=command_timeout, event_queue_size=event_queue_size,
                   close_timeout=close_timeout)

    @classmethod
    def from_client(
        cls,
        client: QMPClient,
        *,
        command_timeout: float | None = DEFAULT_COMMAND_TIMEOUT,
        event_queue_size: int = DEFAULT_EVENT_QUEUE_SIZE,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> Monitor:
        """Wrap an already-connected :class:`qemu.qmp.QMPClient`.

        The monitor takes the client over: it switches off the client's default ``events``
        listener (which would otherwise keep every event forever) and disconnects the client in
        :meth:`close`. Close through the monitor, not with ``client.disconnect()``. Must be
        called inside a running event loop.

        Raises:
            UsageError: the client is not connected, or there is no running event loop.
        """
        return cls(client, command_timeout=command_timeout, event_queue_size=event_queue_size,
                   close_timeout=close_timeout)

    def __repr__(self) -> str:
        return f"<Monitor {self._name} {self._state.value}>"

    @property
    def client(self) -> QMPClient:
        """The underlying ``qemu.qmp`` client (for what the monitor does not offer).

        Raises nothing.
        """
        return self._client

    @property
    def state(self) -> MonitorState:
        """Whether the monitor is open, lost its connection, or was closed. Raises nothing."""
        return self._state

    @property
    def is_open(self) -> bool:
        """Whether commands can be sent (the state is :attr:`MonitorState.OPEN`). Raises nothing."""
        return self._state is MonitorState.OPEN

    @property
    def qemu_version(self) -> tuple[int, int, int] | None:
        """QEMU's version from the QMP greeting, e.g. ``(7, 2, 22)``, if it sent one.

        Raises nothing.
        """
        greeting = self._client.greeting
        if greeting is None:
            return None
        try:
            version: Any = greeting.QMP.version
            qemu = version["qemu"]
            return (int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))
        except (KeyError, TypeError, ValueError):
            return None

    # lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Monitor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection. Idempotent; pending commands and streams get
        :class:`~qmpagent.MonitorUnavailable`.

        Bounded: ``qemu.qmp``'s graceful disconnect flushes what is still queued, which never
        ends if QEMU stopped reading; after :attr:`close_timeout` seconds the connection is
        aborted (queued writes are dropped) and the disconnect cut short. Either way, when this
        returns the socket is closed and no task of the monitor or of its ``qemu.qmp`` client is
        left running. A cancellation of the caller only stops the wait: the same bounded
        teardown completes on its own.

        Raises nothing for connection errors (a lost connection is already closed).
        """
        if self._state is not MonitorState.CLOSED:
            self._state = MonitorState.CLOSED
            self._fail_streams("the monitor was closed")
        reap = self._start_reap()
        try:
            # The teardown runs in a task of its own, which a cancellation of the caller does
            # not touch (a half-cancelled qemu.qmp disconnect leaves exceptions unretrieved).
            await asyncio.wait({reap})
        finally:
            self._deadlines.close()
            watcher = self._watcher
            if not watcher.done():
                watcher.cancel()
                # It ends at its next step; do not return with it still pending.
                await asyncio.wait({watcher}, timeout=_ABORT_GRACE)

    async def _watch(self) -> None:
        # Notice a lost connection at once, fail everything waiting, and reap the client so
        # its bottom-half exception (EOFError, ...) is retrieved: no "never retrieved" warning.
        client = self._client
        while client.runstate is Runstate.RUNNING:
            await client.runstate_changed()
        if self._state is not MonitorState.OPEN:
            return
        self._state = MonitorState.LOST
        log.warning("QMP connection %s lost (QEMU exited or closed the socket)", self._name)
        self._fail_streams("the QMP connection was lost (QEMU exited or closed the socket)")
        await asyncio.shield(self._start_reap())

    def _start_reap(self) -> asyncio.Task[None]:
        if self._reap_task is None:
            self._reap_task = asyncio.get_running_loop().create_task(
                self._reap(), name=f"qmpagent-monitor-close-{self._name}"
            )
        return self._reap_task

    async def _reap(self) -> None:
        """Disconnect the client, bounded by :attr:`close_timeout` plus a short forced teardown;
        never raises."""
        loop = asyncio.get_running_loop()
        disconnect = loop.create_task(self._client.disconnect())
        done, _ = await asyncio.wait({disconnect}, timeout=self.close_timeout)
        if not done:
            log.warning(
                "QMP connection %s: the graceful disconnect did not finish within %gs "
                "(QEMU stopped reading?); aborting the connection", self._name, self.close_timeout,
            )
            done = await self._force_disconnect(disconnect)
        if not done:  # pragma: no cover - only if qemu.qmp ignores both the abort and the cancel
            log.error("QMP connection %s: the disconnect could not be ended", self._name)
            disconnect.add_done_callback(_retrieve)
            return
        if disconnect.cancelled():
            return
        exc = disconnect.exception()
        if exc is not None:  # the reason the connection ended: EOFError, OSError, ...
            if self._cause is None:
                self._cause = exc
            log.debug("QMP connection %s ended: %r", self._name, exc)

    async def _force_disconnect(self, disconnect: asyncio.Task[None]) -> set[asyncio.Task[None]]:
        """Cut short a disconnect that is stuck flushing to a peer that does not read."""
        until = asyncio.get_running_loop().time() + _ABORT_GRACE

        def left() -> float:
            return max(0.0, until - asyncio.get_running_loop().time())

        # 1. Abort the transport: the socket is closed at once, queued bytes dropped, and the
        #    writer's drain() returns or fails instead of waiting for the peer.
        writer = getattr(self._client, "_writer", None)
        if writer is not None:
            writer.transport.abort()
        done, _ = await asyncio.wait({disconnect}, timeout=min(left(), 0.1))
        if done:
            return done
        # 2. qemu.qmp's disconnect may still wait for its outgoing queue to drain (messages
        #    that will never be written now): cancel it; its own clean-up still cancels and
        #    awaits the reader and writer tasks and closes the stream.
        dc_task = getattr(self._client, "_dc_task", None)
        if isinstance(dc_task, asyncio.Future) and not dc_task.done():
            dc_task.cancel()
        done, _ = await asyncio.wait({disconnect}, timeout=left())
        if done:
            return done
        # 3. Last resort: stop waiting for it.
        disconnect.cancel()  # pragma: no cover - see _reap
        done, _ = await asyncio.wait({disconnect}, timeout=left())  # pragma: no cover
        return done  # pragma: no cover

    def _fail_streams(self, message: str) -> None:
        for stream in list(self._streams):
            stream._fail(message, self._cause)

    def _unavailable(self, what: str) -> MonitorUnavailable:
        if self._state is MonitorState.CLOSED:
            return MonitorUnavailable(f"{what}: the monitor is closed")
        return MonitorUnavailable(
            f"{what}: the QMP connection was lost (QEMU exited or closed the socket)"
        )

    # commands ---------------------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> Any:
        """Run a QMP command and return its ``return`` value.

        Args:
            command: the QMP command, e.g. ``"query-status"``.
            arguments: its arguments (JSON-serialisable).
            timeout: seconds to wait for the reply; ``None`` waits forever; by default
                :attr:`command_timeout`. After a timeout the connection stays usable and the
                late reply is discarded; the command may still have taken effect.

        Raises:
            MonitorCommandError: QEMU answered with an error (``.error_class``, ``.desc``).
            MonitorTimeout: no reply within ``timeout``.
            MonitorUnavailable: the connection is lost or closed (also if it is lost while
                waiting: whether the command took effect is then unknown).
            MonitorError: QEMU sent a malformed reply.
            UsageError: ``arguments`` cannot be serialised to JSON.
        """
        if self._state is not MonitorState.OPEN:
            raise self._unavailable(command)
        if timeout is USE_CLIENT_DEFAULT:
            timeout = self.command_timeout
        pending = None if timeout is None else self._deadlines.add(timeout)
        try:
            return await self._client.execute(command, arguments)
        except asyncio.CancelledError as exc:
            if pending is not None and _CommandDeadlines.timed_out(pending):
                raise MonitorTimeout(f"{command}: no reply within {timeout:g}s") from exc
            raise
        except ExecuteError as exc:
            raise MonitorCommandError(command, exc.error_class, exc.error.error.desc) from exc
        except (ExecInterruptedError, StateError) as exc:
            raise self._unavailable(command) from exc
        except QMPError as exc:
            raise MonitorProtocolError(f"{command}: bad reply from QEMU: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{command}: arguments are not JSON-serialisable: {exc}") from exc
        finally:
            if pending is not None:
                self._deadlines.discard(pending)

    # events -----------------------------------------------------------------------------------

    def listen(
        self,
        *names: str,
        maxsize: int | None = None,
        match: EventMatch | None = None,
    ) -> EventStream:
        """A bounded stream of events, to use as ``async with mon.listen(...) as events``.

        The stream is registered when the ``async with`` block is entered: issue the command
        whose events you want inside the block and none can be missed.

        Args:
            names: event names to accept; none accepts every event.
            maxsize: the queue bound (default: the monitor's ``event_queue_size``). On overflow
                the consumer gets :class:`~qmpagent.EventOverflow` at the point of loss.
            match: accept only events whose ``data`` contains this dict (recursively), or for
                which this predicate is true. Filtered events do not count against ``maxsize``.

        Raises:
            UsageError: ``maxsize`` < 1 or ``match`` is neither a dict nor callable (on entry:
                also when the stream is entered twice).
            MonitorUnavailable: on entry, when the connection is lost or closed.
        """
        for name in names:
            if not isinstance(name, str):
                raise UsageError(f"event names are strings, not {name!r}")
        size = self._event_queue_size if maxsize is None else maxsize
        return EventStream(self, names, size, match)

    def _register_stream(self, stream: EventStream) -> None:
        if self._state is not MonitorState.OPEN:
            raise self._unavailable("listen")
        self._client.register_listener(stream._listener)
        self._streams.add(stream)

    def _unregister_stream(self, stream: EventStream) -> None:
        self._streams.discard(stream)
        with contextlib.suppress(ValueError, QMPError):
            self._client.remove_listener(stream._listener)

    async def wait_event(
        self,
        name: str,
        match: EventMatch | None = None,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> QMPEvent:
        """Wait for the next event ``name`` whose ``data`` contains ``match``.

        Only events that arrive after the call are seen. To catch an event caused by a command,
        use :meth:`listen` around the command instead, or start this wait as a task first.

        Args:
            name: the event name, e.g. ``"VSERPORT_CHANGE"``.
            match: a dict that must be a subset of the event's ``data`` (recursively), or a
                predicate on the event.
            timeout: by default :attr:`command_timeout`; ``None`` waits forever.

        Raises:
            MonitorTimeout: no such event arrived in time.
            MonitorUnavailable: the connection is lost or closed.
            UsageError: ``match`` is neither a dict nor callable.
        """
        # The first match is all we need: a queue of one never loses it.
        async with self.listen(name, maxsize=1, match=match) as stream:
            return await stream.get(timeout=timeout)

    # jobs -------------------------------------------------------------------------------------

    async def run_job(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        job_id: str | None = None,
    ) -> JobResult:
        """Run a job-based command (``blockdev-create``, ``snapshot-save``, ...) to completion.

        Listens for ``JOB_STATUS_CHANGE`` before issuing the command, waits for the job to
        conclude, reads its error with ``query-jobs`` and dismisses it. On timeout or
        cancellation the job is cancelled (if still running) and dismissed, shielded from
        further cancellation and bounded by :attr:`command_timeout`.

        Jobs that dismiss themselves (block jobs with ``auto-dismiss``, the default there) may
        be gone before their result can be read: start those with ``"auto-dismiss": false``.

        Args:
            command: the command that starts the job.
            arguments: its arguments; ``"job-id"`` is added when missing.
            timeout: for the whole job; by default :attr:`command_timeout`; ``None``: none.
            job_id: the job id to use (default: ``arguments["job-id"]``, else a fresh one).

        Returns:
            A :class:`JobResult`.

        Raises:
            JobError: the job concluded with an error (its text in ``.desc``), or disappeared
                before its result could be read.
            MonitorCommandError: QEMU refused the command (no job was started).
            MonitorTimeout: the job did not conclude in time (it was cancelled and dismissed).
            MonitorUnavailable: the connection is lost or closed.
            UsageError: ``job_id`` contradicts ``arguments["job-id"]``.
        """
        args: dict[str, object] = dict(arguments) if arguments is not None else {}
        given = args.get("job-id")
        if given is not None and not isinstance(given, str):
            raise UsageError(f"job-id must be a string, not {given!r}")
        if job_id is None:
            job_id = given if given is not None else f"qmpagent-{secrets.token_hex(4)}"
        elif given is not None and given != job_id:
            raise UsageError(f"job_id={job_id!r} contradicts arguments['job-id']={given!r}")
        args["job-id"] = job_id
        if timeout is USE_CLIENT_DEFAULT:
            timeout = self.command_timeout
        started = time.monotonic()
        sent = refused = False
        info: dict[str, Any] | None = None
        block_outcome: list[QMPEvent] = []

        def is_ours(event: QMPEvent) -> bool:
            data = event["data"]
            if event["event"] == "JOB_STATUS_CHANGE":
                return data.get("id") == job_id
            return data.get("device") == job_id

        async with self.listen(
            "JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
            maxsize=64, match=is_ours,
        ) as events:
            try:
                async with deadline(timeout):
                    sent = True
                    try:
                        await self.execute(command, args, timeout=None)
                    except MonitorCommandError:
                        refused = True  # no job was made
                        raise
                    log.debug("job %s (%s) started", job_id, command)
                    await self._job_finished(job_id, events, block_outcome)
                    info = await self._query_job(job_id, timeout=None)
                    while True:  # block-job events queued before query-jobs' reply
                        event = events.get_nowait()
                        if event is None:
                            break
                        if event["event"] != "JOB_STATUS_CHANGE":
                            block_outcome.append(event)
                    if info is not None:
                        try:
                            await self.execute("job-dismiss", {"id": job_id}, timeout=None)
                        except MonitorCommandError as exc:
                            if not info.get("error"):
                                raise
                            log.warning("could not dismiss failed job %s: %s", job_id, exc)
            except BaseException as exc:
                # Also when the command's reply did not come in time: the job may exist.
                if sent and not refused and self._state is MonitorState.OPEN:
                    await self._abandon_job_shielded(job_id)
                if isinstance(exc, TimeoutError) and not isinstance(exc, MonitorError):
                    raise MonitorTimeout(
                        f"{command}: job {job_id} did not conclude within {timeout:g}s"
                        " (cancelled and dismissed)"
                    ) from exc
                raise
        duration = time.monotonic() - started
        if info is None:
            # Gone before we could read it (auto-dismissed): only a block-job event tells.
            if block_outcome:
                last = block_outcome[-1]
                if last["event"] == "BLOCK_JOB_CANCELLED":
                    raise JobError(command, job_id, "the job was cancelled")
                error = last["data"].get("error")
                if error:
                    raise JobError(command, job_id, str(error))
                return JobResult(job_id, command, last["data"].get("type"), duration)
            raise JobError(
                command, job_id,
                "the job disappeared before its result could be read (auto-dismiss?)",
            )
        error = info.get("error")
        job_type = info.get("type")
        if error:
            raise JobError(command, job_id, str(error))
        log.debug("job %s (%s) concluded in %.3fs", job_id, command, duration)
        return JobResult(job_id, command, job_type if isinstance(job_type, str) else None, duration)

    async def _job_finished(
        self, job_id: str, events: EventStream, block_outcome: list[QMPEvent]
    ) -> None:
        """Wait until the job concluded or vanished (``null``)."""
        while True:
            try:
                event = await events.get(timeout=None)
            except EventOverflow:
                info = await self._query_job(job_id, timeout=None)
                if info is None or info.get("status") == "concluded":
                    return
                continue
            if event["event"] != "JOB_STATUS_CHANGE":
                block_outcome.append(event)
                continue
            status = event["data"].get("status")
            if status in ("concluded", "null"):
                return

    async def _query_job(self, job_id: str, timeout: Timeout) -> dict[str, Any] | None:
        jobs = await self.execute("query-jobs", timeout=timeout)
        if not isinstance(jobs, list):
            raise MonitorProtocolError(f"query-jobs: expected a list, got {type(jobs).__name__}")
        for job in jobs:
            if isinstance(job, dict) and job.get("id") == job_id:
                return job
        return None

    async def _abandon_job_shielded(self, job_id: str) -> None:
        cleanup = asyncio.get_running_loop().create_task(self._abandon_job(job_id))
        try:
            await asyncio.shield(cleanup)
        except asyncio.CancelledError:
            # Cancelled again: the cleanup goes on in the background, bounded by its timeout.
            cleanup.add_done_callback(_retrieve)
            raise

    async def _abandon_job(self, job_id: str) -> None:
        """Cancel (if needed) and dismiss a job we gave up on; never raises MonitorError."""
        limit = self.command_timeout if self.command_timeout is not None else DEFAULT_COMMAND_TIMEOUT
        try:
            async with (
                self.listen("JOB_STATUS_CHANGE", maxsize=64, match={"id": job_id}) as ev,
                deadline(limit),
            ):
                info = await self._query_job(job_id, timeout=None)
                if info is None:
                    return
                if info.get("status") != "concluded":
                    log.info("cancelling job %s (status %s)", job_id, info.get("status"))
                    try:
                        await self.execute("job-cancel", {"id": job_id}, timeout=None)
                    except MonitorCommandError as exc:  # it concluded meanwhile?
                        log.debug("job-cancel %s: %s", job_id, exc)
                    await self._job_finished(job_id, ev, [])
                    info = await self._query_job(job_id, timeout=None)
                    if info is None:
                        return
                await self.execute("job-dismiss", {"id": job_id}, timeout=None)
                log.info("dismissed abandoned job %s", job_id)
        except (MonitorError, TimeoutError) as exc:
            log.warning("could not cancel and dismiss job %s: %r", job_id, exc)

    # agent port -------------------------------------------------------------------------------

    async def virtio_serial_ports(self, *, refresh: bool = False) -> list[VirtioSerialPort]:
        """Every ``virtserialport`` device (in ``/machine/peripheral`` and
        ``/machine/peripheral-anon``) with its chardev's current state.

        The device list is found with ``qom-list``/``qom-get`` once and cached; ``refresh``
        finds it again. The open state is always read afresh from ``query-chardev``.

        Raises:
            MonitorError: a query failed (see :meth:`execute`).
        """
        if self._ports is None or refresh:
            self._ports = await self._discover_ports()
        states = await self._chardev_states()
        return [
            VirtioSerialPort(p.device_id, p.chardev, p.name, states.get(p.chardev, False),
                             p.qom_path)
            for p in self._ports
        ]

    async def serial_port(self, device_id: str) -> VirtioSerialPort:
        """The ``virtserialport`` with qdev id ``device_id`` (the ``id`` of a
        ``VSERPORT_CHANGE`` event): its chardev, port name and current open state.

        Raises:
            MonitorCommandError: no such port (``error_class`` ``"DeviceNotFound"``).
            MonitorError: a query failed (see :meth:`execute`).
        """
        for refresh in (False, True):
            for port in await self.virtio_serial_ports(refresh=refresh):
                if port.device_id == device_id:
                    return port
        raise MonitorCommandError(
            "qom-list", "DeviceNotFound", f"no virtserialport with id {device_id!r}"
        )

    async def _discover_ports(self) -> list[VirtioSerialPort]:
        ports = []
        for base in ("/machine/peripheral", "/machine/peripheral-anon"):
            try:
                children = await self.execute("qom-list", {"path": base})
            except MonitorCommandError:
                continue
            if not isinstance(children, list):
                continue
            for child in children:
                if not isinstance(child, dict) or child.get("type") != "child<virtserialport>":
                    continue
                node = child.get("name")
                if not isinstance(node, str):
                    continue
                path = f"{base}/{node}"
                try:
                    name = await self.execute("qom-get", {"path": path, "property": "name"})
                    chardev = await self.execute(
                        "qom-get", {"path": path, "property": "chardev"}
                    )
                except MonitorCommandError as exc:
                    log.debug("skipping %s: %s", path, exc)
                    continue
                if not isinstance(chardev, str) or not chardev:
                    continue
                ports.append(VirtioSerialPort(
                    device_id=node if base == "/machine/peripheral" else None,
                    chardev=chardev,
                    name=name if isinstance(name, str) and name else None,
                    open=False,
                    qom_path=path,
                ))
        log.debug("virtio-serial ports: %s", ports)
        return ports

    async def _chardev_states(self) -> dict[str, bool]:
        what = "query-chardev"
        states = {}
        for cd in _entries(what, await self.execute(what)):
            label = _member(what, cd, "label", str, required=True)
            states[label] = _member(what, cd, "frontend-open", bool) is True
        return states

    async def _agent_port_info(self, chardev: str | None) -> VirtioSerialPort:
        fresh = self._ports is None
        while True:
            if self._ports is None:
                self._ports = await self._discover_ports()
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

    async def agent_port(self, chardev: str | None = None) -> VirtioSerialPort:
        """The guest agent's port and whether the guest has it open right now.

        Args:
            chardev: the agent's chardev label; by default the chardev of the virtserialport
                named ``org.qemu.guest_agent.0``.

        Raises:
            AgentUnavailable: QEMU has no such port or chardev.
            MonitorError: a query failed (see :meth:`execute`).
        """
        port = await self._agent_port_info(chardev)
        states = await self._chardev_states()
        if port.chardev not in states:
            self._ports = None  # the device may have been replaced: find it again next time
            raise AgentUnavailable(f"QEMU has no chardev {port.chardev!r}")
        return VirtioSerialPort(
            port.device_id, port.chardev, port.name, states[port.chardev], port.qom_path
        )

    async def agent_port_open(self, chardev: str | None = None) -> bool:
        """Whether the guest has the agent's virtio-serial port open right now.

        Reads ``query-chardev`` (authoritative; ``VSERPORT_CHANGE`` is only a hint).

        Raises:
            AgentUnavailable: QEMU has no agent port (or no chardev ``chardev``).
            MonitorError: a query failed (see :meth:`execute`).
        """
        return (await self.agent_port(chardev)).open

    async def wait_agent_port(
        self,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        *,
        open: bool = True,
        chardev: str | None = None,
    ) -> VirtioSerialPort:
        """Wait until the guest has the agent port open (or closed, with ``open=False``).

        Re-reads ``query-chardev`` on every ``VSERPORT_CHANGE`` of the port and at least once a
        second (the event is rate-limited and coalesced by QEMU: a close and reopen within a
        second can arrive as one event, late).

        Args:
            timeout: by default :attr:`command_timeout`; ``None`` waits forever.
            open: the state to wait for.
            chardev: the agent's chardev label (default: found from the port name).

        Returns:
            The port, in the awaited state.

        Raises:
            MonitorTimeout: the port did not reach the state in time.
            AgentUnavailable: QEMU has no agent port (or no chardev ``chardev``).
            MonitorUnavailable: the connection is lost or closed.
        """
        if timeout is USE_CLIENT_DEFAULT:
            timeout = self.command_timeout
        want = "open" if open else "closed"
        try:
            async with deadline(timeout):
                port = await self._agent_port_info(chardev)
                hint: EventMatch | None = None
                if port.device_id is not None:
                    hint = {"id": port.device_id}
                # Listen first, then read the state: no change can slip between the two.
                async with self.listen("VSERPORT_CHANGE", maxsize=8, match=hint) as events:
                    while True:
                        port = await self.agent_port(chardev)
                        if port.open is open:
                            return port
                        with contextlib.suppress(MonitorTimeout, EventOverflow):
                            await events.get(timeout=_PORT_POLL_INTERVAL)
                        while True:  # one re-read covers every queued hint
                            with contextlib.suppress(EventOverflow):
                                if events.get_nowait() is None:
                                    break
        except MonitorError:
            raise
        except TimeoutError as exc:
            raise MonitorTimeout(
                f"the agent port ({chardev or AGENT_PORT_NAME}) was not {want} within {timeout:g}s"
            ) from exc

    # block ------------------------------------------------------------------------------------

    async def named_block_nodes(self) -> list[BlockNode]:
        """All named block nodes (``query-named-block-nodes``, ``flat`` where supported).

        Raises:
            MonitorProtocolError: the reply is not a list of ``BlockDeviceInfo`` objects, or a
                member has the wrong type.
            MonitorError: the query failed (see :meth:`execute`).
        """
        what = "query-named-block-nodes"
        nodes: Any = None
        if self._flat_nodes:
            try:
                nodes = await self.execute(what, {"flat": True})
            except MonitorCommandError as exc:
                if exc.error_class != "GenericError" or "flat" not in exc.desc:
                    raise
                self._flat_nodes = False  # QEMU < 5.0
        if not self._flat_nodes:
            nodes = await self.execute(what)
        result = []
        for raw in _entries(what, nodes):
            image = _member(what, raw, "image", dict)
            if image is None:
                image = {}
            result.append(BlockNode(
                node_name=_member(what, raw, "node-name", str, required=True),
                driver=_member(what, raw, "drv", str, required=True),
                filename=_member(what, raw, "file", str) or "",
                backing_file=_member(what, raw, "backing_file", str) or None,
                read_only=bool(_member(what, raw, "ro", bool)),
                format=_member(what + " image", image, "format", str),
                virtual_size=_member(what + " image", image, "virtual-size", int),
                raw=raw,
            ))
        return result

    async def block_devices(self) -> list[BlockDevice]:
        """All block backends (``query-block``).

        Raises:
            MonitorProtocolError: the reply is not a list of ``BlockInfo`` objects, or a member
                has the wrong type.
            MonitorError: the query failed (see :meth:`execute`).
        """
        what = "query-block"
        result = []
        for raw in _entries(what, await self.execute(what)):
            inserted = _member(what, raw, "inserted", dict)
            if inserted is None:
                inserted = {}
            qdev = _member(what, raw, "qdev", str) or None
            result.append(BlockDevice(
                device=_member(what, raw, "device", str) or None,
                qdev=qdev,
                qdev_id=_qdev_id(qdev),
                node_name=_member(what + " inserted", inserted, "node-name", str),
                filename=_member(what + " inserted", inserted, "file", str),
                driver=_member(what + " inserted", inserted, "drv", str),
                raw=raw,
            ))
        return result

    async def device_node_name(self, device: str) -> str:
        """The root (format) node name of a block device's medium, e.g. ``"vblk0"`` ->
        ``"disk0"``.

        Args:
            device: the device's qdev id, its QOM path, or a legacy drive name.

        Raises:
            MonitorCommandError: no such device (``error_class`` ``"DeviceNotFound"``), or it
                has no medium (``"GenericError"``).
            MonitorProtocolError: ``query-block`` answered with members of the wrong type.
            MonitorError: the query failed.
            UsageError: ``device`` is not a string.
        """
        if not isinstance(device, str):
            raise UsageError(f"device must be a string, not {type(device).__name__}")
        def matches(dev: BlockDevice) -> bool:
            if device in (dev.qdev_id, dev.qdev, dev.device):
                return True
            # a QOM path above the block device: "/machine/peripheral/vblk0"
            return device.startswith("/") and dev.qdev is not None and dev.qdev.startswith(
                device.rstrip("/") + "/"
            )

        for dev in await self.block_devices():
            if matches(dev):
                if dev.node_name is None:
                    raise MonitorCommandError(
                        "query-block", "GenericError", f"device {device!r} has no medium"
                    )
                return dev.node_name
        raise MonitorCommandError(
            "query-block", "DeviceNotFound", f"no block device {device!r}"
        )


def _check_close_timeout(value: object) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise UsageError(f"close_timeout must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


def _brief(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entries(what: str, reply: object) -> list[dict[str, Any]]:
    """A query's reply that must be a list of JSON objects."""
    if not isinstance(reply, list):
        raise MonitorProtocolError(f"{what}: expected a list, got {type(reply).__name__}")
    for entry in reply:
        if not isinstance(entry, dict):
            raise MonitorProtocolError(f"{what}: expected objects in the list, got {_brief(entry)}")
    return reply


def _member(
    what: str, obj: Mapping[str, Any], key: str, kind: type, *, required: bool = False
) -> Any:
    """``obj[key]`` if it has the type QEMU's schema gives it; ``None`` if it is absent and
    optional. A ``bool`` is never taken for an ``int``, nor ``null`` for an absent member."""
    if key not in obj:
        if required:
            raise MonitorProtocolError(f"{what}: an entry has no {key!r}: {_brief(obj)}")
        return None
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise MonitorProtocolError(
            f"{what}: {key!r} should be {kind.__name__}, got {type(value).__name__} "
            f"in {_brief(obj)}"
        )
    return value


def _qdev_id(qdev: object) -> str | None:
    if not isinstance(qdev, str) or not qdev:
        return None
    if not qdev.startswith("/"):
        return qdev
    prefix = "/machine/peripheral/"
    if qdev.startswith(prefix):
        return qdev[len(prefix):].split("/", 1)[0] or None
    return None


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("background job cleanup failed: %r", task.exception())
