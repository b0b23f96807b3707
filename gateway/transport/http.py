"""The HTTP surface on aiohttp: session resource, API, tickets, health, metrics, admin, blobs.

Handlers depend on the ports in `HttpServices` (authentication, the request path, the bus, delegations), never on
the composition root. Every error answer is an RFC 7807 problem body, produced in one middleware by the error
mapper of gateway.errors. Requests aiohttp's parser refuses are answered by
`ProblemRequestHandler` (400, or 431 for an oversized head).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from gateway.admission import UserLimiter, check_request
from gateway.auth import Authenticator
from gateway.bus.base import Bus
from gateway.bus.events import EventDecodeError, EventLines, decode_events
from gateway.config import Settings
from gateway.directory import MAX_USERNAME, Delegations, Principal
from gateway.errors import LIMIT, PROBLEM_CONTENT_TYPE, GatewayError, HTTPProblem, RequestLevelError, problem_of
from gateway.jmap.codec import decode_api_request
from gateway.logs import ClientMistakes
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import Metrics
from gateway.transport.front import RequestHead, UpgradeHandler
from gateway.transport.ingest import NDJSON, check_admin, stopped
from gateway.transport.sse import EVENT_SOURCE_PATHS
from gateway.upstream.base import RequestPath, SessionContext

log = logging.getLogger(__name__)
_json = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class HttpServices:
    """What the HTTP handlers use."""

    settings: Settings
    auth: Authenticator
    request_path: RequestPath
    limiter: UserLimiter  # maxConcurrentRequests per user for /jmap/api (a socket counts its own)
    bus: Bus
    delegations: Delegations
    metrics: Metrics
    readiness: Callable[[], dict[str, bool]]
    context: Callable[[], SessionContext]  # the URLs are known once the port is bound
    # Takes over an event-stream request that came on a connection which served other requests first.
    event_source: UpgradeHandler | None = None


SERVICES: web.AppKey[HttpServices] = web.AppKey("services")


def _problem_response(problem: HTTPProblem) -> web.Response:
    return web.Response(status=problem.status, body=problem.body(), content_type=PROBLEM_CONTENT_TYPE,
                        headers=problem.headers)


@web.middleware
async def problems(request: web.Request, handler: Any) -> web.StreamResponse:
    services = request.app[SERVICES]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response: web.StreamResponse = await handler(request)
    except GatewayError as exc:
        response = _problem_response(problem_of(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects keep their Location
        allow = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        response = _problem_response(HTTPProblem(exc.status, exc.reason, headers=allow))
    except Exception as exc:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = _problem_response(problem_of(exc))
    services.metrics.http_requests.labels(route, str(response.status)).inc()
    return response


async def _principal(request: web.Request, *, fresh: bool = False) -> Principal:
    return await request.app[SERVICES].auth.authenticate(request.headers.get("Authorization"), fresh=fresh)


def _admin(request: web.Request) -> HttpServices:
    services = request.app[SERVICES]
    check_admin(services.settings.admin_token, request.headers.get("Authorization"))
    return services


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_json.encode(obj), content_type="application/json")


async def _body(request: web.Request, limit: int, too_big: GatewayError) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise too_big
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise too_big
    return body


async def well_known(request: web.Request) -> web.Response:
    # RFC 8620 §2.2: the well-known URL may redirect to the session resource.
    raise web.HTTPFound("/jmap/session")


async def session(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    # RFC 8620 §2: a client refetches the session when a response's sessionState differs from the one it holds,
    # so this answer is never one validated earlier (front mode would have a cached, just as stale, one).
    principal = await _principal(request, fresh=True)
    return _json_response(services.request_path.session_resource(principal, services.context()))


async def api(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    principal = await _principal(request)
    limit = services.settings.max_size_request
    body = await _body(request, limit, RequestLevelError(
        LIMIT, f"The request is larger than maxSizeRequest ({limit} bytes).", limit="maxSizeRequest"))
    api_request = decode_api_request(body, services.settings.max_json_depth)
    path = services.request_path
    check_request(api_request, path.capabilities_for(principal), services.settings.max_calls_in_request)
    with services.limiter.hold(principal.username):
        response = await path.call(principal, api_request)
    return _json_response(response)


async def ticket(request: web.Request) -> web.Response:
    value, valid_until = request.app[SERVICES].auth.issue_ticket(await _principal(request))
    return _json_response({"value": value, "validUntil": valid_until}, status=201)


async def ws_without_upgrade(request: web.Request) -> web.Response:
    raise HTTPProblem(426, "This endpoint only accepts WebSocket upgrades (RFC 8887) on a new connection.",
                      headers={"Upgrade": "websocket"})


async def healthz(request: web.Request) -> web.Response:
    return _json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    checks = request.app[SERVICES].readiness()
    if all(checks.values()):
        return _json_response({"status": "ready", "checks": checks})
    failing = ", ".join(k for k, ok in checks.items() if not ok)
    raise HTTPProblem(503, f"Not ready: {failing}.", headers={"Retry-After": "5"})


async def metrics(request: web.Request) -> web.Response:
    # With GATEWAY_WORKERS > 1 the page of the whole process group (gateway.group), whichever worker took it.
    body = await request.app[SERVICES].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def admin_events(request: web.Request) -> web.Response:
    """Publish Apache James StateChangeEvents on the bus: one or an array as JSON, or a stream of them as NDJSON
    (`application/x-ndjson`, one per line, for as long as the request lasts)."""
    services = _admin(request)
    if request.content_type == NDJSON:
        return await _event_stream(request, services)
    body = await _body(request, services.settings.max_size_request, HTTPProblem(413, "The body is too large."))
    try:
        events = decode_events(body)
    except EventDecodeError as exc:
        raise HTTPProblem(400, f"Not a StateChangeEvent or an array of them: {exc}.") from None
    # A bus that cannot take events now (the broker is away) raises Unavailable: 503, nothing was published.
    await services.bus.publish(events)
    return _json_response({"accepted": len(events)}, status=202)


async def _event_stream(request: web.Request, services: HttpServices) -> web.Response:
    """An injector's stream on a connection that served other requests first (the first request of a connection
    goes to gateway.transport.ingest, which reads it without aiohttp): whatever complete lines arrived together
    are decoded and published as one batch. The rules are the ingest stream's (gateway.bus.events.EventLines)."""
    lines = EventLines(services.settings.max_size_request)
    accepted = 0
    async for chunk in request.content.iter_any():
        events = lines.feed(chunk)
        if events:
            await services.bus.publish(events)
            accepted += len(events)
        if lines.failure is not None:
            break
    else:
        events = lines.end()
        if events:
            await services.bus.publish(events)
            accepted += len(events)
    if lines.failure is not None:
        status, detail = lines.failure
        raise stopped(status, detail, accepted)
    return _json_response({"accepted": accepted}, status=202)


