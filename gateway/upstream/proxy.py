"""`ProxyRequestPath`: front mode's request path. JMAP requests go to an upstream JMAP server's apiUrl over HTTP
with the client's own credentials; the upstream stays the source of truth (DESIGN.md §1).

One pooled keep-alive aiohttp client per process carries everything to the upstream: session fetches (which
validate credentials), API requests, the `/get` calls that read current states for the push resume, and the
blob downloads and uploads forwarded for GATEWAY_PROXY_HTTP. Each API request is awaited by its own task (the
gateway runs one per request), so a slow upstream call never holds up other requests or pushes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
from aiohttp import web

from gateway.config import Settings
from gateway.directory import Account, Principal
from gateway.errors import LIMIT, SERVER_UNAVAILABLE, HTTPProblem, RequestLevelError
from gateway.jmap.types import CORE, MAIL, VACATION, WEBSOCKET, ApiRequest, ApiResponse
from gateway.metrics import counter
from gateway.upstream.base import check_request
from gateway.upstream.session import (
    FrontPrincipal,
    SessionCache,
    UpstreamForbidden,
    UpstreamSession,
    UpstreamUnauthorized,
    UpstreamUnavailable,
    parse_session,
)

log = logging.getLogger(__name__)

SERVER_FAIL = "urn:ietf:params:jmap:error:serverFail"
JSON = "application/json"
# Apache James's JMAP routes select the RFC 8621 implementation by this Accept parameter (its clients send it);
# other servers ignore the parameter.
ACCEPT = "application/json; jmapVersion=rfc-8621"
RETRY_AFTER = "5"
# Types whose state the push resume reads from the upstream, by the account capability that has them (RFC 8621).
# EmailDelivery has no /get: only the bus tells it.
STATE_TYPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (MAIL, ("Mailbox", "Email", "Thread")),
    (VACATION, ("VacationResponse",)),
)
# Response headers a forwarded download keeps (the body is streamed, so no Content-Length/-Encoding).
DOWNLOAD_HEADERS = ("Content-Type", "Content-Disposition", "Cache-Control", "ETag", "Last-Modified")


class AnyCapability(Collection[str]):
    """The gateway-wide `supported_capabilities` in front mode: every name passes the session layer's check,
    because what is supported depends on the user's upstream session; `ProxyRequestPath.call` checks it."""

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class _UpstreamResponse(msgspec.Struct):
    """RFC 8620 §3.4, as the upstream's apiUrl answers.

    `methodResponses` stays raw JSON: it goes back to the client as it came (encode once, DESIGN.md §3), spliced
    into the Response by the encoder, instead of being decoded into Python objects and encoded again (for a 9 KB
    mail sync, 9.6 µs instead of 36.6 µs)."""

    methodResponses: msgspec.Raw
    sessionState: str = ""
    createdIds: dict[str, str] | None = None


_response_decoder = msgspec.json.Decoder(_UpstreamResponse)
_invocations_decoder = msgspec.json.Decoder(list[tuple[str, dict[str, Any], str]])
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_TEMPLATE_VAR = re.compile(r"\{([A-Za-z0-9_]+)\}")


def expand(template: str, **values: str) -> str:
    """RFC 6570 level-1 expansion, as RFC 8620 §2 uses for downloadUrl/uploadUrl: values percent-encoded."""
    return _TEMPLATE_VAR.sub(lambda m: quote(values.get(m.group(1), ""), safe=""), template)


def unavailable(detail: str) -> RequestLevelError:
    return RequestLevelError(SERVER_UNAVAILABLE, detail, status=503)


def error_from_upstream(status: int, body: bytes) -> RequestLevelError:
    """An upstream HTTP error as a request-level error: its RFC 7807 problem when it sent one (RFC 8620 §3.6.1),
    else one made from the status."""
    try:
        problem = _any_decoder.decode(body)
    except msgspec.DecodeError:
        problem = None
    if isinstance(problem, dict) and isinstance(problem.get("type"), str):
        problem_status = problem.get("status")
        detail = problem.get("detail") or problem.get("title") or f"The upstream server answered {status}."
        limit = problem.get("limit")
        return RequestLevelError(problem["type"], str(detail),
                                 status=problem_status if isinstance(problem_status, int) else status,
                                 limit=limit if isinstance(limit, str) else None)
    if status in (502, 503, 504):
        return unavailable(f"The upstream server is unavailable ({status}).")
    if status >= 500:
        return RequestLevelError(SERVER_FAIL, f"The upstream server failed ({status}).", status=status)
    if status == 401:
        return RequestLevelError("about:blank", "The upstream server no longer accepts these credentials.",
                                 status=401)
    return RequestLevelError("about:blank", f"The upstream server refused the request ({status}).", status=status)


def _min(ours: int, theirs: int | None) -> int:
    return ours if theirs is None else min(ours, theirs)


