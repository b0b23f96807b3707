"""Closed connections are freed by their reference counts, without the cycle collector.

The gateway freezes its long-lived objects out of the collector's way (gc.freeze, gateway.gcpolicy): a frozen
object in a reference cycle would never be freed. So every connection a client closes (a push-enabled WebSocket
with a pending wake-up on the timer wheel, an event stream, an HTTP request, an ingest stream) must leave no
object of the gateway behind with the collector disabled. Counted: instances of the gateway's own classes and of
picows' transport (client objects of the test live in this process too, and are not counted)."""

from __future__ import annotations

import asyncio
import gc
import json
from collections import Counter

import aiohttp

from gateway.app import Gateway
from gateway.bus.events import STATE_CHANGE_EVENT
from tests.conftest import ADMIN, BOB, GatewayFactory, basic, http_url
from tests.wsraw import TEXT, RawClient

# Alarms stay on the timer wheel until their bucket fires (lazily, by design), holding nothing of their connection.
NOT_COUNTED = {"Alarm"}
COUNTED = ("gateway", "picows", "aiohttp.web", "aiohttp.http_parser", "aiohttp.streams")  # aiohttp: server side


def census() -> Counter[str]:
    seen: Counter[str] = Counter()
    for obj in gc.get_objects():
        kind = type(obj)
        module = kind.__module__ if isinstance(kind.__module__, str) else ""
        if module.startswith(COUNTED) and kind.__name__ not in NOT_COUNTED:
            seen[f"{module}.{kind.__qualname__}"] += 1
    return seen


async def one_of_each(gw: Gateway, n: int) -> None:
    """n push-enabled WebSockets (each pushed one StateChange), n event streams, HTTP requests and an ingest
    stream; then every client closes, and this returns once the gateway has seen each one go."""
    sockets = []
    for _ in range(n):
        ws = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)})
        ws.send(TEXT, json.dumps({"@type": "WebSocketPushEnable", "dataTypes": None}).encode())
        sockets.append(ws)
    streams = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(f"GET /jmap/eventsource/?types=*&closeafter=no&ping=0 HTTP/1.1\r\nHost: gw\r\n"
                     f"Authorization: {basic(BOB)}\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        streams.append((reader, writer))
    while gw.hub.subscriptions < 2 * n:  # every enable taken
        await asyncio.sleep(0.01)
    event = json.dumps({"type": STATE_CHANGE_EVENT, "username": BOB[0], "typeStates": {"Email": "x"}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /admin/events HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-ndjson\r\nAuthorization: "
                 b"Bearer %s\r\nContent-Length: %d\r\n\r\n%s\n" % (ADMIN.encode(), len(event) + 1, event))
    assert (await reader.read()).startswith(b"HTTP/1.1 202 ")
    writer.close()
    for ws in sockets:
        assert json.loads((await ws.recv_frame())[1])["@type"] == "StateChange"
    for stream_reader, _ in streams:
        await stream_reader.readuntil(b"\n\n")
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(http_url(gw, "/jmap/session"), headers={"Authorization": basic(BOB)}) as r:
                assert r.status == 200
    for ws in sockets:
        await ws.close()
    for _, stream_writer in streams:
        stream_writer.close()
    while gw.connections or gw.eventsource.connections or gw.hub.subscriptions:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the transports' own closing callbacks


async def test_closed_connections_leave_nothing_for_the_cycle_collector(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(PING_INTERVAL="30")  # every socket has a wake-up pending on the wheel
    await one_of_each(gw, 2)  # caches, lazily created helpers, the loggers' first records
    gc.collect()
    gc.disable()
    try:
        before = census()
        await one_of_each(gw, 20)
        after = census()
    finally:
        gc.enable()
    grown = {name: after[name] - before[name] for name in after if after[name] > before[name]}
    assert not grown, f"left behind for the cycle collector: {grown}"


async def test_frozen_connections_are_freed_when_they_close(make_gateway: GatewayFactory) -> None:
    """GATEWAY_GC_FREEZE_AFTER: connections frozen out of the collector's walks still go when they close."""
    gw = await make_gateway(GC_FREEZE_AFTER="10")
    try:
        assert gw.gc.freezes == 1  # after start-up
        sockets = [await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)}) for _ in range(12)]
        while len(gw.connections) < 12:
            await asyncio.sleep(0.01)
        assert gw.gc.freezes == 2 and gw.gc.frozen > 0  # at the 10th: 10 more held than at the last freeze
        # The first 10 are frozen: out of the generations the collector walks (and gc.get_objects lists).
        assert census()["gateway.transport.ws.WsConnection"] == 2
        for ws in sockets:
            await ws.close()
        while gw.connections:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        gc.disable()
        try:
            gc.unfreeze()  # anything frozen and not freed would be listed again now
            assert census()["gateway.transport.ws.WsConnection"] == 0
        finally:
            gc.enable()
        gw.gc.check()
        assert gw.gc.freezes == 2  # fewer connections than at the freeze: nothing to freeze
        gc.collect()
        async with aiohttp.ClientSession() as http, http.get(http_url(gw, "/metrics")) as r:
            page = await r.text()
        assert "gateway_gc_frozen_objects " in page and "gateway_gc_freezes_total 2.0" in page
        assert 'gateway_gc_pause_seconds_bucket{le="+Inf"}' in page
    finally:
        gc.unfreeze()  # this test process's own objects go back to the collector
