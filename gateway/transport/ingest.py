"""The event-ingest stream: `POST /admin/events` with an NDJSON body, read by a protocol of the gateway's own.

An injector (a James bridge, a benchmark, an operator's script) streams StateChangeEvents, one per line, in one
long request. aiohttp would cost every chunk its parser callbacks, a StreamReader and a wake-up of the handler's
task; here the front protocol hands the connection over after the head, and each read is parsed by llhttp
(httptools), split into lines, decoded and given to the bus inside the same `data_received` call: on the memory
bus the pushes are written before the call returns. The usual read (whole lines, the body going on) is taken in C
by gateway._ingest's Reader, with no Python frame from the socket to the hub's Lane; this module has the logic of
every other read and of the answer. Only the first request of a connection comes here (the front protocol routes
first requests); a stream sent after other requests on a kept-alive connection is read by aiohttp
(gateway.transport.http) with the same line rules (gateway.bus.events.EventLines).

Answers: 202 `{"accepted": n}` at the end of the body; a problem-details body (RFC 7807) otherwise: 401/403/404 for
the admin token (as every admin route), 400 for a line that is no event or a malformed body (RFC 9112 §7.1), 413
for a line longer than GATEWAY_MAX_SIZE_REQUEST, 417 for an expectation other than 100-continue (RFC 9110
§10.1.1), 503 when the bus cannot take events or the gateway stops. Every answer closes the connection
(`Connection: close`): a stream is one long request, and a client that sends another opens a new connection.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Sequence
from typing import Any

import httptools
import msgspec

from gateway import native
from gateway.bus.base import Bus
from gateway.bus.events import DECODER, MAX_DEPTH, EventLines, StateChangeEvent
from gateway.errors import GatewayError, HTTPProblem, Unavailable, problem_of, problem_response
from gateway.logs import ClientMistakes
from gateway.transport.front import LINGER, RequestHead

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
PATH = "/admin/events"  # also the route label of gateway_http_requests_total, as aiohttp's requests get it
impl = native.load("_ingest")  # the Reader, compiled when built (tests run both modules by replacing it)


def check_admin(token: str | None, authorization: str | None) -> None:
    """The admin API's authentication: raise the HTTPProblem for a request without the admin Bearer token."""
    if token is None:
        raise HTTPProblem(404, "The admin API is disabled (GATEWAY_ADMIN_TOKEN is unset).")
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value:
        raise HTTPProblem(401, "The admin API needs a Bearer token.",
                          headers={"WWW-Authenticate": 'Bearer realm="admin"'})
    if not hmac.compare_digest(value.strip().encode(), token.encode()):
        raise HTTPProblem(403, "The admin token is not valid.")


def stopped(status: int, detail: str, accepted: int) -> HTTPProblem:
    """The answer to a stream stopped by a line or its framing, with what it had published (both readers)."""
    return HTTPProblem(status, f"{detail}; the {accepted} events before it were published.")


def is_ingest(head: RequestHead) -> bool:
    """Whether a connection's first request is an NDJSON event stream (media type parameters aside)."""
    if head.method != "POST" or head.path != PATH:
        return False
    content_type = head.get("content-type") or ""
    return content_type.partition(";")[0].strip().lower() == NDJSON


class IngestService:
    """Takes ingest connections over from the front protocol, and closes those still open when the gateway stops."""

    def __init__(self, bus: Bus, admin_token: str | None, max_line: int, mistakes: ClientMistakes,
                 count: Callable[[str, int], None]) -> None:
        self.bus = bus
        self._token = admin_token
        self.max_line = max_line
        self.mistakes = mistakes
        self.count = count  # (route, status): gateway_http_requests_total
        self.streams: set[IngestProtocol] = set()

    async def accept(self, head: RequestHead, transport: asyncio.Transport, rest: bytes) -> None:
        """The front protocol's handler: refusals raise HTTPProblem (the front protocol answers and closes)."""
        try:
            check_admin(self._token, head.get("authorization"))
            expect = head.get("expect")
            if expect is not None and expect.lower() != "100-continue":
                raise HTTPProblem(417, "The only expectation this server meets is 100-continue.")
        except HTTPProblem as problem:
            self.count(PATH, problem.status)
            raise
        if expect is not None and head.version == "HTTP/1.1":
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # RFC 9110 §10.1.1
        proto = IngestProtocol(self, transport)
        transport.set_protocol(proto.reader)  # an asyncio protocol (compiled when built)
        self.streams.add(proto)
        proto.start(head.raw + rest)

    def close_all(self) -> int:
        """The gateway stops: every open stream gets 503 (with what it had published) and is closed."""
        streams = list(self.streams)
        for proto in streams:
            proto.fail(HTTPProblem(503, "The gateway is stopping.", headers={"Retry-After": "5"}), linger=False)
        return len(streams)


