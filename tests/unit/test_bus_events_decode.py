"""James's StateChangeEvent decode path of the RabbitMQ bus: what decodes, into what, what is poison, and that
publishing round-trips (the codec's properties are in test_bus_events.py)."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.bus.events import (
    STATE_CHANGE_EVENT,
    EventDecodeError,
    StateChangeEvent,
    decode_body,
    decode_events,
    encode_events,
    new_event,
)

BOB = "bob@example.com"


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def test_one_object_decodes_into_the_struct_the_hub_takes() -> None:
    raw = body({"type": STATE_CHANGE_EVENT, "eventId": "e1", "username": BOB,
                "typeStates": {"Email": "s1", "urn:example:Calendar": "c1"}})
    decoded = decode_body(raw)
    # One object comes back as it is, not wrapped: the bus's hot path appends it to the batch.
    assert isinstance(decoded, StateChangeEvent)
    assert decoded == StateChangeEvent(username=BOB, typeStates={"Email": "s1", "urn:example:Calendar": "c1"},
                                       eventId="e1")
    assert decode_events(raw) == [decoded]


def test_an_array_keeps_its_order_and_may_be_empty() -> None:
    events = [{"type": STATE_CHANGE_EVENT, "eventId": f"e{i}", "username": BOB, "typeStates": {"Email": str(i)}}
              for i in range(3)]
    assert [e.eventId for e in decode_events(body(events))] == ["e0", "e1", "e2"]
    assert decode_events(b"[]") == []


def test_legacy_fields_are_read_when_typeStates_is_absent() -> None:
    legacy = {"type": STATE_CHANGE_EVENT, "eventId": "l1", "username": BOB, "mailboxState": "m",
              "emailState": "e", "vacationResponseState": "v", "emailDeliveryState": "d"}
    modern = {"type": STATE_CHANGE_EVENT, "eventId": "n1", "username": BOB, "typeStates": {"Email": "x"},
              "emailState": "ignored"}
    old, new = decode_events(body([legacy, modern]))
    assert old.typeStates == {"Mailbox": "m", "Email": "e", "VacationResponse": "v", "EmailDelivery": "d"}
    assert old.eventId == "l1"
    assert new.typeStates == {"Email": "x"}  # typeStates wins over a legacy field
    null_states = {"type": STATE_CHANGE_EVENT, "username": BOB, "typeStates": None, "emailState": "e"}
    assert decode_events(body(null_states))[0].typeStates == {"Email": "e"}


def test_absent_eventId_stays_empty_and_publishing_gives_one() -> None:
    decoded = decode_events(body({"type": STATE_CHANGE_EVENT, "username": BOB, "typeStates": {"Email": "1"}}))
    assert decoded[0].eventId == ""  # no uuid4 per consumed event: nothing downstream reads it
    kept = new_event(BOB, {"Mailbox": "2"})
    sent = json.loads(encode_events([decoded[0], kept]))
    assert str(uuid.UUID(sent[0]["eventId"])) == sent[0]["eventId"]  # James's nodes need a UUID there
    assert sent[1]["eventId"] == kept.eventId


def test_a_body_without_type_is_read_as_a_state_change_event() -> None:
    # Documented leniency: the shape has no other reading; any other `type` is poison.
    assert decode_events(body({"username": BOB, "typeStates": {"Email": "1"}}))[0].typeStates == {"Email": "1"}


POISON = {
    "not-json": b"this is not json",
    "not-utf8": b"\xff\xfe{",
    "json-string": b'"just a string"',
    "unknown-type": body({"type": "org.apache.james.events.MailboxAdded", "username": BOB}),
    "empty-username": body({"type": STATE_CHANGE_EVENT, "username": "", "typeStates": {}}),
    "username-not-string": body({"type": STATE_CHANGE_EVENT, "username": 42, "typeStates": {}}),
    "typeStates-not-object": body({"type": STATE_CHANGE_EVENT, "username": BOB, "typeStates": ["Email"]}),
    "state-not-string": body({"type": STATE_CHANGE_EVENT, "username": BOB, "typeStates": {"Email": 3}}),
    "array-with-one-bad": body([{"type": STATE_CHANGE_EVENT, "username": BOB, "typeStates": {"Email": "1"}},
                                {"type": "bogus", "username": BOB}]),
    "legacy-with-bad-type": body({"type": "bogus", "username": BOB, "emailState": "e"}),
}


@pytest.mark.parametrize("raw", POISON.values(), ids=POISON.keys())
def test_poison(raw: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_body(raw)


names = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=12)
events = st.builds(StateChangeEvent, username=names, typeStates=st.dictionaries(names, st.text(max_size=8),
                                                                                max_size=4),
                   eventId=st.uuids().map(str))


@given(st.lists(events, min_size=1, max_size=5))
def test_what_the_bus_publishes_decodes_to_the_same_events(published: list[StateChangeEvent]) -> None:
    assert decode_events(encode_events(published)) == published


@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_are_poison(raw: bytes) -> None:
    try:
        decoded = decode_events(raw)
    except EventDecodeError:
        return
    assert all(isinstance(e, StateChangeEvent) and e.username for e in decoded)
