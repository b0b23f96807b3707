"""The hub's subscription index (gateway.fanout.hub) as properties, on the compiled broadcast loop and on its twin.

Random sequences of enables (principals with their own and delegated accounts, random dataTypes filters),
disables, grants and events; after every step the index must agree with a model of the live subscriptions:
- every event reaches exactly the targets whose subscription covers its account and whose filter leaves
  something, with that account's filtered change and the pushState of the target's variant;
- one encoded buffer per variant (and one compressed buffer for the variant's permessage-deflate targets);
- the bus is subscribed to an owner exactly while live subscriptions cover one of its accounts, and the hub
  counts exactly those subscriptions;
- after every subscription is disabled, nothing is left.

Fake transports and a fake bus record what the hub does (pure logic; the real ones are tested elsewhere).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, cast

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.bus.base import Bus
from gateway.bus.events import new_event
from gateway.directory import Directory, Principal, account_id_for
from gateway.fanout import pushstate
from gateway.fanout.hub import WEBSOCKET, Hub
from tests.native_impl import load_impl

USERS = ["u0@example.com", "u1@example.com", "u2@example.com", "u3@example.com"]
OUTSIDER = "nobody@example.com"  # an account no subscription ever covers
TYPES = ["Email", "Mailbox", "Thread", "EmailDelivery", "Calendar"]  # Calendar: a type only the bus carries
TARGETS = 7  # connection i belongs to USERS[i % 4]; odd ones negotiated permessage-deflate


def user_of(i: int) -> str:
    return USERS[i % len(USERS)]


def compress(view: memoryview) -> bytes:
    """A stand-in compressor: the hub's compressed buffer must stay recognisable."""
    return b"Z" + bytes(view)


@dataclass
class Write:
    payload: bytes
    buffer: bytearray  # kept, so that buffer identity means something across one fan-out
    compressed: bool


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[Write] = []

    def send_reuse_external_bytearray(self, op: int, buf: bytearray, offset: int, *rsv1: bool) -> None:
        self.writes.append(Write(bytes(buf[offset:]), buf, bool(rsv1)))

    def send(self, op: int, payload: bytes, *rsv1: bool) -> None:
        raise AssertionError("nothing is paused and nothing resumes: only the broadcast loop writes")


class FakeBus:
    """Counts subscribe/unsubscribe per owner; always ready, bindings confirmed at once."""

    ready = True

    def __init__(self) -> None:
        self.net: dict[str, int] = {}

    def subscribe(self, username: str) -> None:
        self.net[username] = self.net.get(username, 0) + 1

    def unsubscribe(self, username: str) -> None:
        self.net[username] = self.net.get(username, 0) - 1

    async def wait_subscribed(self, usernames: Collection[str]) -> None:
        return None


@dataclass
class Live:
    accounts: tuple[str, ...]
    owners: frozenset[str]
    types: frozenset[str] | None

    @property
    def variant(self) -> tuple[tuple[str, ...], frozenset[str] | None, int]:
        return self.accounts, self.types, WEBSOCKET


Snapshot = dict[str, dict[str, str]]


def filtered(states: dict[str, str], types: frozenset[str] | None) -> dict[str, str]:
    return dict(states) if types is None else {t: s for t, s in states.items() if t in types}


FILTERS = st.none() | st.frozensets(st.sampled_from([*TYPES, "NoSuchType"]), max_size=3)
STATES = st.dictionaries(st.sampled_from(TYPES), st.text("abc123", min_size=1, max_size=3), max_size=3)
STEP = (
    st.tuples(st.just("enable"), st.integers(0, TARGETS - 1), FILTERS)
    | st.tuples(st.just("disable"), st.integers(0, TARGETS - 1))
    | st.tuples(st.just("grant"), st.sampled_from(USERS), st.sampled_from(USERS), st.booleans())
    | st.tuples(st.just("events"), st.lists(st.tuples(st.sampled_from([*USERS, OUTSIDER]), STATES),
                                            min_size=1, max_size=3))
)


