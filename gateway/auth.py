"""Authentication, done once per WebSocket upgrade and on every HTTP call: Basic, Bearer JWT, or a one-time ticket.

Failures raise `HTTPProblem(401)` carrying `WWW-Authenticate` for every accepted scheme. Passwords, tokens and
tickets are never logged. The clock is injected so that expiry is testable without waiting.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime

import jwt

from gateway.config import Settings
from gateway.directory import Directory, Principal
from gateway.errors import HTTPProblem

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class Authenticator:
    def __init__(self, settings: Settings, directory: Directory, clock: Clock = time.time) -> None:
        self._directory = directory
        self.clock = clock
        self.ticket_ttl = settings.ticket_ttl
        self._ticket_key = (settings.ticket_secret or secrets.token_hex(32)).encode()
        self._redeemed: dict[str, float] = {}  # nonce -> expiry, for single use on this process
        self._jwt_keys: list[tuple[object, list[str]]] = []
        if settings.jwt_secret:
            self._jwt_keys.append((settings.jwt_secret, ["HS256"]))
        if settings.jwt_public_key:
            with open(settings.jwt_public_key, "rb") as fh:
                self._jwt_keys.append((fh.read(), ["RS256", "ES256"]))
        challenges = ['Basic realm="jmap", charset="UTF-8"']
        if self._jwt_keys:
            challenges.append('Bearer realm="jmap"')
        self.challenge = ", ".join(challenges)

    def _unauthorized(self, detail: str) -> HTTPProblem:
        return HTTPProblem(401, detail, headers={"WWW-Authenticate": self.challenge})

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization` header value; HTTPProblem(401) otherwise."""
        if not authorization:
            raise self._unauthorized("Authentication is required.")
        scheme, _, credentials = authorization.strip().partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == "basic":
            return self._basic(credentials)
        if scheme == "bearer" and self._jwt_keys:
            return self._bearer(credentials)
        raise self._unauthorized(f"The {scheme or 'empty'} authentication scheme is not accepted.")

    def _basic(self, credentials: str) -> Principal:
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise self._unauthorized("Malformed Basic credentials.") from None
        username, sep, password = decoded.partition(":")
        if not sep or not self._directory.check_password(username, password):
            raise self._unauthorized("Invalid username or password.")
        return self._directory.principal(username)

    def _bearer(self, token: str) -> Principal:
        verified = self.verify_jwt(token)
        if verified is None:
            raise self._unauthorized("Invalid token.")
        return self._directory.principal(*verified)

    def verify_jwt(self, token: str) -> tuple[str, float | None] | None:
        """(sub, exp) of a token signed with one of the configured keys; None when no key verifies it;
        HTTPProblem(401) when one does but the token has expired or has no subject."""
        for key, algorithms in self._jwt_keys:
            try:
                claims = jwt.decode(token, key, algorithms=algorithms,  # type: ignore[arg-type]
                                    options={"require": ["sub"]})
            except jwt.ExpiredSignatureError:
                raise self._unauthorized("The token has expired.") from None
            except jwt.PyJWTError:
                continue
            sub = claims.get("sub")
            if not isinstance(sub, str) or not sub:
                raise self._unauthorized("The token has no usable subject.")
            exp = claims.get("exp")
            return sub, float(exp) if isinstance(exp, int | float) else None
        return None

    # --- one-time tickets for browsers, which cannot set Authorization on a WebSocket -------------------------

    def issue_ticket(self, principal: Principal) -> tuple[str, str]:
        """A single-use ticket for `principal` and its expiry as an RFC 3339 UTCDate.

        Signed, not stored: the upgrade may land on another worker (SO_REUSEPORT) or host than the POST did."""
        expiry = self.clock() + self.ticket_ttl
        body = base64.urlsafe_b64encode(
            f"{secrets.token_hex(12)}:{int(expiry)}:{principal.username}".encode()).rstrip(b"=")
        value = (body + b"." + self._sign(body)).decode("ascii")
        return value, datetime.fromtimestamp(int(expiry), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _sign(self, body: bytes) -> bytes:
        return base64.urlsafe_b64encode(hmac.digest(self._ticket_key, body, "sha256")).rstrip(b"=")

    def redeem_ticket(self, value: str) -> Principal:
        """The principal of a ticket, consuming it; HTTPProblem(401) if forged, used or expired.

        Single use is enforced by the process that redeems it; with several processes a ticket could be replayed
        on another one within its (short) lifetime, which is why the TTL defaults to a minute."""
        refused = self._unauthorized("The ticket is unknown, already used or expired.")
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
        return self._directory.principal(username)
