"""Front mode's events from the upstream's own push (GATEWAY_UPSTREAM_EVENTS=eventsource): an adapter of the bus
port that reads RFC 8620 §7.3 event streams from the upstream's `eventSourceUrl`, for upstreams without RabbitMQ
(Cyrus, Stalwart, another jmap-push-gateway). It serves no event stream itself (gateway.transport.sse does) and
knows no request path: the role says, for a principal, which URL and credentials to use (`SourceOf`).

How it keeps the contract of gateway.bus.base:
- One stream per subscribed owner (the username an account's events carry), shared by every local session of that
  account: `subscribe(owner)` opens it (`types=*`, `closeafter=no`, `ping=PING`) with the credentials of a principal
  whose subscription covers the owner's account (the hub says who: principal_joined/left); `unsubscribe` closes it
  CLOSE_DELAY seconds later unless the owner is subscribed again meanwhile (a client that reconnects at once).
- Each `state` event's `changed` entry for the owner's account (its id as that principal's session names it) goes
  to the hub as StateChangeEvent(username=owner, typeStates=...), synchronously, in the stream's order; the entries
  of the principal's other accounts are their owners' streams' business.
- Credentials: a stream holds a principal, never the credentials beyond the one request that opens it. It uses the
  principal that has covered the owner longest (sessions that lived long tend to stay); when that one leaves while
  others stay, the stream reconnects with another's. One the upstream rejects (401, 403) is passed over until it
  leaves (or every other one was rejected too); one without upstream credentials (a Bearer JWT only this gateway
  verifies) cannot open a stream, which then waits for a session that can and opens as soon as one joins.
- Reconnection: with `Last-Event-ID` (the id of the last event read; a jmap-push-gateway upstream resumes from it
  as from a pushState), after a back-off that doubles from BACKOFF_MIN to BACKOFF_MAX with jitter; a stream that
  stayed open STABLE seconds starts again from BACKOFF_MIN. A stream that was lost or could not be opened is a gap:
  once it is open again, `on_gap([owner])` has the hub re-read that owner's accounts (an upstream need not honour
  Last-Event-ID). Once a `ping` event (RFC 8620 §7.3) has said the interval, a silence of twice that ends the
  stream (a connection that died without a FIN).
- 204 No Content means "no event stream here" (an EventSource client stops reconnecting on it; Debian's Cyrus 3.6,
  built without wslay, answers every request so): logged once, counted, tried again only every NO_STREAM_RETRY s.
- `ready` is False while a stream cannot be opened for want of the upstream (unreachable, 5xx, 204, not an event
  stream): the hub then trusts none of the states it holds and reads the upstream at every resume. A stream
  refused for its credentials alone leaves the process ready (one user's problem, not the node's).
- Bounded: at most GATEWAY_UPSTREAM_EVENT_STREAMS streams. A further owner is refused one (a warning once per owner,
  counted) and waits for a free one; meanwhile its accounts are re-read every REFUSED_RESYNC seconds, so that
  their sessions are pushed what moved, late, and resumes do not trust states nobody keeps current.
- `publish()` hands events to this process's hub only, as the memory bus does: the upstream is the source of
  events, and `/admin/events` still injects into local sessions (tests, operators); no other process sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple

import httpx
import msgspec
from httpx_sse import EventSource, SSEError, aconnect_sse

from gateway.bus.base import EventHandler, GapHandler
from gateway.bus.events import StateChangeEvent
from gateway.config import Settings
from gateway.directory import Principal
from gateway.eventstream import stream_url

log = logging.getLogger(__name__)

PING = 30  # seconds between pings asked of the upstream (RFC 8620 §7.3 `ping`)
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
STABLE = 10.0  # seconds a stream must stay open for its back-off to start again from BACKOFF_MIN
NO_STREAM_RETRY = 300.0  # after a 204 No Content
CLOSE_DELAY = 5.0
REFUSED_RESYNC = 60.0
GAP_BATCH = 0.05  # reopened streams' gaps within this window are read in one go
WARNED_MAX = 100_000  # owners remembered as warned about the cap


class StreamSource(NamedTuple):
    """How to open an owner's stream with one principal's credentials (found by the role, gateway.roles)."""

    url: str  # the principal's eventSourceUrl: absolute, a URI template (RFC 8620 §2)
    authorization: str  # the Authorization header value
    account_id: str  # the owner's account, as this principal's session names it


SourceOf = Callable[[Principal, str], StreamSource | None]


class _Change(msgspec.Struct):
    """RFC 8620 §7.1 StateChange, as a `state` event's data carries it (only `changed` is read)."""

    changed: dict[str, dict[str, str]]


