"""Front mode over the upstream's EventSource (GATEWAY_UPSTREAM_EVENTS=eventsource): a front gateway in this process
in front of a second gateway PROCESS with the embedded backend, whose all-in-one role serves RFC 8620 §7.3 event
streams. No RabbitMQ anywhere: the front's events come from one upstream stream per account.

Mail delivered over SMTP to the upstream reaches WebSocket clients of the front; the sessions of one account share
one upstream stream, which follows its sessions' credentials and closes after the last one left; it survives the
upstream being killed and restarted (Last-Event-ID, then a re-read of the account); and the cap on streams holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import websockets

from gateway.app import Gateway
from gateway.bus.eventsource import UpstreamEventStreams
from gateway.directory import account_id_for
from tests.conftest import ALICE, BOB, GatewayFactory, basic, connect, http_url, settings_env
from tests.e2e.test_seed_story import free_port, send_mail

ROOT = Path(__file__).resolve().parents[2]
BOB_ACC, ALICE_ACC = account_id_for(BOB[0]), account_id_for(ALICE[0])
WAIT = 30.0  # seconds a condition may take before the test fails (not a timing assertion)
JWT_SECRET = "front-eventsource-test-secret-32-bytes!"


class UpstreamProcess:
    """`python -m gateway` (all-in-one, embedded backend on a database file) on a given HTTP and SMTP port, so that
    it can be killed and started again where the front expects it."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.smtp_port = free_port()
        self.db = tmp / "upstream.sqlite3"
        self.logs = tmp
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def session_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jmap/session"

    async def start(self) -> None:
        env = dict(os.environ)
        env.update(settings_env(GATEWAY_PORT=str(self.port), GATEWAY_SMTP_PORT=str(self.smtp_port),
                                GATEWAY_DB=str(self.db), GATEWAY_DATA_DIR=str(self.logs)))
        log = self.logs / f"upstream-{self.port}-{self.starts}.log"
        self.starts += 1
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", cwd=ROOT, env=env,
                                                        stdout=asyncio.subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
        except TimeoutError:
            line = ""
        if re.search(r"listening on http://", line) is None:
            proc.kill()
            await proc.wait()
            pytest.fail(f"the upstream gateway did not start: {line!r}\n{log.read_text()[-2000:]}")
        self.proc = proc

    async def kill(self) -> None:
        """SIGKILL: the upstream vanishes as in a crash (the kernel closes its sockets)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def metric(self, name: str) -> float:
        return await scrape(f"http://127.0.0.1:{self.port}/metrics", name)


UpstreamFactory = Callable[..., Awaitable[UpstreamProcess]]


@pytest.fixture
async def upstreams(tmp_path: Path) -> AsyncIterator[UpstreamFactory]:
    started: list[UpstreamProcess] = []

    async def factory(port: int | None = None) -> UpstreamProcess:
        upstream = UpstreamProcess(tmp_path, port)
        started.append(upstream)
        await upstream.start()
        return upstream

    yield factory
    for upstream in started:
        await upstream.stop()


async def make_front(make_gateway: GatewayFactory, upstream: UpstreamProcess, **overrides: str) -> Gateway:
    return await make_gateway(UPSTREAM_URL=upstream.session_url, UPSTREAM_EVENTS="eventsource", **overrides)


def streams(front: Gateway) -> UpstreamEventStreams:
    bus = front.bus
    assert isinstance(bus, UpstreamEventStreams)
    return bus


async def scrape(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(url) as answer:
        text = await answer.text()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.M)
    assert found is not None, f"{name} not in {url}"
    return float(found.group(1))


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `condition` until it holds; fail after WAIT seconds."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {WAIT:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def enable(ws: websockets.ClientConnection, push_state: str | None = None) -> None:
    msg: dict[str, Any] = {"@type": "WebSocketPushEnable", "dataTypes": None}
    if push_state is not None:
        msg["pushState"] = push_state
    await ws.send(json.dumps(msg))


async def next_change(ws: websockets.ClientConnection, timeout: float = WAIT) -> dict[str, Any]:
    while True:
        msg: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if msg.get("@type") == "StateChange":
            return msg


async def states_until(ws: websockets.ClientConnection, account: str, wanted: dict[str, str],
                       wait: float = WAIT) -> dict[str, str]:
    """Merge the pushes of `account` (newest state per type wins) until every type of `wanted` has its state."""
    seen: dict[str, str] = {}
    deadline = asyncio.get_running_loop().time() + wait
    while any(seen.get(t) != s for t, s in wanted.items()):
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            pytest.fail(f"the front's client ended at {seen}, not at the upstream's {wanted}")
        try:
            change = await next_change(ws, left)
        except TimeoutError:
            continue
        seen.update(change["changed"].get(account, {}))
    return seen


async def upstream_states(upstream: UpstreamProcess, user: tuple[str, str], account: str) -> dict[str, str]:
    """Every current state of `account` as the upstream itself says (RFC 8887 resume with an unreadable
    pushState: the full current state, EmailDelivery included)."""
    ws = await websockets.connect(f"ws://127.0.0.1:{upstream.port}/jmap/ws", subprotocols=[websockets.Subprotocol(
        "jmap")], additional_headers={"Authorization": basic(user)}, compression=None, ping_interval=None)
    async with ws:
        await enable(ws, push_state="not-a-push-state")
        change = await next_change(ws)
    states: dict[str, str] = change["changed"][account]
    return states


# --- the tests -----------------------------------------------------------------------------------------------

async def test_one_stream_per_account_follows_its_sessions(upstreams: UpstreamFactory,
                                                           make_gateway: GatewayFactory) -> None:
    upstream = await upstreams()
    front = await make_front(make_gateway, upstream)
    bus = streams(front)
    first = await connect(front)
    second = await connect(front)
    await enable(first)
    await enable(second)

    async def one_stream_each_side() -> bool:
        return bus.streams_open == 1 and await upstream.metric("gateway_eventsource_connections_open") == 1

    # Two local sessions of Bob's account, one upstream stream (both sides count it).
    await until(one_stream_each_side, "one upstream stream for Bob's two sessions")
    assert await scrape(http_url(front, "/metrics"), "gateway_bus_upstream_streams_open_total") == 1

    await asyncio.to_thread(send_mail, upstream.smtp_port, BOB[0], "over the upstream's event stream")
    one, two = await next_change(first), await next_change(second)
    assert one["changed"] == two["changed"]
    assert {"Email", "Mailbox", "Thread", "EmailDelivery"} <= set(one["changed"][BOB_ACC])
    assert bus.attempts == 1 and bus.received_events >= 1

    # The stream reads with the credentials of the session there longest: when it leaves, another one's take over.
    await first.close()
    await until(lambda: _true(bus.switches == 1 and bus.streams_open == 1), "the stream to reopen as the other session")
    await until(one_stream_each_side, "the upstream to hold one stream again")
    await asyncio.to_thread(send_mail, upstream.smtp_port, BOB[0], "after the switch")
    change = await next_change(second)
    assert change["changed"][BOB_ACC]["Email"] != one["changed"][BOB_ACC]["Email"]

    # After the last session left, the stream closes (after the delay that absorbs a reconnection).
    await second.close()

    async def closed() -> bool:
        return bus.streams_open == 0 and await upstream.metric("gateway_eventsource_connections_open") == 0

    await until(closed, "the upstream stream to close after the last session left")
    assert await scrape(http_url(front, "/metrics"), "gateway_bus_upstream_streams_total") == 0


async def test_reconnects_with_last_event_id_after_the_upstream_restarts(
        upstreams: UpstreamFactory, make_gateway: GatewayFactory) -> None:
    upstream = await upstreams()
    front = await make_front(make_gateway, upstream)
    bus = streams(front)
    ws = await connect(front)
    await enable(ws)
    await until(lambda: _true(bus.streams_open == 1), "the upstream stream")
    await asyncio.to_thread(send_mail, upstream.smtp_port, BOB[0], "before the crash")
    before = (await next_change(ws))["changed"][BOB_ACC]  # the stream has an event id to resume from now

    await upstream.kill()
    await until(lambda: _true(not bus.ready and bus.failures >= 1), "the front to see the stream fail")
    async with aiohttp.ClientSession() as http, http.get(http_url(front, "/readyz")) as answer:
        assert answer.status == 503  # the bus (the upstream's streams) is not ready

    # A delivery while the front's stream is down, certainly: the upstream runs meanwhile on another port (same
    # database), where the front does not look. Then it is back where the front expects it.
    elsewhere = await upstreams()  # the same database file (one per test)
    await asyncio.to_thread(send_mail, elsewhere.smtp_port, BOB[0], "while the stream was down")
    await elsewhere.stop()
    await upstream.start()
    newest = await upstream_states(upstream, BOB, BOB_ACC)
    assert newest["EmailDelivery"] != before["EmailDelivery"]

    # The front ends at the newest states. EmailDelivery is reported by no /get: only the upstream's resume from
    # Last-Event-ID (a pushState to a jmap-push-gateway) can tell the front it moved.
    # The front's back-off grew while the upstream was away (up to 30 s between attempts).
    moved = {t: newest[t] for t in ("Email", "Mailbox", "Thread", "EmailDelivery")}  # the delivery's types
    seen = await states_until(ws, BOB_ACC, moved, wait=2 * WAIT)
    assert seen["EmailDelivery"] == newest["EmailDelivery"]
    assert bus.reconnects >= 1 and bus.ready
    await ws.close()


async def test_the_cap_refuses_streams_and_promotes_a_waiting_account(
        upstreams: UpstreamFactory, make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture) -> None:
    upstream = await upstreams()
    front = await make_front(make_gateway, upstream, UPSTREAM_EVENT_STREAMS="1")
    bus = streams(front)
    bob = await connect(front)
    await enable(bob)
    await until(lambda: _true(bus.streams_open == 1), "Bob's stream")
    with caplog.at_level(logging.WARNING, logger="gateway.bus.eventsource"):
        alice = await connect(front, ALICE)
        await enable(alice)
        second_alice = await connect(front, ALICE)
        await enable(second_alice)
        await until(lambda: _true(bus.refusals == 1), "Alice's account to be refused a stream")
    assert await scrape(http_url(front, "/metrics"), "gateway_bus_upstream_stream_refusals_total") == 1
    assert await scrape(http_url(front, "/metrics"), "gateway_bus_upstream_streams_waiting_total") == 1
    warnings = [r for r in caplog.records if "no upstream event stream for" in r.getMessage()]
    assert len(warnings) == 1 and ALICE[0] in warnings[0].getMessage()
    assert await upstream.metric("gateway_eventsource_connections_open") == 1  # Bob's only

    # A change for Alice while she has no stream; then Bob leaves, his stream closes and Alice's account gets it:
    # what moved meanwhile is read from the upstream and pushed.
    await asyncio.to_thread(send_mail, upstream.smtp_port, ALICE[0], "while refused")
    newest = await upstream_states(upstream, ALICE, ALICE_ACC)
    await bob.close()
    await until(lambda: _true(bus.streams_open == 1 and bus.reconnects == 1 and bus.waiting == 0),
                "Alice's account to get the free stream")
    seen = await states_until(alice, ALICE_ACC, {t: newest[t] for t in ("Email", "Mailbox", "Thread")})
    assert seen["Email"] == newest["Email"]
    await alice.close()
    await second_alice.close()


async def test_a_session_without_upstream_credentials_waits_for_one_that_has_them(
        upstreams: UpstreamFactory, make_gateway: GatewayFactory) -> None:
    # A Bearer JWT the front verifies itself but the upstream does not take: its session has Bob's account, but no
    # upstream session (no eventSourceUrl, credentials the upstream refuses). Its stream waits, the node stays ready.
    front = await make_front(make_gateway, await upstreams(), JWT_SECRET=JWT_SECRET)
    bus = streams(front)
    token = jwt.encode({"sub": BOB[0], "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
    local = await connect(front, additional_headers={"Authorization": f"Bearer {token}"})
    await enable(local)
    await until(lambda: _true(bus.failures >= 1), "the stream to find no usable credentials")
    assert bus.streams_open == 0 and bus.attempts == 0 and bus.ready
    # A session with credentials the upstream takes: the waiting stream opens with them at once.
    basic_session = await connect(front)
    await enable(basic_session)
    await until(lambda: _true(bus.streams_open == 1), "the stream to open with the Basic session's credentials")
    assert bus.attempts == 1
    await local.close()
    await basic_session.close()


async def _true(value: bool) -> bool:
    return value
