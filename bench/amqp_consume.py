"""CPU per consumed RabbitMQ message for four ways of consuming, the same prefilled queue for each: what the bus's
consume path costs, without the hub, the sockets or the clients (bench/README.md, "RabbitMQ bus").

- aio-pika:          `queue.consume` with a callback per message and one `basic.ack` per message (the bus before
                     issue 13);
- aio-pika batched:  the same consumer; the callback only collects, one `call_soon` per loop turn decodes them,
                     calls the handler once and sends one `basic.ack` with `multiple`;
- aiormq batched:    aiormq's `basic_consume` on the channel under aio-pika (no `IncomingMessage`, still a task
                     per delivery), batched the same way;
- gateway:           gateway.bus.amqp_connection, the bus's own connection: every delivery of one socket read as
                     one batch, settled with one write.

Every variant decodes each body with `gateway.bus.events.decode_body` and hands the batch to a handler that only
counts. The queue is filled first (James's format, by a separate connection), then a consumer process pinned to
CPU 0 drains it; its CPU time (user + system, all threads) from the first delivery to the last is divided by the
number of messages. Rounds rotate the order of the variants. Not a test (plain script, not part of `make bench`).

    .venv/bin/python bench/amqp_consume.py --messages 30000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("aio-pika", "aio-pika batched", "aiormq batched", "gateway")
EVENT = (b'{"type":"org.apache.james.jmap.change.StateChangeEvent","eventId":"%s","username":"bench%05d@example.com",'
         b'"typeStates":{"Email":"t%d-%d"}}')


async def fill(url: str, queue: str, n: int) -> None:
    """Declare `queue` and put n James events in it (default exchange, routing key = queue name)."""
    from pamqp import commands

    sys.path.insert(0, ROOT)
    from gateway.bus import amqp_frames as wire
    from gateway.bus.amqp_connection import AmqpConnection

    conn = await AmqpConnection.connect(url, heartbeat=0, connection_name="bench-fill",
                                        on_deliveries=lambda _c, _b: None, on_lost=lambda _e: None)
    await conn.open_channel(1, confirms=True)
    await conn.rpc(1, commands.Queue.Declare(queue=queue))
    props = wire.properties("text/plain", 2, {"eventBusId": "bench-james"})
    for first in range(0, n, 1000):
        messages = [wire.publish(1, b"", queue.encode(), props,
                                 EVENT % (uuid.uuid4().hex.encode(), i % 10_000, time.monotonic_ns(), i),
                                 conn.frame_max) for i in range(first, min(n, first + 1000))]
        await asyncio.gather(*conn.publish(1, messages))
    await conn.close()


async def delete(url: str, queue: str) -> None:
    from pamqp import commands

    from gateway.bus.amqp_connection import AmqpConnection

    conn = await AmqpConnection.connect(url, heartbeat=0, connection_name="bench-fill",
                                        on_deliveries=lambda _c, _b: None, on_lost=lambda _e: None)
    await conn.open_channel(1)
    await conn.rpc(1, commands.Queue.Delete(queue=queue))
    await conn.close()


def consumer_main(pipe: Connection, variant: str, url: str, queue: str, n: int, prefetch: int) -> None:
    os.sched_setaffinity(0, {0})
    sys.path.insert(0, ROOT)
    import uvloop

    pipe.send(uvloop.run(consume(variant, url, queue, n, prefetch)))


async def consume(variant: str, url: str, queue: str, n: int, prefetch: int) -> tuple[float, float]:
    """Drain n messages; return (CPU µs per message, messages per handler call)."""
    import aio_pika

    from gateway.bus import amqp_frames as wire
    from gateway.bus.amqp_connection import AmqpConnection
    from gateway.bus.events import StateChangeEvent, decode_body

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    count = calls = 0
    started: float | None = None

    def handler(events: list[StateChangeEvent]) -> None:
        nonlocal calls
        calls += 1

    def take(bodies: list[bytes]) -> None:
        nonlocal count, started
        if started is None:
            started = time.process_time()
        events: list[StateChangeEvent] = []
        for body in bodies:
            decoded = decode_body(body)
            if isinstance(decoded, list):
                events += decoded
            else:
                events.append(decoded)
        handler(events)
        count += len(bodies)
        if count >= n and not done.done():
            done.set_result(None)

    conn: Any = None
    if variant == "gateway":
        def on_deliveries(c: AmqpConnection, batch: list[Any]) -> None:
            take([d.body for d in batch])
            c.write(wire.ack(1, batch[-1].delivery_tag, True))

        from pamqp import commands
        conn = await AmqpConnection.connect(url, heartbeat=0, connection_name="bench-consume",
                                            on_deliveries=on_deliveries, on_lost=lambda _e: None)
        await conn.open_channel(1)
        await conn.rpc(1, commands.Basic.Qos(prefetch_count=prefetch))
        await conn.rpc(1, commands.Basic.Consume(queue=queue))
    else:
        conn = await aio_pika.connect(url)
        channel = await conn.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        q = await channel.declare_queue(queue, passive=True)
        raw = await channel.get_underlay_channel()
        pending: list[tuple[bytes, int]] = []
        acks: set[asyncio.Task[None]] = set()

        def flush() -> None:
            batch = pending[:]
            pending.clear()
            take([body for body, _ in batch])
            task = loop.create_task(raw.basic_ack(batch[-1][1], multiple=True, wait=False))
            acks.add(task)
            task.add_done_callback(acks.discard)

        if variant == "aio-pika":
            async def per_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                take([message.body])
                await message.ack()

            await q.consume(per_message)
        elif variant == "aio-pika batched":
            def collect(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                if not pending:
                    loop.call_soon(flush)
                pending.append((message.body, message.delivery_tag or 0))

            await q.consume(collect)  # type: ignore[arg-type]  # aio-pika runs a plain function too
        else:
            async def collect_raw(message: Any) -> None:
                if not pending:
                    loop.call_soon(flush)
                pending.append((message.body, message.delivery.delivery_tag))

            await raw.basic_consume(queue, collect_raw, no_ack=False)
    await asyncio.wait_for(done, 600)
    assert started is not None
    cpu = time.process_time() - started
    await conn.close()
    return cpu / n * 1e6, n / max(1, calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--amqp-url", default=os.environ.get("GATEWAY_AMQP_URL",
                                                             "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    variants = args.variants.split(",")
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {1})  # the filler and this process stay off the consumer's core
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            queue = f"bench-consume-{uuid.uuid4().hex[:8]}"
            asyncio.run(fill(args.amqp_url, queue, args.messages))
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=consumer_main, args=(theirs, v, args.amqp_url, queue, args.messages,
                                                           args.prefetch))
            proc.start()
            try:
                us, per_call = ours.recv()
            finally:
                proc.join(60)
                asyncio.run(delete(args.amqp_url, queue))
            results[v].append((us, per_call))
            print(f"round {r + 1}: {v:17s} {us:7.1f} µs/message, {per_call:6.1f} messages per handler call",
                  flush=True)
    print("\n| consumer | CPU µs per message, median (range) | messages per handler call |\n|---|---|---|")
    for v in variants:
        us = [u for u, _ in results[v]]
        calls = statistics.median(c for _, c in results[v])
        print(f"| {v} | {statistics.median(us):.1f} ({min(us):.1f}-{max(us):.1f}) | {calls:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
