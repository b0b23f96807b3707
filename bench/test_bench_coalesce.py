"""Benchmarks of the frame coalescer (compiled vs pure-Python twin) and of the socket path's msgspec codecs.

Run with `.venv/bin/python -m pytest bench/test_bench_coalesce.py --benchmark-only -q`; the figures and their
meaning are in bench/README.md. These are measurements, not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import ModuleType

import msgspec
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from gateway import native
from gateway.jmap.types import ClientMessage, Request, StateChange

TEXT, CONTINUATION = 1, 0  # RFC 6455 §5.2 opcodes


def _message(size: int = 2048) -> bytes:
    """A 2 KiB JMAP Request as a client sends it: mostly ASCII JSON with some non-ASCII text."""

    def encode(filler: str) -> bytes:
        body = "Ça va? Tschüß! Привет, как дела? " * 12 + filler
        return msgspec.json.encode({
            "@type": "Request",
            "id": "req-42",
            "using": ["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
            "methodCalls": [
                ["Email/set", {"accountId": "a" * 64, "create": {"k1": {
                    "mailboxIds": {"inbox": True}, "subject": "Grüße aus Köln — 会议记录 😀",
                    "bodyValues": {"1": {"value": body}},
                    "textBody": [{"partId": "1", "type": "text/plain"}]}}}, "c0"],
                ["Email/changes", {"accountId": "a" * 64, "sinceState": "s123456"}, "c1"],
                ["Mailbox/get", {"accountId": "a" * 64, "#ids": {"resultOf": "c1", "name": "Email/changes",
                                                               "path": "/updated"}}, "c2"],
            ],
        })

    # Plain ASCII prose fills the body up to exactly `size` bytes.
    data = encode("")
    data = encode(("Lorem ipsum dolor sit amet. " * 100)[: size - len(data)])
    assert len(data) == size, len(data)
    return data


MESSAGE_BYTES = _message()


def _frames(data: bytes, count: int) -> list[tuple[int, bool, memoryview]]:
    """`data` cut into `count` frames at arbitrary byte offsets (code points get split too), as views of one
    buffer, the way picows hands out payloads from its read buffer."""
    view = memoryview(bytearray(data))
    step = -(-len(data) // count)
    bounds = [*range(0, len(data), step), len(data)]
    return [(TEXT if i == 0 else CONTINUATION, i == count - 1, view[a:b])
            for i, (a, b) in enumerate(itertools.pairwise(bounds))]


@pytest.fixture(params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    module = native.load("_coalesce", native=request.param == "native")
    if request.param == "native" and not native.is_native(module):
        pytest.skip("gateway._coalesce is not compiled (run `make native`)")
    return module


@pytest.mark.parametrize("fragments", [1, 4, 64])
def test_coalesce_2k_text(benchmark: BenchmarkFixture, impl: ModuleType, fragments: int) -> None:
    benchmark.group = f"coalesce 2 KiB text, {fragments} fragment(s)"
    frames = _frames(MESSAGE_BYTES, fragments)
    assert len(frames) == fragments
    coalescer = impl.Coalescer(1 << 20)
    feed, take = coalescer.feed, coalescer.take

    def one_message() -> bytes:
        for opcode, fin, payload in frames:
            feed(opcode, fin, 0, payload)
        result: bytes = take()
        return result

    assert benchmark(one_message) == MESSAGE_BYTES


def test_utf8_valid_64k(benchmark: BenchmarkFixture, impl: ModuleType) -> None:
    # An inflated permessage-deflate message is validated in one piece.
    benchmark.group = "utf8_valid 64 KiB"
    data = (MESSAGE_BYTES * 32)[: 64 * 1024 - 3] + "€".encode()
    assert benchmark(impl.utf8_valid, data) is True


def test_decode_client_request(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "msgspec codecs"
    decode: Callable[[bytes], object] = msgspec.json.Decoder(ClientMessage).decode
    data = msgspec.json.encode(Request(
        id="r1",
        using=["urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"],
        methodCalls=[
            ("Email/changes", {"accountId": "a" * 64, "sinceState": "s1024", "maxChanges": 50}, "c0"),
            ("Email/get", {"accountId": "a" * 64, "#ids": {"resultOf": "c0", "name": "Email/changes",
                                                           "path": "/created"},
                           "properties": ["subject", "from", "receivedAt", "keywords"]}, "c1"),
            ("Mailbox/changes", {"accountId": "a" * 64, "sinceState": "m77"}, "c2"),
        ],
    ))
    assert isinstance(benchmark(decode, data), Request)


def test_encode_state_change(benchmark: BenchmarkFixture) -> None:
    benchmark.group = "msgspec codecs"
    encoder = msgspec.json.Encoder()
    change = StateChange(changed={"a" * 64: {"Email": "s1025", "Mailbox": "m78", "EmailDelivery": "d9"}},
                         pushState="p" * 40)
    buf = bytearray(256)

    def encode() -> bytearray:
        # Offset 14 leaves room for the largest server frame header, so picows can send the buffer in place.
        encoder.encode_into(change, buf, 14)
        return buf

    out = benchmark(encode)
    assert msgspec.json.decode(out[14:], type=StateChange) == change
