"""The sans-I/O agent protocol against a hostile guest: per-command reply limits, a bounded JSON
shape (values, nesting) checked before decoding, and bounded work per call. Bytes in, events out;
no event loop, no wall-clock time: the assertions are on work done, memory and events.

Issue 11, holes 10 (memory) and 11 (event-loop stalls).
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qmpagent.agent_protocol as proto
from qmpagent import AgentProtocolError
from qmpagent.agent_protocol import (
    DEFAULT_MAX_REPLY_DEPTH,
    DEFAULT_MAX_REPLY_SIZE,
    DEFAULT_MAX_REPLY_VALUES,
    MODERATE_REPLY_SIZE,
    NEED_DATA,
    SMALL_REPLY_SIZE,
    STEP_BYTES,
    STEP_OPS,
    YIELD,
    AgentConnection,
    Reply,
    State,
    Synced,
    reply_limit,
)


def synced(**kwargs: Any) -> AgentConnection:
    conn = AgentConnection(**kwargs)
    conn.start_sync(7)
    conn.receive_data(b'\xff{"return": 7}\n')
    assert conn.next_event() == Synced(7)
    return conn


def drain(conn: AgentConnection) -> list[object]:
    """Every event until NEED_DATA (YIELDs dropped); a protocol error ends the list."""
    out: list[object] = []
    while True:
        try:
            ev = conn.next_event()
        except AgentProtocolError as exc:
            out.append(exc)
            return out
        if ev is NEED_DATA:
            return out
        if ev is not YIELD:
            out.append(ev)


def drain_counting(conn: AgentConnection) -> tuple[list[object], list[int]]:
    """Like :func:`drain`, also returning how many input bytes each call consumed."""
    out: list[object] = []
    consumed: list[int] = []
    while True:
        before = conn.pending
        try:
            ev = conn.next_event()
        except AgentProtocolError as exc:
            out.append(exc)
            return out, consumed
        consumed.append(before - conn.pending)
        if ev is NEED_DATA:
            return out, consumed
        if ev is not YIELD:
            out.append(ev)


def reply_line(value: object) -> bytes:
    return json.dumps({"return": value}).encode() + b"\n"


# --- hole 10: per-command reply limits ---------------------------------------------------------


def test_reply_limits_follow_what_each_command_can_return() -> None:
    for small in ("guest-ping", "guest-sync", "guest-fsfreeze-status", "guest-fsfreeze-freeze",
                  "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw", "guest-file-open"):
        assert reply_limit(small) == SMALL_REPLY_SIZE <= 16 * 1024
    for moderate in ("guest-info", "guest-get-fsinfo", "guest-get-osinfo",
                     "guest-network-get-interfaces"):
        assert reply_limit(moderate) == MODERATE_REPLY_SIZE == 1024 * 1024
    # A file read returns what it was asked for, in base64, plus a little.
    assert reply_limit("guest-file-read") < 8 * 1024  # qemu-ga's default count: 4 KiB
    assert 4 * 2**20 // 3 < reply_limit("guest-file-read", {"count": 2**20}) < 4 * 2**20 // 3 + 2048
    assert reply_limit("guest-file-read", {"count": 2**30}) == DEFAULT_MAX_REPLY_SIZE
    assert reply_limit("guest-file-read", {"count": "x"}) == DEFAULT_MAX_REPLY_SIZE
    # Output of guest-exec and unknown commands: only the connection's limit.
    assert reply_limit("guest-exec-status") == DEFAULT_MAX_REPLY_SIZE
    assert reply_limit("guest-frobnicate") == DEFAULT_MAX_REPLY_SIZE
    assert reply_limit("guest-info", default=4096) == 4096


@pytest.mark.parametrize(
    ("command", "arguments", "size"),
    [
        ("guest-ping", None, SMALL_REPLY_SIZE + 1),
        ("guest-fsfreeze-freeze", None, SMALL_REPLY_SIZE + 1),
        ("guest-fsfreeze-status", None, SMALL_REPLY_SIZE + 1),
        ("guest-info", None, MODERATE_REPLY_SIZE + 1),
        ("guest-file-read", {"handle": 1, "count": 1000}, 4000),
    ],
)
def test_a_reply_longer_than_its_command_allows_is_refused_as_it_arrives(
    command: str, arguments: dict[str, Any] | None, size: int
) -> None:
    conn = synced()
    conn.send_command(command, arguments)
    head = b'{"return": "'
    conn.receive_data(head + b"A" * (size - len(head)))  # not even complete
    events = drain(conn)
    assert len(events) == 1 and isinstance(events[0], AgentProtocolError)
    assert "maximum reply size" in str(events[0])
    assert conn.state is State.DESYNCED and conn.buffered == 0


def test_replies_within_their_limits_are_accepted() -> None:
    conn = synced()
    conn.send_command("guest-file-read", {"handle": 1, "count": 300_000})
    data = "QUFB" * 100_000  # 300,000 bytes in base64
    conn.receive_data(reply_line({"count": 300_000, "buf-b64": data, "eof": False}))
    assert drain(conn) == [Reply("guest-file-read", {"count": 300_000, "buf-b64": data, "eof": False})]
    conn.send_command("guest-info")
    info = {"version": "7.2", "supported_commands": [
        {"name": f"guest-cmd-{i}", "enabled": True, "success-response": True} for i in range(2000)
    ]}
    conn.receive_data(reply_line(info))
    assert drain(conn) == [Reply("guest-info", info)]


def test_an_explicit_limit_only_lowers_and_overrides_can_raise() -> None:
    conn = synced()
    conn.send_command("guest-info", max_reply_size=10 * 1024 * 1024)  # cannot raise it
    conn.receive_data(reply_line("x" * (MODERATE_REPLY_SIZE + 10)))
    assert isinstance(drain(conn)[0], AgentProtocolError)
    conn = synced(reply_limits={"guest-info": 4 * MODERATE_REPLY_SIZE})
    conn.send_command("guest-info")
    conn.receive_data(reply_line("x" * (MODERATE_REPLY_SIZE + 10)))
    assert isinstance(drain(conn)[0], Reply)


# --- hole 10: the shape of a reply is bounded before it is decoded -----------------------------


def test_many_tiny_values_are_refused_before_the_line_completes() -> None:
    conn = synced()
    conn.send_command("guest-exec-status", {"pid": 1})  # a command with the connection's limit
    body = b'{"return": [' + b"{}," * (DEFAULT_MAX_REPLY_VALUES + 10)  # no end, no newline
    with mock.patch.object(proto, "decode_line", wraps=proto.decode_line) as decode:
        conn.receive_data(body)
        events = drain(conn)
    assert len(events) == 1 and "JSON values" in str(events[0])
    assert decode.call_count == 0  # refused without decoding
    assert conn.buffered == 0


def test_values_at_the_limit_are_accepted() -> None:
    conn = synced(max_reply_values=1000)
    conn.send_command("guest-exec-status", {"pid": 1})
    # {"return": [...]}: the object and the list are 2 values, 998 elements add 997 commas.
    conn.receive_data(reply_line([0] * 998))
    assert drain(conn) == [Reply("guest-exec-status", [0] * 998)]
    conn.send_command("guest-exec-status", {"pid": 1})
    conn.receive_data(reply_line([0] * 1000))
    assert "JSON values" in str(drain(conn)[0])


def test_commas_and_brackets_inside_strings_do_not_count() -> None:
    conn = synced(max_reply_values=10, max_reply_depth=4)
    text = ',[{"\\",]}' * 5000 + "\\\\" + "[[[[[[,,,,"
    conn.send_command("guest-exec-status", {"pid": 1})
    conn.receive_data(reply_line({"out-data": text, "exited": True}))
    assert drain(conn) == [Reply("guest-exec-status", {"out-data": text, "exited": True})]


def nested(depth: int) -> object:
    value: object = 0
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    # {"return": X} is one level; X nests depth - 1 more.
    conn = synced()
    conn.send_command("guest-exec-status", {"pid": 1})
    conn.receive_data(reply_line(nested(DEFAULT_MAX_REPLY_DEPTH - 1)))
    assert drain(conn) == [Reply("guest-exec-status", nested(DEFAULT_MAX_REPLY_DEPTH - 1))]
    conn.send_command("guest-exec-status", {"pid": 1})
    conn.receive_data(reply_line(nested(DEFAULT_MAX_REPLY_DEPTH)))
    events = drain(conn)
    assert len(events) == 1 and "nested deeper" in str(events[0])


def test_deep_nesting_is_refused_without_decoding_even_unterminated() -> None:
    conn = synced()
    conn.send_command("guest-exec-status", {"pid": 1})
    with mock.patch.object(proto, "decode_line", wraps=proto.decode_line) as decode:
        conn.receive_data(b'{"return": ' + b"[" * 40_000)  # fewer than the values limit
        events = drain(conn)
    assert len(events) == 1 and "nested deeper" in str(events[0])
    assert decode.call_count == 0


def test_memory_of_a_hostile_reply_of_tiny_objects_stays_small() -> None:
    """The review's case: a 10 MiB guest-info of tiny objects raised peak RSS ~27x."""
    conn = synced()
    conn.send_command("guest-info")
    body = b'{"return": {"version": "7", "supported_commands": [' + b"{}," * (3 << 20) + b"{}]}}\n"
    tracemalloc.start()
    try:
        for i in range(0, len(body), 256 * 1024):
            conn.receive_data(body[i:i + 256 * 1024])
            drain(conn)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024, peak  # decoding it whole took ~270 MB
    assert conn.state is State.DESYNCED


