"""One run of a snapshot operation (:class:`Operation`): preflight, prepare, freeze, one
transaction, thaw, and the clean-up of a failure, in the order :mod:`qmpagent.snapshot` describes.

:class:`Operation` is the base of every operation that freezes the guest around one transaction:
a snapshot runs it as it is; a backup (:mod:`qmpagent.backup`) and an export
(:mod:`qmpagent.fleece`) subclass it and override its *hooks*, the public methods documented
"Hook:" (what the new images are, what the transaction does, what runs after the window, what
the result is, how a failure is undone). Everything else in it is internal.

It drives its phases and holds collaborators for what is not the order of the run: its agent
connection (:class:`~qmpagent.agent_link.AgentLink`), the agent's checks
(:class:`~qmpagent.preflight.AgentPreflight`), the resolution and thaw of its freeze
(:class:`~qmpagent.thaw.FreezeSettler`), and its crash safety, the journal and the freeze guard
(:class:`~qmpagent.crash_safety.CrashSafety`). Whether a freeze that cannot be had fails the
operation (the quiesce policy) stays here.

An operation reads its orchestrator through :class:`OrchestratorView`, at the moment it needs
each thing, as it always has. :class:`OrchestratorView`, :class:`Timeouts`, :class:`Overlay` and
:class:`Step` live in :mod:`qmpagent.operation_types`, :func:`all_or_none` in
:mod:`qmpagent._shield` and ``FREEZE_COMMANDS`` in :mod:`qmpagent.preflight`, below the
collaborators that use them; they are re-exported here, where they always were.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import anyio

from ._shield import all_or_none, run_to_completion
from .agent import GuestAgent
from .agent_link import AgentLink
from .arguments import check_absent
from .crash_safety import CrashSafety
from .errors import (
    AgentCommandError,
    AgentError,
    MonitorCommandError,
    MonitorError,
    MonitorProtocolError,
    MonitorTimeout,
    MonitorUnavailable,
    QMPAgentError,
    SnapshotError,
    SnapshotRecord,
    ThawError,
    UsageError,
)
from .journal import Entry
from .monitor import BlockNode
from .operation_types import OrchestratorView, Overlay, Step, Timeouts
from .preflight import FREEZE_COMMANDS, AgentPreflight, Unquiescable, checked_node, resolve_node
from .snapshot_state import FreezeState, Phase, SnapshotState, TransactionState
from .snapshot_types import PhaseCallback, PhaseTimings, Quiesce, SnapshotResult
from .thaw import FreezeSettler, keeping_thaw_error

__all__ = [
    "FREEZE_COMMANDS",
    "Operation",
    "OrchestratorView",
    "Overlay",
    "Step",
    "Timeouts",
    "all_or_none",
]

log = logging.getLogger("qmpagent.snapshot")  # the logger these messages always had


class Operation:
    """One snapshot run: its state (a :class:`SnapshotState`, the one writer of its record),
    and the phases in order.

    The hook interface (for subclasses in this package: :class:`~qmpagent.backup.BackupOperation`
    and the export's operation in :mod:`qmpagent.fleece`) is the public methods whose docstrings
    begin with "Hook", plus the helpers they may call (:meth:`phase`, :meth:`block_nodes`,
    :meth:`remove_overlay`, :meth:`release_agent`) and the public attributes set in
    ``__init__``. Methods with a leading underscore are internal: a subclass neither calls nor
    overrides them.
    """

    def __init__(
        self,
        orch: OrchestratorView,
        mode: Quiesce,
        freeze_timeout: float,
        on_phase: PhaseCallback | None,
        timeouts: Timeouts,
    ) -> None:
        self.orch = orch
        self.on_phase = on_phase
        self.mon = orch.monitor
        self.mode = mode
        self.freeze_timeout = freeze_timeout
        self.t = timeouts
        self.state = SnapshotState(SnapshotRecord())
        self.record = self.state.record
        # The agent connection (the orchestrator's, or ours to close), chosen at preflight.
        self.agent_link = AgentLink(orch, self.mon, timeouts.agent)
        self.overlays: list[Overlay] = []
        self.times: dict[str, float] = {}
        self.token = secrets.token_hex(4)
        self.vm_running = False
        self.warnings: list[str] = []
        self.filesystems: int | None = None  # what guest-get-fsinfo lists, if it answers
        self.mountpoints: tuple[str, ...] | None = None  # freeze only these (None: all)
        # A BaseException raised by on_phase, held until it is safe to raise (see _checkpoint).
        self.interrupt: BaseException | None = None
        # Crash safety (issue 13): the VM's identity, this operation's journal entry, and the
        # freeze guard.
        self.safety = CrashSafety(self)
        # The agent's checks, at preflight and again before the freeze and the transaction.
        self.agent_preflight = AgentPreflight(orch, self.mon, self.agent_link, self.state,
                                              timeouts.agent)
        # The thaw phase: a freeze of unknown outcome resolved, ours thawed.
        self.settler = FreezeSettler(self.state, self.safety, self.agent_link, timeouts,
                                     self.warnings)

    @property
    def agent(self) -> GuestAgent | None:
        """The agent connection in use (``agent_link``'s; None until preflight chose one)."""
        return self.agent_link.agent

    # --- driver ---------------------------------------------------------------------------

    async def run(self, disks: dict[str, str]) -> SnapshotResult:
        """Run the operation on ``disks`` (disk -> the new image's checked path): the phases in
        order, then :meth:`result`; a failure is undone (:meth:`undo`) and raised."""
        started = time.monotonic()
        try:
            try:
                with self.phase(Phase.PREFLIGHT):
                    await self.preflight_vm(disks)
                    await self.safety.check_journal()
                    if self.mode is Quiesce.OFF:
                        self.state.skip("quiesce is off")
                    else:
                        try:
                            self.filesystems = await self.agent_preflight.check(
                                self.vm_running, self.mountpoints)
                        except Unquiescable as exc:
                            self._no_freeze(exc)
                # Durably, before anything is created: what this operation is about to make.
                self.safety.journal_prepare()
                # The guard's start-up (~0.1 s) overlaps the prepare phase.
                self.safety.start_guard()
                with self.phase(Phase.PREPARE):
                    await self.prepare()
                await self._freeze_snapshot_thaw()
                await self.after_window()
            except BaseException as exc:
                await keeping_thaw_error(exc, self._cleanup(exc))
                raise
            finally:
                await keeping_thaw_error(sys.exc_info()[1], self.safety.finish_journal())
                await keeping_thaw_error(sys.exc_info()[1], self.agent_link.close())
        except BaseException as exc:
            held = self.interrupt
            if held is not None and held is not exc:
                if not isinstance(exc, ThawError):
                    # What on_phase raised, now that nothing of ours is frozen; ``exc`` is
                    # its __context__.
                    raise held  # noqa: B904
                log.warning("on_phase raised %r; a ThawError takes precedence", held)
            raise
        self._checkpoint()
        self.times["total"] = time.monotonic() - started
        return self.result()

    async def after_window(self) -> None:
        """Hook (:mod:`qmpagent.backup` overrides it: the copy): what runs after the window
        closed (thawed); a failure is cleaned up like any other. Default: nothing."""

    def result(self) -> SnapshotResult:
        """Hook (:mod:`qmpagent.backup` and :mod:`qmpagent.fleece` override it): what
        :meth:`run` returns after a success. Default: the :class:`SnapshotResult` of the state."""
        st = self.state
        return SnapshotResult(
            quiesced=st.quiesced,
            freeze_owner=st.quiesced_by.value if st.quiesced_by is not None else None,
            frozen=st.frozen,
            thawed=st.thawed,
            freeze_window=st.freeze_window,
            overlays={o.node: o.node_name for o in self.overlays},
            reason=None if st.quiesced else st.reason,
            files={o.node: o.path for o in self.overlays},
            timings=PhaseTimings(**self.times),
            freeze_resolved=st.resolved,
            warnings=tuple(self.warnings),
            freeze_state=st.freeze,
            transaction_state=st.transaction,
            guarded=self.safety.guarded,
        )

    @contextlib.contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        """Time a phase and name it in the record (for subclasses too: a backup's ``copy``
        phase). A phase run while another one's failure is
        propagating (the thaw in a ``finally``) leaves the failed phase named, unless it fails
        itself. Its start and (unless it fails) its end are checkpoints (see _checkpoint),
        except the start of the thaw: nothing may keep the thaw from running."""
        failing = sys.exc_info()[1] is not None
        previous = self.state.phase
        self.state.enter_phase(phase)
        self._notify(phase, None)
        t = time.monotonic()
        try:
            if phase is not Phase.THAW:
                self._checkpoint()
            yield
        except BaseException:
            raise
        else:
            if failing:
                self.state.enter_phase(previous)
        finally:
            elapsed = time.monotonic() - t
            self.times[phase.value] = self.times.get(phase.value, 0.0) + elapsed
            self._notify(phase, elapsed)
        if not failing:
            self._checkpoint()

    def _notify(self, phase: Phase, seconds: float | None) -> None:
        if self.on_phase is None:
            return
        try:
            self.on_phase(phase, seconds)
        except Exception:
            log.exception("on_phase callback failed (ignored)")
        except BaseException as exc:  # KeyboardInterrupt, SystemExit, CancelledError
            log.warning("on_phase raised %r: the snapshot stops once that is safe", exc)
            if self.interrupt is None:
                self.interrupt = exc

    def _checkpoint(self) -> None:
        """Raise what on_phase raised, if anything: called at phase boundaries, never between
        a freeze and the thaw's end (the thaw runs in a ``finally`` if this raises earlier)."""
        if self.interrupt is not None:
            raise self.interrupt

    def fail(self, message: str, cause: BaseException | None = None) -> SnapshotError:
        """Hook (:mod:`qmpagent.backup` overrides it: a BackupError in a backup's words): the
        error (not raised) that says the operation failed, with its record and ``cause``.
        Default: a :class:`~qmpagent.SnapshotError`."""
        err = SnapshotError(message, self.record)
        err.__cause__ = cause
        return err

    def _policy(self, cause: BaseException | None = None) -> None:
        """No quiesce is possible (``state.reason`` says why): fail if it is required."""
        log.info("snapshot cannot be quiesced: %s", self.state.reason)
        if self.mode is Quiesce.REQUIRED:
            raise self.fail(f"quiesce required but not possible: {self.state.reason}", cause)

    def _no_freeze(self, exc: Unquiescable) -> None:
        """An agent check found that no freeze can be attempted: say why (``exc``) and apply
        the policy."""
        self.state.skip(str(exc))
        self._policy(exc.__cause__)

    # --- crash safety (issue 13): the journal and the guard are self.safety's ---------------

    def describe_entry(self, entry: Entry) -> None:
        """Hook (:mod:`qmpagent.backup` overrides it): what else the journal entry must say,
        called once, before its first write (after preflight). Default: nothing."""

    def leaves_something(self) -> bool:
        """Hook (:mod:`qmpagent.backup` overrides it): whether this operation (now ending,
        asked once after its clean-up) may leave something for recovery, so that its journal
        entry is kept. Default: a freeze that may be in place, a transaction of unknown
        outcome, or (no snapshot taken) nodes or files it could not remove."""
        st, rec = self.state, self.record
        if st.must_settle or st.freeze is FreezeState.THAW_FAILED:
            return True
        if st.transaction in (TransactionState.SENT, TransactionState.UNKNOWN):
            return True
        if st.snapshot_taken is False:
            if set(rec.overlays_added) - set(rec.overlays_removed):
                return True
            if set(rec.files_created) - set(rec.files_removed):
                return True
            if any(o.step > Step.NONE and o.path not in rec.files_removed and os.path.lexists(o.path)
                   for o in self.overlays):
                return True
        return False

    # --- preflight ------------------------------------------------------------------------


    async def block_nodes(self) -> dict[str, BlockNode]:
        """The VM's block nodes by node name (``query-named-block-nodes``). Raises MonitorError."""
        return {n.node_name: n for n in await self.mon.named_block_nodes()}

    async def preflight_vm(self, disks: dict[str, str]) -> None:
        """Hook (:mod:`qmpagent.backup` extends it: the targets and their chains): the VM's
        preflight, first in the preflight phase, before anything is changed. Default: the VM's
        status, and one :class:`Overlay` per disk (in the order given) in ``overlays``, each
        disk's node resolved and checked and its new file checked absent again."""
        timeout = self.t.command
        try:
            status = await self.mon.execute("query-status", timeout=timeout)
            nodes = await self.block_nodes()
        except MonitorError as exc:
            raise self.fail(f"preflight: cannot query QEMU: {exc}", exc) from exc
        self.vm_running = isinstance(status, dict) and status.get("status") == "running"
        for i, (key, path) in enumerate(disks.items()):
            node = await resolve_node(self.mon, key, nodes, self.fail)
            base = nodes.get(node)
            if base is None:
                raise UsageError(f"no block node named {node!r}")
            try:
                base = checked_node(base)
            except MonitorProtocolError as exc:
                raise self.fail(f"preflight: {exc}", exc) from exc
            if any(o.node == node for o in self.overlays):
                raise UsageError(f"disk {key!r} given twice")
            check_absent(path)  # again: just before it is made
            if base.virtual_size is None:
                raise UsageError(f"block node {node!r} reports no virtual size")
            self.overlays.append(
                Overlay(
                    node=node,
                    path=path,
                    base=base,
                    node_name=f"qa{self.token}o{i}",
                    file_node_name=f"qa{self.token}f{i}",
                )
            )

    # --- prepare --------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Hook (:mod:`qmpagent.backup` extends it: its chain records marked pending first):
        the prepare phase, after the journal entry is written and before the freeze. Default:
        every new image created and attached, as one task group (:func:`all_or_none`)."""
        try:
            await all_or_none([self._prepare_one(o) for o in self.overlays])
        except QMPAgentError as exc:
            raise self.fail(f"preparing the overlays failed: {exc}", exc) from exc

    async def _prepare_one(self, ov: Overlay) -> None:
        mon, jt, ct = self.mon, self.t.job, self.t.command
        ov.step = Step.FILE  # preflight saw no file there: whatever is there now is ours
        await mon.run_job(
            "blockdev-create",
            {
                "job-id": f"{ov.node_name}-cf",
                "options": {"driver": "file", "filename": ov.path, "size": 0},
            },
            timeout=jt,
        )
        self.state.file_created(ov.path)
        ov.step = Step.FILE_NODE
        await mon.execute("blockdev-add", self.file_options(ov), timeout=ct)
        await mon.run_job(
            "blockdev-create",
            {"job-id": f"{ov.node_name}-cq", "options": self.image_options(ov)},
            timeout=jt,
        )
        ov.step = Step.NODE
        await mon.execute(
            "blockdev-add",
            {"driver": "qcow2", "node-name": ov.node_name, "file": ov.file_node_name,
             "backing": self.backing_node(ov)},
            timeout=ct,
        )
        self.state.overlay_added(ov.node_name)

    def file_options(self, ov: Overlay) -> dict[str, Any]:
        """Hook (:mod:`qmpagent.backup` overrides it): the ``blockdev-add`` options of the
        new image's file node, at prepare. Default: a ``file`` node of ``ov.path``."""
        return {"driver": "file", "filename": ov.path, "node-name": ov.file_node_name}

    def backing_node(self, ov: Overlay) -> str | None:
        """Hook (:mod:`qmpagent.fleece` overrides it): the backing node the new image is
        attached with, at prepare. Default: None (``backing: null``) for an overlay, which gets
        its backing node from ``blockdev-snapshot``."""
        return None

    def image_options(self, ov: Overlay) -> dict[str, Any]:
        """Hook (:mod:`qmpagent.backup` and :mod:`qmpagent.fleece` override it): the
        ``blockdev-create`` options of the new image, at prepare. Default: a qcow2 overlay
        whose backing file is the current image."""
        options: dict[str, Any] = {
            "driver": "qcow2",
            "file": ov.file_node_name,
            "size": ov.base.virtual_size,
            "backing-file": ov.base.filename,
        }
        if ov.base.driver in ("qcow2", "raw", "qed", "vmdk", "vpc", "vdi", "luks"):
            options["backing-fmt"] = ov.base.driver
        return options

    # --- the window -----------------------------------------------------------------------

    async def _freeze_snapshot_thaw(self) -> None:
        st = self.state
        try:
            if st.freeze is FreezeState.NOT_TRIED:
                # Port state again, right before the freeze: prepare may have taken a while.
                try:
                    await self.agent_preflight.check_port_still_open()
                except Unquiescable as exc:
                    self._no_freeze(exc)
            if st.freeze is FreezeState.NOT_TRIED:
                # Durably, before the freeze is written (outside the window), and the guard up.
                self.safety.journal_write("freeze")
                await self.safety.guard_ready()
                with self.phase(Phase.FREEZE):
                    try:
                        await self._freeze()
                    finally:
                        if not st.must_settle:
                            self.safety.disarm_guard()
                        else:
                            self.safety.hold_agent()
            with self.phase(Phase.TRANSACTION):
                await self._snapshot()
        finally:
            # Whatever happened above (an error, the deadline, the caller cancelled, once or
            # more, on_phase raised): a freeze that was sent and not yet known to be ours or
            # not is resolved now, and ours is thawed, to completion.
            if st.must_settle:
                with self.phase(Phase.THAW):
                    await run_to_completion(self.settler.settle())
                    self.safety.settled()
            self.safety.settled()

    def _freeze_written(self) -> None:
        """``on_sent`` of our freeze: this call's request was handed to the transport."""
        self.state.freeze_sent(time.monotonic())

    def _window_end(self) -> float:
        """When the freeze window closes: ``freeze_timeout`` after the freeze request left."""
        sent = self.state.freeze_sent_at
        assert sent is not None
        return sent + self.freeze_timeout

    async def _freeze(self) -> None:
        """Freeze: SENT_UNRESOLVED as soon as the request is written, then OURS or NOT_FROZEN
        from its reply or, if the reply is lost, from the status (within the window)."""
        assert self.agent is not None
        st = self.state
        # The freeze's own wait is part of the window.
        wait = min(self.t.agent, self.freeze_timeout)
        self.safety.arm_guard()
        try:
            n = await self.agent.fsfreeze_freeze(
                self.mountpoints, timeout=wait, on_sent=self._freeze_written
            )
        except AgentCommandError as exc:
            # The agent answered: it thaws by itself when a freeze fails part-way, and a
            # CommandNotFound here means someone froze it since preflight. Not ours either way.
            if st.freeze is FreezeState.SENT_UNRESOLVED:
                st.freeze_refused(f"the freeze failed: {exc}")
            else:  # pragma: no cover - an answer implies the request left
                st.skip(f"the freeze failed: {exc}")
            self._policy(exc)
            return
        except BaseException as exc:
            if st.freeze is FreezeState.NOT_TRIED:
                # Timed out or cancelled before *this* request left (waiting for the channel,
                # or for another caller of a shared agent): nothing of ours can be frozen, and
                # a frozen status would be somebody else's.
                st.skip(f"the freeze could not be sent: {exc}")
                if isinstance(exc, AgentError):
                    self._policy(exc)
                    return
                raise
            # Invariant 5: a timeout, a lost connection, garbage instead of the reply, or the
            # caller cancelled while the freeze was in flight: it may or may not have frozen
            # the guest. A cancellation goes on (the finally resolves it); an agent error is
            # resolved now, within what is left of the window.
            self.settler.agent_error = exc
            if not isinstance(exc, AgentError):
                raise
            log.warning("the freeze got no reply (%s): reading the status", exc)
            await self.settler.resolve(self._window_end())
            if st.freeze is FreezeState.NOT_FROZEN:
                self._policy(exc)
            return
        st.freeze_answered(
            n, time.monotonic(), "the freeze froze no filesystems (none, or frozen by another tool)"
        )
        if n == 0:
            # Invariant 1: a freeze that froze nothing is not ours (another tool may hold a
            # freeze the agent would otherwise thaw on our behalf).
            self._policy()
            return
        if self.filesystems is not None and n < self.filesystems:
            # qemu-ga skips a filesystem that is already frozen (EBUSY) without a word, and its
            # thaw thaws every frozen filesystem: nothing can keep ours from thawing it too.
            which = "chosen" if self.mountpoints is not None else "guest's"
            self.warnings.append(
                f"the freeze froze {n} of the {which} {self.filesystems} filesystems: the others "
                "may be frozen by another tool in the guest, and qemu-ga's thaw thaws them too"
            )
            log.warning("%s", self.warnings[-1])

    async def _snapshot(self) -> None:
        """The transaction phase: under our freeze (bounded by the window), under someone
        else's (re-checked first), or crash-consistent."""
        st = self.state
        if st.freeze is FreezeState.EXTERNAL:
            try:
                await self.agent_preflight.check_still_frozen()
            except Unquiescable as exc:
                st.external_ended(str(exc))
                self._policy(exc.__cause__)
        if st.freeze is FreezeState.SENT_UNRESOLVED:
            await self._window_exceeded(
                None,
                f"{self._window_reason()}: the freeze got no reply, and what it did could not "
                "be learnt in time",
            )
        elif st.freeze is FreezeState.OURS:
            await self._transaction(self._window_end())
        else:
            await self._transaction(None)

    def _window_reason(self) -> str:
        return f"the freeze window exceeded freeze_timeout ({self.freeze_timeout:g}s)"

    def actions(self) -> list[dict[str, Any]]:
        """Hook (:mod:`qmpagent.backup` and :mod:`qmpagent.fleece` override it): the actions
        of the one transaction inside the window (built right before it is sent). Default: one
        ``blockdev-snapshot`` per overlay."""
        return [
            {"type": "blockdev-snapshot", "data": {"node": o.node, "overlay": o.node_name}}
            for o in self.overlays
        ]

    async def _transaction(self, deadline: float | None) -> None:
        """Send the transaction; ``deadline``: when the freeze window closes (None: not
        frozen by us, ``command_timeout``)."""
        st = self.state
        actions = self.actions()
        if deadline is None:
            timeout = self.t.command
        else:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                # Frozen longer than allowed already (a lost freeze reply waited for): no
                # transaction inside this window.
                await self._window_exceeded(None, self._window_reason())
                return
        st.transaction_sent()
        try:
            await self.mon.execute("transaction", {"actions": actions}, timeout=timeout)
        except MonitorTimeout as exc:
            if deadline is not None:
                await self._window_exceeded(exc, self._window_reason())
                return
            # Nothing of ours is frozen: take the time to find out what QEMU did.
            if await self._learn_transaction():
                return
            raise self.fail(f"the transaction got no answer and was not applied: {exc}", exc) from exc
        except MonitorUnavailable as exc:
            st.transaction_outcome(TransactionState.UNKNOWN)
            raise self.fail(
                "the connection to QEMU was lost after the transaction was sent: the outcome is "
                "unknown (the VM may run on the overlays or on its original images)",
                exc,
            ) from exc
        except MonitorCommandError as exc:
            st.transaction_outcome(TransactionState.NOT_APPLIED)
            raise self.fail(f"the transaction failed: {exc}", exc) from exc
        except MonitorError as exc:
            # An answer of the wrong shape: still SENT; the cleanup asks QEMU what it did,
            # once our freeze is thawed.
            raise self.fail(f"the transaction failed: {exc}", exc) from exc
        if deadline is not None and self.safety.guard_has_it():
            # This process was stuck past the deadline while the transaction ran, and the
            # guard thawed: the transaction may have been applied after the thaw.
            await self.safety.take_guard_result(time.monotonic() + self.t.thaw)
            reason = (f"{self._window_reason()}: this process was stuck and the freeze guard "
                      "thawed the guest while the transaction ran")
            st.not_quiesced(reason)
            st.transaction_outcome(TransactionState.APPLIED)
            if self.mode is Quiesce.REQUIRED and not st.quiesced:
                raise self.fail(f"{reason}; the snapshot was taken but is not guaranteed quiesced: "
                                 "the VM now runs on the overlays")
            return
        st.transaction_outcome(TransactionState.APPLIED)

    async def _window_exceeded(self, exc: MonitorTimeout | None, reason: str) -> None:
        """The transaction did not complete within the window (``exc``), or there was no
        time left to send it (None): thaw now, then find out whether a sent transaction was
        applied (QMP runs commands in order, so a query answers after it)."""
        st = self.state
        st.not_quiesced(reason)
        if st.must_settle:
            with self.phase(Phase.THAW):
                await run_to_completion(self.settler.settle())
        applied = st.transaction is TransactionState.SENT and await self._learn_transaction()
        if applied:
            # The snapshot exists but may have been taken after the thaw: not quiesced.
            if self.mode is Quiesce.REQUIRED:
                raise self.fail(
                    f"{reason}; the snapshot was taken after all but is not guaranteed "
                    "quiesced: the VM now runs on the overlays",
                    exc,
                )
            return
        if self.mode is Quiesce.REQUIRED:
            raise self.fail(f"{reason}; no snapshot was taken", exc)
        # preferred: a crash-consistent snapshot, unfrozen.
        await self._transaction(None)

    async def applied(self, nodes: Mapping[str, BlockNode]) -> bool:
        """Hook (:mod:`qmpagent.backup` overrides it): whether the transaction was applied,
        asked after it when its reply was not seen (QMP runs commands in order). Raises
        MonitorError. Default: the first overlay has a backing file (``nodes``: the VM's
        block nodes, read just before)."""
        # The transaction is atomic: the first overlay tells for all. It was added with
        # backing: null, so it reports a backing file only once blockdev-snapshot attached
        # it. (Not backing_file_depth: with flat=true QEMU reports 0 for every node.)
        ov = nodes.get(self.overlays[0].node_name)
        return ov is not None and checked_node(ov).backing_file is not None

    async def _learn_transaction(self) -> bool:
        """Whether a transaction whose reply was not seen was applied: SENT -> APPLIED or
        NOT_APPLIED. QMP runs commands in order, so the query is answered after it. Raises
        SnapshotError (UNKNOWN: ``record.snapshot_taken`` None) if QEMU cannot tell us."""
        st = self.state
        try:
            with anyio.fail_after(self.t.command):
                nodes = await self.block_nodes()
                applied = await self.applied(nodes)
        except (TimeoutError, MonitorError) as exc:
            st.transaction_outcome(TransactionState.UNKNOWN)
            raise self.fail(
                "the transaction got no answer and its outcome cannot be read: the VM may run "
                "on the overlays or on its original images",
                exc,
            ) from exc
        st.transaction_outcome(TransactionState.APPLIED if applied else TransactionState.NOT_APPLIED)
        return applied

    async def release_agent(self) -> None:
        """For :meth:`after_window` hooks: the agent is not needed any more, so the freeze guard
        (it holds a duplicate of the agent connection) and a connection of ours are closed now,
        not at the end of the run (the agent serves one client at a time)."""
        await self.safety.stop_guard()
        await self.agent_link.close()
        self.agent_link.own = False

    # --- cleanup --------------------------------------------------------------------------

    async def _cleanup(self, exc: BaseException) -> None:
        """After a failure: detach the overlays and remove their files, unless the snapshot
        was taken (then they are the VM's active layers)."""
        t = time.monotonic()
        try:
            await run_to_completion(self.undo())
        finally:
            self.times[Phase.CLEANUP.value] = time.monotonic() - t
        log.info("snapshot failed (%s); record: %s", exc, self.record)

    async def undo(self) -> None:
        """Hook (:mod:`qmpagent.backup` and :mod:`qmpagent.fleece` override it): after a
        failure, at the cleanup phase, shielded: undo what the operation did. Default: detach
        the overlays and remove their files unless the snapshot was (or may have been) taken,
        a transaction in flight asked about first."""
        st = self.state
        with anyio.CancelScope(shield=True):
            if st.transaction is TransactionState.SENT:
                # E.g. cancelled while the transaction was in flight: QEMU may have applied it.
                with contextlib.suppress(SnapshotError):
                    await self._learn_transaction()
            if st.snapshot_taken is not False:
                return  # the overlays are the VM's active layers now, or may be
            with anyio.move_on_after(self.t.command * 2):
                try:
                    existing: set[str] | None = set(await self.block_nodes())
                except MonitorError as exc:
                    log.warning("cleanup: cannot list the block nodes (%s)", exc)
                    existing = None
                for ov in reversed(self.overlays):
                    await self.remove_overlay(ov, existing)

    async def remove_overlay(self, ov: Overlay, existing: set[str] | None) -> None:
        """Detach the overlay's nodes that exist, then remove its file, but only once no node
        of ours can hold it open (``existing``: the node names QEMU has, None if unknown). For
        :meth:`undo` hooks too. Never raises a MonitorError or OSError (logged)."""
        st = self.state
        t = self.t.command
        for step, name in ((Step.NODE, ov.node_name), (Step.FILE_NODE, ov.file_node_name)):
            if ov.step < step or (existing is not None and name not in existing):
                continue  # never sent, or sent and not applied
            if name == ov.node_name:
                st.overlay_added(name)  # its reply may have been lost, but it is there
            try:
                await self.mon.execute("blockdev-del", {"node-name": name}, timeout=t)
            except MonitorError as exc:
                log.warning("cleanup: blockdev-del %s failed: %s", name, exc)
                return  # the file may still be open in QEMU: leave it
            if name == ov.node_name:
                st.overlay_removed(name)
        if ov.step >= Step.FILE:
            try:
                os.unlink(ov.path)
            except FileNotFoundError:
                return  # the job never made it
            except (OSError, ValueError) as exc:
                log.warning("cleanup: cannot remove %s: %s", ov.path, exc)
                return
            st.file_removed(ov.path)
