"""The state of one snapshot, as enums and one transition table (the shape of h11's ``_state.py``).

A snapshot's safety rules (DESIGN.md section 2) are rules about two small state machines, and
both are here, in full, so that they can be read at once:

The **freeze** (what this operation did to the guest's filesystems)::

    NOT_TRIED ──> SKIPPED               no freeze was sent (quiesce off, agent unusable, ...)
        │
        ├──────> EXTERNAL ──> EXTERNAL_ENDED   frozen by someone else at preflight (never
        │                                      thawed by us); that freeze ended before the
        │                                      transaction
        └──────> SENT_UNRESOLVED ──> NOT_FROZEN    our request was written; it froze nothing
                      │        │                    of ours (an error, a count of 0, or a status
                      │        │                    that says thawed)
                      │        └──────> OURS ──> THAWED        we froze; we thawed
                      │                   │
                      └───────────────────┴────> THAW_FAILED   THE GUEST MAY STILL BE FROZEN

Only ``SENT_UNRESOLVED`` and ``OURS`` oblige the orchestrator to act on every exit path: resolve
the first (``guest-fsfreeze-status``), thaw the second. Nothing else is ever thawed.

The **transaction** (the QMP ``transaction`` of ``blockdev-snapshot`` actions)::

    NOT_SENT ──> SENT ──> APPLIED       the VM runs on the overlays
                  │  ──> NOT_APPLIED    the VM runs on its original images
                  │  ──> UNKNOWN        QEMU could not tell us (the overlays are left in place)
    NOT_APPLIED ──> SENT                a crash-consistent retry (``quiesce="preferred"``) after
                                        the freeze window ran out

:class:`SnapshotState` holds both, refuses a move the tables do not list (:class:`IllegalTransition`,
a bug in qmpagent, never the guest's or the caller's fault), and is the only writer of the
operation's :class:`~qmpagent.SnapshotRecord`. The record and the result are derived from it.

This module imports nothing from the rest of qmpagent at run time (``errors`` imports its enums).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .errors import SnapshotRecord

__all__ = [
    "FREEZE_TRANSITIONS",
    "LATE_FREEZE_REPLY",
    "TRANSACTION_TRANSITIONS",
    "FreezeOwner",
    "FreezeState",
    "IllegalTransition",
    "Phase",
    "SnapshotState",
    "TransactionState",
]


class _StrEnum(str, enum.Enum):
    """A str enum that prints as its value (``f"{Phase.THAW}"`` is ``"thaw"``)."""

    def __str__(self) -> str:
        return str(self.value)


class Phase(_StrEnum):
    """The phases of a snapshot, in order. A str enum: ``Phase.THAW == "thaw"``; these are the
    names ``on_phase`` receives and :attr:`SnapshotRecord.phase` holds."""

    PREFLIGHT = "preflight"
    PREPARE = "prepare"
    FREEZE = "freeze"
    TRANSACTION = "transaction"
    THAW = "thaw"
    #: A backup's copy (its jobs, after the thaw).
    COPY = "copy"
    CLEANUP = "cleanup"


class FreezeOwner(_StrEnum):
    """Who froze the guest's filesystems while the snapshot was taken."""

    #: This operation froze them (and thawed them).
    SELF = "self"
    #: They were frozen beforehand by someone else; they were left frozen.
    EXTERNAL = "external"


