"""The seed story over real sockets: SMTP delivery -> push -> resynchronisation on the same WebSocket."""

from __future__ import annotations

import asyncio
import json
import smtplib
import socket
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import websockets

from gateway.app import Gateway
from gateway.directory import account_id_for
from tests.conftest import ADMIN, ALICE, BOB, CAROL, GatewayFactory, basic, connect, http_url
from tests.e2e.test_ws_protocol import recv_json

CORE, MAIL = "urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"


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
    msg.set_content("Hello from the seed story.")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.send_message(msg)


async def request(ws: websockets.ClientConnection, rid: str, calls: list[list[object]]) -> dict[str, Any]:
    await ws.send(json.dumps({"@type": "Request", "id": rid, "using": [CORE, MAIL], "methodCalls": calls}))
    while True:
        msg = await recv_json(ws)
        if msg.get("requestId") == rid:
            return msg


async def test_seed_story(make_gateway: GatewayFactory) -> None:
    smtp_port = free_port()
    gw = await make_gateway(backend=True, SMTP_PORT=str(smtp_port))
    acc = account_id_for(BOB[0])
    ws = await connect(gw)
    assert ws.subprotocol == "jmap"
    first = await request(ws, "r0", [["Email/get", {"accountId": acc, "ids": []}, "e"],
                                     ["Mailbox/get", {"accountId": acc, "ids": None}, "m"]])
    email_state = first["methodResponses"][0][1]["state"]
    mailbox_state = first["methodResponses"][1][1]["state"]
    await ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": ["Email", "Mailbox"]}))

    await asyncio.to_thread(send_mail, smtp_port, BOB[0], "seed story")
    push = await recv_json(ws)
    assert push["@type"] == "StateChange"
    changed = push["changed"][acc]
    assert set(changed) == {"Email", "Mailbox"}

    sync = await request(ws, "r1", [
        ["Email/changes", {"accountId": acc, "sinceState": email_state}, "ec"],
        ["Email/get", {"accountId": acc, "#ids": {"resultOf": "ec", "name": "Email/changes", "path": "/created"},
                       "properties": ["subject", "mailboxIds", "keywords"]}, "eg"],
        ["Mailbox/changes", {"accountId": acc, "sinceState": mailbox_state}, "mc"],
        ["Mailbox/get", {"accountId": acc, "#ids": {"resultOf": "mc", "name": "Mailbox/changes", "path": "/updated"},
                         "properties": ["name", "role", "unreadEmails", "totalEmails"]}, "mg"],
    ])
    responses = {call_id: (name, args) for name, args, call_id in sync["methodResponses"]}
    assert responses["ec"][1]["newState"] == changed["Email"]
    emails = responses["eg"][1]["list"]
    assert [e["subject"] for e in emails] == ["seed story"]
    assert responses["mg"][1]["state"] == changed["Mailbox"]
    inbox = next(m for m in responses["mg"][1]["list"] if m["role"] == "inbox")
    assert inbox["id"] in emails[0]["mailboxIds"]
    assert inbox["unreadEmails"] == 1 and inbox["totalEmails"] == 1
    await ws.close()


