"""The ingest stream's Reader (gateway._ingest, compiled, and its twin): the usual read taken in C publishes what the
protocol's own path would, batch for batch, and hands every other read on.

The reference is the same IngestProtocol whose reader is given no synchronous publish, so that the lines of every
read go through the protocol's Python path (`take`), as before the Reader; a property compares the two over random
streams
(good, legacy, array, blank, deep, over-long and broken lines; lines and chunks cut anywhere; reads split anywhere;
bodies ended, cut short or malformed). The transport is a recorder: the sockets are in tests/e2e/test_ingest.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.bus import memory
from gateway.bus.events import DECODER, MAX_DEPTH, STATE_CHANGE_EVENT, StateChangeEvent
from gateway.errors import Unavailable
from gateway.logs import ClientMistakes
from gateway.transport import ingest
from tests.native_impl import load_impl

LIMIT = 300
USERS = ("alice@x", "bob@x", "carol@x")  # carol is not subscribed: the bus filters her events


class Transport:
    """What the protocol writes and whether it closed the connection."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.reading = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class Run:
    """One stream read by one IngestProtocol on a memory bus whose handler records the batches."""

    def __init__(self, module: ModuleType, *, fast: bool, fail_publish: bool = False) -> None:
        self.batches: list[list[tuple[str, dict[str, str], str]]] = []
        self.transport = Transport()
        self._fail_publish = fail_publish
        bus = memory.MemoryBus()
        for user in USERS[:2]:
            bus.subscribe(user)
        self.bus = bus
        bus._dispatch.handler = self._record
        self.service = ingest.IngestService(bus, "token", LIMIT, ClientMistakes(logging.getLogger("test")),
                                            lambda route, status: None)
        self.proto = ingest.IngestProtocol(self.service, self.transport)  # type: ignore[arg-type]
        self.service.streams.add(self.proto)
        if not fast:  # the reference: the reader only parses, the protocol's `take` publishes every read's lines
            self.proto.reader = ingest.impl.Reader(self.proto, self.proto._lines, None, decode=DECODER.decode_lines,
                                                   max_depth=MAX_DEPTH)
        # The module under test reads the stream and filters the bus.
        assert type(self.proto.reader).__module__ == type(bus._dispatch).__module__ == module.__name__

    def _record(self, events: Any) -> None:
        if self._fail_publish and len(self.batches) == 1:
            raise Unavailable("The bus is away.")
        self.batches.append([(e.username, dict(e.typeStates), e.eventId) for e in events])

    def feed(self, reads: list[bytes], eof: bool) -> None:
        self.proto.start(reads[0])
        for data in reads[1:]:
            self.proto.reader.data_received(data)
        if eof:
            self.proto.reader.eof_received()

    def outcome(self) -> tuple[Any, ...]:
        return (self.batches, bytes(self.transport.written), self.proto.accepted, self.proto.finished)


@pytest.fixture(params=["native", "python"])
def module(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    impl = load_impl("_ingest", request.param)
    monkeypatch.setattr(ingest, "impl", impl)
    monkeypatch.setattr(memory, "impl", impl)
    return impl


def event(user: str, n: int) -> dict[str, Any]:
    return {"type": STATE_CHANGE_EVENT, "username": user, "eventId": f"e{n}", "typeStates": {"Email": f"s{n}"}}


HEAD = b"POST /admin/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 99))
    user = draw(st.sampled_from(USERS))
    kind = draw(st.sampled_from(["event"] * 24 + ["array", "legacy", "blank", "bad", "deep", "long", "other"]))
    if kind == "event":
        return json.dumps(event(user, n)).encode()
    if kind == "array":
        return json.dumps([event(user, n), event(USERS[0], n + 1)]).encode()
    if kind == "legacy":
        return json.dumps({"type": STATE_CHANGE_EVENT, "username": user, "emailState": f"l{n}"}).encode()
    if kind == "blank":
        return b""
    if kind == "bad":
        return b'{"username": "' + user.encode() + b'", "typeStates": 1}'
    if kind == "deep":
        return b"[" * 20 + b"]" * 20
    if kind == "long":
        return json.dumps(event(user, n) | {"pad": "x" * LIMIT}).encode()
    return b"not json"


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    """The reads of one stream (the first one holds the head), and whether the client then ends its side.

    Mostly as injectors write: chunks of whole lines, a read per chunk (the Reader's usual read); else lines and
    chunks cut anywhere, reads split anywhere, a body cut short or with malformed framing."""
    body_lines = [line + b"\n" for line in draw(st.lists(lines(), max_size=8))]
    if body_lines and draw(st.integers(0, 3)) == 0:  # no newline after the last line
        body_lines[-1] = body_lines[-1][:-1]
    body = b"".join(body_lines)
    framing = draw(st.sampled_from(["chunked"] * 4 + ["length", "malformed"]))
    if framing == "length":
        parts = [HEAD + b"Content-Length: %d\r\n\r\n" % len(body), *body_lines]
    else:
        ends = [len(b"".join(body_lines[:k + 1])) for k in range(len(body_lines))]
        at_line_ends = bool(ends) and draw(st.integers(0, 3)) > 0
        cut = st.sampled_from(ends) if at_line_ends else st.integers(0, len(body))
        cuts = sorted(set(draw(st.lists(cut, max_size=8))))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        parts = [HEAD + b"Transfer-Encoding: chunked\r\n\r\n"]
        for i, piece in enumerate(pieces):
            if piece:
                parts.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            if framing == "malformed" and i == len(pieces) // 2:
                parts.append(b"zz\r\n")
        parts.append(b"0\r\n\r\n")
    raw = b"".join(parts)
    if draw(st.integers(0, 3)) == 0:
        raw = raw[:draw(st.integers(len(HEAD), len(raw)))]  # cut short
    if draw(st.booleans()):  # a read per part or per few parts, as an injector's writes usually arrive
        reads: list[bytes] = []
        total = 0
        for part in parts:
            piece = raw[total:total + len(part)]
            if len(reads) > 1 and draw(st.booleans()):
                reads[-1] += piece  # several chunks in one read
            else:
                reads.append(piece)
            total += len(part)
    else:
        splits = sorted(draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=8)))
        reads = [raw[a:b] for a, b in zip([0, *splits], [*splits, len(raw)], strict=True)]
    return [r for r in reads if r] or [raw], draw(st.booleans())


