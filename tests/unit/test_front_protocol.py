"""The front protocol as logic: request heads parsed, upgrades routed to the handler, everything else to the
HTTP protocol, refusals written as problem responses. The transport is a recording stand-in (no sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.errors import HTTPProblem, Unauthorized
from gateway.transport.front import MAX_HEAD, FrontProtocol, RequestHead

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's sample key: base64 of 16 bytes
UPGRADE = (b"GET /jmap/ws?ticket=t1&x=2 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: " + KEY.encode() + b"\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Protocol: chat, JMAP\r\nSec-WebSocket-Protocol: other\r\n\r\n")
# What picows is given instead of the client's head (gateway.transport.front: no credentials, no extra headers).
CANONICAL = (b"GET /jmap/ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + KEY.encode()
             + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = self.paused = self.eof = False
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def resume_reading(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol


class Http(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


def test_a_head_is_parsed() -> None:
    head = RequestHead(UPGRADE)
    assert (head.method, head.path, head.version) == ("GET", "/jmap/ws", "HTTP/1.1")
    assert head.query == {"ticket": ["t1"], "x": ["2"]} and head.get("host") == "gw"
    assert head.tokens("sec-websocket-protocol") == ["chat", "jmap", "other"]
    assert head.is_websocket_upgrade and head.get("nope") is None


@pytest.mark.parametrize("raw", [b"GET /\r\n\r\n", b"GET / HTTP/2\r\n\r\n", b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
                                 b"GET / HTTP/1.1\r\n Host : x\r\n\r\n"])
def test_malformed_heads_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError):
        RequestHead(raw)


async def front(on_upgrade: Any) -> tuple[FrontProtocol, Transport, list[Http], list[asyncio.Task[Any]]]:
    made: list[Http] = []
    tasks: list[asyncio.Task[Any]] = []

    def http() -> Http:
        made.append(Http())
        return made[-1]

    def route(head: RequestHead) -> Any:
        return on_upgrade if head.is_websocket_upgrade and head.path == "/jmap/ws" else None

    proto = FrontProtocol(route, http, tasks.append)
    transport = Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return proto, transport, made, tasks


async def test_an_upgrade_goes_to_the_handler_with_everything_read() -> None:
    seen: list[tuple[str, bytes]] = []

    async def on_upgrade(head: RequestHead, transport: Any, buffered: bytes) -> None:
        seen.append((head.path, buffered))

    proto, transport, made, tasks = await front(on_upgrade)
    proto.data_received(UPGRADE[:20])
    proto.data_received(UPGRADE[20:] + b"\x81\x00")  # a frame right behind the head is kept for picows
    proto.data_received(b"more")
    await asyncio.gather(*tasks)
    assert transport.paused and not made
    assert seen == [("/jmap/ws", CANONICAL + b"\x81\x00more")]
    proto.connection_lost(None)


async def test_other_requests_go_to_http_with_their_bytes() -> None:
    proto, transport, made, _ = await front(None)
    proto.data_received(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\nnext")
    assert transport.protocol is made[0] and made[0].data == b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\nnext"


async def test_a_refused_upgrade_gets_its_problem_response() -> None:
    async def on_upgrade(head: RequestHead, transport: Any, buffered: bytes) -> None:
        raise Unauthorized("no", 'Basic realm="jmap"')

    proto, transport, _, tasks = await front(on_upgrade)
    proto.data_received(UPGRADE)
    await asyncio.gather(*tasks)
    assert transport.written.startswith(b"HTTP/1.1 401 Unauthorized\r\n") and transport.eof  # then a lingering close
    assert b'WWW-Authenticate: Basic realm="jmap"' in transport.written


async def test_a_crashing_upgrade_is_a_500_not_a_hang() -> None:
    async def on_upgrade(head: RequestHead, transport: Any, buffered: bytes) -> None:
        raise RuntimeError("bug")

    proto, transport, _, tasks = await front(on_upgrade)
    proto.data_received(UPGRADE)
    await asyncio.gather(*tasks)
    assert transport.written.startswith(b"HTTP/1.1 500 ") and transport.eof


async def test_heads_too_large_or_malformed_are_refused() -> None:
    proto, transport, _, _ = await front(None)
    proto.data_received(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD)
    assert transport.written.startswith(b"HTTP/1.1 431 ") and transport.eof
    proto, transport, _, _ = await front(None)
    proto.data_received(b"BROKEN\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 400 ") and transport.eof
    assert HTTPProblem(400, "x").status == 400
