"""The bus's AMQP framing, bytes in and bytes out, against pamqp as the reference codec: deliveries assembled from
any cut of the stream, other frames passed on in order, malformed streams refused, and the frames we write
read back as the methods they claim to be."""

from __future__ import annotations

from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from gateway.bus import amqp_frames as wire
from gateway.bus.amqp_frames import Delivery, FrameError, FrameParser

CONSUME = 3
KEY = "AccountIdRegistrationKey:bob@example.com"


def delivery_frames(tag: int, body: bytes, *, channel: int = CONSUME, max_piece: int = 1 << 20,
                    headers: dict[str, object] | None = None) -> bytes:
    """A basic.deliver with its content, as RabbitMQ frames it (pamqp's encoder, not ours)."""
    props = commands.Basic.Properties(content_type="text/plain", delivery_mode=2,
                                      headers=cast(Any, headers or {"eventBusId": "james-1"}))
    out = [frame.marshal(commands.Basic.Deliver(consumer_tag="ctag-1.abc", delivery_tag=tag, redelivered=tag % 2 == 0,
                                                exchange="jmapEvent-exchange", routing_key=KEY), channel),
           frame.marshal(ContentHeader(0, len(body), props), channel)]
    for start in range(0, len(body), max_piece):
        out.append(frame.marshal(ContentBody(body[start:start + max_piece]), channel))
    return b"".join(out)


class Collect:
    def __init__(self) -> None:
        self.frames: list[tuple[int, object]] = []
        self.parser = FrameParser(lambda channel, value: self.frames.append((channel, value)))

    def feed_in_pieces(self, data: bytes, cuts: list[int]) -> list[Delivery]:
        out: list[Delivery] = []
        last = 0
        for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
            out += self.parser.feed(data[last:cut])
            last = max(last, cut)
        return out


def test_one_read_with_several_deliveries_returns_them_all_in_order() -> None:
    data = b"".join(delivery_frames(tag, f'{{"n":{tag}}}'.encode()) for tag in range(1, 6))
    c = Collect()
    got = c.parser.feed(data)
    assert [(d.channel, d.delivery_tag, d.body) for d in got] == [
        (CONSUME, tag, f'{{"n":{tag}}}'.encode()) for tag in range(1, 6)]
    assert got[0].routing_key == KEY
    assert got[0].headers == {"eventBusId": "james-1"}
    assert c.frames == []


@given(bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=6), piece=st.integers(1, 64),
       cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_any_cut_of_the_stream_gives_the_same_deliveries(bodies: list[bytes], piece: int, cuts: list[int]) -> None:
    # Bodies spread over several body frames (frame-max), empty bodies (no body frame), reads cut anywhere,
    # with a heartbeat and a publisher confirm on another channel in between.
    parts: list[bytes] = []
    for tag, b in enumerate(bodies, 1):
        parts.append(delivery_frames(tag, b, max_piece=piece))
        parts.append(Heartbeat.marshal())
        parts.append(frame.marshal(commands.Basic.Ack(delivery_tag=tag, multiple=False), 2))
    c = Collect()
    got = c.feed_in_pieces(b"".join(parts), cuts)
    assert [(d.delivery_tag, d.body) for d in got] == list(enumerate(bodies, 1))
    assert all(d.routing_key == KEY for d in got)
    kinds = [(ch, type(v).__name__) for ch, v in c.frames]
    assert kinds == [(0, "Heartbeat"), (2, "Ack")] * len(bodies)


def test_frames_of_other_channels_may_come_between_a_delivery_and_its_content() -> None:
    deliver, header, body = (frame.marshal(f, CONSUME) for f in (
        commands.Basic.Deliver(consumer_tag="t", delivery_tag=7, routing_key=KEY),
        ContentHeader(0, 5, commands.Basic.Properties()), ContentBody(b"hello")))
    confirm = frame.marshal(commands.Basic.Ack(delivery_tag=1), 2)
    c = Collect()
    got = c.parser.feed(deliver + confirm + header + confirm + body)
    assert [(d.delivery_tag, d.body, d.headers) for d in got] == [(7, b"hello", {})]
    assert len(c.frames) == 2


def test_method_frames_go_to_the_callback_as_pamqp_objects() -> None:
    c = Collect()
    data = frame.marshal(commands.Queue.DeclareOk(queue="q", message_count=3, consumer_count=1), 1)
    assert c.parser.feed(data[:5]) == []
    assert c.parser.feed(data[5:]) == []
    (channel, value), = c.frames
    assert channel == 1 and isinstance(value, commands.Queue.DeclareOk) and value.message_count == 3


@pytest.mark.parametrize(("data", "why"), [
    (frame.marshal(commands.Basic.QosOk(), 1)[:-1] + b"\x00", "frame end"),
    (b"\x09\x00\x01\x00\x00\x00\x00\xce", "unknown frame type"),
    (b"\x01\x00\x01\x00\x00\x00\x04\x00\x0a\x7f\x7f\xce", "cannot read"),
    (b"\x03\x00\x03\x7f\xff\xff\xff", "exceeds frame-max"),
])
def test_a_stream_that_is_not_amqp_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        Collect().parser.feed(data)


def test_a_second_deliver_before_the_content_is_refused() -> None:
    deliver = frame.marshal(commands.Basic.Deliver(consumer_tag="t", delivery_tag=1, routing_key=KEY), CONSUME)
    with pytest.raises(FrameError):
        Collect().parser.feed(deliver + deliver)


@pytest.mark.parametrize("multiple", [True, False])
def test_ack_and_reject_read_back_as_those_methods(multiple: bool) -> None:
    tag = 2**40 + 5
    _, channel, ack = frame.unmarshal(wire.ack(CONSUME, tag, multiple))
    assert channel == CONSUME and isinstance(ack, commands.Basic.Ack)
    assert (ack.delivery_tag, ack.multiple) == (tag, multiple)
    _, channel, rej = frame.unmarshal(wire.reject(CONSUME, tag, requeue=multiple))
    assert isinstance(rej, commands.Basic.Reject) and (rej.delivery_tag, rej.requeue) == (tag, multiple)


@given(body=st.binary(max_size=2000), frame_max=st.integers(9, 600))
def test_publish_frames_read_back_as_method_header_and_body(body: bytes, frame_max: int) -> None:
    props = wire.properties("text/plain", 2, {"eventBusId": "node-1"})
    data = wire.publish(2, b"jmapEvent-exchange", KEY.encode(), props, body, frame_max)
    frames = []
    while data:
        used, channel, value = frame.unmarshal(data)
        assert channel == 2
        frames.append(value)
        data = data[used:]
    publish, header, *pieces = frames
    assert isinstance(publish, commands.Basic.Publish)
    assert (publish.exchange, publish.routing_key, publish.mandatory) == ("jmapEvent-exchange", KEY, False)
    assert isinstance(header, ContentHeader) and header.body_size == len(body)
    assert header.properties.headers == {"eventBusId": "node-1"}
    assert header.properties.content_type == "text/plain" and header.properties.delivery_mode == 2
    assert all(isinstance(p, ContentBody) and len(p.value) <= frame_max - 8 for p in pieces)
    assert b"".join(p.value for p in pieces if isinstance(p, ContentBody)) == body


def test_publish_refuses_a_routing_key_longer_than_a_shortstr() -> None:
    with pytest.raises(ValueError):
        wire.publish(2, b"x", b"k" * 256, wire.properties("text/plain", 2, {}), b"{}", 4096)
