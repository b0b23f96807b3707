"""Front mode's knowledge of one user: the upstream's Session object (RFC 8620 §2) for some credentials, the
principal built from it, and a cache of sessions keyed by a salted hash of the credentials.

The cache never holds credentials: its keys are HMAC-SHA-256 digests under a per-process random salt, and its
values are sessions. Only a principal (alive as long as its socket, a ticket or an HTTP call) carries the
`Authorization` value, in memory, to forward requests with it. The fetch itself is injected (see proxy.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urljoin

import msgspec

from gateway.directory import Account, Principal, account_id_for
from gateway.errors import Forbidden, Unauthorized, Unavailable
from gateway.jmap.types import CORE

# --- what the upstream can answer (gateway.errors maps each to its wire answer) ------------------------------

class UpstreamUnauthorized(Unauthorized):
    """401: the upstream does not accept these credentials (wrong, expired or revoked); its WWW-Authenticate
    challenge is passed on to the client."""

    def __init__(self, challenge: str | None) -> None:
        super().__init__("The credentials are not valid.", challenge)


class UpstreamForbidden(Forbidden):
    """403: the credentials are valid but may not use the upstream's JMAP API."""


class UpstreamUnavailable(Unavailable):
    """Not reachable, too slow (GATEWAY_UPSTREAM_TIMEOUT), a 5xx, or an answer that is not a Session."""


UpstreamError = UpstreamUnauthorized | UpstreamForbidden | UpstreamUnavailable


# --- the Session object as the upstream sends it -----------------------------------------------------------

class _Account(msgspec.Struct):
    name: str
    isPersonal: bool = False
    isReadOnly: bool = False
    accountCapabilities: dict[str, Any] = msgspec.field(default_factory=dict)


class _Session(msgspec.Struct):
    """RFC 8620 §2, the fields the gateway reads (the rest is passed through untouched)."""

    capabilities: dict[str, Any]
    accounts: dict[str, _Account]
    username: str
    apiUrl: str
    downloadUrl: str | None = None
    uploadUrl: str | None = None
    eventSourceUrl: str | None = None
    state: str = ""


