"""Integration tests of gateway.bus.amqp against a real RabbitMQ, with a test-side publisher that writes
exactly what Apache James writes. Each test uses its own exchange and node ids, and removes them afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from yarl import URL

from gateway.bus.amqp import AmqpBus, BusUnavailableError, routing_key
from gateway.bus.events import STATE_CHANGE_EVENT, StateChangeEvent, new_event
from gateway.config import Settings
from tests.integration.amqp_support import (
    SeverableProxy,
    SilentServer,
    TlsRelay,
    bindings_of,
    connection_names,
    eventually,
    eventually_async,
    free_port,
    queues,
    require_broker,
    require_rabbitmqctl,
)

pytestmark = pytest.mark.amqp

BOB = "bob@example.com"
ALICE = "alice@example.com"
CAROL = "carol@example.com"
JAMES_NODE = "5f0b9a7e-james-node"


class Recorder:
    """The hub's side of the port: collects delivered events and gap calls, and lets a test await them."""

    def __init__(self) -> None:
        self.batches: list[list[StateChangeEvent]] = []
        self.gaps = 0
        self._changed = asyncio.Event()

    def handler(self, events: Sequence[StateChangeEvent]) -> None:
        self.batches.append(list(events))
        self._changed.set()

    def on_gap(self, usernames: Collection[str] | None = None, /) -> None:
        assert usernames is None  # a lost connection: any event may have been lost
        self.gaps += 1
        self._changed.set()

    @property
    def events(self) -> list[StateChangeEvent]:
        return [e for batch in self.batches for e in batch]

    def ids(self) -> list[str]:
        return [e.eventId for e in self.events]

    async def until(self, predicate: Callable[[Recorder], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out; received {self.ids()} and {self.gaps} gaps")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def until_event(self, event_id: str, timeout: float = 10.0) -> None:
        await self.until(lambda r: event_id in r.ids(), timeout)


class James:
    """Stands in for an Apache James node: publishes raw messages in James's format to the exchange."""

    def __init__(self, conn: AbstractRobustConnection, exchange: aio_pika.abc.AbstractExchange) -> None:
        self.conn = conn
        self.exchange = exchange

    async def publish_raw(self, username: str, body: bytes, *, bus_id: str = JAMES_NODE) -> None:
        await self.exchange.publish(
            aio_pika.Message(body, headers={"eventBusId": bus_id}, content_type="text/plain",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=routing_key(username), mandatory=False)

    async def publish(self, username: str, type_states: dict[str, str]) -> str:
        event_id = str(uuid.uuid4())
        body = {"type": STATE_CHANGE_EVENT, "eventId": event_id, "username": username,
                "typeStates": type_states}
        await self.publish_raw(username, json.dumps(body).encode())
        return event_id


@pytest.fixture
def broker_url() -> str:
    return require_broker()


@pytest.fixture
async def exchange_name(broker_url: str) -> AsyncIterator[str]:
    """A fresh exchange name for the test; the exchange (declared by whoever comes first) goes afterwards."""
    name = f"test-jmap-{uuid.uuid4().hex}"
    yield name
    conn = await aio_pika.connect(broker_url)
    async with conn:
        channel = await conn.channel()
        await channel.exchange_delete(name)


@pytest.fixture
async def james(broker_url: str, exchange_name: str) -> AsyncIterator[James]:
    """The James stand-in's connection; closed before the exchange fixture deletes the exchange."""
    conn = await aio_pika.connect_robust(broker_url, client_properties={"connection_name": "test-james"})
    channel = await conn.channel()
    exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.DIRECT, durable=True)
    try:
        yield James(conn, exchange)
    finally:
        await conn.close()


BusFactory = Callable[..., Awaitable[tuple[AmqpBus, Recorder]]]


@pytest.fixture
async def make_bus(broker_url: str, exchange_name: str) -> AsyncIterator[BusFactory]:
    """Start AmqpBus nodes on the test's exchange (fast reconnection); stop them all at the end."""
    started: list[AmqpBus] = []

    async def make(*, url: str | None = None, subscribe: Sequence[str] = (), start: bool = True,
                   **overrides: Any) -> tuple[AmqpBus, Recorder]:
        options = {k: overrides.pop(k) for k in ("start_timeout", "reconnect_interval") if k in overrides}
        settings = Settings.defaults(amqp_url=url or broker_url, amqp_exchange=exchange_name, amqp_unbind_delay=0,
                            amqp_heartbeat=5).replace(**overrides)
        bus = AmqpBus(settings, f"test-{uuid.uuid4().hex[:12]}", op_timeout=5, retry_delay=0.1,
                      reconnect_interval=options.get("reconnect_interval", 0.1),
                      start_timeout=options.get("start_timeout", 10.0))
        recorder = Recorder()
        started.append(bus)
        for username in subscribe:
            bus.subscribe(username)
        if start:
            await bus.start(recorder.handler, recorder.on_gap)
        return bus, recorder

    yield make
    for bus in started:
        await bus.stop()


async def bound(bus: AmqpBus, *usernames: str) -> None:
    async with asyncio.timeout(10):
        for username in usernames:
            await bus.wait_bound(username)


# --- consuming James's messages -------------------------------------------------------------------------

async def test_james_event_reaches_handler_and_is_acknowledged(make_bus: BusFactory, james: James) -> None:
    # Prefetch 1: the broker sends the next message only after the previous one was acknowledged, so three
    # arrivals prove the acks.
    bus, rec = await make_bus(subscribe=[BOB], amqp_prefetch=1)
    assert bus.ready
    await bound(bus, BOB)
    ids = [await james.publish(BOB, {"Mailbox": f"m{i}", "Email": f"e{i}", "EmailDelivery": f"d{i}"})
           for i in range(3)]
    await rec.until(lambda r: len(r.events) == 3)
    assert rec.ids() == ids
    first = rec.events[0]
    assert first.username == BOB
    assert first.typeStates == {"Mailbox": "m0", "Email": "e0", "EmailDelivery": "d0"}
    assert bus.received_events == 3
    assert bus.poison_messages == 0
    assert rec.gaps == 0


async def test_arrays_legacy_fields_and_custom_types(make_bus: BusFactory, james: James) -> None:
    bus, rec = await make_bus(subscribe=[BOB])
    await bound(bus, BOB)
    body = [
        {"type": STATE_CHANGE_EVENT, "eventId": "a1", "username": BOB,
         "typeStates": {"Email": "s1", "urn:example:Calendar": "c7"}},
        # Older James versions: one field per type instead of typeStates.
        {"type": STATE_CHANGE_EVENT, "eventId": "a2", "username": BOB,
         "mailboxState": "m2", "emailState": "e2", "vacationResponseState": "v2", "emailDeliveryState": "d2"},
    ]
    await james.publish_raw(BOB, json.dumps(body).encode())
    await rec.until(lambda r: len(r.events) == 2)
    # One message is one handler call, in the array's order.
    assert len(rec.batches) == 1
    a1, a2 = rec.batches[0]
    assert (a1.eventId, a1.typeStates) == ("a1", {"Email": "s1", "urn:example:Calendar": "c7"})
    assert (a2.eventId, a2.typeStates) == (
        "a2", {"Mailbox": "m2", "Email": "e2", "VacationResponse": "v2", "EmailDelivery": "d2"})
    assert bus.received_events == 2


POISON: dict[str, bytes] = {
    "not-json": b"this is not json",
    "not-utf8": b"\xff\xfe{",
    "unknown-type": json.dumps({"type": "org.apache.james.events.MailboxAdded", "eventId": "x",
                                "username": BOB}).encode(),
    "username-not-string": json.dumps({"type": STATE_CHANGE_EVENT, "username": 42,
                                       "typeStates": {}}).encode(),
    "typeStates-not-object": json.dumps({"type": STATE_CHANGE_EVENT, "username": BOB,
                                         "typeStates": ["Email"]}).encode(),
    "array-with-one-bad": json.dumps([
        {"type": STATE_CHANGE_EVENT, "username": BOB, "typeStates": {"Email": "1"}},
        {"type": "bogus", "username": BOB},
    ]).encode(),
    "json-string": b'"just a string"',
}


async def test_poison_messages_are_rejected_counted_and_consumption_goes_on(
        make_bus: BusFactory, james: James, caplog: pytest.LogCaptureFixture) -> None:
    require_rabbitmqctl()
    bus, rec = await make_bus(subscribe=[BOB])
    await bound(bus, BOB)
    with caplog.at_level(logging.WARNING, logger="gateway.bus.amqp"):
        for body in POISON.values():
            await james.publish_raw(BOB, body)
        good = await james.publish(BOB, {"Email": "after-poison"})
        await rec.until_event(good)
    assert rec.ids() == [good]
    assert bus.poison_messages == len(POISON)
    assert bus.ready
    poison_logs = [r for r in caplog.records if "not a StateChangeEvent" in r.getMessage()]
    assert len(poison_logs) == len(POISON)
    assert all(routing_key(BOB) in r.getMessage() for r in poison_logs)
    # Rejected without requeue: nothing is left in (or redelivered from) the queue.
    info = (await queues())[bus.queue_name]
    assert (info["messages_ready"], info["messages_unacknowledged"]) == (0, 0)
    assert bus.poison_messages == len(POISON)


# --- batches --------------------------------------------------------------------------------------------

def _good(n: int) -> bytes:
    return json.dumps({"type": STATE_CHANGE_EVENT, "eventId": f"good-{n}", "username": BOB,
                       "typeStates": {"Email": f"s{n}"}}).encode()


@pytest.mark.parametrize("plan", [
    "gpggpgp",  # poison between good ones and last: the multiple ack must not cover a rejected tag
    "pg",  # poison first
    "ppp",  # nothing to acknowledge, only rejects
    "gggggggggg",
])
async def test_a_batch_is_one_handler_call_and_poison_in_it_is_rejected(
        make_bus: BusFactory, james: James, plan: str) -> None:
    require_rabbitmqctl()
    proxy = SeverableProxy.to_broker()
    await proxy.start()
    bus, rec = await make_bus(url=proxy.url(), subscribe=[BOB])
    try:
        await bound(bus, BOB)
        batches = bus.consumed_batches
        # Hold what the broker sends until every message is in the proxy, then hand it over in one write:
        # the node reads all of them at once.
        proxy.hold()
        expected = []
        body = b""
        for n, kind in enumerate(plan):
            body = _good(n) if kind == "g" else b"poison %d" % n
            await james.publish_raw(BOB, body)
            if kind == "g":
                expected.append(f"good-{n}")
        # The last body frame complete (its frame-end octet included) means every frame before it is there.
        last_frame_end = body + b"\xce"
        await eventually(lambda: last_frame_end in proxy.held(), what="every delivery in the proxy")
        assert proxy.held().count(routing_key(BOB).encode()) == len(plan)  # once per basic.deliver
        proxy.release()
        await eventually(lambda: bus.received_messages == len(plan), what="every message consumed")
        # One read, one handler call, the good events in publish order, the poison ones not among them.
        assert bus.consumed_batches - batches == 1
        assert [e.eventId for e in rec.events] == expected
        assert len(rec.batches) == (1 if expected else 0)
        assert bus.poison_messages == plan.count("p")
        # Everything was settled: acknowledged or rejected, nothing ready or unacknowledged (or requeued).
        await eventually_async(lambda: _queue_settled(bus.queue_name), what="the queue settled")
        # And the channel is fine: an ack of a rejected tag (or a reject of an acknowledged one) would have
        # been a channel error, closing the connection (a reconnection and a gap).
        marker = await james.publish(BOB, {"Email": "marker"})
        await rec.until_event(marker)
        assert (bus.reconnects, rec.gaps, bus.ready) == (0, 0, True)
    finally:
        await bus.stop()
        await proxy.close()


async def _queue_settled(name: str) -> bool:
    info = (await queues())[name]
    return (info["messages_ready"], info["messages_unacknowledged"]) == (0, 0)


async def test_deliveries_lost_in_flight_are_delivered_again_on_a_quorum_queue(make_bus: BusFactory,
                                                                              james: James) -> None:
    # At least once: the broker delivered, the node never read them (the connection died in between), so
    # nothing was acknowledged and the queue, which outlives the connection, hands them out again.
    require_rabbitmqctl()
    proxy = SeverableProxy.to_broker()
    await proxy.start()
    bus, rec = await make_bus(url=proxy.url(), subscribe=[BOB], amqp_queue_type="quorum")
    try:
        await bound(bus, BOB)
        proxy.hold()
        ids = [await james.publish(BOB, {"Email": f"in-flight-{i}"}) for i in range(5)]
        key = routing_key(BOB).encode()
        await eventually(lambda: proxy.held().count(key) == len(ids), what="the deliveries in the proxy")
        proxy.sever()  # drops what it held: the node never saw them
        await eventually(lambda: not bus.ready, what="the cut noticed")
        assert rec.events == []
        proxy.restore()
        await rec.until(lambda r: set(ids) <= set(r.ids()), timeout=20)
        assert rec.ids() == ids  # redelivered, in order, once each
        await rec.until(lambda r: r.gaps == 1, timeout=20)
    finally:
        await bus.stop()
        await proxy.close()


# --- bindings -------------------------------------------------------------------------------------------

async def test_event_for_unsubscribed_username_is_not_delivered(make_bus: BusFactory, james: James,
                                                                 exchange_name: str) -> None:
    require_rabbitmqctl()
    bus, rec = await make_bus(subscribe=[BOB])
    await bound(bus, BOB)
    assert await bindings_of(exchange_name) == {(routing_key(BOB), bus.queue_name)}
    skipped = await james.publish(ALICE, {"Email": "a1"})
    marker = await james.publish(BOB, {"Email": "b1"})
    # One queue keeps order: had ALICE's event been routed to us it would have arrived before the marker.
    await rec.until_event(marker)
    assert skipped not in rec.ids()
    assert {e.username for e in rec.events} == {BOB}
    assert bus.bound_usernames() == {BOB}


async def test_unsubscribe_waits_for_the_delay_and_resubscribe_keeps_the_binding(
        make_bus: BusFactory, james: James, exchange_name: str) -> None:
    require_rabbitmqctl()
    bus, rec = await make_bus(subscribe=[BOB, CAROL], amqp_unbind_delay=0.5)
    await bound(bus, BOB, CAROL)
    bus.unsubscribe(BOB)
    bus.subscribe(BOB)  # a client reconnecting within the delay
    bus.unsubscribe(CAROL)  # its timer fires after BOB's would have
    assert bus.bound_usernames() == {BOB, CAROL}  # nothing happens before the delay
    await eventually(lambda: CAROL not in bus.bound_usernames(), what="CAROL unbound after the delay")
    assert bus.bound_usernames() == {BOB}
    assert await bindings_of(exchange_name) == {(routing_key(BOB), bus.queue_name)}
    skipped = await james.publish(CAROL, {"Email": "c"})
    marker = await james.publish(BOB, {"Email": "b"})
    await rec.until_event(marker)
    assert skipped not in rec.ids()


async def test_unsubscribe_then_subscribe_after_the_unbind_binds_again(make_bus: BusFactory,
                                                                       james: James) -> None:
    bus, rec = await make_bus(subscribe=[BOB])
    await bound(bus, BOB)
    for _ in range(5):  # rapid flapping ends in the last requested state
        bus.unsubscribe(BOB)
        bus.subscribe(BOB)
    bus.unsubscribe(BOB)
    await eventually(lambda: not bus.bound_usernames(), what="BOB unbound")
    bus.subscribe(BOB)
    await bound(bus, BOB)
    event = await james.publish(BOB, {"Email": "x"})
    await rec.until_event(event)


async def test_subscriptions_made_before_start_are_bound_at_start(make_bus: BusFactory, james: James) -> None:
    bus, rec = await make_bus(subscribe=[BOB, ALICE], start=False)
    bus.unsubscribe(ALICE)
    await bus.start(rec.handler, rec.on_gap)
    assert bus.bound_usernames() == {BOB}  # start() returns once the bindings are in place
    event = await james.publish(BOB, {"Email": "x"})
    await rec.until_event(event)


# --- publishing -----------------------------------------------------------------------------------------

async def test_publish_writes_james_format(make_bus: BusFactory, james: James) -> None:
    bus, _ = await make_bus()
    channel = await james.conn.channel()
    capture = await channel.declare_queue(exclusive=True)
    for username in (BOB, ALICE):
        await capture.bind(james.exchange, routing_key(username))
    got: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def on_message(message: AbstractIncomingMessage) -> None:
        await got.put(message)
        await message.ack()

    await capture.consume(on_message)
    e1 = new_event(BOB, {"Email": "e1"})
    e2 = new_event(ALICE, {"Mailbox": "m1"})
    e3 = new_event(BOB, {"Email": "e2", "EmailDelivery": "d2"})
    await bus.publish([e1, e2, e3])
    assert bus.published_events == 3
    async with asyncio.timeout(10):
        messages = [await got.get(), await got.get()]
    by_key = {m.routing_key: m for m in messages}
    assert set(by_key) == {routing_key(BOB), routing_key(ALICE)}
    for m in messages:
        assert m.headers.get("eventBusId") == bus.node_id
        assert m.content_type == "text/plain"
        assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    # Several events of one username go in one message, as an array, in publish order.
    bob_body = json.loads(by_key[routing_key(BOB)].body)
    assert bob_body == [
        {"type": STATE_CHANGE_EVENT, "eventId": e1.eventId, "username": BOB, "typeStates": {"Email": "e1"}},
        {"type": STATE_CHANGE_EVENT, "eventId": e3.eventId, "username": BOB,
         "typeStates": {"Email": "e2", "EmailDelivery": "d2"}},
    ]
    alice_body = json.loads(by_key[routing_key(ALICE)].body)
    assert alice_body == {"type": STATE_CHANGE_EVENT, "eventId": e2.eventId, "username": ALICE,
                          "typeStates": {"Mailbox": "m1"}}


async def test_two_nodes_each_get_every_event_exactly_once_in_order(make_bus: BusFactory) -> None:
    a, rec_a = await make_bus(subscribe=[BOB])
    b, rec_b = await make_bus(subscribe=[BOB])
    await bound(a, BOB)
    await bound(b, BOB)
    # Own events come back through the broker: node a's sessions get a's event once, like node b's.
    sent = [new_event(BOB, {"Email": str(i)}) for i in range(5)]
    await a.publish(sent[:2])
    await b.publish(sent[2:4])
    await a.publish(sent[4:])
    expected = [e.eventId for e in sent]
    for rec in (rec_a, rec_b):
        await rec.until(lambda r: expected[-1] in r.ids())
        # The last event arrived after all others, so any duplicate would already be here.
        assert rec.ids() == expected
    assert a.published_events == 3 and b.published_events == 2
    assert a.received_events == b.received_events == 5


async def test_publish_without_connection_raises(broker_url: str, exchange_name: str) -> None:
    bus = AmqpBus(Settings.defaults(amqp_url=broker_url, amqp_exchange=exchange_name), "never-started")
    with pytest.raises(BusUnavailableError):
        await bus.publish([new_event(BOB, {"Email": "1"})])
    await bus.publish([])  # nothing to send is no error


# --- connection loss and lifetime -----------------------------------------------------------------------

@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_connection_cut_recovers_bindings_and_reports_a_gap(
        make_bus: BusFactory, james: James, exchange_name: str, queue_type: str) -> None:
    require_rabbitmqctl()
    proxy = SeverableProxy.to_broker()
    await proxy.start()
    bus, rec = await make_bus(url=proxy.url(), subscribe=[BOB, ALICE], amqp_queue_type=queue_type)
    try:
        await bound(bus, BOB, ALICE)
        before = await james.publish(BOB, {"Email": "before"})
        await rec.until_event(before)

        proxy.sever()
        await eventually(lambda: not bus.ready, what="ready False after the cut")
        assert bus.bound_usernames() == set()
        with pytest.raises(BusUnavailableError):
            await bus.publish([new_event(BOB, {"Email": "lost"})])
        # Changes while disconnected are remembered and applied at reconnection.
        bus.unsubscribe(ALICE)
        bus.subscribe(CAROL)
        if queue_type == "classic":
            # The broker dropped the exclusive queue, and its bindings, with the connection.
            await eventually_async(lambda: _queue_gone(bus.queue_name), what="the old queue deleted")
        else:
            # The quorum queue outlives the connection with its bindings: ALICE's is now stale.
            await eventually_async(lambda: _no_connection(bus.connection_name), what="broker saw the cut")
            assert (routing_key(ALICE), bus.queue_name) in await bindings_of(exchange_name)

        proxy.restore()
        await eventually(lambda: bus.ready, timeout=15, what="ready again after reconnection")
        assert rec.gaps == 1
        assert bus.reconnects == 1
        assert bus.bound_usernames() == {BOB, CAROL}
        assert await bindings_of(exchange_name) == {(routing_key(BOB), bus.queue_name),
                                                   (routing_key(CAROL), bus.queue_name)}
        skipped = await james.publish(ALICE, {"Email": "after"})
        from_james = await james.publish(CAROL, {"Email": "after"})
        own = new_event(BOB, {"Email": "after"})
        await bus.publish([own])
        await rec.until(lambda r: {from_james, own.eventId} <= set(r.ids()))
        assert skipped not in rec.ids()
        assert rec.gaps == 1
    finally:
        await bus.stop()  # while the proxy still relays, so the queue is deleted
        await proxy.close()


async def _no_connection(name: str) -> bool:
    return name not in await connection_names()


async def _queue_gone(name: str) -> bool:
    return name not in await queues()


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_queue_lifetime_and_type(make_bus: BusFactory, james: James, queue_type: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    require_rabbitmqctl()
    bus, rec = await make_bus(subscribe=[BOB], amqp_queue_type=queue_type)
    info = (await queues())[bus.queue_name]
    assert info["type"] == queue_type
    arguments = {k: v for k, _, v in info["arguments"]}
    assert arguments["x-queue-type"] == queue_type
    if queue_type == "quorum":
        # Quorum queues cannot be exclusive: the broker expires them instead once the node has gone.
        assert info["durable"] is True
        assert info["exclusive"] is not True  # rabbitmqctl shows "" for quorum queues
        assert arguments["x-expires"] > 0
    else:
        assert info["exclusive"] is True
    assert f"jmap-push-gateway-{bus.node_id}" in await connection_names()
    event = await james.publish(BOB, {"Email": "q"})
    await rec.until_event(event)

    with caplog.at_level(logging.WARNING, logger="gateway.bus"):
        await bus.stop()
    assert [r.getMessage() for r in caplog.records if r.name.startswith("gateway.bus")] == []  # a clean close
    assert not bus.ready
    assert bus.queue_name not in await queues()
    # A passive declare confirms it from the protocol side too.
    channel = await james.conn.channel()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await channel.declare_queue(bus.queue_name, passive=True)


@pytest.mark.parametrize("what", ["exchange", "queue"])
async def test_the_broker_breaking_a_channel_or_the_consumer_means_a_new_connection(
        make_bus: BusFactory, james: James, exchange_name: str, what: str) -> None:
    # A channel error (a bind to an exchange deleted under us) or a consumer cancelled by the broker (our
    # queue deleted) leaves the node's state unknown: it sets everything up again, as after a connection loss.
    require_rabbitmqctl()
    bus, rec = await make_bus(subscribe=[BOB])
    await bound(bus, BOB)
    if what == "exchange":
        channel = await james.conn.channel()
        await channel.exchange_delete(exchange_name)
        bus.subscribe(ALICE)  # the bind fails: NOT_FOUND closes the control channel
    else:
        proc = await asyncio.create_subprocess_exec("rabbitmqctl", "-q", "delete_queue", bus.queue_name,
                                                    stdout=asyncio.subprocess.DEVNULL)
        assert await proc.wait() == 0
    await eventually(lambda: bus.reconnects == 1 and bus.ready, timeout=20, what="a new connection, ready")
    assert rec.gaps == 1
    # The exchange was declared again with the new connection, every wanted username bound on it.
    wanted = {BOB, ALICE} if what == "exchange" else {BOB}
    assert bus.bound_usernames() == wanted
    assert await bindings_of(exchange_name) == {(routing_key(u), bus.queue_name) for u in wanted}
    event = await james.publish(BOB, {"Email": "after"})
    await rec.until_event(event)


async def test_a_broker_gone_silent_is_noticed_by_missed_heartbeats(make_bus: BusFactory, james: James) -> None:
    # The TCP connection stays up, but nothing comes from the broker any more (a hung broker, a black hole):
    # after two heartbeat intervals without a frame the node drops the connection and starts over.
    proxy = SeverableProxy.to_broker()
    await proxy.start()
    bus, rec = await make_bus(url=proxy.url(), subscribe=[BOB], amqp_heartbeat=1)
    try:
        await bound(bus, BOB)
        proxy.hold()
        await eventually(lambda: not bus.ready, timeout=10, what="the silence noticed")
        proxy.release()
        await eventually(lambda: bus.ready, timeout=15, what="ready again on a new connection")
        assert (bus.reconnects, rec.gaps) == (1, 1)
        event = await james.publish(BOB, {"Email": "after"})
        await rec.until_event(event)
    finally:
        await bus.stop()
        await proxy.close()


async def test_amqps_verifies_the_broker_with_the_cafile_of_the_url(make_bus: BusFactory, james: James,
                                                                    tmp_path: Any) -> None:
    relay = TlsRelay(str(tmp_path / "ca.pem"))
    await relay.start()
    try:
        # Not trusted by default: the certificate is self-signed.
        with pytest.raises(BusUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await make_bus(url=relay.url(""), start_timeout=5)
        bus, rec = await make_bus(url=relay.url(f"?cafile={relay.cafile}"), subscribe=[BOB])
        await bound(bus, BOB)
        event = await james.publish(BOB, {"Email": "over tls"})
        await rec.until_event(event)
        insecure, _ = await make_bus(url=relay.url("?no_verify_ssl=1"))
        assert insecure.ready
        for node in (bus, insecure):
            await node.stop()  # while the relay still carries their connections
    finally:
        await relay.close()


async def test_start_fails_fast_when_nothing_listens(make_bus: BusFactory) -> None:
    url = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    started = time.monotonic()
    with pytest.raises(BusUnavailableError) as info:
        await make_bus(url=url, start_timeout=5)
    assert time.monotonic() - started < 5
    assert "secret" not in str(info.value)


async def test_start_fails_with_the_brokers_reason_for_bad_credentials_or_vhost(make_bus: BusFactory,
                                                                              broker_url: str) -> None:
    wrong_password = str(URL(broker_url).with_password("not-the-password"))
    with pytest.raises(BusUnavailableError, match="ACCESS_REFUSED") as info:
        await make_bus(url=wrong_password, start_timeout=5)
    assert "not-the-password" not in str(info.value)
    no_such_vhost = str(URL(broker_url).with_path("/no-such-vhost"))
    with pytest.raises(BusUnavailableError, match="no-such-vhost"):
        await make_bus(url=no_such_vhost, start_timeout=5)


async def test_start_gives_up_after_the_timeout_when_the_broker_hangs(make_bus: BusFactory) -> None:
    server = SilentServer()
    await server.start()
    try:
        started = time.monotonic()
        with pytest.raises(BusUnavailableError):
            await make_bus(url=f"amqp://guest:guest@127.0.0.1:{server.port}/", start_timeout=1)
        assert time.monotonic() - started < 5
    finally:
        await server.close()


# --- many bindings --------------------------------------------------------------------------------------

async def test_random_subscription_churn_converges_to_the_last_request(make_bus: BusFactory,
                                                                      exchange_name: str) -> None:
    require_rabbitmqctl()
    bus, _ = await make_bus()
    rng = random.Random(8887)
    users = [f"user{i}@example.com" for i in range(40)]
    wanted: set[str] = set()
    for step in range(600):
        username = rng.choice(users)
        if rng.random() < 0.55:
            bus.subscribe(username)
            wanted.add(username)
        else:
            bus.unsubscribe(username)
            wanted.discard(username)
        if step % 7 == 0:
            await asyncio.sleep(0)  # let the reconciler run between some of the calls
    async with asyncio.timeout(10):
        await bus.settled()
    assert bus.bound_usernames() == wanted
    assert await bindings_of(exchange_name) == {(routing_key(u), bus.queue_name) for u in wanted}


async def test_thousands_of_bindings_are_restored_after_a_cut(make_bus: BusFactory,
                                                               exchange_name: str) -> None:
    require_rabbitmqctl()
    proxy = SeverableProxy.to_broker()
    await proxy.start()
    users = [f"user{i}@example.com" for i in range(1500)]  # three batches
    bus, rec = await make_bus(url=proxy.url(), subscribe=users)
    try:
        assert bus.bound_usernames() == set(users)
        proxy.sever()
        await eventually(lambda: not bus.ready, what="ready False after the cut")
        proxy.restore()
        await eventually(lambda: bus.ready, timeout=30, what="ready again")
        assert bus.bound_usernames() == set(users)
        assert len(bus.bound_usernames()) == len(users)
        assert rec.gaps == 1
        bindings = await bindings_of(exchange_name)
        assert bindings == {(routing_key(u), bus.queue_name) for u in users}
    finally:
        await bus.stop()
        await proxy.close()
