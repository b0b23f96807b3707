"""The event-source side of the transport (RFC 8620 §7.3, `eventSourceUrl`): the front protocol hands over a
`GET /jmap/eventsource/` connection, which is authenticated here and then written `state` and `ping` events.

Pushes come from the hub's fan-out index exactly as WebSocket pushes do (one encode per variant; only the framing
differs), so the connection cap, the slow-client rules and resume (`Last-Event-ID` is a pushState) are the
WebSocket path's. The client sends nothing after its request; the body of the answer ends with the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.admission import UserCounts
from gateway.auth import Authenticator
from gateway.config import Settings
from gateway.directory import Principal
from gateway.errors import Forbidden, HTTPProblem, Unauthorized, Unavailable
from gateway.eventstream import StreamRequest, StreamState, parse_request, ping_event, response_head
from gateway.fanout.hub import EVENT_SOURCE, Hub
from gateway.metrics import Metrics
from gateway.transport.front import RequestHead
from gateway.transport.timers import Alarm, TimerWheel

log = logging.getLogger(__name__)
EVENT_SOURCE_PATHS = frozenset({"/jmap/eventsource/", "/jmap/eventsource"})


class _Writer:
    """What the broadcast loop writes to (its `Target.transport`): the socket, plus the bookkeeping a written event
    needs (pings count from the last event; `closeafter=state` ends the answer after one)."""

    __slots__ = ("conn",)

    def __init__(self, conn: SseConnection) -> None:
        self.conn: SseConnection | None = conn  # None once the connection is gone (no cycle left behind)

    def send_reuse_external_bytearray(self, _opcode: int, buf: bytearray, offset: int, *_rest: Any) -> None:
        if self.conn is not None:
            self.conn.write(memoryview(buf)[offset:])

    def send(self, _opcode: int, payload: bytes, *_rest: Any) -> None:
        if self.conn is not None:
            self.conn.write(payload)


class SseConnection(asyncio.Protocol):
    """One event stream: an asyncio protocol on the connection after its request head."""

    __slots__ = ("_alarm", "principal", "request", "service", "state", "target", "transport")

    def __init__(self, service: EventSourceService, principal: Principal, request: StreamRequest,
                 transport: asyncio.Transport) -> None:
        self.service = service
        self.principal = principal
        self.request = request
        self.transport = transport
        expires_at = None
        now = service.now()
        if principal.expires_at is not None:
            expires_at = now + max(0.0, principal.expires_at - time.time())
        self.state = StreamState(request.ping, now, expires_at=expires_at,
                                 slow_timeout=service.settings.slow_client_timeout)
        self.target: Any = service.broadcast.Target(_Writer(self), False)
        self._alarm = Alarm(lambda: service.wheel, self._on_timer)

    # --- asyncio protocol -------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        pass  # RFC 8620 §7.3 streams go one way; a pipelined request has no answer here (the answer never ends)

    def eof_received(self) -> bool:
        # The client closed its side: EventSource clients (browsers, httpx-sse, the front mode's upstream streams)
        # never half-close, they go away. Ending at once frees the subscription now instead of at the next write.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.closing = True
        self.service.hub.disable(self.target)
        self.service.closed(self)
        # Freed by its reference count from here (the collector may never see it: gateway.gcpolicy freezes).
        self._alarm.cancel()
        self.target.transport.conn = None

    def pause_writing(self) -> None:
        # Over the write buffer's high-water mark: pushes merge into one pending state event instead of queueing.
        self.target.paused = True
        if not self.state.paused_since:
            self.state.paused_since = self.service.now()
        self._arm()

    def resume_writing(self) -> None:
        self.target.paused = False
        self.state.paused_since = 0.0
        self.service.hub.flush(self.target)

    # --- writing ----------------------------------------------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        if self.state.closing:
            return
        self.transport.write(data)
        self.state.sent(self.service.now())
        if self.request.close_after_state:
            # RFC 8620 §7.3 closeafter=state: the answer ends after this event (not during the broadcast loop,
            # which is still iterating over this connection's group).
            self.state.closing = True
            self.service.loop.call_soon(self.transport.close)

    def close(self, code: int = 0, reason: str = "") -> None:
        """Close from outside (shutdown, revoked credentials); the code is a WebSocket notion and unused here."""
        if not self.state.closing:
            self.state.closing = True
            self.transport.close()

    @property
    def closing(self) -> bool:
        return self.state.closing or self.transport.is_closing()

    def _arm(self) -> None:
        self._alarm.arm(self.state.deadline)

    def _on_timer(self, now: float) -> None:
        due = self.state.timer(now)
        if due == "ping":
            self.transport.write(ping_event(self.request.ping))
        elif due == "slow":
            self.service.metrics.slow_closes.inc()
            self.transport.abort()  # it does not read: nothing more can be said to it
        elif due == "expired":
            self.transport.close()
        if not self.state.closing:
            self._arm()


class EventSourceService:
    """Every event stream of one process: authentication, the per-user cap (shared with the WebSockets), and the
    hand-over from the front protocol."""

    def __init__(self, settings: Settings, auth: Authenticator, hub: Hub, broadcast: Any, metrics: Metrics,
                 counts: UserCounts, wheel: Callable[[], TimerWheel]) -> None:
        self.settings = settings
        self.auth = auth
        self.hub = hub
        self.broadcast = broadcast
        self.metrics = metrics
        self.counts = counts
        self._wheel = wheel
        self.connections: set[SseConnection] = set()
        # Called after each connection is added (the composition root hooks the collector policy, gateway.gcpolicy).
        self.on_open: Callable[[], None] = lambda: None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def wheel(self) -> TimerWheel:
        return self._wheel()  # the WebSockets' wheel: one for every socket of the process

    def now(self) -> float:
        return self.loop.time()

    async def accept(self, head: RequestHead, transport: asyncio.Transport, buffered: bytes) -> None:
        """The front protocol's handler for `GET /jmap/eventsource/`: refusals raise (answered as problems)."""
        if head.method != "GET":
            raise HTTPProblem(405, "The event-source resource answers GET only.", headers={"Allow": "GET"})
        request = parse_request(head.query)
        tickets = head.query.get("ticket")
        try:
            # Browsers' EventSource cannot set Authorization: they get a ticket first (POST /jmap/ws/ticket).
            if tickets:
                principal = self.auth.redeem_ticket(tickets[0])
            else:
                principal = await self.auth.authenticate(head.get("authorization"))
        except (Unauthorized, Forbidden, Unavailable):
            self.metrics.upgrades.labels("eventsource_unauthorized").inc()
            raise
        self.counts.admit(principal.username, self.settings.max_connections_per_user)
        if transport.is_closing():
            return
        conn = SseConnection(self, principal, request, transport)
        transport.set_protocol(conn)
        transport.set_write_buffer_limits(high=self.settings.write_high_water)
        transport.write(response_head())
        self.connections.add(conn)
        self.on_open()
        self.counts.opened(principal.username)
        self.metrics.eventsource_connections.inc()
        # RFC 8620 §7.3 with an EventSource's reconnection: Last-Event-ID is the pushState of the last event seen.
        sub = self.hub.subscribe(conn.target, principal, request.types, EVENT_SOURCE)
        rest = self.hub.resume(sub, head.get("last-event-id"), lambda: not conn.closing)
        if rest is not None:
            task = self.loop.create_task(rest)
            task.add_done_callback(_retrieved)
        transport.resume_reading()
        conn._arm()

    def closed(self, conn: SseConnection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.counts.closed(conn.principal.username)
            self.metrics.eventsource_connections.dec()

    def close_all(self) -> int:
        n = len(self.connections)
        for conn in list(self.connections):
            conn.close()
        return n


def _retrieved(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("resuming an event stream failed", exc_info=task.exception())

