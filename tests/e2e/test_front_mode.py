"""Front mode end to end: a gateway (in this process) in front of a second gateway process running the embedded
backend, a real JMAP server over real HTTP, both nodes of one RabbitMQ exchange (unique per test).

The upstream delivers mail over SMTP, publishes its StateChangeEvents on the broker, and the front pushes them to
its sockets; every request the front gets goes to the upstream's apiUrl with the client's credentials.
A missing broker skips these tests, except under CI=true: there it fails them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from gateway.app import Gateway
from gateway.directory import account_id_for
from tests.conftest import ADMIN, ALICE, BOB, GatewayFactory, basic, settings_env
from tests.e2e.test_seed_story import free_port, send_mail
from tests.e2e.test_ws_protocol import recv_json
from tests.integration.amqp_support import BROKER_URL, require_broker

pytestmark = pytest.mark.amqp

CORE, MAIL = "urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"
WEBSOCKET = "urn:ietf:params:jmap:websocket"
ROOT = Path(__file__).resolve().parents[2]
BOB_ACC, ALICE_ACC = account_id_for(BOB[0]), account_id_for(ALICE[0])
JWT_SECRET = "front-mode-test-secret-of-32-bytes!"


class Upstream:
    """A `python -m gateway` process with the embedded backend: the upstream JMAP server of these tests."""

    def __init__(self, proc: asyncio.subprocess.Process, base: str, smtp_port: int, log: Path) -> None:
        self.proc = proc
        self.base = base
        self.smtp_port = smtp_port
        self.log = log

    @property
    def session_url(self) -> str:
        return f"{self.base}/jmap/session"

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


UpstreamFactory = Callable[..., Awaitable[Upstream]]
FrontFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def exchange() -> AsyncIterator[str]:
    """A RabbitMQ exchange of this test only, deleted afterwards."""
    require_broker()
    name = f"jmap-front-test-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            await channel.exchange_delete(name)


@pytest.fixture
async def start_upstream(exchange: str, tmp_path: Path) -> AsyncIterator[UpstreamFactory]:
    started: list[Upstream] = []

    async def factory(**overrides: str) -> Upstream:
        smtp_port = free_port()
        env = dict(os.environ)
        env.update(settings_env(**{"GATEWAY_SMTP_PORT": str(smtp_port), "GATEWAY_BUS": "amqp",
                                   "GATEWAY_AMQP_EXCHANGE": exchange, "GATEWAY_AMQP_URL": BROKER_URL,
                                   **{f"GATEWAY_{k}": v for k, v in overrides.items()}}))
        log = tmp_path / f"upstream-{len(started)}.log"
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", cwd=ROOT, env=env,
                                                        stdout=asyncio.subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        except TimeoutError:
            line = ""
        found = re.search(r"listening on (http://\S+)", line)
        if found is None:
            proc.kill()
            await proc.wait()
            pytest.fail(f"the upstream gateway did not start: {line!r}\n{log.read_text()[-2000:]}")
        upstream = Upstream(proc, found.group(1), smtp_port, log)
        started.append(upstream)
        return upstream

    yield factory
    for upstream in started:
        await upstream.stop()


@pytest.fixture
async def make_front(exchange: str, make_gateway: GatewayFactory) -> FrontFactory:
    """Front-mode gateways in this process, on the test's exchange (override with BUS="memory")."""
    async def factory(upstream_url: str, **overrides: str) -> Gateway:
        settings = {"BUS": "amqp", "AMQP_EXCHANGE": exchange, "AMQP_URL": BROKER_URL, **overrides}
        return await make_gateway(UPSTREAM_URL=upstream_url, **settings)

    return factory


async def connect_front(gw: Gateway, authorization: str | None = None, query: str = "") -> Any:
    headers = {"Authorization": authorization} if authorization else {}
    return await websockets.connect(f"ws://127.0.0.1:{gw.port}/jmap/ws" + (f"?{query}" if query else ""),
                                    subprotocols=[Subprotocol("jmap")], additional_headers=headers, compression=None,
                                    ping_interval=None)