class FreezeState(_StrEnum):
    """What this operation did to the guest's filesystems (see the module docstring)."""

    #: Nothing decided yet.
    NOT_TRIED = "not-tried"
    #: No freeze was sent: quiesce off, the agent unusable, or the request never left.
    SKIPPED = "skipped"
    #: Frozen by someone else at preflight: quiescent, not ours, never thawed.
    EXTERNAL = "external"
    #: Frozen by someone else at preflight, but no longer frozen (or no longer known to be)
    #: right before the transaction.
    EXTERNAL_ENDED = "external-ended"
    #: Our freeze request was written; whether it froze anything is not known yet.
    SENT_UNRESOLVED = "sent-unresolved"
    #: Our freeze froze nothing of ours (an error, a count of 0, or the status says thawed).
    NOT_FROZEN = "not-frozen"
    #: We froze the guest: it must be thawed on every exit path.
    OURS = "ours"
    #: We froze the guest and thawed it.
    THAWED = "thawed"
    #: Our freeze (or a freeze that may be ours) could not be thawed or resolved in time:
    #: THE GUEST MAY STILL BE FROZEN.
    THAW_FAILED = "thaw-failed"


class TransactionState(_StrEnum):
    """What became of the QMP ``transaction`` (see the module docstring)."""

    NOT_SENT = "not-sent"
    #: Sent; no answer yet.
    SENT = "sent"
    #: Committed: the VM runs on the overlays.
    APPLIED = "applied"
    #: Refused, or found not applied: the VM runs on its original images.
    NOT_APPLIED = "not-applied"
    #: QEMU could not tell us: the VM may run on either.
    UNKNOWN = "unknown"


_F = FreezeState
_T = TransactionState

#: Every legal move of the freeze state; a state not listed as a key is final.
FREEZE_TRANSITIONS: Final[Mapping[FreezeState, frozenset[FreezeState]]] = {
    _F.NOT_TRIED: frozenset({_F.SKIPPED, _F.EXTERNAL, _F.SENT_UNRESOLVED}),
    _F.EXTERNAL: frozenset({_F.EXTERNAL_ENDED}),
    _F.SENT_UNRESOLVED: frozenset({_F.NOT_FROZEN, _F.OURS, _F.THAW_FAILED}),
    _F.OURS: frozenset({_F.THAWED, _F.THAW_FAILED}),
}

#: Every legal move of the transaction state; a state not listed as a key is final.
TRANSACTION_TRANSITIONS: Final[Mapping[TransactionState, frozenset[TransactionState]]] = {
    _T.NOT_SENT: frozenset({_T.SENT}),
    _T.SENT: frozenset({_T.APPLIED, _T.NOT_APPLIED, _T.UNKNOWN}),
    _T.NOT_APPLIED: frozenset({_T.SENT}),
}

#: A freeze reply that takes longer than this (seconds) is *late*: the guest may have been
#: frozen since the request was written, so ``freeze_window`` counts from then, not from the
#: reply. (A freeze itself takes 30-130 ms on a TCG guest; a reply within this is on time.)
LATE_FREEZE_REPLY: Final = 0.25


class IllegalTransition(AssertionError):
    """A move the transition tables do not allow: a bug in qmpagent (internal; never raised
    because of what the guest, QEMU or the caller did). An AssertionError, so that no handler
    of the library's I/O errors (``OSError``, ``RuntimeError``) can mistake it for one."""


