"""Settling an operation's freeze (:class:`FreezeSettler`): a freeze whose reply was lost is
resolved (ours, or not frozen), and ours, only ours, is thawed, retrying within ``thaw_timeout``
and reconnecting to the agent if the connection was lost. To *settle* is both, in that order: the
thaw phase, and what :attr:`SnapshotState.must_settle <qmpagent.snapshot_state.SnapshotState.must_settle>`
asks for.

An :class:`~qmpagent.operation.Operation` holds one as ``settler``; the freeze resolves through it
too, within the window, when its reply is lost. Also here: :func:`keeping_thaw_error`, how a
clean-up step runs while a :class:`~qmpagent.ThawError` propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine
from typing import Any

import anyio

from ._shield import run_to_completion
from .agent import FreezeStatus
from .agent_link import AgentLink
from .crash_safety import CrashSafety
from .errors import AgentError, ThawError
from .operation_types import Timeouts
from .snapshot_state import FreezeState, SnapshotState

__all__ = ["FreezeSettler", "keeping_thaw_error"]

log = logging.getLogger("qmpagent.snapshot")  # the logger these messages always had


async def keeping_thaw_error(failure: BaseException | None, step: Coroutine[Any, Any, None]) -> None:
    """Run a clean-up step to completion while ``failure`` propagates. If that failure is a
    ThawError, nothing that happens meanwhile (a late cancellation, a timeout of the caller)
    may replace it: the caller must learn that the guest may still be frozen."""
    try:
        await run_to_completion(step)
    except BaseException as late:
        if isinstance(failure, ThawError):
            log.warning("ignored during clean-up after a failed thaw: %r", late)
            return
        raise


class FreezeSettler:
    """Resolves and thaws one operation's freeze (see the module docstring). It writes the
    freeze's state machine in ``state`` and appends to ``warnings``; it speaks on ``link``'s
    connection, in turn with the freeze guard (``safety``), and takes over the guard's result
    if the guard thawed.

    Attributes:
        agent_error: the last agent error that hid the freeze's outcome or failed a thaw (for
            messages); the operation's freeze and the crash safety's guard set it too.
        resolve_deadline: when the resolution of a freeze without reply must give up
            (``thaw_timeout`` from its first attempt, wherever it continues).
    """

    def __init__(
        self, state: SnapshotState, safety: CrashSafety, link: AgentLink, timeouts: Timeouts,
        warnings: list[str],
    ) -> None:
        self.state = state
        self.safety = safety
        self.link = link
        self.t = timeouts
        self.warnings = warnings
        self.agent_error: BaseException | None = None
        self.resolve_deadline: float | None = None

    async def settle(self) -> None:
        """The thaw phase: resolve a freeze whose outcome is not known, then thaw ours.
        Shielded from cancellation and bounded, every step in it, by ``thaw_timeout`` (a hard
        deadline on top of each step's own timeout). Raises ThawError if the guest may still
        be frozen by us."""
        st = self.state
        if not st.must_settle:
            return
        deadline = time.monotonic() + self.t.thaw
        self.safety.extend_guard(deadline)  # we are thawing: the guard waits for us until then
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + self.t.thaw
            if st.freeze is FreezeState.SENT_UNRESOLVED and not self.safety.guard_has_it():
                await self.resolve(deadline)
            if st.freeze is FreezeState.OURS and not self.safety.guard_has_it():
                await self._thaw(deadline)
            if st.must_settle and self.safety.guard_has_it():
                await self.safety.take_guard_result(deadline)
        last = self.agent_error
        if st.freeze is FreezeState.SENT_UNRESOLVED:
            message = (f"a freeze got no reply and its outcome cannot be read ({last}): "
                       "the guest MAY BE FROZEN; check guest-fsfreeze-status and thaw it")
        elif st.freeze is FreezeState.OURS:
            message = (f"thawing the guest failed ({last}): THE GUEST MAY STILL BE FROZEN; check "
                       "guest-fsfreeze-status and thaw it (qmpagent agent fsfreeze thaw)")
        else:
            return
        st.thaw_failed()
        raise ThawError(message, st.record) from last

    async def resolve(self, until: float) -> None:
        """After a freeze with no reply: resync and read the status, until ``until`` at the
        latest (and within the resolution's own budget, ``thaw_timeout`` from its first
        attempt). Frozen means ours (it was thawed at preflight): SENT_UNRESOLVED -> OURS, or
        NOT_FROZEN; still SENT_UNRESOLVED if time ran out. Never raises an AgentError."""
        st = self.state
        if self.resolve_deadline is None:
            self.resolve_deadline = time.monotonic() + self.t.thaw
        deadline = min(until, self.resolve_deadline)
        pause = 0.05
        while st.freeze is FreezeState.SENT_UNRESOLVED and time.monotonic() < deadline:
            agent = self.link.agent
            assert agent is not None
            try:
                with self.safety.turn() as mine:
                    if not mine:
                        return  # the guard has the agent: settle takes its result
                    # Resyncs first: the late freeze reply, if any, is dropped as stale.
                    status = await agent.fsfreeze_status(timeout=self._attempt_timeout(deadline))
            except AgentError as exc:
                self.agent_error = exc
                if not agent.is_connected and await self.link.reconnect(deadline) is None:
                    return
                await anyio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, 1.0)
                continue
            log.warning("freeze reply lost; status is %s", status.value)
            st.freeze_resolved(
                status is FreezeStatus.FROZEN,
                f"the freeze got no reply ({self.agent_error}) and did not freeze",
            )

    async def _thaw(self, deadline: float) -> None:
        """Thaw our freeze, resyncing, re-reading the status and reconnecting after a
        failure, until ``deadline``: OURS -> THAWED, or still OURS if it cannot be confirmed."""
        st = self.state
        agent = self.link.agent
        assert agent is not None
        pause = 0.05
        while time.monotonic() < deadline:
            try:
                with self.safety.turn() as mine:
                    if not mine:
                        return  # the guard has the agent: settle takes its result
                    n = await agent.fsfreeze_thaw(timeout=self._attempt_timeout(deadline))
                    st.thaw_confirmed(n, time.monotonic())
                    self.safety.disarm_guard()  # before the turn ends: the guard never acts after it
                if n > st.frozen:
                    # qemu-ga's thaw takes no list: it thawed a freeze that was not ours.
                    self.warnings.append(
                        f"the thaw thawed {n} filesystems, {n - st.frozen} more than this "
                        "snapshot froze: another tool's freeze in the guest was thawed too"
                    )
                    log.warning("%s", self.warnings[-1])
                return
            except AgentError as exc:
                self.agent_error = exc
                log.warning("thaw failed: %s", exc)
            # Did it thaw anyway (a lost reply)? The status decides.
            if time.monotonic() >= deadline:
                break
            try:
                with self.safety.turn() as mine:
                    if not mine:
                        return
                    status = await agent.fsfreeze_status(timeout=self._attempt_timeout(deadline))
                    if status is FreezeStatus.THAWED:
                        # The thaw went through; its count was lost with the reply: it thawed
                        # (at least) what we froze.
                        st.thaw_confirmed(None, time.monotonic())
                        self.safety.disarm_guard()
                        log.warning("thaw reply lost, but the guest is thawed")
                        return
            except AgentError as exc:
                self.agent_error = exc
            if not agent.is_connected:
                reconnected = await self.link.reconnect(deadline)
                if reconnected is None:
                    return
                agent = reconnected
            await anyio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 1.0)

    def _attempt_timeout(self, deadline: float) -> float:
        """One thaw or status attempt may take the agent timeout, or half of what is left of
        the budget if that is longer, but never more than what is left."""
        remaining = deadline - time.monotonic()
        return max(0.001, min(remaining, max(self.t.agent, remaining / 2)))