json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(
    alphabet=st.sampled_from('ab"\\[]{},:\n\t\u00e9\u2028\U0001f600'), max_size=12
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(alphabet='k"\\[,', max_size=4), children, max_size=4),
    max_leaves=30,
)


def _shape_of(value: object, depth: int = 1) -> tuple[int, int]:
    """(values, depth) as the scanner counts them: containers plus commas, and nesting."""
    if isinstance(value, list):
        items = value
    elif isinstance(value, dict):
        items = list(value.values())
    else:
        return 0, depth - 1
    values = 1 + max(len(items) - 1, 0)
    deepest = depth
    for item in items:
        v, d = _shape_of(item, depth + 1)
        values += v
        deepest = max(deepest, d)
    return values, deepest


@settings(max_examples=300, deadline=None)
@given(value=json_values, ascii_only=st.booleans(), data=st.data())
def test_shape_scan_counts_exactly_however_the_line_is_cut(
    value: object, ascii_only: bool, data: st.DataObject
) -> None:
    line = json.dumps({"return": value}, ensure_ascii=ascii_only).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(line)), max_size=10)))
    shape = proto._Shape(max_values=10**9, max_depth=10**9)
    for a, b in zip([0, *cuts], [*cuts, len(line)], strict=True):
        assert shape.feed(line[a:b]) is None
    inner_values, inner_depth = _shape_of(value, 2)
    assert (shape.values, shape.depth) == (1 + inner_values, 0)
    assert not shape.in_string and not shape.escape
    # The limits refuse exactly above the true counts.
    for max_values, max_depth, refused in (
        (1 + inner_values, max(1, inner_depth), False),
        (inner_values, max(1, inner_depth), True),
    ):
        shape = proto._Shape(max_values=max_values, max_depth=max_depth)
        results = [shape.feed(line[a:b]) for a, b in zip([0, *cuts], [*cuts, len(line)], strict=True)]
        assert any(r is not None for r in results) is refused
    if inner_depth > 1:
        shape = proto._Shape(max_values=10**9, max_depth=inner_depth - 1)
        results = [shape.feed(line[a:b]) for a, b in zip([0, *cuts], [*cuts, len(line)], strict=True)]
        assert any(r is not None and "nested" in r for r in results)