class SnapshotState:
    """The freeze and transaction states of one snapshot, the facts that go with them (counts,
    times, the reason it is not quiesced), and the one writer of its record.

    Every change goes through a method here, which checks the move against the tables and
    then rewrites the record's derived fields (:meth:`_write_record`).
    """

    def __init__(self, record: SnapshotRecord) -> None:
        self.record = record
        self.freeze = FreezeState.NOT_TRIED
        self.transaction = TransactionState.NOT_SENT
        self.phase = Phase.PREFLIGHT
        #: Filesystems our freeze froze (from its reply; from the thaw's count when resolved).
        self.frozen = 0
        #: Filesystems our thaw thawed.
        self.thawed = 0
        #: OURS was learnt from ``guest-fsfreeze-status`` (the freeze's reply was lost).
        self.resolved = False
        #: Who had the guest frozen when the transaction was applied (None: nobody, as far as
        #: can be known): what "quiesced" means.
        self.quiesced_by: FreezeOwner | None = None
        #: ``time.monotonic()`` when our freeze request was handed to the transport, when its
        #: reply came, and when the thaw was confirmed.
        self.freeze_sent_at: float | None = None
        self.freeze_replied_at: float | None = None
        self.thawed_at: float | None = None
        #: Why the snapshot is not quiesced (when it is not).
        self.reason: str | None = None
        self._write_record()

    # --- moves -------------------------------------------------------------------------------

    def _move_freeze(self, to: FreezeState) -> None:
        if to not in FREEZE_TRANSITIONS.get(self.freeze, frozenset()):
            raise IllegalTransition(f"freeze state {self.freeze} -> {to} is not allowed")
        self.freeze = to

    def _move_transaction(self, to: TransactionState) -> None:
        if to not in TRANSACTION_TRANSITIONS.get(self.transaction, frozenset()):
            raise IllegalTransition(f"transaction state {self.transaction} -> {to} is not allowed")
        self.transaction = to

    def skip(self, reason: str) -> None:
        """No freeze will be sent (NOT_TRIED -> SKIPPED)."""
        self._move_freeze(FreezeState.SKIPPED)
        self.reason = reason
        self._write_record()

    def external(self) -> None:
        """Someone else has the guest frozen (NOT_TRIED -> EXTERNAL)."""
        self._move_freeze(FreezeState.EXTERNAL)
        self._write_record()

    def external_ended(self, reason: str) -> None:
        """That external freeze is gone, or cannot be confirmed (EXTERNAL -> EXTERNAL_ENDED)."""
        self._move_freeze(FreezeState.EXTERNAL_ENDED)
        self.reason = reason
        self._write_record()

    def freeze_sent(self, at: float) -> None:
        """Our freeze request was handed to the transport (NOT_TRIED -> SENT_UNRESOLVED)."""
        self._move_freeze(FreezeState.SENT_UNRESOLVED)
        self.freeze_sent_at = at
        self._write_record()

    def freeze_answered(self, count: int, at: float, reason_if_none: str) -> None:
        """The freeze replied with ``count`` (SENT_UNRESOLVED -> OURS, or NOT_FROZEN for 0)."""
        self.freeze_replied_at = at
        if count > 0:
            self._move_freeze(FreezeState.OURS)
            self.frozen = count
        else:
            self._move_freeze(FreezeState.NOT_FROZEN)
            self.reason = reason_if_none
        self._write_record()

    def freeze_refused(self, reason: str) -> None:
        """The freeze was answered with an error (SENT_UNRESOLVED -> NOT_FROZEN)."""
        self._move_freeze(FreezeState.NOT_FROZEN)
        self.reason = reason
        self._write_record()

    def freeze_resolved(self, frozen: bool, reason_if_not: str) -> None:
        """The status told what a freeze without reply did (SENT_UNRESOLVED -> OURS or
        NOT_FROZEN)."""
        if frozen:
            self._move_freeze(FreezeState.OURS)
            self.resolved = True
        else:
            self._move_freeze(FreezeState.NOT_FROZEN)
            self.reason = reason_if_not
        self._write_record()

    def thaw_confirmed(self, count: int | None, at: float) -> None:
        """Our freeze is thawed (OURS -> THAWED); ``count`` None when the thaw's reply was lost
        and the status said thawed (it thawed what we froze, as far as is known)."""
        self._move_freeze(FreezeState.THAWED)
        self.thawed_at = at
        if count is None:
            self.thawed = self.frozen
        else:
            self.thawed = count
            if self.resolved:
                self.frozen = count  # the freeze's own count was lost with its reply
        self._write_record()

    def thaw_failed(self) -> None:
        """Our freeze (or one that may be ours) could not be thawed or resolved in time (OURS
        or SENT_UNRESOLVED -> THAW_FAILED)."""
        self._move_freeze(FreezeState.THAW_FAILED)
        self._write_record()

    def not_quiesced(self, reason: str) -> None:
        """Say why the snapshot is not quiesced (no state change: e.g. the window ran out)."""
        self.reason = reason

    def transaction_sent(self) -> None:
        """The transaction was sent (NOT_SENT or NOT_APPLIED -> SENT)."""
        self._move_transaction(TransactionState.SENT)
        self._write_record()

    def transaction_outcome(self, outcome: TransactionState) -> None:
        """What became of the transaction (SENT -> APPLIED, NOT_APPLIED or UNKNOWN). Applied
        while the guest was frozen (ours or someone else's) is what makes it quiesced."""
        self._move_transaction(outcome)
        if outcome is TransactionState.APPLIED:
            if self.freeze is FreezeState.OURS:
                self.quiesced_by = FreezeOwner.SELF
            elif self.freeze is FreezeState.EXTERNAL:
                self.quiesced_by = FreezeOwner.EXTERNAL
        self._write_record()

    def enter_phase(self, phase: Phase) -> None:
        """Name the phase that runs now (and fails, if anything fails)."""
        self.phase = phase
        self._write_record()

    # --- what the cleanup needs to know (the record's lists) ---------------------------------

    def file_created(self, path: str) -> None:
        """An overlay file of ours exists."""
        if path not in self.record.files_created:
            self.record.files_created.append(path)

    def file_removed(self, path: str) -> None:
        """An overlay file of ours was removed again."""
        self.file_created(path)
        self.record.files_removed.append(path)

    def overlay_added(self, node: str) -> None:
        """An overlay node of ours is attached."""
        if node not in self.record.overlays_added:
            self.record.overlays_added.append(node)

    def overlay_removed(self, node: str) -> None:
        """An overlay node of ours was detached again."""
        self.overlay_added(node)
        self.record.overlays_removed.append(node)

    # --- derived -----------------------------------------------------------------------------

    @property
    def must_settle(self) -> bool:
        """Whether a freeze of ours (or one that may be ours) still has to be resolved or
        thawed."""
        return self.freeze in (FreezeState.SENT_UNRESOLVED, FreezeState.OURS)

    @property
    def owner(self) -> FreezeOwner | None:
        """Who froze the guest during this operation (the record's ``freeze_owner``)."""
        if self.frozen > 0 or self.resolved:
            return FreezeOwner.SELF
        if self.freeze in (FreezeState.EXTERNAL, FreezeState.EXTERNAL_ENDED):
            return FreezeOwner.EXTERNAL
        return None

    @property
    def snapshot_taken(self) -> bool | None:
        """The record's ``snapshot_taken``: True, False, or None (unknown, or in flight)."""
        if self.transaction is TransactionState.APPLIED:
            return True
        if self.transaction in (TransactionState.NOT_SENT, TransactionState.NOT_APPLIED):
            return False
        return None

    @property
    def window_start(self) -> float | None:
        """Since when the guest may be frozen by us, as far as the freeze window counts: the
        freeze's reply, or the request's write when the reply was late or lost."""
        sent, replied = self.freeze_sent_at, self.freeze_replied_at
        if sent is None:
            return None
        if replied is None or replied - sent > LATE_FREEZE_REPLY:
            return sent
        return replied

    @property
    def freeze_window(self) -> float | None:
        """Seconds from :attr:`window_start` to the confirmed thaw, or None."""
        start = self.window_start
        if start is None or self.thawed_at is None:
            return None
        return self.thawed_at - start

    @property
    def quiesced(self) -> bool:
        """The transaction was applied while the guest was frozen."""
        return self.quiesced_by is not None

    def _write_record(self) -> None:
        rec = self.record
        rec.phase = self.phase
        rec.freeze_owner = self.owner
        rec.frozen = self.frozen
        rec.thawed = self.thawed
        rec.snapshot_taken = self.snapshot_taken
        rec.freeze_state = self.freeze
        rec.transaction_state = self.transaction
