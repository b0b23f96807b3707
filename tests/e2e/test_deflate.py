"""permessage-deflate (RFC 7692) over real sockets: negotiation, compressed requests, responses and pushes,
bombs, rsv1 misuse, and plain clients beside compressed ones on the same fan-out."""

from __future__ import annotations

import json
import zlib

import pytest

from gateway.app import Gateway
from gateway.directory import account_id_for
from tests.conftest import BOB, GatewayFactory, basic, connect
from tests.e2e.test_push import enable, next_push_or_none, publish
from tests.e2e.test_ws_protocol import echo, recv_json
from tests.wsraw import CONT, TEXT, RawClient

TAIL = b"\x00\x00\xff\xff"


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4] if out.endswith(TAIL) else out


def inflate(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=-15).decompress(data + TAIL)


async def compressed_client(gw: Gateway, offer: str = "permessage-deflate") -> RawClient:
    client = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB), "Sec-WebSocket-Extensions": offer})
    assert client.status == 101
    return client


async def test_negotiation_always_drops_context_takeover(gateway: Gateway) -> None:
    async with await connect(gateway, compression="deflate") as ws:
        header = ws.response.headers["Sec-WebSocket-Extensions"]  # type: ignore[union-attr]
        assert header.startswith("permessage-deflate")
        assert "server_no_context_takeover" in header and "client_no_context_takeover" in header
        await ws.send(echo("Z1", text="x" * 2000))
        assert (await recv_json(ws))["methodResponses"][0][1] == {"text": "x" * 2000}
    client = await compressed_client(gateway, "x-unknown, permessage-deflate; bogus=1, "
                                              "permessage-deflate; server_max_window_bits=10")
    assert client.headers["sec-websocket-extensions"] == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10")
    await client.close()


async def test_deflate_can_be_switched_off(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(DEFLATE="false")
    async with await connect(gw, compression="deflate") as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers  # type: ignore[union-attr]
        await ws.send(echo("P1"))
        assert (await recv_json(ws))["requestId"] == "P1"


async def test_compressed_request_and_response(gateway: Gateway) -> None:
    client = await compressed_client(gateway)
    request = echo("C1", text="compress me " * 100).encode()
    client.send(TEXT, deflate(request), rsv=4)
    op, payload, rsv = await client.recv_frame()
    assert op == TEXT and rsv == 4, "a response above GATEWAY_DEFLATE_MIN_BYTES is compressed"
    response = json.loads(inflate(payload))
    assert response["requestId"] == "C1" and response["methodResponses"][0][1]["text"] == "compress me " * 100
    assert len(payload) < len(json.dumps(response)) / 5
    client.send(TEXT, deflate(echo("C2").encode()), rsv=4)
    op, payload, rsv = await client.recv_frame()
    assert rsv == 0 and json.loads(payload)["requestId"] == "C2", "small responses go out plain"
    # A fragmented compressed message: rsv1 on the first frame only (RFC 7692 §6.1).
    data = deflate(echo("C3", text="y" * 500).encode())
    client.send(TEXT, data[:10], fin=False, rsv=4)
    client.send(CONT, data[10:], fin=True)
    op, payload, rsv = await client.recv_frame()
    assert json.loads(inflate(payload) if rsv else payload)["requestId"] == "C3"
    await client.close()


async def test_compressed_and_plain_clients_share_a_fan_out(gateway: Gateway) -> None:
    compressed = await compressed_client(gateway)
    plain = await RawClient.connect(gateway.port, headers={"Authorization": basic(BOB)})
    library = await connect(gateway, compression="deflate")
    await enable(library)
    for c in (compressed, plain):
        c.send(TEXT, b'{"@type":"WebSocketPushEnable"}')
        c.send(TEXT, echo("sync").encode())
        _op, payload, rsv = await c.recv_frame()
        assert json.loads(inflate(payload) if rsv else payload)["requestId"] == "sync"
    states = {"Email": "e" * 100, "Mailbox": "m" * 100}
    await publish(gateway, BOB[0], **states)
    acc = account_id_for(BOB[0])
    _, z, zrsv = await compressed.recv_frame()
    _, p, prsv = await plain.recv_frame()
    assert zrsv == 4 and prsv == 0
    assert json.loads(inflate(z)) == json.loads(p)
    assert json.loads(p)["changed"] == {acc: states}
    assert len(z) < len(p)
    push = await next_push_or_none(library)
    assert push is not None and push["changed"] == {acc: states}
    for c in (compressed, plain):
        await c.close()
    await library.close()


@pytest.mark.parametrize(("frames", "code"), [
    ([(TEXT, deflate(b"{}"), True, 4), ], None),
    ([(TEXT, b"\xff\xff\xff garbage", True, 4)], 1007),
    ([(TEXT, deflate(b"\xff\xfe not utf-8 \xff" * 20), True, 4)], 1007),
    ([(TEXT, deflate(b"{")[:2], False, 4), (CONT, b"x", True, 4)], 1002),  # rsv1 on a continuation
])
async def test_bad_compressed_input(gateway: Gateway, frames: list[tuple[int, bytes, bool, int]],
                                    code: int | None) -> None:
    client = await compressed_client(gateway)
    for op, payload, fin, rsv in frames:
        client.send(op, payload, fin, rsv)
    if code is None:  # valid deflate of "{}": a RequestError, and the socket stays open
        _, payload, rsv = await client.recv_frame()
        assert json.loads(inflate(payload) if rsv else payload)["@type"] == "RequestError"
    else:
        assert await client.recv_close() == code
    await client.close()


async def test_compression_bomb_closes_1009(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(MAX_MESSAGE_BYTES="100000")
    client = await compressed_client(gw)
    bomb = deflate(b'{"a":"' + b"0" * 50_000_000 + b'"}')
    assert len(bomb) < 100_000
    client.send(TEXT, bomb, rsv=4)
    assert await client.recv_close() == 1009
    await client.close()

