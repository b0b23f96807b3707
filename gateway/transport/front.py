"""The front protocol: reads the head of the first HTTP request on a connection, then hands the connection on.

A router picks who takes the connection over: a WebSocket upgrade of `/jmap/ws` is authenticated (asynchronously,
which picows' synchronous upgrade hook cannot do), then given to a picows `WSProtocol` that replays the head and
completes the handshake; an event stream (`/jmap/eventsource/`) to its own protocol. Every other request goes to
the aiohttp server protocol. Refusals of an upgrade (400/401/429/503) are
written here as RFC 7807 problem responses (gateway.errors.problem_response) before any WebSocket frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gateway.errors import GatewayError, HTTPProblem, problem_response

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0


class RequestHead:
    """The parsed head of one HTTP/1.1 request. Header names are lower-case; values keep their order."""

    __slots__ = ("headers", "method", "path", "query", "raw", "target", "version")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ValueError("malformed request line")
        self.method, self.target, self.version = parts
        split = urlsplit(self.target)
        self.path = split.path
        self.query = parse_qs(split.query)
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise ValueError("malformed header line")
            self.headers.append((name.lower(), value.strip()))

    def get(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    def tokens(self, name: str) -> list[str]:
        """Comma-separated tokens of every header `name`, lower-cased."""
        return [t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()]

    @property
    def is_websocket_upgrade(self) -> bool:
        return self.method == "GET" and "websocket" in self.tokens("upgrade")


UpgradeHandler = Callable[[RequestHead, asyncio.Transport, bytes], Awaitable[None]]
# Which handler takes a connection over after its head (a WebSocket upgrade, an event stream), or None for HTTP.
Router = Callable[[RequestHead], UpgradeHandler | None]
HttpFactory = Callable[[], asyncio.Protocol]


class FrontProtocol(asyncio.Protocol):
    """Routes one new connection, then gets out of the way (it is replaced with transport.set_protocol)."""

    def __init__(self, route: Router, http_factory: HttpFactory, track: Callable[[asyncio.Task[Any]], None]) -> None:
        self._route = route
        self._http_factory = http_factory
        self._track = track
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timeout: asyncio.TimerHandle | None = None
        self._routed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is a Transport in behaviour but not by inheritance, hence no isinstance check.
        tcp: asyncio.Transport = transport  # type: ignore[assignment]
        self._transport = tcp
        self._timeout = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, tcp.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timeout is not None:
            self._timeout.cancel()

    def data_received(self, data: bytes) -> None:
        if self._routed:
            self._buffer += data  # arrives while an upgrade is being authenticated; replayed afterwards
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._refuse(HTTPProblem(431, "The request head is too large."))
            return
        transport = self._transport
        assert transport is not None
        try:
            head = RequestHead(bytes(self._buffer[: end + 4]))
        except ValueError as exc:
            self._refuse(HTTPProblem(400, f"Malformed HTTP request: {exc}."))
            return
        if self._timeout is not None:
            self._timeout.cancel()
        self._routed = True
        handler = self._route(head)
        if handler is not None:
            transport.pause_reading()
            task = asyncio.get_running_loop().create_task(self._take_over(head, handler))
            self._track(task)
            return
        proto = self._http_factory()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        proto.data_received(bytes(self._buffer))
        self._buffer = bytearray()

    async def _take_over(self, head: RequestHead, handler: UpgradeHandler) -> None:
        transport = self._transport
        assert transport is not None
        try:
            await handler(head, transport, bytes(self._buffer))
            # The transport may keep a reference to this object after set_protocol; keep nothing alive with it.
            self._buffer = bytearray()
            self._transport = None
            return
        except GatewayError as exc:
            self._refuse(exc)
        except Exception as exc:
            log.exception("WebSocket upgrade failed")
            self._refuse(exc)

    def _refuse(self, error: BaseException) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(problem_response(error))
        transport.close()
