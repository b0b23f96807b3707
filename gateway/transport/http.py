"""The HTTP surface on aiohttp: session resource, API, tickets, health, metrics, admin, downloads.

Every error answer is an RFC 7807 problem body, produced in one middleware from the error hierarchy, and for
requests aiohttp's parser refuses, by `ProblemRequestHandler` (400, or 431 for an oversized head).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from gateway.bus.events import EventDecodeError, decode_events
from gateway.directory import MAX_USERNAME, Principal
from gateway.errors import LIMIT, PROBLEM_CONTENT_TYPE, GatewayError, HTTPProblem, RequestLevelError
from gateway.jmap.codec import decode_api_request
from gateway.logs import ClientMistakes
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.upstream.base import check_request

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.config import Settings

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()

GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")


def _problem(status: int, body: bytes, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type=PROBLEM_CONTENT_TYPE, headers=headers)


@web.middleware
async def problems(request: web.Request, handler: Any) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response: web.StreamResponse = await handler(request)
    except HTTPProblem as exc:
        response = _problem(exc.status, exc.body(), exc.headers)
    except RequestLevelError as exc:
        response = _problem(exc.status, _json.encode(exc.to_problem()))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects keep their Location
        response = _problem(exc.status, HTTPProblem(exc.status, exc.reason).body(),
                            {k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = _problem(500, HTTPProblem(500, "Internal server error.").body())
    gw.metrics.http_requests.labels(route, str(response.status)).inc()
    return response


async def _principal(request: web.Request) -> Principal:
    gw = request.app[GATEWAY_KEY]
    return await gw.authenticate(request.headers.get("Authorization"))


def _admin(request: web.Request) -> None:
    token = request.app[GATEWAY_KEY].settings.admin_token
    if token is None:
        raise HTTPProblem(404, "The admin API is disabled (GATEWAY_ADMIN_TOKEN is unset).")
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise HTTPProblem(401, "The admin API needs a Bearer token.",
                          headers={"WWW-Authenticate": 'Bearer realm="admin"'})
    import hmac

    if not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise HTTPProblem(403, "The admin token is not valid.")


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_json.encode(obj), content_type="application/json")


async def well_known(request: web.Request) -> web.Response:
    # RFC 8620 §2.2: the well-known URL may redirect to the session resource.
    raise web.HTTPFound("/jmap/session")


async def session(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    # RFC 8620 §2: a client refetches the session when a response's sessionState differs from the one it holds,
    # so in front mode this answer is never the cached one (which would be just as stale).
    principal = await gw.authenticate(request.headers.get("Authorization"), fresh=gw.front is not None)
    return _json_response(gw.session_resource(principal))


async def api(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    principal = await _principal(request)
    limit = gw.settings.max_size_request
    if request.content_length is not None and request.content_length > limit:
        raise RequestLevelError(LIMIT, f"The request is larger than maxSizeRequest ({limit} bytes).",
                                limit="maxSizeRequest")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise RequestLevelError(LIMIT, f"The request is larger than maxSizeRequest ({limit} bytes).",
                                limit="maxSizeRequest")
    api_request = decode_api_request(body, gw.settings.max_json_depth)
    check_request(api_request, gw.supported_capabilities, gw.settings.max_calls_in_request)
    response = await gw.request_path.call(principal, api_request)
    return _json_response(response)


async def ticket(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    value, valid_until = gw.auth.issue_ticket(await _principal(request))
    return _json_response({"value": value, "validUntil": valid_until}, status=201)


async def ws_without_upgrade(request: web.Request) -> web.Response:
    raise HTTPProblem(426, "This endpoint only accepts WebSocket upgrades (RFC 8887) on a new connection.",
                      headers={"Upgrade": "websocket"})


async def healthz(request: web.Request) -> web.Response:
    return _json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    checks = gw.readiness()
    if all(checks.values()):
        return _json_response({"status": "ready", "checks": checks})
    failing = ", ".join(k for k, ok in checks.items() if not ok)
    raise HTTPProblem(503, f"Not ready: {failing}.", headers={"Retry-After": "5"})


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    return web.Response(body=gw.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def admin_events(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    _admin(request)
    body = await request.content.read(gw.settings.max_size_request + 1)
    if len(body) > gw.settings.max_size_request:
        raise HTTPProblem(413, "The body is too large.")
    try:
        events = decode_events(body)
    except EventDecodeError as exc:
        raise HTTPProblem(400, f"Not a StateChangeEvent or an array of them: {exc}.") from None
    try:
        await gw.bus.publish(events)
    except GatewayError as exc:
        # The bus cannot take events now (e.g. the broker is away): the caller may retry, nothing was published.
        raise HTTPProblem(503, f"The event bus is unavailable: {exc}.", headers={"Retry-After": "5"}) from None
    return _json_response({"accepted": len(events)}, status=202)


async def admin_delegation(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    _admin(request)
    if gw.front is not None:
        raise HTTPProblem(409, "In front mode accounts and their sharing are the upstream server's.")
    # The names as the directory spells them: the same rule as SMTP recipients (Directory.resolve).
    owner = _user(gw, request.match_info["owner"], "owner")
    delegate = _user(gw, request.match_info["delegate"], "delegate")
    if owner == delegate:
        raise HTTPProblem(400, "An account cannot be delegated to its owner.")
    if request.method == "PUT":
        changed = gw.directory.grant(owner, delegate)
        return web.Response(status=201 if changed else 204)
    if not gw.directory.revoke(owner, delegate):
        raise HTTPProblem(404, f"{delegate} has no delegation from {owner}.")
    return web.Response(status=204)


def _user(gw: Gateway, name: str, role: str) -> str:
    """The directory username a path segment names (aiohttp has percent-decoded it): 400 when it cannot be a
    username at all, 404 when it is none of this directory's."""
    if not name or len(name) > MAX_USERNAME or any(c in name for c in "/\\") or not name.isprintable():
        raise HTTPProblem(400, f"The {role} is not a username (at most {MAX_USERNAME} printable characters, "
                               "no slashes).")
    username = gw.directory.resolve(name)
    if username is None:
        # The name is not echoed: it is the client's own input, and this is all the client needs to know.
        raise HTTPProblem(404, f"The {role} is not a user of this server.")
    return username


