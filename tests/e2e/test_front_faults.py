"""Front mode against an upstream the test controls: a small JMAP server on aiohttp in this process (real HTTP
on a loopback port) whose answers can be slowed, failed or revoked, and whose calls are counted.

Covers what a healthy upstream never shows: 401/403/5xx/unreachable/slow at the upgrade, upstream errors as
RequestErrors, the upstream's limits enforced before forwarding, a slow request that holds up neither pushes nor
other requests, revocation closing sockets with 1008 at the recheck, and the authentication cache.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.app import Gateway
from gateway.bus.events import new_event
from gateway.directory import account_id_for
from gateway.fanout import pushstate
from tests.conftest import ALICE, BOB, CAROL, GatewayFactory, basic
from tests.e2e.test_front_mode import connect_front, get_session, request
from tests.e2e.test_seed_story import free_port
from tests.e2e.test_ws_protocol import recv_json

CORE, MAIL = "urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"
WEBSOCKET = "urn:ietf:params:jmap:websocket"
SERVER_UNAVAILABLE = "urn:ietf:params:jmap:error:serverUnavailable"
BOB_ACC, ALICE_ACC = account_id_for(BOB[0]), account_id_for(ALICE[0])


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll a condition until it holds (fail after `timeout`)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class FakeUpstream:
    """A JMAP server with Basic users, James-style accounts and URL templates, and test controls.

    Methods: `Core/echo`; `Test/hold` answers once `release` is set; `Test/fail` answers with the HTTP status,
    body and content type of its arguments; `Mailbox/get`, `Email/get`, `Thread/get` give `states`.
    """

    def __init__(self) -> None:
        self.users = {u: p for u, p in (BOB, ALICE, CAROL)}
        self.delegations: dict[str, list[str]] = {}  # delegate -> owners
        self.bearer: dict[str, str] = {}  # tokens it accepts -> username
        self.limits = {"maxSizeRequest": 10_000_000, "maxConcurrentRequests": 4, "maxCallsInRequest": 16}
        self.session_status: int | None = None  # answer session fetches with this status (e.g. 503)
        self.session_gate: asyncio.Event | None = None  # hold session answers until set
        self.session_calls = 0
        self.api_calls = 0
        self.cookies_seen: list[dict[str, str]] = []
        self.held = 0
        self.release = asyncio.Event()
        self.states = {"Mailbox": "m1", "Email": "e1", "Thread": "t1"}
        self.blobs: dict[str, tuple[bytes, str]] = {}
        self.base = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jmap/session", self.session)
        app.router.add_post("/api", self.api)
        app.router.add_post("/upload/{account}", self.upload)
        app.router.add_get("/download/{account}/{blob}/", self.download)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def session_url(self) -> str:
        return f"{self.base}/jmap/session"

    def _user(self, request: web.Request) -> str | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return self.bearer.get(value)
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user if self.users.get(user) == password else None

    @staticmethod
    def _unauthorized() -> web.Response:
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fake-upstream"'},
                            content_type="application/problem+json",
                            text=json.dumps({"type": "about:blank", "status": 401, "detail": "who are you"}))

    async def session(self, request: web.Request) -> web.Response:
        self.session_calls += 1
        if self.session_gate is not None:
            await self.session_gate.wait()
        if self.session_status is not None:
            return web.Response(status=self.session_status, text="upstream trouble")
        user = self._user(request)
        if user is None:
            return self._unauthorized()
        account = {"isReadOnly": False, "accountCapabilities": {MAIL: {}}}
        accounts = {account_id_for(user): {"name": user, "isPersonal": True, **account}}
        for owner in self.delegations.get(user, []):
            accounts[account_id_for(owner)] = {"name": owner, "isPersonal": False, **account}
        return web.json_response({
            "capabilities": {CORE: {**self.limits, "maxSizeUpload": 1000, "maxConcurrentUpload": 1,
                                    "maxObjectsInGet": 100, "maxObjectsInSet": 100, "collationAlgorithms": []},
                             MAIL: {}, "urn:example:custom": {}},
            "accounts": accounts, "primaryAccounts": {MAIL: account_id_for(user)}, "username": user,
            "apiUrl": "/api",  # relative, as RFC 8620 allows: the front resolves it against the session URL
            "downloadUrl": f"{self.base}/download/{{accountId}}/{{blobId}}/?type={{type}}&name={{name}}",
            "uploadUrl": f"{self.base}/upload/{{accountId}}",
            "eventSourceUrl": f"{self.base}/events", "state": "s1"})

    async def api(self, request: web.Request) -> web.Response:
        self.api_calls += 1
        self.cookies_seen.append(dict(request.cookies))
        user = self._user(request)
        if user is None:
            return self._unauthorized()
        body = await request.json()
        responses: list[Any] = []
        for name, args, call_id in body["methodCalls"]:
            if name == "Test/hold":
                self.held += 1
                await self.release.wait()
                responses.append([name, {"released": True}, call_id])
            elif name == "Test/fail":
                return web.Response(status=args["status"], text=args.get("body", ""),
                                    content_type=args.get("type", "text/plain"))
            elif name.endswith("/get") and name.split("/")[0] in self.states:
                responses.append([name, {"accountId": args["accountId"], "state": self.states[name.split("/")[0]],
                                         "list": [], "notFound": []}, call_id])
            else:
                responses.append([name, args, call_id])
        answer = web.json_response({"methodResponses": responses, "sessionState": "s1"})
        answer.set_cookie("sticky-session", user)  # as load balancers and some servers do
        return answer

    async def upload(self, request: web.Request) -> web.Response:
        if self._user(request) is None:
            return self._unauthorized()
        data = await request.read()
        blob_id = f"B{len(self.blobs)}"
        self.blobs[blob_id] = (data, request.content_type)
        return web.json_response({"accountId": request.match_info["account"], "blobId": blob_id,
                                  "type": request.content_type, "size": len(data)}, status=201)

    async def download(self, request: web.Request) -> web.Response:
        if self._user(request) is None:
            return self._unauthorized()
        data, _ = self.blobs[request.match_info["blob"]]
        name = request.query["name"]
        return web.Response(body=data, headers={"Content-Type": request.query["type"],
                                                "Content-Disposition": f'attachment; filename="{name}"'})


FrontFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream()
    await upstream.start()
    yield upstream
    upstream.release.set()
    if upstream.session_gate is not None:
        upstream.session_gate.set()
    await upstream.stop()


@pytest.fixture
async def make_front(make_gateway: GatewayFactory) -> FrontFactory:
    async def factory(upstream_url: str, **overrides: str) -> Gateway:
        return await make_gateway(UPSTREAM_URL=upstream_url, **overrides)

    return factory


def echo_call(n: int = 1) -> list[Any]:
    return ["Core/echo", {"n": n}, f"c{n}"]


async def upgrade_status(front: Gateway, authorization: str | None) -> tuple[int, Any]:
    with pytest.raises(InvalidStatus) as info:
        await connect_front(front, authorization)
    return info.value.response.status_code, info.value.response


async def test_upgrade_maps_upstream_answers(fake: FakeUpstream, make_front: FrontFactory) -> None:
    front = await make_front(fake.session_url, UPSTREAM_TIMEOUT="0.5", AUTH_CACHE_TTL="0")
    status, response = await upgrade_status(front, basic((BOB[0], "nope")))
    assert status == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="fake-upstream"'  # the upstream's challenge
    calls = fake.session_calls
    assert (await upgrade_status(front, None))[0] == 401
    assert (await upgrade_status(front, "Negotiate abc"))[0] == 401
    assert fake.session_calls == calls  # refused without asking the upstream

    for trouble in (500, 502, 503):
        fake.session_status = trouble
        status, response = await upgrade_status(front, basic(BOB))
        assert status == 503 and int(response.headers["Retry-After"]) > 0, trouble
        assert json.loads(response.body)["status"] == 503
    fake.session_status = 403
    assert (await upgrade_status(front, basic(BOB)))[0] == 403
    fake.session_status = None

    fake.session_gate = asyncio.Event()  # never answers: GATEWAY_UPSTREAM_TIMEOUT turns it into a 503
    assert (await upgrade_status(front, basic(BOB)))[0] == 503
    fake.session_gate.set()
    fake.session_gate = None
    ws = await connect_front(front, basic(BOB))
    await ws.close()

    nowhere = await make_front(f"http://127.0.0.1:{free_port()}/jmap/session")
    status, response = await upgrade_status(nowhere, basic(BOB))
    assert status == 503 and response.headers["Retry-After"]


async def test_auth_cache_shares_one_call_and_never_keys_by_credentials(fake: FakeUpstream,
                                                                       make_front: FrontFactory) -> None:
    front = await make_front(fake.session_url, AUTH_CACHE_TTL="300")
    cache = front.request_path.client.sessions  # type: ignore[attr-defined]
    fake.session_gate = asyncio.Event()
    upgrades = [asyncio.create_task(connect_front(front, basic(BOB))) for _ in range(10)]
    # Every upgrade is waiting: one fetched, the nine others joined its flight.
    await eventually(lambda: fake.session_calls == 1 and cache.joined == 9, "ten upgrades waiting on one fetch")
    fake.session_gate.set()
    sockets = await asyncio.gather(*upgrades)
    assert fake.session_calls == 1

    again = await connect_front(front, basic(BOB))  # within the TTL: no upstream call at all
    assert fake.session_calls == 1
    got = await request(again, "r", [echo_call()], using=[CORE])
    assert got["methodResponses"] == [echo_call()]
    # The credentials live only in the principals (for forwarding), never as cache keys or in a repr.
    assert all(len(key) == 32 and BOB[1].encode() not in key for key in cache._entries)
    assert all(BOB[1] not in repr(conn.principal) and basic(BOB) not in repr(conn.principal)
               for conn in front.connections)
    for ws in [*sockets, again]:
        await ws.close()

    # The session resource is what a client refetches when sessionState moved: always asked upstream.
    for expected in (2, 3):
        await get_session(front, basic(BOB))
        assert fake.session_calls == expected
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{front.port}/metrics") as r:
        metrics = await r.text()
    assert "gateway_upstream_session_fetches_total 3.0" in metrics
    assert "gateway_upstream_auth_cache_hits_total 1.0" in metrics

    uncached = await make_front(fake.session_url, AUTH_CACHE_TTL="0")
    before = fake.session_calls
    for _ in range(2):
        ws = await connect_front(uncached, basic(BOB))
        await ws.close()
    assert fake.session_calls == before + 2


async def test_upstream_errors_are_request_errors(fake: FakeUpstream, make_front: FrontFactory) -> None:
    front = await make_front(fake.session_url, UPSTREAM_TIMEOUT="0.5")
    ws = await connect_front(front, basic(BOB))

    async def fail(rid: str, **args: Any) -> dict[str, Any]:
        return await request(ws, rid, [["Test/fail", args, "f"]], using=[CORE])

    problem = {"type": "urn:ietf:params:jmap:error:notRequest", "status": 400, "detail": "upstream says no"}
    err = await fail("p", status=400, body=json.dumps(problem), type="application/problem+json")
    assert err == {"@type": "RequestError", "requestId": "p", **problem}  # the upstream's own problem
    err = await fail("u", status=502, body="bad gateway")
    assert (err["type"], err["status"]) == (SERVER_UNAVAILABLE, 503)
    err = await fail("s", status=500, body="boom")
    assert (err["type"], err["status"]) == ("urn:ietf:params:jmap:error:serverFail", 500)
    err = await fail("j", status=200, body="this is no JSON")
    assert (err["type"], err["status"]) == ("urn:ietf:params:jmap:error:serverFail", 502)
    err = await fail("k", status=200, body=json.dumps({"methodResponses": {"not": "a list"}, "sessionState": "s"}),
                     type="application/json")
    assert (err["type"], err["status"]) == ("urn:ietf:params:jmap:error:serverFail", 502)
    err = await request(ws, "t", [["Test/hold", {}, "h"]], using=[CORE])  # slower than GATEWAY_UPSTREAM_TIMEOUT
    assert (err["@type"], err["type"], err["status"]) == ("RequestError", SERVER_UNAVAILABLE, 503)

    fake.release.set()  # (lets the held handler end, so that the server can stop)
    await fake.stop()  # gone while the socket is open: the next request cannot reach it
    err = await request(ws, "gone", [echo_call()], using=[CORE])
    assert (err["type"], err["status"], err["requestId"]) == (SERVER_UNAVAILABLE, 503, "gone")
    await ws.close()


async def test_upstream_limits_are_honoured_before_forwarding(fake: FakeUpstream, make_front: FrontFactory) -> None:
    fake.limits = {"maxSizeRequest": 2000, "maxConcurrentRequests": 2, "maxCallsInRequest": 3}
    front = await make_front(fake.session_url, MAX_CALLS_IN_REQUEST="10", MAX_CONCURRENT_REQUESTS="8")
    session = await get_session(front, basic(BOB))
    core = session["capabilities"][CORE]
    assert (core["maxCallsInRequest"], core["maxConcurrentRequests"], core["maxSizeRequest"]) == (3, 2, 2000)
    assert session["capabilities"][WEBSOCKET]["supportsPush"] is True
    assert session["apiUrl"] == f"{fake.base}/api" and "urn:example:custom" in session["capabilities"]

    ws = await connect_front(front, basic(BOB))
    calls = fake.api_calls
    err = await request(ws, "n", [echo_call(i) for i in range(4)], using=[CORE])
    assert (err["type"], err["limit"]) == ("urn:ietf:params:jmap:error:limit", "maxCallsInRequest")
    err = await request(ws, "z", [["Core/echo", {"pad": "x" * 3000}, "c"]], using=[CORE])
    assert (err["type"], err["limit"]) == ("urn:ietf:params:jmap:error:limit", "maxSizeRequest")
    err = await request(ws, "u", [echo_call()], using=[CORE, "urn:example:unknown"])
    assert err["type"] == "urn:ietf:params:jmap:error:unknownCapability"
    assert fake.api_calls == calls  # none of them reached the upstream
    ok = await request(ws, "c", [echo_call()], using=[CORE, "urn:example:custom", WEBSOCKET])
    assert ok["@type"] == "Response"  # the upstream's own capabilities are usable

    # Two requests held at the upstream: its maxConcurrentRequests (2) is reached for Bob.
    for rid in ("h1", "h2"):
        await ws.send(json.dumps({"@type": "Request", "id": rid, "using": [CORE],
                                  "methodCalls": [["Test/hold", {}, "h"]]}))
    await eventually(lambda: fake.held == 2, "two requests held upstream")
    err = await request(ws, "third", [echo_call()], using=[CORE])
    assert (err["type"], err["limit"]) == ("urn:ietf:params:jmap:error:limit", "maxConcurrentRequests")
    fake.release.set()
    answers = {(await recv_json(ws))["requestId"] for _ in range(2)}
    assert answers == {"h1", "h2"}
    await ws.close()


async def test_slow_upstream_holds_up_neither_pushes_nor_other_requests(fake: FakeUpstream,
                                                                       make_front: FrontFactory) -> None:
    front = await make_front(fake.session_url)
    ws = await connect_front(front, basic(BOB))
    await ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": ["Email"]}))
    await ws.send(json.dumps({"@type": "Request", "id": "slow", "using": [CORE],
                              "methodCalls": [["Test/hold", {}, "h"]]}))
    await eventually(lambda: fake.held == 1 and front.hub.subscriptions == 1, "a slow request in flight")

    await front.bus.publish([new_event(BOB[0], {"Email": "e2"})])
    push = await recv_json(ws)
    assert push["@type"] == "StateChange" and push["changed"] == {BOB_ACC: {"Email": "e2"}}
    quick = await recv_json_after(ws, [echo_call(7)])
    assert quick["requestId"] == "quick" and quick["methodResponses"] == [echo_call(7)]

    fake.release.set()
    slow = await recv_json(ws)
    assert slow["requestId"] == "slow" and slow["methodResponses"] == [["Test/hold", {"released": True}, "h"]]
    await ws.close()


async def recv_json_after(ws: Any, calls: list[Any]) -> dict[str, Any]:
    await ws.send(json.dumps({"@type": "Request", "id": "quick", "using": [CORE], "methodCalls": calls}))
    return await recv_json(ws)


async def test_push_state_resume_reads_upstream_states_and_delegations_follow_rechecks(
        fake: FakeUpstream, make_front: FrontFactory) -> None:
    front = await make_front(fake.session_url, AUTH_RECHECK="0.4", AUTH_CACHE_TTL="0")
    ws = await connect_front(front, basic(ALICE))
    # A token that says Alice was told Email e0: the hub has seen nothing, so the upstream's e1 is news.
    told = pushstate.encode({ALICE_ACC: {"Email": "e0", "Mailbox": "m1"}})
    await ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": None, "pushState": told}))
    missed = await recv_json(ws)
    assert missed["@type"] == "StateChange" and missed["changed"] == {ALICE_ACC: {"Email": "e1", "Thread": "t1"}}

    # Bob shares his account with Alice at the upstream; the next recheck brings it to her socket and push.
    fake.delegations[ALICE[0]] = [BOB[0]]
    await eventually(lambda: any(BOB_ACC in c.principal.account_ids for c in front.connections)
                     and front.hub.subscriptions == 1
                     and BOB_ACC in front.hub.subscription(next(iter(front.connections)).target).key[0],  # type: ignore[union-attr]
                     "the delegated account after a recheck")
    await front.bus.publish([new_event(BOB[0], {"Email": "b2"})])
    push = await recv_json(ws)
    assert push["changed"] == {BOB_ACC: {"Email": "b2"}}
    await ws.close()


async def test_revoked_credentials_close_with_1008_but_an_outage_does_not(fake: FakeUpstream,
                                                                         make_front: FrontFactory) -> None:
    front = await make_front(fake.session_url, AUTH_RECHECK="0.4")
    ws = await connect_front(front, basic(BOB))
    other = await connect_front(front, basic(ALICE))

    fake.session_status = 503  # the upstream cannot vouch for anyone for a while: nobody is closed
    seen = fake.session_calls
    await eventually(lambda: fake.session_calls >= seen + 4, "rechecks during the outage")
    got = await request(ws, "alive", [echo_call()], using=[CORE])
    assert got["methodResponses"] == [echo_call()]
    fake.session_status = None

    fake.users[BOB[0]] = "changed"  # Bob's password was changed: his socket must go, Alice's stays
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1008
    got = await request(other, "still", [echo_call()], using=[CORE])
    assert got["methodResponses"] == [echo_call()]
    await other.close()


async def test_a_401_on_a_request_closes_the_socket_soon(fake: FakeUpstream, make_front: FrontFactory) -> None:
    front = await make_front(fake.session_url, AUTH_RECHECK="600")
    ws = await connect_front(front, basic(CAROL))
    fake.users[CAROL[0]] = "revoked"
    err = await request(ws, "r", [echo_call()], using=[CORE])
    assert (err["@type"], err["status"], err["detail"]) == ("RequestError", 401, "who are you")
    # Not 600 s later: the request's 401 has the recheck confirm the revocation at once.
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1008


async def test_http_is_proxied_with_proxy_http(fake: FakeUpstream, make_front: FrontFactory) -> None:
    front = await make_front(fake.session_url, PROXY_HTTP="true")
    base = f"http://127.0.0.1:{front.port}"
    auth = {"Authorization": basic(BOB)}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/.well-known/jmap", headers=auth) as r:
            session = await r.json()
        assert session["apiUrl"] == f"{base}/jmap/api"
        assert session["eventSourceUrl"] == f"{fake.base}/events"  # not proxied: the upstream's
        upload_url = session["uploadUrl"].replace("{accountId}", BOB_ACC)
        assert upload_url.startswith(base)
        async with http.post(upload_url, data=b"\x00blob bytes\xff",
                             headers={**auth, "Content-Type": "application/octet-stream"}) as r:
            assert r.status == 201
            uploaded = await r.json()
        assert uploaded["size"] == 12 and fake.blobs[uploaded["blobId"]][0] == b"\x00blob bytes\xff"
        url = session["downloadUrl"].format(accountId=BOB_ACC, blobId=uploaded["blobId"], name="a b.bin",
                                            type="application/x-test")
        assert url.startswith(base)
        async with http.get(url, headers=auth) as r:
            assert r.status == 200 and await r.read() == b"\x00blob bytes\xff"
            assert r.headers["Content-Type"] == "application/x-test"
            assert r.headers["Content-Disposition"] == 'attachment; filename="a b.bin"'
        body = {"using": [CORE], "methodCalls": [echo_call(3)]}
        async with http.post(session["apiUrl"], json=body, headers=auth) as r:
            assert (await r.json())["methodResponses"] == [echo_call(3)]
        async with http.get(url, headers={"Authorization": basic((BOB[0], "wrong"))}) as r:
            assert r.status == 401


async def test_upstream_cookies_never_ride_along_with_another_users_credentials(fake: FakeUpstream,
                                                                             make_front: FrontFactory) -> None:
    # A host name, not an IP address: cookie jars ignore cookies from IP addresses.
    front = await make_front(fake.session_url.replace("127.0.0.1", "localhost"))
    bob, alice = await connect_front(front, basic(BOB)), await connect_front(front, basic(ALICE))
    for ws in (bob, alice, bob):
        got = await request(ws, "c", [echo_call()], using=[CORE])
        assert got["methodResponses"] == [echo_call()]
    assert fake.cookies_seen[-3:] == [{}, {}, {}]  # one pooled client for all users, and no cookie jar
    await bob.close()
    await alice.close()


async def test_a_local_jwt_is_not_held_up_by_a_hanging_upstream(fake: FakeUpstream, make_front: FrontFactory) -> None:
    secret = "a-secret-the-front-and-the-upstream-share"
    token = jwt.encode({"sub": ALICE[0], "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    fake.bearer[token] = ALICE[0]
    fake.delegations[ALICE[0]] = [BOB[0]]
    front = await make_front(fake.session_url, JWT_SECRET=secret, AUTH_RECHECK="2")  # ticks every 0.5 s
    fake.session_gate = asyncio.Event()  # the upstream hangs: the upgrade goes ahead with the own account
    started = time.monotonic()
    ws = await connect_front(front, f"Bearer {token}")
    assert time.monotonic() - started < 10
    (conn,) = front.connections
    assert conn.principal.account_ids == [ALICE_ACC]
    # Once the upstream answers, the next recheck tick (not a whole interval later) brings the shared account.
    fake.session_gate.set()
    await eventually(lambda: conn.principal.account_ids == [ALICE_ACC, BOB_ACC], "the delegated account")
    got = await request(ws, "r", [echo_call()], using=[CORE])
    assert got["methodResponses"] == [echo_call()]  # forwarded with the same token
    await ws.close()
