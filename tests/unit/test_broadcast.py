"""Tests of the broadcast loop: every rule runs on the compiled gateway._broadcast and on its pure-Python twin
gateway._broadcast_py, and a property test checks that the two behave identically.

The transports here are recording doubles (this is the loop's logic, not I/O); real picows transports and real
clients are in tests/integration/test_broadcast_real.py.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import native
from tests.native_impl import load_bench, load_impl

TEXT = 1
HEADROOM = 14

Call = tuple[str, str, tuple[Any, ...]]


@pytest.fixture(scope="module", params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("_broadcast", request.param)


@pytest.fixture(scope="module")
def both() -> tuple[ModuleType, ModuleType]:
    return load_impl("_broadcast", "native"), native.load("_broadcast", native=False)


class Frames:
    """The two buffers of one broadcast, and a log in which each write names the buffer it was given."""

    def __init__(self, compressed: bool = True) -> None:
        self.plain = bytearray(HEADROOM) + b'{"@type":"StateChange"}'
        self.compressed: bytearray | None = bytearray(HEADROOM) + b"\x01\x02\x03" if compressed else None
        self.log: list[Call] = []

    def which(self, buffer: object) -> str:
        if buffer is self.plain:
            return "plain"
        if buffer is not None and buffer is self.compressed:
            return "compressed"
        return f"other:{buffer!r}"


class FakeTransport:
    """Records each send_reuse_external_bytearray call: who, which buffer, and the other arguments."""

    def __init__(self, name: str, frames: Frames, fail: bool = False) -> None:
        self.name = name
        self.frames = frames
        self.fail = fail

    def send_reuse_external_bytearray(self, *args: Any) -> None:
        rest = (args[0], *args[2:])
        self.frames.log.append((self.name, self.frames.which(args[1]), rest))
        if self.fail:
            raise ConnectionError("socket gone")


PLAIN_CALL = (TEXT, HEADROOM)
COMPRESSED_CALL = (TEXT, HEADROOM, True, True)


def group(impl: ModuleType, frames: Frames, *specs: tuple[str, bool, bool]) -> dict[Any, None]:
    """Targets named by (name, deflate, paused), in order, as the hub's dict-as-ordered-set."""
    targets: dict[Any, None] = {}
    for name, deflate, paused in specs:
        t = impl.Target(FakeTransport(name, frames), deflate)
        t.paused = paused
        targets[t] = None
    return targets


# --- API -------------------------------------------------------------------------------------------------

def test_both_modules_expose_the_same_api(both: tuple[ModuleType, ModuleType]) -> None:
    compiled, twin = both

    def public(obj: object) -> set[str]:
        return {name for name in dir(obj) if not name.startswith("_")}

    assert public(compiled) - {"cython"} == public(twin) - {"Any", "Callable", "Sequence", "annotations"}
    assert public(compiled.Target) == public(twin.Target)
    assert (compiled.TEXT, compiled.HEADROOM) == (twin.TEXT, twin.HEADROOM) == (TEXT, HEADROOM)


def test_target_defaults(impl: ModuleType) -> None:
    transport = object()
    t = impl.Target(transport)
    assert t.transport is transport
    assert t.deflate is False
    assert t.paused is False
    assert t.pending is None
    assert impl.Target(transport, True).deflate is True
    assert impl.Target(transport, deflate=True).deflate is True


def test_target_attributes_are_writable_and_closed(impl: ModuleType) -> None:
    t = impl.Target(None)
    t.pending = {"a": {"Email": "1"}}
    t.paused = True
    t.deflate = True
    assert (t.pending, t.paused, t.deflate) == ({"a": {"Email": "1"}}, True, True)
    with pytest.raises(AttributeError):
        t.something_else = 1
    with pytest.raises(AttributeError):
        t.key = ("acc", None)  # the hub's variant key lives in its Subscription, not on the target


def test_flags_read_back_as_bools(impl: ModuleType) -> None:
    # The compiled Target holds deflate and paused as C ints (bint); the twin coerces the same way.
    t = impl.Target(None, [1])
    assert t.deflate is True
    t.paused, t.deflate = [], 0
    assert (t.paused, t.deflate) == (False, False) and type(t.paused) is type(t.deflate) is bool
    t.paused = "yes"
    assert t.paused is True

    class Undecided:
        def __bool__(self) -> bool:
            raise ValueError("no truth value")

    with pytest.raises(ValueError):
        t.paused = Undecided()
    assert t.paused is True


