"""Cuts the gateway's event path short at one stage, for bench/event_stages.py (never imported otherwise).

Python imports `sitecustomize` at start-up from the path; event_stages.py puts this directory on PYTHONPATH of the
gateway process it measures, with BENCH_STAGE naming where the event path ends:

- `wake`: the ingest reader's data_received returns at once (the loop's wake-up, the read, the call into Python);
- `decode`: the body is parsed (llhttp) and its lines decoded, but nothing is published;
- `frame`: events reach the hub, which writes one prebuilt StateChange frame to the account's sessions through its
  usual broadcast (the hub's state keeping and encoding are skipped);
- `full` (or unset): the gateway as it ships.

Since the usual event runs compiled from the read to the send (gateway._ingest, the Lane), `frame`, whose
handler is Python, costs more than `full` (2026-12-07, 10,000 accounts at 4,000 ev/s: 48.5 against 41.9 µs per
event): the stages add up only as far as `decode`, and `full` minus `decode` is the push's whole cost.

Benchmark scaffolding only: it replaces methods of the gateway's classes and knows their internals.
"""

from __future__ import annotations

import os
from typing import Any

STAGE = os.environ.get("BENCH_STAGE", "full")

if STAGE == "wake":
    from gateway.transport import ingest

    class _Dropping:
        """An ingest reader that drops every read (the stream is never answered: the benchmark ends it)."""

        def __init__(self, owner: Any, *args: Any, **kwargs: Any) -> None:
            self._owner = owner
            self.accepted = 0
            self.open = False

        def data_received(self, data: bytes) -> None:
            return None

        def eof_received(self) -> None:
            return None

        def connection_lost(self, exc: Exception | None) -> None:
            self._owner.finished = True

    ingest.impl = type("DroppingImpl", (), {"Reader": _Dropping})  # type: ignore[assignment]
elif STAGE == "decode":
    from gateway.bus import memory

    _init = memory.MemoryBus.__init__

    def _init_unpublished(self: Any) -> None:
        _init(self)
        self.publish_now = lambda events: None  # the reader decodes, and the events go nowhere

    memory.MemoryBus.__init__ = _init_unpublished  # type: ignore[method-assign]
elif STAGE == "frame":
    from gateway.fanout import hub

    _BODY = b'{"@type":"StateChange","changed":{"a":{"Email":"s1"}},"pushState":"' + b"p" * 300 + b'"}'

    def _prebuilt(self: Any, events: Any) -> None:
        for event in events:
            acc = self.account_id(event.username)
            for group in (self._index.get(acc) or {}).values():
                self._broadcast(group.targets, bytearray(hub.HEADROOM) + _BODY, None, acc, event.typeStates)

    _hub_init = hub.Hub.__init__

    def _init_prebuilt(self: Any, *args: Any, **kwargs: Any) -> None:
        _hub_init(self, *args, **kwargs)
        self.on_events = _prebuilt.__get__(self)  # the bus handler is set per hub (the Lane, or the batch path)

    hub.Hub.__init__ = _init_prebuilt  # type: ignore[method-assign]
