"""Pure-Python twin of gateway._ingest (native/gateway/_ingest.pyx): the usual read of an ingest stream and the
memory bus's synchronous publish, with the same behaviour; the compiled module is the one that runs when built."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import httptools

from gateway._coalesce_py import json_too_deep


class Reader:
    """The protocol of one ingest connection: every read parsed here, the usual one also published here."""

    def __init__(self, owner: Any, lines: Any, publish: Callable[[list[Any]], None] | None, *,
                 decode: Callable[[bytes], list[Any]], max_depth: int) -> None:
        self._owner = owner
        self._lines = lines
        self._publish = publish
        self._decode = decode
        self._limit: int = lines.limit
        self._depth = max_depth
        self.body: list[bytes] = []
        self.complete = False
        self.open = True
        self.accepted = 0
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    def data_received(self, data: bytes) -> None:
        if not self.open:
            return
        if not self.complete and self.parser is not None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self._owner.malformed(exc)
        if not self._usual():
            self._owner.take()

    def eof_received(self) -> bool | None:
        result: bool | None = self._owner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        owner = self._owner
        self._owner = None
        self.parser = None
        owner.connection_lost(exc)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def _usual(self) -> bool:
        body = self.body
        count = [0]
        if not self.open or self._publish is None or self.complete or not body:
            return False
        lines = self._lines
        if lines.failure is not None or len(lines.pending) != 0:
            return False
        if len(body) == 1:
            events = self._lines_of(body[0], count)
            if events is None:
                return False
        else:
            events = []
            for piece in body:
                decoded = self._lines_of(piece, count)
                if decoded is None:
                    return False
                events.extend(decoded)
        if any(type(item) is list for item in events):
            events = _flat(events)
        lines.line = lines.line + count[0]
        body.clear()
        if not events:
            return True
        try:
            self._publish(events)
        except Exception as exc:
            self._owner.publish_failed(exc)
            return True
        self.accepted += len(events)
        return True

    def _lines_of(self, piece: bytes, count: list[int]) -> list[Any] | None:
        n = len(piece)
        if n == 0 or n > self._limit or piece[n - 1] != 0x0A:
            return None
        if json_too_deep(piece, self._depth):
            return None
        try:
            decoded = self._decode(piece)
        except Exception:
            return None
        count[0] += piece.count(b"\n")
        return decoded


def _flat(decoded: list[Any]) -> list[Any]:
    events: list[Any] = []
    for item in decoded:
        if type(item) is list:
            events.extend(item)
        else:
            events.append(item)
    return events


class Dispatch:
    """The memory bus's `publish_now`: the events of subscribed usernames go to `handler`."""

    def __init__(self, subscribed: set[str]) -> None:
        self._subscribed = subscribed
        self.handler: Callable[[Sequence[Any]], None] | None = None
        self.published = 0

    def __call__(self, events: Sequence[Any]) -> None:
        handler = self.handler
        if handler is None:
            return
        self.published += len(events)
        subscribed = self._subscribed
        if len(events) == 1:
            if events[0].username in subscribed:
                handler(events)
            return
        wanted = [e for e in events if e.username in subscribed]
        if wanted:
            handler(wanted)