async def request(ws: Any, rid: str, calls: list[list[Any]], using: list[str] | None = None) -> dict[str, Any]:
    """Send a Request and return its answer (Response or RequestError); pushes before it are skipped."""
    await ws.send(json.dumps({"@type": "Request", "id": rid, "using": using or [CORE, MAIL], "methodCalls": calls}))
    while True:
        msg = await recv_json(ws)
        if msg.get("requestId") == rid:
            return msg


async def enable_push(front: Gateway, ws: Any, owners: list[str], data_types: list[str] | None,
                      push_state: str | None = None) -> None:
    msg: dict[str, Any] = {"@type": "WebSocketPushEnable", "dataTypes": data_types}
    if push_state is not None:
        msg["pushState"] = push_state
    await ws.send(json.dumps(msg))
    # The enable has no reply: wait until this node's queue is bound to the owners' routing keys, so that an
    # event published from now on reaches it.
    for owner in owners:
        await asyncio.wait_for(front.bus.wait_bound(owner), 15)  # type: ignore[attr-defined]


async def get_session(gw: Gateway, authorization: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{gw.port}/jmap/session",
                                                         headers={"Authorization": authorization}) as r:
        assert r.status == 200, await r.text()
        session: dict[str, Any] = await r.json()
        return session


def states_of(response: dict[str, Any]) -> dict[str, str]:
    return {call_id: args["state"] for _name, args, call_id in response["methodResponses"]}


async def test_seed_story_through_the_front(start_upstream: UpstreamFactory, make_front: FrontFactory) -> None:
    upstream = await start_upstream()
    front = await make_front(upstream.session_url, MAX_CONCURRENT_REQUESTS="3")
    auth = basic(BOB)
    session = await get_session(front, auth)
    # The upstream's session for Bob, with the front's WebSocket and the front's tighter limits.
    assert session["username"] == BOB[0] and session["accounts"][BOB_ACC]["isPersonal"] is True
    assert session["capabilities"][WEBSOCKET] == {"url": f"ws://127.0.0.1:{front.port}/jmap/ws",
                                                  "supportsPush": True}
    assert session["capabilities"][CORE]["maxConcurrentRequests"] == 3
    assert session["apiUrl"] == f"{upstream.base}/jmap/api"  # GATEWAY_PROXY_HTTP is off: the upstream's own

    ws = await connect_front(front, auth)
    assert ws.subprotocol == "jmap"
    first = await request(ws, "r0", [["Email/get", {"accountId": BOB_ACC, "ids": []}, "e"],
                                     ["Mailbox/get", {"accountId": BOB_ACC, "ids": None}, "m"]])
    email_state, mailbox_state = states_of(first)["e"], states_of(first)["m"]
    await enable_push(front, ws, [BOB[0]], ["Email", "Mailbox"])

    await asyncio.to_thread(send_mail, upstream.smtp_port, BOB[0], "through the front")
    push = await recv_json(ws)
    assert push["@type"] == "StateChange"
    changed = push["changed"][BOB_ACC]
    assert set(changed) == {"Email", "Mailbox"}  # the dataTypes filter holds for events from the broker

    sync = await request(ws, "r1", [
        ["Email/changes", {"accountId": BOB_ACC, "sinceState": email_state}, "ec"],
        ["Email/get", {"accountId": BOB_ACC, "#ids": {"resultOf": "ec", "name": "Email/changes", "path": "/created"},
                       "properties": ["subject", "mailboxIds"]}, "eg"],
        ["Mailbox/changes", {"accountId": BOB_ACC, "sinceState": mailbox_state}, "mc"],
        ["Mailbox/get", {"accountId": BOB_ACC, "#ids": {"resultOf": "mc", "name": "Mailbox/changes",
                                                        "path": "/updated"},
                         "properties": ["name", "role", "unreadEmails"]}, "mg"],
    ])
    assert sync["@type"] == "Response"
    responses = {call_id: args for _name, args, call_id in sync["methodResponses"]}
    assert responses["ec"]["newState"] == changed["Email"]
    assert [e["subject"] for e in responses["eg"]["list"]] == ["through the front"]
    assert responses["mg"]["state"] == changed["Mailbox"]
    inbox = next(m for m in responses["mg"]["list"] if m["role"] == "inbox")
    assert inbox["unreadEmails"] == 1 and inbox["id"] in responses["eg"]["list"][0]["mailboxIds"]
    await ws.close()


