"""The embedded in-process bus (GATEWAY_BUS=memory): publish delivers synchronously to this process's hub.

It meets the port's contract trivially: no gaps, publish order is delivery order, always ready. Only events for
subscribed usernames are handed on, exactly as a broker with per-node bindings would do.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from gateway.bus.base import EventHandler, GapHandler
from gateway.bus.events import StateChangeEvent


class MemoryBus:
    def __init__(self) -> None:
        self._handler: EventHandler | None = None
        self._subscribed: set[str] = set()
        self.published_events = 0

    @property
    def ready(self) -> bool:
        return self._handler is not None

    async def start(self, handler: EventHandler, on_gap: GapHandler) -> None:
        self._handler = handler

    async def stop(self) -> None:
        self._handler = None

    def subscribe(self, username: str) -> None:
        self._subscribed.add(username)

    def unsubscribe(self, username: str) -> None:
        self._subscribed.discard(username)

    def bound(self, username: str) -> bool:
        return True  # a subscription takes effect at once

    async def wait_subscribed(self, usernames: Collection[str]) -> None:
        return None  # a subscription takes effect at once

    def is_subscribed(self, username: str) -> bool:
        return username in self._subscribed

    async def publish(self, events: Sequence[StateChangeEvent]) -> None:
        self.publish_now(events)

    def publish_now(self, events: Sequence[StateChangeEvent]) -> None:
        """`publish` without a coroutine (the port's optional synchronous publish): the ingest stream's path."""
        handler = self._handler
        if handler is None:
            return
        self.published_events += len(events)
        subscribed = self._subscribed
        if len(events) == 1:  # the usual read of an ingest stream: no filtered copy
            if events[0].username in subscribed:
                handler(events)
            return
        wanted = [e for e in events if e.username in subscribed]
        if wanted:
            handler(wanted)

    def counters(self) -> list[tuple[str, str, float]]:
        return [("published_events", "Events published on the bus", self.published_events)]