def test_the_usual_read_is_taken_by_the_reader(module: ModuleType) -> None:
    async def scenario() -> None:
        run = Run(module, fast=True)
        run.proto.start(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        taken: list[str] = []
        run.proto.take = lambda: taken.append("take")  # type: ignore[method-assign]
        for n in range(3):
            line = json.dumps(event(USERS[n % 2], n)).encode() + b"\n"
            run.proto.reader.data_received(b"%x\r\n%s\r\n" % (len(line), line))
        two = b"".join(json.dumps(event(USERS[0], n)).encode() + b"\n" for n in (3, 4))
        run.proto.reader.data_received(b"%x\r\n%s\r\n" % (len(two), two) * 2)  # two chunks in one read
        assert taken == []  # no read went to the protocol's Python path
        assert [[e[2] for e in b] for b in run.batches] == [["e0"], ["e1"], ["e2"], ["e3", "e4", "e3", "e4"]]
        assert run.proto.accepted == 7
        run.proto.reader.data_received(b"5\r\n{\"use\r\n")  # a partial line: the protocol's path
        assert taken == ["take"]

    asyncio.run(scenario())


def test_a_failed_stream_drops_what_follows(module: ModuleType) -> None:
    async def scenario() -> None:
        run = Run(module, fast=True)
        run.proto.start(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        run.proto.reader.data_received(b"zz\r\n")  # malformed framing: the stream fails and lingers
        assert run.proto.finished and not run.proto.reader.open
        assert run.transport.written.startswith(b"HTTP/1.1 400 ")
        line = json.dumps(event(USERS[0], 1)).encode() + b"\n"
        run.proto.reader.data_received(b"%x\r\n%s\r\n" % (len(line), line))
        assert run.batches == []  # nothing is accepted after the answer

    asyncio.run(scenario())


def test_a_bus_that_refuses_is_answered_with_its_problem(module: ModuleType) -> None:
    async def scenario() -> None:
        run = Run(module, fast=True, fail_publish=True)
        run.proto.start(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        for n in range(2):
            line = json.dumps(event(USERS[0], n)).encode() + b"\n"
            run.proto.reader.data_received(b"%x\r\n%s\r\n" % (len(line), line))
        assert run.transport.written.startswith(b"HTTP/1.1 503 ")
        assert run.proto.finished and run.proto.accepted == 1

    asyncio.run(scenario())


def test_a_bug_in_the_handler_is_raised_not_answered(module: ModuleType) -> None:
    async def scenario() -> None:
        run = Run(module, fast=True)
        run.bus._dispatch.handler = lambda events: 1 / 0
        run.proto.start(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        line = json.dumps(event(USERS[0], 1)).encode() + b"\n"
        with pytest.raises(ZeroDivisionError):
            run.proto.reader.data_received(b"%x\r\n%s\r\n" % (len(line), line))
        assert run.transport.written == b""  # the loop closes such a transport; no answer claims anything

    asyncio.run(scenario())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=streams())
def test_the_reader_publishes_what_the_protocols_path_does(module: ModuleType,
                                                          stream: tuple[list[bytes], bool]) -> None:
    reads, eof = stream

    async def outcome(fast: bool) -> tuple[Any, ...]:
        run = Run(module, fast=fast)
        run.feed(reads, eof)
        return run.outcome()

    assert asyncio.run(outcome(True)) == asyncio.run(outcome(False))


def test_dispatch_filters_unsubscribed_usernames_and_counts_all(module: ModuleType) -> None:
    seen: list[list[str]] = []
    dispatch = module.Dispatch({"a"})
    dispatch([StateChangeEvent(username="a", typeStates={})])  # stopped: nothing goes anywhere, nothing counted
    assert dispatch.published == 0
    dispatch.handler = lambda events: seen.append([e.username for e in events])
    dispatch([StateChangeEvent(username="a", typeStates={})])
    dispatch([StateChangeEvent(username="b", typeStates={})])
    dispatch([StateChangeEvent(username=u, typeStates={}) for u in ("b", "a", "a")])
    dispatch([StateChangeEvent(username=u, typeStates={}) for u in ("b", "c")])
    assert seen == [["a"], ["a", "a"]] and dispatch.published == 7
