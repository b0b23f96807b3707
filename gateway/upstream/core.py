"""`CoreOnly`: the smallest request path, answering `Core/echo` (RFC 8620 §4) and `unknownMethod` otherwise.

Used when no backend is wanted (tests of the transport, the echo tool, benchmarks of the socket path). It has no
blobs and no mail states.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Collection, Sequence
from typing import Any

from gateway.directory import Principal
from gateway.errors import HTTPProblem, MethodError
from gateway.jmap.types import CORE, WEBSOCKET, ApiRequest, ApiResponse, Invocation
from gateway.upstream.base import Blob, Counters, SessionContext, local_session

CAPABILITIES = frozenset({CORE, WEBSOCKET})


class CoreOnly:
    def __init__(self, state: str = "0") -> None:
        self._state = state

    def capabilities_for(self, principal: Principal) -> Collection[str]:
        return CAPABILITIES

    def session_resource(self, principal: Principal, ctx: SessionContext) -> dict[str, Any]:
        return local_session(principal, ctx, {}, {}, self._state)

    async def call(self, principal: Principal, request: ApiRequest) -> ApiResponse:
        responses: list[Invocation] = []
        for name, args, call_id in request.methodCalls:
            if name == "Core/echo" and CORE in request.using:
                # RFC 8620 §4.1: the arguments come back unchanged.
                responses.append(("Core/echo", args, call_id))
            else:
                responses.append(MethodError("unknownMethod", f"{name} is not supported").to_invocation(call_id))
        return ApiResponse(methodResponses=responses, sessionState=self._state)

    async def current_states(self, principal: Principal,
                             account_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        return {}

    async def download(self, principal: Principal, account_id: str, blob_id: str, name: str,
                       content_type: str) -> Blob:
        raise HTTPProblem(404, "This server has no blobs.")

    async def upload(self, principal: Principal, account_id: str, content_type: str,
                     body: AsyncIterable[bytes]) -> Blob:
        raise HTTPProblem(501, "This server stores no blobs.")

    def counters(self) -> Counters:
        return []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
