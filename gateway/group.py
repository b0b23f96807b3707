"""A process group's control channel (GATEWAY_WORKERS > 1): length-prefixed msgpack frames over the socket pair
between the supervisor and each worker, and the two ends' parts: one `/metrics` page for the group, and
delegations that reach every worker.

- Ready: a worker listens (the supervisor's start waits for it).
- /metrics: the worker that takes a scrape asks the supervisor (Scrape); the supervisor asks every ready worker
  for its figures (Collect), merges them (gateway.metrics.merge) with what it keeps of the others, and answers
  with the page (Page). A scrape costs a round trip to every worker; between scrapes nothing is paid.
- /admin/delegations: the worker that committed a change to the shared database tells the supervisor (Changed);
  the supervisor tells every other worker, each re-reads that grant from the database, and the supervisor answers
  (Done) once they have, so an admin's PUT or DELETE returns when every running worker applies it (a worker
  being started answers once it has loaded every grant and applied this one; APPLY_TIMEOUT bounds the wait).

What the supervisor keeps between scrapes: the counters and histograms of each worker's newest figures. A worker
that does not answer in time counts with them; a worker that died counts with them for good (its retired figures), so
the group's counters never go down while the supervisor runs, as Prometheus expects of a counter (what a worker
counted after the last scrape before it died is lost). A worker's gauges count only while it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
from prometheus_client import CollectorRegistry

from gateway.errors import GatewayError, Unavailable
from gateway.metrics import Family, Sample, cumulative, exposition, figures, merge
from gateway.sharing import Sharing

log = logging.getLogger(__name__)

# A worker's figures must come within this; one that does not counts with its last ones (the scrape still answers).
COLLECT_TIMEOUT = 3.0
# Other workers must confirm a delegation change within this; the admin's call is answered anyway after it.
APPLY_TIMEOUT = 5.0
# What a worker waits for the supervisor: above either of the two, below Prometheus' default scrape timeout (10 s).
ASK_TIMEOUT = 8.0
MAX_FRAME = 64 << 20
_HEADER = struct.Struct(">I")


class Ready(msgspec.Struct, tag=True):
    node: str  # the worker's bus node id, for the supervisor's log


class Scrape(msgspec.Struct, tag=True):
    id: int


class Page(msgspec.Struct, tag=True):
    id: int
    body: bytes  # the group's Prometheus text page


class Collect(msgspec.Struct, tag=True):
    id: int


class Figures(msgspec.Struct, tag=True):
    id: int
    families: list[Family]


class Changed(msgspec.Struct, tag=True):
    id: int
    owner: str
    delegate: str
    granted: bool


class Done(msgspec.Struct, tag=True):
    id: int


class Failed(msgspec.Struct, tag=True):
    id: int
    reason: str


Request = Scrape | Collect | Changed
Reply = Page | Figures | Done | Failed
Message = Ready | Request | Reply
Handler = Callable[[Request], Awaitable[Reply]]
R = TypeVar("R", Page, Figures, Done)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Message).decode


class GroupError(GatewayError):
    """The other end cannot answer: the channel is closed, the answer is late, or it failed there."""


class Channel:
    """One end of a socket pair: sends requests and waits for their replies (`ask`), answers the other end's
    requests with `handle` (each in a task of its own, so a slow one holds up nothing), and receives Ready."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handle: Handler,
                 on_close: Callable[[], None] | None = None) -> None:
        self._reader, self._writer, self._handle, self._on_close = reader, writer, handle, on_close
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[str] = loop.create_future()  # the node id a worker announced
        self.closed = asyncio.Event()
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._last_id = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading = loop.create_task(self._read())

    @classmethod
    async def open(cls, sock: socket.socket, handle: Handler, on_close: Callable[[], None] | None = None) -> Channel:
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer, handle, on_close)

    def send(self, message: Message) -> None:
        if self.closed.is_set() or self._writer.is_closing():
            raise GroupError("the control channel is closed")
        data = _encode(message)
        self._writer.write(_HEADER.pack(len(data)) + data)

    async def ask(self, make: Callable[[int], Request], expect: type[R], timeout: float) -> R:
        self._last_id += 1
        key = self._last_id
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            self.send(make(key))
            async with asyncio.timeout(timeout):
                reply = await future
        except TimeoutError:
            raise GroupError(f"no answer within {timeout:g}s") from None
        finally:
            self._pending.pop(key, None)
        if isinstance(reply, Failed):
            raise GroupError(reply.reason)
        if not isinstance(reply, expect):
            raise GroupError(f"{type(reply).__name__} answered where {expect.__name__} was expected")
        return reply

    async def _read(self) -> None:
        try:
            while True:
                (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
                if size > MAX_FRAME:
                    raise GroupError(f"a frame of {size} bytes")
                self._dispatch(_decode(await self._reader.readexactly(size)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # end of file: the other process is gone (or closed its end)
        except asyncio.CancelledError:
            self._on_close = None  # this process is ending (closing, or its loop shutting down): nobody to tell
            raise
        except (GroupError, msgspec.DecodeError) as exc:
            log.error("the control channel broke: %s", exc)
        finally:
            self._closed()

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Ready):
            if not self.ready.done():
                self.ready.set_result(message.node)
        elif isinstance(message, Page | Figures | Done | Failed):
            future = self._pending.get(message.id)
            if future is not None and not future.done():
                future.set_result(message)
        else:
            task = asyncio.get_running_loop().create_task(self._answer(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, request: Request) -> None:
        reply: Reply
        try:
            reply = await self._handle(request)
        except Exception as exc:
            log.exception("answering %s failed", type(request).__name__)
            reply = Failed(request.id, f"{type(request).__name__} failed: {exc}")
        with contextlib.suppress(GroupError):
            self.send(reply)

    def _closed(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(GroupError("the control channel is closed"))
        self._writer.close()
        if self._on_close is not None:
            self._on_close()

    async def close(self) -> None:
        self._on_close = None  # closing on purpose: nobody is to be told
        self._closed()
        self._reading.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(self._reading, *self._tasks, return_exceptions=True)


# --- the worker's end -----------------------------------------------------------------------------------------

class WorkerLink:
    """A worker's end: answers Collect with its registry's figures and Changed through its sharing, asks for the
    group's page (`page`, set as Metrics.gather) and announces its own delegation changes (Sharing.announce)."""

    def __init__(self, registry: CollectorRegistry, sharing: Sharing | None) -> None:
        self._registry = registry
        self._sharing = sharing
        self._serving = asyncio.Event()
        self._channel: Channel | None = None

    async def connect(self, sock: socket.socket, on_parent_gone: Callable[[], None]) -> None:
        self._channel = await Channel.open(sock, self._handle, on_parent_gone)

    @property
    def channel(self) -> Channel:
        if self._channel is None:
            raise GroupError("not connected")
        return self._channel

    def ready(self, node_id: str) -> None:
        """The gateway listens (its backend has loaded every grant): say so, and apply changes from now on."""
        self._serving.set()
        with contextlib.suppress(GroupError):  # the supervisor is gone already: on_parent_gone stops this worker
            self.channel.send(Ready(node_id))

    async def page(self) -> bytes:
        try:
            reply = await self.channel.ask(Scrape, Page, ASK_TIMEOUT)
        except GroupError as exc:
            raise Unavailable(f"The process group's metrics cannot be gathered now: {exc}.") from None
        return reply.body

    async def announce(self, owner: str, delegate: str, granted: bool) -> None:
        await self.channel.ask(lambda i: Changed(i, owner, delegate, granted), Done, ASK_TIMEOUT)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def _handle(self, request: Request) -> Reply:
        if isinstance(request, Collect):
            return Figures(request.id, figures(self._registry))
        if isinstance(request, Changed):
            # Before Ready the backend may not have loaded the grants yet; the change is applied after that load.
            await self._serving.wait()
            if self._sharing is not None:
                await self._sharing.changed_elsewhere(request.owner, request.delegate, request.granted)
            return Done(request.id)
        raise GroupError(f"a worker does not answer {type(request).__name__}")


# --- the supervisor's end -------------------------------------------------------------------------------------

class _Member:
    __slots__ = ("channel", "last", "last_id", "ready")

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.ready = False
        self.last: list[Family] = []  # the counters and histograms of its newest figures
        self.last_id = 0  # the request those were the answer to

    def seen(self, answer: Figures) -> None:
        # Request ids grow on a channel and a worker answers Collects in their order (each at once), so a higher
        # id is newer figures: with concurrent scrapes (two Prometheus servers) an older answer arriving last must
        # not replace a newer one, or a later page could count less than an earlier one.
        if answer.id > self.last_id:
            self.last, self.last_id = cumulative(answer.families), answer.id


class GroupHub:
    """The supervisor's part: the workers' channels by worker index, the group's page, and the relay of
    delegation changes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.restarts = 0
        self._members: dict[int, _Member] = {}
        self._gone: list[_Member] = []  # workers that died, while a page being gathered may still hear from them
        self._retired: list[Family] = []  # the counters and histograms of workers that died, summed
        self._gathering = 0  # pages waiting for workers' figures

    def handler(self, index: int) -> Handler:
        return lambda request: self._handle(index, request)

    def join(self, index: int, channel: Channel) -> None:
        """`channel` is worker `index`'s from now on (before its process starts: nothing sent to it is lost)."""
        if index in self._members:
            self.leave(index)
        self._members[index] = _Member(channel)

    def mark_ready(self, index: int) -> None:
        member = self._members.get(index)
        if member is not None:
            member.ready = True

    def leave(self, index: int) -> Channel | None:
        """Worker `index`'s process has ended: its counters count on as retired figures. Returns its channel."""
        member = self._members.pop(index, None)
        if member is None:
            return None
        self._gone.append(member)
        self._fold()
        return member.channel

    def _fold(self) -> None:
        # Only while no page waits: figures it asked a dead worker for before its death may still arrive, and
        # must land on the member, not be lost beside a sum that already holds the member's older figures.
        if self._gathering:
            return
        if self._gone:
            self._retired = merge([("", self._retired), *(("", m.last) for m in self._gone)])
            self._gone.clear()

    def channels(self) -> list[Channel]:
        return [m.channel for m in self._members.values()]

    async def _handle(self, index: int, request: Request) -> Reply:
        if isinstance(request, Scrape):
            return Page(request.id, await self.page())
        if isinstance(request, Changed):
            await self.relay(index, request.owner, request.delegate, request.granted)
            return Done(request.id)
        raise GroupError(f"the supervisor does not answer {type(request).__name__}")

    async def page(self) -> bytes:
        """The group's Prometheus page: every ready worker's figures now, the others' counters as last seen,
        those of dead workers for good."""
        asked = [(i, m) for i, m in sorted(self._members.items()) if m.ready]
        self._gathering += 1
        try:
            answers = await asyncio.gather(*(self._collect(m) for _, m in asked))
        finally:
            self._gathering -= 1
        # From here on no await: the members, the gone and the retired are read as of one moment.
        parts: list[tuple[str, list[Family]]] = []
        fresh: set[int] = set()
        for (i, member), answer in zip(asked, answers, strict=True):
            if answer is not None:
                member.seen(answer)
                parts.append((str(i), answer.families))
                fresh.add(id(member))
        parts += [(str(i), m.last) for i, m in sorted(self._members.items()) if id(m) not in fresh and m.last]
        parts += [("retired", m.last) for m in self._gone if id(m) not in fresh and m.last]
        parts.append(("retired", self._retired))
        parts.append(("0", self._own(len(fresh))))
        self._fold()
        return exposition(merge(parts))

    async def _collect(self, member: _Member) -> Figures | None:
        try:
            return await member.channel.ask(Collect, Figures, COLLECT_TIMEOUT)
        except GroupError as exc:
            log.warning("a worker's figures are missing from a scrape: %s", exc)
            return None

    def _own(self, answered: int) -> list[Family]:
        return [
            Family("gateway_workers", "gauge", "Worker processes of this group (GATEWAY_WORKERS)",
                   [Sample("gateway_workers", {}, float(self.size))]),
            Family("gateway_workers_answered", "gauge",
                   "Workers whose figures are current on this page (the others count with their last counters)",
                   [Sample("gateway_workers_answered", {}, float(answered))]),
            Family("gateway_worker_restarts", "counter", "Workers restarted by the supervisor after they died",
                   [Sample("gateway_worker_restarts_total", {}, float(self.restarts))]),
        ]

    async def relay(self, origin: int, owner: str, delegate: str, granted: bool) -> None:
        """Tell every worker but `origin` that a grant changed; return once the ready ones have applied it."""
        def make(i: int) -> Changed:
            return Changed(i, owner, delegate, granted)

        # Every worker whose process runs, starting ones too (they answer once they have loaded every grant and
        # applied this one), so that no worker accepts connections without the grant once the call is answered.
        # A worker whose process ended is skipped: the next one loads the grant from the database.
        waits = [member.channel.ask(make, Done, APPLY_TIMEOUT) for index, member in sorted(self._members.items())
                 if index != origin and not member.channel.closed.is_set()]
        for outcome in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(outcome, BaseException):
                log.warning("a worker did not confirm the delegation %s -> %s: %s", owner, delegate, outcome)
