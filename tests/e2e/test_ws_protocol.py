"""RFC 8887 over real loopback sockets: handshake, messages, errors, close codes, tickets, JWT expiry."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from gateway.app import Gateway
from tests.conftest import ALICE, BOB, GatewayFactory, basic, connect, http_url, ws_url
from tests.wsraw import BINARY, CLOSE, CONT, PING, PONG, TEXT, RawClient

CORE = "urn:ietf:params:jmap:core"


def echo(rid: str | None = "R1", **args: object) -> str:
    msg: dict[str, object] = {"@type": "Request", "using": [CORE], "methodCalls": [["Core/echo", args, "c1"]]}
    if rid is not None:
        msg["id"] = rid
    return json.dumps(msg, ensure_ascii=False)


async def recv_json(ws: websockets.ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 5))  # type: ignore[no-any-return]


async def test_handshake_echoes_jmap_and_answers_requests(gateway: Gateway) -> None:
    async with await connect(gateway) as ws:
        assert ws.subprotocol == "jmap"
        await ws.send(echo("R1", hello=True))
        msg = await recv_json(ws)
        assert msg["@type"] == "Response"
        assert msg["requestId"] == "R1"
        assert msg["methodResponses"] == [["Core/echo", {"hello": True}, "c1"]]
        await ws.send(echo(None, x=1))
        msg = await recv_json(ws)
        assert "requestId" not in msg
        await ws.send(json.dumps({"@type": "Request", "id": "R2", "using": [CORE],
                                  "methodCalls": [["Mailbox/get", {}, "m"]]}))
        msg = await recv_json(ws)
        assert msg["methodResponses"] == [["error", {"type": "unknownMethod",
                                                     "description": "Mailbox/get is not supported"}, "m"]]


async def test_request_errors_keep_the_socket_open(gateway: Gateway) -> None:
    async with await connect(gateway) as ws:
        await ws.send("this is not json")
        err = await recv_json(ws)
        assert err == {"@type": "RequestError", "type": "urn:ietf:params:jmap:error:notJSON", "status": 400,
                       "detail": "The message is not valid JSON.", "requestId": None}
        await ws.send(json.dumps({"@type": "Nonsense", "id": "X1"}))
        err = await recv_json(ws)
        assert err["type"] == "urn:ietf:params:jmap:error:notRequest" and err["requestId"] == "X1"
        await ws.send(json.dumps({"@type": "Response", "id": "X2", "methodResponses": [], "sessionState": "0"}))
        err = await recv_json(ws)
        assert err["type"] == "urn:ietf:params:jmap:error:notRequest" and err["requestId"] == "X2"
        await ws.send(json.dumps({"@type": "Request", "id": "X3", "using": [CORE, "urn:example:nope"],
                                  "methodCalls": []}))
        err = await recv_json(ws)
        assert err["type"] == "urn:ietf:params:jmap:error:unknownCapability" and err["requestId"] == "X3"
        calls = [["Core/echo", {}, f"c{i}"] for i in range(gateway.settings.max_calls_in_request + 1)]
        await ws.send(json.dumps({"@type": "Request", "id": "X4", "using": [CORE], "methodCalls": calls}))
        err = await recv_json(ws)
        assert err["type"] == "urn:ietf:params:jmap:error:limit" and err["limit"] == "maxCallsInRequest"
        await ws.send(echo("OK"))
        assert (await recv_json(ws))["requestId"] == "OK"


async def test_max_concurrent_requests_is_enforced_per_connection(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(MAX_CONCURRENT_REQUESTS="2")
    client = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)})
    assert client.status == 101
    # Five requests in one TCP write are read in one go, before any of them can finish.
    client.send_raw(b"".join(__import__("tests.wsraw", fromlist=["frame"]).frame(TEXT, echo(f"R{i}").encode())
                             for i in range(5)))
    replies = [json.loads((await client.recv_frame())[1]) for _ in range(5)]
    limited = [r for r in replies if r["@type"] == "RequestError"]
    answered = [r for r in replies if r["@type"] == "Response"]
    assert len(answered) == 2 and len(limited) == 3
    assert all(r["limit"] == "maxConcurrentRequests" for r in limited)
    assert {r["requestId"] for r in replies} == {f"R{i}" for i in range(5)}
    await client.close()


@pytest.mark.parametrize(("frames", "code"), [
    ([(BINARY, b"\x00\x01", True, 0)], 1003),
    ([(TEXT, b"\xff\xfe", True, 0)], 1007),
    ([(TEXT, "é".encode()[:1], False, 0), (CONT, b"a", True, 0)], 1007),
    ([(CONT, b"x", True, 0)], 1002),
    ([(TEXT, b"{}", True, 4)], 1002),  # rsv1 without permessage-deflate
    ([(TEXT, b"{}", True, 2)], 1002),  # rsv2
    ([(TEXT, b"{", False, 0), (TEXT, b"}", True, 0)], 1002),
])
async def test_protocol_violations_close_with_the_right_code(
        gateway: Gateway, frames: list[tuple[int, bytes, bool, int]], code: int) -> None:
    client = await RawClient.connect(gateway.port, headers={"Authorization": basic(BOB)})
    for op, payload, fin, rsv in frames:
        client.send(op, payload, fin, rsv)
    assert await client.recv_close() == code
    await client.close()


async def test_message_above_the_limit_closes_1009_even_when_fragmented(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(MAX_MESSAGE_BYTES="1000")
    client = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)})
    for _ in range(3):
        client.send(TEXT if _ == 0 else CONT, b"a" * 400, fin=False)
    assert await client.recv_close() == 1009
    await client.close()
    client = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)})
    client.send(TEXT, b"a" * 1001)
    assert await client.recv_close() == 1009
    await client.close()


async def test_fragmented_request_with_interleaved_ping(gateway: Gateway) -> None:
    client = await RawClient.connect(gateway.port, headers={"Authorization": basic(BOB)})
    data = echo("F1", text="héllo wörld").encode()
    cut1, cut2 = 10, data.index("ö".encode()) + 1  # the second cut splits a multi-byte character
    client.send(TEXT, data[:cut1], fin=False)
    client.send(PING, b"are you there")
    client.send(CONT, data[cut1:cut2], fin=False)
    client.send(CONT, data[cut2:], fin=True)
    op, payload, _ = await client.recv_frame()
    assert (op, payload) == (PONG, b"are you there")
    op, payload, _ = await client.recv_frame()
    msg = json.loads(payload)
    assert op == TEXT and msg["requestId"] == "F1"
    assert msg["methodResponses"][0][1] == {"text": "héllo wörld"}
    await client.close()


async def test_close_frame_is_answered(gateway: Gateway) -> None:
    client = await RawClient.connect(gateway.port, headers={"Authorization": basic(BOB)})
    client.send(CLOSE, (1000).to_bytes(2, "big") + b"bye")
    assert await client.recv_close() == 1000
    assert await asyncio.wait_for(client.reader.read(), 5) == b""  # and the server ends the TCP connection
    await client.close()


async def test_handshake_refusals_are_problem_documents(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    no_proto = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)}, subprotocol=None)
    assert no_proto.status == 400
    assert no_proto.headers["content-type"] == "application/problem+json"
    assert json.loads(no_proto.body)["status"] == 400
    bad_pw = await RawClient.connect(gw.port, headers={"Authorization": basic((BOB[0], "wrong"))})
    assert bad_pw.status == 401
    assert "Basic" in bad_pw.headers["www-authenticate"]
    assert json.loads(bad_pw.body)["title"] == "Unauthorized"
    anonymous = await RawClient.connect(gw.port)
    assert anonymous.status == 401
    for c in (no_proto, bad_pw, anonymous):
        await c.close()
    lenient = await make_gateway(REQUIRE_SUBPROTOCOL="false")
    async with await connect(lenient, subprotocols=None) as ws:
        assert ws.subprotocol is None
        await ws.send(echo("L1"))
        assert (await recv_json(ws))["requestId"] == "L1"


async def test_tickets_are_single_use_and_expire(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(http_url(gateway, "/jmap/ws/ticket"), headers={"Authorization": basic(ALICE)}) as r:
            assert r.status == 201
            ticket = (await r.json())["value"]
        async with http.post(http_url(gateway, "/jmap/ws/ticket")) as r:
            assert r.status == 401
    async with websockets.connect(ws_url(gateway, f"ticket={ticket}"), subprotocols=[Subprotocol("jmap")]) as ws:
        await ws.send(echo("T1"))
        assert (await recv_json(ws))["requestId"] == "T1"
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(ws_url(gateway, f"ticket={ticket}"), subprotocols=[Subprotocol("jmap")])
    assert info.value.response.status_code == 401
    assert gateway.directory is not None
    value, _ = gateway.auth.issue_ticket(gateway.directory.principal(ALICE[0]))
    tickets: Any = gateway.auth.tickets
    real_clock = tickets.clock
    tickets.clock = lambda: real_clock() + gateway.settings.ticket_ttl + 1
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(ws_url(gateway, f"ticket={value}"), subprotocols=[Subprotocol("jmap")])
    assert info.value.response.status_code == 401


async def test_jwt_bearer_and_expiry_closes_with_1008(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(JWT_SECRET="s3cret-s3cret-s3cret-s3cret-s3cret!")
    secret = "s3cret-s3cret-s3cret-s3cret-s3cret!"
    expired = jwt.encode({"sub": BOB[0], "exp": int(time.time()) - 10}, secret, algorithm="HS256")
    with pytest.raises(InvalidStatus) as info:
        await connect(gw, additional_headers={"Authorization": f"Bearer {expired}"})
    assert info.value.response.status_code == 401
    assert "Bearer" in info.value.response.headers["WWW-Authenticate"]
    forged = jwt.encode({"sub": BOB[0]}, "another-secret-another-secret-xx", algorithm="HS256")
    with pytest.raises(InvalidStatus):
        await connect(gw, additional_headers={"Authorization": f"Bearer {forged}"})
    token = jwt.encode({"sub": BOB[0], "exp": time.time() + 1.5}, secret, algorithm="HS256")
    ws = await connect(gw, additional_headers={"Authorization": f"Bearer {token}"})
    await ws.send(echo("J1"))
    assert (await recv_json(ws))["requestId"] == "J1"
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1008


@pytest.mark.parametrize(("payload", "answer"), [
    ((1000).to_bytes(2, "big"), 1000), ((3001).to_bytes(2, "big") + b"custom", 3001), (b"", 1000),
    ((0).to_bytes(2, "big"), 1002), ((1006).to_bytes(2, "big"), 1002), ((5000).to_bytes(2, "big"), 1002),
])
async def test_close_codes_are_echoed_or_refused(gateway: Gateway, payload: bytes, answer: int) -> None:
    client = await RawClient.connect(gateway.port, headers={"Authorization": basic(BOB)})
    client.send(CLOSE, payload)
    assert await client.recv_close() == answer
    await client.close()


async def test_close_frame_with_rsv_bits_fails_1002(gateway: Gateway) -> None:
    client = await RawClient.connect(gateway.port, headers={"Authorization": basic(BOB)})
    client.send(CLOSE, (1000).to_bytes(2, "big"), rsv=7)
    assert await client.recv_close() == 1002
    await client.close()


async def test_tickets_are_redeemable_on_any_process_sharing_the_key(make_gateway: GatewayFactory) -> None:
    issuer = await make_gateway(TICKET_SECRET="shared-key")
    other = await make_gateway(TICKET_SECRET="shared-key")
    stranger = await make_gateway(TICKET_SECRET="another-key")
    assert issuer.directory is not None
    value, _ = issuer.auth.issue_ticket(issuer.directory.principal(ALICE[0]))
    with pytest.raises(InvalidStatus) as info:
        await websockets.connect(ws_url(stranger, f"ticket={value}"), subprotocols=[Subprotocol("jmap")])
    assert info.value.response.status_code == 401
    body, _, signature = value.partition(".")
    forged = body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + signature
    with pytest.raises(InvalidStatus):
        await websockets.connect(ws_url(other, f"ticket={forged}"), subprotocols=[Subprotocol("jmap")])
    async with websockets.connect(ws_url(other, f"ticket={value}"), subprotocols=[Subprotocol("jmap")]) as ws:
        await ws.send(echo("T2"))
        assert (await recv_json(ws))["requestId"] == "T2"
    with pytest.raises(InvalidStatus):  # single use on the process that redeemed it
        await websockets.connect(ws_url(other, f"ticket={value}"), subprotocols=[Subprotocol("jmap")])
