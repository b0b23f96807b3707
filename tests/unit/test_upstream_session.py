"""Front mode's pure parts: parsing an upstream Session, URI templates, upstream errors as request-level errors,
and the session cache (TTL, single flight, a cancelled waiter, keys that are not the credentials)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.directory import account_id_for
from gateway.errors import RequestLevelError, request_error_of
from gateway.upstream.client import error_from_upstream, expand
from gateway.upstream.session import (
    Credentials,
    FrontPrincipal,
    SessionCache,
    UpstreamSession,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    parse_session,
    principal_from,
)

CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
BOB, ALICE = "bob@domain.tld", "alice@domain.tld"

# The shape Apache James serves (DESIGN.md §5): accounts named by username, ids SHA-256 of it.
JAMES_SESSION = {
    "capabilities": {CORE: {"maxSizeUpload": 20971520, "maxConcurrentUpload": 4, "maxSizeRequest": 10000000,
                            "maxConcurrentRequests": 4, "maxCallsInRequest": 16, "maxObjectsInGet": 500,
                            "maxObjectsInSet": 500, "collationAlgorithms": ["i;unicode-casemap"]},
                     MAIL: {}, "urn:apache:james:params:jmap:mail:quota": {}},
    "accounts": {
        account_id_for(ALICE): {"name": ALICE, "isPersonal": False, "isReadOnly": False,
                                "accountCapabilities": {MAIL: {}}},
        account_id_for(BOB): {"name": BOB, "isPersonal": True, "isReadOnly": False,
                              "accountCapabilities": {MAIL: {}, "urn:ietf:params:jmap:vacationresponse": {}}},
    },
    "primaryAccounts": {MAIL: account_id_for(BOB)},
    "username": BOB,
    "apiUrl": "/jmap",
    "downloadUrl": "http://james/download/{accountId}/{blobId}/?type={type}&name={name}",
    "uploadUrl": "/upload/{accountId}",
    "eventSourceUrl": "http://james/eventSource?types={types}&closeafter={closeafter}&ping={ping}",
    "state": "2c9f1b12-b35a-43e6-9af2-0106fb53a943",
}


def session(now: float = 0.0, **changes: object) -> UpstreamSession:
    return parse_session(json.dumps({**JAMES_SESSION, **changes}).encode(), "http://james/jmap/session", now)


def test_parse_a_james_session() -> None:
    s = session(5.0)
    assert s.username == BOB and s.state == JAMES_SESSION["state"]
    # Own account first; a delegated account's owner is its name (the username its events carry).
    assert [(a.id, a.owner, a.is_personal) for a in s.accounts] == [
        (account_id_for(BOB), BOB, True), (account_id_for(ALICE), ALICE, False)]
    assert (s.max_size_request, s.max_calls_in_request, s.max_concurrent_requests) == (10000000, 16, 4)
    # RFC 8620 §2 URLs may be relative: they are resolved against the session resource.
    assert s.api_url == "http://james/jmap" and s.upload_url == "http://james/upload/{accountId}"
    assert s.raw["apiUrl"] == "http://james/jmap"
    assert MAIL in s.capabilities and s.account_capabilities[account_id_for(ALICE)] == frozenset({MAIL})
    assert s.fetched_at == 5.0


@pytest.mark.parametrize("body", [b"not json", b"[]", json.dumps({"username": BOB}).encode(),
                                  json.dumps({**JAMES_SESSION, "accounts": []}).encode()])
def test_what_is_no_session_is_unavailable(body: bytes) -> None:
    with pytest.raises(UpstreamUnavailable):
        parse_session(body, "http://james/jmap/session", 0.0)


def test_limits_the_upstream_does_not_state_are_none() -> None:
    s = session(capabilities={CORE: {"maxCallsInRequest": 0, "maxConcurrentRequests": True}})
    assert (s.max_size_request, s.max_calls_in_request, s.max_concurrent_requests) == (None, None, None)


def test_expand_percent_encodes_values() -> None:
    template = JAMES_SESSION["downloadUrl"]
    assert isinstance(template, str)
    assert expand(template, accountId="a1", blobId="b/2", name="my file.eml", type="message/rfc822") == (
        "http://james/download/a1/b%2F2/?type=message%2Frfc822&name=my%20file.eml")


def test_upstream_errors_map_to_request_level_errors() -> None:
    problem = {"type": "urn:ietf:params:jmap:error:limit", "status": 400, "detail": "too big",
               "limit": "maxSizeRequest"}
    err = error_from_upstream(400, json.dumps(problem).encode())
    assert isinstance(err, RequestLevelError)
    assert (err.type_uri, err.status, err.detail, err.limit) == (problem["type"], 400, "too big", "maxSizeRequest")
    for status, type_uri, mapped in ((503, "serverUnavailable", 503), (504, "serverUnavailable", 503),
                                     (500, "serverFail", 500)):
        wire = request_error_of(error_from_upstream(status, b"<html>oops</html>"), "r1")
        assert (wire.type, wire.status, wire.requestId) == ("urn:ietf:params:jmap:error:" + type_uri, mapped, "r1")
    assert request_error_of(error_from_upstream(401, b""), None).status == 401
    assert request_error_of(error_from_upstream(404, b"{}"), None).status == 404


def test_a_principal_never_shows_its_credentials() -> None:
    p = principal_from(session(), Credentials("Basic c2VjcmV0"), b"k" * 32)
    assert isinstance(p, FrontPrincipal) and p.credentials is not None
    assert "c2VjcmV0" not in repr(p) and p.credentials.header == "Basic c2VjcmV0"
    assert p.account_ids == [account_id_for(BOB), account_id_for(ALICE)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_cache_ttl_and_what_it_keeps() -> None:
    clock = Clock()
    calls: list[str] = []

    async def fetch(authorization: str) -> UpstreamSession:
        calls.append(authorization)
        if authorization == "Basic bad":
            raise UpstreamUnauthorized('Basic realm="x"')
        return session(clock.now)

    cache = SessionCache(fetch, ttl=60, clock=clock)
    key = cache.key("Basic good")
    assert len(key) == 32 and key != cache.key("Basic bad")
    assert key != SessionCache(fetch, ttl=60).key("Basic good")  # salted per process
    await cache.get(key, "Basic good")
    clock.now += 59
    await cache.get(key, "Basic good")
    assert len(calls) == 1 and cache.hits == 1
    clock.now += 1  # expired
    await cache.get(key, "Basic good")
    assert len(calls) == 2
    await cache.get(key, "Basic good", fresh=True)
    assert len(calls) == 3
    for _ in range(2):  # failures are not cached
        with pytest.raises(UpstreamUnauthorized):
            await cache.get(cache.key("Basic bad"), "Basic bad")
    assert len(calls) == 5 and len(cache) == 1


async def test_single_flight_survives_a_cancelled_waiter() -> None:
    gate = asyncio.Event()
    calls = 0

    async def fetch(authorization: str) -> UpstreamSession:
        nonlocal calls
        calls += 1
        await gate.wait()
        return session()

    cache = SessionCache(fetch, ttl=0)  # no caching: only the flight is shared
    key = cache.key("Basic x")
    waiters = [asyncio.create_task(cache.get(key, "Basic x")) for _ in range(5)]
    while cache.joined < 4:
        await asyncio.sleep(0)
    waiters[0].cancel()  # the upgrade that started the fetch went away: the others still get the answer
    gate.set()
    results = await asyncio.gather(*waiters[1:])
    assert calls == 1 and all(r.username == BOB for r in results)
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]
    await cache.get(key, "Basic x")
    assert calls == 2 and len(cache) == 0