def _limit(core: Any, name: str) -> int | None:
    value = core.get(name) if isinstance(core, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class UpstreamSession(msgspec.Struct, frozen=True, gc=False):
    """One user's Session object from the upstream, parsed once and shared by every principal built from it."""

    raw: dict[str, Any]  # as received, URLs made absolute; the session resource starts from a copy
    username: str
    accounts: list[Account]
    capabilities: frozenset[str]
    account_capabilities: dict[str, frozenset[str]]  # accountId -> its capability names
    api_url: str
    download_url: str | None
    upload_url: str | None
    state: str
    # RFC 8620 §2 core limits of the upstream; None when it does not say.
    max_size_request: int | None
    max_calls_in_request: int | None
    max_concurrent_requests: int | None
    fetched_at: float  # time.monotonic() of the fetch


def parse_session(body: bytes, session_url: str, now: float) -> UpstreamSession:
    """Parse the upstream's Session object; UpstreamUnavailable when it is not one."""
    try:
        raw = msgspec.json.decode(body)
        parsed = msgspec.convert(raw, _Session)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise UpstreamUnavailable(f"The upstream's session resource is not an RFC 8620 Session: {exc}.") from None
    # RFC 8620 §2: the URLs may be relative to the session resource; the gateway forwards to absolute ones.
    for name in ("apiUrl", "downloadUrl", "uploadUrl", "eventSourceUrl"):
        value = raw.get(name)
        if isinstance(value, str):
            raw[name] = urljoin(session_url, value)
    accounts: list[Account] = []
    account_caps: dict[str, frozenset[str]] = {}
    for account_id, acc in parsed.accounts.items():
        # James names every account by its owner's username (DESIGN.md §5), the name its events carry; the
        # user's own account is theirs whatever it is called. The hub maps events to accounts by that owner, so
        # the ids may follow any scheme (James's SHA-256 of the username, Cyrus's username, ...).
        owner = parsed.username if acc.isPersonal else acc.name
        accounts.append(Account(account_id, acc.name, owner, acc.isPersonal))
        account_caps[account_id] = frozenset(acc.accountCapabilities)
    # The user's own account first, as the embedded directory orders them.
    accounts.sort(key=lambda a: not a.is_personal)
    core = parsed.capabilities.get(CORE)
    return UpstreamSession(
        raw=raw, username=parsed.username, accounts=accounts, capabilities=frozenset(parsed.capabilities),
        account_capabilities=account_caps, api_url=raw["apiUrl"], download_url=raw.get("downloadUrl"),
        upload_url=raw.get("uploadUrl"), state=parsed.state,
        max_size_request=_limit(core, "maxSizeRequest"), max_calls_in_request=_limit(core, "maxCallsInRequest"),
        max_concurrent_requests=_limit(core, "maxConcurrentRequests"), fetched_at=now)


# --- the principal of a front-mode connection -------------------------------------------------------------

class Credentials:
    """An `Authorization` header value kept to forward requests with; its repr never shows it."""

    __slots__ = ("header",)

    def __init__(self, header: str) -> None:
        self.header = header

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"


class FrontPrincipal(Principal, gc=False):
    """A Principal that can act on the upstream: its credentials, their cache key, and the upstream session.

    `upstream` is None only for a Bearer JWT verified locally whose session the upstream did not give (then the
    principal has its own account only). `checked_at` is the time.monotonic() of the last validation, for
    GATEWAY_AUTH_RECHECK; `local` marks a JWT verified here, which the upstream's answer cannot revoke (its
    `exp` closes the socket).
    """

    credentials: Credentials | None = None
    key: bytes = b""
    upstream: UpstreamSession | None = None
    checked_at: float = 0.0
    local: bool = False


def principal_from(session: UpstreamSession, credentials: Credentials, key: bytes, *,
                   expires_at: float | None = None) -> FrontPrincipal:
    # The accounts list is the session's own, shared: nothing mutates it, and idle sockets stay small.
    return FrontPrincipal(session.username, session.accounts, expires_at, credentials=credentials, key=key,
                          upstream=session, checked_at=session.fetched_at)


def own_account_principal(username: str, credentials: Credentials, key: bytes, expires_at: float | None,
                          now: float) -> FrontPrincipal:
    """A locally verified JWT's principal when the upstream gave no session: its own account, by James's rule."""
    return FrontPrincipal(username, [Account(account_id_for(username), username, username, True)], expires_at,
                          credentials=credentials, key=key, upstream=None, checked_at=now, local=True)


# --- the cache ---------------------------------------------------------------------------------------------

Fetch = Callable[[str], Awaitable[UpstreamSession]]


class SessionCache:
    """Upstream sessions by credential hash, for `ttl` seconds, with one upstream call per key at a time.

    Only successes are cached: a rejected password must not stay rejected after the user fixed it, and a 401
    evicts the entry at once. Concurrent lookups of one key share one fetch (single flight); a lookup that is
    cancelled (its upgrade went away) does not cancel the fetch the others wait for.
    """

    def __init__(self, fetch: Fetch, ttl: float, *, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._salt = secrets.token_bytes(32)  # per process: digests mean nothing outside it
        self._entries: dict[bytes, UpstreamSession] = {}
        self._inflight: dict[bytes, asyncio.Task[UpstreamSession]] = {}
        self.fetches = 0  # upstream calls started (metrics)
        self.hits = 0  # lookups answered from the cache
        self.joined = 0  # lookups that waited for a fetch already in flight

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, authorization: str) -> bytes:
        return hmac.new(self._salt, authorization.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def evict(self, key: bytes) -> None:
        self._entries.pop(key, None)

    async def get(self, key: bytes, authorization: str, *, fresh: bool = False) -> UpstreamSession:
        """The session for these credentials, from the cache unless `fresh` or expired; raises UpstreamError."""
        if not fresh:
            entry = self._entries.get(key)
            if entry is not None:
                if self._clock() - entry.fetched_at < self._ttl:
                    self.hits += 1
                    return entry
                del self._entries[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key, authorization))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._landed(key, t))
        else:
            self.joined += 1
        return await asyncio.shield(task)

    async def _load(self, key: bytes, authorization: str) -> UpstreamSession:
        self.fetches += 1
        try:
            session = await self._fetch(authorization)
        except UpstreamUnauthorized:
            self._entries.pop(key, None)
            raise
        if self._ttl > 0:
            if len(self._entries) >= self._max:
                self._prune()
            self._entries[key] = session
        return session

    def _landed(self, key: bytes, task: asyncio.Task[UpstreamSession]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so that a fetch nobody waits for any more is not reported

    def _prune(self) -> None:
        now = self._clock()
        self._entries = {k: v for k, v in self._entries.items() if now - v.fetched_at < self._ttl}
        while len(self._entries) >= self._max:
            # Dicts keep insertion order: the oldest entry goes first.
            del self._entries[next(iter(self._entries))]