class ProxyRequestPath:
    """The RequestPath port (gateway.upstream.base) over HTTP to an upstream JMAP server."""

    def __init__(self, settings: Settings) -> None:
        assert settings.upstream_url is not None
        self._settings = settings
        self.session_url = settings.upstream_url
        self.timeout = settings.upstream_timeout
        self._timeout = aiohttp.ClientTimeout(total=settings.upstream_timeout)
        # Transfers may be long; only a stalled one counts as unavailable.
        self._transfer_timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.upstream_timeout,
                                                       sock_read=settings.upstream_timeout)
        self.sessions = SessionCache(self.fetch_session, settings.auth_cache_ttl)
        self._http: aiohttp.ClientSession | None = None
        self._in_flight: dict[str, int] = {}  # username -> API requests at the upstream now
        self._warned: set[str] = set()  # accountIds logged as not SHA-256 of their owner
        self._background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.requests = 0
        self.unavailable = 0
        # Called when the upstream rejects a socket's credentials on a request (the recheck wakes up for it).
        self.on_rejected: Callable[[], None] = lambda: None

    # --- lifecycle -----------------------------------------------------------------------------------------

    def add_background(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `job()` as a task between start and stop (the credential recheck)."""
        self._background.append(job)

    async def start(self) -> None:
        if self._http is None:
            connector = aiohttp.TCPConnector(limit=self._settings.upstream_max_connections, keepalive_timeout=60)
            # No cookie jar: one client serves every user, and a cookie the upstream sets for one of them must
            # never ride along with another's credentials.
            self._http = aiohttp.ClientSession(connector=connector, timeout=self._timeout, trust_env=False,
                                               cookie_jar=aiohttp.DummyCookieJar(),
                                               headers={"User-Agent": "jmap-push-gateway"})
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(job()) for job in self._background]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("the upstream client is not started")
        return self._http

    # --- credentials -> upstream session -------------------------------------------------------------------

    async def fetch_session(self, authorization: str) -> UpstreamSession:
        """GET the upstream's session resource with these credentials (RFC 8620 §2): this is how they are
        validated. Raises UpstreamUnauthorized / UpstreamForbidden / UpstreamUnavailable."""
        headers = {"Authorization": authorization, "Accept": ACCEPT}
        try:
            async with self.http.get(self.session_url, headers=headers) as resp:
                body = await resp.read()
                status, final_url = resp.status, str(resp.url)
                challenge = resp.headers.get("WWW-Authenticate")
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.unavailable += 1
            raise UpstreamUnavailable(f"The upstream server cannot be reached ({type(exc).__name__}).") from None
        if status == 200:
            return parse_session(body, final_url, time.monotonic(), self._warned)
        if status == 401:
            raise UpstreamUnauthorized(challenge)
        if status == 403:
            raise UpstreamForbidden("The upstream server does not let these credentials use JMAP.")
        if status < 500:
            log.warning("the upstream session resource %s answered %d", self.session_url, status)
        self.unavailable += 1
        raise UpstreamUnavailable(f"The upstream server answered {status}.")

    async def session_of(self, principal: Principal) -> UpstreamSession:
        """The principal's upstream session; for a local JWT that has none yet, ask again (it may be back)."""
        p = _front(principal)
        if p.upstream is not None:
            return p.upstream
        assert p.credentials is not None
        try:
            session = await self.sessions.get(p.key, p.credentials.header)
        except UpstreamUnauthorized:
            raise RequestLevelError("about:blank", "The upstream server does not accept these credentials.",
                                    status=401) from None
        except UpstreamForbidden as exc:
            raise RequestLevelError("about:blank", str(exc), status=403) from None
        except UpstreamUnavailable as exc:
            raise unavailable(str(exc)) from None
        if session.username != p.username:
            raise RequestLevelError("about:blank", "The upstream server knows these credentials as another user.",
                                    status=403)
        return session

    # --- the RequestPath port ------------------------------------------------------------------------------

    @property
    def capabilities(self) -> Mapping[str, Mapping[str, Any]]:
        return {}  # per user: the session resource is the upstream's (see session_resource)

    def account_capabilities(self, account: Account) -> Mapping[str, Mapping[str, Any]]:
        return {}

    def session_state(self, principal: Principal) -> str:
        upstream = _front(principal).upstream
        return upstream.state if upstream is not None else ""

    async def call(self, principal: Principal, request: ApiRequest) -> ApiResponse:
        session = await self.session_of(principal)
        # RFC 8620 §3.6.1: the upstream's limits are honoured here, before anything is sent; the session layer
        # has checked the gateway's own, so the effective limit is the smaller one.
        s = self._settings
        check_request(request, session.capabilities | {WEBSOCKET},
                      _min(s.max_calls_in_request, session.max_calls_in_request))
        if WEBSOCKET in request.using and WEBSOCKET not in session.capabilities:
            # The capability of this binding is the gateway's; an upstream without it would refuse the request.
            request = ApiRequest(using=[c for c in request.using if c != WEBSOCKET],
                                 methodCalls=request.methodCalls, createdIds=request.createdIds)
        body = _encoder.encode(request)
        max_size = _min(s.max_size_request, session.max_size_request)
        if len(body) > max_size:
            raise RequestLevelError(LIMIT, f"The request is larger than maxSizeRequest ({max_size} bytes).",
                                    limit="maxSizeRequest")
        # RFC 8620 §2 maxConcurrentRequests is the upstream's per user: count this user's requests across all
        # of their sockets and HTTP calls on this process, and refuse rather than queue, as the upstream would.
        username = principal.username
        limit = session.max_concurrent_requests
        n = self._in_flight.get(username, 0)
        if limit is not None and n >= limit:
            raise RequestLevelError(LIMIT, f"At most {limit} requests may be in flight at the upstream server.",
                                    limit="maxConcurrentRequests")
        self._in_flight[username] = n + 1
        try:
            answer = await self._post(principal, session.api_url, body)
        finally:
            left = self._in_flight[username] - 1
            if left:
                self._in_flight[username] = left
            else:
                del self._in_flight[username]
        # The raw invocations stand in for the list the port's type names: every consumer only encodes them.
        return ApiResponse(methodResponses=answer.methodResponses,
                           sessionState=answer.sessionState, createdIds=answer.createdIds)

    async def _post(self, principal: Principal, url: str, body: bytes) -> _UpstreamResponse:
        p = _front(principal)
        assert p.credentials is not None
        self.requests += 1
        headers = {"Authorization": p.credentials.header, "Content-Type": JSON, "Accept": ACCEPT}
        try:
            async with self.http.post(url, data=body, headers=headers) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.unavailable += 1
            raise unavailable(f"The upstream server cannot be reached ({type(exc).__name__}).") from None
        if status == 200:
            try:
                answer = _response_decoder.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                answer = None
            if answer is None or bytes(memoryview(answer.methodResponses)[:1]) != b"[":
                raise RequestLevelError(SERVER_FAIL, "The upstream server's answer is not a JMAP Response.",
                                        status=502)
            return answer
        if status == 401 and not p.local:
            # Revoked while the socket is open: forget the cached session and have the recheck confirm it and
            # close the socket (1008) now, instead of a whole GATEWAY_AUTH_RECHECK later.
            self.sessions.evict(p.key)
            p.checked_at = float("-inf")
            self.on_rejected()
        if status >= 500:
            self.unavailable += 1
        raise error_from_upstream(status, data)

    async def current_states(self, principal: Principal,
                             account_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """RFC 8887 §4.3.5 resume: the states the upstream reports now, read with `/get` and `ids: []` (RFC 8620
        §5.1: the response carries `state` and nothing else is read), with the client's own credentials."""
        try:
            session = await self.session_of(principal)
        except RequestLevelError as exc:
            log.warning("no current states for %s from the upstream: %s", principal.username, exc.detail,
                        extra={"username": principal.username})
            return {}
        wanted = set(account_ids)
        calls: list[tuple[str, dict[str, Any], str]] = []
        using = {CORE}
        for account in principal.accounts:
            if account.id not in wanted:
                continue
            caps = session.account_capabilities.get(account.id, frozenset())
            for capability, types in STATE_TYPES:
                if capability in caps:
                    using.add(capability)
                    calls.extend((f"{t}/get", {"accountId": account.id, "ids": []}, f"{t} {account.id}")
                                 for t in types)
        if not calls:
            return {}
        per_request = _min(self._settings.max_calls_in_request, session.max_calls_in_request)
        chunks = [calls[i:i + per_request] for i in range(0, len(calls), per_request)]
        bodies = [_encoder.encode(ApiRequest(using=sorted(using), methodCalls=chunk)) for chunk in chunks]
        results = await asyncio.gather(*(self._post(principal, session.api_url, b) for b in bodies),
                                       return_exceptions=True)
        out: dict[str, dict[str, str]] = {}
        for result in results:
            if isinstance(result, BaseException):
                detail = result.detail if isinstance(result, RequestLevelError) else repr(result)
                log.warning("reading current states of %s from the upstream failed: %s", principal.username, detail,
                            extra={"username": principal.username})
                continue
            try:
                invocations = _invocations_decoder.decode(result.methodResponses)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("the upstream's answer to a state read for %s is malformed", principal.username,
                            extra={"username": principal.username})
                continue
            for name, args, call_id in invocations:
                state = args.get("state")
                if name.endswith("/get") and isinstance(state, str):
                    type_name, _, account_id = call_id.partition(" ")
                    out.setdefault(account_id, {})[type_name] = state
        return out

    # --- the session resource and the forwarded HTTP endpoints ---------------------------------------------

    def session_resource(self, principal: Principal, base_url: str, ws_url: str) -> dict[str, Any]:
        """The upstream's Session object for these credentials, with this gateway's WebSocket (RFC 8887 §4.1)
        and the limits the gateway enforces; URLs are the upstream's, or this gateway's with GATEWAY_PROXY_HTTP."""
        session = _front(principal).upstream
        if session is None:
            raise HTTPProblem(503, "The upstream server gave no session for these credentials yet.",
                              headers={"Retry-After": RETRY_AFTER})
        s = self._settings
        out = dict(session.raw)
        capabilities = dict(out.get("capabilities") or {})
        core = dict(capabilities.get(CORE) or {})
        # What a client may send is what both the gateway and the upstream accept.
        core["maxSizeRequest"] = _min(s.max_size_request, session.max_size_request)
        core["maxCallsInRequest"] = _min(s.max_calls_in_request, session.max_calls_in_request)
        core["maxConcurrentRequests"] = _min(s.max_concurrent_requests, session.max_concurrent_requests)
        capabilities[CORE] = core
        capabilities[WEBSOCKET] = {"url": ws_url, "supportsPush": True}
        out["capabilities"] = capabilities
        if s.proxy_http:
            out["apiUrl"] = f"{base_url}/jmap/api"
            if session.download_url:
                out["downloadUrl"] = f"{base_url}/jmap/download/{{accountId}}/{{blobId}}/{{name}}?type={{type}}"
            if session.upload_url:
                out["uploadUrl"] = f"{base_url}/jmap/upload/{{accountId}}/"
        return out

    async def forward_download(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        """GET a blob from the upstream's downloadUrl with the client's credentials, streamed through."""
        session = await self.session_of(principal)
        if not session.download_url:
            raise HTTPProblem(404, "The upstream server has no downloadUrl.")
        p = _front(principal)
        assert p.credentials is not None
        info = request.match_info
        url = expand(session.download_url, accountId=info["account"], blobId=info["blob"], name=info["name"],
                     type=request.query.get("type", "application/octet-stream"))
        response: web.StreamResponse | None = None
        try:
            async with self.http.get(url, headers={"Authorization": p.credentials.header},
                                     timeout=self._transfer_timeout) as up:
                response = web.StreamResponse(status=up.status)
                for name in DOWNLOAD_HEADERS:
                    if name in up.headers:
                        response.headers[name] = up.headers[name]
                await response.prepare(request)
                async for chunk in up.content.iter_chunked(65536):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.unavailable += 1
            if response is None or not response.prepared:
                raise HTTPProblem(503, f"The upstream server cannot be reached ({type(exc).__name__}).",
                                  headers={"Retry-After": RETRY_AFTER}) from None
            # Headers are out: all that can be said now is that the body is incomplete.
            if request.transport is not None:
                request.transport.abort()
            return response

    async def forward_upload(self, request: web.Request, principal: Principal) -> web.Response:
        """POST the body to the upstream's uploadUrl (RFC 8620 §6.1) with the client's credentials, streamed."""
        session = await self.session_of(principal)
        if not session.upload_url:
            raise HTTPProblem(404, "The upstream server has no uploadUrl.")
        p = _front(principal)
        assert p.credentials is not None
        url = expand(session.upload_url, accountId=request.match_info["account"])
        headers = {"Authorization": p.credentials.header,
                   "Content-Type": request.headers.get("Content-Type", "application/octet-stream")}
        try:
            async with self.http.post(url, data=request.content, headers=headers,
                                      timeout=self._transfer_timeout) as up:
                body = await up.read()
                return web.Response(status=up.status, body=body,
                                    headers={"Content-Type": up.headers.get("Content-Type", JSON)})
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.unavailable += 1
            raise HTTPProblem(503, f"The upstream server cannot be reached ({type(exc).__name__}).",
                              headers={"Retry-After": RETRY_AFTER}) from None

    # --- metrics read at scrape time -----------------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        yield counter("gateway_upstream_session_fetches", "Session resources fetched from the upstream (auth)",
                      self.sessions.fetches)
        yield counter("gateway_upstream_auth_cache_hits", "Authentications answered from the session cache",
                      self.sessions.hits)
        yield counter("gateway_upstream_requests", "HTTP calls to the upstream's apiUrl", self.requests)
        yield counter("gateway_upstream_unavailable", "Upstream calls that failed: unreachable, timeout or 5xx",
                      self.unavailable)


def _front(principal: Principal) -> FrontPrincipal:
    if not isinstance(principal, FrontPrincipal):
        # Only front-mode authentication makes principals here; anything else is a wiring bug.
        raise RequestLevelError(SERVER_FAIL, "This principal cannot act on the upstream server.", status=500)
    return principal