# --- hole 11: bounded work per call --------------------------------------------------------------


@pytest.mark.parametrize("state", ["awaiting", "syncing"])
def test_a_chunk_of_ff_newlines_is_skipped_at_c_speed(state: str) -> None:
    """The review's case: 256 KiB of ``\\xff\\n`` blocked the loop ~400 ms (a Python step per
    byte). Now runs of 0xFF and blank lines are one operation each, per step."""
    if state == "awaiting":
        conn = synced()
        conn.send_command("guest-ping")
    else:
        conn = AgentConnection()
        conn.start_sync(5)
    chunk = b"\xff\n" * (128 * 1024)
    with mock.patch.object(proto, "decode_line", wraps=proto.decode_line) as decode:
        conn.receive_data(chunk)
        events, consumed = drain_counting(conn)
    assert events == []
    assert decode.call_count == 0
    assert max(consumed) <= STEP_BYTES
    assert conn.operations <= 3 * (len(chunk) // STEP_BYTES + 1)
    conn.receive_data(b'{"return": {}}\n' if state == "awaiting" else b'\xff{"return": 5}\n')
    assert drain(conn) == ([Reply("guest-ping", {})] if state == "awaiting" else [Synced(5)])


@pytest.mark.parametrize(
    "pattern",
    [b"\xffa\n", b"a\xff", b"\xff{\n", b'\xff{"return"\n', b"\xff" + b"q" * 300 + b"\n"],
)
def test_noise_while_syncing_is_processed_in_bounded_steps(pattern: bytes) -> None:
    conn = AgentConnection()
    conn.start_sync(5)
    chunk = pattern * (256 * 1024 // len(pattern))
    conn.receive_data(chunk)
    calls = 0
    while True:
        before_ops, before_pending = conn.operations, conn.pending
        ev = conn.next_event()
        calls += 1
        assert conn.operations - before_ops <= STEP_OPS
        assert before_pending - conn.pending <= STEP_BYTES
        if ev is NEED_DATA:
            break
        assert ev is YIELD
    assert calls > 1
    assert conn.operations <= 3 * chunk.count(b"\xff") + 2 * chunk.count(b"\n") + calls  # linear
    conn.receive_data(b'\xff{"return": 5}\n')
    assert drain(conn) == [Synced(5)]


@pytest.mark.parametrize("pattern", [b"a\xff", b'{"return": 1, "id": 9}\n', b"x" * 1000])
def test_noise_while_awaiting_is_processed_in_bounded_steps(pattern: bytes) -> None:
    conn = synced(request_ids=False, max_reply_size=DEFAULT_MAX_REPLY_SIZE)
    conn.send_command("guest-exec-status", {"pid": 1})
    chunk = pattern * (256 * 1024 // len(pattern))
    conn.receive_data(chunk)
    events: list[object] = []
    while True:
        before_ops, before_pending = conn.operations, conn.pending
        try:
            ev = conn.next_event()
        except AgentProtocolError as exc:
            events.append(exc)
            break
        assert conn.operations - before_ops <= STEP_OPS
        assert before_pending - conn.pending <= STEP_BYTES
        if ev is NEED_DATA:
            break
        if ev is not YIELD:
            events.append(ev)
    assert events == []
    assert conn.state is State.AWAITING_REPLY
    assert conn.operations <= 3 * (chunk.count(b"\xff") + chunk.count(b"\n")) + 2 * conn.steps


def test_a_big_reply_is_accumulated_in_bounded_steps() -> None:
    conn = synced()
    conn.send_command("guest-exec-status", {"pid": 1})
    line = reply_line({"out-data": "QUJD" * (2 << 20), "exited": True})  # ~8 MiB
    conn.receive_data(line)
    events, consumed = drain_counting(conn)
    assert len(events) == 1 and isinstance(events[0], Reply)
    assert max(consumed) <= STEP_BYTES
    assert len(consumed) >= len(line) // STEP_BYTES


def test_input_after_a_reply_is_stale_and_dropped_at_once() -> None:
    conn = synced()
    conn.send_command("guest-ping")
    conn.receive_data(b'{"return": {}}\n' + b'{"return": "stale"}\n' * 50_000 + b'{"ret')
    assert conn.next_event() == Reply("guest-ping", {})
    assert conn.pending == 0  # the rest was dropped with it, without a step per line
    assert conn.operations < 10
    # The stale partial line cannot be completed into a reply to the next command.
    conn.send_command("guest-ping")
    conn.receive_data(b'urn": {}}\n')
    assert isinstance(drain(conn)[0], AgentProtocolError)


def test_input_fed_but_not_drained_is_stale_for_the_next_command() -> None:
    conn = synced()
    conn.receive_data(b'{"return": "stale"}\n')  # never drained: it arrived while idle
    conn.send_command("guest-ping")
    conn.receive_data(b'{"return": {}}\n')
    assert drain(conn) == [Reply("guest-ping", {})]


def test_eof_after_pending_input_delivers_the_reply_first() -> None:
    conn = synced()
    conn.send_command("guest-ping")
    conn.receive_data(b"\xff\n" * 100_000 + b'{"return": {}}\n')
    conn.receive_eof()
    assert drain(conn) == [Reply("guest-ping", {})]
    assert conn.state is State.CLOSED


@settings(max_examples=200, deadline=None)
@given(
    noise=st.binary(max_size=6000) | st.lists(
        st.sampled_from([b"\xff", b"\n", b"a", b"{", b'"', b"[", b'{"return": 5}', b" "]),
        max_size=3000,
    ).map(b"".join),
    cuts=st.lists(st.integers(0, 7000), max_size=8),
    syncing=st.booleans(),
)
def test_bounded_steps_decide_like_unbounded_processing(
    noise: bytes, cuts: list[int], syncing: bool
) -> None:
    """However hostile the bytes and however they are cut, each call does bounded work, and the
    outcome is the same as processing each chunk in one go."""
    def fresh() -> AgentConnection:
        conn = synced(max_reply_size=512, max_reply_values=20, max_reply_depth=3)
        if syncing:
            conn.start_sync(5)
        else:
            conn.send_command("guest-exec-status", {"pid": 1})
        return conn

    stream = noise + (b'\n\xff{"return": 5}\n' if syncing else b'\n{"return": 1}\n')
    points = sorted(c for c in cuts if c <= len(stream))
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]

    bounded = fresh()
    got: list[object] = []
    for piece in pieces:
        bounded.receive_data(piece)
        while True:
            before_ops, before_pending = bounded.operations, bounded.pending
            try:
                ev = bounded.next_event()
            except AgentProtocolError as exc:
                got.append(type(exc))
                break
            assert bounded.operations - before_ops <= STEP_OPS
            assert bounded.buffered <= 512
            if bounded.state in (State.SYNCING, State.AWAITING_REPLY):
                assert before_pending - bounded.pending <= STEP_BYTES
            if ev is NEED_DATA:
                break
            if ev is not YIELD:
                got.append(ev)

    whole = fresh()
    want: list[object] = []
    for piece in pieces:
        whole.receive_data(piece)
        whole._step(bounded=False)
        while True:
            try:
                ev = whole.next_event()
            except AgentProtocolError as exc:
                want.append(type(exc))
                break
            if ev is NEED_DATA:
                break
            want.append(ev)
    assert got == want
    assert bounded.state is whole.state
