"""The sans-I/O guest-agent protocol: bytes in, events out. No event loop, no sockets."""

from __future__ import annotations

import itertools
import json
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qmpagent.agent_protocol as proto
from qmpagent import AgentProtocolError, AgentUnavailable, UsageError
from qmpagent.agent_protocol import (
    NEED_DATA,
    YIELD,
    AgentConnection,
    ErrorReply,
    Reply,
    State,
    Synced,
    new_sync_id,
)

PARSE_ERROR_LINE = b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'


def reply(value: object, rid: int) -> bytes:
    return json.dumps({"return": value, "id": rid}).encode() + b"\n"


def events(conn: AgentConnection) -> list[object]:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        if ev is not YIELD:  # the core stopped to bound its work: call again
            out.append(ev)
    return out


def synced_conn(max_reply_size: int = 10 * 1024 * 1024, request_ids: bool = True) -> AgentConnection:
    conn = AgentConnection(max_reply_size, request_ids=request_ids)
    sync = conn.start_sync(7)
    assert sync.startswith(b"\xff")
    conn.receive_data(PARSE_ERROR_LINE + b'\xff{"return": 7}\n')
    assert events(conn) == [Synced(7)]
    return conn


def request_id(data: bytes) -> int:
    rid = json.loads(data)["id"]
    assert isinstance(rid, int)
    return rid


def test_sync_request_bytes() -> None:
    conn = AgentConnection()
    data = conn.start_sync(123)
    assert data == b'\xff{"execute":"guest-sync-delimited","arguments":{"id":123}}\n'
    assert conn.state is State.SYNCING


