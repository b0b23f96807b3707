"""The one-event push (`Lane`, `encode_state_change`, `Stats` of gateway._broadcast and its twin).

The Lane takes the usual event (one account whose sessions share one plain variant) and hands every other batch to
the hub's general path. These tests pin which batches it takes, that what it writes is byte for byte what the
hub's general path writes (msgspec's StateChange with gateway.fanout.pushstate's token), and that the compiled
module and its twin agree. Fake transports record writes (pure logic; real sockets are in tests/e2e).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import native
from gateway.bus.events import new_event
from gateway.directory import Directory, Principal
from gateway.fanout import pushstate
from gateway.fanout.hub import EVENT_SOURCE, WEBSOCKET, Hub
from gateway.jmap.types import StateChange
from tests.native_impl import load_impl

HEADROOM = 14


@pytest.fixture(scope="module", params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("_broadcast", request.param)


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    return load_impl("_broadcast", "native")


twin = native.load("_broadcast", native=False)


def expected_frame(account_id: str, changed: dict[str, str], states: dict[str, str]) -> bytes:
    """The hub's general path: msgspec's StateChange and the pushState of a one-account, every-type session."""
    token = pushstate.encode({account_id: states})
    return bytes(HEADROOM) + msgspec.json.encode(StateChange(changed={account_id: changed}, pushState=token))


# --- the encoding ----------------------------------------------------------------------------------------

# Every character class the JSON escaper and the msgpack header treat apart: controls, quote and backslash,
# DEL, non-ASCII (2, 3 and 4 bytes of UTF-8), U+2028/9 (JSON needs no escape for them).
TEXT = st.text(st.characters(exclude_categories=["Cs"]) | st.sampled_from('"\\\x00\x1f\x7f\u2028é😀'),
               max_size=40)
# Lengths around msgpack's header sizes: fixstr < 32 <= str 8 < 256 <= str 16 < 65536 <= str 32.
LONG = st.sampled_from([31, 32, 255, 256, 65535, 65536]).map(lambda n: "s" * n)
STATES = st.dictionaries(TEXT, TEXT | LONG, max_size=20)  # fixmap < 16 <= map 16


@settings(max_examples=300, deadline=None)
@given(account=TEXT, changed=STATES, states=STATES)
def test_encoding_is_byte_for_byte_the_general_paths(compiled: ModuleType, account: str,
                                                      changed: dict[str, str], states: dict[str, str]) -> None:
    want = expected_frame(account, changed, states)
    assert bytes(compiled.encode_state_change(account, changed, states)) == want
    assert bytes(twin.encode_state_change(account, changed, states)) == want


def test_the_token_reads_back(impl: ModuleType) -> None:
    frame = impl.encode_state_change("a1", {"Email": "e2"}, {"Email": "e2", "Mailbox": "m1"})
    message = msgspec.json.decode(bytes(frame[HEADROOM:]))
    assert message["changed"] == {"a1": {"Email": "e2"}}
    assert pushstate.decode(message["pushState"]) == {"a1": {"Email": "e2", "Mailbox": "m1"}}


@pytest.mark.parametrize("bad", ["\ud800", 5])
def test_what_msgspec_refuses_or_encodes_otherwise_is_not_guessed(compiled: ModuleType, bad: Any) -> None:
    # A lone surrogate cannot be UTF-8 (msgspec raises); a non-string has no place in this encoder. The
    # compiled encoder raises for both, and the Lane then hands the event to the hub's general path.
    with pytest.raises((UnicodeError, TypeError)):
        compiled.encode_state_change("a1", {"Email": bad}, {"Email": "x"})


# --- statistics ------------------------------------------------------------------------------------------

@given(st.lists(st.sampled_from(twin.FANOUT_BOUNDS) | st.floats(0, 5, allow_nan=False), max_size=30))
def test_stats_agree(compiled: ModuleType, seconds: list[float]) -> None:
    assert compiled.FANOUT_BOUNDS == twin.FANOUT_BOUNDS
    a, b = compiled.Stats(), twin.Stats()
    for s in seconds:
        a.fanout(s)
        b.fanout(s)
    assert a.fanout_counts == b.fanout_counts
    assert a.fanout_sum == pytest.approx(b.fanout_sum)
    assert (a.events, a.pushes, a.merged) == (b.events, b.pushes, b.merged) == (0, 0, 0)


def test_a_bound_is_in_its_own_bucket(impl: ModuleType) -> None:
    stats = impl.Stats()
    stats.fanout(impl.FANOUT_BOUNDS[0])
    stats.fanout(impl.FANOUT_BOUNDS[0] * 1.01)
    stats.fanout(99.0)
    counts = stats.fanout_counts
    assert counts[0] == 1 and counts[1] == 1 and counts[-1] == 1 and sum(counts) == 3


# --- which batches the Lane takes --------------------------------------------------------------------------

class FakeTransport:
    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bool]] = []

    def send_reuse_external_bytearray(self, op: int, buf: bytearray, offset: int, *rsv1: bool) -> None:
        self.frames.append((bytes(buf[offset:]), bool(rsv1)))

    def send(self, op: int, payload: bytes, *rest: Any) -> None:
        self.frames.append((bytes(payload), bool(rest)))


class FakeBus:
    ready = True

    def subscribe(self, username: str) -> None:
        pass

    def unsubscribe(self, username: str) -> None:
        pass

    def bound(self, username: str) -> bool:
        return True

    async def wait_subscribed(self, usernames: Any) -> None:
        return None


directory = Directory([("bob", "x"), ("alice", "x"), ("carol", "x")])
BOB, ALICE, CAROL = directory.principal("bob"), directory.principal("alice"), directory.principal("carol")
ACC = BOB.account_ids[0]


async def no_states(principal: Any, accounts: Any) -> dict[str, dict[str, str]]:
    return {a: {} for a in accounts}


class CountingHub(Hub):
    """The hub as it ships, whose batch path counts the batches handed to it (its Lane is wired by the hub itself
    around this override)."""

    general = 0

    def _on_batch(self, events: Any) -> None:
        self.general += 1
        super()._on_batch(events)


class Counting:
    def __init__(self, impl: ModuleType, **kwargs: Any) -> None:
        self.impl = impl
        self.hub = CountingHub(FakeBus(), no_states, impl, **kwargs)  # type: ignore[arg-type]

    @property
    def general(self) -> int:
        return self.hub.general

    async def enable(self, principal: Principal = BOB, types: frozenset[str] | None = None,
                     framing: int = WEBSOCKET, deflate: bool = False) -> Any:
        target = self.impl.Target(FakeTransport(), deflate)
        await self.hub.enable(target, principal, types, None, lambda: True, framing)
        return target


async def test_the_usual_event_is_taken_by_the_lane(impl: ModuleType) -> None:
    c = Counting(impl)
    t = await c.enable()
    c.hub.on_events([new_event("bob", {"Email": "e1"})])
    assert c.general == 0
    assert t.transport.frames == [(expected_frame(ACC, {"Email": "e1"}, {"Email": "e1"})[HEADROOM:], False)]
    assert (c.hub.stats.events, c.hub.stats.pushes, sum(c.hub.stats.fanout_counts)) == (1, 1, 1)


async def test_deflate_recipients_get_the_compressed_frame(impl: ModuleType) -> None:
    c = Counting(impl, compress=lambda view: b"Z" + bytes(view))
    plain, deflated = await c.enable(), await c.enable(deflate=True)
    c.hub.on_events([new_event("bob", {"Email": "e1"})])
    assert c.general == 0
    payload = expected_frame(ACC, {"Email": "e1"}, {"Email": "e1"})[HEADROOM:]
    assert plain.transport.frames == [(payload, False)]
    assert deflated.transport.frames == [(b"Z" + payload, True)]


async def test_a_paused_recipient_merges(impl: ModuleType) -> None:
    c = Counting(impl)
    t = await c.enable()
    t.paused = True
    c.hub.on_events([new_event("bob", {"Email": "e1"})])
    assert c.general == 0 and t.transport.frames == [] and t.pending == {ACC: {"Email": "e1"}}
    assert (c.hub.stats.pushes, c.hub.stats.merged) == (0, 1)


async def test_an_event_with_no_states_records_nothing_and_writes_nothing(impl: ModuleType) -> None:
    c = Counting(impl)
    t = await c.enable()
    c.hub.on_events([new_event("bob", {})])
    assert c.general == 0 and t.transport.frames == [] and c.hub.stats.events == 1


async def test_one_accounts_events_of_one_batch_are_one_push(impl: ModuleType) -> None:
    c = Counting(impl)
    bob, alice = await c.enable(), await c.enable(ALICE)
    first = new_event("bob", {"Email": "e1", "Mailbox": "m1"})
    c.hub.on_events([first, new_event("alice", {"Email": "a1"}), new_event("bob", {"Email": "e2"})])
    assert c.general == 0
    both = {"Email": "e2", "Mailbox": "m1"}
    assert bob.transport.frames == [(expected_frame(ACC, both, both)[HEADROOM:], False)]
    alice_acc = ALICE.account_ids[0]
    assert alice.transport.frames == [(expected_frame(alice_acc, {"Email": "a1"}, {"Email": "a1"})[HEADROOM:], False)]
    assert first.typeStates == {"Email": "e1", "Mailbox": "m1"}, "the event's own states are left as they came"
    assert (c.hub.stats.events, c.hub.stats.pushes, sum(c.hub.stats.fanout_counts)) == (3, 2, 1)


async def test_a_mixed_batch_is_shared_out(impl: ModuleType) -> None:
    c = Counting(impl)
    bob = await c.enable()
    alice_filtered = await c.enable(ALICE, types=frozenset({"Email"}))
    c.hub.on_events([new_event("alice", {"Email": "a1", "Mailbox": "x"}), new_event("bob", {"Email": "e1"}),
                     new_event("nobody", {"Email": "n1"})])
    assert c.general == 1  # alice's (filtered) and nobody's events, in one call
    assert [f for f, _ in bob.transport.frames] == [expected_frame(ACC, {"Email": "e1"}, {"Email": "e1"})[HEADROOM:]]
    assert len(alice_filtered.transport.frames) == 1
    assert c.hub.stats.events == 3


async def test_the_general_path_takes_everything_else(impl: ModuleType) -> None:
    c = Counting(impl)
    await c.enable()
    c.hub.on_events([new_event("nobody", {"Email": "e1"})])  # no local session
    assert c.general == 1
    await c.enable(types=frozenset({"Email"}))  # a second variant of the account: a filter
    c.hub.on_events([new_event("bob", {"Email": "e3"})])
    assert c.general == 2

    c = Counting(impl)
    await c.enable(types=frozenset({"Email"}))  # one variant, but filtered
    c.hub.on_events([new_event("bob", {"Email": "e1"})])
    assert c.general == 1

    c = Counting(impl)
    await c.enable(framing=EVENT_SOURCE)  # an event stream
    c.hub.on_events([new_event("bob", {"Email": "e1"})])
    assert c.general == 1

    c = Counting(impl)
    c.hub._watches.append({})  # a read in flight: events must reach its watch
    await c.enable()
    c.hub.on_events([new_event("bob", {"Email": "e1"})])
    assert c.general == 1


async def test_a_coalescing_window_takes_every_event(impl: ModuleType) -> None:
    # GATEWAY_PUSH_COALESCE_MS holds events back for a window: the hub's general path does that, not the Lane.
    assert isinstance(Hub(FakeBus(), no_states, impl).on_events, impl.Lane)  # type: ignore[arg-type]
    assert not isinstance(Hub(FakeBus(), no_states, impl, coalesce_ms=5).on_events, impl.Lane)  # type: ignore[arg-type]


async def test_a_delegated_account_leaves_the_lane(impl: ModuleType) -> None:
    # A session covering two accounts (its own and one shared with it) shapes its pushState from both: the
    # general path's business. Simulated with a principal of two accounts.
    shared = Principal(username=BOB.username, accounts=[*BOB.accounts, *ALICE.accounts])
    c = Counting(impl)
    await c.enable(shared)
    c.hub.on_events([new_event("bob", {"Email": "e1"})])
    assert c.general == 1


async def test_strings_the_lane_cannot_write_go_the_general_way(impl: ModuleType) -> None:
    # A state that is not a string (an injector's mistake that msgspec's decoder would refuse, here built by
    # hand): the compiled Lane hands it to the hub's deliver, which writes what msgspec makes of it, as the twin.
    c = Counting(impl)
    t = await c.enable()
    event = new_event("bob", {"Email": "e1"})
    event.typeStates["Count"] = 7  # type: ignore[assignment]
    c.hub.on_events([event])
    frames = t.transport.frames
    assert len(frames) == 1
    assert msgspec.json.decode(frames[0][0])["changed"] == {ACC: {"Email": "e1", "Count": 7}}


# --- the Lane and the general path write the same -------------------------------------------------------

BATCHES = st.lists(st.lists(st.tuples(st.sampled_from(["bob", "alice", "carol", "nobody"]),
                                      st.dictionaries(st.sampled_from(["Email", "Mailbox", "Thread", "X"]),
                                                      st.text("ab1", min_size=1, max_size=3), max_size=3)),
                            min_size=1, max_size=4),
                   max_size=8)


@settings(max_examples=80, deadline=None)
@given(batches=BATCHES, paused=st.booleans())
def test_lane_and_general_path_agree(impl: ModuleType, batches: list[list[tuple[str, dict[str, str]]]],
                                     paused: bool) -> None:
    """Over a history of batches, a hub whose events all take the general path and one whose events take the Lane
    write the same bytes to every session, keep the same states and count the same events and pushes (carol's
    session has a filter, so her events go the general way in both)."""
    import asyncio

    async def run(lane: bool) -> tuple[Any, ...]:
        c = Counting(impl, compress=lambda view: b"Z" + bytes(view))
        if not lane:
            c.hub.on_events = c.hub._on_batch
        sessions = [await c.enable(BOB), await c.enable(ALICE, deflate=True),
                    await c.enable(CAROL, types=frozenset({"Email", "X"}))]
        sessions[1].paused = paused
        for batch in batches:
            c.hub.on_events([new_event(user, dict(states)) for user, states in batch])
        s = c.hub.stats
        return ([t.transport.frames for t in sessions], [t.pending for t in sessions], c.hub._states,
                (s.events, s.pushes, s.merged))

    assert asyncio.run(run(True)) == asyncio.run(run(False))
