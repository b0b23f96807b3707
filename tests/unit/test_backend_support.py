"""Helpers for the embedded backend tests (no tests here): a started backend on a real SQLite file in tmp_path,
a small client speaking ApiRequest, and sample messages."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import make_msgid
from typing import Any, Protocol, cast

from gateway.backend.service import EmbeddedBackend
from gateway.bus.events import StateChangeEvent
from gateway.config import Settings
from gateway.directory import Directory, Principal, account_id_for
from gateway.jmap.types import CORE, MAIL, SUBMISSION, VACATION, ApiRequest, Invocation

BOB, ALICE, CAROL = "bob@example.com", "alice@example.com", "carol@example.com"
USING = [CORE, MAIL, SUBMISSION, VACATION]


class Answer(Protocol):
    """An ApiResponse of the embedded backend: its methodResponses are always decoded, never raw (only a request
    path that relays an upstream's answer hands them on as msgspec.Raw)."""

    @property
    def methodResponses(self) -> list[Invocation]: ...
    @property
    def sessionState(self) -> str: ...
    @property
    def createdIds(self) -> dict[str, str] | None: ...


@dataclass
class Env:
    backend: EmbeddedBackend
    directory: Directory
    settings: Settings
    events: list[StateChangeEvent] = field(default_factory=list)
    # Called inside publish, before the events are recorded (to look at the store at that moment).
    on_publish: Callable[[Sequence[StateChangeEvent]], Awaitable[None]] | None = None

    def client(self, username: str = BOB) -> Client:
        return Client(self, username)

    def events_for(self, username: str) -> list[dict[str, str]]:
        return [e.typeStates for e in self.events if e.username == username]


class Client:
    """Calls the backend as `username`; `call` fills in the accountId (the user's own unless `account` says)."""

    def __init__(self, env: Env, username: str) -> None:
        self.env = env
        self.username = username

    @property
    def principal(self) -> Principal:
        return self.env.directory.principal(self.username)

    @property
    def account_id(self) -> str:
        return account_id_for(self.username)

    async def request(self, calls: Sequence[Invocation | list[Any]], using: Sequence[str] = USING,
                      created_ids: dict[str, str] | None = None) -> Answer:
        method_calls = [(c[0], c[1], c[2]) for c in calls]
        return cast(Answer, await self.env.backend.call(
            self.principal, ApiRequest(using=list(using), methodCalls=method_calls, createdIds=created_ids)))

    async def invoke(self, name: str, args: dict[str, Any] | None = None, *, account: str | None = None,
                     using: Sequence[str] = USING) -> Invocation:
        arguments = dict(args or {})
        arguments.setdefault("accountId", account or self.account_id)
        response = await self.request([(name, arguments, "c0")], using)
        [invocation] = response.methodResponses
        return invocation

    async def call(self, name: str, args: dict[str, Any] | None = None, *, account: str | None = None,
                   using: Sequence[str] = USING) -> dict[str, Any]:
        got, result, _ = await self.invoke(name, args, account=account, using=using)
        assert got == name, result
        return result

    async def error(self, name: str, args: dict[str, Any] | None = None, *, account: str | None = None,
                    using: Sequence[str] = USING) -> dict[str, Any]:
        got, result, _ = await self.invoke(name, args, account=account, using=using)
        assert got == "error", result
        return result

    async def mailbox(self, role: str, account: str | None = None) -> str:
        got = await self.call("Mailbox/get", {"properties": ["role"]}, account=account)
        return next(str(m["id"]) for m in got["list"] if m["role"] == role)

    async def mailboxes(self, account: str | None = None) -> dict[str, dict[str, Any]]:
        got = await self.call("Mailbox/get", {}, account=account)
        return {m["id"]: m for m in got["list"]}

    async def state(self, type_: str, account: str | None = None) -> str:
        states = await self.env.backend.current_states(self.principal, [account or self.account_id])
        return str(states[account or self.account_id][type_])

    async def email(self, email_id: str, *props: str, **args: Any) -> dict[str, Any]:
        query: dict[str, Any] = {"ids": [email_id], **args}
        if props:
            query["properties"] = list(props)
        got = await self.call("Email/get", query)
        [email] = got["list"]
        return dict(email)


@asynccontextmanager
async def backend_env(db_path: str, users: Sequence[str] = (BOB, ALICE, CAROL), **kwargs: Any
                      ) -> AsyncIterator[Env]:
    directory = Directory([(u, "pw") for u in users])
    settings = Settings.defaults(db=db_path, max_objects_in_get=50, max_objects_in_set=20, smtp_port=0)
    env = Env(backend=None, directory=directory, settings=settings)  # type: ignore[arg-type]

    async def publish(events: Sequence[StateChangeEvent]) -> None:
        if env.on_publish is not None:
            await env.on_publish(events)
        env.events.extend(events)

    env.backend = EmbeddedBackend(settings, directory, publish, **kwargs)
    await env.backend.start()
    try:
        yield env
    finally:
        await env.backend.stop()


def message(subject: str = "Hello", body: str = "Hi Bob", *, sender: str = ALICE, to: str = BOB,
            message_id: str | None = None, in_reply_to: str | None = None, references: str | None = None,
            headers: str = "") -> bytes:
    """A small text/plain RFC 5322 message with CRLF line ends."""
    lines = [f"From: Alice <{sender}>", f"To: {to}", f"Subject: {subject}",
             "Date: Thu, 30 Oct 2014 06:12:00 -0800",
             f"Message-ID: {message_id or make_msgid(domain='example.com')}"]
    if in_reply_to:
        lines.append(f"In-Reply-To: {in_reply_to}")
    if references:
        lines.append(f"References: {references}")
    lines += [h for h in headers.split("\n") if h]
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8", "", body, ""]
    return "\r\n".join(lines).encode()


# A multipart/mixed message: multipart/alternative (text + HTML) and a PDF attachment.
MULTIPART = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.com>, team: carol@example.com;\r\n"
    b"Subject: =?utf-8?q?Quarterly_r=C3=A9port?=\r\n"
    b"Date: Tue, 02 Jan 2024 10:00:00 +0100\r\n"
    b"Message-ID: <report-1@example.com>\r\n"
    b"List-Unsubscribe: <mailto:leave@example.com>, <https://example.com/leave>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=outer\r\n"
    b"\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"The r=C3=A9port is attached.\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<html><head><style>p {}</style></head><body><p>The <b>report</b> is attached.</p></body></html>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: application/pdf; name=\"report.pdf\"\r\n"
    b"Content-Disposition: attachment; filename=\"report.pdf\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK\r\n"
    b"--outer--\r\n"
)
PDF_BYTES = b"%PDF-1.4\n%\xc7\xec\x8f\xa2\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"


async def deliver(env: Env, raw: bytes, to: str = BOB) -> str:
    """Deliver `raw` to `to` as SMTP would; the new emailId."""
    return (await env.backend.deliver([to], raw))[to]


def parts_by_id(structure: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    def walk(node: dict[str, Any]) -> None:
        if node["partId"]:
            out[node["partId"]] = node
        for sub in node.get("subParts", ()):
            walk(sub)

    walk(structure)
    return out