async def admin_delegation(request: web.Request) -> web.Response:
    services = _admin(request)
    # The names as the directory spells them: the same rule as SMTP recipients (Directory.resolve).
    owner = _user(services, request.match_info["owner"], "owner")
    delegate = _user(services, request.match_info["delegate"], "delegate")
    if owner == delegate:
        raise HTTPProblem(400, "An account cannot be delegated to its owner.")
    if request.method == "PUT":
        changed = await services.delegations.grant(owner, delegate)
        return web.Response(status=201 if changed else 204)
    if not await services.delegations.revoke(owner, delegate):
        raise HTTPProblem(404, f"{delegate} has no delegation from {owner}.")
    return web.Response(status=204)


def _user(services: HttpServices, name: str, role: str) -> str:
    """The directory username a path segment names (aiohttp has percent-decoded it): 400 when it cannot be a
    username at all, 404 when it is none of this directory's."""
    if not name or len(name) > MAX_USERNAME or any(c in name for c in "/\\") or not name.isprintable():
        raise HTTPProblem(400, f"The {role} is not a username (at most {MAX_USERNAME} printable characters, "
                               "no slashes).")
    username = services.delegations.resolve(name)
    if username is None:
        # The name is not echoed: it is the client's own input, and this is all the client needs to know.
        raise HTTPProblem(404, f"The {role} is not a user of this server.")
    return username


