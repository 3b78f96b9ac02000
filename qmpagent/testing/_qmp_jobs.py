"""The fake QEMU's jobs (``blockdev-create`` and the job commands a test adds): their states,
``JOB_STATUS_CHANGE`` events in QEMU's order, cancellation and conclusion.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._faults import Fault, FaultKind
from ._qmp_error import FakeQMPError

__all__ = ["FakeJob", "JobRunner", "JobWork"]

log = logging.getLogger("qmpagent.testing.fake_qmp")  # the server's log, as before the split

#: What a job does when it completes: returns None, or the error text it concludes with.
JobWork = Callable[[], "str | None"]


@dataclass
class FakeJob:
    """A job of the fake server (see :meth:`FakeQMPServer.add_job_command`).

    Attributes:
        id: the job id.
        type: the job type (``query-jobs`` ``type``), e.g. ``"create"``.
        status: the current status (``"created"``, ``"running"``, ..., ``"concluded"``).
        error: the error text it concludes with, if it fails.
        duration: seconds it runs before concluding; ``None``: until cancelled.
    """

    id: str
    type: str
    status: str = "created"
    error: str | None = None
    duration: float | None = 0.0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _cancelled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _work: JobWork | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Ask the job to stop (``job-cancel``): it concludes with "Operation cancelled"."""
        self._cancelled.set()

    def info(self) -> dict[str, Any]:
        """The job as ``query-jobs`` shows it. Raises nothing."""
        done = 1 if self.status in ("concluded", "pending", "waiting") else 0
        info: dict[str, Any] = {
            "id": self.id, "type": self.type, "status": self.status,
            "current-progress": done, "total-progress": 1,
        }
        if self.status == "concluded" and self.error is not None:
            info["error"] = self.error
        return info


class JobRunner:
    """Runs the jobs of one server.

    Args:
        jobs: the server's job table (job id -> job), asked each time (it may be replaced).
        emit: sends an event to the server's clients.
    """

    def __init__(
        self,
        jobs: Callable[[], dict[str, FakeJob]],
        emit: Callable[[str, Mapping[str, Any]], Awaitable[None]],
    ) -> None:
        self._jobs = jobs
        self._emit = emit

    def start(
        self, job_id: str, job_type: str, *, duration: float | None, error: str | None
    ) -> FakeJob:
        """Start a job now, its ``created`` and ``running`` announced as it starts.

        Raises:
            FakeQMPError: a job with this id exists.
        """
        job = self._new(job_id, job_type, duration, error, None)
        job._task = asyncio.ensure_future(self._run(job, announce=True))
        return job

    async def close(self) -> None:
        """Stop every job that is still running."""
        tasks = [j._task for j in self._jobs().values() if j._task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _new(
        self, job_id: str, job_type: str, duration: float | None, error: str | None,
        work: JobWork | None,
    ) -> FakeJob:
        if job_id in self._jobs():
            raise FakeQMPError("GenericError", f"Job ID '{job_id}' already in use")
        job = FakeJob(job_id, job_type, error=error, duration=duration)
        job._work = work
        self._jobs()[job_id] = job
        return job

    async def start_announced(
        self, fault: Fault | None, job_id: str, job_type: str, duration: float | None,
        error: str | None, work: JobWork | None,
    ) -> FakeJob:
        """Start a job for a command (its fault, ``JOB_ERROR`` or ``JOB_DELAY``, applied):
        ``created`` and ``running`` are announced before the command's reply."""
        if fault is not None and fault.kind is FaultKind.JOB_ERROR:
            error, work = fault.desc, None
        if fault is not None and fault.kind is FaultKind.JOB_DELAY and duration is not None:
            duration += fault.seconds
        job = self._new(job_id, job_type, duration, error, work)
        await self._set_status(job, "created")
        await self._set_status(job, "running")
        job._task = asyncio.ensure_future(self._run(job, announce=False))
        return job

    async def _set_status(self, job: FakeJob, status: str) -> None:
        job.status = status
        await self._emit("JOB_STATUS_CHANGE", {"id": job.id, "status": status})

    async def _run(self, job: FakeJob, *, announce: bool) -> None:
        await asyncio.sleep(0)  # the command's reply goes out first
        if announce:
            await self._set_status(job, "created")
            await self._set_status(job, "running")
        try:
            await asyncio.wait_for(job._cancelled.wait(), job.duration)
            job.error = "Operation cancelled"
        except asyncio.TimeoutError:
            pass
        if job.error is None and job._work is not None:
            try:
                job.error = job._work()
            except Exception as exc:  # a broken job: conclude with its error, and log it
                log.exception("fake QMP job %s failed", job.id)
                job.error = f"fake job failed: {exc!r}"
        if job.error is not None:
            await self._set_status(job, "aborting")
        else:
            await self._set_status(job, "waiting")
            await self._set_status(job, "pending")
        await self._set_status(job, "concluded")
