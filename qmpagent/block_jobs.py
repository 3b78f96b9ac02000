"""Two-phase block jobs: :class:`BlockJob` (behind :meth:`~qmpagent.Monitor.block_job` and
:meth:`~qmpagent.Monitor.attach_job`).

A job like an active ``block-commit`` (or ``blockdev-mirror``) does not conclude by itself:
it copies, reports ``ready`` (``BLOCK_JOB_READY``) once source and target are in sync, and then
waits for the caller to *complete* it (``block-job-complete``: the pivot) or *cancel* it
(the VM stays where it was). :func:`~qmpagent.jobs.run_job` cannot run such a job; this module
runs it step by step, under the same rules:

* the job's events are listened for before the command is issued, and ``query-jobs`` is read
  again whenever events may have been lost (and on every progress poll);
* every wait has a timeout: reaching ``ready`` (a job starved by the guest's writes never gets
  there), the completion, the cancellation;
* the job is dismissed on every path: a handle left without completing or cancelling it (an
  error, a timeout, the caller cancelled) cancels and dismisses the job, shielded from further
  cancellation and bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from ._monitor_api import MonitorAPI
from ._shield import run_to_completion
from .errors import (
    EventOverflow,
    JobError,
    JobReadyTimeout,
    MonitorCommandError,
    MonitorTimeout,
    UsageError,
)
from .events import EventStream, QMPEvent
from .jobs import JobResult, abandon_job, job_arguments, query_job

__all__ = ["BlockJob", "JobProgress", "ProgressCallback"]

log = logging.getLogger("qmpagent.monitor")

_EVENTS: Final = (
    "JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
)
_QUEUE_SIZE: Final = 64
#: Statuses in which the job waits to be completed (``standby``: ready, VM paused).
READY_STATUSES: Final = frozenset({"ready", "standby"})
#: Statuses after which the job will not run again (``null``: it is gone).
ENDED_STATUSES: Final = frozenset({"aborting", "concluded", "null"})


@dataclass(frozen=True, slots=True)
class JobProgress:
    """Where a job stands, from its ``query-jobs`` entry.

    Attributes:
        job_id: the job's id.
        status: its status (``"running"``, ``"ready"``, ``"concluded"``, ...).
        current: ``current-progress`` (bytes, for block jobs).
        total: ``total-progress``; it can grow while the guest writes.
        speed: the speed limit in bytes per second set on the job (0: none), if known.
    """

    job_id: str
    status: str
    current: int
    total: int
    speed: int | None = None

    @property
    def fraction(self) -> float | None:
        """``current / total`` (None when the total is 0). Raises nothing."""
        return self.current / self.total if self.total > 0 else None


#: ``on_progress(progress)``: called at every progress poll; must not block. An exception it
#: raises is logged and ignored.
ProgressCallback = Callable[[JobProgress], None]


def _progress(job_id: str, info: Mapping[str, Any]) -> JobProgress:
    def number(key: str) -> int:
        value = info.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    status = info.get("status")
    return JobProgress(job_id, status if isinstance(status, str) else "unknown",
                       number("current-progress"), number("total-progress"))


class BlockJob:
    """One two-phase job: started (or found) on entry, then :meth:`wait_ready`, then
    :meth:`complete` or :meth:`cancel`; dismissed on every path.

    Use it as an async context manager (``async with mon.block_job(...) as job``). Leaving the
    block before the job was completed or cancelled (an error, a timeout, the caller cancelled)
    cancels and dismisses it, shielded from cancellation and bounded by the monitor's
    ``command_timeout``.

    Attributes:
        job_id: the job's id.
        command: the command that started it (``None`` for a job found with
            :meth:`~qmpagent.Monitor.attach_job`).
        status: the last status seen (from events and ``query-jobs``); ``None`` before entry.
        dismissed: the job was dismissed (or QEMU has no such job any more).
    """

    def __init__(
        self,
        mon: MonitorAPI,
        command: str | None,
        arguments: Mapping[str, object] | None,
        *,
        job_id: str | None,
        cleanup_timeout: float,
        on_progress: ProgressCallback | None = None,
        progress_interval: float = 1.0,
    ) -> None:
        """Made by :meth:`~qmpagent.Monitor.block_job` / :meth:`~qmpagent.Monitor.attach_job`.

        Raises:
            UsageError: a bad ``job-id`` or ``progress_interval``.
        """
        if command is None:
            if not isinstance(job_id, str) or not job_id:
                raise UsageError(f"job_id must be a non-empty string, not {job_id!r}")
            self._args: dict[str, object] = {}
        else:
            self._args, job_id = job_arguments(arguments, job_id)
        if (
            isinstance(progress_interval, bool)
            or not isinstance(progress_interval, (int, float))
            or not progress_interval > 0
        ):
            raise UsageError(f"progress_interval must be a positive number, not {progress_interval!r}")
        self._mon = mon
        self.command = command
        self.job_id: str = job_id
        self.status: str | None = None
        self.dismissed = False
        self._cleanup_timeout = cleanup_timeout
        self._on_progress = on_progress
        self._interval = float(progress_interval)
        self._events: EventStream | None = None
        self._started = 0.0
        self._may_exist = False
        self._finished = False  # completed or cancelled by us: nothing to abandon
        self._last: JobProgress | None = None

    def __repr__(self) -> str:
        return f"<BlockJob {self.job_id} {self.status}>"

    def _is_ours(self, event: QMPEvent) -> bool:
        data = event["data"]
        key = "id" if event["event"] == "JOB_STATUS_CHANGE" else "device"
        return bool(data.get(key) == self.job_id)

    # entry and exit -------------------------------------------------------------------------

    async def __aenter__(self) -> BlockJob:
        events = self._mon.listen(*_EVENTS, maxsize=_QUEUE_SIZE, match=self._is_ours)
        await events.__aenter__()
        self._events = events
        self._started = time.monotonic()
        try:
            if self.command is None:
                info = await query_job(self._mon, self.job_id)
                if info is None:
                    raise MonitorCommandError("query-jobs", "DeviceNotFound", f"no job {self.job_id!r}")
                self._may_exist = True
                self._update(info)
            else:
                self._may_exist = True  # from the moment it is sent, a job may exist
                try:
                    await self._mon.execute(self.command, self._args, timeout=None)
                except MonitorCommandError:
                    self._may_exist = False  # refused: no job was made
                    raise
                self.status = self.status or "created"
                log.debug("job %s (%s) started", self.job_id, self.command)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _close(self) -> None:
        try:
            if self._may_exist and not self.dismissed and self._mon.is_open:
                if not self._finished:
                    log.info("abandoning job %s (status %s)", self.job_id, self.status)
                await run_to_completion(
                    abandon_job(self._mon, self.job_id, limit=self._cleanup_timeout)
                )
                self.dismissed = True
        finally:
            events, self._events = self._events, None
            if events is not None:
                await events.__aexit__(None, None, None)

    # the steps ------------------------------------------------------------------------------

    def _stream(self) -> EventStream:
        if self._events is None:
            raise UsageError("the job handle is not active: use it as `async with`")
        return self._events

    def _update(self, info: Mapping[str, Any]) -> JobProgress:
        progress = _progress(self.job_id, info)
        self.status = progress.status
        self._last = progress
        return progress

    async def progress(self) -> JobProgress:
        """The job's progress now (``query-jobs``); status ``"null"`` once it is gone.

        Raises:
            MonitorError: the query failed.
        """
        info = await query_job(self._mon, self.job_id)
        if info is None:
            self.status = "null"
            return JobProgress(self.job_id, "null", 0, 0)
        return self._update(info)

    def _notify(self, progress: JobProgress) -> None:
        if self._on_progress is None:
            return
        try:
            self._on_progress(progress)
        except Exception:
            log.exception("on_progress callback failed (ignored)")

    async def _wait_for(self, statuses: frozenset[str], until: float | None) -> bool:
        """Wait until the status is one of ``statuses`` or the job ended; False if ``until``
        (a monotonic time) passed first. Progress is polled every interval."""
        events = self._stream()
        next_poll = time.monotonic()
        while True:
            if self.status in statuses or self.status in ENDED_STATUSES:
                return True
            now = time.monotonic()
            if until is not None and now >= until:
                return False
            if now >= next_poll:
                # query-jobs also catches a status whose event was lost.
                self._notify(await self.progress())
                next_poll = time.monotonic() + self._interval
                continue
            wait = next_poll - now if until is None else min(next_poll, until) - now
            try:
                event = await events.get(timeout=max(wait, 0.001))
            except MonitorTimeout:
                continue
            except EventOverflow:
                await self.progress()
                continue
            if event["event"] == "JOB_STATUS_CHANGE":
                status = event["data"].get("status")
                if isinstance(status, str):
                    self.status = status
            elif event["event"] == "BLOCK_JOB_READY" and self.status not in ENDED_STATUSES:
                self.status = "ready"

    async def wait_ready(self, *, timeout: float | None) -> JobProgress:
        """Wait until the job is ready to be completed.

        Args:
            timeout: seconds (``None``: no limit). A job that is not ready by then (e.g. an
                active commit that the guest's writes keep from converging) is cancelled and
                dismissed, and :class:`~qmpagent.JobReadyTimeout` raised: the VM stays on the
                node it runs on.

        Returns:
            The job's progress once ready.

        Raises:
            JobReadyTimeout: not ready in time (the job was cancelled and dismissed).
            JobError: the job ended before it was ready (failed, or cancelled by someone
                else); it was dismissed.
            MonitorError: a command failed or the connection was lost.
        """
        until = None if timeout is None else time.monotonic() + timeout
        if not await self._wait_for(READY_STATUSES, until):
            last = self._last
            await self.cancel(timeout=self._cleanup_timeout)
            done = f" ({last.current} of {last.total} bytes copied)" if last is not None else ""
            raise JobReadyTimeout(
                f"job {self.job_id} was not ready within {timeout:g}s{done}; it was cancelled "
                "and dismissed (the VM stays on its current node)",
                job_id=self.job_id, progress=last,
            )
        if self.status in ENDED_STATUSES:
            info = await self._conclude(None)
            raise self._ended_error(info, "before it was ready")
        progress = await self.progress()
        self._notify(progress)
        return progress

    async def complete(self, *, timeout: float | None) -> JobResult:
        """Complete a ready job (``block-job-complete``: for an active commit, the pivot to
        the base), wait for it to conclude and dismiss it.

        Raises:
            JobError: the completion failed (the job's error is in ``.desc``); dismissed.
            MonitorTimeout: it did not conclude in time (then the handle's exit cancels and
                dismisses it; whether the pivot happened must be read from QEMU).
            MonitorCommandError: QEMU refused the completion (e.g. not ready).
        """
        await self._mon.execute("block-job-complete", {"device": self.job_id}, timeout=None)
        self._finished = True
        info = await self._conclude(timeout)
        if info is not None and info.get("error"):
            raise JobError(self.command or "block-job-complete", self.job_id, str(info["error"]))
        return JobResult(self.job_id, self.command or "block-job-complete",
                         info.get("type") if info is not None else None,
                         time.monotonic() - self._started)

    async def cancel(self, *, timeout: float | None) -> None:
        """Cancel the job (the VM stays where it was), wait for it to conclude and dismiss it.
        A ready job is cancelled with ``block-job-cancel`` ``force`` (no final sync: at once).
        Nothing to do for a job that is gone.

        Raises:
            MonitorTimeout: it did not conclude in time (the handle's exit tries again).
            MonitorError: a command failed.
        """
        if self.status not in ENDED_STATUSES:
            try:
                if self.status in READY_STATUSES:
                    await self._mon.execute(
                        "block-job-cancel", {"device": self.job_id, "force": True}, timeout=None
                    )
                else:
                    await self._mon.execute("job-cancel", {"id": self.job_id}, timeout=None)
            except MonitorCommandError as exc:  # concluded meanwhile?
                log.debug("cancelling job %s: %s", self.job_id, exc)
        self._finished = True
        await self._conclude(timeout)

    async def set_speed(self, speed: int) -> None:
        """Limit the job to ``speed`` bytes per second (0: no limit; ``block-job-set-speed``).

        Raises:
            UsageError: ``speed`` is not an int >= 0.
            MonitorCommandError: QEMU refused it.
        """
        if isinstance(speed, bool) or not isinstance(speed, int) or speed < 0:
            raise UsageError(f"speed must be an int >= 0 (bytes per second), not {speed!r}")
        await self._mon.execute("block-job-set-speed", {"device": self.job_id, "speed": speed})

    async def dismiss(self) -> None:
        """Dismiss a concluded job (``job-dismiss``); nothing to do if it is gone.

        Raises:
            MonitorCommandError: QEMU refused (e.g. the job has not concluded).
        """
        if self.dismissed:
            return
        try:
            await self._mon.execute("job-dismiss", {"id": self.job_id}, timeout=None)
        except MonitorCommandError:
            if await query_job(self._mon, self.job_id) is not None:
                raise
        self.dismissed = True

    async def wait_concluded(self, *, timeout: float | None) -> JobProgress:
        """Wait for a one-phase job (``blockdev-backup``, ``block-stream``: it concludes by
        itself) to conclude, polling its progress (``on_progress``) meanwhile, and dismiss it.
        May be called again after a :class:`~qmpagent.MonitorTimeout` (e.g. to check for a
        stall between calls).

        Returns:
            Its last progress (``current`` = ``total`` for a job that completed).

        Raises:
            MonitorTimeout: not concluded within ``timeout`` (the job goes on; leaving the
                handle cancels and dismisses it).
            JobError: the job failed, or was cancelled (by someone else); it was dismissed.
            MonitorError: a command failed or the connection was lost.
        """
        info = await self._conclude(timeout)
        self._finished = True
        if info is None:
            raise JobError(self.command or "job", self.job_id,
                           "the job disappeared before its result could be read (auto-dismiss?)")
        if info.get("error"):
            raise JobError(self.command or "job", self.job_id, str(info["error"]))
        progress = _progress(self.job_id, info)
        self._notify(progress)
        return progress

    async def _conclude(self, timeout: float | None) -> dict[str, Any] | None:
        """Wait until concluded (or gone), read the entry, dismiss; the entry (None: gone)."""
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            if not await self._wait_for(frozenset({"concluded", "null"}), until):
                raise MonitorTimeout(f"job {self.job_id} did not conclude within {timeout:g}s")
            info = await query_job(self._mon, self.job_id)
            if info is None or info.get("status") == "concluded":
                break
            self._update(info)  # "aborting": it concludes next
        if info is not None:
            self._update(info)
            await self.dismiss()
        else:
            self.status = "null"
            self.dismissed = True
        return info

    def _ended_error(self, info: Mapping[str, Any] | None, when: str) -> JobError:
        command = self.command or "job"
        error = info.get("error") if info is not None else None
        # QEMU reports a cancelled job as concluded with the error "Operation canceled".
        if error and "cancel" not in str(error).lower():
            return JobError(command, self.job_id, f"the job failed {when}: {error}")
        return JobError(command, self.job_id, f"the job was cancelled {when} (by someone else?)")
