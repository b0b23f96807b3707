"""The reproductions of issue 16 over real sockets: nested JSON, upgrades RFC 6455 refuses, oversized heads and
admin names. Each failed before its fix (the issue says how); the log defects are in test_hostile_logs.py."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.directory import account_id_for
from tests.conftest import ADMIN, ALICE, BOB, GatewayFactory, basic, http_url
from tests.wsraw import CLOSE, TEXT, RawClient

KEY = base64.b64encode(b"0123456789abcdef").decode()
CORE = "urn:ietf:params:jmap:core"


async def exchange(port: int, data: bytes, *, chunks: int = 1) -> bytes:
    """Send `data` (in `chunks` writes), then read until the server closes; the raw answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        step = max(1, len(data) // chunks)
        for i in range(0, len(data), step):
            writer.write(data[i:i + step])
            await writer.drain()
        return await asyncio.wait_for(reader.read(-1), 20)
    except ConnectionResetError:
        pytest.fail("the server reset the connection instead of answering")
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


def assert_problem(answer: bytes, status: int) -> dict[str, str]:
    got, headers, body = parse(answer)
    assert got == status, answer[:300]
    assert headers["content-type"].startswith("application/problem+json")
    problem = json.loads(body)
    assert problem["status"] == status and problem["title"]
    return headers


def upgrade(port: int, *, host: bool = True, key: str | None = KEY, version: str | None = "13",
            extra: str = "", auth: str | None = None) -> bytes:
    lines = ["GET /jmap/ws HTTP/1.1"]
    if host:
        lines.append(f"Host: 127.0.0.1:{port}")
    lines += ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Protocol: jmap",
              f"Authorization: {auth or basic(BOB)}"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + extra + "\r\n\r\n").encode()


# --- (1) nesting ----------------------------------------------------------------------------------------------

async def test_deeply_nested_json_on_the_socket_is_not_json_and_the_socket_stays_open(gateway: Gateway) -> None:
    client = await RawClient.connect(gateway.port, headers={"Authorization": basic(BOB)})
    client.send(TEXT, b"[" * 100_000 + b"]" * 100_000)
    opcode, payload, _ = await client.recv_frame()
    assert opcode == TEXT, payload  # was a close frame with 1011
    error = json.loads(payload)
    assert error["@type"] == "RequestError" and error["type"].endswith(":notJSON") and error["requestId"] is None
    nested = json.dumps({"@type": "Request", "id": "deep", "using": [CORE],
                         "methodCalls": [["Core/echo", {"x": json.loads("[" * 70 + "]" * 70)}, "c"]]})
    client.send(TEXT, nested.encode())
    assert json.loads((await client.recv_frame())[1])["type"].endswith(":notJSON")
    # Still open, still served.
    client.send(TEXT, json.dumps({"@type": "Request", "id": "ok", "using": [CORE],
                                  "methodCalls": [["Core/echo", {"x": [[[1]]]}, "c"]]}).encode())
    answer = json.loads((await client.recv_frame())[1])
    assert answer["@type"] == "Response" and answer["requestId"] == "ok"
    client.send(CLOSE, (1000).to_bytes(2, "big"))
    assert (await client.recv_frame())[0] == CLOSE


async def test_deeply_nested_json_over_http_is_400_problem(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(backend=True)
    body = b'{"using":["urn:ietf:params:jmap:core"],"methodCalls":[["Core/echo",' + \
           b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b',"c"]]}'
    async with aiohttp.ClientSession() as http, \
            http.post(http_url(gw, "/jmap/api"), data=body, headers={"Authorization": basic(BOB)}) as r:
        assert r.status == 400  # was 500
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert (await r.json())["type"] == "urn:ietf:params:jmap:error:notJSON"


async def test_the_depth_limit_is_a_setting(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(MAX_JSON_DEPTH="8")
    client = await RawClient.connect(gw.port, headers={"Authorization": basic(BOB)})
    arg = {"x": [[[[[1]]]]]}  # 4 (request, methodCalls, call, arguments) + 5 = 9 levels
    client.send(TEXT, json.dumps({"@type": "Request", "using": [CORE], "methodCalls": [["Core/echo", arg, "c"]]})
                .encode())
    assert json.loads((await client.recv_frame())[1])["type"].endswith(":notJSON")


# --- (3) upgrades RFC 6455 §4.2.1 refuses ---------------------------------------------------------------------

async def test_upgrade_without_key_is_400(gateway: Gateway) -> None:
    assert_problem(await exchange(gateway.port, upgrade(gateway.port, key=None)), 400)
    assert_problem(await exchange(gateway.port, upgrade(gateway.port, key="c2hvcnQ=")), 400)  # not 16 bytes


async def test_upgrade_with_another_version_is_426_naming_13(gateway: Gateway) -> None:
    headers = assert_problem(await exchange(gateway.port, upgrade(gateway.port, version="8")), 426)
    assert headers["sec-websocket-version"] == "13"
    assert_problem(await exchange(gateway.port, upgrade(gateway.port, version=None)), 400)


async def test_upgrade_without_host_or_with_two_is_400(gateway: Gateway) -> None:
    assert_problem(await exchange(gateway.port, upgrade(gateway.port, host=False)), 400)
    assert_problem(await exchange(gateway.port, upgrade(gateway.port, extra="\r\nHost: other")), 400)


async def test_upgrade_with_a_body_or_control_characters_is_400(gateway: Gateway) -> None:
    assert_problem(await exchange(gateway.port, upgrade(gateway.port, extra="\r\nContent-Length: 5")), 400)
    assert_problem(await exchange(gateway.port, upgrade(gateway.port, extra="\r\nX-Odd: a\x01b")), 400)


async def test_a_valid_upgrade_still_switches(gateway: Gateway) -> None:
    # Connection with several tokens (as Firefox sends it) is valid too (RFC 6455 §4.2.1 (4)).
    data = upgrade(gateway.port).replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade")
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 ")
    writer.close()


# --- (4) oversized heads --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "chunks"), [
    ("one header of 32,000 bytes", 1), ("10,000 headers", 1), ("1 MiB", 1), ("just over the limit", 1),
    ("one header of 32,000 bytes", 40),
])
async def test_oversized_upgrade_heads_get_431(gateway: Gateway, shape: str, chunks: int) -> None:
    extra = {"one header of 32,000 bytes": "\r\nX-Big: " + "a" * 32_000,
             "10,000 headers": "".join(f"\r\nX-H{i}: v" for i in range(10_000)),
             "1 MiB": "\r\nX-Big: " + "a" * (1 << 20),
             "just over the limit": ""}[shape]
    data = upgrade(gateway.port, extra=extra)
    if shape == "just over the limit":
        data = upgrade(gateway.port, extra="\r\nX-Pad: " + "p" * (16385 - len(data) - 9))
        assert len(data) == 16385
    assert_problem(await exchange(gateway.port, data, chunks=chunks), 431)  # was no answer at all