_decode_change = msgspec.json.Decoder(_Change).decode


class _Ping(msgspec.Struct):
    interval: int = 0


_decode_ping = msgspec.json.Decoder(_Ping).decode


class _Failed(Exception):
    """An attempt that ended without an open stream. `kind`: unavailable (the upstream's fault: makes the process
    unready), no_stream (204), credentials (no usable principal, or the upstream rejected it)."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind
        self.why = why


class _Cover:
    """A principal covering an owner, and how many of its subscriptions do."""

    __slots__ = ("count", "principal")

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.count = 0


class _Stream:
    """One owner's stream: who it reads as, where it stands, and the task that runs it."""

    __slots__ = ("account_id", "attempts", "gap", "last_id", "needs_credentials", "opened_at", "owner", "principal",
                 "rejected", "settled", "task")

    def __init__(self, owner: str, gap: bool) -> None:
        self.owner = owner
        self.principal: Principal | None = None
        self.rejected: set[int] = set()  # ids of principals the upstream refused for this stream
        self.account_id = ""
        self.last_id = ""  # Last-Event-ID for the next connection
        self.gap = gap  # events may have been missed: re-read the owner's accounts once open
        self.opened_at = 0.0  # loop time the current connection opened, 0 while it is not open
        self.attempts = 0  # failures since the stream was last stable
        self.needs_credentials = False  # the last attempt had no principal whose credentials would do
        self.settled = asyncio.Event()  # the latest attempt has an outcome (open, or failed)
        self.task: asyncio.Task[None] | None = None