async def download(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY_KEY]
    principal = await _principal(request)
    if gw.front is not None:
        # Front mode: the blob is the upstream's (its downloadUrl), streamed through with the client's credentials.
        return await gw.front.forward_download(request, principal)
    fetch = getattr(gw.request_path, "download", None)
    if fetch is None:
        raise HTTPProblem(404, "This server has no blobs.")
    data = await fetch(principal, request.match_info["account"], request.match_info["blob"])
    if data is None:
        raise HTTPProblem(404, "No such blob in this account.")
    content_type = request.query.get("type") or "message/rfc822"
    return web.Response(body=data, headers={"Content-Type": content_type})


async def upload(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY_KEY]
    principal = await _principal(request)
    if gw.front is None:
        raise HTTPProblem(501, "This endpoint is advertised by RFC 8620 but not implemented by this gateway yet.")
    # Front mode: RFC 8620 §6.1 upload to the upstream's uploadUrl, streamed, with the client's credentials.
    return await gw.front.forward_upload(request, principal)


async def not_implemented(request: web.Request) -> web.Response:
    await _principal(request)
    raise HTTPProblem(501, "This endpoint is advertised by RFC 8620 but not implemented by this gateway yet.")


async def expect(request: web.Request) -> web.StreamResponse | None:
    """RFC 9110 §10.1.1: `100-continue` is answered as aiohttp does; any other expectation gets a 417 problem
    (aiohttp's own answer is text/plain, and comes before any middleware)."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None
    return _problem(417, HTTPProblem(417, "The only expectation this server meets is 100-continue.").body())


async def unrouted(request: web.Request) -> web.Response:
    """Every path without a route of its own (so that its answers get problem bodies and `expect` too)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def build_app(gw: Gateway) -> web.Application:
    app = web.Application(middlewares=[problems], client_max_size=gw.settings.max_size_request + 1)
    app[GATEWAY_KEY] = gw
    routes = [
        ("GET", "/.well-known/jmap", well_known),
        ("GET", "/jmap/session", session),
        ("POST", "/jmap/api", api),
        ("POST", "/jmap/ws/ticket", ticket),
        ("GET", "/jmap/ws", ws_without_upgrade),
        ("GET", "/healthz", healthz),
        ("GET", "/readyz", readyz),
        ("GET", "/metrics", metrics),
        ("POST", "/admin/events", admin_events),
        ("PUT", "/admin/delegations/{owner}/{delegate}", admin_delegation),
        ("DELETE", "/admin/delegations/{owner}/{delegate}", admin_delegation),
        ("GET", "/jmap/download/{account}/{blob}/{name}", download),
        ("POST", "/jmap/upload/{account}/", upload),
        ("GET", "/jmap/eventsource/", not_implemented),
        ("*", "/{path:.*}", unrouted),  # last: only what nothing above matched
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler, expect_handler=expect)
        if method == "GET":
            app.router.add_route("HEAD", path, handler, expect_handler=expect)  # as add_get() does
    return app


# --- the connection handler -------------------------------------------------------------------------------

class ProblemRequestHandler(web.RequestHandler):
    """aiohttp's HTTP/1.1 connection handler, answering what its parser refuses with problem details.

    aiohttp's own answer is text/plain and quotes the offending header line, and it logs that line (a credential,
    as often as not) at ERROR with a traceback. Here: 431 for a line or a head over GATEWAY_MAX_HEAD_BYTES or too
    many header fields (RFC 6585 §5), else 400; the client's mistake is logged as one rate-limited line that
    names the kind of error, never the header. A 500 (the gateway's own fault) stays ERROR with its traceback."""

    def __init__(self, manager: web.Server, *, mistakes: ClientMistakes, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._mistakes = mistakes

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response with the error")
        if status >= 500:
            log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
            detail = "Internal server error."
        else:
            if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
                status = 431
                detail = "The request head has a line that is too long or too many header fields."
            else:
                detail = "The request is not valid HTTP/1.1."
            self._mistakes.report("bad-http-request", "bad HTTP request from %s: %s, answered %d",
                                  request.remote, type(exc).__name__ if exc else "error", status)
        response = _problem(status, HTTPProblem(status, detail).body())
        response.force_close()
        return response


def connection_factory(server: web.Server, settings: Settings,
                       mistakes: ClientMistakes) -> Callable[[], asyncio.Protocol]:
    """What the front protocol hands an HTTP connection to: a ProblemRequestHandler of `server`.

    No header line may be longer than the whole head may be (GATEWAY_MAX_HEAD_BYTES): the front protocol checks
    the head of a connection's first request, aiohttp's parser each line of every request."""
    loop = asyncio.get_running_loop()
    limit = settings.max_head_bytes

    def make() -> asyncio.Protocol:
        return ProblemRequestHandler(server, mistakes=mistakes, loop=loop, access_log=None,
                                     max_line_size=limit, max_field_size=limit)

    return make