class IngestProtocol:
    """One ingest request, from its head to its answer. Its `reader` (gateway._ingest, compiled when built) is the
    connection's asyncio protocol and llhttp's callbacks: it parses every read and publishes the usual one itself
    (whole lines, the body going on, a synchronous bus); for the others it calls `take` here, and `malformed` and
    `publish_failed` when the framing or the bus refuses."""

    def __init__(self, service: IngestService, transport: asyncio.Transport) -> None:
        self._service = service
        self._transport = transport
        self._lines = EventLines(service.max_line)
        self._fault: str | None = None  # why llhttp refused the body (answered once the lines before it are in)
        self._publishing = False  # an asynchronous publish is in flight (reading is paused meanwhile)
        self.finished = False
        # The memory bus (and front mode's local injection) take events synchronously: no task per batch, and
        # the reader publishes the usual read itself. Without it every read's lines come to `take`.
        self._publish_now: Callable[[Sequence[StateChangeEvent]], None] | None = getattr(
            service.bus, "publish_now", None)
        self.reader = impl.Reader(self, self._lines, self._publish_now, decode=DECODER.decode_lines,
                                  max_depth=MAX_DEPTH)

    @property
    def accepted(self) -> int:
        accepted: int = self.reader.accepted
        return accepted

    def start(self, data: bytes) -> None:
        """Parse the head (again: llhttp needs it) and what followed it, then read on unless that ended it."""
        self.reader.data_received(data)
        if not self.finished and not self._publishing:
            self._transport.resume_reading()

    # --- called by the reader ------------------------------------------------------------------------------

    def malformed(self, exc: httptools.HttpParserError) -> None:
        """llhttp refused the read: the stream fails once the lines before the fault are taken."""
        if not self.reader.complete:  # bytes after the end of the body are ignored: the answer closes
            self._service.mistakes.report("ingest-malformed", "event stream: malformed HTTP body: %s", exc)
            self._fault = f"Malformed HTTP request body (RFC 9112 §7.1): {exc}"
            self.reader.open = False

    def take(self) -> None:
        """Publish the complete lines of what was read; answer when the body is complete or a line is bad. With a
        fault too: the lines before it arrived whole, and are published."""
        lines = self._lines
        reader = self.reader
        events: list[StateChangeEvent] = []
        body = reader.body
        if body:
            events = lines.feed(body[0] if len(body) == 1 else b"".join(body))
            body.clear()
        if reader.complete and lines.failure is None:
            events += lines.end()
        if events:
            if self._publish_now is not None:
                try:
                    self._publish_now(events)
                except Exception as exc:
                    self.publish_failed(exc)
                    return
                reader.accepted += len(events)
            else:
                self._publish_later(events)
                return
        if reader.complete or self._fault is not None or lines.failure is not None:
            self._settle()  # else the stream goes on

    def publish_failed(self, exc: Exception) -> None:
        """The bus refused events (GatewayError: answered with its problem); anything else is a bug, raised."""
        if not isinstance(exc, GatewayError):
            raise exc
        self.fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        # A client that goes away mid-stream: what it sent in whole lines was published; nobody is left to answer.
        # (The reader let go of this protocol and of its parser before calling here: no cycle is left.)
        self._finish()

    def eof_received(self) -> bool | None:
        if not self.finished and not self.reader.complete and self._fault is None:
            self._fault = "The connection ended inside the request body (RFC 9112 §8)"
            self.reader.open = False
            self._settle()
        return None

    # --- the stream ----------------------------------------------------------------------------------------

    def _finish(self) -> None:
        self.finished = True
        self.reader.open = False
        self._service.streams.discard(self)

    def _settle(self) -> None:
        failure = self._lines.failure
        if failure is not None:
            status, detail = failure
            self._service.mistakes.report("ingest-bad-line", "event stream: %s", detail)
            self.fail(stopped(status, detail, self.accepted))
        elif self._fault is not None:
            self.fail(stopped(400, self._fault, self.accepted))
        elif self.reader.complete:
            self._accepted()

    def _publish_later(self, events: list[StateChangeEvent]) -> None:
        # A broker's publish awaits its confirms: read no more until it is done (back-pressure on the injector).
        self._publishing = True
        self._transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._service.bus.publish(events))
        task.add_done_callback(lambda t: self._published(t, len(events)))

    def _published(self, task: asyncio.Task[Any], n: int) -> None:
        self._publishing = False
        if self.finished:
            return
        exc = None if task.cancelled() else task.exception()
        if task.cancelled() or exc is not None:
            if exc is not None and not isinstance(exc, GatewayError):
                log.error("publishing injected events failed", exc_info=exc)
            # The bus's own answer (a broker away: 503 with Retry-After), and what the stream had published.
            problem = problem_of(exc if isinstance(exc, GatewayError) else Unavailable("The bus did not take them."))
            self.fail(HTTPProblem(problem.status, f"{problem.detail.rstrip('.')}; the {self.accepted} events "
                                  "before these were published.", headers=problem.headers,
                                  type_uri=problem.type_uri))
            return
        self.reader.accepted += n
        self._settle()
        if not self.finished:
            self._transport.resume_reading()

    def _accepted(self) -> None:
        self._finish()
        self._service.count(PATH, 202)
        transport = self._transport
        if transport.is_closing():
            return
        body = msgspec.json.encode({"accepted": self.accepted})
        transport.write(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                        b"Connection: close\r\n\r\n%s" % (len(body), body))
        transport.close()

    def fail(self, error: BaseException, *, linger: bool = True) -> None:
        """Answer with the problem for `error` and close: after a lingering read (RFC 9112 §9.6), because a body
        still arriving would otherwise make the kernel reset the connection before the client read the answer."""
        if self.finished:
            return
        self._finish()
        self._service.count(PATH, problem_of(error).status)
        transport = self._transport
        if transport.is_closing():
            return
        transport.write(problem_response(error))
        if not linger:
            transport.close()
            return
        if transport.can_write_eof():
            transport.write_eof()
        if not self._publishing:
            transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER, transport.close)
