"""Front mode resume (RFC 8887 §4.3.5): a front gateway process (`GATEWAY_UPSTREAM_URL`, `GATEWAY_BUS=amqp`)
in front of an all-in-one gateway process, the upstream JMAP server, both on one RabbitMQ exchange of this test.

The upstream changes while no socket is open on the front (deliveries over its SMTP, flags and vacation through
its API); a client that resumes on the front with its last pushState must reach the states the upstream's API
reports (the oracle) for Mailbox, Email, Thread and VacationResponse, which the front reads from the upstream on
resume. EmailDelivery has no /get, so there it is bus-only, like a custom type: exact when the front saw the last
delivery while bound to the account, otherwise only ever a value the upstream really had. Also after a restart of
the front (SIGKILL), which then knows nothing. A missing broker fails these tests under CI=true.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.directory import account_id_for
from tests.conftest import BOB
from tests.integration.amqp_support import BROKER_URL, require_broker
from tests.model.harness import (
    Client,
    GatewayProcess,
    api,
    email_ids,
    send_mail,
    server_states,
    wait_routed,
)
from tests.model.test_resume_cluster import delete_exchange

pytestmark = pytest.mark.amqp

ED = "EmailDelivery"
BOB_ACC = account_id_for(BOB[0])


@pytest.fixture
def front_and_upstream(tmp_path: Path) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    require_broker()
    exchange = f"jmap-resume-front-{uuid.uuid4().hex[:12]}"
    bus = {"BUS": "amqp", "AMQP_EXCHANGE": exchange, "AMQP_URL": BROKER_URL, "AMQP_UNBIND_DELAY": "0"}
    upstream = GatewayProcess(tmp_path, "upstream", smtp=True, **bus)
    front: GatewayProcess | None = None
    try:
        upstream.start()
        front = GatewayProcess(tmp_path, "front", smtp=False, UPSTREAM_URL=upstream.session_url,
                               AUTH_CACHE_TTL="0", **bus)
        front.start()
        yield front, upstream
    finally:
        if front is not None:
            front.stop()
        upstream.stop()
        delete_exchange(exchange)


def now(upstream: GatewayProcess) -> dict[str, dict[str, str]]:
    return {BOB_ACC: server_states(upstream.base, BOB, BOB_ACC)}


def test_resume_on_the_front_after_the_upstream_changed_while_no_socket_was_open(
        front_and_upstream: tuple[GatewayProcess, GatewayProcess]) -> None:
    front, upstream = front_and_upstream
    bob = Client(BOB)
    deliveries_seen: list[str] = []  # every EmailDelivery state the front pushed (all really the upstream's)

    def seen_delivery() -> str | None:
        value = bob.state(BOB_ACC, ED)
        if value is not None and value not in deliveries_seen:
            deliveries_seen.append(value)
        return value

    bob.connect(front)
    bob.enable(None, resume=False)
    bob.sync(BOB_ACC)
    wait_routed(bob, upstream, BOB[0], BOB_ACC)
    send_mail(upstream.smtp_port, [BOB[0]], "while connected")
    bob.converge(now(upstream))
    assert bob.socket is not None and bob.socket.pump(lambda: bob.state(BOB_ACC, ED) is not None)
    first = seen_delivery()
    bob.close()

    # No socket on the front: the front is not bound, it cannot hear of any of this.
    send_mail(upstream.smtp_port, [BOB[0]], "while away")
    ids = email_ids(upstream.base, BOB, BOB_ACC)
    api(upstream.base, BOB, [["Email/set", {"accountId": BOB_ACC, "update": {ids[0]: {"keywords/$seen": True}}},
                              "s"],
                             ["VacationResponse/set", {"accountId": BOB_ACC,
                                                       "update": {"singleton": {"isEnabled": True}}}, "v"]])
    bob.connect(front)
    bob.enable(None)
    bob.converge(now(upstream), "the upstream's states after a resume on the front")
    wait_routed(bob, upstream, BOB[0], BOB_ACC)
    # EmailDelivery is bus-only here: the front saw `first` while bound and nothing since; it may say nothing.
    assert seen_delivery() == first

    # A delivery while bound: the front knows its EmailDelivery exactly, also after the client left.
    send_mail(upstream.smtp_port, [BOB[0]], "while connected again")
    bob.converge(now(upstream))
    assert bob.socket.pump(lambda: bob.state(BOB_ACC, ED) not in (None, first)), "no new EmailDelivery pushed"
    second = seen_delivery()
    bob.close()
    api(upstream.base, BOB, [["Email/set", {"accountId": BOB_ACC, "destroy": [ids[-1]]}, "d"]])
    bob.push_state = "not-a-push-state"  # unreadable: the full current state, EmailDelivery as last seen
    bob.known = {}
    bob.connect(front)
    bob.enable(None)
    bob.converge({BOB_ACC: {**now(upstream)[BOB_ACC], ED: second or ""}}, "the full state")
    bob.close()

    # The front restarts (SIGKILL) while Bob is away; the upstream changes; the new front process knows nothing
    # but what the upstream answers.
    front.restart("kill")
    send_mail(upstream.smtp_port, [BOB[0]], "while the front was restarted")
    bob.connect(front)
    bob.enable(None)
    bob.converge(now(upstream), "the upstream's states after the front restarted")
    wait_routed(bob, upstream, BOB[0], BOB_ACC)
    assert seen_delivery() in deliveries_seen
    for push in bob.pushes:
        assert set(push["changed"]) == {BOB_ACC}, push
    bob.close()
