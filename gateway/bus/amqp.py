"""The RabbitMQ adapter of the bus port (GATEWAY_BUS=amqp), wire-compatible with Apache James's event bus.

It speaks James's format (DESIGN.md §5): direct durable exchange `jmapEvent-exchange`, routing key
`AccountIdRegistrationKey:<username>`, header `eventBusId`, `text/plain` StateChangeEvent JSON bodies. It is
not a general AMQP client and does not interpret events beyond decoding them; the hub decides who gets what.

Decisions (how this adapter keeps the contract of `gateway.bus.base`):

- One queue per node (process), `jmapEvent-eventbus-<node_id>`, never one per session. It must vanish with
  the node. A classic queue is declared `exclusive`: the broker deletes it when the connection closes or
  dies, so a crashed node leaves nothing behind (and no other connection can consume it). Quorum queues
  cannot be exclusive or auto-delete, so with GATEWAY_AMQP_QUEUE_TYPE=quorum the queue is durable with
  `x-expires` (QUORUM_QUEUE_EXPIRES_MS): the broker deletes it once it has had no consumer for that long.
  stop() deletes it either way.
- Our own events come back through the broker. James delivers a node's own events to its local listeners
  directly and drops the broker's echo by comparing `eventBusId`. We don't: `publish()` only sends, and
  every local session receives the event from this node's queue like any other node's sessions. One path for
  every event gives exactly-once delivery per subscriber and one order per username (the queue's order)
  without merging two streams. The cost is one broker round trip for local events, and a publish while the
  broker is away raises `BusUnavailableError` instead of reaching local sessions; the hub's gap resync
  (`on_gap`) after the reconnection brings those sessions up to date. We still write `eventBusId` so that
  James nodes, which do filter on it, see a foreign bus id and deliver our events.
- Bindings are owned here, not by aio-pika's robust bookkeeping: the desired set (`subscribe`d usernames
  plus those waiting out GATEWAY_AMQP_UNBIND_DELAY) is reconciled with the broker by one task, so binds and
  unbinds of a username are applied in order and never race. Binds are pipelined (`nowait`) and confirmed by
  one synchronous call per batch, so re-binding thousands of usernames after a reconnection takes a few
  round trips.
- After the robust connection comes back (aio-pika re-declares exchange, queue, QoS and consumer), every
  wanted username is bound again and every possibly stale binding is removed; only then is the bus `ready`
  again and `on_gap()` called once: events routed while we were away were lost with the old exclusive queue.
- Exactly once "while connected": a message is acknowledged after the handler has been called, so it is
  never lost between broker and hub; if a channel dies between the two, the broker redelivers it (a repeated
  state, harmless to clients). A message that is not a StateChangeEvent is rejected without requeue and
  counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    AbstractRobustQueue,
    ConsumerTag,
)
from aio_pika.connection import make_url
from yarl import URL

from gateway.bus.base import EventHandler, GapHandler
from gateway.bus.events import EventDecodeError, StateChangeEvent, decode_events, encode_events
from gateway.config import Settings
from gateway.errors import Unavailable

log = logging.getLogger(__name__)

ROUTING_KEY_PREFIX = "AccountIdRegistrationKey:"
QUEUE_NAME_PREFIX = "jmapEvent-eventbus-"
EVENT_BUS_ID_HEADER = "eventBusId"
# Long enough to ride out a broker restart or a network blip (the queue and its bindings survive, nothing is
# lost), short enough that a vanished node's queue does not collect events for long.
QUORUM_QUEUE_EXPIRES_MS = 60_000
# AMQP shortstr limit for routing keys.
_MAX_ROUTING_KEY_BYTES = 255
# Binding changes sent before one confirming round trip.
_BATCH = 500


class BusUnavailableError(Unavailable):
    """The broker cannot be reached: at start (after a bounded wait), or for a publish while disconnected."""


def routing_key(username: str) -> str:
    """James's routing key for a username's events (the plain username, not the accountId)."""
    return ROUTING_KEY_PREFIX + username


class AmqpBus:
    """One bus node: a queue of its own on the shared exchange, bound to the usernames with local sessions."""

    def __init__(
        self,
        settings: Settings,
        node_id: str,
        *,
        start_timeout: float = 10.0,
        op_timeout: float = 10.0,
        reconnect_interval: float = 5.0,
        retry_delay: float = 1.0,
    ) -> None:
        if not settings.amqp_url:
            raise ValueError("GATEWAY_AMQP_URL is required for the amqp bus")
        self._settings = settings
        self._url: str = settings.amqp_url
        self.node_id = node_id
        self.queue_name = QUEUE_NAME_PREFIX + node_id
        self.exchange_name = settings.amqp_exchange
        self.connection_name = f"{settings.amqp_connection_name}-{node_id}"
        self._start_timeout = start_timeout
        self._op_timeout = op_timeout
        self._reconnect_interval = reconnect_interval
        self._retry_delay = retry_delay

        # Counters exported as metrics (plain ints, read by the composition root).
        self.received_events = 0
        self.poison_messages = 0
        self.published_events = 0
        self.reconnects = 0

        self._handler: EventHandler | None = None
        self._on_gap: GapHandler | None = None
        self._conn: AbstractRobustConnection | None = None
        # Strong references: the robust connection keeps its channels in a WeakSet (restores only live ones).
        self._control: AbstractRobustChannel | None = None
        self._publish_channel: AbstractRobustChannel | None = None
        self._consume_channel: AbstractRobustChannel | None = None
        self._exchange: AbstractRobustExchange | None = None
        self._queue: AbstractRobustQueue | None = None
        self._consumer_tag: ConsumerTag | None = None
        self._online = False  # the connection and its channels are up
        self._epoch = 0  # counts connection losses: a change confirmed across one proves nothing
        self._ready = False  # online and every wanted binding confirmed
        self._stopping = False

        self._wanted: set[str] = set()  # should be bound now
        self._bound: set[str] = set()  # bound, confirmed by the broker
        # May or may not be bound: a change in flight or failed, or the connection was lost.
        self._uncertain: set[str] = set()
        self._dirty: dict[str, None] = {}  # usernames to reconcile, in arrival order
        self._unbind_timers: dict[str, asyncio.TimerHandle] = {}
        self._bind_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._reconciler: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None

    # --- the port ---------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self, handler: EventHandler, on_gap: GapHandler) -> None:
        """Connect, declare, consume, bind; raise BusUnavailableError within `start_timeout` if we cannot."""
        if self._conn is not None:
            raise RuntimeError("AmqpBus already started")
        self._handler = handler
        self._on_gap = on_gap
        self._stopping = False
        url = make_url(
            self._url,
            heartbeat=self._settings.amqp_heartbeat,
            reconnect_interval=self._reconnect_interval,
        )
        # Built by hand rather than with connect_robust(): if the first attempt times out we must still hold
        # the connection to close it, or its reconnection task would keep trying in the background.
        conn = aio_pika.RobustConnection(url, client_properties={"connection_name": self.connection_name})
        self._conn = conn
        try:
            async with asyncio.timeout(self._start_timeout):
                await conn.connect(timeout=self._start_timeout)
                await self._declare(conn)
                conn.close_callbacks.add(self._on_connection_lost)
                conn.reconnect_callbacks.add(self._on_reconnected)
                self._online = conn.connected.is_set()
                self._reconciler = asyncio.create_task(
                    self._reconcile_loop(), name=f"amqp-bindings-{self.node_id}")
                for username in self._wanted:
                    self._mark(username)
                await self.settled()
        except Exception as exc:
            await self.stop()
            why = f"no answer within {self._start_timeout:g}s" if isinstance(exc, TimeoutError) else repr(exc)
            raise BusUnavailableError(
                f"cannot set up the RabbitMQ bus at {_censor(self._url)}: {why}") from exc
        self._ready = True
        log.info("amqp bus node %s consuming %s on exchange %s",
                 self.node_id, self.queue_name, self.exchange_name)

    async def stop(self) -> None:
        """Stop consuming, delete this node's queue (if the broker is there), close the connection."""
        conn = self._conn
        if conn is None:
            return
        self._stopping = True
        self._ready = False
        for timer in self._unbind_timers.values():
            timer.cancel()
        self._unbind_timers.clear()
        for task in (self._recovery, self._reconciler):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._recovery = self._reconciler = None
        queue = self._queue
        if self._online and queue is not None:
            try:
                async with asyncio.timeout(self._op_timeout):
                    # Cancel first so that nothing more is delivered while the queue goes away.
                    if self._consumer_tag is not None:
                        await queue.cancel(self._consumer_tag)
                    await queue.delete(if_unused=False, if_empty=False)
            except Exception as exc:
                # The broker deletes an exclusive queue with the connection anyway; a quorum queue expires.
                log.warning("could not delete queue %s: %r", self.queue_name, exc)
        self._online = False
        try:
            async with asyncio.timeout(self._op_timeout):
                await conn.close()
        except Exception as exc:
            log.warning("closing the RabbitMQ connection failed: %r", exc)
        self._conn = self._control = self._publish_channel = self._consume_channel = None
        self._exchange = self._queue = None
        self._consumer_tag = None
        self._bound.clear()
        self._uncertain.clear()
        self._dirty.clear()
        self._idle.set()
        self._handler = self._on_gap = None
        waiters, self._bind_waiters = self._bind_waiters, {}
        for futures in waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(BusUnavailableError("the bus was stopped"))

    def subscribe(self, username: str) -> None:
        """Bind `username`'s key now (or at the next connection); cancels a pending delayed unbind."""
        timer = self._unbind_timers.pop(username, None)
        if timer is not None:
            timer.cancel()
        if username in self._wanted:
            return
        if len(routing_key(username).encode()) > _MAX_ROUTING_KEY_BYTES:
            # No broker can route such a key (James cannot either); refusing here keeps it out of every batch.
            log.warning("username too long for an AMQP routing key, not subscribing: %r", username[:64])
            return
        self._wanted.add(username)
        self._mark(username)

    def unsubscribe(self, username: str) -> None:
        """Unbind `username`'s key after GATEWAY_AMQP_UNBIND_DELAY unless it is subscribed again meanwhile."""
        if username not in self._wanted or username in self._unbind_timers:
            return
        delay = self._settings.amqp_unbind_delay
        if delay > 0 and self._reconciler is not None:
            # The delay absorbs a client that reconnects at once: its binding, and its events, stay.
            self._unbind_timers[username] = asyncio.get_running_loop().call_later(
                delay, self._unbind_now, username)
        else:
            self._unbind_now(username)

    async def publish(self, events: Sequence[StateChangeEvent]) -> None:
        """Send events to the exchange, one message per username (an array when several), with confirms.

        Raises BusUnavailableError if the broker is away or does not confirm within `op_timeout`.
        """
        if not events:
            return
        exchange = self._exchange
        if not self._online or exchange is None:
            raise BusUnavailableError("not connected to RabbitMQ; events not published")
        groups: dict[str, list[StateChangeEvent]] = {}
        for event in events:
            groups.setdefault(event.username, []).append(event)
        headers: dict[str, Any] = {EVENT_BUS_ID_HEADER: self.node_id}
        publishes = [
            exchange.publish(
                aio_pika.Message(
                    encode_events(group),
                    headers=headers,
                    content_type="text/plain",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=routing_key(username),
                # Nobody subscribed anywhere is normal: let the broker drop it without a basic.return.
                mandatory=False,
            )
            for username, group in groups.items()
        ]
        try:
            async with asyncio.timeout(self._op_timeout):
                await asyncio.gather(*publishes)
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            # aiormq cancels pending confirmations when the connection drops under them.
            raise BusUnavailableError("connection to RabbitMQ lost during publish") from None
        except Exception as exc:
            raise BusUnavailableError(f"publishing to RabbitMQ failed: {exc!r}") from exc
        self.published_events += len(events)

    def counters(self) -> list[tuple[str, str, float]]:
        return [
            ("received_events", "Events taken from this node's queue", self.received_events),
            ("poison_messages", "Messages rejected as not StateChangeEvents", self.poison_messages),
            ("published_events", "Events published to the exchange", self.published_events),
            ("reconnects", "Connections to RabbitMQ restored", self.reconnects),
            ("bound_usernames", "Usernames bound to this node's queue", len(self._bound)),
        ]

    # --- extras for tests --------------------------------------------------------------------------------

    def bound_usernames(self) -> set[str]:
        """Usernames whose binding the broker has confirmed (empty while disconnected)."""
        return set(self._bound)

    async def wait_bound(self, username: str) -> None:
        """Return once `username`'s binding is confirmed (wrap in asyncio.timeout to bound the wait)."""
        if username in self._bound:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._bind_waiters.setdefault(username, [])
        waiters.append(fut)
        try:
            await fut
        finally:
            if fut in waiters:
                waiters.remove(fut)
                if not waiters and self._bind_waiters.get(username) is waiters:
                    del self._bind_waiters[username]

    async def wait_subscribed(self, usernames: Collection[str]) -> None:
        """The port's wait: every binding of `usernames` confirmed by the broker (see `wait_bound`)."""
        await asyncio.gather(*(self.wait_bound(u) for u in usernames if u in self._wanted))

    async def settled(self) -> None:
        """Return once every subscribe/unsubscribe so far is applied on the broker (delayed unbinds count
        only once due); waits across an outage. Wrap in asyncio.timeout to bound the wait."""
        while True:
            await self._idle.wait()
            if not self._dirty:
                return

    # --- connection set-up and recovery ---------------------------------------------------------------------

    async def _declare(self, conn: AbstractRobustConnection) -> None:
        # Three channels so that one failing does not take the others down: a bad binding (e.g. the exchange
        # deleted under us) closes only the control channel, a publish failure only the publishing one.
        control = await conn.channel(publisher_confirms=False)
        await control.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.DIRECT, durable=True, timeout=self._op_timeout)
        publishing = await conn.channel(publisher_confirms=True)
        exchange = await publishing.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.DIRECT, durable=True, timeout=self._op_timeout)
        consuming = await conn.channel(publisher_confirms=False)
        await consuming.set_qos(prefetch_count=self._settings.amqp_prefetch)
        if self._settings.amqp_queue_type == "quorum":
            queue = await consuming.declare_queue(
                self.queue_name, durable=True,
                arguments={"x-queue-type": "quorum", "x-expires": QUORUM_QUEUE_EXPIRES_MS},
                timeout=self._op_timeout)
        else:
            queue = await consuming.declare_queue(
                self.queue_name, exclusive=True, arguments={"x-queue-type": "classic"},
                timeout=self._op_timeout)
        # robust=True (the default): aio-pika re-declares the queue and re-consumes after a reconnection.
        self._consumer_tag = await queue.consume(self._on_message, no_ack=False, timeout=self._op_timeout)
        self._control, self._publish_channel, self._consume_channel = control, publishing, consuming
        self._exchange, self._queue = exchange, queue

    def _on_connection_lost(self, _conn: Any, exc: BaseException | None) -> None:
        if self._stopping:
            return
        if self._online:
            log.warning("lost the RabbitMQ connection (%r); events may be missed until it is back", exc)
        self._online = False
        self._ready = False
        self._epoch += 1
        if self._recovery is not None:
            self._recovery.cancel()
            self._recovery = None
        # The exclusive queue went with the connection (a quorum queue kept its bindings): either way we no
        # longer know, and the recovery re-checks every one of them.
        self._uncertain |= self._bound
        self._bound.clear()

    def _on_reconnected(self, _conn: Any) -> None:
        # Called by aio-pika after it re-opened the channels and re-declared exchange, queue and consumer.
        if self._stopping:
            return
        self._online = True
        for username in self._wanted | self._uncertain:
            self._mark(username)
        if self._recovery is not None:
            self._recovery.cancel()
        self._recovery = asyncio.create_task(self._recover(), name=f"amqp-recover-{self.node_id}")

    async def _recover(self) -> None:
        await self.settled()
        self._ready = True
        self.reconnects += 1
        log.info("RabbitMQ connection restored; %d usernames bound again", len(self._bound))
        on_gap = self._on_gap
        if on_gap is not None:
            try:
                on_gap()
            except Exception:
                log.exception("the gap handler failed")

    # --- bindings ---------------------------------------------------------------------------------------

    def _unbind_now(self, username: str) -> None:
        self._unbind_timers.pop(username, None)
        self._wanted.discard(username)
        self._mark(username)

    def _mark(self, username: str) -> None:
        if self._reconciler is None:
            return  # not started: start() reconciles every wanted username
        self._dirty[username] = None
        self._idle.clear()
        self._wake.set()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._dirty and self._online:
                ops = self._next_batch()
                if not ops:
                    continue
                try:
                    await self._apply(ops)
                    continue
                except asyncio.CancelledError:
                    if _being_cancelled():
                        raise
                    error: BaseException = ConnectionError("operation cancelled by the connection")
                except Exception as exc:
                    error = exc
                for username, _ in ops:
                    self._dirty[username] = None
                if self._online:
                    log.warning("changing %d bindings failed (%r); retrying in %gs", len(ops), error,
                                self._retry_delay)
                    await asyncio.sleep(self._retry_delay)
            if not self._dirty:
                self._idle.set()

    def _next_batch(self) -> list[tuple[str, bool]]:
        """Pop dirty usernames into (username, bind?) operations; usernames already right need none."""
        ops: list[tuple[str, bool]] = []
        while self._dirty and len(ops) < _BATCH:
            username = next(iter(self._dirty))
            del self._dirty[username]
            if username in self._wanted:
                if username not in self._bound:
                    ops.append((username, True))
            elif username in self._bound or username in self._uncertain:
                ops.append((username, False))
        return ops

    async def _apply(self, ops: list[tuple[str, bool]]) -> None:
        control = self._control
        if control is None:
            raise ConnectionError("no control channel")
        epoch = self._epoch
        for username, bind in ops:
            self._uncertain.add(username)
            if not bind:
                self._bound.discard(username)
        async with asyncio.timeout(self._op_timeout):
            channel = await control.get_underlay_channel()
            last_was_nowait = False
            for username, bind in ops:
                key = routing_key(username)
                if bind:
                    # No reply: a failure closes the channel, which the synchronous call below then reports.
                    await channel.queue_bind(
                        self.queue_name, self.exchange_name, routing_key=key, nowait=True)
                    last_was_nowait = True
                else:
                    # queue.unbind has no nowait in AMQP 0-9-1; it also confirms the binds sent before it.
                    await channel.queue_unbind(self.queue_name, self.exchange_name, routing_key=key)
                    last_was_nowait = False
            if last_was_nowait:
                await channel.queue_declare(self.queue_name, passive=True)
        if epoch != self._epoch:
            # Confirmed, but the connection (and with it an exclusive queue's bindings) was lost meanwhile
            # and the loss was noticed before we resumed: do it again.
            raise ConnectionError("connection lost while changing bindings")
        for username, bind in ops:
            self._uncertain.discard(username)
            if bind:
                self._bound.add(username)
                for fut in self._bind_waiters.pop(username, ()):
                    if not fut.done():
                        fut.set_result(None)

    # --- consuming --------------------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Runs as one task per delivery, created in delivery order; the handler is called before the first
        # await, so handler calls keep the queue's order.
        try:
            events = decode_events(message.body)
        except EventDecodeError as exc:
            self.poison_messages += 1
            sender = (message.headers or {}).get(EVENT_BUS_ID_HEADER)
            log.warning("rejected a message that is not a StateChangeEvent (routing key %r, eventBusId %r, "
                        "%d bytes, starts %r): %s", message.routing_key, sender, len(message.body),
                        message.body[:120], exc)
            await _settle(message.reject(requeue=False))
            return
        self.received_events += len(events)
        handler = self._handler
        if handler is not None and events:  # `[]` is a valid body that says nothing
            try:
                handler(events)
            except Exception:
                # The contract says the handler does not fail; if it does, redelivery would not help.
                log.exception("the event handler failed")
        await _settle(message.ack())


async def _settle(ack: Any) -> None:
    try:
        await ack
    except Exception as exc:
        # The channel died after delivery: the broker requeues the message (or dropped it with the queue,
        # a gap that the reconnection's on_gap covers).
        log.debug("could not settle a delivery: %r", exc)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _censor(url: str | None) -> str:
    if not url:
        return "<unset>"
    parsed = URL(url)
    return str(parsed.with_password("******")) if parsed.password else url
