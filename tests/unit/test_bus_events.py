"""Apache James's StateChangeEvent codec (gateway.bus.events, DESIGN.md §5): round trips of objects and arrays,
the legacy per-type fields, unknown type names kept, and poison bodies, which always raise EventDecodeError and
nothing else."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.bus.events import (
    STATE_CHANGE_EVENT,
    EventDecodeError,
    EventLines,
    StateChangeEvent,
    decode_event_lines,
    decode_events,
    encode_events,
    new_event,
)

# Type names: JMAP's, and anything else (custom data types exist and must pass through as they are).
TYPE_NAMES = st.sampled_from(["Email", "Mailbox", "Thread", "EmailDelivery", "VacationResponse"]) | st.text(
    min_size=1, max_size=12)
STATES = st.dictionaries(TYPE_NAMES, st.text(max_size=12), max_size=5)
USERNAMES = st.text(min_size=1, max_size=24)
EVENT_IDS = st.uuids().map(str) | st.text(min_size=1, max_size=12)
EVENTS = st.builds(StateChangeEvent, username=USERNAMES, typeStates=STATES, eventId=EVENT_IDS)

LEGACY = {"mailboxState": "Mailbox", "emailState": "Email", "vacationResponseState": "VacationResponse",
          "emailDeliveryState": "EmailDelivery"}


def james(**fields: Any) -> bytes:
    """A body as James writes it (with `type` first), with `fields` added or overriding."""
    return json.dumps({"type": STATE_CHANGE_EVENT, **fields}).encode()


# --- round trips -----------------------------------------------------------------------------------------

@given(st.lists(EVENTS, min_size=1, max_size=4))
def test_encode_then_decode_gives_the_same_events(events: list[StateChangeEvent]) -> None:
    body = encode_events(events)
    assert decode_events(body) == events
    # One event is written as an object, several as an array (James reads both).
    assert body[:1] == (b"{" if len(events) == 1 else b"[")


@given(EVENTS)
def test_one_event_reads_the_same_as_an_object_or_a_one_element_array(event: StateChangeEvent) -> None:
    body = encode_events([event])
    assert decode_events(b"[" + body + b"]") == decode_events(body) == [event]


@given(USERNAMES, STATES)
def test_the_wire_form_is_james_s(username: str, states: dict[str, str]) -> None:
    event = new_event(username, states)
    wire = json.loads(encode_events([event]))
    assert wire == {"type": STATE_CHANGE_EVENT, "eventId": event.eventId, "username": username,
                    "typeStates": states}
    assert uuid.UUID(event.eventId).version == 4


@given(USERNAMES, st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=8), max_size=6))
def test_unknown_type_names_are_kept_as_they_are(username: str, states: dict[str, str]) -> None:
    (event,) = decode_events(james(username=username, typeStates=states, eventId="e"))
    assert event.typeStates == states


@given(USERNAMES, st.dictionaries(st.sampled_from(sorted(LEGACY)), st.text(max_size=8)))
def test_legacy_fields_become_type_states(username: str, legacy: dict[str, str]) -> None:
    # Older James versions write one field per type instead of `typeStates`.
    (event,) = decode_events(james(username=username, eventId="e", **legacy))
    assert event.typeStates == {LEGACY[name]: state for name, state in legacy.items()}


def test_type_states_win_over_legacy_fields() -> None:
    (event,) = decode_events(james(username="bob", typeStates={"Email": "new"}, emailState="old",
                                   mailboxState="m"))
    assert event.typeStates == {"Email": "new"}


@pytest.mark.parametrize("fields", [{}, {"eventId": ""}])
def test_an_event_without_an_id_gets_a_fresh_one_when_published(fields: dict[str, Any]) -> None:
    # Decoding leaves it empty (no uuid4 per consumed event); James's nodes need one, so publishing fills it in.
    body = james(username="bob", typeStates={"Email": "1"}, **fields)
    (event,) = decode_events(body)
    assert event.eventId == ""
    first, second = (json.loads(encode_events([event]))["eventId"] for _ in range(2))
    assert first != second and uuid.UUID(first).version == 4


def test_fields_james_may_add_later_are_ignored() -> None:
    (event,) = decode_events(james(username="bob", typeStates={"Email": "1"}, eventId="e",
                                   sequence=7, extra={"nested": [1, 2]}))
    assert event == StateChangeEvent(username="bob", typeStates={"Email": "1"}, eventId="e")


def test_an_empty_array_is_no_events() -> None:
    assert decode_events(b"[]") == []


def test_bytes_like_bodies() -> None:
    body = james(username="bob", typeStates={"Email": "1"}, eventId="e")
    assert decode_events(bytearray(body)) == decode_events(memoryview(body)) == decode_events(body)


# --- poison ----------------------------------------------------------------------------------------------

POISON = [
    b"",
    b"not json",
    b"\xff\xfe\x00",
    b"null",
    b"42",
    b'"a string"',
    b"[1, 2]",
    b"[[]]",
    b"[" * 10_000,
    james(type="org.apache.james.events.SomethingElse", username="bob", typeStates={}),  # unknown type
    james(typeStates={"Email": "1"}),  # no username
    james(username="", typeStates={"Email": "1"}),
    james(username=None, typeStates={"Email": "1"}),
    james(username="bob", typeStates={"Email": 1}),
    james(username="bob", typeStates=["Email", "1"]),
    james(username="bob", emailState=5),
    james(username="bob", typeStates={"Email": "1"}, eventId=7),
    james(username="bob", typeStates={"Email": "1"}, eventId=None),
    # One bad event spoils the whole body: an array is acked or rejected as one message.
    b"[" + james(username="bob", typeStates={}) + b"," + james(username="", typeStates={}) + b"]",
    b'{"type":"' + STATE_CHANGE_EVENT.encode() + b'","username":"b\\ud800","typeStates":{}}',  # lone surrogate
    b'{"type":"' + STATE_CHANGE_EVENT.encode() + b'","username":"b\xff","typeStates":{}}',  # not UTF-8
    james(username="bob", typeStates={"Email": "1"})[:-1],  # truncated
]


@pytest.mark.parametrize("body", POISON)
def test_poison_bodies_raise_event_decode_error(body: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_events(body)


def test_event_decode_error_is_a_gateway_error() -> None:
    # One hierarchy (gateway.errors): an injector's bad body maps to a 400 through the error mapper.
    from gateway.errors import GatewayError

    assert issubclass(EventDecodeError, GatewayError)


def _decodes_or_is_poison(body: bytes) -> None:
    try:
        events = decode_events(body)
    except EventDecodeError:
        return
    for event in events:  # what does decode is a well-formed event
        assert isinstance(event, StateChangeEvent) and event.username and event.type == STATE_CHANGE_EVENT
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in event.typeStates.items())


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_are_poison(body: bytes) -> None:
    _decodes_or_is_poison(body)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(JSON)
def test_arbitrary_json_decodes_or_is_poison(value: Any) -> None:
    _decodes_or_is_poison(json.dumps(value).encode())


FIELDS = ["type", "username", "eventId", "typeStates", *LEGACY]


@given(EVENTS, st.sampled_from(FIELDS), JSON)
def test_a_valid_event_with_one_field_replaced_decodes_or_is_poison(event: StateChangeEvent, field: str,
                                                                     value: Any) -> None:
    wire = json.loads(encode_events([event]))
    wire[field] = value
    _decodes_or_is_poison(json.dumps(wire).encode())


@given(EVENTS, st.sampled_from(["type", "username", "typeStates"]),
       st.integers() | st.lists(st.integers(), max_size=2) | st.booleans())
def test_a_wrongly_typed_required_field_is_poison(event: StateChangeEvent, field: str, value: Any) -> None:
    wire = json.loads(encode_events([event]))
    wire[field] = value
    with pytest.raises(EventDecodeError):
        decode_events(json.dumps(wire).encode())


@pytest.mark.parametrize("body", [
    b'{"k":' * 5000 + b"1" + b"}" * 5000,  # unknown members are skipped recursively: RecursionError before
    b"[" * 100_000 + b"]" * 100_000,
    b'{"type":"' + STATE_CHANGE_EVENT.encode() + b'","username":"bob","x":' + b"[" * 3000 + b"]" * 3000 + b"}",
])
def test_deep_bodies_are_poison_not_a_crash(body: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_events(body)
    with pytest.raises(EventDecodeError):
        decode_event_lines(body + b"\n")


# --- EventLines: an NDJSON body read piece by piece ------------------------------------------------------------

def _line(user: str, state: str) -> bytes:
    return json.dumps({"type": STATE_CHANGE_EVENT, "username": user, "typeStates": {"Email": state}}).encode() + b"\n"


@given(st.lists(st.tuples(USERNAMES, st.text(max_size=8)), max_size=8), st.data())
def test_event_lines_give_every_event_once_in_order_however_the_body_is_cut(
        events: list[tuple[str, str]], data: st.DataObject) -> None:
    body = b"".join(_line(u, s) for u, s in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=10)))
    lines = EventLines(limit=1 << 20)
    got: list[StateChangeEvent] = []
    for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True):
        got += lines.feed(body[a:b])
    got += lines.end()
    assert lines.failure is None
    assert [(e.username, e.typeStates["Email"]) for e in got] == events


def test_event_lines_end_takes_a_last_line_without_its_newline_and_skips_blank_lines() -> None:
    lines = EventLines(limit=4096)
    assert [e.typeStates for e in lines.feed(b"\n\n" + _line("a", "1") + b"\n" + _line("b", "2")[:-1])] == [
        {"Email": "1"}]
    assert [e.username for e in lines.end()] == ["b"]
    assert lines.end() == [] and lines.failure is None


def test_a_bad_line_is_named_by_its_number_in_the_whole_body_and_stops_the_body() -> None:
    lines = EventLines(limit=4096)
    assert len(lines.feed(_line("a", "1") + _line("a", "2"))) == 2
    good = lines.feed(_line("a", "3") + b'{"username": 5}\n' + _line("a", "4"))
    assert [e.typeStates["Email"] for e in good] == ["3"]  # the lines before the bad one, not after it
    assert lines.failure is not None
    status, detail = lines.failure
    assert status == 400 and detail.startswith("Line 4 is not a StateChangeEvent")
    assert lines.feed(_line("a", "5")) == [] and lines.end() == []  # nothing after a failure


def test_a_line_longer_than_the_limit_is_413_without_waiting_for_its_end() -> None:
    lines = EventLines(limit=150)
    assert len(lines.feed(_line("a", "1"))) == 1
    assert lines.feed(b"x" * 100) == [] and lines.failure is None
    assert lines.feed(b"x" * 100) == []
    assert lines.failure == (413, "Line 2 is longer than 150 bytes")


def test_a_long_line_that_arrives_whole_in_one_piece_is_413_too() -> None:
    lines = EventLines(limit=150)
    got = lines.feed(_line("a", "1") + _line("a", "x" * 200) + _line("a", "3"))
    assert [e.typeStates["Email"] for e in got] == ["1"]
    assert lines.failure == (413, "Line 2 is longer than 150 bytes")


def test_a_bad_line_before_a_long_one_in_one_piece_is_named_by_its_own_number() -> None:
    lines = EventLines(limit=150)
    assert len(lines.feed(_line("a", "1"))) == 1
    got = lines.feed(_line("a", "2") + b"{nope}\n" + _line("a", "x" * 200))
    assert [e.typeStates["Email"] for e in got] == ["2"]
    assert lines.failure is not None and lines.failure[1].startswith("Line 3 is not a StateChangeEvent")
