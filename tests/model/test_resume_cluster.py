"""Resume across two gateway processes on RabbitMQ (RFC 8887 §4.3.5: a pushState is a cursor on any node).

Both nodes are all-in-one (`GATEWAY_BUS=amqp`, an exchange of this test only) on one SQLite file, as the workers
mode runs them; SMTP listens on node A only. A client leaves one node and resumes on the other, and back, while
mail is delivered, flags change and emails are destroyed through either node's API, and nodes restart. After
every resume the client must reach the states the JMAP API reports (the oracle), EmailDelivery must have moved
exactly when deliveries happened (a second device that never leaves node A is told every delivery: its value is
the current one), and custom types (bus only) follow the rule of DESIGN.md: exact when the node saw the last
publish while bound, otherwise only ever a value that was really published.

No test waits on the gateway's internals: "the node is bound" is observed from outside, by publishing probe
events until one reaches the socket (`wait_routed`). A missing broker fails these tests under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from yarl import URL

from gateway.directory import account_id_for
from tests.conftest import ALICE, BOB
from tests.integration.amqp_support import BROKER_URL, require_broker
from tests.model.harness import (
    PROBE,
    Client,
    DelayProxy,
    GatewayProcess,
    admin_publish,
    api,
    email_ids,
    send_mail,
    server_states,
    wait_routed,
)

pytestmark = pytest.mark.amqp

ED = "EmailDelivery"
CUSTOM = "com.example.Note"
BOB_ACC, ALICE_ACC = account_id_for(BOB[0]), account_id_for(ALICE[0])


def delete_exchange(name: str) -> None:
    async def delete() -> None:
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            await channel.exchange_delete(name)

    with contextlib.suppress(Exception):
        asyncio.run(delete())


@contextlib.contextmanager
def running_cluster(workdir: Path, unbind_delay: str = "0",
                    b_broker: str = BROKER_URL) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """Node A (with SMTP) and node B, all-in-one on one SQLite file and one exchange of their own."""
    require_broker()
    exchange = f"jmap-resume-test-{uuid.uuid4().hex[:12]}"
    common = {"BUS": "amqp", "AMQP_EXCHANGE": exchange, "DB": str(workdir / "mail.sqlite3"),
              "AMQP_UNBIND_DELAY": unbind_delay}
    a = GatewayProcess(workdir, "node-a", smtp=True, AMQP_URL=BROKER_URL, **common)
    b = GatewayProcess(workdir, "node-b", smtp=False, AMQP_URL=b_broker, **common)
    try:
        a.start()  # first alone: it creates the database
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()
        delete_exchange(exchange)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """GATEWAY_AMQP_UNBIND_DELAY is 0 unless parametrised: a node stops hearing of an account as soon as its last
    session there leaves, so what it knows afterwards is only what it saw while bound (the default delay of 5 s
    lets it hear a little longer, which can hide stale states)."""
    with running_cluster(tmp_path, getattr(request, "param", "0")) as nodes:
        yield nodes


def readable_now(gw: GatewayProcess) -> dict[str, dict[str, str]]:
    return {BOB_ACC: server_states(gw.base, BOB, BOB_ACC)}


def flag_first(gw: GatewayProcess, flagged: bool) -> None:
    ids = email_ids(gw.base, BOB, BOB_ACC)
    out = api(gw.base, BOB, [["Email/set", {"accountId": BOB_ACC,
                                            "update": {ids[0]: {"keywords/$flagged": True if flagged else None}}},
                              "s"]])
    assert not out["s"].get("notUpdated"), out


def destroy_last(gw: GatewayProcess) -> None:
    ids = email_ids(gw.base, BOB, BOB_ACC)
    out = api(gw.base, BOB, [["Email/set", {"accountId": BOB_ACC, "destroy": [ids[-1]]}, "s"]])
    assert not out["s"].get("notDestroyed"), out


def start_watching(client: Client, gw: GatewayProcess, probe_from: GatewayProcess) -> None:
    """Connect, enable push for every type without pushState, sync as a client does, wait until routed."""
    client.connect(gw)
    client.enable(None, resume=False)
    client.sync(BOB_ACC)
    wait_routed(client, probe_from, BOB[0], BOB_ACC)


def resume_on(client: Client, gw: GatewayProcess, watcher: Client | None, oracle: GatewayProcess) -> None:
    """Reconnect on `gw` with the last pushState and check the invariant: the readable types reach the API's
    states, and EmailDelivery reaches the watcher's (told of every delivery on node A)."""
    client.connect(gw)
    client.enable(None)
    want = readable_now(oracle)
    client.converge(want, f"the states after resuming on {gw.name}")
    if watcher is not None:
        watcher.converge(want, "the states (watcher)")
        client.converge({BOB_ACC: {ED: watcher.state(BOB_ACC, ED) or ""}}, "the watcher's EmailDelivery")


