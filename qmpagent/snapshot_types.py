"""The value types a snapshot takes and returns: :class:`Quiesce`, ``PhaseCallback``,
:class:`PhaseTimings`, :class:`SnapshotResult` (re-exported by :mod:`qmpagent.snapshot`).

Here, below both the orchestrator and the operation that runs it, so that each can import them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from .snapshot_state import FreezeState, TransactionState

__all__ = ["PhaseCallback", "PhaseTimings", "Quiesce", "SnapshotResult"]

#: ``on_phase(name, seconds)``: ``seconds`` is None when the phase starts, its duration at the
#: end; ``name`` is a :class:`Phase` (a str enum: ``"preflight"``, ``"prepare"``, ...).
PhaseCallback = Callable[[str, float | None], None]


class Quiesce(str, enum.Enum):
    """How hard to try for an application-consistent snapshot."""

    #: Freeze the guest's filesystems or take no snapshot at all (raise).
    REQUIRED = "required"
    #: Freeze if possible; otherwise take a crash-consistent snapshot and say why.
    PREFERRED = "preferred"
    #: Never talk to the agent: a crash-consistent snapshot.
    OFF = "off"


@dataclass(frozen=True, slots=True)
class PhaseTimings:
    """Seconds spent in each phase of a snapshot (0.0 for phases that did not run)."""

    preflight: float = 0.0
    prepare: float = 0.0
    freeze: float = 0.0
    transaction: float = 0.0
    thaw: float = 0.0
    copy: float = 0.0  # a backup's copy, after the thaw (0.0 for snapshots)
    cleanup: float = 0.0
    total: float = 0.0


@dataclass(frozen=True)
class SnapshotResult:
    """What :meth:`SnapshotOrchestrator.snapshot` did.

    Attributes:
        quiesced: the filesystems were frozen (by us, or by someone else and re-checked right
            before it) while the transaction ran.
        freeze_owner: ``"self"``, ``"external"`` (a :class:`FreezeOwner` value) or None: who
            had the guest frozen while the transaction ran.
        frozen: filesystems this operation froze (0 if it froze none).
        thawed: filesystems this operation thawed (0 unless it froze some).
        freeze_window: seconds from the freeze reply to the thaw reply, or None. Counted from
            when the freeze request was written if its reply was lost or late (took longer
            than ``snapshot_state.LATE_FREEZE_REPLY``), so that it never under-reports.
        overlays: block node name -> node name of its new overlay (now the active layer).
        reason: why the snapshot is not quiesced, when it is not.
        files: block node name -> the new overlay's file.
        timings: per-phase durations.
        freeze_resolved: a freeze whose reply was lost was found (by its status) to be ours.
        warnings: things the caller should know although the snapshot succeeded, e.g. that
            the freeze froze fewer filesystems than the guest has (another tool may have frozen
            one, and qemu-ga's thaw thaws every frozen filesystem, that one included).
        freeze_state: where the freeze ended (a :class:`FreezeState`: ``THAWED``,
            ``EXTERNAL``, ``SKIPPED``, ``NOT_FROZEN``, ...).
        transaction_state: where the transaction ended (``APPLIED`` for every result).
        guarded: the freeze guard (a process of its own, :mod:`qmpagent.guard`) stood by for
            the whole freeze, ready to thaw had this process died or got stuck. False when no
            freeze was sent, or when the guard could not be started or died (then
            ``warnings`` says so: the snapshot was thawed by this process, as without a guard).
    """

    quiesced: bool
    freeze_owner: str | None
    frozen: int
    thawed: int
    freeze_window: float | None
    overlays: dict[str, str]
    reason: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    timings: PhaseTimings = field(default_factory=PhaseTimings)
    freeze_resolved: bool = False
    warnings: tuple[str, ...] = ()
    freeze_state: FreezeState = FreezeState.NOT_TRIED
    transaction_state: TransactionState = TransactionState.APPLIED
    guarded: bool = False
