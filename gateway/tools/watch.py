"""`python -m gateway.tools.watch`: connect as a user, enable push, print every StateChange as it arrives.

A demonstration client (aiohttp's WebSocket client), not part of the server. Usage:
`python -m gateway.tools.watch [--url ws://127.0.0.1:8080/jmap/ws] [--user bob@example.com] [--password bob]`
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys

import aiohttp


async def watch(url: str, user: str, password: str, data_types: list[str] | None) -> int:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(url, protocols=("jmap",), headers={"Authorization": f"Basic {token}"},
                                       heartbeat=20)
        except aiohttp.WSServerHandshakeError as exc:
            print(f"upgrade refused: HTTP {exc.status}", file=sys.stderr)
            return 1
        await ws.send_str(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": data_types}))
        print(f"watching {user} on {url} (Ctrl-C to stop)", flush=True)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                print(msg.data, flush=True)
        print(f"closed: {ws.close_code}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="ws://127.0.0.1:8080/jmap/ws")
    parser.add_argument("--user", default="bob@example.com")
    parser.add_argument("--password", default="bob")
    parser.add_argument("--types", nargs="*", default=None, help="dataTypes (default: all)")
    args = parser.parse_args()
    try:
        return asyncio.run(watch(args.url, args.user, args.password, args.types))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
