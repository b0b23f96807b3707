"""One AMQP 0-9-1 connection to RabbitMQ, as the bus needs it (an asyncio protocol): handshake, heartbeats,
synchronous methods answered in order per channel, publisher confirms, and deliveries handed over once per read.

No reconnection policy and no bus semantics here (gateway/bus/amqp.py owns both). One rule keeps it small: a
channel closed or a consumer cancelled by the broker ends the whole connection, and the owner sets everything
up again on a new one, as after any other connection loss.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from pamqp import commands
from pamqp.base import Frame
from pamqp.common import FieldTable
from pamqp.heartbeat import Heartbeat
from yarl import URL

from gateway.bus import amqp_frames as wire
from gateway.bus.amqp_frames import Delivery, FrameError, FrameParser
from gateway.errors import Unavailable

log = logging.getLogger(__name__)

DeliveriesHandler = Callable[["AmqpConnection", list[Delivery]], None]
LostHandler = Callable[[BaseException | None], None]

# What we ask for at connection.tune (the broker's own limits win when lower).
CHANNEL_MAX = 16
FRAME_MAX = 131_072
PRODUCT = "jmap-push-gateway"


class AmqpError(Unavailable):
    """The broker closed the connection or a channel (with its reply code and text), or the socket went."""

    def __init__(self, text: str, reply_code: int = 0) -> None:
        super().__init__(text)
        self.reply_code = reply_code


class AmqpConnection(asyncio.Protocol):
    """A connected, opened AMQP connection (build it with `connect`). Not thread-safe; one event loop."""

    def __init__(self, on_deliveries: DeliveriesHandler, on_lost: LostHandler) -> None:
        self._on_deliveries = on_deliveries
        self._on_lost: LostHandler | None = on_lost
        self._parser = FrameParser(self._on_frame)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        # Synchronous methods sent and not answered yet, per channel, in the order sent: AMQP answers them in
        # that order (0-9-1 §2.2.3, "synchronous requests").
        self._waiters: dict[int, deque[tuple[str, asyncio.Future[Any]]]] = {}
        self._confirms: dict[int, dict[int, asyncio.Future[None]]] = {}  # channel -> publish seq -> confirm
        self._next_seq: dict[int, int] = {}
        self._error: BaseException | None = None
        self._closing = False
        self._reads = 0
        self._heartbeat = 0
        self._timer: asyncio.TimerHandle | None = None
        self._idle_ticks = 0
        self._last_reads = 0
        self.frame_max = wire.INITIAL_FRAME_MAX
        self.server_properties: dict[str, Any] = {}

    # --- opening ---------------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str, *, heartbeat: int, connection_name: str, on_deliveries: DeliveriesHandler,
                      on_lost: LostHandler) -> AmqpConnection:
        """Open a TCP (amqps: TLS) connection and run the handshake (§2.2.4); bound it with asyncio.timeout.

        The URL gives host, port, user, password and virtual host (`amqp://user:pass@host:5672/vhost`; a
        path of `/` or none is the default `/`). With `amqps` the query may name `cafile`, `certfile` and
        `keyfile` (a client certificate), or set `no_verify_ssl=1`, as aio-pika's URLs do. Raises OSError or
        AmqpError.
        """
        parsed = URL(url)
        tls = parsed.scheme == "amqps"
        host = parsed.host or "127.0.0.1"
        port = parsed.port or (5671 if tls else 5672)
        context = _tls_context(parsed) if tls else None
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: cls(on_deliveries, on_lost), host, port, ssl=context,
                                               server_hostname=host if tls else None)
        try:
            await conn._handshake(parsed.user or "guest", parsed.password or "guest", parsed.path[1:] or "/",
                                  heartbeat, connection_name)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _handshake(self, user: str, password: str, vhost: str, heartbeat: int, name: str) -> None:
        start = self._expect(0, "Connection.Start")
        self._write(wire.PROTOCOL_HEADER)
        started = await start
        self.server_properties = dict(started.server_properties or {})
        mechanisms = started.mechanisms
        if isinstance(mechanisms, bytes):
            mechanisms = mechanisms.decode("latin-1")
        if "PLAIN" not in str(mechanisms).split():
            raise AmqpError(f"the broker offers no PLAIN authentication ({started.mechanisms!r})")
        properties: FieldTable = {
            "connection_name": name, "product": PRODUCT, "platform": "Python",
            "capabilities": {"publisher_confirms": True, "basic.nack": True, "consumer_cancel_notify": True,
                             "connection.blocked": True, "authentication_failure_close": True},
        }
        tune = self._expect(0, "Connection.Tune")
        self._send(0, commands.Connection.StartOk(client_properties=properties, mechanism="PLAIN",
                                                  response=f"\0{user}\0{password}", locale="en_US"))
        tuned = await tune
        channel_max = min(CHANNEL_MAX, tuned.channel_max or CHANNEL_MAX)
        self.frame_max = min(FRAME_MAX, tuned.frame_max or FRAME_MAX)
        # 0 from us switches heartbeats off; otherwise the smaller of the two, as RabbitMQ's clients negotiate.
        self._heartbeat = 0 if heartbeat == 0 else min(heartbeat, tuned.heartbeat or heartbeat)
        self._send(0, commands.Connection.TuneOk(channel_max=channel_max, frame_max=self.frame_max,
                                                 heartbeat=self._heartbeat))
        self._parser.frame_max = self.frame_max
        await self._rpc(0, commands.Connection.Open(virtual_host=vhost))
        if self._heartbeat:
            self._timer = self._loop.call_later(self._heartbeat / 2, self._tick)

    # --- the operations the bus uses ---------------------------------------------------------------------

    async def open_channel(self, channel: int, *, confirms: bool = False) -> None:
        await self._rpc(channel, commands.Channel.Open())
        if confirms:
            await self._rpc(channel, commands.Confirm.Select())
            self._confirms[channel] = {}
            self._next_seq[channel] = 1

    def rpc(self, channel: int, value: Frame) -> asyncio.Future[Any]:
        """Send a synchronous method; the future gets the broker's answer (or an AmqpError)."""
        return self._rpc(channel, value)

    def send(self, channel: int, value: Frame) -> None:
        """Send a method that has no answer (e.g. with `nowait`)."""
        self._check()
        self._send(channel, value)

    def write(self, data: bytes) -> None:
        """Send frames built by the caller (acknowledgements of a batch, in one write)."""
        self._check()
        self._write(data)

    def publish(self, channel: int, messages: list[bytes]) -> list[asyncio.Future[None]]:
        """Write already-framed messages (`amqp_frames.publish`) on a confirm channel, in one write; each
        future completes when the broker confirms that message (§ "publisher confirms", RabbitMQ extension)."""
        self._check()
        pending = self._confirms[channel]
        seq = self._next_seq[channel]
        futures = []
        for _ in messages:
            fut: asyncio.Future[None] = self._loop.create_future()
            fut.add_done_callback(_retrieve)
            pending[seq] = fut
            futures.append(fut)
            seq += 1
        self._next_seq[channel] = seq
        self._write(b"".join(messages))
        return futures

    async def close(self) -> None:
        """connection.close and wait for close-ok (bound it with asyncio.timeout); then the socket closes."""
        if self._transport is None or self._error is not None:
            return
        self._closing = True
        try:
            await self._rpc(0, commands.Connection.Close(reply_code=200, reply_text="bye", class_id=0,
                                                         method_id=0))
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the socket now (connection_lost follows)."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._error is None

    # --- asyncio.Protocol --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._reads += 1
        try:
            deliveries = self._parser.feed(data)
        except FrameError as exc:
            log.warning("RabbitMQ sent something that is not AMQP 0-9-1 (%s); closing the connection", exc)
            self._fail(AmqpError(str(exc)))
            self.abort()
            return
        if deliveries and self._error is None:
            # Everything one read completed, as one batch: the owner decodes, hands over and settles it.
            self._on_deliveries(self, deliveries)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail(exc if exc is not None else AmqpError("the connection to RabbitMQ was closed"))
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost(exc)

    # --- internals ---------------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._error is not None:
            raise AmqpError(f"the connection is unusable: {self._error}")
        if self._transport is None:
            raise AmqpError("not connected")

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():  # uvloop raises on a closed handle
            transport.write(data)

    def _send(self, channel: int, value: Frame) -> None:
        self._write(wire.method(channel, value))

    def _expect(self, channel: int, name: str) -> asyncio.Future[Any]:
        if self._error is not None:
            raise AmqpError(f"the connection is unusable: {self._error}")
        fut: asyncio.Future[Any] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        self._waiters.setdefault(channel, deque()).append((name, fut))
        return fut

    def _rpc(self, channel: int, value: Frame) -> asyncio.Future[Any]:
        self._check()
        fut = self._expect(channel, value.name + "Ok")
        self._send(channel, value)
        return fut

    def _on_frame(self, channel: int, value: object) -> None:
        if isinstance(value, Heartbeat):
            return  # reads are counted in data_received; nothing else to do
        assert isinstance(value, Frame)
        if isinstance(value, commands.Basic.Ack | commands.Basic.Nack):
            self._on_confirm(channel, value)
        elif isinstance(value, commands.Channel.Close):
            self._send(channel, commands.Channel.CloseOk())
            self._broken(AmqpError(f"RabbitMQ closed channel {channel}: {value.reply_code} {value.reply_text}",
                                   value.reply_code or 0))
        elif isinstance(value, commands.Connection.Close):
            self._send(0, commands.Connection.CloseOk())
            self._fail(AmqpError(f"RabbitMQ closed the connection: {value.reply_code} {value.reply_text}",
                                 value.reply_code or 0))
            if self._transport is not None:
                self._transport.close()  # after the close-ok is written
        elif isinstance(value, commands.Basic.Cancel):
            self._broken(AmqpError(f"RabbitMQ cancelled the consumer on channel {channel} (queue deleted?)"))
        elif isinstance(value, commands.Connection.Blocked):
            log.warning("RabbitMQ blocked this connection (%s): publishes wait", value.reason)
        elif isinstance(value, commands.Connection.Unblocked):
            log.info("RabbitMQ unblocked this connection")
        elif isinstance(value, commands.Basic.Return | commands.Channel.Flow):
            pass  # we publish without `mandatory`, and RabbitMQ never sends channel.flow any more
        else:
            waiters = self._waiters.get(channel)
            if not waiters:
                self._broken(AmqpError(f"unexpected {value.name} on channel {channel}"))
                return
            name, fut = waiters.popleft()
            if value.name != name:
                fut.set_exception(AmqpError(f"expected {name}, got {value.name}"))
                self._broken(AmqpError(f"out of order: {value.name} on channel {channel} instead of {name}"))
            elif not fut.done():
                fut.set_result(value)

    def _on_confirm(self, channel: int, value: commands.Basic.Ack | commands.Basic.Nack) -> None:
        pending = self._confirms.get(channel)
        if not pending:
            return
        tag = value.delivery_tag or 0
        tags = [t for t in pending if t <= tag] if value.multiple else ([tag] if tag in pending else [])
        for t in tags:
            fut = pending.pop(t)
            if fut.done():
                continue
            if isinstance(value, commands.Basic.Ack):
                fut.set_result(None)
            else:
                fut.set_exception(AmqpError("RabbitMQ refused the message (basic.nack)"))

    def _broken(self, exc: AmqpError) -> None:
        """A failure that leaves the connection in an unknown state: fail everything and close it."""
        self._fail(exc)
        if self._transport is not None and not self._closing:
            self._closing = True
            self._send(0, commands.Connection.Close(reply_code=541, reply_text="INTERNAL_ERROR", class_id=0,
                                                    method_id=0))
            self._transport.close()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        for waiters in self._waiters.values():
            for _, fut in waiters:
                if not fut.done():
                    fut.set_exception(AmqpError(str(exc)) if not isinstance(exc, AmqpError) else exc)
            waiters.clear()
        for pending in self._confirms.values():
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(AmqpError(f"connection lost before the broker confirmed: {exc}"))
            pending.clear()

    def _tick(self) -> None:
        # Every half heartbeat interval: send one, and give up on a broker silent for two whole intervals.
        self._timer = None
        if self._transport is None:
            return
        if self._reads == self._last_reads:
            self._idle_ticks += 1
            if self._idle_ticks >= 4:
                log.warning("no frame from RabbitMQ for %ds (two heartbeats); dropping the connection",
                            2 * self._heartbeat)
                self._fail(AmqpError("missed heartbeats"))
                self.abort()
                return
        else:
            self._idle_ticks = 0
            self._last_reads = self._reads
        self._write(wire.HEARTBEAT)
        self._timer = self._loop.call_later(self._heartbeat / 2, self._tick)


def _tls_context(url: URL) -> ssl.SSLContext:
    query = url.query
    context = ssl.create_default_context(cafile=query.get("cafile"))
    if query.get("no_verify_ssl", "0") not in ("0", "false", ""):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if query.get("certfile"):
        context.load_cert_chain(query["certfile"], query.get("keyfile"))
    return context


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A failure nobody waits for any more (its caller timed out or went away) is not worth asyncio's
    # "exception was never retrieved" at garbage collection: the connection's loss is reported once, elsewhere.
    if not fut.cancelled():
        fut.exception()
