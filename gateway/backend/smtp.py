"""`SmtpListener`: the embedded backend's SMTP door (aiosmtpd on the running loop), an adapter at the edge.

It accepts mail for users of the directory (others get 550 at RCPT) and answers 250 to DATA only after
`EmbeddedBackend.deliver` has committed the message. No relaying, no authentication: it is the final hop
for local users, meant to listen on a private address.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from aiosmtpd.smtp import SMTP

from gateway.backend.delivery import MAX_SIZE_ATTACHMENTS, Deliver, UnknownRecipient, resolve_recipient
from gateway.directory import Directory

log = logging.getLogger(__name__)


class _Handler:
    """aiosmtpd handler hooks: RCPT checks the directory, DATA delivers durably."""

    def __init__(self, backend: Deliver, directory: Directory, hostname: str) -> None:
        self._backend = backend
        self._directory = directory
        self._hostname = hostname

    async def handle_RCPT(self, server: SMTP, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        username = resolve_recipient(self._directory, address)
        if username is None:
            # RFC 5321 §4.2.3 / RFC 3463: permanent failure, mailbox unknown.
            return f"550 5.1.1 <{address}>: no such user here"
        envelope.rcpt_tos.append(username)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        content = envelope.original_content
        if not isinstance(content, bytes):
            content = bytes(content or b"")
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        # RFC 5321 §4.4: the final delivery adds Return-Path and a Received trace field on top.
        trace = (f"Return-Path: <{envelope.mail_from or ''}>\r\n"
                 f"Received: from {session.host_name or 'unknown'} ({peer}) by {self._hostname} with "
                 f"{'ESMTP' if session.extended_smtp else 'SMTP'}; {format_datetime(datetime.now(UTC))}\r\n")
        try:
            await self._backend.deliver(list(envelope.rcpt_tos), trace.encode() + content)
        except UnknownRecipient as exc:  # the directory changed since RCPT
            return f"550 5.1.1 {exc}"
        except Exception:
            log.exception("delivery failed")
            return "451 4.3.0 The message could not be stored; try again later"
        return "250 2.0.0 OK: stored"


class _Session(SMTP):
    """One SMTP connection, forgotten by the listener when it ends."""

    def __init__(self, sessions: set[SMTP], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listener_sessions = sessions
        sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._listener_sessions.discard(self)
        super().connection_lost(error)


class SmtpListener:
    """Serves SMTP on (host, port); port 0 binds a free port, read back from `port` after start()."""

    def __init__(self, backend: Deliver, directory: Directory, host: str, port: int) -> None:
        self._host = host
        self._requested_port = port
        self._hostname = socket.gethostname()  # not getfqdn(): that can block on DNS
        self._handler = _Handler(backend, directory, self._hostname)
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._requested_port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            return _Session(self._sessions, self._handler, hostname=self._hostname,
                            data_size_limit=MAX_SIZE_ATTACHMENTS, enable_SMTPUTF8=True, loop=loop)

        self._server = await loop.create_server(factory, self._host, self._requested_port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        tasks: list[asyncio.Future[Any]] = []
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
            # aiosmtpd runs each session in a task it cancels on connection loss; wait for those to end so
            # nothing is left pending when the loop closes.
            task = getattr(session, "_handler_coroutine", None)
            if isinstance(task, asyncio.Future):
                tasks.append(task)
        self._sessions.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
