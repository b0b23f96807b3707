"""A deliberately low-level WebSocket client for tests that must send what well-behaved libraries refuse to
(invalid UTF-8, stray continuation frames, rsv bits, several frames in one TCP write)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct

TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    mask = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                 headers: dict[str, str], body: bytes) -> None:
        self.reader = reader
        self.writer = writer
        self.status = status
        self.headers = headers
        self.body = body

    @classmethod
    async def connect(cls, port: int, path: str = "/jmap/ws", headers: dict[str, str] | None = None,
                      subprotocol: str | None = "jmap") -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        hdrs = {}
        for line in header_lines:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        body = b""
        if status != 101 and "content-length" in hdrs:
            body = await reader.readexactly(int(hdrs["content-length"]))
        return cls(reader, writer, status, hdrs, body)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> None:
        self.writer.write(frame(opcode, payload, fin, rsv))

    async def recv_frame(self, timeout: float = 5.0) -> tuple[int, bytes, int]:
        """(opcode, payload, rsv) of the next frame from the server."""
        async def read() -> tuple[int, bytes, int]:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return b0 & 0x0F, await self.reader.readexactly(n), (b0 >> 4) & 0x7
        return await asyncio.wait_for(read(), timeout)

    async def recv_close(self, timeout: float = 5.0) -> int:
        """Skip data frames until the server's close frame; return its code."""
        while True:
            op, payload, _ = await self.recv_frame(timeout)
            if op == CLOSE:
                return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
