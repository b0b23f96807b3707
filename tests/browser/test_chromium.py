"""JMAP push in a real browser: headless Chromium loads a page from the gateway's origin, gets a ticket with
`fetch`, opens `new WebSocket(url, "jmap")` with permessage-deflate, enables push, and receives the StateChange of
a mail delivered over real SMTP; a Request/Response round trip and a resynchronisation run from the page too.

The page (push_page.html) keeps one part per push transport in window.jmapTest; the helpers below read any part:
the EventSource test (RFC 8620 §7.3) is the WebSocket test with `startEventSource` and the "eventSource" part.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import socket
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from typing import Any

import pytest

from gateway.directory import account_id_for
from tests.browser.support import (
    PAGE,
    SameOriginFront,
    header,
    require_chromium,
    scan_frames,
    split_response,
    start_chromium,
    text_messages,
)
from tests.conftest import BOB, GatewayFactory

WAIT = 20.0  # seconds a condition in the page may take before the test fails (not a timing assertion)


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module (starting it costs seconds); each test loads the page afresh."""
    require_chromium()
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
async def front() -> AsyncIterator[SameOriginFront]:
    relay = SameOriginFront(PAGE.read_bytes())
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def send_mail(port: int, to: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = "carol@example.org"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    msg.set_content("Hello from the browser test.")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.send_message(msg)


# --- driving the page (WebDriver calls block: they run in a thread, the gateway runs in this loop) -----------

async def call_page(driver: Any, function: str, *args: Any) -> Any:
    """Await `jmapTest.<function>(...args)` in the page; its resolved value (JSON-like), or fail with its error."""
    script = ("const done = arguments[arguments.length - 1];"
              f"jmapTest.{function}(...Array.from(arguments).slice(0, -1))"
              ".then((value) => done({ok: value}), (e) => done({error: String(e && e.stack || e)}));")
    driver.set_script_timeout(WAIT)
    result = await asyncio.to_thread(driver.execute_async_script, script, *args)
    if "error" in result:
        pytest.fail(f"jmapTest.{function} failed in the page: {result['error']}")
    return result["ok"]


async def page_until(driver: Any, expression: str, what: str) -> Any:
    """Poll a JavaScript expression in the page until it is truthy; its value, or fail after WAIT seconds."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def wait() -> Any:
        return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(
            lambda d: d.execute_script(f"return {expression};"))

    try:
        return await asyncio.to_thread(wait)
    except TimeoutException:
        state = await asyncio.to_thread(driver.execute_script, "return JSON.stringify(window.jmapTest);")
        pytest.fail(f"timed out after {WAIT:g}s waiting for {what}; jmapTest = {state}")


async def state_changes(driver: Any, part: str, count: int = 1) -> list[dict[str, Any]]:
    """The first `count` StateChanges a push part of the page received, once it has them."""
    changes: list[dict[str, Any]] = await page_until(
        driver, f"jmapTest.{part} && jmapTest.{part}.stateChanges.length >= {count} && jmapTest.{part}.stateChanges",
        f"{count} StateChange(s) in the page's {part} part")
    return changes[:count]


# --- the tests -----------------------------------------------------------------------------------------------

async def test_websocket_push_reaches_chromium(chromium: Any, front: SameOriginFront,
                                               make_gateway: GatewayFactory) -> None:
    smtp_port = free_port()
    # Behind the front, the session advertises the front's origin: the page connects where it was loaded from.
    gw = await make_gateway(backend=True, SMTP_PORT=str(smtp_port), PUBLIC_URL=front.url)
    front.upstream_port = gw.port
    account = account_id_for(BOB[0])
    await asyncio.to_thread(chromium.get, front.url + "/")

    part = await call_page(chromium, "startWebSocket", BOB[0], BOB[1], {
        "echo": [["Core/echo", {"hello": "from Chromium", "padding": "x" * 300}, "c0"]],
        "mailboxes": [["Mailbox/get", {"accountId": account, "ids": None,
                                       "properties": ["name", "role", "totalEmails"]}, "m0"]],
    })
    assert part["url"] == f"ws://127.0.0.1:{front.port}/jmap/ws"
    assert part["accountId"] == account
    assert part["protocol"] == "jmap"
    # RFC 7692 from the browser's side: Chromium agreed to compress (ws.extensions is the server's answer).
    assert "permessage-deflate" in part["extensions"]

    responses = await page_until(chromium, "jmapTest.ws.responses.echo && jmapTest.ws.responses.mailboxes"
                                           " && jmapTest.ws.responses", "the two responses in the page")
    assert responses["echo"]["@type"] == "Response"
    assert responses["echo"]["methodResponses"] == [
        ["Core/echo", {"hello": "from Chromium", "padding": "x" * 300}, "c0"]]
    [[name, mailboxes, _]] = responses["mailboxes"]["methodResponses"]
    assert name == "Mailbox/get"
    inbox = next(m for m in mailboxes["list"] if m["role"] == "inbox")
    assert inbox["totalEmails"] == 0

    # Both responses are in, so the push subscription enabled before them is registered: the mail is pushed.
    await asyncio.to_thread(send_mail, smtp_port, BOB[0], "hello Chromium")
    [change] = await state_changes(chromium, "ws")
    assert change["@type"] == "StateChange"
    assert list(change["changed"]) == [account]
    types = change["changed"][account]
    assert {"Email", "Mailbox", "EmailDelivery"} <= set(types)
    assert types["Mailbox"] != mailboxes["state"]

    # The page resynchronises over the same socket, as a webmail does after a push.
    await asyncio.to_thread(chromium.execute_script, "jmapTest.wsSend('sync', arguments[0]);", [
        ["Email/query", {"accountId": account, "sort": [{"property": "receivedAt", "isAscending": False}]}, "q"],
        ["Email/get", {"accountId": account, "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                       "properties": ["subject", "mailboxIds"]}, "g"],
    ])
    sync = await page_until(chromium, "jmapTest.ws.responses.sync", "the resynchronisation response")
    emails = sync["methodResponses"][1][1]["list"]
    assert [e["subject"] for e in emails] == ["hello Chromium"]
    assert emails[0]["mailboxIds"] == {inbox["id"]: True}
    assert sync["methodResponses"][1][1]["state"] == types["Email"]

    await asyncio.to_thread(chromium.execute_script, "jmapTest.socket.close(1000, 'done');")
    closed = await page_until(chromium, "jmapTest.ws.closed", "the close of the socket")
    assert closed["code"] == 1000
    # Only StateChange is ever pushed (DESIGN.md §4): nothing else arrived without a request id.
    assert await asyncio.to_thread(chromium.execute_script, "return jmapTest.ws.others;") == []

    # The server's side of the same connection, from the bytes the front relayed.
    [flow] = front.websocket_flows()
    assert flow.path.startswith("/jmap/ws?ticket=")
    assert "jmap" in header(flow.head, "sec-websocket-protocol")
    offer = header(flow.head, "sec-websocket-extensions")
    assert "permessage-deflate" in offer and "client_max_window_bits" in offer  # what Chromium offers
    head, server_frames = split_response(flow.to_client)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert header(head, "sec-websocket-extensions") == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    # The gateway compressed the push (once for all its compressed recipients) and its responses: all of them
    # are above GATEWAY_DEFLATE_MIN_BYTES. And it inflated Chromium's compressed requests: their answers came.
    sent = text_messages(scan_frames(server_frames))
    assert (True, change) in [(compressed, json.loads(text)) for compressed, text in sent]
    assert all(compressed for compressed, _ in sent) and len(sent) == 4
    received = text_messages(scan_frames(flow.to_server))
    assert [json.loads(text)["@type"] for _, text in received] == [
        "WebSocketPushEnable", "Request", "Request", "Request"]
    assert any(compressed for compressed, _ in received)  # Chromium compresses what it sends


async def test_event_source_push_reaches_chromium(chromium: Any, front: SameOriginFront,
                                                  make_gateway: GatewayFactory) -> None:
    """RFC 8620 §7.3 from the browser: `new EventSource(url)` with a ticket in the URL (it cannot send
    Authorization) receives the StateChange of an SMTP delivery as a `state` event whose id is its pushState; when
    the connection breaks, the page opens a new one with a fresh ticket and is pushed the next delivery."""
    smtp_port = free_port()
    gw = await make_gateway(backend=True, SMTP_PORT=str(smtp_port), PUBLIC_URL=front.url)
    front.upstream_port = gw.port
    account = account_id_for(BOB[0])
    await asyncio.to_thread(chromium.get, front.url + "/")

    part = await call_page(chromium, "startEventSource", BOB[0], BOB[1], 30)
    assert part["url"] == f"{front.url}/jmap/eventsource/?types=*&closeafter=no&ping=30"
    assert part["accountId"] == account and part["opened"] == 1
    # Open in the page means the gateway answered and registered the stream: a delivery now is pushed.
    await asyncio.to_thread(send_mail, smtp_port, BOB[0], "hello EventSource")
    [change] = await state_changes(chromium, "eventSource")
    assert change["@type"] == "StateChange" and list(change["changed"]) == [account]
    assert {"Email", "Mailbox", "EmailDelivery"} <= set(change["changed"][account])
    ids = await asyncio.to_thread(chromium.execute_script, "return jmapTest.eventSource.ids;")
    assert ids == [change["pushState"]]  # the event id is the pushState (Last-Event-ID resumes from it)

    # The server's side, from the relayed bytes: a ticket in the URL, no Authorization, an event stream, the state
    # event. Chromium may send the request on a keep-alive connection that carried the page's fetches first.
    [flow] = front.event_source_flows()
    sent = bytes(flow.head + flow.to_server)
    request = sent[sent.index(b"GET /jmap/eventsource/"):]
    request = request[:request.index(b"\r\n\r\n") + 4]
    assert b"&ticket=" in request.split(b"\r\n", 1)[0] and header(request, "authorization") == ""
    assert header(request, "accept") == "text/event-stream"
    received = bytes(flow.to_client)
    answer = received[received.rindex(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream"):]
    head, body = answer.split(b"\r\n\r\n", 1)
    assert header(head, "cache-control") == "no-cache"
    assert body.startswith(b"event: state\ndata: ") and b"\nid: " + change["pushState"].encode() in body

    # The connection breaks: the page reopens with a new ticket (the first one is spent) and is pushed again.
    flow.abort()
    await page_until(chromium, "jmapTest.eventSource.opened >= 2", "the EventSource to be opened again")
    tickets = await asyncio.to_thread(chromium.execute_script, "return jmapTest.eventSource.tickets;")
    assert len(tickets) == 2 and tickets[0] != tickets[1]
    await asyncio.to_thread(send_mail, smtp_port, BOB[0], "hello again")
    second = (await state_changes(chromium, "eventSource", 2))[1]
    assert second["changed"][account]["Email"] != change["changed"][account]["Email"]
    await asyncio.to_thread(chromium.execute_script, "jmapTest.source.close();")
