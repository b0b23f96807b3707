"""The request-path port: what answers JMAP for a role — API requests, the session resource, blobs, and the current
states a push resume needs.

Implementations: `CoreOnly` (Core/echo, the gateway core), the embedded mail backend (gateway.backend.service), and
the HTTP proxy to an upstream JMAP server (front mode, gateway.upstream.api). The request-level checks common to
every path run once, in gateway.admission, before a request reaches any implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.config import Settings
from gateway.directory import Account, Principal
from gateway.jmap.types import CORE, WEBSOCKET, ApiRequest, ApiResponse

# The Session object's template URLs (RFC 8620 §2) below this gateway's base URL.
DOWNLOAD_PATH = "/jmap/download/{accountId}/{blobId}/{name}?type={type}"
UPLOAD_PATH = "/jmap/upload/{accountId}/"
EVENT_SOURCE_PATH = "/jmap/eventsource/?types={types}&closeafter={closeafter}&ping={ping}"


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What a Session object is built with besides the principal: where clients reach this gateway, and its
    limits (the settings)."""

    base_url: str  # http(s)://host:port of this gateway, no trailing slash
    ws_url: str  # its RFC 8887 WebSocket URL
    settings: Settings


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


@dataclass(slots=True)
class Blob:
    """An HTTP answer with a body that may be streamed (a download, or an upload's answer)."""

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes] = field(default_factory=_no_chunks)

    @classmethod
    def of(cls, status: int, headers: dict[str, str], body: bytes) -> Blob:
        async def one() -> AsyncIterator[bytes]:
            yield body

        return cls(status, headers, one())


Counters = list[tuple[str, str, float]]  # (metric name without the gateway_ prefix, help, value)


class RequestPath(Protocol):
    """Answers JMAP for authenticated principals, and knows the current state of their accounts."""

    def capabilities_for(self, principal: Principal) -> Collection[str]:
        """The capabilities a request of `principal` may use (RFC 8620 §3.6.1 unknownCapability otherwise)."""

    def session_resource(self, principal: Principal, ctx: SessionContext) -> dict[str, Any]:
        """The RFC 8620 §2 Session object for `principal`, with `urn:ietf:params:jmap:websocket` (RFC 8887 §4.1)."""

    async def call(self, principal: Principal, request: ApiRequest) -> ApiResponse:
        """Answer `request`. Method-level failures are error invocations in the Response; request-level
        failures raise RequestLevelError (or Unauthorized, Forbidden, Unavailable). Never raises anything else
        on bad input."""

    async def current_states(self, principal: Principal,
                             account_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """accountId -> type name -> current state, for the push resume (RFC 8887 §4.3.5 pushState)."""

    async def download(self, principal: Principal, account_id: str, blob_id: str, name: str,
                       content_type: str) -> Blob:
        """RFC 8620 §6.2; HTTPProblem(404) when there is no such blob for this principal."""

    async def upload(self, principal: Principal, account_id: str, content_type: str,
                     body: AsyncIterable[bytes]) -> Blob:
        """RFC 8620 §6.1: store `body`, answer with the upload's JSON object."""

    def counters(self) -> Counters:
        """Counters of this path for /metrics, read at scrape time."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def local_session(principal: Principal, ctx: SessionContext, capabilities: Mapping[str, Mapping[str, Any]],
                  account_capabilities: Mapping[str, Mapping[str, Any]], state: str) -> dict[str, Any]:
    """The Session object of a request path inside this process (embedded backend, CoreOnly): this gateway's own
    limits and URLs; `capabilities` are the path's besides core and websocket, `account_capabilities` those of
    every account."""
    s = ctx.settings
    caps: dict[str, Any] = {
        CORE: {
            "maxSizeUpload": s.max_size_upload,
            "maxConcurrentUpload": s.max_concurrent_upload,
            "maxSizeRequest": s.max_size_request,
            "maxConcurrentRequests": s.max_concurrent_requests,
            "maxCallsInRequest": s.max_calls_in_request,
            "maxObjectsInGet": s.max_objects_in_get,
            "maxObjectsInSet": s.max_objects_in_set,
            "collationAlgorithms": ["i;ascii-numeric", "i;ascii-casemap", "i;unicode-casemap"],
        },
        WEBSOCKET: {"url": ctx.ws_url, "supportsPush": True},  # RFC 8887 §4.1
        **capabilities,
    }
    accounts: dict[str, Any] = {}
    primary: dict[str, str] = {}
    for account in principal.accounts:
        accounts[account.id] = _account(account, account_capabilities)
        if account.is_personal:
            for cap in account_capabilities:
                primary[cap] = account.id
    base = ctx.base_url
    return {
        "capabilities": caps,
        "accounts": accounts,
        "primaryAccounts": primary,
        "username": principal.username,
        "apiUrl": f"{base}/jmap/api",
        "downloadUrl": base + DOWNLOAD_PATH,
        "uploadUrl": base + UPLOAD_PATH,
        "eventSourceUrl": base + EVENT_SOURCE_PATH,
        "state": state,
    }


def _account(account: Account, capabilities: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {"name": account.name, "isPersonal": account.is_personal, "isReadOnly": False,
            "accountCapabilities": dict(capabilities)}
