"""The snapshot's state machines (qmpagent/snapshot_state.py), without an event loop: the
transition tables, the refusal of illegal moves, and the record and result derived from them."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

import qmpagent
from qmpagent import FreezeOwner, FreezeState, Phase, SnapshotRecord, TransactionState
from qmpagent.snapshot_state import (
    FREEZE_TRANSITIONS,
    LATE_FREEZE_REPLY,
    TRANSACTION_TRANSITIONS,
    IllegalTransition,
    SnapshotState,
)

F, T = FreezeState, TransactionState


def new() -> SnapshotState:
    return SnapshotState(SnapshotRecord())


def test_phase_names_are_the_strings_on_phase_always_received() -> None:
    assert [p.value for p in Phase] == [
        "preflight", "prepare", "freeze", "transaction", "thaw", "copy", "cleanup"
    ]  # "copy": a backup's, after the thaw
    for p in Phase:
        assert p == p.value and str(p) == p.value and f"{p}" == p.value
        assert json.dumps(p) == json.dumps(p.value)
    assert str(FreezeOwner.SELF) == "self" and FreezeOwner.EXTERNAL == "external"


def test_the_tables_read_as_the_docstring_draws_them() -> None:
    # The only states from which the orchestrator must still act (resolve or thaw).
    must_act = {s for s in F if any(t in (F.THAWED, F.THAW_FAILED) for t in FREEZE_TRANSITIONS.get(s, ()))}
    assert must_act == {F.SENT_UNRESOLVED, F.OURS}
    # Nothing ever thaws a freeze that was never sent, or someone else's.
    for start in (F.NOT_TRIED, F.SKIPPED, F.EXTERNAL, F.EXTERNAL_ENDED, F.NOT_FROZEN):
        assert F.THAWED not in FREEZE_TRANSITIONS.get(start, frozenset())
    # Final states.
    for final in (F.SKIPPED, F.EXTERNAL_ENDED, F.NOT_FROZEN, F.THAWED, F.THAW_FAILED):
        assert final not in FREEZE_TRANSITIONS
    for final in (T.APPLIED, T.UNKNOWN):
        assert final not in TRANSACTION_TRANSITIONS


@pytest.mark.parametrize(("a", "b"), list(itertools.product(F, F)))
def test_every_freeze_move_not_in_the_table_is_refused(a: FreezeState, b: FreezeState) -> None:
    st = new()
    st.freeze = a
    legal = b in FREEZE_TRANSITIONS.get(a, frozenset())
    if legal:
        st._move_freeze(b)
        assert st.freeze is b
    else:
        with pytest.raises(IllegalTransition, match=f"{a} -> {b}"):
            st._move_freeze(b)
        assert st.freeze is a  # unchanged


@pytest.mark.parametrize(("a", "b"), list(itertools.product(T, T)))
def test_every_transaction_move_not_in_the_table_is_refused(
    a: TransactionState, b: TransactionState
) -> None:
    st = new()
    st.transaction = a
    if b in TRANSACTION_TRANSITIONS.get(a, frozenset()):
        st._move_transaction(b)
        assert st.transaction is b
    else:
        with pytest.raises(IllegalTransition):
            st._move_transaction(b)
        assert st.transaction is a


def test_illegal_moves_through_the_methods() -> None:
    st = new()
    with pytest.raises(IllegalTransition):
        st.thaw_confirmed(1, 0.0)  # nothing of ours was frozen: never "thawed"
    st.external()
    with pytest.raises(IllegalTransition):
        st.freeze_sent(0.0)  # someone else's freeze: we never send ours
    with pytest.raises(IllegalTransition):
        st.transaction_outcome(T.APPLIED)  # not sent
    # IllegalTransition is an internal error, no I/O handler can mistake it for its own.
    assert issubclass(IllegalTransition, AssertionError)
    assert not issubclass(IllegalTransition, (RuntimeError, OSError, qmpagent.QMPAgentError))


def test_the_record_is_derived_from_the_state() -> None:
    st = new()
    rec = st.record
    assert (rec.phase, rec.freeze_owner, rec.snapshot_taken) == (Phase.PREFLIGHT, None, False)
    st.enter_phase(Phase.FREEZE)
    st.freeze_sent(10.0)
    assert rec.freeze_state is F.SENT_UNRESOLVED and rec.freeze_owner is None
    st.freeze_answered(2, 10.05, "-")
    assert rec.freeze_owner is FreezeOwner.SELF and rec.frozen == 2 and rec.phase == "freeze"
    st.transaction_sent()
    assert rec.snapshot_taken is None  # in flight: unknown
    st.transaction_outcome(T.APPLIED)
    assert rec.snapshot_taken is True and st.quiesced_by is FreezeOwner.SELF
    st.thaw_confirmed(2, 10.5)
    assert (rec.thawed, rec.freeze_state, rec.transaction_state) == (2, F.THAWED, T.APPLIED)
    assert st.freeze_window == pytest.approx(0.45)
    # The record is a plain dataclass: the CLI's JSON output keeps working.
    assert json.loads(json.dumps(dataclasses.asdict(rec)))["freeze_owner"] == "self"


def test_quiesced_means_applied_while_frozen() -> None:
    st = new()
    st.freeze_sent(0.0)
    st.freeze_answered(1, 0.01, "-")
    st.transaction_sent()
    st.thaw_confirmed(1, 2.0)  # the window ran out: thawed before the transaction was learnt
    st.transaction_outcome(T.APPLIED)
    assert not st.quiesced and st.record.snapshot_taken is True
    ext = new()
    ext.external()
    ext.transaction_sent()
    ext.transaction_outcome(T.APPLIED)
    assert ext.quiesced_by is FreezeOwner.EXTERNAL
    ended = new()
    ended.external()
    ended.external_ended("thawed meanwhile")
    ended.transaction_sent()
    ended.transaction_outcome(T.APPLIED)
    assert not ended.quiesced and ended.record.freeze_owner is FreezeOwner.EXTERNAL


def test_a_resolved_freeze_takes_its_count_from_the_thaw() -> None:
    st = new()
    st.freeze_sent(0.0)
    st.freeze_resolved(True, "-")
    assert st.resolved and st.record.freeze_owner is FreezeOwner.SELF and st.frozen == 0
    st.thaw_confirmed(3, 1.0)
    assert st.frozen == st.thawed == 3
    assert st.freeze_window == 1.0  # no reply: counted from the request


@pytest.mark.parametrize(
    ("reply_after", "start"),
    [(0.05, "reply"), (LATE_FREEZE_REPLY / 2, "reply"), (LATE_FREEZE_REPLY + 0.01, "sent"),
     (2.5, "sent"), (None, "sent")],
)
def test_the_freeze_window_never_under_reports_a_late_reply(
    reply_after: float | None, start: str
) -> None:
    st = new()
    st.freeze_sent(100.0)
    if reply_after is None:
        st.freeze_resolved(True, "-")
    else:
        st.freeze_answered(1, 100.0 + reply_after, "-")
    st.thaw_confirmed(1, 103.0)
    expected = 103.0 - (100.0 if start == "sent" or reply_after is None else 100.0 + reply_after)
    assert st.freeze_window == pytest.approx(expected)


def test_nothing_sent_nothing_owned() -> None:
    st = new()
    st.skip("quiesce is off")
    assert st.reason == "quiesce is off" and not st.must_settle and st.window_start is None
    assert st.record.freeze_state is F.SKIPPED and st.owner is None


def test_record_lists_are_written_once_each() -> None:
    st = new()
    st.file_created("/a")
    st.file_created("/a")
    st.overlay_added("n")
    st.overlay_removed("n")
    st.file_removed("/b")  # a file whose job's reply was lost: created, then removed
    rec = st.record
    assert rec.files_created == ["/a", "/b"] and rec.files_removed == ["/b"]
    assert rec.overlays_added == ["n"] and rec.overlays_removed == ["n"]
