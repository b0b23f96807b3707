"""The hub as pure logic: variant grouping (encode once), filters, bus reference counting, resume, enable cost.

Every test runs on the compiled broadcast module (whose Lane takes the usual event) and on its twin. Fake
transports record writes; that is fine here (a unit test of pure logic)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway import native
from gateway.bus.events import new_event
from gateway.directory import Directory
from gateway.fanout import pushstate
from gateway.fanout.hub import Hub
from tests.native_impl import load_impl


class FakeTransport:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.buffers: list[int] = []

    def send_reuse_external_bytearray(self, op: int, buf: bytearray, offset: int, *rest: Any) -> None:
        self.frames.append(bytes(buf[offset:]))
        self.buffers.append(id(buf))

    def send(self, op: int, payload: bytes, *rest: Any) -> None:
        self.frames.append(bytes(payload))


class FakeBus:
    ready = True

    def __init__(self) -> None:
        self.subscribed: dict[str, int] = {}

    async def wait_subscribed(self, usernames: Any) -> None:
        return None

    def bound(self, username: str) -> bool:
        return True

    def subscribe(self, u: str) -> None:
        self.subscribed[u] = self.subscribed.get(u, 0) + 1

    def unsubscribe(self, u: str) -> None:
        self.subscribed[u] -= 1


class States:
    def __init__(self, states: dict[str, dict[str, str]]) -> None:
        self.states = states
        self.calls = 0

    async def __call__(self, principal: Any, accounts: Any) -> dict[str, dict[str, str]]:
        self.calls += 1
        return {a: dict(self.states.get(a, {})) for a in accounts}


directory = Directory([("bob", "x"), ("alice", "x")])
BOB = directory.principal("bob")
ACC = BOB.account_ids[0]
impl = native.load("_broadcast", native=False)  # the module under test: each test runs on both (below)


@pytest.fixture(autouse=True, params=["native", "python"])
def _impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(globals(), "impl", load_impl("_broadcast", request.param))


def make(states: dict[str, dict[str, str]] | None = None) -> tuple[Hub, FakeBus, States]:
    bus, source = FakeBus(), States(states or {})
    return Hub(bus, source, impl), bus, source  # type: ignore[arg-type]


def target() -> Any:
    return impl.Target(FakeTransport())


async def test_one_encoding_per_variant_and_filters() -> None:
    hub, _, _ = make()
    plain = [target() for _ in range(3)]
    email_only = target()
    for t in plain:
        await hub.enable(t, BOB, None, None, lambda: True)
    await hub.enable(email_only, BOB, frozenset({"Email"}), None, lambda: True)
    hub.on_events([new_event("bob", {"Email": "e1", "Mailbox": "m1"})])
    frames = [t.transport.frames[-1] for t in plain]
    assert len({t.transport.buffers[-1] for t in plain}) == 1, "one encoded buffer written to every recipient"
    assert len(set(frames)) == 1
    assert json.loads(frames[0])["changed"] == {ACC: {"Email": "e1", "Mailbox": "m1"}}
    assert json.loads(email_only.transport.frames[-1])["changed"] == {ACC: {"Email": "e1"}}
    hub.on_events([new_event("bob", {"Mailbox": "m2"})])
    assert len(email_only.transport.frames) == 1  # its filter leaves nothing: nothing sent


async def test_bus_subscription_is_reference_counted() -> None:
    hub, bus, _ = make()
    a, b = target(), target()
    await hub.enable(a, BOB, None, None, lambda: True)
    await hub.enable(b, BOB, None, None, lambda: True)
    await hub.enable(a, BOB, None, None, lambda: True)  # a replacement, not a second subscription
    assert bus.subscribed == {"bob": 1}
    hub.disable(a)
    assert bus.subscribed == {"bob": 1}
    hub.disable(b)
    assert bus.subscribed == {"bob": 0}


async def test_resume_sends_exactly_the_difference_and_enables_reuse_known_states() -> None:
    hub, _, source = make({ACC: {"Email": "e5", "Mailbox": "m1"}})
    first = target()
    await hub.enable(first, BOB, None, None, lambda: True)
    assert source.calls == 1 and first.transport.frames == []
    second = target()
    await hub.enable(second, BOB, None, None, lambda: True)
    assert source.calls == 1, "states already known and nothing to resume: no request-path call"
    resumed = target()
    token = pushstate.encode({ACC: {"Email": "e4", "Mailbox": "m1"}})
    await hub.enable(resumed, BOB, None, token, lambda: True)
    assert json.loads(resumed.transport.frames[-1])["changed"] == {ACC: {"Email": "e5"}}


class GatedStates(States):
    """A request path whose reads wait for `release` (so a test can act while one is in flight)."""

    def __init__(self, states: dict[str, dict[str, str]]) -> None:
        super().__init__(states)
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.fail = False

    async def __call__(self, principal: Any, accounts: Any) -> dict[str, dict[str, str]]:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if self.fail:
            raise ConnectionError("upstream down")
        return {a: dict(self.states.get(a, {})) for a in accounts}


def changed(t: Any) -> list[dict[str, dict[str, str]]]:
    return [json.loads(f)["changed"] for f in t.transport.frames]


async def test_states_of_an_account_nobody_covers_are_not_trusted_on_resume() -> None:
    hub, _, source = make({ACC: {"Email": "e1", "Mailbox": "m1"}})
    first = target()
    await hub.enable(first, BOB, None, None, lambda: True)
    hub.on_events([new_event("bob", {"Email": "e2"})])
    token = json.loads(first.transport.frames[-1])["pushState"]
    hub.disable(first)  # nobody covers Bob now: the bus no longer tells this node what moves
    source.states[ACC] = {"Email": "e3", "Mailbox": "m1"}  # changed while away
    resumed = target()
    await hub.enable(resumed, BOB, None, token, lambda: True)
    assert source.calls == 2, "the request path answers for an account that was not covered"
    assert changed(resumed) == [{ACC: {"Email": "e3"}}]


async def test_a_resume_on_a_covered_complete_account_needs_no_read() -> None:
    hub, _, source = make({ACC: {"Email": "e1"}})
    keeper = target()
    await hub.enable(keeper, BOB, frozenset(), None, lambda: True)
    hub.on_events([new_event("bob", {"Email": "e2"})])
    resumed = target()
    await hub.enable(resumed, BOB, None, pushstate.encode({ACC: {"Email": "e1"}}), lambda: True)
    assert source.calls == 1
    assert changed(resumed) == [{ACC: {"Email": "e2"}}]


async def test_events_during_a_read_win_over_its_answer() -> None:
    source = GatedStates({ACC: {"Email": "e1", "Mailbox": "m1"}})
    hub = Hub(FakeBus(), source, impl)  # type: ignore[arg-type]
    t = target()
    enabling = asyncio.ensure_future(hub.enable(t, BOB, None, pushstate.encode({ACC: {}}), lambda: True))
    await source.started.wait()
    hub.on_events([new_event("bob", {"Email": "e2"})])  # newer than what the read will say
    source.release.set()
    await enabling
    assert changed(t)[0] == {ACC: {"Email": "e2"}}  # the live push
    assert changed(t)[1] == {ACC: {"Email": "e2", "Mailbox": "m1"}}  # the resume: e2 was not undone by the read
    assert json.loads(t.transport.frames[-1])["pushState"] == pushstate.encode({ACC: {"Email": "e2", "Mailbox": "m1"}})


async def test_concurrent_enables_share_one_read() -> None:
    source = GatedStates({ACC: {"Email": "e1"}})
    hub = Hub(FakeBus(), source, impl)  # type: ignore[arg-type]
    targets = [target() for _ in range(5)]
    enables = [asyncio.ensure_future(hub.enable(t, BOB, None, None, lambda: True)) for t in targets]
    await source.started.wait()
    source.release.set()
    await asyncio.gather(*enables)
    assert source.calls == 1


async def test_a_failed_read_is_retried_and_pushes_what_moved() -> None:
    source = GatedStates({ACC: {"Email": "e1"}})
    source.fail = True
    source.release.set()
    hub = Hub(FakeBus(), source, impl)  # type: ignore[arg-type]
    hub._retry_delay = 0.01  # the back-off starts at a second; the test need not wait that long
    t = target()
    await hub.enable(t, BOB, None, pushstate.encode({ACC: {"Email": "e0"}}), lambda: True)
    assert t.transport.frames == [], "nothing is known yet: nothing is claimed"
    source.fail = False
    for _ in range(200):
        if t.transport.frames:
            break
        await asyncio.sleep(0.01)
    assert changed(t) == [{ACC: {"Email": "e1"}}]
    await hub.close()


async def test_bus_only_types_resume_from_the_ledger_and_are_said_even_when_unchanged() -> None:
    hub, _, _ = make({ACC: {"Email": "e1"}})
    t = target()
    await hub.enable(t, BOB, None, None, lambda: True)
    hub.on_events([new_event("bob", {"Calendar": "c1"})])
    token = json.loads(t.transport.frames[-1])["pushState"]
    hub.disable(t)
    resumed = target()
    await hub.enable(resumed, BOB, None, token, lambda: True)
    # Email is read and unchanged: not pushed; Calendar cannot be vouched for: its newest known state is said.
    assert changed(resumed) == [{ACC: {"Calendar": "c1"}}]
    hub.on_events([new_event("bob", {"Calendar": "c2"})])  # seen while bound again: trusted
    newer = json.loads(resumed.transport.frames[-1])["pushState"]
    again = target()
    await hub.enable(again, BOB, None, newer, lambda: True)
    assert again.transport.frames == []


async def test_a_type_never_seen_here_is_not_claimed() -> None:
    hub, _, _ = make({ACC: {"Email": "e1"}})
    t = target()
    await hub.enable(t, BOB, None, pushstate.encode({ACC: {"Email": "e1", "Calendar": "c9"}}), lambda: True)
    assert t.transport.frames == []


async def test_a_gap_makes_every_account_incomplete_and_bus_only_types_uncertain() -> None:
    hub, _, source = make({ACC: {"Email": "e1"}})
    t = target()
    await hub.enable(t, BOB, None, None, lambda: True)
    hub.on_events([new_event("bob", {"Calendar": "c1"})])
    source.states[ACC] = {"Email": "e2"}  # moved while the bus was away
    hub.on_gap()
    await asyncio.gather(*hub._tasks)  # the resync it started
    assert changed(t)[-1] == {ACC: {"Email": "e2"}}
    token = pushstate.encode({ACC: {"Email": "e2", "Calendar": "c1"}})
    resumed = target()
    await hub.enable(resumed, BOB, None, token, lambda: True)
    assert changed(resumed) == [{ACC: {"Calendar": "c1"}}]


def test_the_ledger_is_bounded_oldest_first() -> None:
    hub = Hub(FakeBus(), States({}), impl, ledger_accounts=2)  # type: ignore[arg-type]
    for name in ("a", "b", "c"):
        hub._remember(name, {"Calendar": name})
    assert list(hub._ledger) == ["b", "c"]
    hub._remember("b", {"Notes": "n"})
    assert list(hub._ledger) == ["c", "b"] and hub._ledger["b"] == {"Calendar": "b", "Notes": "n"}


async def test_a_batch_is_merged_per_account_one_write_per_socket() -> None:
    hub, _, _ = make()
    bob, alice = target(), target()
    await hub.enable(bob, BOB, None, None, lambda: True)
    await hub.enable(alice, directory.principal("alice"), None, None, lambda: True)
    alice_acc = directory.principal("alice").account_ids[0]
    hub.on_events([new_event("bob", {"Email": "e1"}), new_event("alice", {"Email": "a1"}),
                   new_event("bob", {"Email": "e2", "Mailbox": "m2"}), new_event("nobody", {"Email": "x"}),
                   new_event("bob", {"Thread": "t3"})])
    # Newest state per type wins, in one StateChange (one send) per socket; the token says the same.
    assert changed(bob) == [{ACC: {"Email": "e2", "Mailbox": "m2", "Thread": "t3"}}]
    assert json.loads(bob.transport.frames[0])["pushState"] == pushstate.encode(
        {ACC: {"Email": "e2", "Mailbox": "m2", "Thread": "t3"}})
    assert changed(alice) == [{alice_acc: {"Email": "a1"}}]
    assert hub.stats.events == 5 and hub.stats.pushes == 2


async def test_principals_covering_an_owner() -> None:
    hub, _, _ = make()
    bob_alone, bob_again = target(), target()
    await hub.enable(bob_alone, BOB, None, None, lambda: True)
    await hub.enable(bob_again, BOB, frozenset({"Email"}), None, lambda: True)
    assert hub.principals_of("bob") == [BOB]  # one principal, however many of its sessions
    assert hub.principals_of("alice") == []
    hub.disable(bob_alone)
    hub.disable(bob_again)
    assert hub.principals_of("bob") == []


class SlowBindBus(FakeBus):
    """A bus whose binding is confirmed only when the test says so (RabbitMQ's round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.confirmed = asyncio.Event()

    def bound(self, username: str) -> bool:
        return self.confirmed.is_set()

    async def wait_subscribed(self, usernames: Any) -> None:
        await self.confirmed.wait()


async def test_a_change_before_the_binding_is_pushed_to_a_session_enabled_without_push_state() -> None:
    bus, source = SlowBindBus(), States({ACC: {"Email": "e1", "Mailbox": "m1"}})
    hub = Hub(bus, source, impl)  # type: ignore[arg-type]
    t = target()
    enabling = asyncio.ensure_future(hub.enable(t, BOB, None, None, lambda: True))
    for _ in range(100):  # the first read happens at once, before the binding
        if source.calls:
            break
        await asyncio.sleep(0)
    # The client reads e1/m1 itself now. A mail arrives before the binding: no event reaches this node.
    source.states[ACC] = {"Email": "e2", "Mailbox": "m1"}
    bus.confirmed.set()
    await enabling
    assert source.calls == 2
    assert changed(t) == [{ACC: {"Email": "e2"}}], "what moved before the binding is pushed once bound"


async def test_a_gap_of_some_owners_reads_only_their_accounts() -> None:
    alice = directory.principal("alice")
    alice_acc = alice.account_ids[0]
    hub, _, source = make({ACC: {"Email": "e1"}, alice_acc: {"Email": "a1"}})
    bob_t, alice_t = target(), target()
    await hub.enable(bob_t, BOB, None, None, lambda: True)
    await hub.enable(alice_t, alice, None, None, lambda: True)
    calls = source.calls
    source.states[ACC] = {"Email": "e2"}
    source.states[alice_acc] = {"Email": "a2"}  # moved too, but Alice's events were not lost
    hub.on_gap(["bob"])  # e.g. Bob's upstream event stream was down
    await asyncio.gather(*hub._tasks)
    assert source.calls == calls + 1
    assert changed(bob_t)[-1] == {ACC: {"Email": "e2"}}
    assert alice_t.transport.frames == []
    assert ACC in hub._complete and alice_acc in hub._complete


class HookedBus(FakeBus):
    """A bus with the port's optional hooks (front mode's upstream event streams have them)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, Any]] = []

    def principal_joined(self, owner: str, principal: Any) -> None:
        self.calls.append(("joined", owner, principal))

    def principal_left(self, owner: str, principal: Any) -> None:
        self.calls.append(("left", owner, principal))

    def subscribe(self, u: str) -> None:
        self.calls.append(("subscribe", u, None))

    def unsubscribe(self, u: str) -> None:
        self.calls.append(("unsubscribe", u, None))


async def test_a_bus_with_hooks_is_told_who_covers_an_owner() -> None:
    directory.grant("alice", "bob")
    try:
        bob = directory.principal("bob")  # Bob's own account and Alice's
        bus = HookedBus()
        hub = Hub(bus, States({}), impl)  # type: ignore[arg-type]
        first, second = target(), target()
        await hub.enable(first, bob, None, None, lambda: True)
        await hub.enable(second, BOB, None, None, lambda: True)
        # Joined before the first subscribe (the bus may open a stream with these credentials at once).
        assert bus.calls == [("joined", "bob", bob), ("subscribe", "bob", None), ("joined", "alice", bob),
                             ("subscribe", "alice", None), ("joined", "bob", BOB)]
        bus.calls.clear()
        hub.disable(first)
        # Left before the last unsubscribe; Bob's account stays covered by the second session.
        assert bus.calls == [("left", "bob", bob), ("left", "alice", bob), ("unsubscribe", "alice", None)]
    finally:
        directory.revoke("alice", "bob")
