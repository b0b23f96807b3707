"""The publish side shared by the Python peers: a minimal HTTP/1.1 server for `POST /pub/<account>` (keep-alive,
pipelined requests, Content-Length bodies only).

Benchmark scaffolding, not a general HTTP server: it parses exactly what the harness's publisher writes and hands
each body to a callback that fans it out. Kept tiny so that the peers' per-event overhead is not the parser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Handler = Callable[[str, bytes], int]

_MAX_HEAD = 16384


class PublishProtocol(asyncio.Protocol):
    """One publisher connection: for every complete request, `handler(account, body)` -> recipients written."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        out = bytearray()
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail()
                    return
                break
            head = bytes(buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(buf) < end + 4 + length:
                break  # the body is still arriving
            body = bytes(buf[end + 4:end + 4 + length])
            del buf[:end + 4 + length]
            if len(parts) >= 2 and parts[0] == "POST" and parts[1].startswith("/pub/"):
                n = str(self._handler(parts[1][5:], body)).encode()
                out += b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(n), n)
            else:
                out += b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        if out and self._transport is not None:
            self._transport.write(bytes(out))  # one write for every request answered in this read

    def _fail(self) -> None:
        if self._transport is not None:
            self._transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self._transport.close()
