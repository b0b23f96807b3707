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
- One connection per node, our own (gateway/bus/amqp_connection.py on pamqp's codec), not aio-pika's: the
  consume path is per message, and aiormq's frame reader (three awaits, a lock and two queues per frame) plus a
  task per delivery cost 110-270 µs a message, ours ~6 µs (bench/README.md, "RabbitMQ bus"). An exclusive
  queue can only be bound and consumed by the connection that declared it, so bindings, consumption and
  publishing share it, on three channels (control, publishing with confirms, consuming). A channel error ends
  the connection (see below), so the separation is about what each channel waits for, not about failures.
- Consumption at batch granularity: every delivery one socket read completed is decoded (msgspec, straight
  into the hub's Struct), handed to the handler as ONE call in delivery order, and settled with one write:
  `basic.reject` (no requeue) for each poison message, then one `basic.ack` with `multiple` on the highest
  good delivery tag. The rejects go first: once the broker has processed a reject the tag is no longer
  outstanding, so the multiple ack that follows cannot cover it (and rejecting an already acknowledged tag would
  be a channel error). No task, no await and no timer per message.
- Our own events come back through the broker. James delivers a node's own events to its local listeners
  directly and drops the broker's echo by comparing `eventBusId`. We don't: `publish()` only sends, and
  every local session receives the event from this node's queue like any other node's sessions. One path for
  every event gives exactly-once delivery per subscriber and one order per username (the queue's order)
  without merging two streams. The cost is one broker round trip for local events, and a publish while the
  broker is away raises `BusUnavailableError` instead of reaching local sessions; the hub's gap resync
  (`on_gap`) after the reconnection brings those sessions up to date. We still write `eventBusId` so that
  James nodes, which do filter on it, see a foreign bus id and deliver our events.
- Bindings are owned here: the desired set (`subscribe`d usernames plus those waiting out
  GATEWAY_AMQP_UNBIND_DELAY) is reconciled with the broker by one task, so binds and unbinds of a username are
  applied in order and never race. Binds are pipelined (`nowait`) and confirmed by one synchronous call per
  batch, so re-binding thousands of usernames after a reconnection takes a few round trips.
- Any loss (the socket, missed heartbeats, a channel closed or the consumer cancelled by the broker) ends the
  connection; a new one is tried every `reconnect_interval`. On it the exchange, queue, QoS and consumer are
  declared again, every wanted username is bound again and every possibly stale binding removed; only then is
  the bus `ready` again and `on_gap()` called once: events routed while we were away were lost with the old
  exclusive queue.
- At least once, and exactly once while connected: a message is acknowledged only after the handler has taken
  it, so it is never lost between broker and hub; if the connection dies between the two, the broker
  redelivers it (a quorum queue; a repeated state, harmless to clients) or drops it with the exclusive queue (a
  gap, covered by `on_gap`). A message that is not a StateChangeEvent is rejected without requeue and counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Collection, Sequence

from pamqp import commands
from yarl import URL

from gateway.bus import amqp_frames as wire
from gateway.bus.amqp_connection import AmqpConnection
from gateway.bus.amqp_frames import Delivery
from gateway.bus.base import EventHandler, GapHandler
from gateway.bus.events import EventDecodeError, StateChangeEvent, decode_body, encode_events
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
# The node's channels (a failing one ends the connection, see amqp_connection).
CONTROL, PUBLISHING, CONSUMING = 1, 2, 3
# Failed reconnection attempts in a row between two warnings (the others are logged at debug level).
_WARN_EVERY = 12


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
        # Built once: every publish reuses the exchange name and the content header's properties.
        self._exchange_bytes = self.exchange_name.encode()
        self._properties = wire.properties("text/plain", 2, {EVENT_BUS_ID_HEADER: node_id})

        # Counters exported as metrics (plain ints, read by the composition root).
        self.received_events = 0
        self.received_messages = 0
        self.consumed_batches = 0
        self.poison_messages = 0
        self.published_events = 0
        self.reconnects = 0

        self._handler: EventHandler | None = None
        self._on_gap: GapHandler | None = None
        self._conn: AmqpConnection | None = None
        self._token: object | None = None  # identifies `_conn` (its loss callback carries the same)
        self._consumer_tag: str | None = None
        self._started = False
        self._online = False  # the connection is up, with exchange, queue and consumer declared
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
        self._reconnecting: asyncio.Task[None] | None = None

    # --- the port ---------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self, handler: EventHandler, on_gap: GapHandler) -> None:
        """Connect, declare, consume, bind; raise BusUnavailableError within `start_timeout` if we cannot."""
        if self._started:
            raise RuntimeError("AmqpBus already started")
        self._started = True
        self._handler = handler
        self._on_gap = on_gap
        self._stopping = False
        try:
            async with asyncio.timeout(self._start_timeout):
                await self._connect()
                self._online = True
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
        if not self._started:
            return
        self._stopping = True
        self._ready = False
        for timer in self._unbind_timers.values():
            timer.cancel()
        self._unbind_timers.clear()
        for task in (self._reconnecting, self._recovery, self._reconciler):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._reconnecting = self._recovery = self._reconciler = None
        conn = self._conn
        if conn is not None and conn.is_open:
            try:
                async with asyncio.timeout(self._op_timeout):
                    # Cancel first so that nothing more is delivered while the queue goes away.
                    if self._consumer_tag is not None:
                        await conn.rpc(CONSUMING, commands.Basic.Cancel(consumer_tag=self._consumer_tag))
                    await conn.rpc(CONTROL, commands.Queue.Delete(queue=self.queue_name))
            except Exception as exc:
                # The broker deletes an exclusive queue with the connection anyway; a quorum queue expires.
                log.warning("could not delete queue %s: %r", self.queue_name, exc)
            try:
                async with asyncio.timeout(self._op_timeout):
                    await conn.close()
            except Exception as exc:
                log.warning("closing the RabbitMQ connection failed: %r", exc)
        if conn is not None:
            conn.abort()
        self._online = False
        self._started = False
        self._conn = self._token = None
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
        conn = self._conn
        if not self._online or conn is None or not conn.is_open:
            raise BusUnavailableError("not connected to RabbitMQ; events not published")
        groups: dict[str, list[StateChangeEvent]] = {}
        for event in events:
            groups.setdefault(event.username, []).append(event)
        messages = []
        for username, group in groups.items():
            key = routing_key(username).encode()
            if len(key) > _MAX_ROUTING_KEY_BYTES:
                # No binding can match it, here or on a James node: nobody would receive it.
                log.warning("username too long for an AMQP routing key, event not published: %r", username[:64])
                continue
            messages.append(wire.publish(PUBLISHING, self._exchange_bytes, key, self._properties,
                                         encode_events(group), conn.frame_max))
        try:
            confirms = conn.publish(PUBLISHING, messages)
            async with asyncio.timeout(self._op_timeout):
                await asyncio.gather(*confirms)
        except TimeoutError:
            raise BusUnavailableError(f"RabbitMQ did not confirm within {self._op_timeout:g}s") from None
        except Unavailable as exc:
            raise BusUnavailableError(f"publishing to RabbitMQ failed: {exc}") from exc
        self.published_events += len(events)

    def counters(self) -> list[tuple[str, str, float]]:
        return [
            ("received_events", "Events taken from this node's queue", self.received_events),
            ("received_messages", "Messages taken from this node's queue (poison ones included)",
             self.received_messages),
            ("consumed_batches", "Batches of messages handed to the hub (one per socket read)",
             self.consumed_batches),
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

    def bound(self, username: str) -> bool:
        return username in self._bound

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

    async def _connect(self) -> None:
        """Open a connection and declare on it what the node needs; it becomes `_conn` only when complete."""
        token = object()  # tells this connection's loss apart from an older one's

        conn = await AmqpConnection.connect(
            self._url, heartbeat=self._settings.amqp_heartbeat, connection_name=self.connection_name,
            on_deliveries=self._on_deliveries, on_lost=lambda exc: self._lost(token, exc))
        try:
            await conn.open_channel(CONTROL)
            await conn.rpc(CONTROL, commands.Exchange.Declare(
                exchange=self.exchange_name, exchange_type="direct", durable=True))
            await conn.open_channel(PUBLISHING, confirms=True)
            await conn.open_channel(CONSUMING)
            await conn.rpc(CONSUMING, commands.Basic.Qos(prefetch_count=self._settings.amqp_prefetch))
            if self._settings.amqp_queue_type == "quorum":
                declare = commands.Queue.Declare(
                    queue=self.queue_name, durable=True,
                    arguments={"x-queue-type": "quorum", "x-expires": QUORUM_QUEUE_EXPIRES_MS})
            else:
                declare = commands.Queue.Declare(
                    queue=self.queue_name, exclusive=True, arguments={"x-queue-type": "classic"})
            await conn.rpc(CONTROL, declare)
            consume_ok = await conn.rpc(CONSUMING, commands.Basic.Consume(queue=self.queue_name))
        except BaseException:
            conn.abort()
            raise
        self._conn, self._token, self._consumer_tag = conn, token, str(consume_ok.consumer_tag)

    def _lost(self, token: object, exc: BaseException | None) -> None:
        if self._stopping or token is not self._token:
            return  # our own close, or a connection that never became the node's
        if self._online:
            log.warning("lost the RabbitMQ connection (%s); events may be missed until it is back",
                        exc or "closed")
        self._online = False
        self._ready = False
        self._epoch += 1
        self._token = None
        self._conn = None
        self._consumer_tag = None
        if self._recovery is not None:
            self._recovery.cancel()
            self._recovery = None
        # The exclusive queue went with the connection (a quorum queue kept its bindings): either way we no
        # longer know, and the recovery re-checks every one of them.
        self._uncertain |= self._bound
        self._bound.clear()
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.create_task(self._reconnect(), name=f"amqp-reconnect-{self.node_id}")

    async def _reconnect(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self._reconnect_interval)
            error = await _failure_of(self._connect_in_time())
            if error is None:
                break
            if failures % _WARN_EVERY == 0:
                log.warning("cannot reconnect to RabbitMQ at %s (%r); trying every %gs", _censor(self._url),
                            error, self._reconnect_interval)
            failures += 1
        self._reconnecting = None
        self._online = True
        for username in self._wanted | self._uncertain:
            self._mark(username)
        self._recovery = asyncio.create_task(self._recover(), name=f"amqp-recover-{self.node_id}")

    async def _connect_in_time(self) -> None:
        async with asyncio.timeout(self._op_timeout):
            await self._connect()

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
                error = await _failure_of(self._apply(ops))
                if error is None:
                    continue
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
        conn = self._conn
        if conn is None:
            raise ConnectionError("not connected")
        epoch = self._epoch
        for username, bind in ops:
            self._uncertain.add(username)
            if not bind:
                self._bound.discard(username)
        async with asyncio.timeout(self._op_timeout):
            last_was_nowait = False
            for username, bind in ops:
                key = routing_key(username)
                if bind:
                    # No reply: a failure closes the channel (and with it our connection), which the
                    # synchronous call below then reports.
                    conn.send(CONTROL, commands.Queue.Bind(
                        queue=self.queue_name, exchange=self.exchange_name, routing_key=key, nowait=True))
                    last_was_nowait = True
                else:
                    # queue.unbind has no nowait in AMQP 0-9-1; it also confirms the binds sent before it.
                    await conn.rpc(CONTROL, commands.Queue.Unbind(
                        queue=self.queue_name, exchange=self.exchange_name, routing_key=key))
                    last_was_nowait = False
            if last_was_nowait:
                await conn.rpc(CONTROL, commands.Queue.Declare(queue=self.queue_name, passive=True))
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

    def _on_deliveries(self, conn: AmqpConnection, batch: list[Delivery]) -> None:
        """Everything one socket read completed: decode, one handler call, then one write that settles it."""
        events: list[StateChangeEvent] = []
        poison: list[Delivery] = []
        last_good = 0
        for delivery in batch:
            try:
                decoded = decode_body(delivery.body)
            except EventDecodeError as exc:
                poison.append(delivery)
                self._log_poison(delivery, exc)
                continue
            if isinstance(decoded, list):
                events += decoded
            else:
                events.append(decoded)  # one object: the usual James body
            last_good = delivery.delivery_tag
        self.received_messages += len(batch)
        self.consumed_batches += 1
        self.poison_messages += len(poison)
        self.received_events += len(events)
        handler = self._handler
        if handler is not None and events:  # `[]` is a valid body that says nothing
            try:
                handler(events)
            except Exception:
                # The contract says the handler does not fail; if it does, redelivery would not help.
                log.exception("the event handler failed")
        # Rejects before the ack: a multiple ack covers only tags still outstanding when the broker reads it.
        frames = [wire.reject(CONSUMING, d.delivery_tag, requeue=False) for d in poison]
        if last_good:
            frames.append(wire.ack(CONSUMING, last_good, multiple=True))
        try:
            conn.write(frames[0] if len(frames) == 1 else b"".join(frames))
        except Unavailable as exc:
            # The connection is going: the broker requeues what we did not settle (or drops it with the
            # exclusive queue, a gap that the reconnection's on_gap covers).
            log.debug("could not settle %d deliveries: %s", len(batch), exc)

    def _log_poison(self, delivery: Delivery, exc: EventDecodeError) -> None:
        sender = delivery.headers.get(EVENT_BUS_ID_HEADER)
        log.warning("rejected a message that is not a StateChangeEvent (routing key %r, eventBusId %r, "
                    "%d bytes, starts %r): %s", delivery.routing_key, sender, len(delivery.body),
                    delivery.body[:120], exc)


async def _failure_of(op: Awaitable[None]) -> BaseException | None:
    """Await one broker operation: None when it succeeded, else why it failed. A cancellation the connection
    caused (it dropped the operation's future when it closed) is a failure like any other; a cancellation of the
    task doing the operation propagates."""
    try:
        await op
    except asyncio.CancelledError:
        if _being_cancelled():
            raise
        return ConnectionError("operation cancelled by the connection")
    except Exception as exc:
        return exc
    return None


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _censor(url: str | None) -> str:
    if not url:
        return "<unset>"
    parsed = URL(url)
    return str(parsed.with_password("******")) if parsed.password else url