@pytest.mark.parametrize("cluster", ["0", "5"], indirect=True, ids=["unbind-at-once", "unbind-delay-5s"])
def test_a_client_moves_between_nodes_and_misses_nothing(cluster: tuple[GatewayProcess, GatewayProcess]) -> None:
    a, b = cluster
    watcher, bob = Client(BOB), Client(BOB)
    start_watching(watcher, a, probe_from=b)
    start_watching(bob, a, probe_from=b)

    send_mail(a.smtp_port, [BOB[0]], "seen on A")
    bob.converge(readable_now(a))
    seen_delivery = bob.state(BOB_ACC, ED)
    assert seen_delivery is not None and bob.push_state is not None
    bob.close()

    # Away: a delivery (node A), a flag change through node B's API. Then resume on B, which never had Bob.
    send_mail(a.smtp_port, [BOB[0]], "missed, first trip")
    flag_first(b, True)
    resume_on(bob, b, watcher, oracle=b)
    assert bob.state(BOB_ACC, ED) != seen_delivery  # a delivery happened: EmailDelivery moved
    seen_delivery = bob.state(BOB_ACC, ED)

    # Back to A, whose hub stayed bound (the watcher) the whole time; only a flag change meanwhile.
    wait_routed(bob, a, BOB[0], BOB_ACC)
    bob.close()
    flag_first(a, False)
    resume_on(bob, a, watcher, oracle=a)
    assert bob.state(BOB_ACC, ED) == seen_delivery  # no delivery: EmailDelivery did not move

    # Nobody covers Bob anywhere now; B saw Bob before (its old states must not win).
    bob.close()
    watcher.close()
    send_mail(a.smtp_port, [BOB[0]], "missed, second trip")
    destroy_last(b)
    resume_on(bob, b, None, oracle=b)
    assert bob.state(BOB_ACC, ED) != seen_delivery
    seen_delivery = bob.state(BOB_ACC, ED)

    # The reporter's history on A: A saw Bob before, and every change since came from B's backend (its API), so
    # A's bus was the only way A could have heard of them.
    bob.close()
    flag_first(b, False)
    destroy_last(b)
    resume_on(bob, a, None, oracle=a)
    assert bob.state(BOB_ACC, ED) == seen_delivery

    # A restarted (SIGKILL) while Bob was away: it knows nothing, the request path answers.
    bob.close()
    a.restart("kill")
    send_mail(a.smtp_port, [BOB[0]], "missed, third trip")
    flag_first(b, True)
    resume_on(bob, a, None, oracle=a)
    assert bob.state(BOB_ACC, ED) != seen_delivery
    bob.close()