def test_targets_hash_by_identity(impl: ModuleType) -> None:
    a, b = impl.Target(None), impl.Target(None)
    assert a != b
    assert len({a: None, b: None}) == 2
    assert {a: 1}[a] == 1


# --- writing ---------------------------------------------------------------------------------------------

def test_plain_target_gets_the_plain_buffer_at_the_headroom(impl: ModuleType) -> None:
    frames = Frames(compressed=False)
    targets = group(impl, frames, ("a", False, False), ("b", False, False))
    assert impl.broadcast(targets, frames.plain, None, "acc", {"Email": "1"}) == 2
    assert frames.log == [("a", "plain", PLAIN_CALL), ("b", "plain", PLAIN_CALL)]


def test_deflate_target_gets_the_compressed_buffer_with_rsv1(impl: ModuleType) -> None:
    frames = Frames()
    targets = group(impl, frames, ("z", True, False), ("p", False, False))
    assert impl.broadcast(targets, frames.plain, frames.compressed, "acc", {"Email": "1"}) == 2
    # RFC 7692 §6: only the deflate target gets rsv1 and the compressed payload.
    assert frames.log == [("z", "compressed", COMPRESSED_CALL), ("p", "plain", PLAIN_CALL)]


def test_deflate_target_gets_plain_without_rsv1_when_nothing_was_compressed(impl: ModuleType) -> None:
    frames = Frames(compressed=False)
    targets = group(impl, frames, ("z", True, False))
    assert impl.broadcast(targets, frames.plain, None, "acc", {"Email": "1"}) == 1
    assert frames.log == [("z", "plain", PLAIN_CALL)]


def test_writes_follow_insertion_order(impl: ModuleType) -> None:
    frames = Frames()
    names = [f"t{i}" for i in range(20)]
    targets = group(impl, frames, *((n, i % 3 == 0, False) for i, n in enumerate(names)))
    impl.broadcast(targets, frames.plain, frames.compressed, "acc", {"Email": "1"})
    assert [call[0] for call in frames.log] == names


def test_empty_group(impl: ModuleType) -> None:
    frames = Frames()
    assert impl.broadcast({}, frames.plain, frames.compressed, "acc", {"Email": "1"}) == 0
    assert frames.log == []


def test_the_buffers_are_not_touched(impl: ModuleType) -> None:
    # Writing the header into the headroom is the transport's business; the loop hands the buffers on as is.
    frames = Frames()
    plain, compressed = bytes(frames.plain), bytes(frames.compressed or b"")
    targets = group(impl, frames, ("a", True, False), ("b", False, False), ("c", False, True))
    impl.broadcast(targets, frames.plain, frames.compressed, "acc", {"Email": "1"})
    assert (bytes(frames.plain), bytes(frames.compressed or b"")) == (plain, compressed)


# --- paused targets --------------------------------------------------------------------------------------

def test_paused_target_is_not_written_and_merges(impl: ModuleType) -> None:
    frames = Frames()
    targets = group(impl, frames, ("a", False, True), ("b", True, True), ("c", False, False))
    assert impl.broadcast(targets, frames.plain, frames.compressed, "acc", {"Email": "1"}) == 1
    assert frames.log == [("c", "plain", PLAIN_CALL)]
    a, b, c = targets
    assert a.pending == {"acc": {"Email": "1"}}
    assert b.pending == {"acc": {"Email": "1"}}
    assert c.pending is None


def test_newest_state_wins_per_account_and_type(impl: ModuleType) -> None:
    frames = Frames()
    targets = group(impl, frames, ("a", False, True))
    (a,) = targets
    impl.broadcast(targets, frames.plain, None, "acc1", {"Email": "1", "Mailbox": "m1"})
    impl.broadcast(targets, frames.plain, None, "acc2", {"Email": "x1"})
    impl.broadcast(targets, frames.plain, None, "acc1", {"Email": "2", "EmailDelivery": "d2"})
    impl.broadcast(targets, frames.plain, None, "acc2", {"Email": "x2", "Mailbox": "y2"})
    assert a.pending == {
        "acc1": {"Email": "2", "Mailbox": "m1", "EmailDelivery": "d2"},
        "acc2": {"Email": "x2", "Mailbox": "y2"},
    }
    assert frames.log == []