async def test_a_head_of_exactly_the_limit_is_served(gateway: Gateway) -> None:
    probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: \r\n\r\n"
    data = probe.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (16384 - len(probe)))
    assert len(data) == 16384
    assert parse(await exchange(gateway.port, data))[0] == 200


@pytest.mark.parametrize("extra", ["X-Big: " + "a" * 32_000, "".join(f"X-H{i}: v\r\n" for i in range(300))])
async def test_oversized_http_heads_get_431(gateway: Gateway, extra: str) -> None:
    data = f"GET /healthz HTTP/1.1\r\nHost: x\r\n{extra.rstrip()}\r\n\r\n".encode()
    assert_problem(await exchange(gateway.port, data), 431)


async def test_later_requests_of_a_keep_alive_connection_get_431_too(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = parse(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
    assert status == 200
    await reader.readexactly(int(headers["content-length"]))
    # The front protocol saw only the first head; aiohttp's parser checks the lines of the later ones.
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert_problem(await asyncio.wait_for(reader.read(-1), 10), 431)
    writer.close()


async def test_the_head_limit_is_a_setting(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(MAX_HEAD_BYTES="65536")
    data = upgrade(gw.port, extra="\r\nX-Big: " + "a" * 32_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 ")  # picows' own 16 KiB limit does not apply: it gets a short head
    writer.close()


# --- (5) delegations ------------------------------------------------------------------------------------------

async def put(gw: Gateway, path: str, method: str = "PUT") -> tuple[int, dict[str, Any] | None]:
    data = (f"{method} /admin/delegations/{path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()
    status, headers, body = parse(await exchange(gw.port, data))
    if status >= 400:
        assert headers["content-type"].startswith("application/problem+json")
        return status, json.loads(body)
    return status, None


def delegates_of(gw: Gateway, owner: str) -> set[str]:
    """Who can see `owner`'s account (besides the owner), as the directory's principals say."""
    directory = gw.directory
    assert directory is not None
    acc = account_id_for(owner)
    return {u for u in directory.usernames() if u != owner and acc in directory.principal(u).account_ids}


async def test_delegations_name_existing_users_only(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(backend=True)
    assert gw.directory is not None
    for path, status in [
        (f"{BOB[0]}/nobody@example.com", 404),           # unknown delegate (was 201)
        (f"nobody@example.com/{BOB[0]}", 404),           # unknown owner
        ("x" * 5000 + f"/{BOB[0]}", 400),                # far longer than any address
        (f"%2e%2e/{BOB[0]}", 404),                       # decoded to "..": no user
        (f"{BOB[0]}/%2e%2e%2f{ALICE[0]}", 400),          # a slash smuggled into a name
        (f"{BOB[0]}/{BOB[0].upper()}", 400),             # the same user in another case: to its owner
    ]:
        assert (await put(gw, path))[0] == status, path
    assert delegates_of(gw, BOB[0]) == set()
    assert delegates_of(gw, "nobody@example.com") == set()
    # Case variants name the user as the directory spells it, as SMTP recipients do.
    assert (await put(gw, f"{BOB[0].upper()}/Alice@Example.COM"))[0] == 201
    assert delegates_of(gw, BOB[0]) == {ALICE[0]}
    assert account_id_for(BOB[0]) in gw.directory.principal(ALICE[0]).account_ids
    assert (await put(gw, f"{BOB[0]}/{ALICE[0]}"))[0] == 204  # already granted: nothing piles up
    assert (await put(gw, f"bob@EXAMPLE.com/{ALICE[0]}", "DELETE"))[0] == 204
    assert delegates_of(gw, BOB[0]) == set()
