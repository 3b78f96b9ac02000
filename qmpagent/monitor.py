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
* jobs run to completion and always dismissed (:meth:`Monitor.run_job`), and two-phase jobs
  (an active ``block-commit``: ready, then completed or cancelled) step by step
  (:meth:`Monitor.block_job`, :meth:`Monitor.attach_job`);
* the state of the guest agent's virtio-serial port (:meth:`Monitor.agent_port_open`,
  :meth:`Monitor.wait_agent_port`);
* the block queries a snapshot needs (:meth:`Monitor.named_block_nodes`,
  :meth:`Monitor.device_node_name`).

The concerns live in modules of their own, each behind a part of :class:`Monitor`:
:mod:`~qmpagent.events` (event streams), :mod:`~qmpagent.deadlines` (commands under their
timeouts), :mod:`~qmpagent.qmp_errors` (``qemu.qmp``'s errors translated), :mod:`~qmpagent.jobs`,
:mod:`~qmpagent.block_jobs` (two-phase jobs),
:mod:`~qmpagent.ports` (virtio-serial and agent port state) and :mod:`~qmpagent.block`.
Every name they define that was importable from here still is.

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
import enum
import logging
import math
import os
from collections.abc import Mapping
from typing import Any, Final

from qemu.qmp import QMPClient, Runstate
from qemu.qmp.protocol import ConnectError
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from . import _addresses
from ._closing import AsyncClosing
from .block import BlockDevice, BlockNode, BlockQueries
from .block_jobs import BlockJob, JobProgress, ProgressCallback
from .deadlines import CommandDeadlines
from .disconnect import ABORT_GRACE, disconnect
from .errors import (  # the F401 ones are raised in other modules now; importable here as before
    AgentUnavailable,  # noqa: F401
    EventOverflow,  # noqa: F401
    JobError,  # noqa: F401
    MonitorCommandError,  # noqa: F401
    MonitorError,  # noqa: F401
    MonitorProtocolError,  # noqa: F401
    MonitorTimeout,  # noqa: F401
    MonitorUnavailable,
    UsageError,
)
from .events import EventHub, EventMatch, EventStream, QMPEvent, data_matches, silence_default_listener
from .jobs import JobResult, run_job
from .ports import AGENT_PORT_NAME, PORT_POLL_INTERVAL, AgentPorts, VirtioSerialPort
from .qmp_errors import CONNECT_ERRORS, map_qmp_errors
from .timeouts import USE_CLIENT_DEFAULT, Timeout, deadline, resolve_timeout

__all__ = [
    "AGENT_PORT_NAME",
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_EVENT_QUEUE_SIZE",
    "BlockDevice",
    "BlockJob",
    "BlockNode",
    "EventStream",
    "JobProgress",
    "JobResult",
    "Monitor",
    "MonitorState",
    "QMPEvent",
    "VirtioSerialPort",
    "data_matches",
]

log = logging.getLogger(__name__)

#: Seconds :meth:`Monitor.connect` waits for the connection, greeting and negotiation.
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: The default per-command timeout of a :class:`Monitor`, in seconds.
DEFAULT_COMMAND_TIMEOUT: Final = 30.0
#: The default bound of an :class:`EventStream`'s queue, in events.
DEFAULT_EVENT_QUEUE_SIZE: Final = 1024

#: Seconds :meth:`Monitor.close` lets ``qemu.qmp``'s graceful disconnect (which flushes what is
#: still queued) take before it aborts the connection.
DEFAULT_CLOSE_TIMEOUT: Final = 5.0
# How long close() waits for the watcher task to end (see disconnect.ABORT_GRACE).
_ABORT_GRACE: Final = ABORT_GRACE

# How often waits for the agent port re-read query-chardev (see ports.PORT_POLL_INTERVAL); read
# at each wait, so that tests can shorten it here.
_PORT_POLL_INTERVAL = PORT_POLL_INTERVAL

# The name tests knew the deadline timer by.
_CommandDeadlines = CommandDeadlines


class MonitorState(str, enum.Enum):
    """The lifecycle of a :class:`Monitor`."""

    OPEN = "open"
    """Connected; commands can be sent."""
    LOST = "lost"
    """QEMU closed the connection (exited, crashed or hung up); nothing can be sent any more."""
    CLOSED = "closed"
    """Closed by :meth:`Monitor.close`."""


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


class Monitor(AsyncClosing):
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
        self._name = client.name or "qmp"
        self._state = MonitorState.OPEN
        self._reap_task: asyncio.Task[None] | None = None
        self._cause: BaseException | None = None
        self._deadlines = CommandDeadlines(loop)
        silence_default_listener(client)
        self._events = EventHub(
            client,
            require_open=self._require_open,
            default_timeout=lambda: self.command_timeout,
            queue_size=event_queue_size,
        )
        self._ports = AgentPorts(self)
        self._block = BlockQueries(self)
        self._watcher = loop.create_task(self._watch(), name=f"qmpagent-monitor-{self._name}")

    @classmethod
    async def connect(
        cls,
        address: str | os.PathLike[str] | tuple[str, int],
        *,
        timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
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
        with map_qmp_errors(CONNECT_ERRORS, addr, timeout=timeout):
            async with deadline(timeout):
                client = await _connect_client(addr, name)
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
            self._events.fail_all("the monitor was closed", self._cause)
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
        self._events.fail_all(
            "the QMP connection was lost (QEMU exited or closed the socket)", self._cause
        )
        self._start_reap()  # a task of its own, which close() awaits: this watcher can end now

    def _start_reap(self) -> asyncio.Task[None]:
        if self._reap_task is None:
            self._reap_task = asyncio.get_running_loop().create_task(
                self._reap(), name=f"qmpagent-monitor-close-{self._name}"
            )
        return self._reap_task

    async def _reap(self) -> None:
        cause = await disconnect(self._client, name=self._name, close_timeout=self.close_timeout)
        if self._cause is None:
            self._cause = cause

    def _gone(self) -> str:
        """Why nothing can be sent any more."""
        if self._state is MonitorState.CLOSED:
            return "the monitor is closed"
        return "the QMP connection was lost (QEMU exited or closed the socket)"

    def _require_open(self, what: str) -> None:
        """Raise :class:`~qmpagent.MonitorUnavailable` for ``what`` unless the monitor is open."""
        if self._state is not MonitorState.OPEN:
            raise MonitorUnavailable(f"{what}: {self._gone()}")

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
        self._require_open(command)
        return await self._deadlines.execute(
            self._client, command, arguments,
            timeout=resolve_timeout(timeout, self.command_timeout), gone=self._gone,
        )

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
        return self._events.stream(names, maxsize, match)

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
        return await run_job(
            self, command, arguments,
            timeout=resolve_timeout(timeout, self.command_timeout),
            job_id=job_id,
            # bounds the clean-up of a job given up on, even on a monitor without a timeout
            cleanup_timeout=(
                self.command_timeout if self.command_timeout is not None
                else DEFAULT_COMMAND_TIMEOUT
            ),
        )

    def block_job(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        job_id: str | None = None,
        on_progress: ProgressCallback | None = None,
        progress_interval: float = 1.0,
    ) -> BlockJob:
        """A two-phase job (an active ``block-commit``, ``blockdev-mirror``), to use as
        ``async with mon.block_job(...) as job``: the command is issued on entry (its events
        listened for first), then ``await job.wait_ready(timeout=...)`` and
        ``await job.complete(timeout=...)`` or ``await job.cancel(timeout=...)``.

        Leaving the block before the job was completed or cancelled (an error, a timeout, the
        caller cancelled) cancels and dismisses it, shielded and bounded by
        :attr:`command_timeout`; so does a :class:`~qmpagent.JobReadyTimeout` of
        :meth:`BlockJob.wait_ready`. Start block jobs with ``"auto-dismiss": false`` (and
        ``"speed"`` in bytes per second to limit them).

        Args:
            command: the command that starts the job.
            arguments: its arguments; ``"job-id"`` is added when missing.
            job_id: the job id to use (default: ``arguments["job-id"]``, else a fresh one).
            on_progress: called with a :class:`JobProgress` at every progress poll.
            progress_interval: seconds between progress polls (``query-jobs``).

        Raises:
            UsageError: ``job_id`` contradicts ``arguments["job-id"]``, or a bad interval.
            MonitorCommandError: on entry: QEMU refused the command (no job was started).
        """
        return BlockJob(
            self, command, arguments, job_id=job_id, cleanup_timeout=self._cleanup_timeout(),
            on_progress=on_progress, progress_interval=progress_interval,
        )

    def attach_job(
        self,
        job_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        progress_interval: float = 1.0,
    ) -> BlockJob:
        """A handle on an existing job (e.g. one left by a process that died), to use as
        ``async with mon.attach_job(job_id) as job``; its status is read on entry. As with
        :meth:`block_job`, leaving the block without completing or cancelling the job cancels
        and dismisses it.

        Raises:
            UsageError: ``job_id`` is not a non-empty string.
            MonitorCommandError: on entry: QEMU has no such job (``"DeviceNotFound"``).
        """
        return BlockJob(
            self, None, None, job_id=job_id, cleanup_timeout=self._cleanup_timeout(),
            on_progress=on_progress, progress_interval=progress_interval,
        )

    def _cleanup_timeout(self) -> float:
        # bounds the clean-up of a job given up on, even on a monitor without a timeout
        return self.command_timeout if self.command_timeout is not None else DEFAULT_COMMAND_TIMEOUT

    # agent port -------------------------------------------------------------------------------

    async def virtio_serial_ports(self, *, refresh: bool = False) -> list[VirtioSerialPort]:
        """Every ``virtserialport`` device (in ``/machine/peripheral`` and
        ``/machine/peripheral-anon``) with its chardev's current state.

        The device list is found with ``qom-list``/``qom-get`` once and cached; ``refresh``
        finds it again. The open state is always read afresh from ``query-chardev``.

        Raises:
            MonitorError: a query failed (see :meth:`execute`).
        """
        return await self._ports.virtio_serial_ports(refresh=refresh)

    async def serial_port(self, device_id: str) -> VirtioSerialPort:
        """The ``virtserialport`` with qdev id ``device_id`` (the ``id`` of a
        ``VSERPORT_CHANGE`` event): its chardev, port name and current open state.

        Raises:
            MonitorCommandError: no such port (``error_class`` ``"DeviceNotFound"``).
            MonitorError: a query failed (see :meth:`execute`).
        """
        return await self._ports.serial_port(device_id)

    async def agent_port(self, chardev: str | None = None) -> VirtioSerialPort:
        """The guest agent's port and whether the guest has it open right now.

        Args:
            chardev: the agent's chardev label; by default the chardev of the virtserialport
                named ``org.qemu.guest_agent.0``.

        Raises:
            AgentUnavailable: QEMU has no such port or chardev.
            MonitorError: a query failed (see :meth:`execute`).
        """
        return await self._ports.agent_port(chardev)

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
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
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
        return await self._ports.wait_agent_port(
            timeout=resolve_timeout(timeout, self.command_timeout),
            open=open,
            chardev=chardev,
            poll_interval=_PORT_POLL_INTERVAL,
        )

    # block ------------------------------------------------------------------------------------

    async def named_block_nodes(self) -> list[BlockNode]:
        """All named block nodes (``query-named-block-nodes``, ``flat`` where supported).

        Raises:
            MonitorProtocolError: the reply is not a list of ``BlockDeviceInfo`` objects, or a
                member has the wrong type.
            MonitorError: the query failed (see :meth:`execute`).
        """
        return await self._block.named_block_nodes()

    async def block_devices(self) -> list[BlockDevice]:
        """All block backends (``query-block``).

        Raises:
            MonitorProtocolError: the reply is not a list of ``BlockInfo`` objects, or a member
                has the wrong type.
            MonitorError: the query failed (see :meth:`execute`).
        """
        return await self._block.block_devices()

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
        return await self._block.device_node_name(device)


def _check_close_timeout(value: object) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise UsageError(f"close_timeout must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


#: How many more times a connect is tried when QEMU ended the session it had just accepted.
_SESSION_RETRIES: Final = 3
_SESSION_RETRY_PAUSE: Final = 0.05


def _session_ended_early(exc: ConnectError) -> bool:
    """Whether QEMU accepted the connection and then hung up or refused the negotiation.

    QEMU's QMP socket serves one client at a time, and a client that connects just as the
    previous one leaves can be hung up on, or told that negotiation "is already complete",
    while QEMU is still tearing the previous session down (seen on QEMU 7.2 with back-to-back
    ``qmpagent`` commands). That passes in a moment; a socket that is not QMP at all fails
    every attempt the same way and is reported as before."""
    cause: BaseException = exc.exc
    if isinstance(cause, NegotiationError):
        return True
    if isinstance(cause, GreetingError):  # hung up before the greeting; not garbage instead
        cause = cause.exc
    return isinstance(cause, (EOFError, ConnectionResetError))


async def _connect_client(addr: str | tuple[str, int], name: str | None) -> QMPClient:
    """A connected ``QMPClient`` (see :func:`_session_ended_early` for the retries); the
    caller bounds the whole of it."""
    attempt = 0
    while True:
        client = QMPClient(name)
        silence_default_listener(client)  # before any event can arrive
        try:
            await client.connect(addr)
            return client
        except ConnectError as exc:
            if attempt >= _SESSION_RETRIES or not _session_ended_early(exc):
                raise
            attempt += 1
            log.debug("QMP at %r ended the session at once (%s); again", addr, exc)
        await asyncio.sleep(_SESSION_RETRY_PAUSE)
