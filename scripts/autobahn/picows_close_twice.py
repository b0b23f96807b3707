"""Minimal reproduction of Autobahn case 7.1.2 failing in picows 2.3.1, for the picows issue tracker.

A client sends two Close frames in one TCP write. RFC 6455 §5.5.1: after a Close, the endpoint answers it with a
Close (echoing its status code) and ignores whatever follows. picows parses the second frame before it delivers
the first to the listener, fails the connection with 1002 ("Received CLOSE for the second time"), and the
listener's answer (1000) comes too late.

usage: python picows_close_twice.py       (needs only picows; prints what the server answered, exits 1 on the bug)
"""

import asyncio
import os
import struct
import sys

import picows


class EchoClose(picows.WSListener):
    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())  # RFC 6455 §5.5.1: echo the code
            transport.disconnect()


def close_frame(code: int) -> bytes:
    mask = os.urandom(4)
    payload = struct.pack("!H", code)
    return bytes([0x88, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def main() -> int:
    server = await picows.ws_create_server(lambda _request: EchoClose(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    writer.write(close_frame(1000) + close_frame(1000))  # both in one write, hence one read on the server
    head = await asyncio.wait_for(reader.readexactly(2), 5)
    payload = await reader.readexactly(head[1] & 0x7F)
    code = struct.unpack("!H", payload[:2])[0]
    print(f"picows {picows.__version__}: answered the first Close(1000) with Close({code}) {payload[2:]!r}")
    writer.close()
    server.close()
    return 0 if code == 1000 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
