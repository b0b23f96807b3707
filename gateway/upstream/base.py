"""The request-path port: takes an authenticated JMAP Request and returns its Response.

Implementations: `CoreOnly` (Core/echo, the gateway core), the embedded mail backend, and the HTTP proxy to an
upstream JMAP server (front mode). The checks common to every path (RFC 8620 §3.3 `using`, `maxCallsInRequest`)
are done once in `check_request`, before a request reaches any implementation.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

from gateway.directory import Account, Principal
from gateway.errors import LIMIT, UNKNOWN_CAPABILITY, RequestLevelError
from gateway.jmap.types import ApiRequest, ApiResponse


class RequestPath(Protocol):
    """Answers JMAP requests for authenticated principals, and knows the current state of their accounts."""

    @property
    def capabilities(self) -> Mapping[str, Mapping[str, Any]]:
        """Server capabilities besides `urn:ietf:params:jmap:core` and `...:websocket` (the gateway adds those)."""

    def account_capabilities(self, account: Account) -> Mapping[str, Mapping[str, Any]]:
        """The `accountCapabilities` of one account in the Session object."""

    def session_state(self, principal: Principal) -> str:
        """The Session object's `state` (RFC 8620 §2) for this principal."""

    async def call(self, principal: Principal, request: ApiRequest) -> ApiResponse:
        """Answer `request`. Method-level failures are error invocations in the Response; request-level
        failures raise RequestLevelError. Never raises anything else on bad input."""

    async def current_states(self, principal: Principal,
                             account_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """accountId -> type name -> current state, for the push resume (RFC 8887 §4.3.5 pushState)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def check_request(request: ApiRequest, supported: Collection[str], max_calls: int) -> None:
    """RFC 8620 §3.6.1 request-level checks shared by every request path."""
    for capability in request.using:
        if capability not in supported:
            raise RequestLevelError(UNKNOWN_CAPABILITY,
                                    f"The request uses the capability {capability!r}, which this server "
                                    "does not support.")
    if len(request.methodCalls) > max_calls:
        raise RequestLevelError(LIMIT, f"The request has {len(request.methodCalls)} method calls; "
                                f"maxCallsInRequest is {max_calls}.", limit="maxCallsInRequest")
