"""Push over real sockets (RFC 8887 §4.3.5): enable/disable, dataTypes, pushState resume, isolation, fan-out,
per-user cap, keepalive, graceful shutdown, slow clients.

Ordering trick instead of sleeps: events published on the memory bus are written to sockets before
`publish` returns, so after publishing, a Core/echo Response is the next message unless a push came first.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from gateway.app import Gateway
from gateway.bus.events import new_event
from gateway.directory import account_id_for
from tests.conftest import ALICE, BOB, GatewayFactory, basic, connect, settings_env
from tests.e2e.test_ws_protocol import echo, recv_json
from tests.wsraw import CLOSE, PING, PONG, TEXT, RawClient

BOB_ACC = account_id_for(BOB[0])


async def publish(gw: Gateway, user: str, **states: str) -> None:
    await gw.bus.publish([new_event(user, dict(states))])


async def enable(ws: websockets.ClientConnection, data_types: object = None, push_state: str | None = None,
                 omit_types: bool = False) -> None:
    msg: dict[str, object] = {"@type": "WebSocketPushEnable"}
    if not omit_types:
        msg["dataTypes"] = data_types
    if push_state is not None:
        msg["pushState"] = push_state
    await ws.send(json.dumps(msg))
    # The enable has no reply (RFC 8887 §4.3.5.2); a request behind it proves it has been processed.
    await ws.send(echo("sync"))
    reply = await recv_json(ws)
    assert reply.get("requestId") == "sync", reply


async def disable(ws: websockets.ClientConnection) -> None:
    await ws.send(json.dumps({"@type": "WebSocketPushDisable"}))
    await ws.send(echo("sync"))
    assert (await recv_json(ws)).get("requestId") == "sync"


async def next_push_or_none(ws: websockets.ClientConnection) -> dict[str, object] | None:
    """The StateChange written before an echo sent now, or None when the echo comes first."""
    await ws.send(echo("probe"))
    msg = await recv_json(ws)
    if msg["@type"] == "StateChange":
        probe = await recv_json(ws)
        assert probe["requestId"] == "probe"
        return msg
    assert msg["requestId"] == "probe"
    return None


async def test_enable_disable_reenable(gateway: Gateway) -> None:
    async with await connect(gateway) as ws:
        await publish(gateway, BOB[0], Email="e0")
        assert await next_push_or_none(ws) is None  # not enabled yet
        await enable(ws)
        await publish(gateway, BOB[0], Email="e1", Mailbox="m1")
        push = await next_push_or_none(ws)
        assert push is not None
        assert push["@type"] == "StateChange"
        assert push["changed"] == {BOB_ACC: {"Email": "e1", "Mailbox": "m1"}}
        assert isinstance(push["pushState"], str)
        await disable(ws)
        await publish(gateway, BOB[0], Email="e2")
        assert await next_push_or_none(ws) is None
        await enable(ws, omit_types=True)
        await publish(gateway, BOB[0], Email="e3")
        push = await next_push_or_none(ws)
        assert push is not None and push["changed"] == {BOB_ACC: {"Email": "e3"}}


@pytest.mark.parametrize(("types", "expected"), [
    (None, {"Email": "e1", "Mailbox": "m1", "CustomType": "c1"}),
    (["Email"], {"Email": "e1"}),
    (["Email", "NoSuchType"], {"Email": "e1"}),
    ([], None),
])
async def test_data_types_filter(gateway: Gateway, types: list[str] | None,
                                 expected: dict[str, str] | None) -> None:
    async with await connect(gateway) as ws:
        await enable(ws, types)
        await publish(gateway, BOB[0], Email="e1", Mailbox="m1", CustomType="c1")
        push = await next_push_or_none(ws)
        assert (push["changed"] if push else None) == ({BOB_ACC: expected} if expected else None)


async def test_second_enable_replaces_the_first(gateway: Gateway) -> None:
    async with await connect(gateway) as ws:
        await enable(ws, ["Email"])
        await enable(ws, ["Mailbox"])
        await publish(gateway, BOB[0], Email="e1", Mailbox="m1")
        push = await next_push_or_none(ws)
        assert push is not None and push["changed"] == {BOB_ACC: {"Mailbox": "m1"}}
        assert await next_push_or_none(ws) is None  # exactly one push, not one per enable


async def test_push_state_resume(gateway: Gateway) -> None:
    # A keeper session keeps this node subscribed to Bob, so that the node sees changes while Bob's
    # client is away (with the embedded backend the request path knows the current states instead).
    keeper = await connect(gateway)
    await enable(keeper, [])
    async with await connect(gateway) as ws:
        await enable(ws, ["Email", "Mailbox"])
        await publish(gateway, BOB[0], Email="e1", Mailbox="m1")
        push = await next_push_or_none(ws)
        assert push is not None
        token = push["pushState"]
    await publish(gateway, BOB[0], Email="e2", Thread="t2")  # missed while away; Thread is not of interest
    async with await connect(gateway) as ws:
        await ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": ["Email", "Mailbox"],
                                  "pushState": token}))
        resumed = await recv_json(ws)
        assert resumed["@type"] == "StateChange"
        assert resumed["changed"] == {BOB_ACC: {"Email": "e2"}}
        newest = resumed["pushState"]
        assert await next_push_or_none(ws) is None
    async with await connect(gateway) as ws:
        await enable(ws, ["Email", "Mailbox"], push_state=str(newest))
        assert await next_push_or_none(ws) is None  # nothing changed since the newest token
    async with await connect(gateway) as ws:
        await ws.send(json.dumps({"@type": "WebSocketPushEnable", "pushState": "garbage!"}))
        full = await recv_json(ws)
        assert full["changed"] == {BOB_ACC: {"Email": "e2", "Mailbox": "m1", "Thread": "t2"}}
    await keeper.close()


async def test_isolation_and_every_session_of_an_account_receives(gateway: Gateway) -> None:
    bobs = [await connect(gateway) for _ in range(3)]
    alice = await connect(gateway, ALICE)
    for ws in [*bobs, alice]:
        await enable(ws)
    await publish(gateway, BOB[0], Email="b1")
    for ws in bobs:
        push = await next_push_or_none(ws)
        assert push is not None and push["changed"] == {BOB_ACC: {"Email": "b1"}}
    assert await next_push_or_none(alice) is None
    for ws in [*bobs, alice]:
        await ws.close()


async def test_connection_cap_per_user(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(MAX_CONNECTIONS_PER_USER="2")
    first, second = await connect(gw), await connect(gw)
    with pytest.raises(InvalidStatus) as info:
        await connect(gw)
    assert info.value.response.status_code == 429
    async with await connect(gw, ALICE):
        pass  # other users are not affected
    await first.close()
    await first.wait_closed()
    for _ in range(100):  # the server notices the close asynchronously
        if gw.websockets.connections_of(BOB[0]) < 2:
            break
        await asyncio.sleep(0.01)
    async with await connect(gw):
        pass
    await second.close()


async def test_ping_timeout_closes_silent_peers_but_not_idle_ones(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(PING_INTERVAL="0.5", PING_TIMEOUT="0.5")
    silent = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)})
    op, _, _ = await silent.recv_frame(timeout=10)
    assert op == PING
    assert await silent.recv_close(timeout=10) == 1001
    await silent.close()
    polite = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)})
    for _ in range(2):  # an idle socket that answers pings is pinged again, never closed
        op, payload, _ = await polite.recv_frame(timeout=10)
        assert op == PING
        polite.send(PONG, payload)
    await polite.close()


async def test_shutdown_closes_every_socket_with_1001(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    clients = [await connect(gw) for _ in range(3)]
    await gw.stop(grace=1)
    for ws in clients:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1001


def test_sigterm_closes_sockets_with_1001_and_exits_0() -> None:
    env = {**os.environ, **settings_env(), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line.split("127.0.0.1:")[1].split()[0].strip("/"))

        async def scenario() -> int | None:
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/jmap/ws", subprotocols=[Subprotocol("jmap")],
                                          additional_headers={"Authorization": basic(BOB)})
            await ws.send(echo("S1"))
            assert (await recv_json(ws))["requestId"] == "S1"
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 15)
            return ws.close_code

        import uvloop

        assert uvloop.run(scenario()) == 1001
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_slow_client_memory_is_bounded_and_gets_the_newest_state(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(WRITE_HIGH_WATER="16384")
    client = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)})
    client.send(TEXT, b'{"@type":"WebSocketPushEnable","dataTypes":null}')
    client.send(TEXT, echo("sync").encode())
    assert json.loads((await client.recv_frame())[1])["requestId"] == "sync"
    conn = next(iter(gw.connections))
    filler = "x" * 1000
    peak_buffer = 0
    for i in range(5000):  # the client reads nothing meanwhile
        await publish(gw, BOB[0], Email=f"e{i}-{filler}", Mailbox=f"m{i}")
        peak_buffer = max(peak_buffer, conn.transport.underlying_transport.get_write_buffer_size())  # type: ignore[union-attr]
    assert conn.target.paused, "the socket should have passed its high-water mark"
    assert conn.target.pending == {BOB_ACC: {"Email": f"e4999-{filler}", "Mailbox": "m4999"}}
    # Bounded: the server holds at most about one high-water mark plus one frame per paused socket.
    assert peak_buffer < 16384 + 4096
    last = None
    while True:  # now drain: the pushes end with one merged StateChange carrying the newest states
        op, payload, _ = await client.recv_frame(timeout=10)
        assert op == TEXT
        last = json.loads(payload)
        if last["changed"][BOB_ACC]["Mailbox"] == "m4999":
            break
    assert last["changed"][BOB_ACC]["Email"] == f"e4999-{filler}"
    await client.close()


async def test_slow_client_is_closed_after_the_timeout(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(WRITE_HIGH_WATER="4096", SLOW_CLIENT_TIMEOUT="0.5")
    client = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)})
    client.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.send(TEXT, b'{"@type":"WebSocketPushEnable"}')
    client.send(TEXT, echo("sync").encode())
    assert json.loads((await client.recv_frame())[1])["requestId"] == "sync"
    conn = next(iter(gw.connections))
    i = 0
    while not conn.target.paused:
        await publish(gw, BOB[0], Email=f"e{i}-" + "y" * 2000)
        i += 1
    for _ in range(1000):  # the server closes it when the timeout passes (1 s wheel resolution)
        if conn not in gw.connections:
            break
        await asyncio.sleep(0.01)
    assert conn not in gw.connections
    assert gw.metrics.slow_closes._value.get() == 1
    await client.close()


_ = (CLOSE, struct)


async def test_push_coalesce_window_merges_changes(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(PUSH_COALESCE_MS="200")
    async with await connect(gw) as ws:
        await enable(ws)
        await publish(gw, BOB[0], Email="e1")
        await publish(gw, BOB[0], Email="e2", Mailbox="m2")
        await publish(gw, ALICE[0], Email="a1")  # nobody here covers Alice: nothing for Bob
        push = await recv_json(ws)  # arrives when the window closes
        assert push["changed"] == {BOB_ACC: {"Email": "e2", "Mailbox": "m2"}}
        assert await next_push_or_none(ws) is None  # one StateChange for the whole window


async def test_socket_send_buffer_cap(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(SOCKET_SNDBUF="8192")
    async with await connect(gw) as ws:
        await enable(ws)
        conn = next(iter(gw.connections))
        sock = conn.transport.underlying_transport.get_extra_info("socket")  # type: ignore[union-attr]
        # Linux doubles the value it is given (socket(7)): the cap is in force.
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 8192
