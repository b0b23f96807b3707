"""Front mode's Session object (RFC 8620 §2): the upstream's own, for the client's credentials, with this gateway's
WebSocket (RFC 8887 §4.1) and the limits both enforce. No I/O here: the session was fetched at authentication.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import Unavailable
from gateway.jmap.types import CORE, WEBSOCKET
from gateway.upstream.base import DOWNLOAD_PATH, UPLOAD_PATH, SessionContext
from gateway.upstream.session import FrontPrincipal


def smaller(ours: int, theirs: int | None) -> int:
    return ours if theirs is None else min(ours, theirs)


def front_session(principal: FrontPrincipal, ctx: SessionContext) -> dict[str, Any]:
    """The upstream's Session for these credentials with our WebSocket URL and limits; its URLs are the
    upstream's, or this gateway's with GATEWAY_PROXY_HTTP (forwarded, see gateway.upstream.blobs)."""
    session = principal.upstream
    if session is None:
        raise Unavailable("The upstream server gave no session for these credentials yet.")
    s = ctx.settings
    out = dict(session.raw)
    capabilities = dict(out.get("capabilities") or {})
    core = dict(capabilities.get(CORE) or {})
    # What a client may send is what both the gateway and the upstream accept.
    core["maxSizeRequest"] = smaller(s.max_size_request, session.max_size_request)
    core["maxCallsInRequest"] = smaller(s.max_calls_in_request, session.max_calls_in_request)
    core["maxConcurrentRequests"] = smaller(s.max_concurrent_requests, session.max_concurrent_requests)
    capabilities[CORE] = core
    capabilities[WEBSOCKET] = {"url": ctx.ws_url, "supportsPush": True}
    out["capabilities"] = capabilities
    if s.proxy_http:
        out["apiUrl"] = f"{ctx.base_url}/jmap/api"
        if session.download_url:
            out["downloadUrl"] = ctx.base_url + DOWNLOAD_PATH
        if session.upload_url:
            out["uploadUrl"] = ctx.base_url + UPLOAD_PATH
    return out
