"""Front mode's authentication: the upstream validates the credentials (by serving its session resource with
them), the gateway caches the answer, keeps local Bearer JWTs and tickets working, and re-validates open sockets.

Outcomes (mapped to the wire by gateway.errors): the upstream's 401 is a 401 with its `WWW-Authenticate`; its 403
a 403; an upstream that cannot be reached, is too slow or fails (5xx) is Unavailable, a 503 with `Retry-After`,
never a 401, so that clients retry instead of asking their user for a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from gateway.auth import BASIC_CHALLENGE, BEARER_CHALLENGE, Clock, JwtVerifier, utc_date
from gateway.directory import Principal
from gateway.errors import Close, Unauthorized
from gateway.upstream.client import UpstreamClient
from gateway.upstream.session import (
    Credentials,
    FrontPrincipal,
    UpstreamForbidden,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    own_account_principal,
    principal_from,
)

log = logging.getLogger(__name__)

RECHECK_CONCURRENCY = 32  # upstream calls one recheck tick may have in flight
# How long an upgrade with a locally verified JWT waits for the upstream's session (its delegated accounts)
# before it goes ahead with the token's own account; the fetch goes on, and the recheck picks its answer up.
LOCAL_JWT_WAIT = 2.0
RETRY_UNAVAILABLE = 60.0  # seconds until a recheck the upstream could not answer is tried again


class UpstreamCheck:
    """The credential check of front mode (gateway.auth.CredentialCheck): the upstream says who it is."""

    # Every scheme goes to the upstream, so both are always on offer.
    challenge = BASIC_CHALLENGE + ", " + BEARER_CHALLENGE

    def __init__(self, client: UpstreamClient, jwt_verifier: JwtVerifier) -> None:
        self._client = client
        self._jwt = jwt_verifier

    async def check(self, scheme: str, value: str, header: str, *, fresh: bool) -> FrontPrincipal:
        if scheme not in ("basic", "bearer") or not value:
            raise Unauthorized(f"The {scheme or 'empty'} authentication scheme is not accepted.")
        credentials = Credentials(header)
        sessions = self._client.sessions
        key = sessions.key(header)
        if scheme == "bearer":
            local = self._jwt.verify(value)
            if local is not None:
                return await self._local_jwt(local[0], local[1], credentials, key, fresh)
        session = await sessions.get(key, header, fresh=fresh)
        return principal_from(session, credentials, key)

    # --- Bearer JWTs this gateway can verify itself ---------------------------------------------------------

    async def _local_jwt(self, sub: str, exp: float | None, credentials: Credentials, key: bytes,
                         fresh: bool) -> FrontPrincipal:
        """A locally verified token authenticates on its own (an upstream outage does not block the upgrade).
        Its accounts, the delegated ones included, come from the upstream session when the upstream accepts the
        same token; otherwise the principal has its own account, SHA-256(sub) as James derives it."""
        wait = min(LOCAL_JWT_WAIT, self._client.timeout)
        try:
            session = await asyncio.wait_for(self._client.sessions.get(key, credentials.header, fresh=fresh), wait)
        except (UpstreamUnauthorized, UpstreamForbidden):
            # The upstream does not take this token (a gateway-only token): its own account, rechecked as usual.
            return own_account_principal(sub, credentials, key, exp, time.monotonic())
        except (UpstreamUnavailable, TimeoutError) as exc:
            log.info("JWT of %s verified locally; no upstream session yet (%s): own account until the recheck",
                     sub, type(exc).__name__, extra={"username": sub})
            # Due at the next recheck tick, which brings the delegated accounts once the upstream answers.
            return own_account_principal(sub, credentials, key, exp, float("-inf"))
        if session.username != sub:
            log.warning("the upstream knows the JWT of %r as %r; using its own account only", sub, session.username,
                        extra={"username": sub})
            return own_account_principal(sub, credentials, key, exp, time.monotonic())
        principal = principal_from(session, credentials, key, expires_at=exp)
        principal.local = True
        return principal


class HeldTickets:
    """Front mode's tickets (gateway.auth.Tickets): they hold the client's credentials, so they stay in this
    process's memory (never signed into a token), single use, for `ttl` seconds."""

    def __init__(self, ttl: float, clock: Clock = time.time) -> None:
        self.ttl = ttl
        self.clock = clock
        self._held: dict[str, tuple[Principal, float]] = {}

    def issue(self, principal: Principal) -> tuple[str, str]:
        now = self.clock()
        expiry = now + self.ttl
        self._held = {t: v for t, v in self._held.items() if v[1] > now}
        value = secrets.token_urlsafe(24)
        self._held[value] = (principal, expiry)
        return value, utc_date(expiry)

    def redeem(self, value: str) -> Principal:
        entry = self._held.pop(value, None)
        if entry is None or entry[1] <= self.clock():
            raise Unauthorized("The ticket is unknown, already used or expired.")
        return entry[0]


