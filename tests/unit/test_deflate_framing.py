"""RFC 7692 §7.2 compress/inflate framing: gateway._deflate (compiled) and gateway._deflate_py, held to the
same behaviour, to the RFC's examples, and to interop with the zlib module and the `websockets` library."""

from __future__ import annotations

import json
import random
import tracemalloc
import zlib
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from gateway.deflate import Corrupt, TooBig
from tests.native_impl import load_impl

TAIL = b"\x00\x00\xff\xff"
MiB = 1 << 20


def _load(kind: str) -> ModuleType:
    return load_impl("_deflate", kind)


@pytest.fixture(params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return _load(request.param)


@pytest.fixture(scope="module")
def both() -> tuple[ModuleType, ModuleType]:
    return _load("native"), _load("python")


def _json_payload(n: int, seed: int = 0) -> bytes:
    """JMAP-looking JSON of about n bytes: repetitive like real responses, with some entropy."""
    rng = random.Random(seed)
    items: list[str] = []
    length = 0
    while length < n:
        item = json.dumps({"id": f"M{rng.getrandbits(64):x}", "threadId": f"T{rng.randrange(10**6)}",
                           "mailboxIds": {f"mb{rng.randrange(9)}": True}, "size": rng.randrange(10**6),
                           "subject": "Re: " + " ".join(rng.choice(["meeting", "report", "lunch", "q3"])
                                                         for _ in range(4))})
        items.append(item)
        length += len(item) + 1
    return ",".join(items).encode()[:n]


def _stdlib_compress(data: bytes, wbits: int = 15, level: int = 6) -> bytes:
    stream = zlib.compressobj(level, zlib.DEFLATED, -wbits)
    out = stream.compress(data) + stream.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


def _stdlib_inflate(payload: bytes, wbits: int = 15) -> bytes:
    return zlib.decompressobj(-wbits).decompress(payload + TAIL)


# RFC 7692 §7.2.3.1, §7.2.3.3, §7.2.3.4, §7.2.3.5 and §7.2.3.6: the RFC's own payloads.
RFC_PAYLOADS = [
    ("f248cdc9c90700", b"Hello"),                      # §7.2.3.1 a message compressed with one block
    ("0005 00faff48656c6c6f00", b"Hello"),             # §7.2.3.3 no compression (stored block)
    ("f348cdc9c9070000", b"Hello"),                    # §7.2.3.4 a BFINAL block, then 0x00 of an empty block
    ("f348cdc9c90700", b"Hello"),                      # the same without the 0x00
    ("f24805000000ffffcac9c90700", b"Hello"),          # §7.2.3.5 two DEFLATE blocks in one message
    ("00", b""),                                       # §7.2.3.6 an empty message
    ("", b""),                                         # an empty payload decodes to nothing as well
]


@pytest.mark.parametrize(("payload", "message"), RFC_PAYLOADS)
def test_inflate_rfc_examples(impl: ModuleType, payload: str, message: bytes) -> None:
    assert impl.Inflater().inflate(bytes.fromhex(payload), 100) == message


def test_compress_rfc_examples(impl: ModuleType) -> None:
    compressor = impl.Compressor(6, 15)
    assert compressor.compress(b"Hello") == bytes.fromhex("f248cdc9c90700")  # §7.2.3.1
    assert compressor.compress(b"") == b"\x00"  # §7.2.3.6: the empty stored block, 00 00 ff ff stripped


SIZES = [0, 1, 2, 3, 100, 1000, 3000, 40_000, 70_000, 200_000]


@pytest.mark.parametrize("wbits", range(9, 16))
def test_round_trip_sizes_and_windows(impl: ModuleType, wbits: int) -> None:
    compressor = impl.Compressor(6, wbits)
    own = impl.Inflater(wbits)
    wide = impl.Inflater(15)
    rng = random.Random(wbits)
    for size in SIZES:
        for data in (_json_payload(size, size), rng.randbytes(size), bytes(size)):
            payload = compressor.compress(data)
            assert own.inflate(payload, len(data)) == data
            assert wide.inflate(payload, len(data) + 10) == data
            # The stripped tail (RFC 7692 §7.2.1) is what any inflater adds back.
            assert _stdlib_inflate(payload, wbits) == data


def test_round_trip_large(impl: ModuleType) -> None:
    # Beyond the output buffers the compiled module keeps between messages.
    data = _json_payload(3 * MiB + 7)
    payload = impl.Compressor(6, 15).compress(data)
    assert impl.Inflater().inflate(payload, len(data)) == data
    assert _stdlib_inflate(payload) == data


@pytest.mark.parametrize("level", range(1, 10))
def test_round_trip_levels(impl: ModuleType, level: int) -> None:
    compressor = impl.Compressor(level, 15)
    inflater = impl.Inflater()
    for size in (0, 10, 3000, 100_000):
        data = _json_payload(size, level)
        payload = compressor.compress(data)
        assert payload == _stdlib_compress(data, 15, level)  # the zlib module makes the same bytes
        assert inflater.inflate(payload, size) == data


def test_accepts_bytes_bytearray_memoryview(impl: ModuleType) -> None:
    data = _json_payload(5000)
    compressor, inflater = impl.Compressor(6, 15), impl.Inflater()
    payload = compressor.compress(data)
    for view in (bytearray(data), memoryview(data)):
        assert compressor.compress(view) == payload
    framed = b"xx" + payload + b"yy"
    for view in (bytearray(payload), memoryview(framed)[2:-2]):
        assert inflater.inflate(view, len(data)) == data


def test_same_message_compresses_to_the_same_bytes(impl: ModuleType) -> None:
    # server_no_context_takeover: one payload serves every recipient, whatever was compressed before.
    message = _json_payload(3000, 1)
    compressor = impl.Compressor(6, 15)
    first = compressor.compress(message)
    compressor.compress(_json_payload(3000, 2))
    compressor.compress(message)
    assert compressor.compress(message) == first
    assert impl.Compressor(6, 15).compress(message) == first


def test_inflater_starts_every_message_from_an_empty_window(impl: ModuleType) -> None:
    # A peer with context takeover refers back into the previous message; we agreed on
    # client_no_context_takeover, so such a reference is invalid data, and no message leaks into the next.
    peer = zlib.compressobj(6, zlib.DEFLATED, -15)
    text = _json_payload(2000)
    first = peer.compress(text) + peer.flush(zlib.Z_SYNC_FLUSH)
    second = peer.compress(text) + peer.flush(zlib.Z_SYNC_FLUSH)
    inflater = impl.Inflater()
    assert inflater.inflate(first[:-4], 10_000) == text
    with pytest.raises(Corrupt):
        inflater.inflate(second[:-4], 10_000)


@pytest.mark.parametrize("wbits", range(8, 16))
def test_inflater_takes_any_smaller_window(impl: ModuleType, wbits: int) -> None:
    # What the peer compressed within its agreed window (RFC 7692 §7.1.2.2) inflates with that window or any
    # larger one. (zlib only rejects distances beyond the history it has, so a smaller window is no filter.)
    data = _json_payload(20_000, wbits)
    for peer_bits in range(9, wbits + 1):
        assert impl.Inflater(wbits).inflate(_stdlib_compress(data, peer_bits), len(data)) == data
    repeats = b"abcdefgh" * 1000  # distance 8: within even a 256-byte window
    assert impl.Inflater(wbits).inflate(_stdlib_compress(repeats, 9), len(repeats)) == repeats


def test_max_size_is_exact(impl: ModuleType) -> None:
    inflater = impl.Inflater()
    for size in (0, 1, 1000, 70_000):
        data = _json_payload(size)
        payload = impl.Compressor(6, 15).compress(data)
        assert inflater.inflate(payload, size) == data
        if size:
            with pytest.raises(TooBig) as excinfo:
                inflater.inflate(payload, size - 1)
            assert excinfo.value.code == 1009  # RFC 6455 §7.4.1: message too big


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """100 MiB of zeros as one compressed message (about 100 KB), built without holding 100 MiB at once."""
    stream = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(MiB)
    parts = [stream.compress(chunk) for _ in range(100)]
    parts.append(stream.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(parts)[:-4]


def test_bomb_is_refused_without_inflating_it(impl: ModuleType, bomb: bytes) -> None:
    inflater = impl.Inflater()
    tracemalloc.start()
    try:
        with pytest.raises(TooBig):
            inflater.inflate(bomb, MiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Both implementations allocate their output through Python's allocators, which tracemalloc sees: the
    # output stops at the limit (plus the copy into the result), never near the 100 MiB the bomb holds.
    assert peak < 4 * MiB


def test_bomb_stops_at_the_limit(impl: ModuleType, bomb: bytes) -> None:
    # A deterministic witness that inflating stops once the limit is passed (instead of a timing assertion):
    # the bomb's last bytes are garbage that would be reported as Corrupt had it been inflated to the end.
    poisoned = bomb + b"\xff\xff\xff"
    with pytest.raises(Corrupt):
        impl.Inflater().inflate(poisoned, 200 * MiB)
    with pytest.raises(TooBig):
        impl.Inflater().inflate(poisoned, MiB)


@pytest.mark.parametrize("payload", [
    b"\xff",                                  # reserved block type 11
    b"\x07",                                  # reserved block type with BFINAL
    bytes.fromhex("0005 00fbff48656c6c6f"),  # stored block whose NLEN is not the complement of LEN
    bytes.fromhex("f348cdc9c9070001"),        # data after the final block other than an empty block's start
    bytes.fromhex("f348cdc9c90700f248cdc9c90700"),
    bytes.fromhex("f348cdc9c907"),            # final block that only ends inside our appended tail
])
def test_corrupt_input(impl: ModuleType, payload: bytes) -> None:
    with pytest.raises(Corrupt) as excinfo:
        impl.Inflater().inflate(payload, 1000)
    assert excinfo.value.code == 1007  # RFC 6455 §7.4.1: invalid payload data


def test_state_is_clean_after_errors(impl: ModuleType) -> None:
    # One inflater and one compressor serve the whole process: a failed message must not affect the next.
    inflater, compressor = impl.Inflater(), impl.Compressor(6, 15)
    data = _json_payload(5000)
    payload = compressor.compress(data)
    with pytest.raises(TooBig):
        inflater.inflate(payload, 10)
    with pytest.raises(Corrupt):
        inflater.inflate(b"\xff" + payload, 10_000)
    assert inflater.inflate(payload, 10_000) == data
    with pytest.raises(TypeError):
        compressor.compress("not bytes")
    assert compressor.compress(data) == payload


@pytest.mark.parametrize(("level", "wbits"), [(0, 15), (10, 15), (-1, 15), (6, 8), (6, 16), (6, -15)])
def test_compressor_arguments(impl: ModuleType, level: int, wbits: int) -> None:
    with pytest.raises(ValueError):
        impl.Compressor(level, wbits)


@pytest.mark.parametrize("wbits", [7, 16, -15])
def test_inflater_arguments(impl: ModuleType, wbits: int) -> None:
    with pytest.raises(ValueError):
        impl.Inflater(wbits)
    with pytest.raises(ValueError):
        impl.Inflater().inflate(b"\x00", -1)


@pytest.mark.parametrize("wbits", [9, 12, 15])
def test_interop_with_websockets(impl: ModuleType, wbits: int) -> None:
    # The `websockets` permessage-deflate as the client (no context takeover both ways, as we negotiate).
    client = PerMessageDeflate(remote_no_context_takeover=True, local_no_context_takeover=True,
                               remote_max_window_bits=wbits, local_max_window_bits=15)
    compressor, inflater = impl.Compressor(6, wbits), impl.Inflater(15)
    for size in (0, 1, 200, 3000, 100_000):
        data = _json_payload(size)
        # Server to client.
        frame = Frame(Opcode.TEXT, compressor.compress(data), rsv1=True)
        assert client.decode(frame, max_size=size).data == data
        # Client to server.
        sent = client.encode(Frame(Opcode.TEXT, data))
        assert sent.rsv1
        assert inflater.inflate(sent.data, size) == data


def test_interop_with_the_zlib_module(impl: ModuleType) -> None:
    for size in (0, 5, 3000, 200_000):
        data = _json_payload(size)
        assert impl.Inflater().inflate(_stdlib_compress(data, 11, 9), size) == data
        assert _stdlib_inflate(impl.Compressor(1, 11).compress(data), 11) == data


# Native ≡ Python: byte-identical output and identical outcomes.

def _outcome(module: ModuleType, payload: bytes, max_size: int, wbits: int = 15) -> bytes | str:
    try:
        result: bytes = module.Inflater(wbits).inflate(payload, max_size)
    except (TooBig, Corrupt) as exc:
        return type(exc).__name__
    return result


_MESSAGES = st.binary(max_size=4000) | st.builds(_json_payload, st.integers(0, 20_000), st.integers(0, 99))


@given(data=_MESSAGES, level=st.integers(1, 9), wbits=st.integers(9, 15))
@settings(deadline=None)
def test_same_compressed_bytes(both: tuple[ModuleType, ModuleType], data: bytes, level: int,
                               wbits: int) -> None:
    native, python = both
    assert native.Compressor(level, wbits).compress(data) == python.Compressor(level, wbits).compress(data)


@given(payload=st.binary(max_size=300), max_size=st.integers(0, 3000), wbits=st.integers(8, 15))
@settings(deadline=None)
def test_same_inflate_outcome_random_input(both: tuple[ModuleType, ModuleType], payload: bytes,
                                           max_size: int, wbits: int) -> None:
    native, python = both
    assert _outcome(native, payload, max_size, wbits) == _outcome(python, payload, max_size, wbits)


_FLIPS = st.lists(st.tuples(st.integers(0), st.integers(0, 7)), max_size=3)


@given(data=_MESSAGES, max_size=st.integers(0, 25_000) | st.integers(0, 50), flips=_FLIPS,
       cut=st.integers(0, 5), extra=st.binary(max_size=6))
@settings(deadline=None)
def test_same_inflate_outcome_damaged_messages(both: tuple[ModuleType, ModuleType], data: bytes,
                                               max_size: int, flips: list[tuple[int, int]], cut: int,
                                               extra: bytes) -> None:
    native, python = both
    payload = bytearray(_stdlib_compress(data))
    for position, bit in flips:
        if payload:
            payload[position % len(payload)] ^= 1 << bit
    damaged = bytes(payload[:len(payload) - cut] + extra)
    assert _outcome(native, damaged, max_size) == _outcome(python, damaged, max_size)
