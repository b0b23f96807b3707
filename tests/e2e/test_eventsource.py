"""RFC 8620 §7.3 push over `eventSourceUrl` against a real SSE client library (httpx-sse) and real sockets: state
events from the same hub as the WebSocket, types, closeafter, ping, Last-Event-ID resume, authentication, the
per-user cap shared with WebSockets, and slow clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from gateway.app import Gateway
from gateway.bus.events import new_event
from gateway.directory import account_id_for
from tests.conftest import ALICE, BOB, GatewayFactory, basic, connect, http_url
from tests.e2e.test_push import enable

BOB_ACC = account_id_for(BOB[0])


def es_url(gw: Gateway, types: str = "*", closeafter: str = "no", ping: int = 0, extra: str = "") -> str:
    return http_url(gw, f"/jmap/eventsource/?types={types}&closeafter={closeafter}&ping={ping}{extra}")


@contextlib.asynccontextmanager
async def stream(gw: Gateway, user: tuple[str, str] | None = BOB, **kw: Any) -> AsyncIterator[Any]:
    headers = dict(kw.pop("headers", {}))
    if user is not None:
        headers["Authorization"] = basic(user)
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client, \
            aconnect_sse(client, "GET", es_url(gw, **kw), headers=headers) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        yield source


async def next_event(source: Any, timeout: float = 5.0) -> ServerSentEvent:
    async def first() -> ServerSentEvent:
        async for event in source.aiter_sse():
            found: ServerSentEvent = event
            return found
        raise AssertionError("the stream ended")
    return await asyncio.wait_for(first(), timeout)


async def publish(gw: Gateway, user: str, **states: str) -> None:
    await gw.bus.publish([new_event(user, dict(states))])


async def until_subscribed(gw: Gateway, n: int = 1) -> None:
    for _ in range(500):
        if gw.hub.subscriptions >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the stream never subscribed")


async def test_state_events_with_the_pushstate_as_id(gateway: Gateway) -> None:
    async with stream(gateway) as source:
        await until_subscribed(gateway)
        await publish(gateway, BOB[0], Email="e1", Mailbox="m1")
        event = await next_event(source)
        assert event.event == "state"
        change = json.loads(event.data)
        assert change["@type"] == "StateChange" and change["changed"] == {BOB_ACC: {"Email": "e1", "Mailbox": "m1"}}
        assert event.id == change["pushState"]


async def test_types_filter_and_the_same_fanout_as_websockets(gateway: Gateway) -> None:
    async with stream(gateway, types="Email") as source, await connect(gateway) as ws:
        await enable(ws, ["Email"])
        await until_subscribed(gateway, 2)
        await publish(gateway, BOB[0], Mailbox="m1")  # filtered out for both
        await publish(gateway, BOB[0], Email="e2", Mailbox="m2")
        event = await next_event(source)
        assert json.loads(event.data)["changed"] == {BOB_ACC: {"Email": "e2"}}
        pushed = json.loads(await ws.recv())
        # One encoding: the event's data is byte for byte the WebSocket's StateChange.
        assert pushed == json.loads(event.data)


async def test_closeafter_state_ends_the_answer_after_one_event(gateway: Gateway) -> None:
    async with stream(gateway, closeafter="state") as source:
        await until_subscribed(gateway)
        await publish(gateway, BOB[0], Email="e1")
        await publish(gateway, BOB[0], Email="e2")
        events = [e async for e in source.aiter_sse()]  # ends: the server closed the connection
        assert [json.loads(e.data)["changed"][BOB_ACC]["Email"] for e in events] == ["e1"]


async def test_pings_carry_the_interval_in_use(gateway: Gateway) -> None:
    async with stream(gateway, ping=1) as source:  # clamped up to the server's minimum
        event = await next_event(source, timeout=15)
        assert event.event == "ping" and json.loads(event.data) == {"interval": 5}


async def test_last_event_id_resumes_like_a_pushstate(gateway: Gateway) -> None:
    keeper = await connect(gateway)
    await enable(keeper, [])  # keeps the node bound to Bob (CoreOnly reports no states of its own)
    async with stream(gateway) as source:
        await until_subscribed(gateway, 2)
        await publish(gateway, BOB[0], Email="e1", Mailbox="m1")
        last_id = (await next_event(source)).id
    await publish(gateway, BOB[0], Email="e2")  # missed while no stream was open
    async with stream(gateway, headers={"Last-Event-ID": last_id}) as source:
        event = await next_event(source)
        assert json.loads(event.data)["changed"] == {BOB_ACC: {"Email": "e2"}}
    await keeper.close()


async def test_authentication_and_tickets(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(es_url(gateway)) as r:
            problem = await r.json(content_type=None)
            assert r.status == 401 and "Basic" in r.headers["WWW-Authenticate"]
            assert r.headers["Content-Type"] == "application/problem+json" and problem["status"] == 401
        async with http.get(es_url(gateway, types="Email,")) as r:
            assert r.status == 400
        async with http.post(http_url(gateway, "/jmap/ws/ticket"), headers={"Authorization": basic(ALICE)}) as r:
            ticket = (await r.json())["value"]
    async with stream(gateway, user=None, extra=f"&ticket={ticket}") as source:
        await until_subscribed(gateway)
        await publish(gateway, ALICE[0], Email="a1")
        assert json.loads((await next_event(source)).data)["changed"] == {account_id_for(ALICE[0]): {"Email": "a1"}}
    async with aiohttp.ClientSession() as http, http.get(es_url(gateway) + f"&ticket={ticket}") as r:
        assert r.status == 401  # single use


async def test_the_connection_cap_counts_websockets_and_streams(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(MAX_CONNECTIONS_PER_USER="1")
    async with await connect(gw), aiohttp.ClientSession() as http, \
                http.get(es_url(gw), headers={"Authorization": basic(BOB)}) as r:
        assert r.status == 429 and r.headers["Retry-After"]


async def test_a_stream_that_does_not_read_gets_the_newest_state_merged(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(WRITE_HIGH_WATER="16384")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, limit=1 << 20)
    writer.write(f"GET /jmap/eventsource/?types=*&closeafter=no&ping=0 HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: {basic(BOB)}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    await until_subscribed(gw)
    conn = next(iter(gw.eventsource.connections))
    filler = "x" * 1000
    i = 0
    while not conn.target.paused and i < 50_000:  # the client reads nothing meanwhile
        await publish(gw, BOB[0], Email=f"e{i}-{filler}", Mailbox=f"m{i}")
        i += 1
    assert conn.target.paused, "the stream's write buffer should have passed its high-water mark"
    for j in range(i, i + 200):
        await publish(gw, BOB[0], Email=f"e{j}-{filler}", Mailbox=f"m{j}")
    assert conn.target.pending == {BOB_ACC: {"Email": f"e{i + 199}-{filler}", "Mailbox": f"m{i + 199}"}}
    last = None
    buffer = b""
    while last is None or last["changed"][BOB_ACC]["Mailbox"] != f"m{i + 199}":
        buffer += await asyncio.wait_for(reader.read(65536), 10)
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            fields = dict(line.split(b": ", 1) for line in event.split(b"\n"))
            assert fields[b"event"] == b"state"
            last = json.loads(fields[b"data"])
            assert fields[b"id"].decode() == last["pushState"]
    writer.close()


@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_only_get(gateway: Gateway, method: str) -> None:
    async with aiohttp.ClientSession() as http, \
            http.request(method, es_url(gateway), headers={"Authorization": basic(BOB)}) as r:
        assert r.status == 405 and r.headers["Allow"] == "GET"


async def test_a_stream_on_a_keep_alive_connection_that_served_requests_first(gateway: Gateway) -> None:
    """Browsers and proxies reuse keep-alive connections for an EventSource: the request then reaches the HTTP
    surface (the front protocol routed the connection's first request), which hands the connection over."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)

    async def answer() -> tuple[bytes, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        return head, await reader.readexactly(length)

    writer.write(f"GET /jmap/session HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(BOB)}\r\n\r\n".encode())
    head, _ = await answer()
    assert head.startswith(b"HTTP/1.1 200 ")
    target = "/jmap/eventsource/?types=*&closeafter=no&ping=0"
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(ALICE)}x\r\n\r\n".encode())
    head, body = await answer()  # a refusal is an ordinary answer: the connection stays usable
    assert head.startswith(b"HTTP/1.1 401 ") and json.loads(body)["status"] == 401
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(BOB)}\r\n"
                 f"Accept: text/event-stream\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
    await until_subscribed(gateway)
    await publish(gateway, BOB[0], Email="e1")
    event = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
    assert event.startswith(b"event: state\ndata: ")
    assert json.loads(event.split(b"\n")[1][6:])["changed"] == {BOB_ACC: {"Email": "e1"}}
    writer.close()
    for _ in range(500):
        if not gateway.eventsource.connections and not gateway.hub.subscriptions:
            break
        await asyncio.sleep(0.01)
    assert not gateway.eventsource.connections and not gateway.hub.subscriptions
