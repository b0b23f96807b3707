"""The WebSocket side of the transport: the upgrade handler, and the picows listener of each connection, which
feeds frames to the connection's sans-I/O `Session` and performs the actions it returns.

`WebSocketService` is what every connection of a process shares (the open connections and per-user counts, the
request runner, the timer wheel); it depends on ports only (authentication, the request path, the hub), never on
the composition root. `WsConnection` is one socket: small on purpose, because idle connections are most of a
gateway's memory.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from gateway.admission import UserCounts
from gateway.auth import Authenticator
from gateway.config import Settings
from gateway.deflate import MAX_WINDOW_BITS, Compression, DeflateParams, negotiate
from gateway.directory import Principal
from gateway.errors import Forbidden, GatewayError, HTTPProblem, Unauthorized, Unavailable
from gateway.fanout.hub import Hub
from gateway.metrics import Metrics
from gateway.session import (
    CloseWith,
    DisablePush,
    Echo,
    EnablePush,
    Limits,
    Ping,
    Reply,
    Run,
    Session,
)
from gateway.transport.front import RequestHead
from gateway.transport.timers import Alarm, TimerWheel
from gateway.transport.upgrade import hand_off
from gateway.upstream.base import RequestPath

log = logging.getLogger(__name__)

_NO_HEADERS: Any = ()
TEXT = WSMsgType.TEXT
CLOSE_LINGER = 2.0  # seconds a close frame gets to leave before the socket is dropped anyway
UpgradeAuth = Callable[[RequestHead], Awaitable[Principal]]


class WsConnection(WSListener):
    """One authenticated WebSocket: picows callbacks in, `Session` actions out."""

    __slots__ = ("_alarm", "deflate", "principal", "service", "session", "target", "transport")

    def __init__(self, service: WebSocketService, principal: Principal, deflate: DeflateParams | None) -> None:
        self.service = service
        self.principal = principal
        self.deflate = deflate
        self.transport: WSTransport | None = None
        self.target: Any = None
        self.session = service.new_session(principal, deflate is not None)
        self._alarm = Alarm(lambda: service.wheel, self._on_timer)

    # --- picows callbacks ----------------------------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        # picows keeps the upgrade request and response for the socket's lifetime; their header maps are ~2 KiB
        # per idle connection that nothing reads after the handshake.
        for kept in (transport.request, transport.response):
            if kept is not None:
                kept.headers = _NO_HEADERS
        service = self.service
        tcp = transport.underlying_transport
        tcp.set_write_buffer_limits(high=service.settings.write_high_water)
        if service.settings.socket_sndbuf:
            tcp.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                    service.settings.socket_sndbuf)
        # The shared compressor uses a 32 KiB window: a peer that limited ours (server_max_window_bits < 15)
        # gets plain frames, which RFC 7692 §6 allows for any message.
        compress = self.deflate is not None and self.deflate.server_max_window_bits == MAX_WINDOW_BITS
        self.target = service.broadcast.Target(transport, compress)
        service.opened(self)
        self._arm()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.session.closing = True
        self.service.hub.disable(self.target)
        self.service.closed(self)
        self._alarm.cancel()  # freed by its reference count from here (gateway.gcpolicy freezes long-lived objects)

    def pause_writing(self) -> None:
        # The socket's write buffer passed its high-water mark: pushes now merge instead of queueing.
        self.target.paused = True
        self.session.paused(self.service.now())
        self._arm()

    def resume_writing(self) -> None:
        self.target.paused = False
        self.session.resumed()
        self.service.hub.flush(self.target)

    def is_user_specific_pong(self, frame: WSFrame) -> bool:
        return False

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        rsv = (frame.rsv1 << 2) | (frame.rsv2 << 1) | frame.rsv3
        action = self.session.frame(frame.msg_type.value, frame.fin, rsv, frame.get_payload_as_memoryview(),
                                    self.service.now())
        if action is not None:
            if type(action) in _MESSAGES:
                self.service.metrics.message_in()
            self.perform(action)

    # --- actions -------------------------------------------------------------------------------------------

    def perform(self, action: Any) -> None:
        kind = type(action)
        if kind is Reply:
            self._reply(action)
        elif kind is Run:
            self.service.run(self, action)
        elif kind is EnablePush:
            self.service.enable_push(self, action.data_types, action.push_state)
        elif kind is DisablePush:
            self.service.hub.disable(self.target)
        elif kind is CloseWith:
            self._close(action)
        elif kind is Ping:
            if self.transport is not None:
                self.transport.send_ping(b"gw")
            self._arm()
        elif kind is Echo:
            self.send(action.payload, WSMsgType(action.opcode))

    def send(self, payload: bytes, opcode: WSMsgType = TEXT) -> None:
        """Write one message, compressed when permessage-deflate was negotiated with our window (RFC 7692 §6)."""
        transport = self.transport
        if transport is None or self.session.closing:
            return
        if self.target.deflate:
            deflated = self.service.compression.compress(payload)
            if deflated is not None:
                transport.send(opcode, deflated, True, True)
                return
        transport.send(opcode, payload)

    def _reply(self, reply: Reply) -> None:
        self.service.metrics.reply_sent(reply.error)
        self.send(reply.payload)
        if self.target is not None and self.target.paused and self.transport is not None:
            self.perform(self.session.wrote_reply(self.transport.underlying_transport.get_write_buffer_size()))

    def finish(self, request_id: str | None, result: Any) -> None:
        """A request of this connection ended (the service's runner calls it)."""
        self.perform(self.session.finish(request_id, result))

    def close(self, code: int, reason: str = "") -> None:
        """Close from outside the protocol (shutdown, revoked credentials)."""
        self.perform(self.session.close(code, reason))

    def _close(self, action: CloseWith) -> None:
        transport = self.transport
        self.service.metrics.close(action.code)
        self.service.hub.disable(self.target)
        if transport is None:
            return
        # picows takes any integer where it declares its enum (a Cython cpdef enum), so 3000-4999 echo as they are.
        code: Any = action.code
        if action.echo:
            transport.send_close(code)
            transport.disconnect()
            return
        transport.send_close(WSCloseCode(code), action.reason.encode()[:120])
        if action.abort:
            transport.underlying_transport.abort()
            return
        # Give the close frame a moment to leave, then drop the socket even if the peer never answers.
        transport.disconnect(graceful=True)
        self.service.loop.call_later(CLOSE_LINGER, transport.underlying_transport.abort)

    @property
    def closing(self) -> bool:
        return self.session.closing or self.transport is None or self.transport.is_disconnected

    # --- time ----------------------------------------------------------------------------------------------

    def _arm(self) -> None:
        """Make sure the timer wheel wakes this connection at its session's deadline (one pending wake-up)."""
        self._alarm.arm(self.session.deadline)

    def _on_timer(self, now: float) -> None:
        action = self.session.timer(now)
        if action is not None:
            self.perform(action)
        if not self.session.closing:
            self._arm()


_MESSAGES = frozenset({Reply, Run, EnablePush, DisablePush, Echo})


class WebSocketService:
    """Everything the WebSockets of one process share, and the upgrade handler that creates them."""

    def __init__(self, settings: Settings, auth: Authenticator, request_path: RequestPath, hub: Hub,
                 compression: Compression, coalesce: ModuleType, broadcast: ModuleType, metrics: Metrics, *,
                 session_class: type[Session] = Session, upgrade_auth: UpgradeAuth | None = None,
                 counts: UserCounts | None = None, picows_log: Any = None) -> None:
        self.settings = settings
        self.auth = auth
        self.request_path = request_path
        self.hub = hub
        self.compression = compression
        self.coalesce = coalesce
        self.broadcast = broadcast
        self.metrics = metrics
        self._session_class = session_class
        self._upgrade_auth = upgrade_auth or self._authenticate
        self.limits = Limits(max_calls=settings.max_calls_in_request, max_concurrent=settings.max_concurrent_requests,
                             ping_interval=settings.ping_interval, ping_timeout=settings.ping_timeout,
                             slow_timeout=settings.slow_client_timeout, slow_max_bytes=settings.slow_client_max_bytes,
                             max_depth=settings.max_json_depth)
        self.connections: set[WsConnection] = set()
        # Called after each connection is added (the composition root hooks the collector policy, gateway.gcpolicy).
        self.on_open: Callable[[], None] = lambda: None
        self.counts = counts or UserCounts()  # shared with the event streams: one cap per user
        self._picows_log = picows_log  # what picows logs a peer's protocol errors through
        self._requests: set[asyncio.Task[Any]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wheel: TimerWheel | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wheel = TimerWheel(self._loop)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "WebSocketService.start() not called"
        return self._loop

    @property
    def wheel(self) -> TimerWheel:
        assert self._wheel is not None, "WebSocketService.start() not called"
        return self._wheel

    def now(self) -> float:
        return self.loop.time()

    def track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- the upgrade ---------------------------------------------------------------------------------------

    async def _authenticate(self, head: RequestHead) -> Principal:
        tickets = head.query.get("ticket")
        if tickets:
            return self.auth.redeem_ticket(tickets[0])
        return await self.auth.authenticate(head.get("authorization"))

    async def accept(self, head: RequestHead, transport: asyncio.Transport, buffered: bytes) -> None:
        """The front protocol's upgrade handler: refusals raise (the front protocol answers them, RFC 7807)."""
        extra_headers: dict[str, str] = {}
        if "jmap" in head.tokens("sec-websocket-protocol"):
            # RFC 8887 §3: the client offers "jmap"; the server echoes it.
            extra_headers["Sec-WebSocket-Protocol"] = "jmap"
        elif self.settings.require_subprotocol:
            self.metrics.upgrades.labels("no_subprotocol").inc()
            raise HTTPProblem(400, 'The WebSocket subprotocol "jmap" must be offered (RFC 8887 §3).')
        try:
            principal = await self._upgrade_auth(head)
        except (Unauthorized, Forbidden, Unavailable):
            self.metrics.upgrades.labels("unauthorized").inc()
            raise
        try:
            self.counts.admit(principal.username, self.settings.max_connections_per_user)
        except HTTPProblem:
            self.metrics.upgrades.labels("too_many").inc()
            raise
        if transport.is_closing():
            return
        deflate = None
        if self.settings.deflate:
            agreed = negotiate(head.get_all("sec-websocket-extensions"))
            if agreed is not None:
                deflate, extra_headers["Sec-WebSocket-Extensions"] = agreed
        conn = WsConnection(self, principal, deflate)
        accepted = hand_off(transport, buffered, conn, extra_headers, self.settings.message_limit, self._picows_log)
        self.metrics.upgrades.labels("ok" if accepted else "invalid").inc()

    def new_session(self, principal: Principal, deflate: bool) -> Session:
        now = self.now()
        expires_at = None
        if principal.expires_at is not None:
            # A wall-clock expiry (a JWT's exp) on the loop's clock, which the session runs on.
            expires_at = now + max(0.0, principal.expires_at - time.time())
        return self._session_class(
            self.limits, self.request_path.capabilities_for(principal),
            self.coalesce.Coalescer(self.settings.message_limit, deflate), now=now, expires_at=expires_at,
            inflate=self.compression.inflate if deflate else None, utf8_valid=self.coalesce.utf8_valid)

    def opened(self, conn: WsConnection) -> None:
        self.connections.add(conn)
        self.on_open()
        self.counts.opened(conn.principal.username)
        self.metrics.connections.inc()

    def closed(self, conn: WsConnection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.counts.closed(conn.principal.username)
        self.metrics.connections.dec()

    def connections_of(self, username: str) -> int:
        return self.counts.of(username)

    # --- requests and push ---------------------------------------------------------------------------------

    def run(self, conn: WsConnection, action: Run) -> None:
        task = self.loop.create_task(self._run(conn, action))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _run(self, conn: WsConnection, action: Run) -> None:
        result: Any
        try:
            result = await self.request_path.call(conn.principal, action.request)
        except GatewayError as exc:
            result = exc
        except Exception as exc:
            log.exception("request path failed for %s", conn.principal.username,
                          extra={"username": conn.principal.username})
            result = exc  # answered as serverFail
        conn.finish(action.request_id, result)

    def enable_push(self, conn: WsConnection, data_types: frozenset[str] | None, push_state: str | None) -> None:
        # Subscribed at once (no event from here on is missed, and an account-list change takes effect before the
        # next event); reading states and pushing what a resume missed may need I/O.
        sub = self.hub.subscribe(conn.target, conn.principal, data_types)
        rest = self.hub.resume(sub, push_state, lambda: not conn.closing)
        if rest is not None:
            self.track(self.loop.create_task(rest))

    def refresh(self, conn: WsConnection, principal: Principal) -> None:
        """The socket's principal changed (front mode's recheck, a delegation): its push subscription follows the
        new account list."""
        changed = principal.account_ids != conn.principal.account_ids
        conn.principal = principal
        if changed:
            sub = self.hub.subscription(conn.target)
            if sub is not None:
                self.enable_push(conn, sub.data_types, None)

    def refresh_user(self, username: str, principal_of: Callable[[str, float | None], Principal]) -> None:
        for conn in [c for c in self.connections if c.principal.username == username]:
            self.refresh(conn, principal_of(username, conn.principal.expires_at))

    # --- shutdown ------------------------------------------------------------------------------------------

    async def shutdown(self, grace: float) -> tuple[int, int, int]:
        """Finish in-flight requests (up to `grace` seconds), then close every socket with 1001 (RFC 6455
        §7.4.1). Returns (requests finished, requests cancelled, sockets closed)."""
        deadline = time.monotonic() + grace
        pending = len(self._requests)
        while self._requests and time.monotonic() < deadline:
            await asyncio.wait(list(self._requests), timeout=max(0.0, deadline - time.monotonic()))
        cancelled = len(self._requests)
        finished = pending - cancelled
        closed = len(self.connections)
        for conn in list(self.connections):
            conn.close(1001, "server shutting down")
        close_deadline = time.monotonic() + CLOSE_LINGER
        while self.connections and time.monotonic() < close_deadline:
            await asyncio.sleep(0.01)  # bounded: sockets report their disconnect through picows callbacks
        for task in [*self._requests, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._requests, *self._tasks, return_exceptions=True)
        if self._wheel is not None:
            self._wheel.close()
        return finished, cancelled, closed