class Scenario:
    def __init__(self, impl: ModuleType) -> None:
        self.directory = Directory([(u, "pw") for u in USERS])
        self.truth: dict[str, dict[str, str]] = {}  # what the request path reports (it sees every change)
        self.bus = FakeBus()
        self.reads = 0
        self.hub = Hub(cast(Bus, self.bus), self.states, impl, compress=compress)
        self.targets = [impl.Target(FakeTransport(), i % 2 == 1) for i in range(TARGETS)]
        self.live: dict[int, Live] = {}

    async def states(self, principal: Principal, accounts: Sequence[str]) -> dict[str, dict[str, str]]:
        self.reads += 1
        return {acc: dict(self.truth.get(acc, {})) for acc in accounts}

    def writes(self, i: int) -> list[Write]:
        return cast(FakeTransport, self.targets[i].transport).writes

    async def step(self, step: tuple[Any, ...]) -> None:
        before = [len(self.writes(i)) for i in range(TARGETS)]
        if step[0] == "enable":
            _, i, types = step
            principal = self.directory.principal(user_of(i))
            await self.hub.enable(self.targets[i], principal, types, None, lambda: True)
            self.live[i] = Live(tuple(principal.account_ids), frozenset(a.owner for a in principal.accounts), types)
            assert [len(self.writes(k)) for k in range(TARGETS)] == before, "an enable without pushState pushes nothing"
        elif step[0] == "disable":
            self.hub.disable(self.targets[step[1]])
            self.live.pop(step[1], None)
        elif step[0] == "grant":
            _, owner, delegate, grant = step
            # Reaches a subscription only with its next enable (a new principal), as in the gateway.
            (self.directory.grant if grant else self.directory.revoke)(owner, delegate)
        else:
            self.events(step[1], before)
        self.check_index()

    def events(self, batch: list[tuple[str, dict[str, str]]], before: list[int]) -> None:
        # One batch is merged per account (newest state per type wins) and pushed once per account, in the order
        # the accounts first appear: per target, (the account, the change it carries, the pushState's states).
        merged: dict[str, dict[str, str]] = {}
        for username, states in batch:
            acc = account_id_for(username)
            self.truth.setdefault(acc, {}).update(states)
            merged.setdefault(acc, {}).update(states)
        expected: dict[int, list[tuple[str, dict[str, Any], Snapshot]]] = {i: [] for i in range(TARGETS)}
        for acc, states in merged.items():
            for i, live in self.live.items():
                change = filtered(states, live.types)
                if acc in live.accounts and change:
                    snapshot = {a: filtered(self.truth.get(a, {}), live.types) for a in live.accounts}
                    expected[i].append((acc, {acc: change}, snapshot))
        self.hub.on_events([new_event(username, states) for username, states in batch])
        # Per account pushed: the buffer each variant's recipients were given, plain and compressed apart.
        buffers: dict[str, dict[tuple[Any, bool], list[int]]] = {}
        for i in range(TARGETS):
            got = self.writes(i)[before[i]:]
            assert len(got) == len(expected[i]), f"target {i}: {len(got)} writes, expected {len(expected[i])}"
            for write, (n, change, snapshot) in zip(got, expected[i], strict=True):
                deflate = bool(self.targets[i].deflate)
                assert write.compressed == deflate
                payload = write.payload[1:] if deflate else write.payload
                if deflate:
                    assert write.payload[:1] == b"Z"
                message = json.loads(payload)
                assert message["@type"] == "StateChange" and message["changed"] == change
                assert pushstate.decode(message["pushState"]) == snapshot
                buffers.setdefault(n, {}).setdefault((self.live[i].variant, deflate), []).append(id(write.buffer))
        for per_variant in buffers.values():
            for ids in per_variant.values():
                assert len(set(ids)) == 1, "one encoded buffer for every recipient of a variant"
            distinct = {ids[0] for ids in per_variant.values()}
            assert len(distinct) == len(per_variant), "each variant has a buffer of its own"

    def check_index(self) -> None:
        hub = self.hub
        assert hub.subscriptions == len(self.live)
        for i, t in enumerate(self.targets):
            sub = hub.subscription(t)
            if i in self.live:
                assert sub is not None and sub.key == self.live[i].variant
            else:
                assert sub is None
        refs: dict[str, int] = {}
        for live in self.live.values():
            for owner in live.owners:
                refs[owner] = refs.get(owner, 0) + 1
        assert hub._owner_refs == refs  # exactly the live subscriptions covering each owner
        for owner in {*self.bus.net, *refs}:
            assert self.bus.net.get(owner, 0) == (1 if owner in refs else 0), owner
        covered: dict[str, dict[Any, set[int]]] = {}
        for i, live in self.live.items():
            for acc in live.accounts:
                covered.setdefault(acc, {}).setdefault(live.variant, set()).add(id(self.targets[i]))
        index = {acc: {key: {id(t) for t in group.targets} for key, group in groups.items()}
                 for acc, groups in hub._index.items()}
        assert index == covered
        for groups in hub._index.values():
            for group in groups.values():
                assert group.deflate_count == sum(1 for t in group.targets if t.deflate)
        # Live states only for covered accounts, all read (every enable here was awaited) and kept current.
        assert set(hub._states) == set(covered) == hub._complete
        for acc, states in hub._states.items():
            assert states == self.truth.get(acc, {})

    async def finish(self) -> None:
        for t in self.targets:
            self.hub.disable(t)
        self.live.clear()
        self.check_index()
        hub = self.hub
        assert (hub.subscriptions, hub._index, hub._states, hub._complete, hub._owner_refs) == (0, {}, {}, set(), {})
        assert all(n == 0 for n in self.bus.net.values())
        assert all(t.pending is None for t in self.targets)
        await hub.close()


@pytest.fixture(scope="module", params=["native", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return load_impl("_broadcast", request.param)


def run(impl: ModuleType, steps: list[tuple[Any, ...]]) -> Scenario:
    async def scenario() -> Scenario:
        s = Scenario(impl)
        for step in steps:
            await s.step(step)
        await s.finish()
        return s

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(scenario())


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(STEP, max_size=30))
def test_the_index_follows_the_subscriptions(impl: ModuleType, steps: list[tuple[Any, ...]]) -> None:
    run(impl, steps)


def test_a_shared_account_reaches_owner_and_delegate_in_their_own_variants(impl: ModuleType) -> None:
    # A fixed case of the property, so that the interesting path runs even if the search never finds it.
    u0, u1 = USERS[0], USERS[1]
    s = run(impl, [
        ("grant", u0, u1, True),
        ("enable", 0, None), ("enable", 4, None),  # two connections of u0: one variant
        ("enable", 1, frozenset({"Email"})),  # u1 (deflate), covering u0's account too
        ("events", [(u0, {"Email": "e1", "Mailbox": "m1"}), (OUTSIDER, {"Email": "x"})]),
        ("events", [(u0, {"Mailbox": "m2"})]),  # u1's filter leaves nothing
    ])
    assert [len(s.writes(i)) for i in (0, 4, 1)] == [2, 2, 1]
    assert s.writes(0)[0].buffer is s.writes(4)[0].buffer
    assert s.writes(1)[0].compressed and s.writes(1)[0].buffer is not s.writes(0)[0].buffer
