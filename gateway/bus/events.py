"""Apache James's `StateChangeEvent` wire format (DESIGN.md §5) and its codec. No I/O here.

A body is one JSON object or an array of them (or, for HTTP injectors, NDJSON: one of those per line):
`{"type":"org.apache.james.jmap.change.StateChangeEvent","eventId":"<uuid>","username":"bob@domain.tld",
"typeStates":{"Mailbox":"<state>","Email":"<state>",...}}`. Older James versions write the states as
`mailboxState` / `emailState` / `vacationResponseState` / `emailDeliveryState` instead of `typeStates`.
Unknown type names inside `typeStates` are kept as they are (custom data types exist).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Final, Literal

import msgspec

from gateway import native
from gateway.errors import GatewayError

STATE_CHANGE_EVENT: Final = "org.apache.james.jmap.change.StateChangeEvent"

_LEGACY_FIELDS = {
    "mailboxState": "Mailbox",
    "emailState": "Email",
    "vacationResponseState": "VacationResponse",
    "emailDeliveryState": "EmailDelivery",
}


class StateChangeEvent(msgspec.Struct, frozen=True, gc=False):
    """One account's new states: `username` owns the account; `typeStates` maps type name -> state.

    Bodies decode straight into it, and the constraints below are checked by msgspec while it decodes: a
    `type` other than James's, or an empty `username`, fails the decode (a body without `type` is taken as a
    StateChangeEvent: it has no other reading). `eventId` stays empty when the body has none; `encode_events`
    gives such events a fresh one, because James's nodes need it.
    """

    username: Annotated[str, msgspec.Meta(min_length=1)]
    typeStates: dict[str, str]
    eventId: str = ""
    type: Literal["org.apache.james.jmap.change.StateChangeEvent"] = STATE_CHANGE_EVENT


class EventDecodeError(GatewayError):
    """The body is not a StateChangeEvent or an array of them (a poison message)."""


class _LegacyEvent(msgspec.Struct):
    """Older James versions: one field per type instead of `typeStates` (read only when `typeStates` is absent)."""

    username: Annotated[str, msgspec.Meta(min_length=1)]
    type: Literal["org.apache.james.jmap.change.StateChangeEvent"] = STATE_CHANGE_EVENT
    eventId: str = ""
    typeStates: dict[str, str] | None = None
    mailboxState: str | None = None
    emailState: str | None = None
    vacationResponseState: str | None = None
    emailDeliveryState: str | None = None


# Public because gateway._ingest decodes the usual read of a stream with it (the same decode as decode_event_lines).
DECODER: Final = msgspec.json.Decoder(StateChangeEvent | list[StateChangeEvent])
_legacy_decoder = msgspec.json.Decoder(_LegacyEvent | list[_LegacyEvent])
_checks = native.load("_coalesce")  # json_too_deep, compiled when built
# Events nest 3 deep; msgspec skips unknown members recursively, so a deeper body is refused unread (a hostile
# one would otherwise reach the interpreter's recursion limit inside the decoder).
MAX_DEPTH = 16
_encoder = msgspec.json.Encoder()


def _from_legacy(w: _LegacyEvent) -> StateChangeEvent:
    if w.typeStates is not None:
        return StateChangeEvent(username=w.username, typeStates=w.typeStates, eventId=w.eventId)
    states: dict[str, str] = {}
    for field, type_name in _LEGACY_FIELDS.items():
        value = getattr(w, field)
        if value is not None:
            states[type_name] = value
    return StateChangeEvent(username=w.username, typeStates=states, eventId=w.eventId)


def decode_body(body: bytes | bytearray | memoryview) -> StateChangeEvent | list[StateChangeEvent]:
    """Decode one event (returned as it is) or an array of events; raise EventDecodeError for anything else.

    The common body costs one msgspec decode into the Struct the hub takes; only a body that fails it (an
    older James's fields, or not an event at all) is decoded a second time with the legacy fields.
    """
    if _checks.json_too_deep(body, MAX_DEPTH):
        raise EventDecodeError(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        decoded: StateChangeEvent | list[StateChangeEvent] = DECODER.decode(body)
        return decoded
    except msgspec.ValidationError:
        pass  # JSON, but not this shape: perhaps an older James's fields
    except msgspec.DecodeError as exc:
        raise EventDecodeError(str(exc)) from None  # not JSON: no second reading can help
    try:
        legacy: Any = _legacy_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise EventDecodeError(str(exc)) from None
    if isinstance(legacy, list):
        return [_from_legacy(w) for w in legacy]
    return _from_legacy(legacy)


def decode_events(body: bytes | bytearray | memoryview) -> list[StateChangeEvent]:
    """Decode one event or an array of events into a list; raise EventDecodeError for anything else."""
    decoded = decode_body(body)
    return decoded if isinstance(decoded, list) else [decoded]


def decode_event_lines(body: bytes | bytearray | memoryview) -> list[StateChangeEvent]:
    """Decode newline-delimited JSON (NDJSON): each non-blank line one event or an array of them; raise
    EventDecodeError when any line is not."""
    if _checks.json_too_deep(body, MAX_DEPTH):
        raise EventDecodeError(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        decoded: list[Any] = DECODER.decode_lines(body)
    except msgspec.ValidationError:
        try:
            decoded = [_legacy(item) for item in _legacy_decoder.decode_lines(body)]
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise EventDecodeError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise EventDecodeError(str(exc)) from None
    for item in decoded:
        if type(item) is list:
            break
    else:
        return decoded  # the usual body: one event per line, already the list to hand on
    out: list[StateChangeEvent] = []
    for item in decoded:
        if isinstance(item, list):
            out.extend(item)
        else:
            out.append(item)
    return out


class EventLines:
    """An NDJSON body read as it arrives (sans-I/O): `feed` each piece, get the events of its complete lines as
    one batch; `end()` takes a last line without its newline.

    A line that is no event, or longer than `limit` bytes, stops the body: `failure` is then set (HTTP status and
    a detail naming the line), and the events of the lines before it are still returned, so that they can be
    published as the answer promises. Nothing is accepted after a failure."""

    # Public fields: gateway._ingest's Reader takes the usual piece itself when nothing is pending and nothing
    # failed, and counts its lines in `line`.
    __slots__ = ("failure", "limit", "line", "pending")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pending = bytearray()
        self.line = 0  # lines taken so far (for the number in a failure's detail)
        self.failure: tuple[int, str] | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[StateChangeEvent]:
        if self.failure is not None:
            return []
        pending = self.pending
        if not pending and isinstance(data, bytes) and data.endswith(b"\n") and len(data) <= self.limit:
            # The usual piece of a stream: whole lines, nothing held back, none over the limit.
            first = self.line
            self.line = first + data.count(b"\n")
            try:
                return decode_event_lines(data)
            except EventDecodeError:
                return self._decode_from(data, first)  # find the bad line
        pending += data
        end = pending.rfind(b"\n")
        if end < 0:
            if len(pending) > self.limit:
                self.failure = (413, f"Line {self.line + 1} is longer than {self.limit} bytes")
            return []
        if end == len(pending) - 1:
            lines = bytes(pending)
            pending.clear()
        else:
            lines = bytes(pending[:end + 1])
            del pending[:end + 1]
        return self._decode(lines)

    def end(self) -> list[StateChangeEvent]:
        """The body is complete: the events of a last line without a newline."""
        if self.failure is not None or not self.pending.strip():
            return []
        lines, self.pending = bytes(self.pending), bytearray()
        return self._decode(lines)

    def _decode(self, lines: bytes) -> list[StateChangeEvent]:
        first = self.line
        self.line += lines.count(b"\n")
        if len(lines) > self.limit:
            # Lines that came whole in one piece larger than the limit: each is still held to it.
            parts = lines.split(b"\n")
            long = next((i for i, part in enumerate(parts) if len(part) > self.limit), None)
            if long is not None:
                good = self._decode_from(b"\n".join(parts[:long]), first) if long else []
                self.failure = self.failure or (413, f"Line {first + long + 1} is longer than {self.limit} bytes")
                return good
        return self._decode_from(lines, first)

    def _decode_from(self, lines: bytes, first: int) -> list[StateChangeEvent]:
        """The events of `lines` (the first of them line `first + 1` of the body), up to a bad line."""
        try:
            return decode_event_lines(lines)
        except EventDecodeError:
            pass
        # Rare: find the bad line, so that the lines before it are published as promised.
        good: list[StateChangeEvent] = []
        for number, line in enumerate(lines.split(b"\n"), first + 1):
            try:
                good.extend(decode_event_lines(line))
            except EventDecodeError as exc:
                self.failure = (400, f"Line {number} is not a StateChangeEvent or an array of them: {exc}")
                break
        return good


def _legacy(item: _LegacyEvent | list[_LegacyEvent]) -> StateChangeEvent | list[StateChangeEvent]:
    return [_from_legacy(w) for w in item] if isinstance(item, list) else _from_legacy(item)


def encode_events(events: list[StateChangeEvent]) -> bytes:
    """One event as an object, several as an array (James reads both); events without an eventId get one."""
    if not all(e.eventId for e in events):
        events = [e if e.eventId else msgspec.structs.replace(e, eventId=str(uuid.uuid4())) for e in events]
    return _encoder.encode(events[0] if len(events) == 1 else events)


def new_event(username: str, type_states: dict[str, str]) -> StateChangeEvent:
    return StateChangeEvent(username=username, typeStates=type_states, eventId=str(uuid.uuid4()))
