"""Front mode in front of Cyrus IMAP, a JMAP server no one here wrote (Debian's cyrus-imapd, tests/integration/
cyrus_support.py): its session through the gateway, JMAP requests over the gateway's WebSocket answered by
Cyrus, an LMTP delivery seen through Email/query, and a pushState resume computed from Cyrus's states.

The bus is the in-process one: Cyrus publishes nothing on RabbitMQ, and Debian's build serves no EventSource
(cyrus_support.py says why), so no live push comes from it; with GATEWAY_UPSTREAM_EVENTS=eventsource the front
asks for the stream, gets 204, and backs off without spinning (the last test).
"""

from __future__ import annotations

import asyncio
import json
import logging
from email.message import EmailMessage
from typing import Any

import aiohttp
import pytest
import websockets

from gateway.app import Gateway
from gateway.bus.eventsource import NO_STREAM_RETRY, UpstreamEventStreams
from tests.conftest import GatewayFactory, connect, http_url
from tests.e2e.test_ws_protocol import recv_json
from tests.integration.cyrus_support import Cyrus, cyrus  # noqa: F401  (the module's Cyrus fixture)

CORE, MAIL = "urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"
WEBSOCKET = "urn:ietf:params:jmap:websocket"


def mail(subject: str, to: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Carol <carol@example.org>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    msg.set_content(f"{subject}, delivered over LMTP.")
    return bytes(msg)


async def request(ws: websockets.ClientConnection, rid: str, calls: list[list[Any]]) -> dict[str, Any]:
    await ws.send(json.dumps({"@type": "Request", "id": rid, "using": [CORE, MAIL], "methodCalls": calls}))
    while True:
        msg: dict[str, Any] = await recv_json(ws)
        if msg.get("requestId") == rid:
            return msg


def results(response: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    assert response["@type"] == "Response", response
    return {call_id: (name, args) for name, args, call_id in response["methodResponses"]}


async def front_of(make_gateway: GatewayFactory, cyrus: Cyrus) -> Gateway:  # noqa: F811
    # AUTH_RECHECK=0: no periodic re-validation task against Cyrus during these short tests.
    return await make_gateway(UPSTREAM_URL=cyrus.session_url, AUTH_RECHECK="0")


async def test_session_requests_and_delivery_through_the_gateway(cyrus: Cyrus,  # noqa: F811
                                                                 make_gateway: GatewayFactory) -> None:
    gw = await front_of(make_gateway, cyrus)
    async with aiohttp.ClientSession() as http, http.get(
            http_url(gw, "/jmap/session"), headers={"Authorization": cyrus.authorization}) as answer:
        assert answer.status == 200
        session = await answer.json()
    # Cyrus's session, its relative URLs made absolute, with the gateway's WebSocket added.
    assert session["username"] == cyrus.user
    assert session["apiUrl"] == f"{cyrus.base_url}/jmap/"
    assert session["eventSourceUrl"] == (
        f"{cyrus.base_url}/jmap/eventsource/?types={{types}}&closeafter={{closeafter}}&ping={{ping}}")
    assert session["capabilities"][WEBSOCKET] == {"url": f"ws://127.0.0.1:{gw.port}/jmap/ws", "supportsPush": True}
    assert MAIL in session["capabilities"]
    account = session["primaryAccounts"][MAIL]
    assert account == cyrus.user  # Cyrus names accounts by username

    async with await connect(gw, (cyrus.user, cyrus.password)) as ws:
        assert ws.subprotocol == "jmap"
        before = results(await request(ws, "r0", [
            ["Mailbox/get", {"accountId": account, "ids": None, "properties": ["name", "role", "totalEmails"]}, "m"],
            ["Email/query", {"accountId": account}, "q"],
            ["Core/echo", {"from": "the gateway"}, "e"],
        ]))
        inbox = next(m for m in before["m"][1]["list"] if m["role"] == "inbox")
        assert inbox["totalEmails"] == 0
        assert before["q"][1]["ids"] == []
        assert before["e"] == ("Core/echo", {"from": "the gateway"})

        await asyncio.to_thread(cyrus.deliver, mail("hello from Cyrus", f"{cyrus.user}@localhost"))

        after = results(await request(ws, "r1", [
            ["Email/query", {"accountId": account, "filter": {"inMailbox": inbox["id"]}}, "q"],
            ["Email/get", {"accountId": account, "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                           "properties": ["subject", "from", "mailboxIds"]}, "g"],
            ["Mailbox/get", {"accountId": account, "ids": [inbox["id"]], "properties": ["totalEmails"]}, "m"],
        ]))
        [email] = after["g"][1]["list"]
        assert email["subject"] == "hello from Cyrus"
        assert email["from"] == [{"name": "Carol", "email": "carol@example.org"}]
        assert email["mailboxIds"] == {inbox["id"]: True}
        assert after["m"][1]["list"][0]["totalEmails"] == 1
        assert after["m"][1]["state"] != before["m"][1]["state"]

        # Cyrus's own method-level errors come back as they are (RFC 8620 §3.6.2).
        errors = results(await request(ws, "r2", [["Mailbox/get", {"accountId": "nobody", "ids": None}, "x"]]))
        assert errors["x"][0] == "error" and errors["x"][1]["type"] == "accountNotFound"


async def full_state(gw: Gateway, cyrus: Cyrus) -> dict[str, Any]:  # noqa: F811
    """Enable push with an unreadable pushState on a socket of its own, which gets the full current state
    (DESIGN.md §4), read from Cyrus; the socket then closes."""
    async with await connect(gw, (cyrus.user, cyrus.password)) as ws:
        await ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": None, "pushState": "?"}))
        return await recv_json(ws)


async def test_unreadable_push_state_gets_cyrus_states(cyrus: Cyrus,  # noqa: F811
                                                       make_gateway: GatewayFactory) -> None:
    gw = await front_of(make_gateway, cyrus)
    first = await full_state(gw, cyrus)
    assert first["@type"] == "StateChange" and isinstance(first["pushState"], str)
    states = first["changed"][cyrus.user]
    assert {"Mailbox", "Email", "Thread"} <= set(states)
    current = results(await request_once(gw, cyrus, [
        ["Email/get", {"accountId": cyrus.user, "ids": []}, "e"],
        ["Mailbox/get", {"accountId": cyrus.user, "ids": []}, "m"]]))
    assert states["Email"] == current["e"][1]["state"]
    assert states["Mailbox"] == current["m"][1]["state"]


async def test_resume_after_a_delivery_while_away(cyrus: Cyrus, make_gateway: GatewayFactory) -> None:  # noqa: F811
    gw = await front_of(make_gateway, cyrus)
    first = await full_state(gw, cyrus)
    states = first["changed"][cyrus.user]

    await asyncio.to_thread(cyrus.deliver, mail("while away", f"{cyrus.user}@localhost"))

    # No socket of the account is left, so the states the gateway saw are stale: the resume must ask Cyrus
    # and push exactly what the delivery moved.
    async with await connect(gw, (cyrus.user, cyrus.password)) as ws:
        await ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": None,
                                  "pushState": first["pushState"]}))
        missed = await recv_json(ws)
    assert missed["@type"] == "StateChange"
    moved = missed["changed"][cyrus.user]
    assert "Email" in moved and moved["Email"] != states["Email"]
    assert "Mailbox" in moved


async def request_once(gw: Gateway, cyrus: Cyrus, calls: list[list[Any]]) -> dict[str, Any]:  # noqa: F811
    async with await connect(gw, (cyrus.user, cyrus.password)) as ws:
        return await request(ws, "once", calls)


async def test_front_over_cyrus_event_source_backs_off_on_204(cyrus: Cyrus, make_gateway: GatewayFactory,  # noqa: F811
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """GATEWAY_UPSTREAM_EVENTS=eventsource in front of Debian's Cyrus, whose eventSourceUrl answers 204 No Content
    (built without wslay, cyrus_support.py): "no event stream here". The front asks once, logs it once, counts
    it, is not ready, and does not ask again for NO_STREAM_RETRY seconds however its sessions come and go;
    requests and resumes (read from Cyrus) keep working."""
    gw = await make_gateway(UPSTREAM_URL=cyrus.session_url, UPSTREAM_EVENTS="eventsource", AUTH_RECHECK="0")
    bus = gw.bus
    assert isinstance(bus, UpstreamEventStreams)
    with caplog.at_level(logging.WARNING, logger="gateway.bus.eventsource"):
        first = await full_state(gw, cyrus)  # a push-enabled session: the account's stream is asked for
        for _ in range(500):
            if bus.no_content:
                break
            await asyncio.sleep(0.02)
        assert bus.no_content == 1 and bus.attempts == 1 and bus.streams_open == 0
        assert not bus.ready
        async with aiohttp.ClientSession() as http, http.get(http_url(gw, "/readyz")) as answer:
            assert answer.status == 503

        # More sessions of the account, a delivery and a resume: all answered from Cyrus, and no new request for
        # an event stream (the only one was answered 204; the next is due NO_STREAM_RETRY seconds later).
        await asyncio.to_thread(cyrus.deliver, mail("no push from Cyrus", f"{cyrus.user}@localhost"))
        async with await connect(gw, (cyrus.user, cyrus.password)) as ws:
            await ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": None,
                                      "pushState": first["pushState"]}))
            missed = await recv_json(ws)
            assert missed["changed"][cyrus.user]["Email"] != first["changed"][cyrus.user]["Email"]
            echo = await request(ws, "r", [["Core/echo", {"still": "answered"}, "e"]])
            assert echo["methodResponses"] == [["Core/echo", {"still": "answered"}, "e"]]
        assert bus.attempts == 1 and bus.no_content == 1
    assert NO_STREAM_RETRY >= 60
    warnings = [r for r in caplog.records if "204 No Content" in r.getMessage()]
    assert len(warnings) == 1
    async with aiohttp.ClientSession() as http, http.get(http_url(gw, "/metrics")) as answer:
        text = await answer.text()
    assert "gateway_bus_upstream_stream_no_content_total 1.0" in text
