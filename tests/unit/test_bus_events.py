"""James event decoding against hostile bodies (found by tests/fuzz): every one is an EventDecodeError."""

from __future__ import annotations

import pytest

from gateway.bus.events import EventDecodeError, decode_events

STATE_CHANGE = "org.apache.james.jmap.change.StateChangeEvent"


@pytest.mark.parametrize("body", [
    b'{"k":' * 5000 + b"1" + b"}" * 5000,  # unknown members are skipped recursively: RecursionError before
    b"[" * 100_000 + b"]" * 100_000,
    b'{"type":"' + STATE_CHANGE.encode() + b'","username":"bob","x":' + b"[" * 3000 + b"]" * 3000 + b"}",
])
def test_deep_bodies_are_poison_not_a_crash(body: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_events(body)


def test_a_james_event_still_decodes() -> None:
    (event,) = decode_events(b'{"type":"' + STATE_CHANGE.encode() + b'","username":"bob@example.com",'
                             b'"eventId":"e1","typeStates":{"Email":"s1"}}')
    assert event.username == "bob@example.com" and event.typeStates == {"Email": "s1"}
