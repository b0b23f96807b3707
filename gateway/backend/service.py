"""`EmbeddedBackend`: the embedded mail store as a request path (gateway.upstream.base.RequestPath), a
delivery entry point (SMTP, tools) and a source of StateChangeEvents.

Threading: all database work, MIME parsing included, runs on one dedicated worker thread that owns the SQLite
connection; each JMAP request and each batch of deliveries is one job on it, so the event loop only waits on
futures. Contract of `publish`: called on the loop after a job has committed, with one event per account
whose states moved (username = the account's owner), never before the commit; a request or a delivery batch
yields at most one event per account. Deliveries that arrive while a batch is being written are written
together in the next one (group commit: one fsync for many messages).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gateway.backend import mime
from gateway.backend.methods import METHODS
from gateway.backend.methods.common import Context, Limits
from gateway.backend.methods.email import read_blob
from gateway.backend.methods.mailbox import MAX_DEPTH, MAX_NAME_OCTETS
from gateway.backend.methods.query import SORT_OPTIONS
from gateway.backend.refs import resolve_arguments
from gateway.backend.store import TYPES, Store
from gateway.bus.events import StateChangeEvent, new_event
from gateway.config import Settings
from gateway.directory import Account, Directory, Principal, account_id_for
from gateway.errors import GatewayError, MethodError
from gateway.jmap.types import MAIL, SUBMISSION, VACATION, ApiRequest, ApiResponse, Invocation

log = logging.getLogger(__name__)

T = TypeVar("T")
Publish = Callable[[Sequence[StateChangeEvent]], Awaitable[None]]

MAX_SIZE_ATTACHMENTS = 32 * 1024 * 1024  # RFC 8621 §1.3.1 maxSizeAttachmentsPerEmail (aiosmtpd's size limit)
# Deliveries written per transaction at most: amortises the fsync, yet a JMAP request queued on the store
# thread waits behind one batch (~2 ms of CPU per message) at worst.
MAX_DELIVERY_BATCH = 32


class UnknownRecipient(GatewayError):
    """`deliver` was given an address that is no user of the directory."""


def resolve_recipient(directory: Directory, address: str) -> str | None:
    """The directory username an envelope address delivers to (exact, else case-insensitively), or None."""
    return directory.resolve(address)


def run_request(ctx: Context, request: ApiRequest) -> list[Invocation]:
    """RFC 8620 §3.6: run the method calls in order, each answered by its response or an error invocation."""
    using = set(request.using)
    responses: list[Invocation] = []
    if request.createdIds:
        ctx.created_ids.update(request.createdIds)
    for name, arguments, call_id in request.methodCalls:
        entry = METHODS.get(name)
        if entry is None or entry[0] not in using:
            # RFC 8620 §3.6.2: a method of a capability missing from `using` is as unknown as a misspelt one.
            detail = "is not a method of this server" if entry is None else f"needs {entry[0]} in using"
            responses.append(MethodError("unknownMethod", f"{name} {detail}.").to_invocation(call_id))
            continue
        created_before = dict(ctx.created_ids)
        try:
            resolved = resolve_arguments(arguments, responses)
            responses.append((name, entry[1](ctx, resolved), call_id))
        except MethodError as exc:
            responses.append(exc.to_invocation(call_id))
        except Exception:
            # Creations of a rolled-back call never happened: later calls must not see their ids.
            ctx.created_ids = created_before
            # The transaction was rolled back; the other calls go on (RFC 8620 §3.6.2 serverFail).
            log.exception("%s failed", name)
            responses.append(MethodError("serverFail", f"{name} failed on the server; nothing was changed.")
                             .to_invocation(call_id))
    return responses


class EmbeddedBackend:
    """The embedded JMAP mail store (RFC 8620 + RFC 8621) on SQLite; the module docstring covers threading."""

    def __init__(self, settings: Settings, directory: Directory, publish: Publish, *,
                 change_log_limit: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._directory = directory
        self._publish = publish
        self._clock = clock
        self._store = Store(settings.db_path, change_log_limit=change_log_limit)
        self._limits = Limits(settings.max_objects_in_get, settings.max_objects_in_set)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[list[str], bytes, asyncio.Future[dict[str, str]]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- the RequestPath port ---

    @property
    def capabilities(self) -> Mapping[str, Mapping[str, Any]]:
        # RFC 8621 §1.3.1-§1.3.3: the session-level values of these capabilities are empty objects.
        return {MAIL: {}, SUBMISSION: {}, VACATION: {}}

    def account_capabilities(self, account: Account) -> Mapping[str, Mapping[str, Any]]:
        return {
            MAIL: {
                "maxMailboxesPerEmail": None,
                "maxMailboxDepth": MAX_DEPTH,
                "maxSizeMailboxName": MAX_NAME_OCTETS,
                "maxSizeAttachmentsPerEmail": MAX_SIZE_ATTACHMENTS,
                "emailQuerySortOptions": list(SORT_OPTIONS),
                "mayCreateTopLevelMailbox": True,
            },
            # RFC 8621 §1.3.2: EmailSubmission is not offered, so nothing can be delayed.
            SUBMISSION: {"maxDelayedSend": 0, "submissionExtensions": {}},
            VACATION: {},
        }

    def session_state(self, principal: Principal) -> str:
        # RFC 8620 §2: changes exactly when what the Session object says changes, i.e. the account list.
        return hashlib.sha256("\n".join(principal.account_ids).encode()).hexdigest()[:16]

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jmap-store")
            await self._run(self._store.open)

    async def stop(self) -> None:
        if self._executor is None:
            return
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._run(self._store.close)
        self._executor.shutdown(wait=True)
        self._executor = None

    async def call(self, principal: Principal, request: ApiRequest) -> ApiResponse:
        # Shielded: once the job is queued its commit happens, so its events must be published even if the
        # caller goes away (a socket closing mid-request).
        task = asyncio.ensure_future(self._call_and_publish(principal, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        responses, created_ids = await asyncio.shield(task)
        return ApiResponse(methodResponses=responses, sessionState=self.session_state(principal),
                           createdIds=created_ids)

    async def current_states(self, principal: Principal,
                             account_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        accounts = [a for a in principal.accounts if a.id in set(account_ids)]
        return await self._run(self._states_sync, accounts)

    # --- beyond the port ---

    async def download(self, principal: Principal, account_id: str, blob_id: str) -> bytes | None:
        """A blob's bytes (the raw RFC 5322 message, or one decoded part), None if absent or not allowed."""
        if not principal.may_use(account_id):
            return None
        return await self._run(read_blob, self._store, account_id, blob_id)

    async def deliver(self, recipients: list[str], raw: bytes) -> dict[str, str]:
        """Store `raw` in each recipient's Inbox; returns username -> new emailId once it is committed (and
        the events published). Raises UnknownRecipient before storing anything if a recipient is no user."""
        usernames: list[str] = []
        for address in recipients:
            username = resolve_recipient(self._directory, address)
            if username is None:
                raise UnknownRecipient(f"{address!r} is not a user of this server")
            usernames.append(username)
        if not usernames:
            return {}
        future: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self._pending.append((list(dict.fromkeys(usernames)), raw, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_deliveries())
        return await future

    # --- internals ---

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("the embedded backend is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _emit(self, events: list[StateChangeEvent]) -> None:
        if not events:
            return
        try:
            await self._publish(events)
        except Exception:
            # The changes are committed; a bus failure must not turn them into an error for the client.
            log.exception("publishing %d state change events failed", len(events))

    async def _call_and_publish(self, principal: Principal, request: ApiRequest
                                ) -> tuple[list[Invocation], dict[str, str] | None]:
        responses, created_ids, events = await self._run(self._call_sync, principal, request)
        await self._emit(events)
        return responses, created_ids

    def _call_sync(self, principal: Principal, request: ApiRequest
                   ) -> tuple[list[Invocation], dict[str, str] | None, list[StateChangeEvent]]:
        ctx = Context(self._store, principal, self._limits, clock=self._clock)
        responses = run_request(ctx, request)
        created_ids = dict(ctx.created_ids) if request.createdIds is not None else None
        return responses, created_ids, self._events(ctx.new_states)

    def _events(self, new_states: dict[str, dict[str, str]]) -> list[StateChangeEvent]:
        # DESIGN.md §5: events name the account's owner; the hub maps the username to the accountId.
        return [new_event(self._store.username_of(account_id), states)
                for account_id, states in new_states.items()]

    def _states_sync(self, accounts: list[Account]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for account in accounts:
            self._store.ensure_account(account.id, account.owner)
            states = self._store.states(account.id)
            out[account.id] = {t: states[t] for t in TYPES}
        return out

    async def _flush_deliveries(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_DELIVERY_BATCH], self._pending[MAX_DELIVERY_BATCH:]
                try:
                    results, events = await self._run(self._deliver_sync, [(u, raw) for u, raw, _ in batch])
                except Exception as exc:
                    log.exception("storing %d deliveries failed", len(batch))
                    for _, _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                await self._emit(events)
                for (_, _, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._flusher = None

    def _deliver_sync(self, batch: list[tuple[list[str], bytes]]
                      ) -> tuple[list[dict[str, str] | Exception], list[StateChangeEvent]]:
        store = self._store
        received_at = int(self._clock())
        parsed: list[mime.ParsedEmail | Exception] = []
        for usernames, raw in batch:
            for username in usernames:
                store.ensure_account(account_id_for(username), username)
            try:
                parsed.append(mime.parse_message(raw))
            except Exception as exc:  # the parser is lenient; this is a last line of defence per message
                log.exception("cannot parse a delivered message")
                parsed.append(exc)
        results: list[dict[str, str] | Exception] = []
        with store.transaction() as tx:
            for (usernames, raw), message in zip(batch, parsed, strict=True):
                if isinstance(message, Exception):
                    results.append(message)
                    continue
                ids: dict[str, str] = {}
                for username in usernames:
                    account_id = account_id_for(username)
                    writer = tx.account(account_id)
                    inbox = store.mailbox_by_role(account_id, "inbox")
                    if inbox is None:  # the client took the role away: deliveries still need a home
                        inbox = writer.create_mailbox("Inbox", None, "inbox", 1, True)
                    ids[username], _ = writer.insert_email(message, raw, [inbox], (), received_at)
                    # RFC 8887/8621 leave it open; like James, only real deliveries move EmailDelivery.
                    writer.bump("EmailDelivery")
                results.append(ids)
        return results, self._events(tx.new_states)
