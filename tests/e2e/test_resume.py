"""pushState resume over real sockets in the all-in-one role (RFC 8887 §4.3.5.2): a client that reconnects with
its last pushState is pushed every type that moved while it was away, whoever (or nobody) kept the node bound.

The whole-history proof is the model-based test (tests/model/test_resume_model.py); these are the reporter's steps
and the rules for types that only the bus carries, each as one readable story.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets

from gateway.app import Gateway
from gateway.bus.events import new_event
from gateway.directory import account_id_for
from tests.conftest import BOB, GatewayFactory, connect
from tests.e2e.test_push import enable, next_push_or_none
from tests.e2e.test_seed_story import free_port, send_mail
from tests.e2e.test_ws_protocol import recv_json

BOB_ACC = account_id_for(BOB[0])


async def resume(ws: websockets.ClientConnection, token: str, data_types: list[str] | None) -> dict[str, Any]:
    """Enable with `token`; the StateChange the resume pushes (the test fails on a timeout when none comes)."""
    await ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": data_types, "pushState": token}))
    push = await asyncio.wait_for(recv_json(ws), 10)
    assert push["@type"] == "StateChange", push
    return push


async def current(gw: Gateway) -> dict[str, str]:
    assert gw.directory is not None
    principal = gw.directory.principal(BOB[0])
    return (await gw.request_path.current_states(principal, [BOB_ACC]))[BOB_ACC]


async def test_a_mail_delivered_while_no_socket_was_open_is_pushed_on_resume(make_gateway: GatewayFactory) -> None:
    smtp_port = free_port()
    gw = await make_gateway(backend=True, SMTP_PORT=str(smtp_port))
    async with await connect(gw) as ws:
        await enable(ws, ["Email", "Mailbox"])
        await asyncio.to_thread(send_mail, smtp_port, BOB[0], "first")
        push = await asyncio.wait_for(recv_json(ws), 10)
        token = push["pushState"]
    await asyncio.to_thread(send_mail, smtp_port, BOB[0], "sent while away")
    now = await current(gw)
    async with await connect(gw) as ws:
        resumed = await resume(ws, token, ["Email", "Mailbox"])
        assert resumed["changed"] == {BOB_ACC: {"Email": now["Email"], "Mailbox": now["Mailbox"]}}
        # The new token says the client is up to date: resuming with it sends nothing.
        newest = resumed["pushState"]
    async with await connect(gw) as ws:
        await enable(ws, ["Email", "Mailbox"], push_state=newest)
        assert await next_push_or_none(ws) is None


async def test_resume_while_another_session_kept_the_node_bound_sends_the_difference_only(
        make_gateway: GatewayFactory) -> None:
    smtp_port = free_port()
    gw = await make_gateway(backend=True, SMTP_PORT=str(smtp_port))
    keeper = await connect(gw)
    await enable(keeper, [])  # covers Bob's account, asks for no types
    async with await connect(gw) as ws:
        await enable(ws, None)
        await asyncio.to_thread(send_mail, smtp_port, BOB[0], "first")
        token = (await asyncio.wait_for(recv_json(ws), 10))["pushState"]
    # Only the Mailbox state moves: a new mailbox while the client is away.
    async with await connect(gw) as other:
        await other.send(json.dumps({"@type": "Request", "id": "mk", "using": [
            "urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"], "methodCalls": [
            ["Mailbox/set", {"accountId": BOB_ACC, "create": {"n": {"name": "Projects"}}}, "0"]]}))
        assert (await asyncio.wait_for(recv_json(other), 10))["requestId"] == "mk"
    now = await current(gw)
    async with await connect(gw) as ws:
        resumed = await resume(ws, token, None)
        assert resumed["changed"] == {BOB_ACC: {"Mailbox": now["Mailbox"]}}
    await keeper.close()


async def test_a_custom_type_seen_while_bound_is_pushed_on_resume_even_after_the_node_unbound(
        make_gateway: GatewayFactory) -> None:
    # A type only the bus carries: the request path cannot tell its state, so the node keeps what it last saw
    # while it was bound, and resumes from that.
    gw = await make_gateway(backend=True)
    async with await connect(gw) as ws:
        await enable(ws, ["Calendar"])
        await gw.bus.publish([new_event(BOB[0], {"Calendar": "c1"})])
        token = (await asyncio.wait_for(recv_json(ws), 10))["pushState"]
        async with await connect(gw) as other:
            await enable(other, ["Calendar"])
            await ws.close()
            await gw.bus.publish([new_event(BOB[0], {"Calendar": "c2"})])  # seen by `other` only
            assert (await asyncio.wait_for(recv_json(other), 10))["changed"] == {BOB_ACC: {"Calendar": "c2"}}
    # Nobody is bound now. The node cannot know whether Calendar moved since: it pushes the newest it knows.
    async with await connect(gw) as ws:
        resumed = await resume(ws, token, ["Calendar"])
        assert resumed["changed"] == {BOB_ACC: {"Calendar": "c2"}}
        newest = resumed["pushState"]
    async with await connect(gw) as ws:
        # Told c2 already, and still unknown whether it moved: the newest known state is said again.
        again = await resume(ws, newest, ["Calendar"])
        assert again["changed"] == {BOB_ACC: {"Calendar": "c2"}}