def test_merge_keeps_pending_that_was_there_before(impl: ModuleType) -> None:
    frames = Frames()
    targets = group(impl, frames, ("a", False, True))
    (a,) = targets
    a.pending = {"other": {"Email": "o1"}, "acc": {"Mailbox": "m0", "Email": "0"}}
    impl.broadcast(targets, frames.plain, None, "acc", {"Email": "1"})
    assert a.pending == {"other": {"Email": "o1"}, "acc": {"Mailbox": "m0", "Email": "1"}}


def test_pending_does_not_alias_the_callers_states(impl: ModuleType) -> None:
    # The hub reuses its per-variant dicts: a pending entry must be a copy, or later events would rewrite it.
    frames = Frames()
    targets = group(impl, frames, ("a", False, True), ("b", False, True))
    a, b = targets
    states = {"Email": "1"}
    impl.broadcast(targets, frames.plain, None, "acc", states)
    states["Email"] = "changed"
    assert a.pending == {"acc": {"Email": "1"}}
    assert b.pending is not None and a.pending is not None
    assert b.pending["acc"] is not a.pending["acc"]


def test_merge_function(impl: ModuleType) -> None:
    t = impl.Target(None)
    impl.merge(t, "acc", {"Email": "1"})
    impl.merge(t, "acc", {"Mailbox": "m"})
    impl.merge(t, "b", {"Email": "b1"})
    impl.merge(t, "acc", {"Email": "2"})
    assert t.pending == {"acc": {"Email": "2", "Mailbox": "m"}, "b": {"Email": "b1"}}


def test_resumed_target_is_written_again(impl: ModuleType) -> None:
    frames = Frames(compressed=False)
    targets = group(impl, frames, ("a", False, True))
    (a,) = targets
    assert impl.broadcast(targets, frames.plain, None, "acc", {"Email": "1"}) == 0
    a.paused = False
    assert impl.broadcast(targets, frames.plain, None, "acc", {"Email": "2"}) == 1
    assert frames.log == [("a", "plain", PLAIN_CALL)]
    assert a.pending == {"acc": {"Email": "1"}}  # flushing it is the hub's job, not the loop's


def test_flags_are_read_by_truthiness(impl: ModuleType) -> None:
    frames = Frames()
    targets = group(impl, frames, ("a", False, False), ("b", False, False))
    a, b = targets
    a.paused, a.deflate = 0, 1
    b.paused = []
    assert impl.broadcast(targets, frames.plain, frames.compressed, "acc", {"Email": "1"}) == 2
    assert frames.log == [("a", "compressed", COMPRESSED_CALL), ("b", "plain", PLAIN_CALL)]


# --- other targets, errors, arguments --------------------------------------------------------------------

def test_transport_can_be_replaced(impl: ModuleType) -> None:
    frames = Frames(compressed=False)
    targets = group(impl, frames, ("old", False, False))
    (t,) = targets
    t.transport = FakeTransport("new", frames)
    impl.broadcast(targets, frames.plain, None, "acc", {"Email": "1"})
    assert frames.log == [("new", "plain", PLAIN_CALL)]


def test_duck_typed_targets_behave_like_targets(impl: ModuleType) -> None:
    class Duck:
        def __init__(self, transport: FakeTransport, deflate: bool, paused: bool) -> None:
            self.transport, self.deflate, self.paused = transport, deflate, paused
            self.pending: dict[str, dict[str, str]] | None = None

    frames = Frames()
    ducks = [Duck(FakeTransport("d1", frames), True, False), Duck(FakeTransport("d2", frames), False, True)]
    subclass = type("Sub", (impl.Target,), {})(FakeTransport("s", frames), False)
    targets: dict[Any, None] = {ducks[0]: None, ducks[1]: None, subclass: None}
    assert impl.broadcast(targets, frames.plain, frames.compressed, "acc", {"Email": "1"}) == 2
    assert frames.log == [("d1", "compressed", COMPRESSED_CALL), ("s", "plain", PLAIN_CALL)]
    assert ducks[1].pending == {"acc": {"Email": "1"}}


def test_a_failing_send_propagates_after_the_earlier_writes(impl: ModuleType) -> None:
    frames = Frames(compressed=False)
    targets = group(impl, frames, ("a", False, False))
    bad = impl.Target(FakeTransport("bad", frames, fail=True))
    targets[bad] = None
    targets.update(group(impl, frames, ("c", False, False)))
    with pytest.raises(ConnectionError):
        impl.broadcast(targets, frames.plain, None, "acc", {"Email": "1"})
    assert [call[0] for call in frames.log] == ["a", "bad"]


