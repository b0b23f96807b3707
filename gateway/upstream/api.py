"""`ProxyRequestPath`: front mode's request path. JMAP requests go to an upstream JMAP server's apiUrl over HTTP
with the client's own credentials; the upstream stays the source of truth (DESIGN.md §1).

Each API request is awaited by its own task (the transport runs one per request), so a slow upstream call never
holds up other requests or pushes. The session resource and blob forwarding live beside it
(gateway.upstream.resource, gateway.upstream.blobs); the HTTP client they share in gateway.upstream.client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable, Collection, Coroutine, Iterator, Sequence
from typing import Any

import msgspec

from gateway.admission import check_request, too_many_in_flight
from gateway.config import Settings
from gateway.directory import Principal
from gateway.errors import LIMIT, RequestLevelError
from gateway.jmap.types import CORE, MAIL, VACATION, WEBSOCKET, ApiRequest, ApiResponse
from gateway.upstream import blobs
from gateway.upstream.base import Blob, Counters, SessionContext
from gateway.upstream.client import UpstreamClient, front
from gateway.upstream.resource import front_session, smaller

log = logging.getLogger(__name__)

# Types whose state the push resume reads from the upstream, by the account capability that has them (RFC 8621).
# EmailDelivery has no /get: only the bus tells it.
STATE_TYPES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (MAIL, ("Mailbox", "Email", "Thread")),
    (VACATION, ("VacationResponse",)),
)
_invocations_decoder = msgspec.json.Decoder(list[tuple[str, dict[str, Any], str]])
_encoder = msgspec.json.Encoder()


class AnyCapability(Collection[str]):
    """What a principal without an upstream session yet may use: every name passes admission, because what is
    supported depends on the user's upstream session, which `ProxyRequestPath.call` checks."""

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


ANY_CAPABILITY = AnyCapability()


class ProxyRequestPath:
    """The RequestPath port (gateway.upstream.base) over HTTP to an upstream JMAP server."""

    def __init__(self, settings: Settings, client: UpstreamClient | None = None) -> None:
        self._settings = settings
        self.client = client or UpstreamClient(settings)
        self._in_flight: dict[str, int] = {}  # username -> API requests at the upstream now
        self._background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -----------------------------------------------------------------------------------------

    def add_background(self, job: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `job()` as a task between start and stop (the credential recheck)."""
        self._background.append(job)

    async def start(self) -> None:
        await self.client.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(job()) for job in self._background]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.client.stop()

    # --- the RequestPath port ------------------------------------------------------------------------------

    def capabilities_for(self, principal: Principal) -> Collection[str]:
        upstream = front(principal).upstream
        return ANY_CAPABILITY if upstream is None else upstream.capabilities | {WEBSOCKET}

    def session_resource(self, principal: Principal, ctx: SessionContext) -> dict[str, Any]:
        return front_session(front(principal), ctx)

    async def call(self, principal: Principal, request: ApiRequest) -> ApiResponse:
        session = await self.client.session_of(principal)
        # RFC 8620 §3.6.1: the upstream's limits are honoured here, before anything is sent; admission has
        # checked the gateway's own, so the effective limit is the smaller one.
        s = self._settings
        check_request(request, session.capabilities | {WEBSOCKET},
                      smaller(s.max_calls_in_request, session.max_calls_in_request))
        if WEBSOCKET in request.using and WEBSOCKET not in session.capabilities:
            # The capability of this binding is the gateway's; an upstream without it would refuse the request.
            request = ApiRequest(using=[c for c in request.using if c != WEBSOCKET],
                                 methodCalls=request.methodCalls, createdIds=request.createdIds)
        body = _encoder.encode(request)
        max_size = smaller(s.max_size_request, session.max_size_request)
        if len(body) > max_size:
            raise RequestLevelError(LIMIT, f"The request is larger than maxSizeRequest ({max_size} bytes).",
                                    limit="maxSizeRequest")
        # RFC 8620 §2 maxConcurrentRequests is the upstream's per user: count this user's requests across all
        # of their sockets and HTTP calls on this process, and refuse rather than queue, as the upstream would.
        username = principal.username
        limit = session.max_concurrent_requests
        n = self._in_flight.get(username, 0)
        if limit is not None and n >= limit:
            raise too_many_in_flight(limit, "at the upstream server")
        self._in_flight[username] = n + 1
        try:
            answer = await self.client.post(principal, session.api_url, body)
        finally:
            left = self._in_flight[username] - 1
            if left:
                self._in_flight[username] = left
            else:
                del self._in_flight[username]
        # The raw invocations stand in for the list the port's type names: every consumer only encodes them.
        return ApiResponse(methodResponses=answer.methodResponses,
                           sessionState=answer.sessionState, createdIds=answer.createdIds)

    async def current_states(self, principal: Principal,
                             account_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """RFC 8887 §4.3.5 resume: the states the upstream reports now, read with `/get` and `ids: []` (RFC 8620
        §5.1: the response carries `state` and nothing else is read), with the client's own credentials.

        Raises when the upstream cannot tell (the hub then retries): an empty answer would claim nothing moved."""
        session = await self.client.session_of(principal)
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
        per_request = smaller(self._settings.max_calls_in_request, session.max_calls_in_request)
        chunks = [calls[i:i + per_request] for i in range(0, len(calls), per_request)]
        bodies = [_encoder.encode(ApiRequest(using=sorted(using), methodCalls=chunk)) for chunk in chunks]
        answers = await asyncio.gather(*(self.client.post(principal, session.api_url, b) for b in bodies))
        out: dict[str, dict[str, str]] = {}
        for answer in answers:
            try:
                invocations = _invocations_decoder.decode(answer.methodResponses)
            except (msgspec.DecodeError, msgspec.ValidationError):
                raise RequestLevelError("about:blank", "The upstream's answer to a state read is malformed.",
                                        status=502) from None
            for name, args, call_id in invocations:
                state = args.get("state")
                if name.endswith("/get") and isinstance(state, str):
                    type_name, _, account_id = call_id.partition(" ")
                    out.setdefault(account_id, {})[type_name] = state
        return out

    async def download(self, principal: Principal, account_id: str, blob_id: str, name: str,
                       content_type: str) -> Blob:
        return await blobs.download(self.client, principal, account_id, blob_id, name, content_type)

    async def upload(self, principal: Principal, account_id: str, content_type: str,
                     body: AsyncIterable[bytes]) -> Blob:
        return await blobs.upload(self.client, principal, account_id, content_type, body)

    def counters(self) -> Counters:
        return self.client.counters()

