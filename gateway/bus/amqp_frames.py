"""AMQP 0-9-1 framing for the RabbitMQ bus, sans I/O: bytes in -> whole deliveries and other frames out, and the
frames the bus writes as bytes. No sockets and no clock here.

The consume path (`basic.deliver`, its content header and body frames, and the `basic.ack` / `basic.reject` that
settle it) runs once per message, so it is parsed and built by hand with `struct` (AMQP 0-9-1 §4.2.3 general
frame format, §4.2.6 content framing). Every other method goes through pamqp, whose generic codec costs tens of
microseconds a frame: fine for a handshake or a binding, not for every event.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import msgspec
from pamqp import commands, frame
from pamqp.base import Frame
from pamqp.common import FieldTable
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from gateway.errors import GatewayError

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"
# Frames may not exceed 4096 bytes before connection.tune has settled the size (§4.2.3, frame-min-size); the
# parser accepts up to this until the connection tells it the negotiated one.
INITIAL_FRAME_MAX = 131_072

_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_CLASS_METHOD = struct.Struct(">I")
_TAG = struct.Struct(">Q")
_BODY_SIZE = struct.Struct(">Q")
_DELIVER = (60 << 16) | 60  # basic.deliver
# basic.ack (60, 80) and basic.reject (60, 90): delivery-tag longlong, then one bit (multiple / requeue).
_SETTLE = struct.Struct(">BHIHHQBB")
_PUBLISH_HEAD = struct.Struct(">BHIHHH")  # method frame head + class, method, reserved-1 of basic.publish
_CONTENT_HEAD = struct.Struct(">BHIHHQ")  # header frame head + class, weight, body size


_HEARTBEAT_FRAME = Heartbeat()


class FrameError(GatewayError):
    """The peer sent bytes that are not AMQP 0-9-1 frames (a connection error: the connection must close)."""


class Delivery(msgspec.Struct, gc=False):
    """One message handed to our consumer: its delivery tag, and the raw parts the bus reads only when it
    has to (the routing key and properties are logged for a poison message, never decoded otherwise)."""

    channel: int
    delivery_tag: int
    body: bytes
    deliver_args: bytes  # basic.deliver's arguments after the delivery tag: redelivered, exchange, routing key
    header: bytes  # the content header payload (class, weight, body size, property flags and list)

    @property
    def routing_key(self) -> str:
        args = self.deliver_args
        exchange_end = 2 + args[1]
        return args[exchange_end + 1:exchange_end + 1 + args[exchange_end]].decode("utf-8", "replace")

    @property
    def headers(self) -> dict[str, object]:
        """The message's header table (empty if it has none or it cannot be read)."""
        content = ContentHeader()
        try:
            content.unmarshal(self.header)
        except (struct.error, ValueError, UnmarshalingException):
            return {}
        return dict(content.properties.headers or {})