async def download(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    principal = await _principal(request)
    info = request.match_info
    blob = await services.request_path.download(principal, info["account"], info["blob"], info["name"],
                                                request.query.get("type", ""))
    response = web.StreamResponse(status=blob.status, headers=blob.headers)
    try:
        async for chunk in blob.chunks:
            if not response.prepared:
                await response.prepare(request)
            await response.write(chunk)
    except GatewayError:
        if not response.prepared:
            raise
        # Headers are out: all that can be said now is that the body is incomplete.
        if request.transport is not None:
            request.transport.abort()
        return response
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    principal = await _principal(request)
    content_type = request.headers.get("Content-Type", "application/octet-stream")
    answer = await services.request_path.upload(principal, request.match_info["account"], content_type,
                                                request.content.iter_chunked(65536))
    body = b"".join([chunk async for chunk in answer.chunks])
    return web.Response(status=answer.status, body=body, headers=answer.headers)


async def event_source_after_requests(request: web.Request) -> web.StreamResponse:
    """RFC 8620 §7.3 on a connection that served other requests first: browsers (and proxies' upstream pools) reuse
    keep-alive connections for an EventSource, and the front protocol routes only a connection's first request. The
    stream takes the connection over from aiohttp as it would from the front protocol; refusals are answered here
    (the connection stays alive)."""
    services = request.app[SERVICES]
    transport = request.transport
    if services.event_source is None or transport is None:
        raise HTTPProblem(404, "No event-source resource here.")
    version = request.version
    lines = [f"{request.method} {request.raw_path} HTTP/{version.major}.{version.minor}".encode("latin-1")]
    lines.extend(name + b": " + value for name, value in request.raw_headers)
    await services.event_source(RequestHead(b"\r\n".join(lines) + b"\r\n\r\n"), transport, b"")
    if transport.get_protocol() is not request.protocol:
        # The connection carries the event stream now: aiohttp lets go of it. Told the connection is lost (with
        # no transport to close), it ends its bookkeeping of it, and the answer it still means to write finds no
        # transport (aiohttp takes that for a client that went away, and writes nothing).
        request.protocol.transport = None
        request.protocol.connection_lost(None)
    return web.Response()


async def expect(request: web.Request) -> web.StreamResponse | None:
    """RFC 9110 §10.1.1: `100-continue` is answered as aiohttp does; any other expectation gets a 417 problem
    (aiohttp's own answer is text/plain, and comes before any middleware)."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None
    return _problem_response(HTTPProblem(417, "The only expectation this server meets is 100-continue."))


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


def build_app(services: HttpServices) -> web.Application:
    app = web.Application(middlewares=[problems], client_max_size=services.settings.max_size_request + 1)
    app[SERVICES] = services
    routes = [
        ("GET", "/.well-known/jmap", well_known),
        ("GET", "/jmap/session", session),
        ("POST", "/jmap/api", api),
        ("POST", "/jmap/ws/ticket", ticket),
        ("GET", "/jmap/ws", ws_without_upgrade),
        *(("GET", path, event_source_after_requests) for path in sorted(EVENT_SOURCE_PATHS)),
        ("GET", "/healthz", healthz),
        ("GET", "/readyz", readyz),
        ("GET", "/metrics", metrics),
        ("POST", "/admin/events", admin_events),
        ("PUT", "/admin/delegations/{owner}/{delegate}", admin_delegation),
        ("DELETE", "/admin/delegations/{owner}/{delegate}", admin_delegation),
        ("GET", "/jmap/download/{account}/{blob}/{name}", download),
        ("POST", "/jmap/upload/{account}/", upload),
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
        response = _problem_response(HTTPProblem(status, detail))
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
