"""The HTTP surface over real sockets: session resource, API, health, metrics, admin events, problem bodies."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.bus.events import STATE_CHANGE_EVENT
from gateway.directory import account_id_for
from gateway.upstream.core import CoreOnly
from tests.conftest import ADMIN, ALICE, BOB, GatewayFactory, basic, connect, http_url
from tests.e2e.test_push import enable, next_push_or_none
from tests.e2e.test_ws_protocol import recv_json

CORE = "urn:ietf:params:jmap:core"


async def test_session_resource(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(PUBLIC_URL="https://jmap.example.com")
    async with aiohttp.ClientSession() as http:
        async with http.get(http_url(gw, "/.well-known/jmap"), headers={"Authorization": basic(BOB)},
                            allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/jmap/session"
        async with http.get(http_url(gw, "/jmap/session"), headers={"Authorization": basic(BOB)}) as r:
            assert r.status == 200
            session = await r.json()
    core = session["capabilities"][CORE]
    assert core["maxConcurrentRequests"] == gw.settings.max_concurrent_requests
    assert core["maxSizeRequest"] == gw.settings.max_size_request
    assert core["maxCallsInRequest"] == gw.settings.max_calls_in_request
    assert session["capabilities"]["urn:ietf:params:jmap:websocket"] == {
        "url": "wss://jmap.example.com/jmap/ws", "supportsPush": True}
    assert session["username"] == BOB[0]
    assert list(session["accounts"]) == [account_id_for(BOB[0])]
    assert session["apiUrl"] == "https://jmap.example.com/jmap/api"
    for key in ("downloadUrl", "uploadUrl", "eventSourceUrl", "state", "primaryAccounts"):
        assert key in session


async def test_api_over_http_uses_the_same_request_path(gateway: Gateway) -> None:
    body = {"using": [CORE], "methodCalls": [["Core/echo", {"x": 1}, "c1"]]}
    async with aiohttp.ClientSession() as http:
        async with http.post(http_url(gateway, "/jmap/api"), json=body, headers={"Authorization": basic(BOB)}) as r:
            assert r.status == 200
            assert (await r.json())["methodResponses"] == [["Core/echo", {"x": 1}, "c1"]]
        async with http.post(http_url(gateway, "/jmap/api"), data=b"{nope", headers={"Authorization": basic(BOB)}) as r:
            assert r.status == 400
            assert r.headers["Content-Type"].startswith("application/problem+json")
            assert (await r.json())["type"] == "urn:ietf:params:jmap:error:notJSON"
        async with http.post(http_url(gateway, "/jmap/api"), json={"using": ["urn:x"], "methodCalls": []},
                             headers={"Authorization": basic(BOB)}) as r:
            assert (await r.json())["type"] == "urn:ietf:params:jmap:error:unknownCapability"
        async with http.post(http_url(gateway, "/jmap/api"), json=body) as r:
            assert r.status == 401 and "Basic" in r.headers["WWW-Authenticate"]


async def test_health_ready_metrics_and_404(gateway: Gateway) -> None:
    async with await connect(gateway), aiohttp.ClientSession() as http:
        async with http.get(http_url(gateway, "/healthz")) as r:
            assert r.status == 200
        async with http.get(http_url(gateway, "/readyz")) as r:
            assert r.status == 200
        async with http.get(http_url(gateway, "/metrics")) as r:
            text = await r.text()
            assert "gateway_connections_open 1.0" in text
            assert 'gateway_upgrades_total{outcome="ok"} 1.0' in text
            assert 'gateway_native_module{module="coalesce"}' in text
        async with http.get(http_url(gateway, "/no/such/thing")) as r:
            assert r.status == 404
            problem = await r.json(content_type=None)
            assert problem["status"] == 404 and problem["title"] == "Not Found"
        async with http.get(http_url(gateway, "/jmap/ws")) as r:
            assert r.status == 426


@pytest.mark.parametrize(("auth", "status"), [(None, 401), ("Bearer wrong", 403), ("Basic x", 401)])
async def test_admin_events_need_the_token(gateway: Gateway, auth: str | None, status: int) -> None:
    headers = {"Authorization": auth} if auth else {}
    async with aiohttp.ClientSession() as http, http.post(http_url(gateway, "/admin/events"), headers=headers,
                                                          json={}) as r:
        assert r.status == status
        assert (await r.json(content_type=None))["status"] == status


async def test_admin_events_publish_and_reject_bad_input(gateway: Gateway) -> None:
    bob = await connect(gateway)
    alice = await connect(gateway, ALICE)
    await enable(bob)
    await enable(alice)
    event = {"type": "org.apache.james.jmap.change.StateChangeEvent", "eventId": "e-1",
             "username": BOB[0], "typeStates": {"Email": "s9", "MyCustomType": "c9"}}
    legacy = {"type": "org.apache.james.jmap.change.StateChangeEvent", "eventId": "e-2",
              "username": ALICE[0], "mailboxState": "m5", "emailState": "e5"}
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(http_url(gateway, "/admin/events"), headers=auth, json=[event, legacy]) as r:
            assert r.status == 202
        for bad in (b"not json", json.dumps({**event, "type": "org.example.Unknown"}).encode(), b"[1,2]"):
            async with http.post(http_url(gateway, "/admin/events"), headers=auth, data=bad) as r:
                assert r.status == 400
                assert r.headers["Content-Type"].startswith("application/problem+json")
    push = await next_push_or_none(bob)
    assert push is not None and push["changed"] == {account_id_for(BOB[0]): {"Email": "s9", "MyCustomType": "c9"}}
    push = await next_push_or_none(alice)
    assert push is not None and push["changed"] == {account_id_for(ALICE[0]): {"Mailbox": "m5", "Email": "e5"}}
    await bob.close()
    await alice.close()


async def test_admin_disabled_without_token(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(ADMIN_TOKEN="")
    async with aiohttp.ClientSession() as http, http.post(http_url(gw, "/admin/events"),
                                                          headers={"Authorization": "Bearer x"}, json={}) as r:
        assert r.status == 404


class Gated(CoreOnly):
    """Core/echo that waits for `release` first: a request that stays in flight as long as the test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.entered = 0

    async def call(self, principal: Any, request: Any) -> Any:
        self.entered += 1
        await self.release.wait()
        return await super().call(principal, request)


