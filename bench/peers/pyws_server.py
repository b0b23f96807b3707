"""Fan-out benchmark peer: the minimal pub/sub server a Python team would write on the `websockets` library.

Subscribers: `GET /sub/<account>` upgraded to WebSocket on PORT. Publisher: `POST /pub/<account>` on PUB_PORT (the
library serves WebSocket only); the body goes to every subscriber of the account with `websockets.broadcast`,
the library's own encode-once fan-out. Runs on uvloop, as the gateway does. Not a product; no auth.
Environment: HOST, PORT, PUB_PORT, DEFLATE=1 for permessage-deflate (the library's default settings).
"""

from __future__ import annotations

import asyncio
import os
import signal

import uvloop
from _pubhttp import PublishProtocol
from websockets.asyncio.server import ServerConnection, broadcast, serve

subscribers: dict[str, set[ServerConnection]] = {}


async def subscriber(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request is not None else ""
    if not path.startswith("/sub/"):
        await ws.close(1008, "subscribe at /sub/<account>")
        return
    account = path[5:]
    group = subscribers.setdefault(account, set())
    group.add(ws)
    try:
        await ws.wait_closed()
    finally:
        group.discard(ws)
        if not group and subscribers.get(account) is group:
            del subscribers[account]


def publish(account: str, body: bytes) -> int:
    group = subscribers.get(account)
    if not group:
        return 0
    broadcast(group, body.decode())  # str: a text message, as the other systems send
    return len(group)


async def main() -> None:
    host = os.environ.get("HOST", "127.0.0.1")
    compression = "deflate" if os.environ.get("DEFLATE") == "1" else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # No keepalive pings (as every system in the harness): idle sockets must stay idle while measured.
    async with serve(subscriber, host, int(os.environ.get("PORT", "0")), compression=compression,
                     ping_interval=None, backlog=4096) as server:
        pub = await loop.create_server(lambda: PublishProtocol(publish), host,
                                       int(os.environ.get("PUB_PORT", "0")), backlog=256)
        ws_port = server.sockets[0].getsockname()[1]
        pub_port = pub.sockets[0].getsockname()[1]
        print(f"listening {ws_port} {pub_port}", flush=True)
        await stop.wait()
        pub.close()


if __name__ == "__main__":
    uvloop.run(main())