class FrameParser:
    """Cuts a byte stream into frames. Deliveries are assembled and returned by `feed`, in arrival order;
    every other frame goes to `on_frame(channel, frame)` at once (pamqp objects; heartbeats included)."""

    def __init__(self, on_frame: Callable[[int, object], None]) -> None:
        self._on_frame = on_frame
        self._rest = b""
        self.frame_max = INITIAL_FRAME_MAX
        # The delivery being assembled: (channel, tag, deliver args), then its header and body parts.
        self._pending: tuple[int, int, bytes] | None = None
        self._header = b""
        self._size = -1  # body size from the content header; -1 while the header is still to come
        self._parts: list[bytes] = []
        self._have = 0

    def feed(self, data: bytes) -> list[Delivery]:
        """Take the next bytes of the stream; return the deliveries they completed. Raises FrameError."""
        if self._rest:
            data = self._rest + data
            self._rest = b""
        out: list[Delivery] = []
        pos = 0
        end = len(data)
        head = _HEAD.unpack_from
        while end - pos >= 7:  # a frame header is 7 bytes; its end octet follows the payload
            ftype, channel, size = head(data, pos)
            stop = pos + 7 + size  # index of the frame-end octet
            if stop >= end:
                if size > self.frame_max:
                    raise FrameError(f"frame of {size} bytes exceeds frame-max {self.frame_max}")
                break
            if data[stop] != FRAME_END:
                raise FrameError(f"frame end octet {data[stop]:#x} instead of 0xce")
            if ftype == FRAME_METHOD and size >= 4 and _CLASS_METHOD.unpack_from(data, pos + 7)[0] == _DELIVER:
                if self._pending is not None:
                    raise FrameError("basic.deliver before the previous delivery's content was complete")
                # consumer-tag shortstr, then delivery-tag longlong (§1.8.3.9 of the 0-9-1 reference).
                p = pos + 12 + data[pos + 11]
                self._pending = (channel, _TAG.unpack_from(data, p)[0], data[p + 8:stop])
                self._size = -1
            elif ftype == FRAME_HEADER and self._pending is not None and channel == self._pending[0]:
                self._header = data[pos + 7:stop]
                self._size = _BODY_SIZE.unpack_from(data, pos + 11)[0]
                self._have = 0
                if self._size == 0:
                    out.append(self._complete(b""))
            elif ftype == FRAME_BODY and self._pending is not None and channel == self._pending[0] \
                    and self._size >= 0:
                if not self._parts and size == self._size:
                    out.append(self._complete(data[pos + 7:stop]))  # the usual case: one body frame
                else:
                    self._parts.append(data[pos + 7:stop])
                    self._have += size
                    if self._have >= self._size:
                        body = b"".join(self._parts)
                        self._parts = []
                        out.append(self._complete(body))
            elif ftype == FRAME_HEARTBEAT:
                self._on_frame(channel, _HEARTBEAT_FRAME)
            elif ftype == FRAME_METHOD:
                try:
                    _, _, method = frame.unmarshal(data[pos:stop + 1])
                except UnmarshalingException as exc:
                    raise FrameError(f"cannot read a method frame: {exc}") from None
                self._on_frame(channel, method)
            elif ftype in (FRAME_HEADER, FRAME_BODY):
                pass  # content of a basic.return or basic.get-ok: the bus uses neither (publishes are not mandatory)
            else:
                raise FrameError(f"unknown frame type {ftype}")
            pos = stop + 1
        if pos < end:
            self._rest = data[pos:]
        return out

    def _complete(self, body: bytes) -> Delivery:
        pending = self._pending
        assert pending is not None
        self._pending = None
        self._size = -1
        return Delivery(pending[0], pending[1], body, pending[2], self._header)


# --- frames out ------------------------------------------------------------------------------------------

def method(channel: int, value: Frame) -> bytes:
    """A method frame (pamqp's codec; not for the per-message path)."""
    return frame.marshal(value, channel)


def ack(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    """basic.ack; with `multiple` it settles every outstanding tag up to and including this one (§1.8.3.13)."""
    return _SETTLE.pack(FRAME_METHOD, channel, 13, 60, 80, delivery_tag, 1 if multiple else 0, FRAME_END)


def reject(channel: int, delivery_tag: int, requeue: bool) -> bytes:
    """basic.reject of one delivery (§1.8.3.14)."""
    return _SETTLE.pack(FRAME_METHOD, channel, 13, 60, 90, delivery_tag, 1 if requeue else 0, FRAME_END)


def properties(content_type: str, delivery_mode: int, headers: FieldTable) -> bytes:
    """The property flags and list of a content header, built once and reused for every publish."""
    props = commands.Basic.Properties(content_type=content_type, delivery_mode=delivery_mode, headers=headers)
    return props.marshal()


def publish(channel: int, exchange: bytes, routing_key: bytes, props: bytes, body: bytes, frame_max: int) -> bytes:
    """basic.publish (not mandatory, not immediate), its content header and body frames, as one buffer.

    `exchange` and `routing_key` are encoded shortstrs' contents (at most 255 bytes each); `props` comes from
    `properties()`.
    """
    if len(exchange) > 255 or len(routing_key) > 255:
        raise ValueError("exchange and routing key are at most 255 bytes")
    size = 4 + 2 + 1 + len(exchange) + 1 + len(routing_key) + 1
    parts = [
        _PUBLISH_HEAD.pack(FRAME_METHOD, channel, size, 60, 40, 0),
        bytes((len(exchange),)), exchange, bytes((len(routing_key),)), routing_key, b"\x00\xce",
        _CONTENT_HEAD.pack(FRAME_HEADER, channel, 12 + len(props), 60, 0, len(body)), props, b"\xce",
    ]
    chunk = max(1, frame_max - 8)  # a body frame's payload: frame-max minus the frame's own 8 bytes
    for start in range(0, len(body), chunk):
        piece = body[start:start + chunk]
        parts += (_HEAD.pack(FRAME_BODY, channel, len(piece)), piece, b"\xce")
    return b"".join(parts)
