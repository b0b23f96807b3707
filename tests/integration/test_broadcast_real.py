"""The broadcast loop over real sockets: a picows server on loopback, real `websockets` clients (with and
without permessage-deflate) and one raw TCP client, written to through the compiled loop and its Python twin.

Both implementations must put byte-identical frames on the wire, and the compiled one must take its C fast
path for real picows transports. The hub and the gateway's handshake are not involved here.
"""

from __future__ import annotations

import asyncio
import base64
import os
import zlib
from collections.abc import AsyncIterator
from typing import Any

import picows
import pytest
import websockets
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from gateway import native
from tests.native_impl import load_bench, load_impl

HEADROOM = 14
PAYLOAD = b'{"@type":"StateChange","changed":{"acc":{"Email":"s42","Mailbox":"m7"}},"pushState":"p1"}'
STATES = {"Email": "s42", "Mailbox": "m7"}


def deflated(payload: bytes) -> bytes:
    # RFC 7692 §7.2.1: raw deflate, sync-flushed, without the trailing 00 00 ff ff.
    c = zlib.compressobj(wbits=-15)
    data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


class Server:
    """Accepts WebSockets; `/deflate` negotiates permessage-deflate with server_no_context_takeover."""

    def __init__(self) -> None:
        self.connected: asyncio.Queue[tuple[WSTransport, bytes]] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    def factory(self, request: Any) -> WSUpgradeResponseWithListener:
        path = request.path
        headers = {}
        if path == b"/deflate":
            headers["Sec-WebSocket-Extensions"] = "permessage-deflate; server_no_context_takeover"
        queue = self.connected

        class Listener(WSListener):
            def on_ws_connected(self, transport: WSTransport) -> None:
                queue.put_nowait((transport, path))

            def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
                # RFC 6455 §5.5.1: answer the clients' closing handshake, so that closing them is quick.
                if frame.msg_type == WSMsgType.CLOSE:
                    transport.send_close(frame.get_close_code())
                    transport.disconnect()

        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(extra_headers=headers),
                                             Listener())

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    s.server = await picows.ws_create_server(s.factory, "127.0.0.1", 0)
    yield s
    s.server.close()
    await s.server.wait_closed()


async def raw_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /raw HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """One whole server frame (unmasked), header included."""
    head = await reader.readexactly(2)
    n = head[1] & 0x7F
    ext = b""
    if n == 126:
        ext = await reader.readexactly(2)
        n = int.from_bytes(ext, "big")
    elif n == 127:
        ext = await reader.readexactly(8)
        n = int.from_bytes(ext, "big")
    return head + ext + await reader.readexactly(n)


async def test_both_implementations_write_identical_frames_to_real_clients(server: Server) -> None:
    compiled, twin = load_impl("_broadcast", "native"), native.load("_broadcast", native=False)
    url = f"ws://127.0.0.1:{server.port}"
    plain_clients = [await websockets.connect(url + "/plain", compression=None, ping_interval=None)
                     for _ in range(2)]
    deflate_clients = [await websockets.connect(url + "/deflate", ping_interval=None) for _ in range(2)]
    paused_client = await websockets.connect(url + "/paused", compression=None, ping_interval=None)
    reader, writer = await raw_connect(server.port)
    try:
        assert all(c.protocol.extensions for c in deflate_clients)  # permessage-deflate was negotiated
        transports = [await asyncio.wait_for(server.connected.get(), 10) for _ in range(6)]
        compressed_payload = deflated(PAYLOAD)

        paused_targets = []
        for module in (compiled, twin):
            targets: dict[Any, None] = {}
            for transport, path in transports:
                t = module.Target(transport, path == b"/deflate")
                if path == b"/paused":
                    t.paused = True
                    paused_targets.append(t)
                targets[t] = None
            if module is compiled:
                assert all(load_bench().is_fast_path(t) for t in targets)
            plain = bytearray(HEADROOM) + PAYLOAD
            compressed = bytearray(HEADROOM) + compressed_payload
            assert module.broadcast(targets, plain, compressed, "acc", STATES) == 5

        # Five writes per broadcast: every client but the paused one got each message once.
        for client in plain_clients + deflate_clients:
            assert [await asyncio.wait_for(client.recv(decode=False), 10) for _ in range(2)] == [PAYLOAD] * 2
        native_frame = await asyncio.wait_for(read_frame(reader), 10)
        python_frame = await asyncio.wait_for(read_frame(reader), 10)
        assert native_frame == python_frame
        assert native_frame[0] == 0x81  # fin + text, no rsv1 for a client without the extension
        assert native_frame.endswith(PAYLOAD)

        # The paused client got nothing: the first thing it reads is what we send it now.
        paused_transport = next(t for t, path in transports if path == b"/paused")
        paused_transport.send(WSMsgType.TEXT, b"after")
        assert await asyncio.wait_for(paused_client.recv(decode=False), 10) == b"after"
        assert [t.pending for t in paused_targets] == [{"acc": STATES}] * 2
    finally:
        writer.close()
        for c in [*plain_clients, *deflate_clients, paused_client]:
            await c.close()


async def test_compressed_frames_carry_rsv1_on_the_wire(server: Server) -> None:
    compiled, twin = load_impl("_broadcast", "native"), native.load("_broadcast", native=False)
    # A raw client that asked for nothing still shows the bytes a deflate peer would get when the target says
    # it negotiated deflate: the same header and payload from both implementations, with rsv1 set.
    reader, writer = await raw_connect(server.port)
    try:
        transport, _ = await asyncio.wait_for(server.connected.get(), 10)
        compressed_payload = deflated(PAYLOAD)
        for module in (compiled, twin):
            target = module.Target(transport, True)
            plain = bytearray(HEADROOM) + PAYLOAD
            compressed = bytearray(HEADROOM) + compressed_payload
            assert module.broadcast({target: None}, plain, compressed, "acc", STATES) == 1
        frames = [await asyncio.wait_for(read_frame(reader), 10) for _ in range(2)]
        assert frames[0] == frames[1]
        assert frames[0][0] == 0xC1  # fin + rsv1 + text
        assert frames[0][2:] == compressed_payload
    finally:
        writer.close()