def test_a_send_that_changes_the_group_stops_the_loop(impl: ModuleType) -> None:
    frames = Frames(compressed=False)
    targets: dict[Any, None] = {}

    class Dropping(FakeTransport):
        def send_reuse_external_bytearray(self, *args: Any) -> None:
            super().send_reuse_external_bytearray(*args)
            del targets[victim]

    first = impl.Target(Dropping("first", frames))
    victim = impl.Target(FakeTransport("victim", frames))
    targets[first] = None
    targets[victim] = None
    with pytest.raises(RuntimeError, match="changed size during iteration"):
        impl.broadcast(targets, frames.plain, None, "acc", {"Email": "1"})
    assert [call[0] for call in frames.log] == ["first"]


@pytest.mark.parametrize("args", [
    ([], bytearray(HEADROOM), None),
    ({}, bytes(HEADROOM), None),
    ({}, bytearray(HEADROOM), bytes(HEADROOM)),
    (None, bytearray(HEADROOM), None),
])
def test_wrong_argument_types_are_refused(impl: ModuleType, args: tuple[Any, Any, Any]) -> None:
    with pytest.raises(TypeError):
        impl.broadcast(*args, "acc", {"Email": "1"})


def test_a_fake_transport_is_not_taken_for_a_picows_one(both: tuple[ModuleType, ModuleType]) -> None:
    compiled, _ = both
    bench = load_bench()
    t = compiled.Target(FakeTransport("x", Frames()))
    assert bench.is_fast_path(t) is False
    with pytest.raises(TypeError):
        bench.is_fast_path(object())  # the helper reads Target's C field: nothing else is accepted


# --- native ≡ Python -------------------------------------------------------------------------------------

ACCOUNTS = st.sampled_from(["a1", "a2", "a3"])
TYPES = st.sampled_from(["Email", "Mailbox", "EmailDelivery", "Thread"])
STATES = st.dictionaries(TYPES, st.text("0123456789", min_size=1, max_size=3), min_size=1, max_size=4)
PENDING = st.none() | st.dictionaries(ACCOUNTS, STATES, max_size=3)
TARGET = st.tuples(st.booleans(), st.booleans(), PENDING)  # deflate, paused, pending
# A step is either a broadcast (account, states, with a compressed buffer or not) or a flip of one target's
# pause flag, as pause_writing/resume_writing do between events.
BROADCAST = st.tuples(st.just("broadcast"), ACCOUNTS, STATES, st.booleans())
FLIP = st.tuples(st.just("flip"), st.integers(min_value=0, max_value=50))
STEPS = st.lists(BROADCAST | FLIP, max_size=25)


def run(module: ModuleType, specs: list[tuple[bool, bool, Any]], steps: list[Any]) -> tuple[Any, ...]:
    frames_log: list[Call] = []
    results: list[int] = []
    transports: list[FakeTransport] = []
    targets: dict[Any, None] = {}
    for i, (deflate, paused, pending) in enumerate(specs):
        transport = FakeTransport(f"t{i}", Frames())
        transport.frames.log = frames_log
        transports.append(transport)
        t = module.Target(transport, deflate)
        t.paused = paused
        # Deep copies: each implementation must start from equal, unshared pending state.
        t.pending = None if pending is None else {acc: dict(s) for acc, s in pending.items()}
        targets[t] = None
    ordered = list(targets)
    for step in steps:
        if step[0] == "flip":
            if ordered:
                t = ordered[step[1] % len(ordered)]
                t.paused = not t.paused
            continue
        _, account, states, with_compressed = step
        frames = Frames(with_compressed)
        for transport in transports:
            transport.frames = frames
        frames.log = frames_log
        results.append(module.broadcast(targets, frames.plain, frames.compressed, account, dict(states)))
    return frames_log, results, [t.pending for t in ordered], [t.paused for t in ordered]


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(TARGET, max_size=8), steps=STEPS)
def test_native_and_python_are_identical(both: tuple[ModuleType, ModuleType],
                                         specs: list[tuple[bool, bool, Any]], steps: list[Any]) -> None:
    compiled, twin = both
    assert run(compiled, specs, steps) == run(twin, specs, steps)
