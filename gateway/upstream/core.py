"""`CoreOnly`: the smallest request path, answering `Core/echo` (RFC 8620 §4) and `unknownMethod` otherwise.

Used when no backend is wanted (tests of the transport, the echo tool, benchmarks of the socket path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gateway.directory import Account, Principal
from gateway.errors import MethodError
from gateway.jmap.types import CORE, ApiRequest, ApiResponse, Invocation


class CoreOnly:
    def __init__(self, state: str = "0") -> None:
        self._state = state

    @property
    def capabilities(self) -> Mapping[str, Mapping[str, Any]]:
        return {}

    def account_capabilities(self, account: Account) -> Mapping[str, Mapping[str, Any]]:
        return {}

    def session_state(self, principal: Principal) -> str:
        return self._state

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

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