def test_custom_types_across_nodes(cluster: tuple[GatewayProcess, GatewayProcess]) -> None:
    """Custom types only the bus carries: exact where the node saw the last publish while bound; otherwise only
    ever values that were really published; never another account's."""
    a, b = cluster
    published: list[str] = []

    def publish(on: GatewayProcess, value: str) -> None:
        published.append(value)
        admin_publish(on.base, BOB[0], {CUSTOM: value})

    bob, alice = Client(BOB), Client(ALICE)
    start_watching(bob, b, probe_from=a)
    alice.connect(b)
    alice.enable(None, resume=False)
    wait_routed(alice, a, ALICE[0], ALICE_ACC)

    publish(a, "note-1")  # B is bound: Bob is told, and B knows it
    bob.converge({BOB_ACC: {CUSTOM: "note-1"}})
    admin_publish(a.base, ALICE[0], {CUSTOM: "alice-1"})  # reaches node B's queue, never Bob's socket
    wait_routed(bob, a, BOB[0], BOB_ACC)
    alice.converge({ALICE_ACC: {CUSTOM: "alice-1"}})
    assert all(set(p["changed"]) == {BOB_ACC} for p in bob.pushes), bob.pushes
    bob.close()

    publish(a, "note-2")  # nobody of Bob's is enabled anywhere: no node can be relied on to know it
    resume_on(bob, b, None, oracle=b)
    bob.socket.barrier()  # type: ignore[union-attr]
    assert bob.state(BOB_ACC, CUSTOM) in published

    wait_routed(bob, a, BOB[0], BOB_ACC)
    publish(a, "note-3")  # seen by B while bound
    bob.converge({BOB_ACC: {CUSTOM: "note-3"}})
    bob.close()
    resume_on(bob, b, None, oracle=b)  # B saw the last publish while bound: exact
    bob.converge({BOB_ACC: {CUSTOM: "note-3"}})
    bob.close()

    resume_on(bob, a, None, oracle=a)  # A never saw a custom state of Bob's: it can push nothing of it
    wait_routed(bob, b, BOB[0], BOB_ACC)
    assert bob.state(BOB_ACC, CUSTOM) == "note-3"
    publish(b, "note-4")  # seen by A while bound, not by B
    bob.converge({BOB_ACC: {CUSTOM: "note-4"}})
    bob.close()
    resume_on(bob, b, None, oracle=b)  # B may push the newest it knows (note-3), or nothing
    bob.socket.barrier()  # type: ignore[union-attr]
    assert bob.state(BOB_ACC, CUSTOM) in published
    bob.close()
    resume_on(bob, a, None, oracle=a)  # A saw the last publish while bound: exact, whatever B said meanwhile
    bob.converge({BOB_ACC: {CUSTOM: "note-4"}})
    for push in bob.pushes:
        assert set(push["changed"]) == {BOB_ACC}, push
        value = push["changed"][BOB_ACC].get(CUSTOM)
        assert value is None or value in published, push
        assert PROBE not in push["changed"][BOB_ACC] or push["changed"][BOB_ACC][PROBE].startswith("probe-")
    bob.close()
    alice.close()


def test_a_change_right_after_a_resume_on_a_node_with_a_slow_broker_link(tmp_path: Path) -> None:
    """RFC 8887 §4.3.5: after the resume, changes are pushed. Node B's link to the broker is slow (its binding
    reaches the broker a second late); the client resumes on B and, before B's binding is in place, a mail is
    delivered on A. B must still tell the client: either it reads the states only once it hears the account's
    events, or it reads them again then. (A real client cannot know when a node's binding is in place.)"""
    url = URL(BROKER_URL)
    proxy = DelayProxy((url.host or "127.0.0.1", url.port or 5672))
    try:
        with running_cluster(tmp_path, "0", str(url.with_host("127.0.0.1").with_port(proxy.port))) as (a, b):
            bob = Client(BOB)
            start_watching(bob, a, probe_from=a)  # on A: B has never seen Bob, so nothing stale is involved
            send_mail(a.smtp_port, [BOB[0]], "before")
            bob.converge(readable_now(a))
            bob.close()
            send_mail(a.smtp_port, [BOB[0]], "while away")

            proxy.delay = 1.0
            bob.connect(b)
            bob.enable(None)
            bob.socket.barrier()  # type: ignore[union-attr]  # B has read the enable (and queued its state read)
            send_mail(a.smtp_port, [BOB[0]], "right after the resume")
            proxy.delay = 0.0
            bob.converge(readable_now(a), "the states after a change right after the resume")
            bob.close()
    finally:
        proxy.close()


def test_a_change_right_after_an_enable_without_push_state_on_a_node_with_a_slow_broker_link(
        tmp_path: Path) -> None:
    """RFC 8887 §4.3.5.2 and RFC 8620 §7: a client that enables push without a pushState reads the states itself
    (`/get`, answered at once by its node's backend) and from then on learns every change by push. A mail
    delivered on A after that read, while B's binding is still on its way to the broker, must reach it too."""
    url = URL(BROKER_URL)
    proxy = DelayProxy((url.host or "127.0.0.1", url.port or 5672))
    try:
        with running_cluster(tmp_path, "0", str(url.with_host("127.0.0.1").with_port(proxy.port))) as (a, b):
            bob = Client(BOB)
            proxy.delay = 1.0
            bob.connect(b)
            bob.enable(None, resume=False)
            bob.sync(BOB_ACC)
            send_mail(a.smtp_port, [BOB[0]], "right after the enable")
            proxy.delay = 0.0
            # The binding is late by a second: five are plenty for a push (and keep the expected failure short).
            bob.converge(readable_now(a), "the states after a change right after the enable", timeout=5)
            bob.close()
    finally:
        proxy.close()
