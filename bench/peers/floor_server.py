"""Fan-out benchmark peer: the syscall floor. Accepts WebSocket subscribers (`GET /sub/<account>`) and, for every
`POST /pub/<account>`, builds the frame once and writes it with `gateway._bench.floor_send`: a C loop doing
nothing but `send(2)` of the finished frame to each subscriber's fd.

No broadcast can do less per recipient, so deliveries per CPU-second here are the physical limit on this machine.
The handshake and the publish request are plain Python (per connection and per event, not per delivery). Needs
the compiled gateway._bench (`make native`). Environment: HOST, PORT (WebSocket and publish on one port).
"""

from __future__ import annotations

import array
import asyncio
import base64
import hashlib
import os
import signal
import socket

import uvloop
from _pubhttp import PublishProtocol

from gateway._bench import floor_send  # compiled only: a benchmark helper, no twin

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


class Group:
    __slots__ = ("fds", "members")

    def __init__(self) -> None:
        self.members: set[int] = set()
        self.fds: array.array[int] | None = None  # rebuilt after a change of membership, not per event


groups: dict[str, Group] = {}


def frame_of(body: bytes) -> bytes:
    """An unmasked FIN+TEXT frame (RFC 6455 §5.2) around `body`."""
    n = len(body)
    if n < 126:
        return bytes((0x81, n)) + body
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + body
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + body


def publish(account: str, body: bytes) -> int:
    group = groups.get(account)
    if group is None or not group.members:
        return 0
    if group.fds is None:
        group.fds = array.array("i", sorted(group.members))
    return int(floor_send(group.fds, frame_of(body)))


class Front(asyncio.Protocol):
    """Either a publisher (POST, handed to PublishProtocol) or a subscriber (GET upgrade, then kept silent)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pub: PublishProtocol | None = None
        self.account: str | None = None
        self.fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.pub is not None:
            self.pub.data_received(data)
            return
        if self.account is not None:
            return  # a subscriber's frames (close, pong) are ignored: the floor only writes
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        assert self.transport is not None
        if self.buf.startswith(b"POST "):
            self.pub = PublishProtocol(publish)
            self.pub.connection_made(self.transport)
            self.pub.data_received(bytes(self.buf))
            return
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1] if " " in lines[0] else ""
        key = b""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-key":
                key = value.strip().encode()
        if not path.startswith("/sub/") or not key:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        sock: socket.socket = self.transport.get_extra_info("socket")
        self.fd = sock.fileno()
        self.account = path[5:]
        group = groups.setdefault(self.account, Group())
        group.members.add(self.fd)
        group.fds = None
        self.buf = bytearray()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.account is not None:
            group = groups.get(self.account)
            if group is not None:
                group.members.discard(self.fd)
                group.fds = None


async def main() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(Front, os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "0")),
                                      backlog=4096)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(main())
