"""The embedded backend's SMTP listener, driven by smtplib over a real loopback socket."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import pytest

from gateway.backend.smtp import SmtpListener
from tests.unit.test_backend_support import ALICE, BOB, PDF_BYTES, Env, backend_env, message


@dataclass
class Mx:
    env: Env
    listener: SmtpListener

    def send(self, recipients: list[str], raw: bytes, sender: str = ALICE) -> dict[str, tuple[int, bytes]]:
        """One SMTP session (EHLO, MAIL, RCPT..., DATA); blocking, so tests run it in a thread."""
        with smtplib.SMTP("127.0.0.1", self.listener.port, timeout=30) as client:
            return client.sendmail(sender, recipients, raw)


@pytest.fixture
async def mx(tmp_path: Any) -> AsyncIterator[Mx]:
    async with backend_env(str(tmp_path / "mail.sqlite3")) as env:
        listener = SmtpListener(env.backend, env.directory, "127.0.0.1", 0)
        await listener.start()
        try:
            yield Mx(env, listener)
        finally:
            await listener.stop()


async def inbox_emails(env: Env, user: str = BOB, *props: str) -> list[dict[str, Any]]:
    client = env.client(user)
    ids = (await client.call("Email/query", {"sort": [{"property": "receivedAt"}]}))["ids"]
    got = await client.call("Email/get", {"ids": ids, "properties": list(props) or None})
    return list(got["list"])


async def test_known_user_gets_250_and_the_mail_is_readable(mx: Mx) -> None:
    assert mx.listener.port != 0
    refused = await asyncio.to_thread(mx.send, [BOB], message("over smtp", "Hello from SMTP"))
    assert refused == {}
    # sendmail returned, so the server said 250 to DATA: the mail is already stored and announced.
    [email] = await inbox_emails(mx.env, BOB, "subject", "preview", "mailboxIds", "blobId", "headers")
    assert email["subject"] == "over smtp" and email["preview"] == "Hello from SMTP"
    assert email["mailboxIds"] == {await mx.env.client(BOB).mailbox("inbox"): True}
    # The final hop adds the trace fields on top (RFC 5321 §4.4).
    assert [h["name"] for h in email["headers"][:2]] == ["Return-Path", "Received"]
    assert email["headers"][0]["value"] == f" <{ALICE}>"
    [event] = mx.env.events
    assert event.username == BOB and "EmailDelivery" in event.typeStates


async def test_unknown_recipient_gets_550_at_rcpt(mx: Mx) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        await asyncio.to_thread(mx.send, ["nobody@example.com"], message())
    assert info.value.recipients["nobody@example.com"][0] == 550
    refused = await asyncio.to_thread(mx.send, [BOB, "nobody@example.com", ALICE.upper()], message("mixed"))
    assert list(refused) == ["nobody@example.com"] and refused["nobody@example.com"][0] == 550
    assert [e["subject"] for e in await inbox_emails(mx.env, BOB, "subject")] == ["mixed"]
    # Recipients match the directory case-insensitively: Alice got it too, once.
    assert [e["subject"] for e in await inbox_emails(mx.env, ALICE, "subject")] == ["mixed"]
    assert sorted(e.username for e in mx.env.events) == [ALICE, BOB]


async def test_multipart_alternative_with_attachment(mx: Mx) -> None:
    msg = EmailMessage()
    msg["From"] = f"Alice <{ALICE}>"
    msg["To"] = f"Bob <{BOB}>"
    msg["Subject"] = "Rapport trimestriel"
    msg.set_content("Le rapport est joint.\n")
    msg.add_alternative("<p>Le <b>rapport</b> est joint.</p>\n", subtype="html")
    msg.add_attachment(PDF_BYTES, maintype="application", subtype="pdf", filename="rapport.pdf")
    await asyncio.to_thread(mx.send, [BOB], msg.as_bytes())
    bob = mx.env.client(BOB)
    [email] = await inbox_emails(mx.env, BOB, "subject", "textBody", "htmlBody", "attachments", "hasAttachment",
                                 "preview", "bodyStructure")
    assert email["subject"] == "Rapport trimestriel" and email["hasAttachment"] is True
    assert [p["type"] for p in email["textBody"]] == ["text/plain"]
    assert [p["type"] for p in email["htmlBody"]] == ["text/html"]
    [pdf] = email["attachments"]
    assert (pdf["type"], pdf["name"], pdf["size"]) == ("application/pdf", "rapport.pdf", len(PDF_BYTES))
    assert email["preview"] == "Le rapport est joint."
    assert email["bodyStructure"]["type"] == "multipart/mixed"
    assert await mx.env.backend.blob(bob.principal, bob.account_id, pdf["blobId"]) == PDF_BYTES
    html = await bob.email(email["id"], "bodyValues", fetchHTMLBodyValues=True)
    assert [v["value"].strip() for v in html["bodyValues"].values()] == ["<p>Le <b>rapport</b> est joint.</p>"]


async def test_accepted_mail_survives_a_restart(tmp_path: Any) -> None:
    path = str(tmp_path / "mail.sqlite3")
    async with backend_env(path) as env:
        listener = SmtpListener(env.backend, env.directory, "127.0.0.1", 0)
        await listener.start()
        await asyncio.to_thread(Mx(env, listener).send, [BOB], message("kept across restarts"))
        await listener.stop()
    async with backend_env(path) as env:
        assert [e["subject"] for e in await inbox_emails(env, BOB, "subject")] == ["kept across restarts"]


async def test_stop_closes_idle_sessions(mx: Mx) -> None:
    def open_session() -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", mx.listener.port, timeout=30)
        client.ehlo()
        return client

    client = await asyncio.to_thread(open_session)
    try:
        await mx.listener.stop()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            await asyncio.to_thread(client.noop)
    finally:
        client.close()
