"""Apache James's `StateChangeEvent` wire format (DESIGN.md §5) and its codec. No I/O here.

A body is one JSON object or an array of them (or, for HTTP injectors, NDJSON: one of those per line):
`{"type":"org.apache.james.jmap.change.StateChangeEvent","eventId":"<uuid>","username":"bob@domain.tld",
"typeStates":{"Mailbox":"<state>","Email":"<state>",...}}`. Older James versions write the states as
`mailboxState` / `emailState` / `vacationResponseState` / `emailDeliveryState` instead of `typeStates`.
Unknown type names inside `typeStates` are kept as they are (custom data types exist).
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from gateway import native
from gateway.errors import GatewayError

STATE_CHANGE_EVENT = "org.apache.james.jmap.change.StateChangeEvent"

_LEGACY_FIELDS = {
    "mailboxState": "Mailbox",
    "emailState": "Email",
    "vacationResponseState": "VacationResponse",
    "emailDeliveryState": "EmailDelivery",
}


class StateChangeEvent(msgspec.Struct, frozen=True, gc=False):
    """One account's new states: `username` owns the account; `typeStates` maps type name -> state."""

    username: str
    typeStates: dict[str, str]
    eventId: str = ""
    type: str = STATE_CHANGE_EVENT


class EventDecodeError(GatewayError):
    """The body is not a StateChangeEvent or an array of them (a poison message)."""


class _WireEvent(msgspec.Struct):
    type: str
    username: str
    eventId: str = ""
    typeStates: dict[str, str] | None = None
    mailboxState: str | None = None
    emailState: str | None = None
    vacationResponseState: str | None = None
    emailDeliveryState: str | None = None


_decoder = msgspec.json.Decoder(_WireEvent | list[_WireEvent])
_line_decoder = msgspec.json.Decoder(_WireEvent | list[_WireEvent])
_checks = native.load("_coalesce")  # json_too_deep, compiled when built
MAX_DEPTH = 16
_encoder = msgspec.json.Encoder()


def _from_wire(w: _WireEvent) -> StateChangeEvent:
    if w.type != STATE_CHANGE_EVENT:
        raise EventDecodeError(f"unknown event type {w.type!r}")
    if not w.username:
        raise EventDecodeError("empty username")
    states: dict[str, str] = dict(w.typeStates) if w.typeStates is not None else {}
    if w.typeStates is None:
        for field, type_name in _LEGACY_FIELDS.items():
            value = getattr(w, field)
            if value is not None:
                states[type_name] = value
    return StateChangeEvent(username=w.username, typeStates=states, eventId=w.eventId or str(uuid.uuid4()))


def decode_events(body: bytes | bytearray | memoryview) -> list[StateChangeEvent]:
    """Decode one event or an array of events; raise EventDecodeError for anything else."""
    # Events nest 3 deep; the decoder skips unknown members recursively, so deeper is refused unread.
    if _checks.json_too_deep(body, MAX_DEPTH):
        raise EventDecodeError(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        decoded: Any = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise EventDecodeError(str(exc)) from None
    items = decoded if isinstance(decoded, list) else [decoded]
    return [_from_wire(w) for w in items]


def decode_event_lines(body: bytes | bytearray | memoryview) -> list[StateChangeEvent]:
    """Decode newline-delimited JSON (NDJSON): each non-blank line one event or an array of them; raise
    EventDecodeError when any line is not."""
    if _checks.json_too_deep(body, MAX_DEPTH):
        raise EventDecodeError(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        decoded: list[Any] = _line_decoder.decode_lines(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EventDecodeError(str(exc)) from None
    out: list[StateChangeEvent] = []
    for item in decoded:
        if isinstance(item, list):
            out.extend(_from_wire(w) for w in item)
        else:
            out.append(_from_wire(item))
    return out


def encode_events(events: list[StateChangeEvent]) -> bytes:
    return _encoder.encode(events[0] if len(events) == 1 else events)


def new_event(username: str, type_states: dict[str, str]) -> StateChangeEvent:
    return StateChangeEvent(username=username, typeStates=type_states, eventId=str(uuid.uuid4()))