async def test_push_state_resumes_on_another_front_from_upstream_states(
        start_upstream: UpstreamFactory, make_front: FrontFactory) -> None:
    """RFC 8887 §4.3.5: a pushState from one front is a cursor on any other; a fresh node, whose hub has seen
    nothing, reads the current states from the upstream with the client's credentials."""
    upstream = await start_upstream()
    first, second = await make_front(upstream.session_url), await make_front(upstream.session_url)
    auth = basic(BOB)
    ws = await connect_front(first, auth)
    await enable_push(first, ws, [BOB[0]], ["Email"])
    await asyncio.to_thread(send_mail, upstream.smtp_port, BOB[0], "seen on the first front")
    push = await recv_json(ws)
    token = push["pushState"]
    await ws.close()

    await asyncio.to_thread(send_mail, upstream.smtp_port, BOB[0], "sent while away")
    ws = await connect_front(second, auth)
    now = states_of(await request(ws, "s", [["Email/get", {"accountId": BOB_ACC, "ids": []}, "e"]]))["e"]
    assert now != push["changed"][BOB_ACC]["Email"]
    await enable_push(second, ws, [BOB[0]], ["Email"], push_state=token)
    missed = await recv_json(ws)
    assert missed["@type"] == "StateChange" and missed["changed"] == {BOB_ACC: {"Email": now}}

    # Enabling again with the newest token: nothing moved since, so the next message is the echo's answer.
    await enable_push(second, ws, [BOB[0]], ["Email"], push_state=missed["pushState"])
    echo = await request(ws, "probe", [["Core/echo", {"n": 1}, "c"]], using=[CORE])
    assert echo["methodResponses"] == [["Core/echo", {"n": 1}, "c"]]
    await ws.close()


