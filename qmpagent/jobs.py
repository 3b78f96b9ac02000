"""QMP jobs run to completion and always dismissed: :func:`run_job` (behind
:meth:`~qmpagent.Monitor.run_job`) and its steps.

A job-based command (``blockdev-create``, ``snapshot-save``, ...) only starts a job; its outcome
comes later, in ``JOB_STATUS_CHANGE`` events and ``query-jobs``. The events are listened for
before the command is issued (none can be missed), the result is read once the job concluded,
and the job is dismissed; a job given up on (timeout, cancellation) is cancelled and dismissed.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ._monitor_api import MonitorAPI
from ._shield import run_to_completion
from .errors import (
    EventOverflow,
    JobError,
    MonitorCommandError,
    MonitorError,
    MonitorProtocolError,
    MonitorTimeout,
    UsageError,
)
from .events import EventStream, QMPEvent
from .timeouts import deadline, deadline_raising

__all__ = ["JobResult", "abandon_job", "job_arguments", "query_job", "run_job", "wait_concluded"]

log = logging.getLogger("qmpagent.monitor")  # the logger these messages always had

# The events that tell a job's progress: JOB_STATUS_CHANGE for every job; block jobs also end
# with one of the other two, which is all that is left of a job that dismissed itself.
_JOB_EVENTS: Final = ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
# A job sends a handful of events; more than this between two reads is an overflow, handled.
_JOB_QUEUE_SIZE: Final = 64


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


def job_arguments(
    arguments: Mapping[str, object] | None, job_id: str | None
) -> tuple[dict[str, object], str]:
    """The command's arguments with their ``"job-id"``, and that id: ``job_id``, else the one in
    ``arguments``, else a fresh one.

    Raises:
        UsageError: ``arguments["job-id"]`` is not a string, or contradicts ``job_id``.
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
    return args, job_id


async def query_job(mon: MonitorAPI, job_id: str) -> dict[str, Any] | None:
    """The job's ``query-jobs`` entry, or ``None`` if QEMU has no such job (any more).

    Raises:
        MonitorProtocolError: ``query-jobs`` did not answer with a list.
        MonitorError: the query failed.
    """
    jobs = await mon.execute("query-jobs", timeout=None)
    if not isinstance(jobs, list):
        raise MonitorProtocolError(f"query-jobs: expected a list, got {type(jobs).__name__}")
    for job in jobs:
        if isinstance(job, dict) and job.get("id") == job_id:
            return job
    return None


async def wait_concluded(
    mon: MonitorAPI, job_id: str, events: EventStream, block_events: list[QMPEvent]
) -> None:
    """Wait until the job concluded or vanished (status ``null``), keeping the block-job events
    that arrive meanwhile in ``block_events``. After lost events, ``query-jobs`` tells."""
    while True:
        try:
            event = await events.get(timeout=None)
        except EventOverflow:
            info = await query_job(mon, job_id)
            if info is None or info.get("status") == "concluded":
                return
            continue
        if event["event"] != "JOB_STATUS_CHANGE":
            block_events.append(event)
            continue
        if event["data"].get("status") in ("concluded", "null"):
            return


async def abandon_job(mon: MonitorAPI, job_id: str, *, limit: float) -> None:
    """Cancel (if needed) and dismiss a job we gave up on, within ``limit`` seconds; never
    raises :class:`~qmpagent.MonitorError` (what went wrong is logged)."""
    try:
        async with (
            mon.listen("JOB_STATUS_CHANGE", maxsize=_JOB_QUEUE_SIZE, match={"id": job_id}) as ev,
            deadline(limit),
        ):
            info = await query_job(mon, job_id)
            if info is None:
                return
            if info.get("status") != "concluded":
                log.info("cancelling job %s (status %s)", job_id, info.get("status"))
                try:
                    await mon.execute("job-cancel", {"id": job_id}, timeout=None)
                except MonitorCommandError as exc:  # it concluded meanwhile?
                    log.debug("job-cancel %s: %s", job_id, exc)
                await wait_concluded(mon, job_id, ev, [])
                info = await query_job(mon, job_id)
                if info is None:
                    return
            await mon.execute("job-dismiss", {"id": job_id}, timeout=None)
            log.info("dismissed abandoned job %s", job_id)
    except (MonitorError, TimeoutError) as exc:
        log.warning("could not cancel and dismiss job %s: %r", job_id, exc)