Refreshed = Callable[[Any, FrontPrincipal], None]


class Rechecker:
    """Re-validates the credentials of open sockets every `interval` seconds: one periodic task for all of
    them, one upstream call per distinct credential (however many sockets share it).

    Revoked credentials (the upstream's 401 or 403) close their sockets with 1008 (RFC 6455 §7.4.1 policy
    violation). An upstream that cannot be reached closes nothing: the check is tried again a minute later (or
    after the interval, when shorter).
    A valid answer replaces the sockets' principal (`refreshed`), so delegated accounts granted or taken away
    upstream reach the push subscription. A locally verified JWT is never closed here (its `exp` does that).
    """

    def __init__(self, client: UpstreamClient, interval: float, sockets: Callable[[], Iterable[Any]],
                 refreshed: Refreshed) -> None:
        self._upstream = client
        self.interval = interval
        # Ticks are a fraction of the interval, so a socket is rechecked at most a quarter interval late.
        self.tick_seconds = min(max(interval / 4, 0.05), 30.0)
        self._sockets = sockets
        self._refreshed = refreshed
        self._wake = asyncio.Event()
        client.on_rejected = self._wake.set
        self.closed = 0

    async def run(self) -> None:
        while True:
            # A periodic tick, cut short when a request's 401 suggests credentials were just revoked.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_seconds)
            self._wake.clear()
            try:
                await self.tick(time.monotonic())
            except Exception:
                log.exception("credential recheck failed")

    async def tick(self, now: float) -> None:
        due: dict[bytes, list[Any]] = {}
        for conn in list(self._sockets()):
            p = conn.principal
            if isinstance(p, FrontPrincipal) and not conn.closing and now - p.checked_at >= self.interval:
                due.setdefault(p.key, []).append(conn)
        if due:
            gate = asyncio.Semaphore(RECHECK_CONCURRENCY)
            postponed = sum(await asyncio.gather(*(self._recheck(conns, gate, now) for conns in due.values())))
            if postponed:
                log.warning("credential recheck of %d users postponed: the upstream is unavailable", postponed)

    async def _recheck(self, conns: list[Any], gate: asyncio.Semaphore, now: float) -> bool:
        """Recheck one credential shared by `conns`; True when the upstream could not answer."""
        first: FrontPrincipal = conns[0].principal
        assert first.credentials is not None
        async with gate:
            try:
                session = await self._upstream.sessions.get(first.key, first.credentials.header, fresh=True)
            except (UpstreamUnauthorized, UpstreamForbidden):
                if first.local:
                    self._replace(conns, own_account_principal(first.username, first.credentials, first.key,
                                                               first.expires_at, time.monotonic()))
                    return False
                for conn in conns:
                    self.closed += 1
                    conn.close(Close.POLICY_VIOLATION, "credentials revoked")
                return False
            except UpstreamUnavailable:
                # Try again in a while (at most a minute), not at every tick: the upstream is in trouble already.
                retry_at = now - self.interval + min(self.interval, RETRY_UNAVAILABLE)
                for conn in conns:
                    conn.principal.checked_at = retry_at
                return True
        if session.username != first.username:
            for conn in conns:
                conn.close(Close.POLICY_VIOLATION, "credentials now name another user")
            return False
        principal = principal_from(session, first.credentials, first.key, expires_at=first.expires_at)
        principal.local = first.local
        self._replace(conns, principal)
        return False

    def _replace(self, conns: list[Any], principal: FrontPrincipal) -> None:
        # One principal for every socket of these credentials: idle sockets share it.
        for conn in conns:
            if not conn.closing:
                self._refreshed(conn, principal)