async def test_delegated_account_from_the_upstream_gets_pushes(start_upstream: UpstreamFactory,
                                                               make_front: FrontFactory) -> None:
    upstream = await start_upstream()
    async with aiohttp.ClientSession() as http:
        url = f"{upstream.base}/admin/delegations/{BOB[0]}/{ALICE[0]}"
        async with http.put(url, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 201
    front = await make_front(upstream.session_url)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{front.port}/jmap/session",
                            headers={"Authorization": basic(ALICE)}) as r:
            session = await r.json()
        # Sharing is the upstream's business in front mode.
        async with http.put(f"http://127.0.0.1:{front.port}/admin/delegations/{ALICE[0]}/{BOB[0]}",
                            headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 409
    assert session["accounts"][BOB_ACC]["isPersonal"] is False
    assert session["accounts"][ALICE_ACC]["isPersonal"] is True
    ws = await connect_front(front, basic(ALICE))
    await enable_push(front, ws, [ALICE[0], BOB[0]], ["Email"])
    await asyncio.to_thread(send_mail, upstream.smtp_port, BOB[0], "for bob, seen by alice")
    push = await recv_json(ws)
    assert list(push["changed"]) == [BOB_ACC]
    got = await request(ws, "g", [["Email/get", {"accountId": BOB_ACC, "ids": []}, "e"]])
    assert states_of(got)["e"] == push["changed"][BOB_ACC]["Email"]
    await ws.close()


async def test_upgrade_maps_upstream_answers(start_upstream: UpstreamFactory, make_front: FrontFactory) -> None:
    upstream = await start_upstream()
    front = await make_front(upstream.session_url, BUS="memory")
    with pytest.raises(InvalidStatus) as info:
        await connect_front(front, basic((BOB[0], "wrong")))
    response = info.value.response
    assert response.status_code == 401
    assert "Basic" in response.headers["WWW-Authenticate"]
    assert json.loads(response.body)["status"] == 401
    with pytest.raises(InvalidStatus) as info:
        await connect_front(front)
    assert info.value.response.status_code == 401

    await upstream.stop()  # the upstream is gone: its answer is unknown, so 503 and not 401
    with pytest.raises(InvalidStatus) as info:
        await connect_front(front, basic(ALICE))
    assert info.value.response.status_code == 503
    assert info.value.response.headers["Retry-After"]
    assert json.loads(info.value.response.body)["status"] == 503


async def test_jwt_and_tickets_in_front_mode(start_upstream: UpstreamFactory, make_front: FrontFactory) -> None:
    upstream = await start_upstream(JWT_SECRET=JWT_SECRET)
    # No cache: every authentication asks the upstream, so its absence shows at once below.
    front = await make_front(upstream.session_url, BUS="memory", JWT_SECRET=JWT_SECRET, AUTH_CACHE_TTL="0")
    token = jwt.encode({"sub": BOB[0], "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
    # Verified here; the upstream accepts the same token, so requests go through with it.
    ws = await connect_front(front, f"Bearer {token}")
    got = await request(ws, "j", [["Mailbox/get", {"accountId": BOB_ACC, "ids": None, "properties": ["role"]}, "m"]])
    assert got["@type"] == "Response" and got["methodResponses"][0][0] == "Mailbox/get"
    await ws.close()

    async with aiohttp.ClientSession() as http, http.post(f"http://127.0.0.1:{front.port}/jmap/ws/ticket",
                                                          headers={"Authorization": basic(ALICE)}) as r:
        assert r.status == 201
        ticket = (await r.json())["value"]
    ws = await connect_front(front, query=f"ticket={ticket}")
    got = await request(ws, "t", [["Mailbox/get", {"accountId": ALICE_ACC, "ids": None, "properties": ["role"]},
                                   "m"]])
    assert got["@type"] == "Response" and got["methodResponses"][0][1]["accountId"] == ALICE_ACC
    await ws.close()

    # The upstream is away: a token verified locally still opens a socket (its own account, SHA-256 of sub),
    # while credentials only the upstream can check get a 503.
    await upstream.stop()
    ws = await connect_front(front, f"Bearer {token}")
    failed = await request(ws, "down", [["Mailbox/get", {"accountId": BOB_ACC, "ids": []}, "m"]])
    assert failed["@type"] == "RequestError" and failed["status"] == 503
    assert failed["type"] == "urn:ietf:params:jmap:error:serverUnavailable"
    assert [c.principal.account_ids for c in front.connections] == [[BOB_ACC]]
    await ws.close()
    with pytest.raises(InvalidStatus) as info:
        await connect_front(front, basic(ALICE))
    assert info.value.response.status_code == 503


async def test_download_proxied_with_proxy_http(start_upstream: UpstreamFactory, make_front: FrontFactory) -> None:
    upstream = await start_upstream()
    front = await make_front(upstream.session_url, BUS="memory", PROXY_HTTP="true")
    base = f"http://127.0.0.1:{front.port}"
    auth = {"Authorization": basic(BOB)}
    await asyncio.to_thread(send_mail, upstream.smtp_port, BOB[0], "fetch my blob")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/jmap/session", headers=auth) as r:
            session = await r.json()
        assert session["apiUrl"] == f"{base}/jmap/api"
        assert session["downloadUrl"].startswith(f"{base}/jmap/download/")
        body = {"using": [CORE, MAIL], "methodCalls": [
            ["Email/query", {"accountId": BOB_ACC}, "q"],
            ["Email/get", {"accountId": BOB_ACC, "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                           "properties": ["blobId", "subject"]}, "g"]]}
        async with http.post(session["apiUrl"], json=body, headers=auth) as r:
            assert r.status == 200
            email = (await r.json())["methodResponses"][1][1]["list"][0]
        url = session["downloadUrl"].format(accountId=BOB_ACC, blobId=email["blobId"], name="m.eml",
                                            type="message/rfc822")
        async with http.get(url, headers=auth) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("message/rfc822")
            assert b"Subject: fetch my blob" in await r.read()
        async with http.get(url, headers={"Authorization": basic(ALICE)}) as r:
            assert r.status == 404  # the upstream's answer, passed through: Alice may not read Bob's blobs