class UpstreamEventStreams:
    """The bus port over the upstream's event streams: one per owner with local sessions."""

    def __init__(self, settings: Settings, source_of: SourceOf, *, close_delay: float = CLOSE_DELAY,
                 backoff_min: float = BACKOFF_MIN, backoff_max: float = BACKOFF_MAX) -> None:
        self._settings = settings
        self._source_of = source_of
        self._cap = settings.upstream_event_streams
        self._timeout = settings.upstream_timeout
        self._close_delay = close_delay
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._handler: EventHandler | None = None
        self._on_gap: GapHandler | None = None
        self._http: httpx.AsyncClient | None = None
        # owner -> id(principal) -> the principal and its subscriptions covering the owner, oldest first.
        self._covering: dict[str, dict[int, _Cover]] = {}
        self._streams: dict[str, _Stream] = {}
        self._waiting: dict[str, None] = {}  # subscribed owners refused a stream for the cap, oldest first
        self._warned: set[str] = set()
        self._close_timers: dict[str, asyncio.TimerHandle] = {}
        self._down: set[str] = set()  # owners whose stream the upstream does not let open
        self._gaps: set[str] = set()
        self._gap_handle: asyncio.TimerHandle | None = None
        self._resync_handle: asyncio.TimerHandle | None = None
        self._switches: set[str] = set()
        self._no_stream_logged = False
        # Counters exported as metrics (gateway_bus_*).
        self.received_events = 0
        self.poison_events = 0
        self.published_events = 0
        self.streams_open = 0
        self.attempts = 0
        self.failures = 0
        self.reconnects = 0
        self.refusals = 0
        self.no_content = 0
        self.rejections = 0
        self.switches = 0

    @property
    def waiting(self) -> int:
        """Subscribed owners refused a stream for the cap, waiting for one."""
        return len(self._waiting)

    # --- the port ---------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._http is not None and not self._down

    async def start(self, handler: EventHandler, on_gap: GapHandler) -> None:
        self._handler = handler
        self._on_gap = on_gap
        t = self._timeout
        # No read timeout: a stream is silent between events (pings bound it, see _read). No keep-alive: every
        # stream is one long response on its own connection, and a finished one is not reused.
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=t, read=None, write=t, pool=t),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            trust_env=False, headers={"User-Agent": "jmap-push-gateway"})
        for stream in self._streams.values():
            self._run(stream)

    async def stop(self) -> None:
        for handle in (*self._close_timers.values(), self._gap_handle, self._resync_handle):
            if handle is not None:
                handle.cancel()
        self._close_timers.clear()
        self._gap_handle = self._resync_handle = None
        tasks = [s.task for s in self._streams.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._streams.clear()
        self._waiting.clear()
        self._down.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        self._handler = self._on_gap = None

    def subscribe(self, username: str) -> None:
        timer = self._close_timers.pop(username, None)
        if timer is not None:
            timer.cancel()
        if username in self._streams or username in self._waiting:
            return
        if len(self._streams) >= self._cap:
            self._refuse(username)
            return
        self._open(username, gap=False)

    def unsubscribe(self, username: str) -> None:
        if username in self._waiting:
            del self._waiting[username]
            return
        if username not in self._streams or username in self._close_timers:
            return
        if self._close_delay > 0 and self._http is not None:
            self._close_timers[username] = asyncio.get_running_loop().call_later(
                self._close_delay, self._close, username)
        else:
            self._close(username)

    def bound(self, username: str) -> bool:
        """Whether `username`'s stream is open now (its events reach this node)."""
        stream = self._streams.get(username)
        return stream is not None and stream.opened_at > 0

    async def wait_subscribed(self, usernames: Collection[str]) -> None:
        """Once each owner's stream is open, or its latest attempt failed (a refused owner has none to wait for)."""
        waits = [s.settled.wait() for u in usernames if (s := self._streams.get(u)) is not None]
        await asyncio.gather(*waits)

    async def publish(self, events: Sequence[StateChangeEvent]) -> None:
        """Local injection (`/admin/events`): to this process's sessions, like the memory bus."""
        self.publish_now(events)

    def publish_now(self, events: Sequence[StateChangeEvent]) -> None:
        handler = self._handler
        if handler is None:
            return
        self.published_events += len(events)
        wanted = [e for e in events if e.username in self._streams or e.username in self._waiting]
        if wanted:
            handler(wanted)

    def counters(self) -> list[tuple[str, str, float]]:
        return [
            ("received_events", "State events taken from upstream event streams for covered accounts",
             self.received_events),
            ("poison_events", "Upstream state events whose data is not a StateChange", self.poison_events),
            ("published_events", "Events injected locally (/admin/events)", self.published_events),
            ("upstream_streams_open", "Upstream event streams open now", self.streams_open),
            ("upstream_streams", "Upstream event streams held (open or being opened)", len(self._streams)),
            ("upstream_streams_waiting", "Owners refused a stream for GATEWAY_UPSTREAM_EVENT_STREAMS, waiting",
             self.waiting),
            ("upstream_stream_attempts", "Requests made to open an upstream event stream", self.attempts),
            ("upstream_stream_failures", "Attempts that did not open a stream", self.failures),
            ("upstream_stream_reconnects", "Streams open again after a loss or a failed attempt", self.reconnects),
            ("upstream_stream_refusals", "Streams refused for GATEWAY_UPSTREAM_EVENT_STREAMS", self.refusals),
            ("upstream_stream_no_content", "204 No Content answers: no event stream at the upstream", self.no_content),
            ("upstream_stream_rejections", "401/403 answers to a principal's credentials", self.rejections),
            ("upstream_stream_switches", "Streams reopened with another principal's credentials", self.switches),
        ]

    # --- who covers an owner (the hub's optional hooks, gateway.bus.base) --------------------------------------

    def principal_joined(self, username: str, principal: Principal) -> None:
        entries = self._covering.setdefault(username, {})
        entry = entries.get(id(principal))
        if entry is None:
            entry = entries[id(principal)] = _Cover(principal)
            stream = self._streams.get(username)
            if stream is not None and stream.needs_credentials and username not in self._switches:
                # A stream waiting for usable credentials tries the newcomer's now, not after its back-off.
                self._switches.add(username)
                asyncio.get_running_loop().call_soon(self._switch, username)
        entry.count += 1

    def principal_left(self, username: str, principal: Principal) -> None:
        entries = self._covering.get(username)
        entry = entries.get(id(principal)) if entries is not None else None
        if entries is None or entry is None:
            return
        entry.count -= 1
        if entry.count > 0:
            return
        del entries[id(principal)]
        if not entries:
            del self._covering[username]
        stream = self._streams.get(username)
        if stream is None:
            return
        stream.rejected.discard(id(principal))
        if stream.principal is principal:
            # Its session is gone: the stream keeps no credentials of it, and reads as another one's.
            stream.principal = None
            if username in self._covering and username not in self._switches:
                self._switches.add(username)
                asyncio.get_running_loop().call_soon(self._switch, username)

    # --- streams ----------------------------------------------------------------------------------------------

    def _open(self, owner: str, gap: bool) -> None:
        stream = self._streams[owner] = _Stream(owner, gap)
        if self._http is not None:
            self._run(stream)

    def _run(self, stream: _Stream) -> None:
        stream.task = asyncio.get_running_loop().create_task(self._keep(stream), name=f"upstream-events:{stream.owner}")

    def _close(self, owner: str) -> None:
        self._close_timers.pop(owner, None)
        stream = self._streams.pop(owner, None)
        if stream is None:
            return
        if stream.task is not None:
            stream.task.cancel()
        self._set_down(owner, False)
        if self._waiting:
            # A slot is free: the owner waiting longest gets it (what it missed meanwhile is read once it is open).
            promoted = next(iter(self._waiting))
            del self._waiting[promoted]
            self._open(promoted, gap=True)

    def _switch(self, owner: str) -> None:
        """Reopen the stream at once with another principal: its own left, or it had none that would do."""
        self._switches.discard(owner)
        stream = self._streams.get(owner)
        if stream is None or owner not in self._covering:
            return
        if stream.needs_credentials:
            stream.needs_credentials = False
        elif stream.principal is None:
            self.switches += 1
        else:
            return
        if stream.task is not None:
            stream.task.cancel()
        stream.opened_at = 0.0
        stream.settled.clear()
        stream.gap = True  # nothing is lost between the two connections only if the upstream resumes
        self._run(stream)

    def _refuse(self, owner: str) -> None:
        self._waiting[owner] = None
        self.refusals += 1
        if owner not in self._warned:
            if len(self._warned) >= WARNED_MAX:
                self._warned.clear()
            self._warned.add(owner)
            log.warning("no upstream event stream for %s: GATEWAY_UPSTREAM_EVENT_STREAMS=%d are held; its states "
                        "are re-read every %gs until one is free", owner, self._cap, REFUSED_RESYNC,
                        extra={"username": owner})
        if self._resync_handle is None:
            self._resync_handle = asyncio.get_running_loop().call_later(REFUSED_RESYNC, self._resync_waiting)

    def _resync_waiting(self) -> None:
        self._resync_handle = None
        if not self._waiting:
            return
        if self._on_gap is not None:
            self._on_gap(list(self._waiting))
        self._resync_handle = asyncio.get_running_loop().call_later(REFUSED_RESYNC, self._resync_waiting)

    async def _keep(self, stream: _Stream) -> None:
        """Open the stream, read it, and open it again whenever it ends, until cancelled (unsubscribe, stop)."""
        while True:
            failure: _Failed | None = None
            try:
                await self._attempt(stream)
            except _Failed as exc:
                failure = exc
            except (httpx.HTTPError, httpx.StreamError, httpx.InvalidURL, SSEError, OSError, TimeoutError) as exc:
                failure = _Failed("unavailable", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            await asyncio.sleep(self._after(stream, failure))

    async def _attempt(self, stream: _Stream) -> None:
        principal = self._choose(stream)
        if principal is None:
            raise _Failed("credentials", "no local session of this account has upstream credentials")
        source = self._source_of(principal, stream.owner)
        if source is None:
            stream.rejected.add(id(principal))
            raise _Failed("credentials", "the session has no upstream eventSourceUrl")
        headers = {"Authorization": source.authorization}
        if stream.last_id:
            headers["Last-Event-ID"] = stream.last_id
        url, account_id = stream_url(source.url, "*", "no", PING), source.account_id
        del source  # the credentials stay in the principal only
        assert self._http is not None
        self.attempts += 1
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(self._timeout):
                events = await stack.enter_async_context(aconnect_sse(self._http, "GET", url, headers=headers))
            status = events.response.status_code
            if status == 204:
                raise _Failed("no_stream", "204 No Content")
            if status in (401, 403):
                self.rejections += 1
                stream.rejected.add(id(principal))
                raise _Failed("credentials", f"the upstream answered {status} to these credentials")
            if status != 200:
                raise _Failed("unavailable", f"the upstream answered {status}")
            if events.response.headers.get("content-type", "").partition(";")[0].strip() != "text/event-stream":
                raise _Failed("unavailable", "the answer is not an event stream")
            self._opened(stream, account_id)
            try:
                await self._read(stream, events)
            finally:
                self.streams_open -= 1

    def _choose(self, stream: _Stream) -> Principal | None:
        """The stream's principal while it covers the owner, else the one covering it longest not rejected."""
        entries = self._covering.get(stream.owner, {})
        current = stream.principal
        if current is not None and id(current) in entries and id(current) not in stream.rejected:
            return current
        for pid, entry in entries.items():
            if pid not in stream.rejected:
                stream.principal = entry.principal
                return entry.principal
        # Every one was rejected: try them all again after this back-off (their credentials may work again).
        stream.rejected.clear()
        stream.principal = None
        return None

    def _opened(self, stream: _Stream, account_id: str) -> None:
        loop = asyncio.get_running_loop()
        stream.account_id = account_id
        stream.opened_at = loop.time()
        stream.needs_credentials = False
        self.streams_open += 1
        self._set_down(stream.owner, False)
        stream.settled.set()
        if stream.gap:
            stream.gap = False
            self.reconnects += 1
            self._gaps.add(stream.owner)
            if self._gap_handle is None:
                self._gap_handle = loop.call_later(GAP_BATCH, self._flush_gaps)

    def _flush_gaps(self) -> None:
        self._gap_handle = None
        owners, self._gaps = self._gaps, set()
        if self._on_gap is not None and owners:
            self._on_gap(owners)

    async def _read(self, stream: _Stream, events: EventSource) -> None:
        loop = asyncio.get_running_loop()
        silence: float | None = None  # known once a ping said the interval
        async with asyncio.timeout(None) as idle:
            async for event in events.aiter_sse():
                if event.event == "state":
                    self._state(stream, event.data)
                elif event.event == "ping":
                    try:
                        interval = _decode_ping(event.data).interval
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        interval = 0
                    # RFC 8620 §7.3: pings come whenever `interval` seconds pass without another event.
                    silence = 2.0 * interval + 5.0 if interval > 0 else None
                if event.id:
                    stream.last_id = event.id
                idle.reschedule(None if silence is None else loop.time() + silence)

    def _state(self, stream: _Stream, data: str) -> None:
        try:
            change = _decode_change(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.poison_events += 1
            return
        states = change.changed.get(stream.account_id)
        handler = self._handler
        if states and handler is not None:
            self.received_events += 1
            handler([StateChangeEvent(username=stream.owner, typeStates=states)])

    def _after(self, stream: _Stream, failure: _Failed | None) -> float:
        """Book an attempt's end; the seconds to wait before the next one."""
        loop = asyncio.get_running_loop()
        stream.gap = True
        stream.settled.set()
        opened, stream.opened_at = stream.opened_at, 0.0
        if opened:
            # The stream was open and ended: the upstream closed it, the connection broke, or it went silent.
            if loop.time() - opened >= STABLE:
                stream.attempts = 0
            why = failure.why if failure is not None else "closed by the upstream"
            log.debug("upstream event stream of %s ended (%s); reconnecting", stream.owner, why,
                      extra={"username": stream.owner})
        elif failure is not None:
            self.failures += 1
            log.debug("upstream event stream of %s: %s", stream.owner, failure.why, extra={"username": stream.owner})
            if failure.kind == "no_stream":
                self.no_content += 1
                if not self._no_stream_logged:
                    self._no_stream_logged = True
                    log.warning("the upstream answers its eventSourceUrl with 204 No Content: it serves no event "
                                "stream (e.g. a Cyrus built without wslay), so no pushes come from it; trying again "
                                "every %gs", NO_STREAM_RETRY)
                self._set_down(stream.owner, True)  # (said above, once)
                return NO_STREAM_RETRY * random.uniform(0.9, 1.0)
            if failure.kind == "unavailable":
                self._set_down(stream.owner, True, failure.why)
            elif failure.kind == "credentials":
                stream.needs_credentials = True
        delay = min(self._backoff_max, self._backoff_min * 2.0 ** stream.attempts)
        stream.attempts += 1
        return random.uniform(delay / 2, delay)

    def _set_down(self, owner: str, down: bool, why: str = "") -> None:
        if down:
            if not self._down and why:
                log.warning("upstream event streams cannot be opened (%s); pushes resume once they are back", why)
            self._down.add(owner)
        elif owner in self._down:
            self._down.discard(owner)
            if not self._down:
                log.info("upstream event streams are open again")
