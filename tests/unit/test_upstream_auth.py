"""Front mode's authentication as logic: the upstream check (with local JWTs), held tickets, the credential
recheck, and the Session object built from the upstream's. The upstream's session fetch is a stand-in
function; the real upstream is exercised end to end in tests/e2e/test_front_*.py."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import jwt
import pytest

from gateway.auth import JwtVerifier
from gateway.config import Settings
from gateway.directory import account_id_for
from gateway.errors import Unauthorized, Unavailable
from gateway.jmap.types import CORE, WEBSOCKET
from gateway.upstream.auth import HeldTickets, Rechecker, UpstreamCheck
from gateway.upstream.base import SessionContext
from gateway.upstream.client import UpstreamClient
from gateway.upstream.resource import front_session
from gateway.upstream.session import (
    FrontPrincipal,
    UpstreamSession,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    parse_session,
)
from tests.unit.test_upstream_session import BOB, JAMES_SESSION

SECRET = "front-secret-front-secret-front-secret!"
SETTINGS = Settings.defaults(upstream_url="http://james/jmap/session", jwt_secret=SECRET, auth_cache_ttl=60,
                             upstream_timeout=0.5)


class Upstream:
    """What the upstream answers to a session fetch, by Authorization value."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.fetches = 0

    async def fetch(self, authorization: str) -> UpstreamSession:
        self.fetches += 1
        answer = self.answers.get(authorization, UpstreamUnauthorized('Basic realm="james"'))
        if isinstance(answer, BaseException):
            raise answer
        return parse_session(json.dumps(answer).encode(), "http://james/jmap/session", time.monotonic())


def client(upstream: Upstream) -> UpstreamClient:
    c = UpstreamClient(SETTINGS)
    c.sessions._fetch = upstream.fetch  # the one thing that would do I/O
    return c


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_credentials_the_upstream_accepts_and_refuses() -> None:
    upstream = Upstream()
    good = basic(BOB, "pw")
    upstream.answers[good] = JAMES_SESSION
    check = UpstreamCheck(client(upstream), JwtVerifier(SETTINGS))
    principal = await check.check("basic", good.split()[1], good, fresh=False)
    assert principal.username == BOB and principal.upstream is not None and not principal.local
    await check.check("basic", good.split()[1], good, fresh=False)
    assert upstream.fetches == 1, "the second authentication came from the cache"
    await check.check("basic", good.split()[1], good, fresh=True)
    assert upstream.fetches == 2
    bad = basic(BOB, "wrong")
    with pytest.raises(Unauthorized) as info:
        await check.check("basic", bad.split()[1], bad, fresh=False)
    assert info.value.challenge == 'Basic realm="james"'  # the upstream's own challenge
    upstream.answers[bad] = UpstreamUnavailable("down")
    with pytest.raises(Unavailable):
        await check.check("basic", bad.split()[1], bad, fresh=False)
    with pytest.raises(Unauthorized):
        await check.check("digest", "x", "Digest x", fresh=False)


async def test_a_local_jwt_works_without_the_upstream() -> None:
    upstream = Upstream()
    token = jwt.encode({"sub": BOB, "exp": time.time() + 60}, SECRET, "HS256")
    header = "Bearer " + token
    upstream.answers[header] = UpstreamUnavailable("down")
    check = UpstreamCheck(client(upstream), JwtVerifier(SETTINGS))
    principal = await check.check("bearer", token, header, fresh=False)
    # Its own account by James's rule, due for a recheck at once (to learn its delegations later).
    assert principal.local and principal.account_ids == [account_id_for(BOB)]
    assert principal.checked_at == float("-inf") and principal.expires_at is not None
    upstream.answers[header] = JAMES_SESSION  # the upstream takes the same token: delegations included
    principal = await check.check("bearer", token, header, fresh=True)
    assert principal.local and len(principal.accounts) == 2


def test_held_tickets_are_single_use_and_expire() -> None:
    now = [100.0]
    tickets = HeldTickets(30, clock=lambda: now[0])
    principal = FrontPrincipal(BOB, [])
    value, _ = tickets.issue(principal)
    assert tickets.redeem(value) is principal
    with pytest.raises(Unauthorized):
        tickets.redeem(value)
    value, _ = tickets.issue(principal)
    now[0] += 31
    with pytest.raises(Unauthorized):
        tickets.redeem(value)


class Socket:
    def __init__(self, principal: FrontPrincipal) -> None:
        self.principal = principal
        self.closing = False
        self.closed_with: int | None = None

    def close(self, code: int, reason: str = "") -> None:
        self.closing = True
        self.closed_with = code


async def test_the_recheck_closes_revoked_sockets_and_refreshes_the_others() -> None:
    upstream = Upstream()
    kept, revoked, down = basic(BOB, "a"), basic(BOB, "b"), basic(BOB, "c")
    upstream.answers.update({kept: JAMES_SESSION, revoked: JAMES_SESSION, down: JAMES_SESSION})
    c = client(upstream)
    check = UpstreamCheck(c, JwtVerifier(SETTINGS))
    sockets = [Socket(await check.check("basic", h.split()[1], h, fresh=False)) for h in (kept, kept, revoked, down)]
    refreshed: list[tuple[Socket, FrontPrincipal]] = []

    def refresh(socket: Socket, principal: FrontPrincipal) -> None:
        socket.principal = principal
        refreshed.append((socket, principal))

    rechecker = Rechecker(c, 10.0, lambda: sockets, refresh)
    upstream.answers[revoked] = UpstreamUnauthorized(None)
    upstream.answers[down] = UpstreamUnavailable("down")
    before = upstream.fetches
    await rechecker.tick(time.monotonic() + 11)
    assert upstream.fetches - before == 3, "one upstream call per distinct credential"
    assert [s.closed_with for s in sockets] == [None, None, 1008, None]
    assert {id(s) for s, _ in refreshed} == {id(sockets[0]), id(sockets[1])}
    assert refreshed[0][1] is refreshed[1][1], "one principal shared by the sockets of one credential"
    # The unreachable one is tried again in a while, not at every tick.
    await rechecker.tick(time.monotonic() + 1)
    assert upstream.fetches - before == 3
    c.on_rejected()  # a request saw a 401: the recheck wakes up at once
    assert rechecker._wake.is_set()
    await asyncio.sleep(0)


def test_the_session_object_is_the_upstreams_with_our_socket_and_limits() -> None:
    session = parse_session(json.dumps(JAMES_SESSION).encode(), "http://james/jmap/session", 0.0)
    principal = FrontPrincipal(BOB, session.accounts, upstream=session)
    ctx = SessionContext("https://gw", "wss://gw/jmap/ws", SETTINGS.replace(max_calls_in_request=8))
    out = front_session(principal, ctx)
    assert out["capabilities"][WEBSOCKET] == {"url": "wss://gw/jmap/ws", "supportsPush": True}
    assert out["capabilities"][CORE]["maxCallsInRequest"] == 8  # the smaller of ours (8) and James's (16)
    assert out["capabilities"][CORE]["maxConcurrentRequests"] == 4  # James's is smaller
    assert out["apiUrl"] == "http://james/jmap"  # the upstream's own URLs without GATEWAY_PROXY_HTTP
    proxied = front_session(principal, SessionContext("https://gw", "wss://gw/jmap/ws",
                                                      SETTINGS.replace(proxy_http=True)))
    assert proxied["apiUrl"] == "https://gw/jmap/api" and proxied["uploadUrl"] == "https://gw/jmap/upload/{accountId}/"
    with pytest.raises(Unavailable):
        front_session(FrontPrincipal(BOB, []), ctx)
