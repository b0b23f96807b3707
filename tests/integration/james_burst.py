"""A stand-in for an Apache James node in its own process: publishes a burst of StateChangeEvents for one user to
the exchange, exactly as James writes them (one message per event, `eventBusId`, text/plain, persistent), with
publisher confirms, then prints one line and exits. Not a test; run by test_amqp_gateway.py:

    python tests/integration/james_burst.py <amqp url> <exchange> <username> <count>

Event i carries `Email` and `Mailbox` = `burst-<i>` (states no mail store ever has) and the custom type
`urn:example:Calendar` = `cal-<i>`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

import aio_pika

STATE_CHANGE_EVENT = "org.apache.james.jmap.change.StateChangeEvent"
WINDOW = 500  # messages in flight before waiting for their confirms


async def main(url: str, exchange_name: str, username: str, count: int) -> None:
    conn = await aio_pika.connect(url, client_properties={"connection_name": "test-james-burst"})
    async with conn:
        channel = await conn.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.DIRECT, durable=True)
        key = f"AccountIdRegistrationKey:{username}"
        for first in range(0, count, WINDOW):
            publishes = []
            for i in range(first, min(count, first + WINDOW)):
                body = {"type": STATE_CHANGE_EVENT, "eventId": str(uuid.uuid4()), "username": username,
                        "typeStates": {"Email": f"burst-{i}", "Mailbox": f"burst-{i}",
                                       "urn:example:Calendar": f"cal-{i}"}}
                message = aio_pika.Message(json.dumps(body).encode(), headers={"eventBusId": "james-burst-node"},
                                           content_type="text/plain", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                publishes.append(exchange.publish(message, routing_key=key, mandatory=False))
            await asyncio.gather(*publishes)
    print(f"published {count}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