async def test_http_api_limits_requests_in_flight_per_user(make_gateway: GatewayFactory) -> None:
    path = Gated()
    gw = await make_gateway(request_path=path, MAX_CONCURRENT_REQUESTS="1")
    body = json.dumps({"using": [CORE], "methodCalls": [["Core/echo", {}, "0"]]})

    async with aiohttp.ClientSession() as http:
        async def post(user: tuple[str, str]) -> tuple[int, dict[str, Any]]:
            async with http.post(http_url(gw, "/jmap/api"), data=body,
                                 headers={"Authorization": basic(user)}) as r:
                return r.status, await r.json(content_type=None)

        first = asyncio.ensure_future(post(BOB))
        for _ in range(500):  # until the first request is inside the request path
            if path.entered:
                break
            await asyncio.sleep(0.01)
        status, problem = await post(BOB)
        assert (status, problem["limit"]) == (400, "maxConcurrentRequests")
        assert problem["type"] == "urn:ietf:params:jmap:error:limit"
        other = asyncio.ensure_future(post(ALICE))  # another user has a limit of their own
        for _ in range(500):
            if path.entered == 2:
                break
            await asyncio.sleep(0.01)
        path.release.set()
        assert (await first)[0] == 200 and (await other)[0] == 200
        assert (await post(BOB))[0] == 200  # released


async def test_admin_events_as_an_ndjson_stream(gateway: Gateway) -> None:
    async with await connect(gateway) as ws:
        await enable(ws)

        async def lines() -> Any:
            for i in range(3):
                yield (json.dumps({"type": STATE_CHANGE_EVENT, "username": BOB[0], "typeStates": {"Email": f"e{i}"}})
                       + "\n").encode()
                await asyncio.sleep(0)  # separate chunks
            yield b"\n" + json.dumps([{"type": STATE_CHANGE_EVENT, "username": BOB[0],
                                       "typeStates": {"Mailbox": "m9"}}]).encode()  # no final newline

        headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/x-ndjson"}
        async with aiohttp.ClientSession() as http:
            async with http.post(http_url(gateway, "/admin/events"), data=lines(), headers=headers) as r:
                assert r.status == 202 and (await r.json()) == {"accepted": 4}
            seen: dict[str, str] = {}
            while seen.get("Mailbox") != "m9":  # the pushes were written before the 202 (memory bus)
                push = await asyncio.wait_for(recv_json(ws), 5)
                seen.update(push["changed"][account_id_for(BOB[0])])
            assert seen == {"Email": "e2", "Mailbox": "m9"}
            bad = b'{"type":"%s","username":"bob@example.com","typeStates":{}}\n{nope}\n' % STATE_CHANGE_EVENT.encode()
            async with http.post(http_url(gateway, "/admin/events"), data=bad, headers=headers) as r:
                problem = await r.json(content_type=None)
                assert r.status == 400 and "the 1 events before it were published" in problem["detail"]
