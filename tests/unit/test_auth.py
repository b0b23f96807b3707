"""Authentication as pure logic: the directory check (Basic, Bearer JWT), signed tickets, and the composed
Authenticator's challenge. Clocks are injected; no sockets."""

from __future__ import annotations

import base64
import time

import jwt
import pytest

from gateway.auth import Authenticator, DirectoryCheck, JwtVerifier, SignedTickets
from gateway.config import Settings
from gateway.directory import Directory
from gateway.errors import Unauthorized, problem_of

SECRET = "a-secret-that-is-long-enough-for-hs256!"
directory = Directory([("bob", "pw"), ("alice", "pw2")])


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def authenticator(jwt_secret: str | None = None, clock: float = 1000.0) -> Authenticator:
    settings = Settings.defaults(jwt_secret=jwt_secret)
    check = DirectoryCheck(directory, JwtVerifier(settings))
    return Authenticator(check, SignedTickets("k", 60, directory.principal, clock=lambda: clock))


async def test_basic_credentials() -> None:
    auth = authenticator()
    assert (await auth.authenticate(basic("bob", "pw"))).username == "bob"
    for bad in (basic("bob", "nope"), basic("carol", "pw"), "Basic !!!", "Basic " + base64.b64encode(b"no-colon")
                .decode(), None, "   ", "Digest x"):
        with pytest.raises(Unauthorized) as info:
            await auth.authenticate(bad)
        # Every refusal names the schemes on offer (RFC 7235 §4.1); Bearer only when a JWT key is configured.
        assert info.value.challenge == 'Basic realm="jmap", charset="UTF-8"'
        assert problem_of(info.value).status == 401


async def test_bearer_jwt_with_expiry() -> None:
    auth = authenticator(SECRET)
    exp = time.time() + 60
    principal = await auth.authenticate("Bearer " + jwt.encode({"sub": "bob", "exp": exp}, SECRET, "HS256"))
    assert principal.username == "bob" and principal.expires_at == pytest.approx(exp)
    for token in (jwt.encode({"sub": "bob", "exp": time.time() - 5}, SECRET, "HS256"),  # expired
                  jwt.encode({"sub": "bob"}, "another-secret-another-secret-xx", "HS256"),  # forged
                  jwt.encode({"exp": exp}, SECRET, "HS256"),  # no subject
                  "not-a-jwt"):
        with pytest.raises(Unauthorized) as info:
            await auth.authenticate("Bearer " + token)
        assert "Bearer" in (info.value.challenge or "")


async def test_bearer_is_refused_without_a_key() -> None:
    with pytest.raises(Unauthorized, match="bearer authentication scheme is not accepted"):
        await authenticator().authenticate("Bearer x.y.z")


def test_tickets_are_signed_single_use_and_expire() -> None:
    now = [1000.0]
    tickets = SignedTickets("key", 60, directory.principal, clock=lambda: now[0])
    value, valid_until = tickets.issue(directory.principal("alice"))
    assert valid_until == "1970-01-01T00:17:40Z"
    other_process = SignedTickets("key", 60, directory.principal, clock=lambda: now[0])
    assert other_process.redeem(value).username == "alice"  # any process with the key redeems it
    with pytest.raises(Unauthorized):
        other_process.redeem(value)  # once
    stranger = SignedTickets("another key", 60, directory.principal, clock=lambda: now[0])
    value2, _ = tickets.issue(directory.principal("bob"))
    with pytest.raises(Unauthorized):
        stranger.redeem(value2)
    body, _, signature = value2.partition(".")
    with pytest.raises(Unauthorized):
        tickets.redeem(body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + signature)
    now[0] += 61
    with pytest.raises(Unauthorized):
        tickets.redeem(value2)
    for garbage in ("", ".", "x.y", "é.é"):
        with pytest.raises(Unauthorized):
            tickets.redeem(garbage)


def test_a_refused_ticket_carries_the_authenticators_challenge() -> None:
    with pytest.raises(Unauthorized) as info:
        authenticator(SECRET).redeem_ticket("nope")
    assert info.value.challenge == 'Basic realm="jmap", charset="UTF-8", Bearer realm="jmap"'
