"""The echo tool runs the gateway's transport stack without JMAP (for conformance suites)."""

from __future__ import annotations

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from gateway.config import load
from gateway.tools.echo import _DEFAULTS, echo_gateway


async def test_echo_text_binary_and_compressed() -> None:
    gw = echo_gateway(load({**_DEFAULTS, "GATEWAY_PORT": "0", "GATEWAY_MAX_MESSAGE_BYTES": "100000"}))
    await gw.start()
    try:
        url = f"ws://127.0.0.1:{gw.port}/jmap/ws"
        for compression in (None, "deflate"):
            async with websockets.connect(url, compression=compression, max_size=None) as ws:
                await ws.send("héllo " * 100)
                assert await ws.recv() == "héllo " * 100
                await ws.send(b"\x00\x01\x02" * 1000)
                assert await ws.recv() == b"\x00\x01\x02" * 1000
                await ws.send(["frag", "mented"])
                assert await ws.recv() == "fragmented"
        async with websockets.connect(url, compression=None, max_size=None) as ws:
            await ws.send("x" * 100_001)  # the limits are the gateway's
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009
    finally:
        await gw.stop(grace=0)
