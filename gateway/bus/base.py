"""The event-bus port: how state changes reach this process, and the contract every adapter keeps.

Contract (every adapter documents how it meets it):
- Subscription is by username (the owner of an account, as in James's routing key
  `AccountIdRegistrationKey:<username>`). The hub calls `subscribe(u)` when the first local session needs u's
  events and `unsubscribe(u)` after the last such session has gone; calls are not counted by the bus, the hub
  keeps the reference count. An adapter may delay the real unbind to absorb reconnects.
- Delivery: `handler(events)` is called on the event loop thread, synchronously, with events in the order the
  bus received them; events of one username keep their publish order. One call may carry many events of many
  usernames (RabbitMQ: every event one socket read brought), so the hub can merge per account what arrived
  together. The handler never awaits and does not fail (the hub takes the events or drops them for lack of
  subscribers).
- At least once: a bus that takes events from a broker acknowledges them only after the handler has returned,
  so none is lost between broker and hub. A connection lost in between means a redelivery (a repeated state,
  harmless to clients) or a gap (below).
- A bus may lose events while it is disconnected (a gap). It then calls `on_gap()` once it is back, and the hub
  re-sends every push-enabled session what it may have missed, from the current states. A bus that knows whose
  events it may have lost (one upstream event stream was down) says so: `on_gap(usernames)`, and only their
  accounts are read again. A bus without gaps (memory) never calls it.
- A bus that reads events with its clients' own credentials (front mode's upstream event streams) may have the
  methods `principal_joined(username, principal)` and `principal_left(username, principal)`: the hub then calls
  them whenever a subscription covering an account of `username` is registered or removed (joined before the
  first `subscribe`, left before the last `unsubscribe`), so that the bus knows whose credentials it may use.
- `publish(events)` returns once the bus has accepted them (for RabbitMQ: publisher confirms). Every subscriber of
  a username on every node receives each published event exactly once while connected.
- A bus that delivers published events in this process, synchronously (memory; front mode's local injection),
  may have `publish_now(events)`: `publish` without a coroutine, same contract. Injectors call it when present
  (the ingest stream then pushes inside the read that brought the events: no task per batch).
- `wait_subscribed(usernames)` returns once events of those (subscribed) usernames reach this node.
- `ready` is False while the bus cannot deliver (e.g. the broker is away); `/readyz` reports it. A publish that
  cannot be accepted raises an `Unavailable` error (HTTP 503 for an injector).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from gateway.bus.events import StateChangeEvent

EventHandler = Callable[[Sequence[StateChangeEvent]], None]


class GapHandler(Protocol):
    """`on_gap()`: anything may have been lost; `on_gap(usernames)`: only events of these usernames."""

    def __call__(self, usernames: Collection[str] | None = None, /) -> None: ...


class Bus(Protocol):
    """A source and sink of StateChangeEvents shared by all gateway nodes (or just this process)."""

    @property
    def ready(self) -> bool: ...

    async def start(self, handler: EventHandler, on_gap: GapHandler) -> None:
        """Connect and begin delivering events of subscribed usernames to `handler`."""

    async def stop(self) -> None:
        """Stop delivering, release broker resources (this node's queue), close connections."""

    def subscribe(self, username: str) -> None:
        """Begin receiving `username`'s events on this node (idempotent)."""

    def unsubscribe(self, username: str) -> None:
        """Stop receiving `username`'s events on this node (idempotent; may be delayed)."""

    def bound(self, username: str) -> bool:
        """Whether events of `username` reach this node now (RabbitMQ: its binding is confirmed)."""

    async def wait_subscribed(self, usernames: Collection[str]) -> None:
        """Return once events of these subscribed usernames reach this node (RabbitMQ: their bindings are
        confirmed). The hub awaits it before reading current states, so that no change falls between the read
        and the first event; callers bound the wait."""

    async def publish(self, events: Sequence[StateChangeEvent]) -> None:
        """Publish events to every node subscribed to their usernames."""

    def counters(self) -> list[tuple[str, str, float]]:
        """(name, help, value) of the adapter's counters, exported as `gateway_bus_<name>` at scrape time."""
