"""An operation's crash safety (issue 13): its journal entry and the freeze guard.

:class:`CrashSafety` is a collaborator of one :class:`~qmpagent.operation.Operation`: before the
operation's steps, it settles what earlier, dead operations on the VM left and writes the
operation's journal entry durably (:mod:`qmpagent.journal`); around the freeze, it starts, arms
and disarms the freeze guard (:mod:`qmpagent.guard`), takes turns with it on the agent
connection and takes over its result if it thawed; at the end, it stops the guard and removes
the entry, or hands it to recovery if the operation leaves something unsettled.

It reads the operation's public state (``state``, ``agent``, ``warnings``, ...) and asks it
through its hooks (``fail``, ``describe_entry``, ``leaves_something``); a guard that could not
thaw is recorded as the ``agent_error`` of the operation's ``settler`` (:mod:`qmpagent.thaw`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .agent import AgentAddress, GuestAgent
from .errors import AgentError, JournalError, MonitorError, UnsettledOperationError
from .guard import FreezeGuard
from .journal import Entry, OverlayRecord, VMIdentity, identify_vm, new_op_id, process_start_time
from .snapshot_state import FreezeState
from .snapshot_types import Quiesce

if TYPE_CHECKING:
    from .operation import Operation

__all__ = ["CrashSafety"]

log = logging.getLogger("qmpagent.snapshot")  # the logger these messages always had


class CrashSafety:
    """The journal entry and the freeze guard of one operation (see the module docstring).

    Attributes:
        identity: the VM's identity, once :meth:`check_journal` read it.
        entry: the operation's journal entry, once :meth:`journal_prepare` wrote it.
        guard: the freeze guard, while it is started (None: not started, or stopped).
        guarded: the guard stood by for the whole freeze (``SnapshotResult.guarded``).
    """

    def __init__(self, op: Operation) -> None:
        self.op = op
        self.identity: VMIdentity | None = None
        self.entry: Entry | None = None
        self.guard: FreezeGuard | None = None
        self.guarded = False

    async def check_journal(self) -> None:
        """Identify the VM; settle what earlier, dead operations on it left (the same work as
        :func:`qmpagent.recover`), or refuse (UnsettledOperationError) if that is not
        possible or one of them is still running."""
        from .recovery import settle_journal

        try:
            self.identity = await identify_vm(self.op.mon, timeout=self.op.t.command)
            orch = self.op.orch
            agent: GuestAgent | AgentAddress | None = None
            if self.op.mode is not Quiesce.OFF:
                agent = orch.agent if orch.agent is not None else orch.agent_address
            report = await settle_journal(
                self.op.mon, agent, orch.journal, self.identity, timeout=self.op.t.command,
                agent_chardev=orch.agent_chardev, may_thaw=False,
            )
        except MonitorError as exc:
            raise self.op.fail(f"preflight: cannot query QEMU: {exc}", exc) from exc
        for err in report.journal_errors:
            self.op.warnings.append(f"journal: {err}")
            log.warning("journal: %s", err)
        if report.unresolved:
            raise UnsettledOperationError(
                "an earlier snapshot operation on this VM is unsettled: "
                + "; ".join(report.unresolved)
                + " (nothing was changed; settle it with qmpagent.recover() or `qmpagent recover`)",
                report.unresolved,
            )
        if report.settled:
            text = report.render().replace("\n", ";")
            self.op.warnings.append(f"settled an earlier operation on this VM that had died: {text}")
            log.warning("%s", self.op.warnings[-1])

    def journal_prepare(self) -> None:
        """The operation's entry, written durably before anything is created: what it is about
        to make (its overlays, and what :meth:`Operation.describe_entry` adds)."""
        assert self.identity is not None
        me = os.getpid()
        self.entry = Entry(
            op=new_op_id(),
            vm=self.identity,
            owner_pid=me,
            owner_start=process_start_time(me),
            overlays=[OverlayRecord(o.node, o.node_name, o.file_node_name, o.path) for o in self.op.overlays],
        )
        self.op.describe_entry(self.entry)
        self.journal_write("prepare")

    def journal_write(self, step: str, *, required: bool = True) -> None:
        """Write the entry durably, announcing ``step`` (before it is taken). A failure is a
        SnapshotError when ``required`` (before a step), else a warning."""
        entry = self.entry
        if entry is None:
            return
        entry.step = step
        entry.freeze = self.op.state.freeze.value
        entry.transaction = self.op.state.transaction.value
        try:
            self.op.orch.journal.write(entry)
        except JournalError as exc:
            if required:
                raise self.op.fail(f"cannot write the journal: {exc}", exc) from exc
            self.op.warnings.append(f"cannot write the journal: {exc}")
            log.warning("%s", self.op.warnings[-1])

    async def finish_journal(self) -> None:
        """At the very end: stop the guard; remove the journal entry, or (something is left)
        hand it over to recovery (owner 0: nobody runs it any more)."""
        await self.stop_guard()
        entry = self.entry
        if entry is None:
            return
        try:
            if self.op.leaves_something():
                entry.owner_pid, entry.owner_start = 0, None
                self.journal_write(entry.step, required=False)
                log.warning("operation %s left something unsettled: journal entry %s kept for "
                            "qmpagent recover", entry.op, entry.path)
            else:
                self.op.orch.journal.remove(entry.op)
        except JournalError as exc:
            self.op.warnings.append(f"journal: {exc}")
            log.warning("journal: %s", exc)

    async def stop_guard(self) -> None:
        """Stop the freeze guard (if started; idempotent), disarmed first unless a freeze of
        ours may still be in place."""
        guard, self.guard = self.guard, None
        if guard is not None:
            if not self.op.state.must_settle:
                guard.disarm()
            await guard.close()
            agent = self.op.agent
            if agent is not None and agent.is_connected:
                agent.hold_reading(False)
                if guard.took_over is not None:
                    # The guard spoke on this connection: resync before it is used again.
                    with contextlib.suppress(AgentError):
                        await agent.sync(timeout=self.op.t.agent)

    def start_guard(self) -> None:
        """Start the freeze guard if a freeze will be attempted (outside the window)."""
        op = self.op
        if not op.orch.guard or op.state.freeze is not FreezeState.NOT_TRIED or op.agent is None:
            return
        assert self.entry is not None
        fd = op.agent.socket_fileno()
        if fd is None:
            self._guard_warning("the agent connection has no socket to hand to the freeze guard")
            return
        guard = FreezeGuard()
        try:
            guard.start(fd, self.entry.op, self.op.orch.journal.directory, thaw_timeout=self.op.t.thaw)
        except OSError as exc:
            self._guard_warning(f"the freeze guard could not be started: {exc}")
            return
        self.guard = guard

    def extend_guard(self, deadline: float) -> None:
        """We are thawing: the guard (if started) waits for us until ``deadline``."""
        if self.guard is not None:
            self.guard.extend(deadline)

    def _guard_warning(self, why: str) -> None:
        self.op.warnings.append(
            f"{why}: had this process died inside the freeze window, the guest would have stayed "
            "frozen (this process thawed it itself)"
        )
        log.warning("%s", self.op.warnings[-1])

    async def guard_ready(self) -> None:
        """Right before the freeze: wait (at most 10 s) for the guard started at prepare to be
        up; one that is not is closed, and the freeze goes on unguarded (a warning says so)."""
        guard = self.guard
        if guard is not None and not guard.ready and not await guard.wait_ready(timeout=10.0):
            self._guard_warning(guard.lost or "the freeze guard did not start")
            self.guard = None
            await guard.close()

    def arm_guard(self) -> None:
        """Right before the freeze is written: one non-blocking send."""
        guard = self.guard
        if guard is not None:
            self.guarded = guard.arm(time.monotonic() + self.op.freeze_timeout)

    def disarm_guard(self) -> None:
        """Nothing of ours is frozen any more: tell the guard, and learn whether it was
        still there."""
        guard = self.guard
        if guard is None or not guard.armed:
            return
        guard.poll()
        if guard.lost is None and not guard.alive:
            guard.lost = "the freeze guard exited"
        if guard.lost is not None:
            self.guarded = False
            self._guard_warning(f"the freeze guard died during the freeze ({guard.lost})")
        guard.disarm()

    def settled(self) -> None:
        """Nothing of ours is frozen any more (if so): disarm the guard and say so durably
        (after the thaw: outside the window)."""
        if self.op.state.must_settle:
            return
        self.disarm_guard()
        if self.entry is not None and self.entry.step == "freeze":
            self.journal_write("settled", required=False)

    @contextlib.contextmanager
    def turn(self) -> Iterator[bool]:
        """Around an agent command after the guard was armed: True if ours to send. Between
        such commands our connection does not read from the agent socket (the guard may be
        reading its duplicate): reading resumes for the command only."""
        guard, agent = self.guard, self.op.agent
        if guard is None or not guard.armed or agent is None:
            yield True
            return
        with guard.turn() as mine:
            if not mine:
                yield False
                return
            agent.hold_reading(False)
            try:
                yield True
            finally:
                if guard.armed and agent is self.op.agent:
                    agent.hold_reading(True)

    def hold_agent(self) -> None:
        """The freeze is ours (or may be) and the guard is armed: stop reading the agent
        socket until our next command (one syscall, in the window)."""
        if self.guard is not None and self.guard.armed and self.op.agent is not None:
            self.op.agent.hold_reading(True)

    def guard_has_it(self) -> bool:
        """Whether the guard took the agent over (this process was stuck past the deadline)."""
        guard = self.guard
        if guard is None:
            return False
        guard.poll()
        return guard.took_over is not None

    async def take_guard_result(self, deadline: float) -> None:
        """The guard took the agent over (this process was stuck past the deadline): wait for
        what it did and record it."""
        guard = self.guard
        assert guard is not None
        st = self.op.state
        res = await guard.wait_result(timeout=max(0.0, deadline - time.monotonic()))
        why = f"the freeze guard took over ({guard.took_over})"
        if res is None or res.result == "failed":
            detail = res.detail if res else "no report"
            self.op.settler.agent_error = AgentError(f"{why} and could not thaw: {detail}")
            return
        self.op.warnings.append(f"{why}: this process did not thaw within freeze_timeout; "
                             f"the guard {'thawed' if res.result == 'thawed' else 'found the guest thawed'}")
        log.warning("%s", self.op.warnings[-1])
        now = time.monotonic()
        if res.result == "thawed":
            if st.freeze is FreezeState.SENT_UNRESOLVED:
                st.freeze_resolved(True, "")
            st.thaw_confirmed(res.thawed, now)
        elif st.freeze is FreezeState.SENT_UNRESOLVED:
            st.freeze_resolved(False, f"{why}: the freeze had not frozen the guest")
        elif st.freeze is FreezeState.OURS:
            st.thaw_confirmed(None, now)