def test_sync_ids_are_random_signed_64_bit() -> None:
    ids = {new_sync_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(-(2**63) <= i < 2**63 for i in ids)
    assert any(i < 0 for i in ids) and any(i > 0 for i in ids)


def test_sync_discards_everything_before_the_delimiter() -> None:
    conn = AgentConnection()
    conn.start_sync(42)
    # Stale replies buffered while the agent booted, then the parse-error line our 0xFF provokes.
    conn.receive_data(b'{"return": {}}\n{"return": 1, "id": 5}\ngarbage without newline')
    assert events(conn) == []
    conn.receive_data(PARSE_ERROR_LINE)
    assert events(conn) == []
    conn.receive_data(b'\xff{"return": 42}\n')
    assert events(conn) == [Synced(42)]
    assert conn.state is State.IDLE
    assert conn.buffered == 0


def test_stale_sync_reply_with_other_id_is_skipped() -> None:
    conn = AgentConnection()
    conn.start_sync(2)
    conn.receive_data(b'\xff{"return": 1}\n\xff{"return": 2}\n')
    assert events(conn) == [Synced(2)]


def test_sync_reply_must_be_an_int_not_a_lookalike() -> None:
    conn = AgentConnection()
    conn.start_sync(1)
    conn.receive_data(b'\xff{"return": true}\n\xff{"return": 1.0}\n\xff{"return": "1"}\n')
    assert events(conn) == []
    conn.receive_data(b'\xff{"return": 1}\n')
    assert events(conn) == [Synced(1)]


def test_garbage_after_delimiter_is_not_fatal_while_syncing() -> None:
    conn = AgentConnection()
    conn.start_sync(9)
    conn.receive_data(b"\xff\x00\x01not json\n\xff\xff{\"return\": 9}\n")
    assert events(conn) == [Synced(9)]


def test_command_round_trip_matches_id() -> None:
    conn = synced_conn()
    data = conn.send_command("guest-fsfreeze-freeze")
    rid = request_id(data)
    assert json.loads(data) == {"execute": "guest-fsfreeze-freeze", "id": rid}
    assert conn.state is State.AWAITING_REPLY
    conn.receive_data(reply(1, rid))
    assert events(conn) == [Reply("guest-fsfreeze-freeze", 1)]
    assert conn.state is State.IDLE


def test_command_ids_are_fresh() -> None:
    conn = synced_conn()
    seen = set()
    for _ in range(50):
        rid = request_id(conn.send_command("guest-ping"))
        seen.add(rid)
        conn.receive_data(reply({}, rid))
        assert events(conn) == [Reply("guest-ping", {})]
    assert len(seen) == 50


def test_arguments_are_sent() -> None:
    conn = synced_conn()
    data = conn.send_command("guest-fsfreeze-freeze-list", {"mountpoints": ["/mnt/data"]})
    assert json.loads(data)["arguments"] == {"mountpoints": ["/mnt/data"]}


def test_stale_replies_are_dropped() -> None:
    conn = synced_conn()
    rid = request_id(conn.send_command("guest-ping"))
    conn.receive_data(reply({}, rid + 1) + b'{"return": {}}\n' + PARSE_ERROR_LINE)
    assert events(conn) == []
    assert conn.discarded_lines == 3
    conn.receive_data(reply({}, rid))
    assert events(conn) == [Reply("guest-ping", {})]


def test_bool_id_is_not_our_int_id() -> None:
    conn = synced_conn()
    data = conn.send_command("guest-ping")
    rid = request_id(data)
    if rid in (0, 1):  # pragma: no cover - 2**-63 chance
        pytest.skip("unlucky id")
    conn.receive_data(b'{"return": {}, "id": true}\n')
    assert events(conn) == []


def test_error_reply() -> None:
    conn = synced_conn()
    rid = request_id(conn.send_command("guest-fsfreeze-freeze"))
    desc = "Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state"
    conn.receive_data(
        json.dumps({"error": {"class": "CommandNotFound", "desc": desc}, "id": rid}).encode() + b"\n"
    )
    assert events(conn) == [ErrorReply("guest-fsfreeze-freeze", "CommandNotFound", desc)]
    assert conn.state is State.IDLE


@pytest.mark.parametrize(
    "line",
    [
        b"this is not json",
        b"[1, 2, 3]",
        b'{"return": NaN, "id": RID}',
        b'{"error": "flat string", "id": RID}',
        b'{"error": {"class": 1, "desc": "x"}, "id": RID}',
        b'{"id": RID}',
        b'{"return": 1, "error": {"class": "a", "desc": "b"}, "id": RID}',
        b'{"return": 1, "id": RID} trailing',
        b'{"return": "\xc3\x28", "id": RID}',
        b"[" * 100000,
    ],
)
def test_malformed_reply_is_a_protocol_error_and_desyncs(line: bytes) -> None:
    conn = synced_conn()
    rid = request_id(conn.send_command("guest-ping"))
    conn.receive_data(line.replace(b"RID", str(rid).encode()) + b"\n")
    with pytest.raises(AgentProtocolError):
        conn.next_event()
    assert conn.state is State.DESYNCED
    # Whatever follows is discarded until a sync.
    conn.receive_data(reply({}, rid))
    assert events(conn) == []
    conn.start_sync(3)
    conn.receive_data(b'\xff{"return": 3}\n')
    assert events(conn) == [Synced(3)]


def test_oversized_reply_is_bounded_and_an_error() -> None:
    conn = synced_conn(max_reply_size=1024)
    rid = request_id(conn.send_command("guest-file-read"))
    for _ in range(100):
        conn.receive_data(b"x" * 1000)
        assert conn.buffered <= 1024
    with pytest.raises(AgentProtocolError, match="maximum reply size"):
        conn.next_event()
    assert conn.state is State.DESYNCED
    assert conn.buffered == 0
    conn.receive_data(b"y" * 10_000_000 + b"\n" + reply({}, rid))
    assert events(conn) == []
    assert conn.buffered == 0


def test_reply_exactly_at_the_limit_is_accepted() -> None:
    limit = 256
    conn = synced_conn(max_reply_size=limit)
    rid = request_id(conn.send_command("guest-ping"))
    base = json.dumps({"return": "", "id": rid})
    line = json.dumps({"return": "a" * (limit - len(base)), "id": rid}).encode()
    assert len(line) == limit
    conn.receive_data(line + b"\n")
    assert isinstance(conn.next_event(), Reply)


def test_oversized_noise_while_idle_is_skipped_not_buffered() -> None:
    conn = synced_conn(max_reply_size=128)
    conn.receive_data(b"z" * 100_000)
    assert conn.buffered <= 128
    conn.receive_data(b"z" * 100_000 + b"\n")
    rid = request_id(conn.send_command("guest-ping"))
    conn.receive_data(reply({}, rid))
    assert events(conn) == [Reply("guest-ping", {})]


def test_oversized_noise_while_syncing_is_bounded() -> None:
    conn = AgentConnection(max_reply_size=128)
    conn.start_sync(5)
    conn.receive_data(b"\xff" + b"q" * 1_000_000)
    assert conn.buffered <= 128
    conn.receive_data(b'\n\xff{"return": 5}\n')
    assert events(conn) == [Synced(5)]


def test_delimiter_mid_line_restarts_the_line() -> None:
    conn = synced_conn()
    rid = request_id(conn.send_command("guest-ping"))
    conn.receive_data(b'{"return": {}, "i' + b"\xff" + reply({}, rid))
    assert events(conn) == [Reply("guest-ping", {})]


def test_eof_while_awaiting_is_unavailable() -> None:
    conn = synced_conn()
    conn.send_command("guest-ping")
    conn.receive_data(b'{"return"')
    conn.receive_eof()
    with pytest.raises(AgentUnavailable):
        conn.next_event()
    assert conn.state is State.CLOSED
    with pytest.raises(AgentUnavailable):
        conn.send_command("guest-ping")


def test_eof_while_idle_is_quiet() -> None:
    conn = synced_conn()
    conn.receive_eof()
    assert events(conn) == []
    assert conn.state is State.CLOSED


def test_without_request_ids_replies_are_taken_in_order() -> None:
    conn = synced_conn(request_ids=False)
    data = conn.send_command("guest-ping")
    assert json.loads(data) == {"execute": "guest-ping"}
    # A reply carrying an id answers somebody else's request: never ours.
    conn.receive_data(b'{"return": "x", "id": 1}\n{"return": {}}\n')
    assert events(conn) == [Reply("guest-ping", {})]
    conn.send_command("guest-fsfreeze-thaw")
    conn.receive_data(b'{"error": {"class": "GenericError", "desc": "boom"}}\n')
    assert events(conn) == [ErrorReply("guest-fsfreeze-thaw", "GenericError", "boom")]
    assert conn.state is State.IDLE


def test_without_request_ids_a_no_reply_command_desyncs() -> None:
    conn = synced_conn(request_ids=False)
    conn.send_command("guest-shutdown", {"mode": "halt"}, expect_reply=False)
    # A failed shutdown answers later with an error: the next command must resync first.
    assert conn.state is State.DESYNCED
    conn.receive_data(b'{"error": {"class": "GenericError", "desc": "late"}}\n')
    conn.start_sync(8)
    conn.receive_data(b'\xff{"return": 8}\n')
    assert events(conn) == [Synced(8)]


def test_no_reply_command_keeps_idle() -> None:
    conn = synced_conn()
    data = conn.send_command("guest-shutdown", {"mode": "powerdown"}, expect_reply=False)
    assert json.loads(data)["execute"] == "guest-shutdown"
    assert conn.state is State.IDLE
    # A late error reply to it is stale.
    conn.receive_data(reply(None, request_id(data)))
    rid = request_id(conn.send_command("guest-ping"))
    conn.receive_data(reply({}, rid))
    assert events(conn) == [Reply("guest-ping", {})]


def test_abandon_desyncs_and_late_reply_is_dropped_after_resync() -> None:
    conn = synced_conn()
    rid = request_id(conn.send_command("guest-fsfreeze-freeze"))
    conn.abandon()  # e.g. the caller's timeout
    assert conn.state is State.DESYNCED
    with pytest.raises(UsageError):
        conn.send_command("guest-ping")
    conn.start_sync(11)
    # The late freeze reply arrives before the sync reply: it is dropped.
    conn.receive_data(reply(1, rid) + PARSE_ERROR_LINE + b'\xff{"return": 11}\n')
    assert events(conn) == [Synced(11)]


def test_send_requires_sync_and_one_in_flight() -> None:
    conn = AgentConnection()
    with pytest.raises(UsageError):
        conn.send_command("guest-ping")
    conn = synced_conn()
    conn.send_command("guest-ping")
    with pytest.raises(UsageError):
        conn.send_command("guest-ping")


@pytest.mark.parametrize("bad", [{"x": object()}, {"x": float("nan")}, ["not", "a", "dict"]])
def test_unserialisable_arguments_are_a_usage_error(bad: object) -> None:
    conn = synced_conn()
    with pytest.raises(UsageError):
        conn.send_command("guest-ping", bad)  # type: ignore[arg-type]
    assert conn.state is State.IDLE


def test_bad_max_reply_size() -> None:
    with pytest.raises(UsageError):
        AgentConnection(max_reply_size=0)


# --- property tests: chunking never changes the outcome -------------------------------------


def _session_phases(sync_id: int, rids: list[int], values: list[object]) -> list[bytes]:
    """What the agent sends before the sync completes, then after each command: stale noise
    first, then the awaited reply."""
    phases = [b'{"return": "stale"}\n' + PARSE_ERROR_LINE + b'\xff{"return": 999}\n'
              + b'\xff{"return": %d}\n' % sync_id]
    for rid, value in zip(rids, values, strict=True):
        phases.append(reply("stale", rid ^ 1) + reply(value, rid))
    return phases


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

_FIXED_IDS = list(range(1000, 1100))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), values=st.lists(json_values, min_size=1, max_size=5))
def test_any_chunking_decodes_the_same(data: st.DataObject, values: list[object]) -> None:
    """However each phase's bytes are split into reads, the same events come out."""
    phases = _session_phases(1234, _FIXED_IDS[: len(values)], values)
    conn = AgentConnection(max_reply_size=4096, request_ids=True)
    conn.start_sync(1234)
    got: list[object] = []
    # Predictable request ids (1000, 1001, ...) so the replies can be prepared in advance.
    with mock.patch.object(proto, "new_sync_id", side_effect=itertools.count(1000).__next__):
        for i, phase in enumerate(phases):
            if i:
                assert request_id(conn.send_command("guest-x")) == _FIXED_IDS[i - 1]
            cuts = sorted(data.draw(st.lists(st.integers(0, len(phase)), max_size=12)))
            for a, b in zip([0, *cuts], [*cuts, len(phase)], strict=True):
                conn.receive_data(phase[a:b])
                assert conn.buffered <= len(phase)
            got += events(conn)
    assert got == [Synced(1234)] + [Reply("guest-x", v) for v in values]


@settings(max_examples=200, deadline=None)
@given(noise=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 4000), max_size=20))
def test_arbitrary_bytes_never_break_bounds(noise: bytes, cuts: list[int]) -> None:
    """Whatever a hostile guest sends, memory stays bounded and the only exceptions are typed."""
    conn = AgentConnection(max_reply_size=256, request_ids=True)
    conn.start_sync(77)
    stream = noise + b'\n\xff{"return": 77}\n'
    points = sorted(c for c in cuts if c <= len(stream))
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        conn.receive_data(stream[a:b])
        assert conn.buffered <= 256
    assert events(conn)[-1:] == [Synced(77)]
    rid = request_id(conn.send_command("guest-ping"))
    for piece in (noise, reply({}, rid)):
        conn.receive_data(piece)
        assert conn.buffered <= 256
    try:
        evs = events(conn)
    except AgentProtocolError:
        assert conn.state is State.DESYNCED
    else:
        assert evs == [] or evs == [Reply("guest-ping", {})]