async def test_delegate_receives_the_owners_changes(make_gateway: GatewayFactory) -> None:
    smtp_port = free_port()
    gw = await make_gateway(backend=True, SMTP_PORT=str(smtp_port))
    async with aiohttp.ClientSession() as http:
        url = http_url(gw, f"/admin/delegations/{BOB[0]}/{ALICE[0]}")
        async with http.put(url, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 201
        async with http.get(http_url(gw, "/jmap/session"), headers={"Authorization": basic(ALICE)}) as r:
            session = await r.json()
    bob_acc = account_id_for(BOB[0])
    assert session["accounts"][bob_acc]["isPersonal"] is False
    alice = await connect(gw, ALICE)
    await alice.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": ["Email"]}))
    got = await request(alice, "a1", [["Email/get", {"accountId": bob_acc, "ids": []}, "e"]])
    assert got["methodResponses"][0][0] == "Email/get"
    await asyncio.to_thread(send_mail, smtp_port, BOB[0], "for bob")
    push = await recv_json(alice)
    assert push["@type"] == "StateChange" and list(push["changed"]) == [bob_acc]
    await alice.close()


async def test_delegations_survive_a_restart(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    db = str(tmp_path / "mail.sqlite3")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    bob_acc = account_id_for(BOB[0])

    async def alice_accounts(gw: Gateway) -> set[str]:
        async with aiohttp.ClientSession() as http, http.get(
                http_url(gw, "/jmap/session"), headers={"Authorization": basic(ALICE)}) as r:
            return set((await r.json())["accounts"])

    first = await make_gateway(backend=True, DB=db)
    async with aiohttp.ClientSession() as http:
        for owner in (BOB[0], CAROL[0]):
            async with http.put(http_url(first, f"/admin/delegations/{owner}/{ALICE[0]}"), headers=admin) as r:
                assert r.status == 201
        async with http.delete(http_url(first, f"/admin/delegations/{CAROL[0]}/{ALICE[0]}"), headers=admin) as r:
            assert r.status == 204
    await first.stop(grace=0)
    again = await make_gateway(backend=True, DB=db)  # a new process on the same database
    assert await alice_accounts(again) == {account_id_for(ALICE[0]), bob_acc}  # Carol's was revoked
    # Stored as it was: granting again changes nothing.
    async with aiohttp.ClientSession() as http, http.put(
            http_url(again, f"/admin/delegations/{BOB[0]}/{ALICE[0]}"), headers=admin) as r:
        assert r.status == 204


async def test_backend_over_http_api_and_download(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(backend=True)
    acc = account_id_for(BOB[0])
    auth = {"Authorization": basic(BOB)}
    async with aiohttp.ClientSession() as http:
        async with http.get(http_url(gw, "/jmap/session"), headers=auth) as r:
            session = await r.json()
        assert MAIL in session["capabilities"] and session["primaryAccounts"][MAIL] == acc
        body = {"using": [CORE, MAIL], "methodCalls": [
            ["Mailbox/query", {"accountId": acc, "filter": {"role": "drafts"}}, "q"],
            ["Email/set", {"accountId": acc, "create": {"d1": {
                "mailboxIds": {}, "subject": "draft via http",
                "from": [{"email": BOB[0]}], "to": [{"email": ALICE[0]}],
                "bodyValues": {"b": {"value": "draft body"}}, "textBody": [{"partId": "b", "type": "text/plain"}],
                "keywords": {"$draft": True}}}}, "s"],
        ]}
        async with http.post(http_url(gw, "/jmap/api"), json=body, headers=auth) as r:
            assert r.status == 200
            result = await r.json()
        drafts_id = result["methodResponses"][0][1]["ids"][0]
        # The create above has no mailbox; JMAP requires one, so it must be refused with invalidProperties.
        assert result["methodResponses"][1][1]["notCreated"]["d1"]["type"] == "invalidProperties"
        body["methodCalls"][1][1]["create"]["d1"]["mailboxIds"] = {drafts_id: True}  # type: ignore[index]
        async with http.post(http_url(gw, "/jmap/api"), json=body, headers=auth) as r:
            created = (await r.json())["methodResponses"][1][1]["created"]["d1"]
        get = {"using": [CORE, MAIL], "methodCalls": [["Email/get", {"accountId": acc, "ids": [created["id"]],
                                                                     "properties": ["subject", "blobId"]}, "g"]]}
        async with http.post(http_url(gw, "/jmap/api"), json=get, headers=auth) as r:
            email = (await r.json())["methodResponses"][0][1]["list"][0]
        assert email["subject"] == "draft via http"
        url = session["downloadUrl"].format(accountId=acc, blobId=email["blobId"], name="m.eml", type="message/rfc822")
        async with http.get(url, headers=auth) as r:
            assert r.status == 200
            assert b"Subject: draft via http" in await r.read()
        async with http.get(url, headers={"Authorization": basic(ALICE)}) as r:
            assert r.status == 404  # Alice may not read Bob's blobs
