"""The front protocol: reads the head of the first HTTP request on a connection, then hands the connection on.

A router picks who takes the connection over: a WebSocket upgrade of `/jmap/ws` is authenticated (asynchronously,
which picows' synchronous upgrade hook cannot do), then given to a picows `WSProtocol` that replays the head and
completes the handshake; an event stream (`/jmap/eventsource/`) to its own protocol. Every other request goes to
the aiohttp server protocol. Refusals (400/401/426/429/431/503) are written here as RFC 7807 problem responses
(gateway.errors.problem_response) before any WebSocket frame.

Hostile heads end here: a head larger than GATEWAY_MAX_HEAD_BYTES gets 431 whether or not its end arrived in the
same read, and an upgrade is checked against RFC 6455 §4.2.1 before anything else sees it. picows is then given a
canonical head of its own (request line, Upgrade, Connection, key, version) instead of the client's: its fixed
16 KiB limit and its own checks no longer decide anything, and neither credentials nor tickets reach it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gateway.errors import GatewayError, HTTPProblem, problem_response

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # GATEWAY_MAX_HEAD_BYTES's default
HEAD_TIMEOUT = 10.0
LINGER = 2.0  # seconds a refused connection keeps reading (and dropping) what the client still sends
# RFC 7230 §3.2: field-name = token; field-value = VCHAR / obs-text / SP / HTAB (no other control characters).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The start of a request line: a method (a token, RFC 9110 §9.1) then a space. Anything else (a TLS hello, a
# binary protocol) is refused at its first bytes instead of waiting for a head that never comes.
_REQUEST_START = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}(?: |\Z)")


class RequestHead:
    """The parsed head of one HTTP/1.1 request. Header names are lower-case; values keep their order."""

    __slots__ = ("headers", "method", "path", "query", "raw", "target", "version")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ValueError("malformed request line")
        if parts[0] == "PRI":
            # RFC 9113 §3.4: HTTP/2's connection preface; aiohttp's parser would wait for the rest of it forever.
            raise ValueError("HTTP/2 with prior knowledge is not spoken here")
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

    def check_upgrade(self) -> None:
        """Raise the HTTPProblem for an upgrade that RFC 6455 §4.2.1 (or RFC 7230) says to refuse."""
        for name, value in self.headers:
            if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                raise HTTPProblem(400, "A header field has an invalid name or value (RFC 7230 §3.2).")
        # RFC 6455 §4.2.1 (1): an HTTP/1.1 or higher GET request.
        if self.version != "HTTP/1.1":
            raise HTTPProblem(400, "A WebSocket upgrade needs HTTP/1.1 (RFC 6455 §4.1).")
        # RFC 7230 §5.4: no Host, or more than one, is 400.
        if len(self.get_all("host")) != 1 or not self.get("host"):
            raise HTTPProblem(400, "The request needs exactly one Host header (RFC 7230 §5.4).")
        # RFC 6455 §4.2.1 (4).
        if "upgrade" not in self.tokens("connection"):
            raise HTTPProblem(400, 'A WebSocket upgrade needs "Connection: Upgrade" (RFC 6455 §4.2.1).')
        # RFC 6455 §4.2.1 (5): one key, base64 of 16 bytes.
        keys = self.get_all("sec-websocket-key")
        try:
            valid_key = len(keys) == 1 and len(base64.b64decode(keys[0].encode("ascii"), validate=True)) == 16
        except (UnicodeEncodeError, binascii.Error):
            valid_key = False
        if not valid_key:
            raise HTTPProblem(400, "Sec-WebSocket-Key must be one base64-encoded 16-byte value (RFC 6455 §4.2.1).")
        # RFC 6455 §4.2.1 (6) and §4.4: a version other than 13 gets 426 with the versions this server speaks.
        versions = self.get_all("sec-websocket-version")
        if not versions:
            raise HTTPProblem(400, "Sec-WebSocket-Version is missing (RFC 6455 §4.2.1).",
                              headers={"Sec-WebSocket-Version": "13"})
        if versions != ["13"]:
            raise HTTPProblem(426, "This server speaks WebSocket version 13 only (RFC 6455 §4.4).",
                              headers={"Sec-WebSocket-Version": "13", "Upgrade": "websocket"})
        # Whatever follows the head is read as frames: a request body would be taken for one.
        if self.get("transfer-encoding") is not None or any(v.strip("0") for v in self.get_all("content-length")):
            raise HTTPProblem(400, "A WebSocket upgrade has no body.")

    def canonical_upgrade(self) -> bytes:
        """The head picows is given for this (checked) upgrade: only what its handshake reads."""
        key = self.get("sec-websocket-key")
        return (f"GET {self.path} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode("latin-1")


UpgradeHandler = Callable[[RequestHead, asyncio.Transport, bytes], Awaitable[None]]
# Which handler takes a connection over after its head (a WebSocket upgrade, an event stream), or None for HTTP.
Router = Callable[[RequestHead], UpgradeHandler | None]
HttpFactory = Callable[[], asyncio.Protocol]


class FrontProtocol(asyncio.Protocol):
    """Routes one new connection, then gets out of the way (it is replaced with transport.set_protocol)."""

    def __init__(self, route: Router, http_factory: HttpFactory, track: Callable[[asyncio.Task[Any]], None],
                 max_head: int = MAX_HEAD) -> None:
        self._route = route
        self._max_head = max_head
        self._head_size = 0
        self._scanned = 0  # bytes of the buffer already searched for the end of the head
        self._discard = False
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
        if self._discard:
            return
        if self._routed:
            self._buffer += data  # arrives while an upgrade is being authenticated; replayed afterwards
            return
        self._buffer += data
        # Search only what is new (and the 3 bytes before it): a head trickled byte by byte stays linear.
        end = self._buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
        self._scanned = len(self._buffer)
        # The limit holds whether or not the end of the head came in this read (RFC 6585 §5).
        if (len(self._buffer) if end < 0 else end + 4) > self._max_head:
            self._routed = True
            self._refuse(HTTPProblem(431, f"The request head is larger than {self._max_head} bytes."))
            return
        if not _REQUEST_START.match(self._buffer, 0, 33):
            self._routed = True
            self._refuse(HTTPProblem(400, "This is not an HTTP/1.1 request."))
            return
        if end < 0:
            return
        transport = self._transport
        assert transport is not None
        try:
            head = RequestHead(bytes(self._buffer[: end + 4]))
        except ValueError as exc:
            self._routed = True
            self._refuse(HTTPProblem(400, f"Malformed HTTP request: {exc}."))
            return
        if self._timeout is not None:
            self._timeout.cancel()
        self._routed = True
        handler = self._route(head)
        if handler is not None:
            if head.is_websocket_upgrade:
                try:
                    head.check_upgrade()
                except HTTPProblem as problem:
                    self._refuse(problem)
                    return
            self._head_size = end + 4
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
            rest = bytes(self._buffer[self._head_size:])
            # picows replays a canonical head, then whatever the client sent after its own (early frames).
            await handler(head, transport, head.canonical_upgrade() + rest if head.is_websocket_upgrade else rest)
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
        self._buffer = bytearray()
        self._discard = True
        if transport is None or transport.is_closing():
            return
        transport.write(problem_response(error))
        # A lingering close (RFC 7230 §6.6): stop writing, then read and drop what the client still sends for a
        # moment. Closing with unread data makes the kernel answer with a reset, which can destroy the response
        # before the client has read it (a 431 sent while the rest of the head is still coming).
        if self._timeout is not None:
            self._timeout.cancel()
        if transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        self._timeout = asyncio.get_running_loop().call_later(LINGER, transport.close)

    def eof_received(self) -> bool | None:
        return None  # the client is done: close (after the response, if one is being written)
