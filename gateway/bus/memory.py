"""The embedded in-process bus (GATEWAY_BUS=memory): publish delivers synchronously to this process's hub.

It meets the port's contract trivially: no gaps, publish order is delivery order, always ready. Only events for
subscribed usernames are handed on, exactly as a broker with per-node bindings would do.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from gateway import native
from gateway.bus.base import EventHandler, GapHandler
from gateway.bus.events import StateChangeEvent

impl = native.load("_ingest")  # Dispatch, compiled when built (tests run both modules by replacing it)


class MemoryBus:
    # `publish` without a coroutine (the port's optional synchronous publish): the ingest stream's path. A
    # compiled callable (gateway._ingest.Dispatch), so that an ingest read reaches the hub with no Python frame.
    publish_now: Callable[[Sequence[StateChangeEvent]], None]

    def __init__(self) -> None:
        self._subscribed: set[str] = set()
        self._dispatch = impl.Dispatch(self._subscribed)
        self.publish_now = self._dispatch

    @property
    def published_events(self) -> int:
        published: int = self._dispatch.published
        return published

    @property
    def ready(self) -> bool:
        return self._dispatch.handler is not None

    async def start(self, handler: EventHandler, on_gap: GapHandler) -> None:
        self._dispatch.handler = handler

    async def stop(self) -> None:
        self._dispatch.handler = None

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

    def counters(self) -> list[tuple[str, str, float]]:
        return [("published_events", "Events published on the bus", self.published_events)]
