"""The load generator: one worker process holding thousands of WebSocket clients (picows on uvloop), or RFC 8620
§7.3 event-stream clients (a plain asyncio protocol reading `event: state` lines), driven by the harness over a
multiprocessing pipe.

Each client records, for every pushed message, the receipt time minus the publish time carried in the state
string (`t<monotonic ns>-<seq>`; CLOCK_MONOTONIC is one clock for every process on the machine). Samples go into
a flat array during a measurement and into HdrHistograms only when the harness collects them, so that the hot
receive path stays a few hundred nanoseconds of Python. No scenario logic here: the harness decides what to
connect, when to publish and what to conclude.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import os
import resource
import socket
import sys
import time
import traceback
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import Any
from urllib.parse import urlsplit

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the source port at connect(), per destination, not at bind()
SLOW_RCVBUF = 4096  # a slow consumer's receive buffer: small, so its backlog reaches the server quickly
_CHANGED = b'"changed"'
_STAMP = b':"t'
SYNC_ID = b'"requestId":"sync"'

ENABLE = b'{"@type":"WebSocketPushEnable","dataTypes":null}'
SYNC = (b'{"@type":"Request","id":"sync","using":["urn:ietf:params:jmap:core"],'
        b'"methodCalls":[["Core/echo",{},"c0"]]}')


class Tally:
    """What one tag (system/label) received since the last reset."""

    __slots__ = ("bytes", "count", "lat", "merged", "other")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        # In place: every client holds its tag's Tally, so a reset must not replace the object.
        self.lat: array.array[int] = array.array("q")
        self.count = 0
        self.bytes = 0
        self.other = 0  # messages without a stamp (e.g. the gateway's resume pushes)
        self.merged = 0  # events superseded by a newer state in the same push (counted in `count` too)


class Worker:
    def __init__(self, pipe: Connection, index: int, source_ip: str) -> None:
        self.pipe = pipe
        self.index = index
        self.source_ip = source_ip
        self.clients: list[Client | SseClient] = []
        self.tallies: dict[str, Tally] = {}
        self.group_size: dict[str, int] = {}  # group -> reading clients of this worker in it
        self.per_seq: dict[int, list[int]] = {}  # seq -> [count, last receipt ns]
        self.notify = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopped: asyncio.Event | None = None

    def tally(self, tag: str) -> Tally:
        t = self.tallies.get(tag)
        if t is None:
            t = self.tallies[tag] = Tally()
        return t

    def send(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.pipe.send(msg)

    # --- commands ------------------------------------------------------------------------------------------

    async def handle(self, cmd: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"id": cmd["id"]}
        try:
            op = cmd["op"]
            if op == "connect":
                reply.update(await self.connect(cmd["items"], cmd.get("concurrency", 64), cmd.get("extensions")))
            elif op == "reset":
                self.reset(cmd.get("tags"))
            elif op == "notify":
                self.notify = bool(cmd["on"])
                self.per_seq.clear()
            elif op == "stats":
                reply["stats"] = self.stats(cmd.get("touched", False))
            elif op == "collect":
                reply["tags"] = self.collect(cmd.get("tags"))
            elif op == "pause":
                reply["n"] = self.set_reading(cmd["tag"], False)
            elif op == "resume":
                reply["n"] = self.set_reading(cmd["tag"], True)
            elif op == "close":
                reply["n"] = await self.close(cmd.get("tags"))
            elif op == "churn":
                reply.update(await self.churn(cmd["url"], cmd.get("headers"), cmd["duration"], cmd["concurrency"]))
            elif op == "exit":
                await self.close(None)
                assert self.stopped is not None
                self.stopped.set()
            else:
                reply["error"] = f"unknown op {op!r}"
        except Exception:
            reply["error"] = traceback.format_exc(limit=5)
        self.send(reply)

    async def connect(self, items: list[tuple[str, str, str, list[tuple[str, str]], bool, bool]], concurrency: int,
                      extensions: str | None) -> dict[str, Any]:
        """items: (tag, group, url, headers, gateway?, slow?). Gateway clients enable push and wait for a reply
        behind the enable, which proves the subscription is registered (the hub registers before it awaits)."""
        sem = asyncio.Semaphore(concurrency)
        errors: list[str] = []
        negotiated: dict[str, int] = {}
        ok = 0

        async def one(item: tuple[str, str, str, list[tuple[str, str]], bool, bool]) -> None:
            nonlocal ok
            tag, group, url, headers, gateway, slow = item
            hdrs = list(headers)
            if extensions:
                hdrs.append(("Sec-WebSocket-Extensions", extensions))
            async with sem:
                try:
                    client = await self.open_client(url, hdrs, tag, group, slow)
                    if gateway:
                        await client.subscribe_gateway()
                except Exception as exc:
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    return
            ok += 1
            assert client.transport is not None
            ext = client.transport.response.headers.get("Sec-WebSocket-Extensions")
            if ext:
                negotiated[tag] = negotiated.get(tag, 0) + 1

        await asyncio.gather(*(one(it) for it in items))
        return {"ok": ok, "failed": len(items) - ok, "errors": errors, "negotiated": negotiated,
                "groups": dict(self.group_size)}

    async def open_client(self, url: str, headers: list[tuple[str, str]], tag: str, group: str,
                          slow: bool, track: bool = True) -> Client | SseClient:
        source_ip = self.source_ip

        def make_socket(_parsed: object) -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # Several 127.0.0.x sources, each with its own ephemeral port range, so 10k+ clients and churn fit.
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((source_ip, 0))
            if slow:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            s.setblocking(False)
            return s

        client: Client | SseClient
        if url.startswith("http://"):
            client = await self.open_sse(url, headers, tag, group, slow, make_socket(None))
        else:
            _, client = await ws_connect(lambda: Client(self, tag, group, slow), url, extra_headers=headers,
                                         socket_factory=make_socket, read_buffer_init_size=2048,
                                         websocket_handshake_timeout=30, enable_auto_ping=False)
            assert isinstance(client, Client)
        if track:
            self.clients.append(client)
            if not slow:
                self.group_size[group] = self.group_size.get(group, 0) + 1
        return client

    async def open_sse(self, url: str, headers: list[tuple[str, str]], tag: str, group: str, slow: bool,
                       sock: socket.socket) -> SseClient:
        """An event stream: connect, send the GET; the client is subscribed once the answer's head arrived (the
        gateway registers the stream before it writes the head)."""
        assert self.loop is not None
        parts = urlsplit(url)
        await asyncio.wait_for(self.loop.sock_connect(sock, (parts.hostname, parts.port or 80)), 30)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        head = f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        _, client = await self.loop.create_connection(lambda: SseClient(self, tag, group, slow, head.encode()),
                                                      sock=sock)
        return client

    def reset(self, tags: Iterable[str] | None) -> None:
        for tag, tally in self.tallies.items():
            if tags is None or tag in tags:
                tally.clear()
        self.per_seq.clear()
        for c in self.clients:
            if tags is None or c.tag in tags:
                c.got = 0

    def stats(self, touched: bool) -> dict[str, Any]:
        out: dict[str, Any] = {tag: {"count": t.count, "bytes": t.bytes, "other": t.other, "merged": t.merged}
                               for tag, t in self.tallies.items()}
        if touched:
            # Clients that received at least one message since the reset (readiness after a warm-up).
            seen: dict[str, list[int]] = {}
            for c in self.clients:
                entry = seen.setdefault(c.tag, [0, 0])
                entry[1] += 1
                if c.got:
                    entry[0] += 1
            out["_touched"] = seen
        return out

    def collect(self, tags: Iterable[str] | None) -> dict[str, Any]:
        """Per tag: counts and the latency samples (µs) as an encoded HdrHistogram."""
        import numpy as np
        from hdrh.histogram import HdrHistogram

        out: dict[str, Any] = {}
        for tag, t in self.tallies.items():
            if tags is not None and tag not in tags:
                continue
            hist = HdrHistogram(1, 120_000_000, 3)
            if len(t.lat):
                us = np.maximum(np.frombuffer(t.lat, dtype=np.int64) // 1000, 1)
                # One record per distinct value: HdrHistogram's record is Python, the samples can be millions.
                values, counts = np.unique(np.minimum(us, 120_000_000), return_counts=True)
                for v, n in zip(values.tolist(), counts.tolist(), strict=True):
                    hist.record_value(v, n)
            out[tag] = {"count": t.count, "bytes": t.bytes, "other": t.other, "merged": t.merged,
                        "hist": base64.b64encode(hist.encode()).decode() if t.count else None}
        return out

    def set_reading(self, tag: str, on: bool) -> int:
        n = 0
        for c in self.clients:
            if c.tag == tag and c.transport is not None and not c.transport.is_disconnected:
                if on:
                    c.transport.underlying_transport.resume_reading()
                else:
                    c.transport.underlying_transport.pause_reading()
                n += 1
        return n

    async def close(self, tags: Iterable[str] | None) -> int:
        wanted = None if tags is None else set(tags)
        closing = [c for c in self.clients if wanted is None or c.tag in wanted]
        self.clients = [c for c in self.clients if wanted is not None and c.tag not in wanted]
        for c in closing:
            if c.transport is not None and not c.transport.is_disconnected:
                c.transport.disconnect(graceful=False)
            if not c.slow:
                self.group_size[c.group] = self.group_size.get(c.group, 1) - 1
        deadline = time.monotonic() + 10
        for c in closing:  # bounded: the transports report their end through picows
            if c.transport is not None and time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.transport.wait_disconnected(), max(0.01, deadline - time.monotonic()))
        self.group_size = {g: n for g, n in self.group_size.items() if n > 0}
        return len(closing)

    async def churn(self, url: str, headers: list[tuple[str, str]] | None, duration: float,
                    concurrency: int) -> dict[str, Any]:
        """Upgrade, then close at once, in `concurrency` loops for `duration` seconds."""
        done = 0
        failed = 0
        errors: list[str] = []
        deadline = time.monotonic() + duration
        hdrs = list(headers or [])

        async def loop_once() -> None:
            nonlocal done, failed
            while time.monotonic() < deadline:
                try:
                    client = await self.open_client(url, hdrs, "_churn", "_churn", False, track=False)
                except Exception as exc:
                    failed += 1
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.01)
                    continue
                done += 1
                assert client.transport is not None
                client.transport.send_close()
                client.transport.disconnect(graceful=False)

        await asyncio.gather(*(loop_once() for _ in range(concurrency)))
        return {"done": done, "failed": failed, "errors": errors}


class Client(WSListener):  # type: ignore[misc]
    __slots__ = ("got", "group", "last_n", "slow", "sync", "tag", "tally", "transport", "worker")

    def __init__(self, worker: Worker, tag: str, group: str, slow: bool) -> None:
        self.worker = worker
        self.tag = tag
        self.group = group
        self.slow = slow
        self.tally = worker.tally(tag)
        self.transport: WSTransport | None = None
        self.sync: asyncio.Future[None] | None = None
        self.got = 0
        self.last_n = 0  # the newest per-account event number seen (open-loop stamps)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    async def subscribe_gateway(self) -> None:
        """RFC 8887 §4.3.5.2: enable push, then a Core/echo whose reply proves the enable was taken."""
        assert self.transport is not None and self.worker.loop is not None
        self.sync = self.worker.loop.create_future()
        self.transport.send(WSMsgType.TEXT, ENABLE)
        self.transport.send(WSMsgType.TEXT, SYNC)
        try:
            await asyncio.wait_for(self.sync, 60)
        finally:
            self.sync = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = time.monotonic_ns()
        if frame.msg_type != WSMsgType.TEXT:
            return
        payload = frame.get_payload_as_bytes()
        if not record(self, payload, now):
            if self.sync is not None and SYNC_ID in payload and not self.sync.done():
                self.sync.set_result(None)
            else:
                self.tally.other += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        pass


def record(client: Client | SseClient, payload: bytes, now: int) -> bool:
    """Account one pushed StateChange (its latency, and the group's completion of its seq); False when it carries
    no stamp.

    The state is "t<publish ns>-<seq>", and in open-loop steps "t<publish ns>-<seq>-<n>-<previous ns>": n numbers
    the events sent to this account, <previous ns> is when event n - 1 was published. A push is state, not a
    message log: a server may merge several events for one account into one StateChange with the newest state
    (the gateway does within one bus batch, RFC 8887 §4.3.5). The events it carries implicitly (n jumped by more
    than one) count as delivered, with latency measured from <previous ns> (exact for one merged event; for more,
    from the newest of them, an underestimate bounded by the batch's span) and are tallied as `merged`. The
    publisher spreads events over several connections, so one may overtake another: an older state arriving after
    a newer one was credited with it and is not counted again."""
    i = payload.find(_STAMP, payload.find(_CHANGED))
    if i < 0:
        return False
    # Account ids are hex and type names capitalised, so the first ':"t' after "changed" is a state.
    j = payload.find(b"-", i)
    k = payload.find(b'"', j)
    sent = int(payload[i + 3:j])
    rest = payload[j + 1:k].split(b"-")
    t = client.tally
    t.bytes += len(payload)
    client.got += 1
    if len(rest) != 3:
        t.lat.append(now - sent)
        t.count += 1
    else:
        n = int(rest[1])
        if n > client.last_n:
            t.lat.append(now - sent)
            t.count += 1
            skipped = n - client.last_n - 1
            if skipped:
                t.merged += skipped
                t.count += skipped
                lat = now - int(rest[2])
                for _ in range(skipped):
                    t.lat.append(lat)
            client.last_n = n
        # else: an older state after a newer one (the publisher's connections raced): the newer one has already
        # told the client everything, and this event was credited then.
    w = client.worker
    if w.notify:
        seq = int(rest[0])
        entry = w.per_seq.get(seq)
        if entry is None:
            entry = w.per_seq[seq] = [0, 0]
        entry[0] += 1
        entry[1] = now
        if entry[0] == w.group_size.get(client.group, 0):
            w.send({"note": "done", "seq": seq, "last": now, "n": entry[0], "worker": w.index})
            del w.per_seq[seq]
    return True


class _SseTransport:
    """What the worker asks of a client's transport (as of picows' WSTransport), for an event stream."""

    __slots__ = ("closed", "response", "underlying_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.underlying_transport = transport
        self.response = _Response()
        self.closed = asyncio.get_running_loop().create_future()

    @property
    def is_disconnected(self) -> bool:
        return self.closed.done()

    def disconnect(self, graceful: bool = True) -> None:
        if graceful:
            self.underlying_transport.close()
        else:
            self.underlying_transport.abort()

    async def wait_disconnected(self) -> None:
        await asyncio.shield(self.closed)


class _Response:
    headers: dict[str, str] = {}  # nothing negotiated on an event stream


class SseClient(asyncio.Protocol):
    """One RFC 8620 §7.3 event stream: `event: state` events whose `data:` line is the StateChange, accounted as the
    WebSocket client accounts its frames (the same stamp in the state). No event-source library: a plain protocol
    keeps the receive path as cheap as the WebSocket client's, for a fair comparison."""

    __slots__ = ("_buf", "_head", "got", "group", "head_done", "last_n", "slow", "tag", "tally", "transport",
                 "worker")

    def __init__(self, worker: Worker, tag: str, group: str, slow: bool, request: bytes) -> None:
        self.worker = worker
        self.tag = tag
        self.group = group
        self.slow = slow
        self.tally = worker.tally(tag)
        self.transport: _SseTransport | None = None
        self.got = 0
        self.last_n = 0  # the newest per-account event number seen (open-loop stamps)
        self._head = request
        self._buf = b""
        self.head_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport by class
        self.transport = _SseTransport(transport)
        transport.write(self._head)

    async def subscribe_gateway(self) -> None:
        await asyncio.wait_for(self.head_done, 60)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        buf = self._buf + data if self._buf else data
        if not self.head_done.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 200 "):
                self.head_done.set_exception(RuntimeError(buf[:end].split(b"\r\n", 1)[0].decode()))
                return
            self.head_done.set_result(None)
            buf = buf[end + 4:]
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            event = buf[start:end]
            start = end + 2
            if not event.startswith(b"event: state\n"):
                continue  # a ping
            data_at = event.find(b"data: ")
            line_end = event.find(b"\n", data_at)
            if not record(self, event[data_at + 6:line_end], now):
                self.tally.other += 1
        self._buf = buf[start:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head_done.done():
            self.head_done.set_exception(ConnectionError("closed before the answer"))
        if self.transport is not None and not self.transport.closed.done():
            self.transport.closed.set_result(None)


def worker_main(pipe: Connection, index: int, source_ip: str, cpus: list[int] | None) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    uvloop.run(_serve(pipe, index, source_ip))


async def _serve(pipe: Connection, index: int, source_ip: str) -> None:
    worker = Worker(pipe, index, source_ip)
    loop = asyncio.get_running_loop()
    worker.loop = loop
    worker.stopped = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def readable() -> None:
        try:
            # uvloop makes a watched fd non-blocking; a pickled message larger than the pipe buffer must be
            # read whole, so read it in blocking mode (poll() said data is there; the rest follows at once).
            os.set_blocking(pipe.fileno(), True)
            while pipe.poll():
                cmd = pipe.recv()
                task = loop.create_task(worker.handle(cmd))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (EOFError, OSError) as exc:
            print(f"worker {index}: pipe: {exc!r}", file=sys.stderr, flush=True)
            assert worker.stopped is not None
            worker.stopped.set()  # the harness is gone: end, and with us every client socket

    loop.add_reader(pipe.fileno(), readable)
    worker.send({"note": "ready", "worker": index})
    await worker.stopped.wait()
    loop.remove_reader(pipe.fileno())
    await worker.close(None)
