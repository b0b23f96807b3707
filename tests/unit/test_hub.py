"""The hub as pure logic: variant grouping (encode once), filters, bus reference counting, resume, enable cost.

Fake transports record writes; that is fine here (a unit test of pure logic)."""

from __future__ import annotations

import json
from typing import Any

from gateway import native
from gateway.bus.events import new_event
from gateway.directory import Directory
from gateway.fanout import pushstate
from gateway.fanout.hub import Hub


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
    def __init__(self) -> None:
        self.subscribed: dict[str, int] = {}

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
twin = native.load("_broadcast", native=False)


def make(states: dict[str, dict[str, str]] | None = None) -> tuple[Hub, FakeBus, States]:
    bus, source = FakeBus(), States(states or {})
    return Hub(bus, source, twin), bus, source  # type: ignore[arg-type]


def target() -> Any:
    return twin.Target(FakeTransport())


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
