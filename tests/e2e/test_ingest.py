"""The event-ingest stream (`POST /admin/events`, NDJSON, first request of a connection) over real sockets, with
the request written byte for byte: framing (chunked, Content-Length, malformed), authentication, expectations,
limits, a client that goes away, a gateway that stops, and the same stream after other requests (aiohttp's path).
Every test runs on the compiled ingest read (gateway._ingest) and on its twin."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.app import Gateway
from gateway.bus import memory
from gateway.bus.events import STATE_CHANGE_EVENT
from gateway.directory import account_id_for
from gateway.transport import ingest
from tests.conftest import ADMIN, BOB, GatewayFactory, connect
from tests.e2e.test_push import enable
from tests.e2e.test_ws_protocol import recv_json
from tests.native_impl import load_impl

BOB_ID = account_id_for(BOB[0])


@pytest.fixture(autouse=True, params=["native", "python"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateways of a test read their streams with the compiled Reader or with its twin."""
    impl = load_impl("_ingest", request.param)
    monkeypatch.setattr(ingest, "impl", impl)
    monkeypatch.setattr(memory, "impl", impl)


def line(email: str, user: str = BOB[0]) -> bytes:
    return json.dumps({"type": STATE_CHANGE_EVENT, "username": user, "typeStates": {"Email": email}}).encode() + b"\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def head(*extra: str, token: str | None = ADMIN, framing: str = "Transfer-Encoding: chunked") -> bytes:
    lines = ["POST /admin/events HTTP/1.1", "Host: gw", "Content-Type: application/x-ndjson", framing, *extra]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(gw: Gateway, *parts: bytes, pause: float = 0.0) -> tuple[int, bytes, bytes]:
    """Write `parts` (with a pause between them), then read the answer to its end: (status, head, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        raw = await asyncio.wait_for(reader.read(), 10)  # every answer of the stream closes the connection
    finally:
        writer.close()
    while raw.startswith(b"HTTP/1.1 100 "):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    answer_head, _, body = raw.partition(b"\r\n\r\n")
    return int(answer_head.split(b" ")[1]), answer_head, body


async def pushed_email(ws: object) -> list[str]:
    """The Email states pushed until the socket is quiet for a moment."""
    seen: list[str] = []
    while True:
        try:
            msg = await asyncio.wait_for(recv_json(ws), 0.3)  # type: ignore[arg-type]
        except TimeoutError:
            return seen
        seen.append(msg["changed"][BOB_ID]["Email"])


async def test_a_chunked_stream_pushes_each_line_and_answers_with_the_count(gateway: Gateway) -> None:
    async with await connect(gateway) as ws:
        await enable(ws)
        # Lines split across chunks and reads, two in one chunk, a last line without its newline.
        body = line("e1") + line("e2") + line("e3")[:10]
        status, answer_head, answer = await exchange(
            gateway, head(), chunk(body), chunk(line("e3")[10:] + line("e4")), chunk(line("e5").rstrip()),
            b"0\r\n\r\n", pause=0.05)
        assert status == 202 and json.loads(answer) == {"accepted": 5}
        assert b"connection: close" in answer_head.lower()
        pushed = await pushed_email(ws)
        assert pushed[-1] == "e5" and set(pushed) <= {"e1", "e2", "e3", "e4", "e5"}  # merged when close together
    text = (await gateway.metrics.exposition()).decode()
    assert 'gateway_http_requests_total{route="/admin/events",status="202"}' in text


async def test_a_content_length_body(gateway: Gateway) -> None:
    body = line("c1") + line("c2")
    status, _, answer = await exchange(gateway, head(framing=f"Content-Length: {len(body)}") + body)
    assert status == 202 and json.loads(answer) == {"accepted": 2}


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("wrong", 403)])
async def test_the_admin_token_is_required(gateway: Gateway, token: str | None, status: int) -> None:
    got, answer_head, answer = await exchange(gateway, head(token=token) + chunk(line("x")) + b"0\r\n\r\n")
    assert got == status and b"application/problem+json" in answer_head
    assert json.loads(answer)["status"] == status


async def test_without_an_admin_token_the_stream_is_404(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(ADMIN_TOKEN="")
    status, _, _ = await exchange(gw, head() + b"0\r\n\r\n")
    assert status == 404


async def test_expectations(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(head("Expect: 100-continue"))
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(chunk(line("x1")) + b"0\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert rest.startswith(b"HTTP/1.1 202 ")
    status, _, _ = await exchange(gateway, head("Expect: something-else") + b"0\r\n\r\n")
    assert status == 417


async def test_a_bad_line_stops_the_stream_after_publishing_the_lines_before_it(gateway: Gateway) -> None:
    async with await connect(gateway) as ws:
        await enable(ws)
        status, _, answer = await exchange(gateway, head(), chunk(line("b1") + b"{nope}\n" + line("b2")),
                                           b"0\r\n\r\n")
        problem = json.loads(answer)
        assert status == 400 and "Line 2 " in problem["detail"]
        assert "the 1 events before it were published" in problem["detail"]
        assert await pushed_email(ws) == ["b1"]


@pytest.mark.parametrize("bad", [
    b"zz\r\n",  # a chunk size that is no hex number
    b"5\r\nabcdefgh\r\n",  # a chunk longer than its size
    b"ffffffffffffffffffff\r\n",  # a size that overflows
])
async def test_malformed_chunked_framing_is_400_with_what_was_published(gateway: Gateway, bad: bytes) -> None:
    async with await connect(gateway) as ws:
        await enable(ws)
        status, _, answer = await exchange(gateway, head(), chunk(line("m1")), bad, pause=0.05)
        problem = json.loads(answer)
        assert status == 400 and "RFC 9112" in problem["detail"], problem
        assert "the 1 events before it were published" in problem["detail"]
        assert await pushed_email(ws) == ["m1"]


async def test_both_content_length_and_chunked_is_refused(gateway: Gateway) -> None:
    # RFC 9112 §6.3: a request with both is a smuggling attempt, and is answered 400 before any event is read.
    status, _, _ = await exchange(gateway, head("Content-Length: 5") + chunk(line("s1")) + b"0\r\n\r\n")
    assert status == 400


async def test_a_line_longer_than_the_limit_is_413(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(MAX_SIZE_REQUEST="2048")
    status, _, answer = await exchange(gw, head(), chunk(line("ok")), chunk(b"x" * 3000), pause=0.05)
    assert status == 413 and "the 1 events before it were published" in json.loads(answer)["detail"]


async def test_a_body_cut_short_is_400(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(head() + chunk(line("t1")))
    await writer.drain()
    writer.write_eof()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400 ") and b"the 1 events before it were published" in raw


async def test_a_client_that_goes_away_leaves_the_gateway_serving(gateway: Gateway) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(head() + chunk(line("g1")))
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()
    await asyncio.sleep(0.05)
    assert not gateway.ingest.streams
    status, _, answer = await exchange(gateway, head(), chunk(line("g2")), b"0\r\n\r\n")
    assert status == 202 and json.loads(answer) == {"accepted": 1}


async def test_an_open_stream_is_answered_503_when_the_gateway_stops(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(head() + chunk(line("h1") + line("h2")))
    await writer.drain()
    while not gw.ingest.streams or next(iter(gw.ingest.streams)).accepted < 2:
        await asyncio.sleep(0.01)
    await gw.stop(grace=0)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in raw


async def test_a_stream_after_other_requests_on_one_connection(gateway: Gateway) -> None:
    """Only a connection's first request reaches the ingest protocol; later ones are aiohttp's, same rules."""
    async with await connect(gateway) as ws:
        await enable(ws)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b'"ok"}'), 5)
        assert first.startswith(b"HTTP/1.1 200 ")
        writer.write(head() + chunk(line("k1") + b"[1]\n") + b"0\r\n\r\n")
        rest = await asyncio.wait_for(reader.readuntil(b"published.\"}"), 5)
        writer.close()
        assert rest.startswith(b"HTTP/1.1 400 ") and b"Line 2 " in rest
        assert await pushed_email(ws) == ["k1"]
