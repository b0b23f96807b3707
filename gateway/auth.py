"""Authentication, done once per WebSocket upgrade and on every HTTP call: Basic, Bearer JWT, or a one-time ticket.

Failures raise `HTTPProblem(401)` carrying `WWW-Authenticate` for every accepted scheme. Passwords, tokens and
tickets are never logged. The clock is injected so that expiry is testable without waiting.
"""

from __future__ import annotations

import base64
import binascii
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
        self._ticket_ttl = settings.ticket_ttl
        self._tickets: dict[str, tuple[str, float]] = {}  # ticket -> (username, expiry)
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
        last_error = "Invalid token."
        for key, algorithms in self._jwt_keys:
            try:
                claims = jwt.decode(token, key, algorithms=algorithms,  # type: ignore[arg-type]
                                    options={"require": ["sub"]})
            except jwt.ExpiredSignatureError:
                raise self._unauthorized("The token has expired.") from None
            except jwt.PyJWTError as exc:
                last_error = f"Invalid token: {exc}."
                continue
            sub = claims.get("sub")
            if not isinstance(sub, str) or not sub:
                raise self._unauthorized("The token has no usable subject.")
            exp = claims.get("exp")
            return self._directory.principal(sub, float(exp) if isinstance(exp, int | float) else None)
        raise self._unauthorized(last_error)

    # --- one-time tickets for browsers, which cannot set Authorization on a WebSocket -------------------------

    def issue_ticket(self, principal: Principal) -> tuple[str, str]:
        """A single-use ticket for `principal` and its expiry as an RFC 3339 UTCDate."""
        now = self.clock()
        self._tickets = {t: v for t, v in self._tickets.items() if v[1] > now}
        value = secrets.token_urlsafe(32)
        expiry = now + self._ticket_ttl
        self._tickets[value] = (principal.username, expiry)
        valid_until = datetime.fromtimestamp(expiry, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return value, valid_until

    def redeem_ticket(self, value: str) -> Principal:
        """The principal of a ticket, consuming it; HTTPProblem(401) if unknown, used or expired."""
        entry = self._tickets.pop(value, None)
        if entry is None or entry[1] <= self.clock():
            raise self._unauthorized("The ticket is unknown, already used or expired.")
        return self._directory.principal(entry[0])
