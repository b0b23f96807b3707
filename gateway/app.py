"""The composition root: builds every part of one gateway process from its Settings and wires them together.

Data flows one way: socket -> front protocol -> WsConnection -> Session -> request path; and bus -> hub ->
broadcast -> sockets. The role (gateway.roles) decides which request path and authentication are plugged in.
Nothing here is a module-level singleton; tests build as many gateways as they like.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily

from gateway import native, roles
from gateway.admission import UserCounts, UserLimiter
from gateway.bus.base import Bus
from gateway.config import Settings
from gateway.deflate import Compression
from gateway.directory import Directory
from gateway.errors import ListenError
from gateway.fanout.hub import Hub
from gateway.gcpolicy import PAUSE_BOUNDS, GcPolicy
from gateway.logs import ClientMistakes, PicowsLog
from gateway.metrics import Metrics, counter, counters, gauge, histogram
from gateway.session import Session
from gateway.transport import ingest
from gateway.transport.front import FrontProtocol, RequestHead, UpgradeHandler
from gateway.transport.http import HttpServices, build_app, connection_factory
from gateway.transport.ingest import IngestService, is_ingest
from gateway.transport.sse import EVENT_SOURCE_PATHS, EventSourceService
from gateway.transport.ws import UpgradeAuth, WebSocketService, WsConnection
from gateway.upstream.base import RequestPath, SessionContext

log = logging.getLogger(__name__)
WS_PATHS = frozenset({"/jmap/ws"})


class Drained(NamedTuple):
    """What `Gateway.stop()` drained: the figures of the final `stopped` log line."""

    requests_finished: int  # in flight when the stop began, and finished within the grace period
    requests_cancelled: int  # still running when the grace period ended
    sockets_closed: int  # WebSockets closed with 1001 and event streams ended


def make_bus(settings: Settings, node_id: str) -> Bus:
    if settings.upstream_url and settings.upstream_events == "eventsource":
        from gateway.bus.eventsource import UpstreamEventStreams  # front mode: the upstream's own event streams

        return UpstreamEventStreams(settings, roles.upstream_stream)
    if settings.bus == "amqp":
        from gateway.bus.amqp import AmqpBus  # imported only when used

        return AmqpBus(settings, node_id)
    from gateway.bus.memory import MemoryBus

    return MemoryBus()


class Gateway:
    def __init__(self, settings: Settings, *, request_path: RequestPath | None = None, bus: Bus | None = None,
                 directory: Directory | None = None, node_id: str | None = None,
                 session_class: type[Session] = Session, upgrade_auth: UpgradeAuth | None = None) -> None:
        """`request_path` replaces the embedded backend (tests: CoreOnly); `session_class` and `upgrade_auth`
        replace the JMAP session and the upgrade's authentication (the echo tool)."""
        self.settings = settings
        self.node_id = node_id or uuid.uuid4().hex
        self.metrics = Metrics()
        self.bus = bus or make_bus(settings, self.node_id)
        if settings.upstream_url and request_path is None:
            role = roles.front(settings)
        else:
            role = roles.all_in_one(settings, self.bus, directory or Directory(settings.users), request_path)
        self.role = role
        self.request_path, self.auth, self.directory = role.request_path, role.auth, role.directory
        self.coalesce = native.load("_coalesce")
        self.broadcast = native.load("_broadcast")
        self.deflate = native.load("_deflate")
        # RFC 7692 with no context takeover both ways: one compressor and one inflater serve the whole process,
        # and one compressed payload serves every recipient of a fan-out (DESIGN.md §3).
        self.compression = Compression(self.deflate, level=settings.deflate_level,
                                       min_bytes=settings.deflate_min_bytes, max_size=settings.message_limit)
        self.hub = Hub(self.bus, self.request_path.current_states, self.broadcast,
                       coalesce_ms=settings.push_coalesce_ms, compress=self.compression.compress)
        # Clients' mistakes are logged once per kind and minute at INFO, never at ERROR (gateway.logs).
        self.client_mistakes = ClientMistakes(logging.getLogger("gateway.clients"))
        counts = UserCounts()  # GATEWAY_MAX_CONNECTIONS_PER_USER counts WebSockets and event streams together
        self.websockets = WebSocketService(settings, self.auth, self.request_path, self.hub, self.compression,
                                           self.coalesce, self.broadcast, self.metrics, session_class=session_class,
                                           upgrade_auth=upgrade_auth, counts=counts,
                                           picows_log=PicowsLog(logging.getLogger("picows.server"),
                                                                self.client_mistakes))
        self.eventsource = EventSourceService(settings, self.auth, self.hub, self.broadcast, self.metrics, counts,
                                              lambda: self.websockets.wheel)
        # The first request of a connection that streams events (NDJSON) is read without aiohttp.
        self.ingest = IngestService(self.bus, settings.admin_token, settings.max_size_request, self.client_mistakes,
                                    lambda route, status: self.metrics.http_requests.labels(route, str(status)).inc())
        self.gc = GcPolicy(settings.gc_freeze_after,
                           lambda: len(self.websockets.connections) + len(self.eventsource.connections))
        self.websockets.on_open = self.eventsource.on_open = self.gc.check
        role.attach(self.websockets)
        self.http = HttpServices(settings, self.auth, self.request_path, UserLimiter(settings.max_concurrent_requests),
                                 self.bus, role.delegations, self.metrics, self.readiness, self.context,
                                 event_source=self.eventsource.accept)
        self.metrics.add_callback(self._collect)
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None
        self.port: int = settings.port

    @property
    def connections(self) -> set[WsConnection]:
        return self.websockets.connections

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.request_path.start()
        await self.bus.start(self.hub.on_events, self.hub.on_gap)
        self.websockets.start()
        self._runner = web.AppRunner(build_app(self.http), access_log=None, handle_signals=False)
        await self._runner.setup()
        assert self._runner.server is not None
        http_factory = connection_factory(self._runner.server, self.settings, self.client_mistakes)
        try:
            self._server = await loop.create_server(
                lambda: FrontProtocol(self.route, http_factory, self.websockets.track, self.settings.max_head_bytes),
                self.settings.host, self.settings.port, reuse_port=self.settings.workers > 1, backlog=4096)
        except OSError as exc:
            raise ListenError("HTTP/WebSocket", self.settings.host, self.settings.port, "GATEWAY_HOST",
                              "GATEWAY_PORT", "0 = any free port", exc) from None
        self.port = self._server.sockets[0].getsockname()[1]
        self.gc.start()
        log.info("listening on %s:%d (role: %s, coalescer: %s, broadcast: %s, ingest: %s, bus: %s, node %s)",
                 self.settings.host, self.port, self.role.name, impl_name(self.coalesce), impl_name(self.broadcast),
                 impl_name(ingest.impl), self.settings.bus, self.node_id)

    async def stop(self, grace: float | None = None) -> Drained:
        """Stop accepting, finish in-flight requests, close every socket with 1001 (RFC 6455 §7.4.1), then the
        bus and the request path."""
        if self._server is not None:
            self._server.close()
        self.gc.stop()
        streams = self.eventsource.close_all()
        self.ingest.close_all()  # an injector's stream is a request in flight: it learns what was published
        finished, cancelled, closed = await self.websockets.shutdown(
            self.settings.shutdown_grace if grace is None else grace)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.hub.close()
        await self.bus.stop()
        await self.request_path.stop()
        return Drained(finished, cancelled, closed + streams)

    def route(self, head: RequestHead) -> UpgradeHandler | None:
        """Who takes a connection over after its request head; None: the HTTP surface answers."""
        if head.is_websocket_upgrade:
            return self.websockets.accept if head.path in WS_PATHS else None
        if head.path in EVENT_SOURCE_PATHS:
            return self.eventsource.accept
        return self.ingest.accept if is_ingest(head) else None

    def readiness(self) -> dict[str, bool]:
        return {"bus": self.bus.ready, "listening": self._server is not None and self._server.is_serving()}

    def context(self) -> SessionContext:
        """Where clients reach this gateway (the bound port once started), for Session objects."""
        base = self.settings.base_url(self.port)
        ws_base = "wss" + base[5:] if base.startswith("https") else "ws" + base[4:]
        return SessionContext(base, f"{ws_base}/jmap/ws", self.settings)

    # --- metrics read at scrape time -----------------------------------------------------------------------

    def _collect(self) -> Iterator[Any]:
        stats = self.hub.stats
        yield counter("gateway_events_received", "Events taken from the bus", stats.events)
        yield counter("gateway_pushes_delivered", "StateChange frames written to sockets", stats.pushes)
        yield counter("gateway_slow_client_merges", "StateChanges merged for paused sockets", stats.merged)
        yield gauge("gateway_push_subscriptions", "Push-enabled sessions", self.hub.subscriptions)
        yield histogram("gateway_fanout_seconds", "A bus batch in to its last write (one batch: one loop turn)",
                        self.broadcast.FANOUT_BOUNDS, stats.fanout_counts, stats.fanout_sum)
        yield gauge("gateway_gc_frozen_objects", "Objects frozen out of full collections (GATEWAY_GC_FREEZE_AFTER)",
                    self.gc.frozen)
        yield counter("gateway_gc_freezes", "Times long-lived objects were frozen", self.gc.freezes)
        yield counter("gateway_gc_full_collections", "Full (generation 2) garbage collections",
                      self.gc.full_collections)
        yield histogram("gateway_gc_pause_seconds", "Garbage collections, each a pause of the event loop", PAUSE_BOUNDS,
                        self.gc.pause_counts, self.gc.pause_sum)
        impl = GaugeMetricFamily("gateway_native_module", "1 when the compiled module runs, 0 for the Python twin",
                                 labels=["module"])
        for name, module in (("coalesce", self.coalesce), ("broadcast", self.broadcast), ("deflate", self.deflate)):
            impl.add_metric([name], 1.0 if native.is_native(module) else 0.0)
        yield impl
        yield from counters("gateway_bus_", self.bus.counters())
        yield from counters("gateway_", self.request_path.counters())


def impl_name(module: Any) -> str:
    return "native" if native.is_native(module) else "python"