class _Job:
    """One run of a job-based command, step by step: what :func:`run_job` knows of it."""

    __slots__ = ("block_events", "command", "issued", "job_id", "mon", "refused")

    def __init__(self, mon: MonitorAPI, command: str, job_id: str) -> None:
        self.mon = mon
        self.command = command
        self.job_id = job_id
        self.issued = False  # the command went out: from then on a job may exist
        self.refused = False  # QEMU refused the command: no job was made
        self.block_events: list[QMPEvent] = []  # what is left of a job that dismissed itself

    def is_ours(self, event: QMPEvent) -> bool:
        """Whether an event of :data:`_JOB_EVENTS` is about this job."""
        data = event["data"]
        if event["event"] == "JOB_STATUS_CHANGE":
            return data.get("id") == self.job_id
        return data.get("device") == self.job_id

    @property
    def may_exist(self) -> bool:
        """Whether QEMU may hold a job of ours (to cancel and dismiss on the way out)."""
        return self.issued and not self.refused

    async def start(self, args: Mapping[str, object]) -> None:
        """Issue the command that starts the job."""
        self.issued = True
        try:
            await self.mon.execute(self.command, args, timeout=None)
        except MonitorCommandError:
            self.refused = True
            raise
        log.debug("job %s (%s) started", self.job_id, self.command)

    async def conclude(self, events: EventStream) -> dict[str, Any] | None:
        """Wait for the job to conclude, read its ``query-jobs`` entry (``None``: it is gone)
        and dismiss it."""
        await wait_concluded(self.mon, self.job_id, events, self.block_events)
        info = await query_job(self.mon, self.job_id)
        self._keep_block_events(events)
        if info is not None:
            await self._dismiss(info)
        return info

    def _keep_block_events(self, events: EventStream) -> None:
        # Block-job events queued before query-jobs' reply: the outcome of an auto-dismissed job.
        while True:
            event = events.get_nowait()
            if event is None:
                return
            if event["event"] != "JOB_STATUS_CHANGE":
                self.block_events.append(event)

    async def _dismiss(self, info: Mapping[str, Any]) -> None:
        try:
            await self.mon.execute("job-dismiss", {"id": self.job_id}, timeout=None)
        except MonitorCommandError as exc:
            if not info.get("error"):
                raise
            # The job's own error is what the caller needs to hear about.
            log.warning("could not dismiss failed job %s: %s", self.job_id, exc)

    def result(self, info: Mapping[str, Any] | None, duration: float) -> JobResult:
        """The outcome, from the job's ``query-jobs`` entry, else from its block-job events.

        Raises:
            JobError: the job failed, was cancelled, or left no trace of its outcome.
        """
        if info is None:
            return self._result_from_block_events(duration)
        error = info.get("error")
        job_type = info.get("type")
        if error:
            raise JobError(self.command, self.job_id, str(error))
        log.debug("job %s (%s) concluded in %.3fs", self.job_id, self.command, duration)
        return JobResult(
            self.job_id, self.command, job_type if isinstance(job_type, str) else None, duration
        )

    def _result_from_block_events(self, duration: float) -> JobResult:
        # Gone before we could read it (auto-dismissed): only a block-job event tells.
        if not self.block_events:
            raise JobError(
                self.command, self.job_id,
                "the job disappeared before its result could be read (auto-dismiss?)",
            )
        last = self.block_events[-1]
        if last["event"] == "BLOCK_JOB_CANCELLED":
            raise JobError(self.command, self.job_id, "the job was cancelled")
        error = last["data"].get("error")
        if error:
            raise JobError(self.command, self.job_id, str(error))
        return JobResult(self.job_id, self.command, last["data"].get("type"), duration)


async def run_job(
    mon: MonitorAPI,
    command: str,
    arguments: Mapping[str, object] | None,
    *,
    timeout: float | None,
    job_id: str | None,
    cleanup_timeout: float,
) -> JobResult:
    """Run a job-based command to completion on ``mon``: see :meth:`~qmpagent.Monitor.run_job`.

    Args:
        timeout: for the whole job (``None``: none).
        cleanup_timeout: bounds cancelling and dismissing a job given up on.
    """
    args, job_id = job_arguments(arguments, job_id)
    job = _Job(mon, command, job_id)
    started = time.monotonic()
    async with mon.listen(*_JOB_EVENTS, maxsize=_JOB_QUEUE_SIZE, match=job.is_ours) as events:
        try:
            async with deadline_raising(timeout, lambda: MonitorTimeout(
                f"{command}: job {job_id} did not conclude within {timeout:g}s"
                " (cancelled and dismissed)"
            )):
                await job.start(args)
                info = await job.conclude(events)
        except BaseException:
            # Also when the command's reply did not come in time: the job may exist.
            if job.may_exist and mon.is_open:
                await run_to_completion(abandon_job(mon, job_id, limit=cleanup_timeout))
            raise
    return job.result(info, time.monotonic() - started)
