"""Authentication, done once per WebSocket upgrade and on every HTTP call: Basic, Bearer JWT, or a one-time ticket.

An `Authenticator` is composed of a credential check (which says who an `Authorization` value is: the embedded
directory here, the upstream server in front mode, see gateway.upstream.auth) and a ticket office (signed tickets
here; front mode keeps principals in memory). Failures raise `Unauthorized` carrying the `WWW-Authenticate`
challenge of every accepted scheme. Passwords, tokens and tickets are never logged. Clocks are injected, so
expiry is testable without waiting.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import jwt

from gateway.config import Settings
from gateway.directory import Directory, Principal
from gateway.errors import Unauthorized

Clock = Callable[[], float]
BASIC_CHALLENGE = 'Basic realm="jmap", charset="UTF-8"'
BEARER_CHALLENGE = 'Bearer realm="jmap"'


class CredentialCheck(Protocol):
    """Who an `Authorization` value is: raises Unauthorized (or Forbidden/Unavailable) when it cannot say."""

    @property
    def challenge(self) -> str:
        """The WWW-Authenticate value naming every scheme this check accepts."""

    async def check(self, scheme: str, value: str, header: str, *, fresh: bool) -> Principal:
        """`scheme` is lower-case, `value` the credentials after it, `header` the whole (stripped) value; `fresh`
        asks for a validation that bypasses any cache."""


class Tickets(Protocol):
    """One-time WebSocket tickets for browsers, which cannot set Authorization on a WebSocket."""

    def issue(self, principal: Principal) -> tuple[str, str]:
        """A ticket for `principal` and its expiry as an RFC 3339 UTCDate."""

    def redeem(self, value: str) -> Principal:
        """The principal of a ticket, consuming it; Unauthorized if unknown, used or expired."""


class Authenticator:
    """The one entry point of authentication for the transport and the HTTP surface."""

    __slots__ = ("_check", "tickets")

    def __init__(self, check: CredentialCheck, tickets: Tickets) -> None:
        self._check = check
        self.tickets = tickets

    @property
    def challenge(self) -> str:
        return self._check.challenge

    async def authenticate(self, authorization: str | None, *, fresh: bool = False) -> Principal:
        """The principal of an Authorization header value. `fresh` skips any cache of earlier validations (front
        mode: the upstream is asked again)."""
        try:
            if not authorization or not authorization.strip():
                raise Unauthorized("Authentication is required.")
            header = authorization.strip()
            scheme, _, value = header.partition(" ")
            return await self._check.check(scheme.lower(), value.strip(), header, fresh=fresh)
        except Unauthorized as exc:
            if exc.challenge is None:
                raise Unauthorized(exc.detail, self.challenge) from None
            raise

    def issue_ticket(self, principal: Principal) -> tuple[str, str]:
        return self.tickets.issue(principal)

    def redeem_ticket(self, value: str) -> Principal:
        try:
            return self.tickets.redeem(value)
        except Unauthorized as exc:
            raise Unauthorized(exc.detail, exc.challenge or self.challenge) from None


class JwtVerifier:
    """Bearer JWTs signed with a configured key: HS256 with GATEWAY_JWT_SECRET, RS256/ES256 with the PEM public
    key of GATEWAY_JWT_PUBLIC_KEY; the username is `sub`."""

    __slots__ = ("_keys",)

    def __init__(self, settings: Settings) -> None:
        self._keys: list[tuple[object, list[str]]] = []
        if settings.jwt_secret:
            self._keys.append((settings.jwt_secret, ["HS256"]))
        if settings.jwt_public_key:
            with open(settings.jwt_public_key, "rb") as fh:
                self._keys.append((fh.read(), ["RS256", "ES256"]))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def verify(self, token: str) -> tuple[str, float | None] | None:
        """(sub, exp) of a token signed with one of the keys; None when no key verifies it; Unauthorized when one
        does but the token has expired or has no subject."""
        for key, algorithms in self._keys:
            try:
                claims = jwt.decode(token, key, algorithms=algorithms,  # type: ignore[arg-type]
                                    options={"require": ["sub"]})
            except jwt.ExpiredSignatureError:
                raise Unauthorized("The token has expired.") from None
            except jwt.PyJWTError:
                continue
            sub = claims.get("sub")
            if not isinstance(sub, str) or not sub:
                raise Unauthorized("The token has no usable subject.")
            exp = claims.get("exp")
            return sub, float(exp) if isinstance(exp, int | float) else None
        return None


class DirectoryCheck:
    """The embedded role's credentials: Basic against the directory's passwords, Bearer JWTs for its users."""

    __slots__ = ("_directory", "_jwt", "challenge")

    def __init__(self, directory: Directory, jwt_verifier: JwtVerifier) -> None:
        self._directory = directory
        self._jwt = jwt_verifier
        self.challenge = BASIC_CHALLENGE + (", " + BEARER_CHALLENGE if jwt_verifier.enabled else "")

    async def check(self, scheme: str, value: str, header: str, *, fresh: bool) -> Principal:
        if scheme == "basic":
            return self._basic(value)
        if scheme == "bearer" and self._jwt.enabled:
            verified = self._jwt.verify(value)
            if verified is None:
                raise Unauthorized("Invalid token.")
            return self._directory.principal(*verified)
        raise Unauthorized(f"The {scheme or 'empty'} authentication scheme is not accepted.")

    def _basic(self, credentials: str) -> Principal:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("Malformed Basic credentials.") from None
        username, sep, password = decoded.partition(":")
        if not sep or not self._directory.check_password(username, password):
            raise Unauthorized("Invalid username or password.")
        return self._directory.principal(username)


class SignedTickets:
    """Tickets that carry their username, expiry and a nonce under an HMAC: signed, not stored, so the upgrade may
    land on another worker (SO_REUSEPORT) or host than the POST did, as long as they share the key.

    Single use is enforced by the process that redeems it; with several processes a ticket could be replayed on
    another one within its (short) lifetime, which is why the TTL defaults to a minute."""

    __slots__ = ("_key", "_principal_of", "_redeemed", "clock", "ttl")

    def __init__(self, secret: str | None, ttl: float, principal_of: Callable[[str], Principal],
                 clock: Clock = time.time) -> None:
        self._key = (secret or secrets.token_hex(32)).encode()
        self._principal_of = principal_of
        self._redeemed: dict[str, float] = {}  # nonce -> expiry, for single use on this process
        self.ttl = ttl
        self.clock = clock

    def issue(self, principal: Principal) -> tuple[str, str]:
        expiry = self.clock() + self.ttl
        body = base64.urlsafe_b64encode(
            f"{secrets.token_hex(12)}:{int(expiry)}:{principal.username}".encode()).rstrip(b"=")
        value = (body + b"." + self._sign(body)).decode("ascii")
        return value, utc_date(expiry)

    def _sign(self, body: bytes) -> bytes:
        return base64.urlsafe_b64encode(hmac.digest(self._key, body, "sha256")).rstrip(b"=")

    def redeem(self, value: str) -> Principal:
        refused = Unauthorized("The ticket is unknown, already used or expired.")
        body, _, signature = value.encode("ascii", "replace").partition(b".")
        if not body or not hmac.compare_digest(signature, self._sign(body)):
            raise refused
        try:
            decoded = base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)).decode()
            nonce, expiry_text, username = decoded.split(":", 2)
            expiry = float(expiry_text)
        except (ValueError, UnicodeDecodeError, binascii.Error):
            raise refused from None
        now = self.clock()
        if expiry <= now or nonce in self._redeemed:
            raise refused
        self._redeemed = {n: e for n, e in self._redeemed.items() if e > now}
        self._redeemed[nonce] = expiry
        return self._principal_of(username)


def utc_date(when: float) -> str:
    """RFC 3339 UTCDate (RFC 8620 §1.4) of a UNIX time, to the second."""
    return datetime.fromtimestamp(int(when), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
