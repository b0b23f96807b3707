"""Tests of the WebSocket message coalescer: every rule runs on the compiled gateway._coalesce and on its
pure-Python twin gateway._coalesce_py, and property tests check that the two behave identically.

Not tested here: the picows adapter that feeds the coalescer (the transport tests do that).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import native
from tests.native_impl import load_impl

Frame = tuple[int, bool, int, bytes | bytearray | memoryview]

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10
RSV1 = 4
PENDING, MESSAGE, CONTROL, ERROR = 0, 1, 2, 3
BIG = 1 << 20


@pytest.fixture(scope="module", params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("_coalesce", request.param)


@pytest.fixture(scope="module")
def both() -> tuple[ModuleType, ModuleType]:
    return load_impl("_coalesce", "native"), native.load("_coalesce", native=False)


def trace(module: ModuleType, frames: Iterable[Frame], max_size: int = BIG,
          allow_rsv1: bool = False) -> list[tuple[Any, ...]]:
    """Everything observable after each frame: status, buffered, and the message or the error."""
    c = module.Coalescer(max_size, allow_rsv1)
    out: list[tuple[Any, ...]] = []
    for opcode, fin, rsv, payload in frames:
        status = c.feed(opcode, fin, rsv, payload)
        if status == MESSAGE:
            out.append((status, c.buffered, c.opcode, c.rsv1, c.take()))
        elif status == ERROR:
            out.append((status, c.buffered, c.error_code, c.error_reason))
        else:
            out.append((status, c.buffered))
    return out


def statuses(module: ModuleType, frames: Iterable[Frame], **kw: Any) -> list[int]:
    return [step[0] for step in trace(module, frames, **kw)]


def fragments(opcode: int, chunks: Sequence[bytes], rsv: int = 0) -> list[Frame]:
    """The frames of one message: `opcode` (and `rsv`) on the first, continuations after, fin on the last."""
    return [(opcode if i == 0 else CONT, i == len(chunks) - 1, rsv if i == 0 else 0, chunk)
            for i, chunk in enumerate(chunks)]


def error_of(module: ModuleType, frames: Iterable[Frame], **kw: Any) -> tuple[int, int]:
    """(index of the frame that failed, close code)."""
    steps = trace(module, frames, **kw)
    for i, step in enumerate(steps):
        if step[0] == ERROR:
            return i, step[2]
    raise AssertionError(f"no error in {steps}")


# --- API -------------------------------------------------------------------------------------------------

def test_both_modules_expose_the_same_api(both: tuple[ModuleType, ModuleType]) -> None:
    compiled, twin = both

    def public(obj: object) -> set[str]:
        return {name for name in dir(obj) if not name.startswith("_")}

    api = {"Coalescer", "utf8_valid", "json_too_deep", "CONTINUATION", "TEXT", "BINARY", "CLOSE", "PING", "PONG",
           "PENDING", "MESSAGE", "CONTROL", "ERROR"}
    assert public(compiled) == api
    assert public(twin) - {"Final", "codecs", "re", "annotations"} == api  # minus the twin's imports
    assert public(compiled.Coalescer) == public(twin.Coalescer)
    for name in ("CONTINUATION", "TEXT", "BINARY", "CLOSE", "PING", "PONG", "PENDING", "MESSAGE", "CONTROL",
                 "ERROR"):
        assert getattr(compiled, name) == getattr(twin, name)


def test_constants(impl: ModuleType) -> None:
    opcodes = (impl.CONTINUATION, impl.TEXT, impl.BINARY, impl.CLOSE, impl.PING, impl.PONG)
    assert opcodes == (0, 1, 2, 8, 9, 10)
    assert (impl.PENDING, impl.MESSAGE, impl.CONTROL, impl.ERROR) == (0, 1, 2, 3)


def test_attributes_are_read_only(impl: ModuleType) -> None:
    c = impl.Coalescer(10)
    for name in ("opcode", "rsv1", "error_code", "error_reason", "buffered"):
        with pytest.raises(AttributeError):
            setattr(c, name, 1)


def test_negative_max_size_is_refused(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.Coalescer(-1)


def test_fresh_state(impl: ModuleType) -> None:
    c = impl.Coalescer(10)
    assert (c.opcode, c.rsv1, c.error_code, c.error_reason, c.buffered) == (0, False, 0, "", 0)
    with pytest.raises(RuntimeError):
        c.take()


# --- reassembly ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_unfragmented_message(impl: ModuleType, kind: type) -> None:
    c = impl.Coalescer(BIG)
    payload = '{"@type":"Request","id":"é"}'.encode()
    assert c.feed(TEXT, True, 0, kind(payload)) == MESSAGE
    assert (c.opcode, c.rsv1, c.buffered) == (TEXT, False, 0)
    message = c.take()
    assert type(message) is bytes
    assert message == payload
    with pytest.raises(RuntimeError):
        c.take()  # take() releases the message


def test_unfragmented_bytes_are_not_copied(impl: ModuleType) -> None:
    c = impl.Coalescer(BIG)
    payload = b"x" * 100
    assert c.feed(BINARY, True, 0, payload) == MESSAGE
    assert c.take() is payload


def test_message_does_not_alias_the_frame_buffer(impl: ModuleType) -> None:
    # picows hands out views of its read buffer and reuses it for the next frames.
    read_buffer = bytearray(b"hello world")
    c = impl.Coalescer(BIG)
    assert c.feed(TEXT, True, 0, memoryview(read_buffer)) == MESSAGE
    read_buffer[:] = b"XXXXXXXXXXX"
    assert c.take() == b"hello world"

    read_buffer[:] = b"hello world"
    assert c.feed(TEXT, False, 0, memoryview(read_buffer)[:6]) == PENDING
    read_buffer[:] = b"XXXXXXXXXXX"
    assert c.feed(CONT, True, 0, memoryview(b"world")) == MESSAGE
    assert c.take() == b"hello world"


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_fragmented_message_reassembles(impl: ModuleType, opcode: int) -> None:
    c = impl.Coalescer(BIG)
    assert c.feed(opcode, False, 0, b"abc") == PENDING
    assert c.buffered == 3
    assert c.feed(CONT, False, 0, bytearray(b"")) == PENDING
    assert c.feed(CONT, False, 0, memoryview(b"defg")) == PENDING
    assert c.buffered == 7
    assert c.feed(CONT, True, 0, b"h") == MESSAGE
    assert (c.opcode, c.rsv1, c.buffered) == (opcode, False, 0)
    assert c.take() == b"abcdefgh"


def test_large_fragmented_message_grows_its_buffer(impl: ModuleType) -> None:
    chunks = [bytes([65 + i % 26]) * (i * 97 % 5000) for i in range(60)]
    steps = trace(impl, fragments(BINARY, chunks))
    assert steps[-1][-1] == b"".join(chunks)


def test_empty_messages(impl: ModuleType) -> None:
    assert trace(impl, [(TEXT, True, 0, b"")]) == [(MESSAGE, 0, TEXT, False, b"")]
    assert trace(impl, fragments(TEXT, [b"", b""])) == [(PENDING, 0), (MESSAGE, 0, TEXT, False, b"")]


def test_consecutive_messages_are_independent(impl: ModuleType) -> None:
    frames = [*fragments(TEXT, [b"ab", b"c"]), (BINARY, True, 0, b"\xff"),
              *fragments(BINARY, [b"\x00", b"\x01"])]
    assert trace(impl, frames) == [
        (PENDING, 2), (MESSAGE, 0, TEXT, False, b"abc"),
        (MESSAGE, 0, BINARY, False, b"\xff"),
        (PENDING, 1), (MESSAGE, 0, BINARY, False, b"\x00\x01"),
    ]


# --- control frames --------------------------------------------------------------------------------------

@pytest.mark.parametrize("control", [PING, PONG, CLOSE])
def test_control_frames_inside_a_fragmented_message_leave_it_alone(impl: ModuleType, control: int) -> None:
    # RFC 6455 §5.4: control frames may be injected in the middle of a fragmented message.
    frames: list[Frame] = [
        (TEXT, False, 0, b"ab"), (control, True, 0, b"ping-data"), (CONT, False, 0, b"cd"),
        (control, True, 0, b""), (control, True, 0, b"x" * 125), (CONT, True, 0, b"ef"),
    ]
    assert trace(impl, frames) == [
        (PENDING, 2), (CONTROL, 2), (PENDING, 4), (CONTROL, 4), (CONTROL, 4),
        (MESSAGE, 0, TEXT, False, b"abcdef"),
    ]


def test_control_frame_keeps_an_untaken_message(impl: ModuleType) -> None:
    c = impl.Coalescer(BIG)
    assert c.feed(TEXT, True, 0, b"hi") == MESSAGE
    assert c.feed(PING, True, 0, b"") == CONTROL
    assert (c.opcode, c.take()) == (TEXT, b"hi")


def test_control_frames_do_not_count_towards_the_size_limit(impl: ModuleType) -> None:
    frames: list[Frame] = [(TEXT, False, 0, b"abcd"), (PING, True, 0, b"p" * 100), (CONT, True, 0, b"")]
    assert statuses(impl, frames, max_size=4) == [PENDING, CONTROL, MESSAGE]


@pytest.mark.parametrize("control", [PING, PONG, CLOSE])
def test_fragmented_control_frame_is_a_protocol_error(impl: ModuleType, control: int) -> None:
    assert error_of(impl, [(control, False, 0, b"")]) == (0, 1002)  # RFC 6455 §5.5


@pytest.mark.parametrize("control", [PING, PONG, CLOSE])
def test_control_frame_over_125_bytes_is_a_protocol_error(impl: ModuleType, control: int) -> None:
    assert error_of(impl, [(control, True, 0, b"x" * 126)]) == (0, 1002)  # RFC 6455 §5.5


# --- framing errors (RFC 6455 §5.4, §5.2; RFC 7692 §6.1) -------------------------------------------------

def test_continuation_without_a_message(impl: ModuleType) -> None:
    assert error_of(impl, [(CONT, True, 0, b"x")]) == (0, 1002)
    assert error_of(impl, [(CONT, False, 0, b"x")]) == (0, 1002)
    # ... also right after a completed message
    assert error_of(impl, [*fragments(TEXT, [b"a", b"b"]), (CONT, True, 0, b"c")]) == (2, 1002)


@pytest.mark.parametrize("second", [TEXT, BINARY])
@pytest.mark.parametrize("fin", [True, False])
def test_new_message_inside_a_fragmented_one(impl: ModuleType, second: int, fin: bool) -> None:
    assert error_of(impl, [(TEXT, False, 0, b"a"), (second, fin, 0, b"b")]) == (1, 1002)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_reserved_opcodes(impl: ModuleType, opcode: int) -> None:
    assert error_of(impl, [(opcode, True, 0, b"")]) == (0, 1002)
    assert error_of(impl, [(TEXT, False, 0, b"a"), (opcode, True, 0, b"")]) == (1, 1002)


@pytest.mark.parametrize("rsv", [1, 2, 3, 5, 6, 7])
@pytest.mark.parametrize("opcode", [TEXT, BINARY, PING, CLOSE])
def test_rsv2_and_rsv3_are_never_allowed(impl: ModuleType, rsv: int, opcode: int) -> None:
    assert error_of(impl, [(opcode, True, rsv, b"")], allow_rsv1=True) == (0, 1002)


@pytest.mark.parametrize("rsv", [1, 2, 3, 4, 5, 6, 7])
def test_reserved_bits_on_a_continuation(impl: ModuleType, rsv: int) -> None:
    frames: list[Frame] = [(TEXT, False, RSV1, b"a"), (CONT, True, rsv, b"b")]
    assert error_of(impl, frames, allow_rsv1=True) == (1, 1002)


@pytest.mark.parametrize("control", [PING, PONG, CLOSE])
def test_rsv1_on_a_control_frame(impl: ModuleType, control: int) -> None:
    assert error_of(impl, [(control, True, RSV1, b"")], allow_rsv1=True) == (0, 1002)


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_rsv1_without_negotiated_deflate(impl: ModuleType, opcode: int) -> None:
    assert error_of(impl, [(opcode, True, RSV1, b"")]) == (0, 1002)


def test_rsv1_is_carried_on_the_message_and_skips_utf8_validation(impl: ModuleType) -> None:
    deflated = b"\xf2\xcd\xcf\x05\x00"  # not UTF-8: compressed bytes are validated after inflation
    frames: list[Frame] = [
        (TEXT, True, RSV1, deflated),
        *fragments(TEXT, [deflated[:2], deflated[2:]], rsv=RSV1),
        (TEXT, True, 0, b"plain"),
        (BINARY, True, RSV1, deflated),
    ]
    assert trace(impl, frames, allow_rsv1=True) == [
        (MESSAGE, 0, TEXT, True, deflated),
        (PENDING, 2), (MESSAGE, 0, TEXT, True, deflated),
        (MESSAGE, 0, TEXT, False, b"plain"),
        (MESSAGE, 0, BINARY, True, deflated),
    ]


def test_the_coalescer_is_dead_after_an_error(impl: ModuleType) -> None:
    c = impl.Coalescer(BIG)
    assert c.feed(TEXT, False, 0, b"abc") == PENDING
    assert c.feed(CONT, True, 2, b"d") == ERROR
    code, reason = c.error_code, c.error_reason
    assert code == 1002
    assert reason
    assert c.buffered == 0  # the partial message is released
    for frame in [(TEXT, True, 0, b"ok"), (PING, True, 0, b""), (CONT, True, 0, b"")]:
        assert c.feed(*frame) == ERROR
        assert (c.error_code, c.error_reason) == (code, reason)
    with pytest.raises(RuntimeError):
        c.take()


# --- size limit ------------------------------------------------------------------------------------------

def test_unfragmented_size_limit(impl: ModuleType) -> None:
    assert statuses(impl, [(BINARY, True, 0, b"x" * 10)], max_size=10) == [MESSAGE]
    assert error_of(impl, [(BINARY, True, 0, b"x" * 11)], max_size=10) == (0, 1009)
    assert statuses(impl, [(TEXT, True, 0, b"")], max_size=0) == [MESSAGE]
    assert error_of(impl, [(TEXT, True, 0, b"x")], max_size=0) == (0, 1009)


def test_fragmented_size_limit_never_buffers_past_it(impl: ModuleType) -> None:
    c = impl.Coalescer(10)
    assert c.feed(BINARY, False, 0, b"x" * 6) == PENDING
    assert c.feed(CONT, False, 0, b"x" * 4) == PENDING
    assert c.buffered == 10
    assert c.feed(CONT, True, 0, b"x") == ERROR
    assert (c.error_code, c.buffered) == (1009, 0)
    frames = fragments(BINARY, [b"x" * 6, b"x" * 4, b""])
    assert statuses(impl, frames, max_size=10) == [PENDING, PENDING, MESSAGE]


def test_size_is_checked_before_utf8(impl: ModuleType) -> None:
    assert error_of(impl, [(TEXT, True, 0, b"\xff" * 11)], max_size=10) == (0, 1009)


# --- UTF-8 (RFC 3629, RFC 6455 §8.1) ---------------------------------------------------------------------

VALID_UTF8 = [
    b"", b"plain ascii", "κόσμε".encode(), "\u0080\u07ff\u0800\uffff".encode(),
    "\U00010000\U0010ffff".encode(),
    "\ud7ff\ue000".encode(), "emoji 😀 and 中文 mixed".encode(), b"\x00\x7f",
]

INVALID_UTF8 = {
    "stray continuation": b"\x80",
    "continuation run": b"\x80\xbf\x80",
    "overlong C0": b"\xc0\x80",
    "overlong C1": b"\xc1\xbf",
    "overlong 3-byte": b"\xe0\x80\x80",
    "overlong 3-byte max": b"\xe0\x9f\xbf",
    "overlong 4-byte": b"\xf0\x80\x80\x80",
    "overlong 4-byte max": b"\xf0\x8f\xbf\xbf",
    "high surrogate": b"\xed\xa0\x80",
    "low surrogate": b"\xed\xbf\xbf",
    "surrogate pair": b"\xed\xa0\x80\xed\xb0\x80",
    "above U+10FFFF": b"\xf4\x90\x80\x80",
    "F5 lead": b"\xf5\x80\x80\x80",
    "FF": b"\xff",
    "FE": b"\xfe",
    "lead then ascii": b"\xe2\x28\xa1",
    "truncated 2-byte": b"\xc3",
    "truncated 3-byte": b"\xe2\x82",
    "truncated 4-byte": b"\xf0\x9f\x98",
    "truncated in the middle": b"\xe2\x82 ok",
}


@pytest.mark.parametrize("data", VALID_UTF8)
def test_valid_utf8(impl: ModuleType, data: bytes) -> None:
    assert trace(impl, [(TEXT, True, 0, data)]) == [(MESSAGE, 0, TEXT, False, data)]
    assert impl.utf8_valid(data) is True
    assert impl.utf8_valid(bytearray(data)) is True
    assert impl.utf8_valid(memoryview(data)) is True


@pytest.mark.parametrize("data", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_invalid_utf8(impl: ModuleType, data: bytes) -> None:
    assert error_of(impl, [(TEXT, True, 0, data)]) == (0, 1007)
    assert error_of(impl, [(TEXT, True, 0, b"prefix " + data + b" suffix")]) == (0, 1007)
    assert impl.utf8_valid(data) is False


@pytest.mark.parametrize("data", INVALID_UTF8.values(), ids=INVALID_UTF8.keys())
def test_binary_messages_are_not_validated(impl: ModuleType, data: bytes) -> None:
    assert trace(impl, [(BINARY, True, 0, data)]) == [(MESSAGE, 0, BINARY, False, data)]


@pytest.mark.parametrize("position", range(40))
def test_invalid_byte_anywhere_in_an_ascii_run(impl: ModuleType, position: int) -> None:
    # Exercises the word-at-a-time ASCII scan at every alignment and at its tail.
    data = bytearray(b"a" * 40)
    data[position] = 0x80
    assert error_of(impl, [(TEXT, True, 0, bytes(data))]) == (0, 1007)
    assert impl.utf8_valid(bytes(data)) is False
    data[position] = 0x7F
    assert impl.utf8_valid(bytes(data)) is True


@pytest.mark.parametrize("char", ["é", "€", "😀", "\U0010ffff"])
def test_code_point_split_between_frames(impl: ModuleType, char: str) -> None:
    data = ("a" + char + "b").encode()
    for cut1, cut2 in itertools.combinations_with_replacement(range(len(data) + 1), 2):
        chunks = [data[:cut1], data[cut1:cut2], data[cut2:]]
        assert trace(impl, fragments(TEXT, chunks))[-1] == (MESSAGE, 0, TEXT, False, data)


def test_incomplete_code_point_at_the_end_of_the_message(impl: ModuleType) -> None:
    assert error_of(impl, fragments(TEXT, [b"ok\xe2", b"\x82"])) == (1, 1007)
    assert error_of(impl, fragments(TEXT, [b"ok\xe2\x82", b""])) == (1, 1007)
    assert statuses(impl, fragments(TEXT, [b"ok\xe2\x82", b"", b"\xac"])) == [PENDING, PENDING, MESSAGE]


# Autobahn TestSuite 6.4.x: the invalid sequence is reported in the frame where it becomes certain, not at the
# end of the message.
KOSME = "κόσμε".encode()


@pytest.mark.parametrize(("chunks", "failing"), [
    ([KOSME, b"\xf4\x90\x80\x80", b"edited"], 1),       # 6.4.1: above U+10FFFF
    ([KOSME + b"\xf4", b"\x90", b"\x80\x80edited"], 1),  # 6.4.2: certain at the second byte
    ([KOSME + b"\xed", b"\xa0", b"\x80"], 1),          # a surrogate is certain at its second byte
    ([KOSME + b"\xe0", b"\x9f", b"\xbf"], 1),          # an overlong too
    ([KOSME + b"\xf0\x9f", b"\x98", b"\x28"], 2),      # a valid prefix that breaks late
    ([b"ok", b"\xc0", b"\x80"], 1),                     # C0 can never start anything
])
def test_fail_fast(impl: ModuleType, chunks: list[bytes], failing: int) -> None:
    assert error_of(impl, fragments(TEXT, chunks)) == (failing, 1007)


def test_fail_fast_byte_by_byte(impl: ModuleType) -> None:
    # Autobahn 6.4.3/6.4.4 stream an invalid text in tiny fragments.
    data = KOSME + b"\xf4\x90\x80\x80" + b"edited"
    frames = fragments(TEXT, [data[i:i + 1] for i in range(len(data))])
    assert error_of(impl, frames) == (len(KOSME) + 1, 1007)


# --- properties ------------------------------------------------------------------------------------------

# Fragments that make UTF-8 interesting: boundaries of every range of RFC 3629 §4, and broken sequences.
SNIPPETS = [
    b"\x80", b"\xbf", b"\xc2", b"\xdf", b"\xe0", b"\xe0\xa0", b"\xed", b"\xed\x9f", b"\xed\xa0", b"\xef",
    b"\xf0", b"\xf0\x90", b"\xf4", b"\xf4\x8f", b"\xf4\x90", b"\xf5", b"\xc0", b"\xff", b"\x9f", b"\x90",
    b"\x8f", b"\xa0",
]
utf8ish = st.lists(
    st.one_of(st.text(max_size=8).map(str.encode), st.sampled_from(SNIPPETS), st.binary(max_size=3)),
    max_size=6,
).map(b"".join)


@st.composite
def split(draw: st.DrawFn, data: bytes, max_parts: int = 5) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=max_parts - 1)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def as_kind(data: bytes, kind: int) -> bytes | bytearray | memoryview:
    return (data, bytearray(data), memoryview(data))[kind]


@st.composite
def random_frame(draw: st.DrawFn) -> list[Frame]:
    opcode = draw(st.sampled_from([CONT, TEXT, BINARY, CLOSE, PING, PONG] * 2 + [3, 7, 11, 15]))
    rsv = draw(st.sampled_from([0] * 8 + [RSV1] * 2 + [1, 2, 3, 5, 6, 7]))
    payload = draw(utf8ish | st.binary(max_size=130))
    return [(opcode, draw(st.booleans()), rsv, as_kind(payload, draw(st.integers(0, 2))))]


@st.composite
def message(draw: st.DrawFn) -> list[Frame]:
    """A plausible message: fragments of UTF-8-ish bytes, sometimes compressed, with controls interleaved."""
    opcode = draw(st.sampled_from([TEXT, TEXT, BINARY]))
    chunks = draw(split(draw(utf8ish | st.text(max_size=40).map(str.encode))))
    frames = fragments(opcode, chunks, rsv=draw(st.sampled_from([0, 0, RSV1])))
    for _ in range(draw(st.integers(0, 2))):
        control = (draw(st.sampled_from([PING, PONG, CLOSE])), True, 0, draw(st.binary(max_size=4)))
        frames.insert(draw(st.integers(0, len(frames))), control)
    return [(op, fin, rsv, as_kind(bytes(p), draw(st.integers(0, 2)))) for op, fin, rsv, p in frames]


# Mostly well-formed messages, so that sequences live long enough to reach the interesting states.
frame_sequences = st.lists(st.one_of(message(), message(), random_frame()), max_size=8).map(
    lambda parts: [frame for part in parts for frame in part])


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(frames=frame_sequences, max_size=st.integers(0, 40) | st.integers(41, 200), allow_rsv1=st.booleans())
def test_native_and_python_behave_identically(both: tuple[ModuleType, ModuleType], frames: list[Frame],
                                              max_size: int, allow_rsv1: bool) -> None:
    compiled, twin = both
    assert trace(compiled, frames, max_size, allow_rsv1) == trace(twin, frames, max_size, allow_rsv1)


@given(text=st.text(), data=st.data())
def test_valid_text_split_anywhere_reassembles(impl: ModuleType, text: str, data: st.DataObject) -> None:
    encoded = text.encode()
    chunks = data.draw(split(encoded, max_parts=12))
    frames = fragments(TEXT, chunks)
    for _ in range(data.draw(st.integers(0, 3))):
        frames.insert(data.draw(st.integers(0, len(frames) - 1)), (PING, True, 0, b""))  # before the last
    steps = trace(impl, frames)
    assert [s[0] for s in steps[:-1]] == [CONTROL if f[0] == PING else PENDING for f in frames[:-1]]
    assert steps[-1] == (MESSAGE, 0, TEXT, False, encoded)


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Every continuation-byte range of RFC 3629 contains one of these, so a prefix that can be completed to valid
# UTF-8 at all can be completed with at most three of them.
_COMPLETIONS = [bytes(c) for k in range(4) for c in itertools.product((0x80, 0x90, 0xA0, 0xBF), repeat=k)]


def _first_impossible_byte(data: bytes) -> int | None:
    """Index of the byte after which no valid UTF-8 text can follow: the reference for fail-fast."""
    def completable(n: int) -> bool:
        return any(_decodes(data[:n] + tail) for tail in _COMPLETIONS)

    if completable(len(data)):
        return None
    lo, hi = 0, len(data)  # completable(lo) holds, completable(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if completable(mid):
            lo = mid
        else:
            hi = mid
    return hi - 1


@settings(max_examples=300)
@given(data=st.data(), payload=utf8ish)
def test_utf8_errors_are_reported_in_the_frame_where_they_become_certain(
        impl: ModuleType, data: st.DataObject, payload: bytes) -> None:
    chunks = data.draw(split(payload, max_parts=6))
    bad = _first_impossible_byte(payload)
    if bad is not None:
        ends = list(itertools.accumulate(len(c) for c in chunks))
        expected = next(i for i, end in enumerate(ends) if end > bad)
        assert error_of(impl, fragments(TEXT, chunks)) == (expected, 1007)
    elif _decodes(payload):
        assert trace(impl, fragments(TEXT, chunks))[-1] == (MESSAGE, 0, TEXT, False, payload)
    else:  # every byte fits, but the last code point is unfinished
        assert error_of(impl, fragments(TEXT, chunks)) == (len(chunks) - 1, 1007)


@given(payload=utf8ish | st.binary())
def test_utf8_valid_agrees_with_rfc3629(impl: ModuleType, payload: bytes) -> None:
    assert impl.utf8_valid(payload) is _decodes(payload)


@given(payload=st.binary(min_size=1, max_size=64), max_size=st.integers(0, 64))
def test_the_limit_holds_for_any_fragmentation(impl: ModuleType, payload: bytes, max_size: int) -> None:
    chunks = [payload[i:i + 7] for i in range(0, len(payload), 7)]
    steps = trace(impl, fragments(BINARY, chunks), max_size=max_size)
    assert all(step[1] <= max_size for step in steps)
    if len(payload) > max_size:
        assert steps[-1][:3] == (ERROR, 0, 1009)
    else:
        assert steps[-1][-1] == payload
