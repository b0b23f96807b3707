"""The composition root: builds every part of one gateway process from its Settings and wires them together.

Data flows one way: socket -> front protocol -> Connection -> JmapSession -> request path; and bus -> hub ->
broadcast -> sockets. Nothing here is a module-level singleton; tests build as many gateways as they like.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from aiohttp import web
from picows import WSAutoPingStrategy, WSUpgradeResponse, WSUpgradeResponseWithListener
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # public class, absent from the stub
from prometheus_client.core import GaugeMetricFamily

from gateway import native
from gateway.auth import Authenticator
from gateway.bus.base import Bus
from gateway.bus.events import StateChangeEvent
from gateway.bus.memory import MemoryBus
from gateway.config import Settings
from gateway.deflate import negotiate
from gateway.directory import Directory, Principal
from gateway.errors import Close, HTTPProblem, ProtocolViolation, RequestLevelError
from gateway.fanout.hub import Hub
from gateway.jmap.types import CORE, WEBSOCKET
from gateway.logs import ClientMistakes, PicowsLog
from gateway.metrics import Metrics, counter, gauge
from gateway.session import EnablePush, Run
from gateway.transport.front import FrontProtocol, RequestHead
from gateway.transport.http import build_app, connection_factory
from gateway.transport.timers import TimerWheel
from gateway.transport.ws import Connection
from gateway.upstream.auth import FrontAuthenticator, Rechecker
from gateway.upstream.base import RequestPath
from gateway.upstream.proxy import AnyCapability, ProxyRequestPath

log = logging.getLogger(__name__)
SERVER_FAIL = "urn:ietf:params:jmap:error:serverFail"
# picows' smallest read buffer (it grows by doubling for larger messages): idle connections dominate memory.
READ_BUFFER_INIT = 2048


class Gateway:
    connection_class: type[Connection] = Connection  # the echo tool swaps in a listener without JMAP
    def __init__(self, settings: Settings, *, request_path: RequestPath | None = None, bus: Bus | None = None,
                 directory: Directory | None = None, node_id: str | None = None) -> None:
        self.settings = settings
        self.node_id = node_id or uuid.uuid4().hex
        self.directory = directory or Directory(settings.users)
        self.metrics = Metrics()
        self.auth = Authenticator(settings, self.directory)
        self.bus: Bus = bus or self._make_bus()
        # Front role (DESIGN.md §1): an upstream JMAP server answers requests and validates credentials.
        self.front: ProxyRequestPath | None = None
        if request_path is None and settings.upstream_url:
            request_path = self.front = self._make_front()
        # All-in-one role (DESIGN.md §1): the embedded mail backend answers requests and publishes its changes.
        self.request_path: RequestPath = request_path or self._make_backend()
        self._smtp: Any = None
        self.coalesce = native.load("_coalesce", native=True)
        self.broadcast = native.load("_broadcast", native=True)
        self.deflate = native.load("_deflate", native=True)
        # RFC 7692 with no context takeover both ways: one compressor and one inflater serve the whole process,
        # and one compressed payload serves every recipient of a fan-out (DESIGN.md §3).
        self._compressor = self.deflate.Compressor(settings.deflate_level, 15)
        self._inflater = self.deflate.Inflater(15)
        self.hub = Hub(self.bus, self.request_path.current_states, self.broadcast,
                       coalesce_ms=settings.push_coalesce_ms, compress=self._compress)
        self.hub.stats.fanout_seconds = self.metrics.fanout.observe
        self.supported_capabilities: Collection[str] = frozenset({CORE, WEBSOCKET, *self.request_path.capabilities})
        if self.front is not None:
            # What a request may use depends on the user's upstream session: the proxy path checks it.
            self.supported_capabilities = AnyCapability()
        self.connections: set[Connection] = set()
        self._per_user: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._wheel: TimerWheel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ws_paths = frozenset({"/jmap/ws"})
        # Clients' mistakes are logged once per kind and minute at INFO, never at ERROR (gateway.logs).
        self.client_mistakes = ClientMistakes(logging.getLogger("gateway.clients"))
        self._picows_log = PicowsLog(logging.getLogger("picows.server"), self.client_mistakes)
        self.port: int = settings.port
        if self.front is None:
            self.directory.add_listener(self._on_delegation)
        else:
            self.metrics.add_callback(self.front.collect)
        self.metrics.add_callback(self._collect)

    def _make_bus(self) -> Bus:
        if self.settings.bus == "amqp":
            from gateway.bus.amqp import AmqpBus  # imported only when used

            return AmqpBus(self.settings, self.node_id)
        return MemoryBus()

    def _make_front(self) -> ProxyRequestPath:
        front = ProxyRequestPath(self.settings)
        self.auth = FrontAuthenticator(self.settings, self.directory, front)
        if self.settings.auth_recheck > 0:
            rechecker = Rechecker(self.auth, front, self.settings.auth_recheck, lambda: self.connections,
                                  self._principal_refreshed)
            front.add_background(rechecker.run)
        return front

    def _principal_refreshed(self, conn: Connection, principal: Principal) -> None:
        # Front mode's recheck: the upstream may have granted or taken away delegated accounts meanwhile; the push
        # subscription follows the new account list, as for a local delegation change.
        changed = principal.account_ids != conn.principal.account_ids
        conn.principal = principal
        if changed:
            sub = self.hub.subscription(conn.target)
            if sub is not None:
                self.enable_push(conn, EnablePush(sub.data_types, None))

    def _make_backend(self) -> RequestPath:
        from gateway.backend.service import EmbeddedBackend

        return EmbeddedBackend(self.settings, self.directory, self._publish)

    async def _publish(self, events: Sequence[StateChangeEvent]) -> None:
        await self.bus.publish(events)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wheel = TimerWheel(self._loop)
        await self.request_path.start()
        await self.bus.start(self.hub.on_events, self.hub.on_gap)
        if self.settings.smtp_port and hasattr(self.request_path, "deliver"):
            from gateway.backend.smtp import SmtpListener

            self._smtp = SmtpListener(self.request_path, self.directory,  # type: ignore[arg-type]
                                      self.settings.smtp_host, self.settings.smtp_port)
            await self._smtp.start()
        self._runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
        await self._runner.setup()
        assert self._runner.server is not None
        http_factory = connection_factory(self._runner.server, self.settings, self.client_mistakes)
        self._server = await self._loop.create_server(
            lambda: FrontProtocol(self._ws_paths, self._accept_websocket, http_factory, self._track,
                                  self.settings.max_head_bytes),
            self.settings.host, self.settings.port, reuse_port=self.settings.workers > 1, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening on %s:%d (coalescer: %s, broadcast: %s, bus: %s, node %s)", self.settings.host,
                 self.port, self.impl_name(self.coalesce), self.impl_name(self.broadcast), self.settings.bus,
                 self.node_id)

    @staticmethod
    def impl_name(module: Any) -> str:
        return "native" if native.is_native(module) else "python"

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, finish in-flight requests, close every socket with 1001 (RFC 6455 §7.4.1)."""
        grace = self.settings.shutdown_grace if grace is None else grace
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        for conn in list(self.connections):
            conn.close(Close.GOING_AWAY, "server shutting down")
        close_deadline = time.monotonic() + 2.0
        while self.connections and time.monotonic() < close_deadline:
            await asyncio.sleep(0.01)  # bounded: sockets report their disconnect through picows callbacks
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._smtp is not None:
            await self._smtp.stop()
        await self.bus.stop()
        await self.request_path.stop()
        if self._wheel is not None:
            self._wheel.close()

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def readiness(self) -> dict[str, bool]:
        return {"bus": self.bus.ready, "listening": self._server is not None and self._server.is_serving()}

    # --- the upgrade ---------------------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None, *, fresh: bool = False) -> Principal:
        """The principal of an Authorization header value, for the upgrade and every HTTP call.

        An awaitable on purpose: front mode validates credentials against the upstream (I/O); `fresh` skips its
        cache of upstream sessions."""
        if isinstance(self.auth, FrontAuthenticator):
            return await self.auth.check(authorization, fresh=fresh)
        return self.auth.authenticate(authorization)

    async def _authenticate_upgrade(self, head: RequestHead) -> Principal:
        tickets = head.query.get("ticket")
        if tickets:
            return self.auth.redeem_ticket(tickets[0])
        return await self.authenticate(head.get("authorization"))

    async def _accept_websocket(self, head: RequestHead, transport: asyncio.Transport, buffered: bytes) -> None:
        extra_headers: dict[str, str] = {}
        offered = head.tokens("sec-websocket-protocol")
        if "jmap" in offered:
            # RFC 8887 §3: the client offers "jmap"; the server echoes it.
            extra_headers["Sec-WebSocket-Protocol"] = "jmap"
        elif self.settings.require_subprotocol:
            self.metrics.upgrades.labels("no_subprotocol").inc()
            raise HTTPProblem(400, 'The WebSocket subprotocol "jmap" must be offered (RFC 8887 §3).')
        try:
            principal = await self._authenticate_upgrade(head)
        except HTTPProblem:
            self.metrics.upgrades.labels("unauthorized").inc()
            raise
        count = self._per_user.get(principal.username, 0)
        if count >= self.settings.max_connections_per_user:
            self.metrics.upgrades.labels("too_many").inc()
            raise HTTPProblem(429, f"{principal.username} already has {count} connections on this server.",
                              headers={"Retry-After": "10"})
        if transport.is_closing():
            return
        deflate = None
        if self.settings.deflate:
            agreed = negotiate(head.get_all("sec-websocket-extensions"))
            if agreed is not None:
                deflate, extra_headers["Sec-WebSocket-Extensions"] = agreed
        conn = self.connection_class(self, principal, deflate)
        response = WSUpgradeResponse.create_101_response(extra_headers=extra_headers)
        protocol = WSProtocol(
            None, None, False, lambda _request: WSUpgradeResponseWithListener(response, conn), self._picows_log,
            True, None, False, 20, 20, WSAutoPingStrategy.PING_WHEN_IDLE, True, self.settings.message_limit, None,
            READ_BUFFER_INIT)
        # Hand the connection over: picows replays the head, validates the upgrade and answers 101.
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data = memoryview(buffered)
        while data:
            buf = protocol.get_buffer(len(data))
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            protocol.buffer_updated(n)
            data = data[n:]
        transport.resume_reading()
        self.metrics.upgrades.labels("ok" if protocol.listener is conn else "invalid").inc()

    def connection_opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        name = conn.principal.username
        self._per_user[name] = self._per_user.get(name, 0) + 1
        self.metrics.connections.inc()

    def connection_closed(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        name = conn.principal.username
        n = self._per_user.get(name, 1) - 1
        if n <= 0:
            self._per_user.pop(name, None)
        else:
            self._per_user[name] = n
        self.metrics.connections.dec()

    # --- requests and push ---------------------------------------------------------------------------------

    def run_request(self, conn: Connection, action: Run) -> None:
        task = self.loop.create_task(self._run(conn, action))
        self._track(task)

    async def _run(self, conn: Connection, action: Run) -> None:
        result: Any
        try:
            result = await self.request_path.call(conn.principal, action.request)
        except RequestLevelError as exc:
            result = exc
        except Exception:
            log.exception("request path failed for %s", conn.principal.username)
            result = RequestLevelError(SERVER_FAIL, "The server failed to process the request.", status=500)
        if isinstance(result, RequestLevelError):
            self.metrics.request_errors.labels(result.type_uri.rsplit(":", 1)[-1]).inc()
            self.metrics.message_out("RequestError")
        else:
            self.metrics.message_out("Response")
        conn.finish(action.request_id, result)

    def enable_push(self, conn: Connection, action: EnablePush) -> None:
        task = self.loop.create_task(self.hub.enable(conn.target, conn.principal, action.data_types,
                                                     action.push_state, lambda: not conn.closing))
        self._track(task)

    def send_message(self, conn: Connection, payload: bytes) -> None:
        self.hub.send_one(conn.target, payload)

    def _compress(self, payload: memoryview) -> bytes | None:
        """Compressed bytes of one outgoing message, or None to send it plain (small messages)."""
        if len(payload) < self.settings.deflate_min_bytes:
            return None
        return bytes(self._compressor.compress(payload))

    def inflate(self, conn: Connection, payload: bytes) -> bytes | None:
        """Inflate a message whose first frame had rsv1 (RFC 7692 §7.2.2); close the socket when it is bad."""
        try:
            # The size limit applies to the inflated message and is enforced while inflating (no bomb).
            data: bytes = self._inflater.inflate(payload, self.settings.message_limit)
        except ProtocolViolation as exc:
            conn.close(exc.code, exc.reason)
            return None
        if conn.coalescer.opcode == 1 and not self.coalesce.utf8_valid(data):
            conn.close(Close.INVALID_TEXT, "invalid UTF-8 in a text message")
            return None
        return data

    def _on_delegation(self, owner: str, delegate: str, granted: bool) -> None:
        # Live update: the delegate's open sockets see the new account list; push subscriptions follow it.
        for conn in [c for c in self.connections if c.principal.username == delegate]:
            conn.principal = self.directory.principal(delegate, conn.principal.expires_at)
            sub = self.hub.subscription(conn.target)
            if sub is not None:
                self.enable_push(conn, EnablePush(sub.data_types, None))

    # --- keepalive and slow clients (one timer wheel) ------------------------------------------------------

    def schedule_keepalive(self, conn: Connection) -> None:
        interval = self.settings.ping_interval
        if interval > 0 and self._wheel is not None:
            self._wheel.call_at(conn.last_seen + interval, lambda now: self._keepalive(conn, now))

    def _keepalive(self, conn: Connection, now: float) -> None:
        if conn.closing or self._wheel is None:
            return
        interval, timeout = self.settings.ping_interval, self.settings.ping_timeout
        if conn.pinged_at:
            if conn.last_seen > conn.pinged_at:
                conn.pinged_at = 0.0  # any frame since the ping proves the peer is alive
            elif now >= conn.pinged_at + timeout:
                conn.close(Close.GOING_AWAY, "no pong within the ping timeout")
                return
            else:
                self._wheel.call_at(conn.pinged_at + timeout, lambda t: self._keepalive(conn, t))
                return
        if now - conn.last_seen >= interval:
            assert conn.transport is not None
            conn.transport.send_ping(b"gw")
            conn.pinged_at = now
            self._wheel.call_at(now + timeout, lambda t: self._keepalive(conn, t))
        else:
            self._wheel.call_at(conn.last_seen + interval, lambda t: self._keepalive(conn, t))

    def schedule_slow_check(self, conn: Connection) -> None:
        if self._wheel is not None:
            since = conn.paused_since
            self._wheel.call_at(since + self.settings.slow_client_timeout,
                                lambda now: self._slow_check(conn, since, now))

    def _slow_check(self, conn: Connection, since: float, now: float) -> None:
        if conn.closing or not conn.target.paused or conn.paused_since != since:
            return
        self.metrics.slow_closes.inc()
        conn.close(Close.TRY_AGAIN_LATER, "the client does not read")
        assert conn.transport is not None
        conn.transport.underlying_transport.abort()

    # --- session resource (RFC 8620 §2) --------------------------------------------------------------------

    def session_resource(self, principal: Principal) -> dict[str, Any]:
        s = self.settings
        base = s.base_url(self.port)
        ws_base = "wss" + base[5:] if base.startswith("https") else "ws" + base[4:]
        if self.front is not None:
            return self.front.session_resource(principal, base, f"{ws_base}/jmap/ws")
        capabilities: dict[str, Any] = {
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
            # RFC 8887 §4.1
            WEBSOCKET: {"url": f"{ws_base}/jmap/ws", "supportsPush": True},
        }
        capabilities.update(self.request_path.capabilities)
        accounts: dict[str, Any] = {}
        primary: dict[str, str] = {}
        for account in principal.accounts:
            account_caps = dict(self.request_path.account_capabilities(account))
            accounts[account.id] = {"name": account.name, "isPersonal": account.is_personal,
                                    "isReadOnly": False, "accountCapabilities": account_caps}
            if account.is_personal:
                for cap in account_caps:
                    primary[cap] = account.id
        return {
            "capabilities": capabilities,
            "accounts": accounts,
            "primaryAccounts": primary,
            "username": principal.username,
            "apiUrl": f"{base}/jmap/api",
            "downloadUrl": f"{base}/jmap/download/{{accountId}}/{{blobId}}/{{name}}?type={{type}}",
            "uploadUrl": f"{base}/jmap/upload/{{accountId}}/",
            "eventSourceUrl": f"{base}/jmap/eventsource/?types={{types}}&closeafter={{closeafter}}&ping={{ping}}",
            "state": self.request_path.session_state(principal),
        }

    # --- metrics read at scrape time -----------------------------------------------------------------------

    def _collect(self) -> Iterator[Any]:
        stats = self.hub.stats
        yield counter("gateway_events_received", "Events taken from the bus", stats.events)
        yield counter("gateway_pushes_delivered", "StateChange frames written to sockets", stats.pushes)
        yield counter("gateway_slow_client_merges", "StateChanges merged for paused sockets", stats.merged)
        yield gauge("gateway_push_subscriptions", "Push-enabled sessions", self.hub.subscriptions)
        impl = GaugeMetricFamily("gateway_native_module", "1 when the compiled module runs, 0 for the Python twin",
                                 labels=["module"])
        for name, module in (("coalesce", self.coalesce), ("broadcast", self.broadcast), ("deflate", self.deflate)):
            impl.add_metric([name], 1.0 if native.is_native(module) else 0.0)
        yield impl
        for attr in ("received_events", "poison_messages", "published_events", "reconnects"):
            value = getattr(self.bus, attr, None)
            if isinstance(value, int):
                yield counter(f"gateway_bus_{attr}", f"Bus adapter counter {attr}", value)

