"""Publishers: pipelined HTTP/1.1 over a few keep-alive connections (every system's publish contract), and AMQP
to Apache James's exchange for the gateway's RabbitMQ bus.

Open loop: `publish` writes and returns; answers are counted as they come back, never awaited per event, so a
slow server shows up as latency (and as outstanding requests), not as a slower publisher.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any


class _Conn(asyncio.Protocol):
    def __init__(self, owner: HttpPublisher) -> None:
        self.owner = owner
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.pending = 0  # requests written on this connection and not answered yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.owner.lost += 1
        # Whatever was in flight here will never be answered: count it as failed, not as outstanding forever.
        self.owner.errors += self.pending
        if self.pending and self.owner.first_error is None:
            self.owner.first_error = f"connection closed by the server with {self.pending} requests unanswered"
        self.pending = 0

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1").split("\r\n")
            length = 0
            chunked = False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                stop = buf.find(b"0\r\n\r\n", end + 4)  # answers here are tiny: the last chunk ends them
                if stop < 0:
                    return
                total = stop + 5
            else:
                total = end + 4 + length
                if len(buf) < total:
                    return
            status = int(head[0].split(" ")[1])
            body = bytes(buf[end + 4:total])
            del buf[:total]
            self.pending -= 1
            self.owner.answered(status, body)


class HttpPublisher:
    def __init__(self, host: str, port: int, connections: int = 4) -> None:
        self.host = host
        self.port = port
        self.n = connections
        self.conns: list[_Conn] = []
        self.sent = 0
        self.ok = 0
        self.errors = 0
        self.lost = 0
        self.first_error: str | None = None
        self._i = 0
        self._idle: asyncio.Event | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.n):
            _, proto = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
            self.conns.append(proto)

    async def ensure(self) -> int:
        """Replace connections the server closed (idle keep-alive timeouts between measurements)."""
        loop = asyncio.get_running_loop()
        replaced = 0
        for i, c in enumerate(self.conns):
            if c.lost:
                _, self.conns[i] = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
                replaced += 1
        return replaced

    @property
    def outstanding(self) -> int:
        return self.sent - self.ok - self.errors

    def publish(self, request: bytes) -> None:
        conn = self.conns[self._i % self.n]
        self._i += 1
        if conn.lost:
            conn = next((c for c in self.conns if not c.lost), conn)
        assert conn.transport is not None
        self.sent += 1
        if conn.lost:
            self.errors += 1  # every connection is gone: counted as a failed publish, seen in the results
            return
        conn.pending += 1
        conn.transport.write(request)

    def answered(self, status: int, body: bytes) -> None:
        if 200 <= status < 300:
            self.ok += 1
        else:
            self.errors += 1
            if self.first_error is None:
                self.first_error = f"HTTP {status}: {body[:200]!r}"
        if self._idle is not None and self.outstanding <= 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until every request has its answer (or failed with its connection); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.outstanding > 0 and time.monotonic() < deadline:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), min(0.5, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                pass
            finally:
                self._idle = None
        return self.outstanding <= 0

    def close(self) -> None:
        for c in self.conns:
            if c.transport is not None:
                c.transport.close()
        self.conns = []


class AmqpPublisher:
    """Publishes James-format StateChangeEvents to `jmapEvent-exchange` (DESIGN.md §5), as a James node does."""

    def __init__(self, url: str = "amqp://guest:guest@127.0.0.1:5672/", exchange: str = "jmapEvent-exchange") -> None:
        self.url = url
        self.exchange_name = exchange
        self.connection: Any = None
        self.exchange: Any = None
        self.sent = 0
        self.ok = 0
        self.errors = 0
        self.first_error: str | None = None
        self.node = "00000000-0000-4000-8000-00000000be9c"

    async def open(self) -> None:
        import aio_pika

        self.connection = await aio_pika.connect(self.url, timeout=10)
        # No publisher confirms: the open loop must not wait for the broker per message (latency is measured
        # at the subscribers, so a lost message would show as missing, not hide).
        channel = await self.connection.channel(publisher_confirms=False)
        self.exchange = await channel.declare_exchange(self.exchange_name, aio_pika.ExchangeType.DIRECT,
                                                       durable=True)

    async def publish(self, username: str, body: bytes) -> None:
        import aio_pika

        message = aio_pika.Message(body, content_type="text/plain", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   headers={"eventBusId": self.node})
        self.sent += 1
        try:
            # Not mandatory, as James publishes: an event for a user no node listens to is simply dropped.
            await self.exchange.publish(message, routing_key=f"AccountIdRegistrationKey:{username}", mandatory=False)
            self.ok += 1
        except Exception as exc:
            self.errors += 1
            if self.first_error is None:
                self.first_error = f"{type(exc).__name__}: {exc}"

    @property
    def outstanding(self) -> int:
        return 0

    async def drain(self, timeout: float) -> bool:
        return True

    async def aclose(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None


class _Stream(asyncio.Protocol):
    def __init__(self, owner: NdjsonPublisher) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.answer = bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.answer += data  # only at the end of the stream (or an early error answer)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(bytes(self.answer))


class NdjsonPublisher:
    """The gateway's injector path: a few long `POST /admin/events` requests in `application/x-ndjson`, one event
    per line, each written as one chunk (chunked transfer coding). Open loop like HttpPublisher, but there is no
    answer per event: the gateway answers each stream once, when it ends, with how many events it accepted, which
    `aclose` checks against what was sent."""

    def __init__(self, host: str, port: int, head: bytes, connections: int = 1) -> None:
        self.host = host
        self.port = port
        self.head = head
        self.n = max(1, connections)
        self.streams: list[_Stream] = []
        self.sent = 0
        self.ok = 0
        self.errors = 0
        self.lost = 0
        self.first_error: str | None = None
        self._i = 0

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(self.n):
            _, stream = await loop.create_connection(lambda: _Stream(self), self.host, self.port)
            assert stream.transport is not None
            stream.transport.write(self.head)
            self.streams.append(stream)

    @property
    def outstanding(self) -> int:
        return 0

    def publish(self, line: bytes) -> None:
        stream = self.streams[self._i % self.n]
        self._i += 1
        self.sent += 1
        if stream.done.done() or stream.transport is None:
            self.errors += 1
            if self.first_error is None:
                self.first_error = f"the gateway ended an event stream early: {bytes(stream.answer)[:200]!r}"
            return
        stream.transport.write(b"%x\r\n%s\r\n" % (len(line), line))

    async def drain(self, timeout: float) -> bool:
        return True

    async def aclose(self) -> None:
        """End every stream; its answer must count every event written to it."""
        accepted = 0
        for stream in self.streams:
            if stream.transport is not None and not stream.done.done():
                stream.transport.write(b"0\r\n\r\n")
            try:
                answer = await asyncio.wait_for(asyncio.shield(stream.done), 5)
            except TimeoutError:
                answer = bytes(stream.answer)
            if stream.transport is not None:
                stream.transport.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            if b" 202 " in head.split(b"\r\n", 1)[0]:
                marker = body.find(b'"accepted":')
                if marker >= 0:
                    digits = body[marker + 11:].split(b"}", 1)[0].strip()
                    accepted += int(digits or 0)
            elif self.first_error is None:
                self.first_error = f"event stream answered {answer[:200]!r}"
        self.ok = accepted
        if accepted < self.sent - self.errors and self.first_error is None:
            self.first_error = f"the gateway accepted {accepted} of {self.sent} streamed events"
        self.streams = []
