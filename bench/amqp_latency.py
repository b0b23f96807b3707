"""Push latency through the RabbitMQ bus against the in-process memory bus, side by side in one run: the time from
publishing an event to a client having read its StateChange, p50/p99/p99.9, at given event rates with N sessions.

Three paths, the same sessions and clients:
- memory/admin: `POST /admin/events` to a gateway on GATEWAY_BUS=memory (publish = call the hub);
- amqp/admin:   `POST /admin/events` to a gateway on GATEWAY_BUS=amqp (publish with confirms to the broker, which
  routes it back to the node's queue, consumed and pushed). amqp/admin minus memory/admin is the broker hop;
- amqp/james:   events published straight to the exchange as Apache James does (one message per event,
  `eventBusId` header, text/plain, persistent), consumed and pushed by the amqp gateway.

Not a test and never part of the normal test run (plain script; `make bench` only collects `test_*.py`). The
gateway runs alone in its own process (`python -m gateway`, pinned to CPU 0 when there are two or more); the
sessions live in several client processes (picows clients, CPU 1), each session a different user (JWT), so an
event is one push; the publisher is a process of its own (CPU 1). Every event carries its publish time in its
state (`t<CLOCK_MONOTONIC ns>-<seq>`; one clock for every process of the machine); clients record receipt minus
publish, the parent merges the samples into HdrHistograms. Per rate it also reports the CPU time the gateway and
the broker (RabbitMQ's Erlang VM, when it runs here) used per event published in the measured window. Loops are
bounded, everything listens on loopback, and everything started is stopped.
Figures and how to read them: bench/README.md, "RabbitMQ bus".

    .venv/bin/python bench/amqp_latency.py --sessions 10000 --rates 1000,10000 --seconds 10
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "bench-jwt-secret-that-is-long-enough"
ADMIN = "bench-admin-token"
EVENT_TYPE = "org.apache.james.jmap.change.StateChangeEvent"
ENABLE = b'{"@type":"WebSocketPushEnable","dataTypes":null}'
SYNC = (b'{"@type":"Request","id":"sync","using":["urn:ietf:params:jmap:core"],'
        b'"methodCalls":[["Core/echo",{},"c0"]]}')
STAMP = b'"Email":"t'
CONNECT_CONCURRENCY = 200
TICK = 0.001  # the publisher's pacing interval (s)
SUSTAINED_P99_US = 100_000  # above this the gateway is queueing, not keeping up


def username(i: int) -> str:
    return f"bench{i:05d}@example.com"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children: none here), from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """The RabbitMQ Erlang VM, to report its CPU next to the gateway's (None if not on this machine)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as fh:
                # The server's VM boots the `rabbit` application; rabbitmqctl runs a beam.smp of its own.
                argv = fh.read().split(b"\0")
                if argv[0].endswith(b"beam.smp") and b"rabbit" in argv and b"boot" in argv:
                    return int(entry)
    return None


# --- the client processes ------------------------------------------------------------------------------

def client_main(pipe: Connection, port: int, first: int, count: int, cpu: int | None) -> None:
    """Hold `count` sessions (users first..first+count-1), record latencies, obey the parent's commands."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    try:
        uvloop.run(_client(pipe, port, first, count))
    except Exception as exc:  # tell the parent instead of leaving it waiting
        pipe.send(("error", repr(exc)))


async def _client(pipe: Connection, port: int, first: int, count: int) -> None:
    import jwt
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

    stamps = array.array("q")  # publish time of every push received, and its receipt time
    receipts = array.array("q")

    class Receiver(WSListener):
        def __init__(self) -> None:
            self.synced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.transport: WSTransport | None = None

        def on_ws_connected(self, transport: WSTransport) -> None:
            self.transport = transport

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            now = time.monotonic_ns()
            if frame.msg_type != WSMsgType.TEXT:
                return
            data = frame.get_payload_as_bytes()
            i = data.find(STAMP)
            if i >= 0:
                j = data.index(b"-", i)
                stamps.append(int(data[i + len(STAMP):j]))
                receipts.append(now)
            elif not self.synced.done() and b'"requestId":"sync"' in data:
                self.synced.set_result(None)

    url = f"ws://127.0.0.1:{port}/jmap/ws"
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    clients: list[Receiver] = []

    async def one(i: int) -> None:
        token = jwt.encode({"sub": username(i)}, SECRET, algorithm="HS256")
        headers = {"Authorization": f"Bearer {token}", "Sec-WebSocket-Protocol": "jmap"}
        async with gate:
            _, client = await ws_connect(Receiver, url, extra_headers=headers, read_buffer_init_size=2048,
                                         websocket_handshake_timeout=60, enable_auto_ping=False)
            assert isinstance(client, Receiver) and client.transport is not None
            client.transport.send(WSMsgType.TEXT, ENABLE)
            client.transport.send(WSMsgType.TEXT, SYNC)
            await asyncio.wait_for(client.synced, 60)  # the enable is taken once the echo is answered
            clients.append(client)

    await asyncio.gather(*(one(i) for i in range(first, first + count)))
    pipe.send(("ready", len(clients)))
    loop = asyncio.get_running_loop()
    while True:
        command, *args = await loop.run_in_executor(None, pipe.recv)
        if command == "reset":
            del stamps[:]
            del receipts[:]
            pipe.send(("ok",))
        elif command == "count":
            since, until = args
            pipe.send(("count", sum(1 for s in stamps if since <= s < until)))
        elif command == "wait":
            target, timeout = args
            deadline = time.monotonic() + timeout
            while len(stamps) < target and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            pipe.send(("waited", len(stamps), max(receipts) if receipts else 0))
        elif command == "collect":
            since, until = args
            lat = array.array("q", (r - s for s, r in zip(stamps, receipts, strict=True) if since <= s < until))
            pipe.send(("samples", lat.tobytes()))
        elif command == "close":
            for c in clients:
                if c.transport is not None:
                    c.transport.disconnect()
            pipe.send(("closed",))
            return


# --- publishers (a process of their own) ------------------------------------------------------------------

def event_json(i: int, stamp: int, seq: int) -> bytes:
    """James's StateChangeEvent for user i, its Email state stamped with the publish time."""
    return (b'{"type":"%s","eventId":"e%d","username":"%s","typeStates":{"Email":"t%d-%d"}}'
            % (EVENT_TYPE.encode(), seq, username(i).encode(), stamp, seq))


class AdminPublisher:
    """POST /admin/events over keep-alive connections; the events due in one tick go as one array. A connection
    carries one request at a time through the server (HTTP/1.1), and on the amqp bus a POST lasts a broker round
    trip (publisher confirms): enough connections keep that from limiting the rate."""

    def __init__(self, port: int, connections: int = 256) -> None:
        self.port = port
        self.n = connections
        self.writers: list[asyncio.StreamWriter] = []
        self.readers: list[asyncio.Task[None]] = []
        self.answered = 0
        self.failed = 0
        self._next = 0

    async def open(self) -> None:
        for _ in range(self.n):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writers.append(writer)
            self.readers.append(asyncio.create_task(self._read(reader)))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            self.answered += data.count(b"HTTP/1.1 ")
            self.failed += data.count(b"HTTP/1.1 ") - data.count(b"HTTP/1.1 202")

    def send(self, events: list[bytes]) -> None:
        body = b"[" + b",".join(events) + b"]"
        head = (f"POST /admin/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        writer = self.writers[self._next % self.n]
        self._next += 1
        writer.write(head + body)

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        for t in self.readers:
            t.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


class JamesPublisher:
    """One AMQP message per event, exactly as James writes it, straight to the exchange (no confirms), framed by
    the gateway's own AMQP codec and written once per tick: the publisher shares a core with the clients, and
    its own cost must not be what limits the rate."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url = url
        self.exchange = exchange
        self.conn: Any = None
        self.frame_max = 4096

    async def open(self) -> None:
        from pamqp import commands

        from gateway.bus import amqp_frames
        from gateway.bus.amqp_connection import AmqpConnection

        self.wire = amqp_frames
        self.props = amqp_frames.properties("text/plain", 2, {"eventBusId": "bench-james"})
        self.conn = await AmqpConnection.connect(self.url, heartbeat=0, connection_name="bench-james",
                                                 on_deliveries=lambda _c, _b: None, on_lost=lambda _e: None)
        await self.conn.open_channel(1)
        await self.conn.rpc(1, commands.Exchange.Declare(exchange=self.exchange, exchange_type="direct",
                                                         durable=True))
        await self.conn.open_channel(2, confirms=True)  # for bursts: confirmed = in the node's queue
        self.frame_max = self.conn.frame_max

    def send(self, events: list[bytes], users: list[int]) -> None:
        exchange = self.exchange.encode()
        self.conn.write(b"".join(
            self.wire.publish(1, exchange, b"AccountIdRegistrationKey:" + username(i).encode(), self.props, body,
                              self.frame_max)
            for i, body in zip(users, events, strict=True)))

    async def burst(self, sessions: int, seq: int, count: int) -> None:
        """Publish `count` events round robin over the users as fast as the broker confirms them."""
        exchange = self.exchange.encode()
        for first in range(seq, seq + count, 1000):
            stamp = time.monotonic_ns()
            messages = [
                self.wire.publish(2, exchange, b"AccountIdRegistrationKey:" + username(s % sessions).encode(),
                                  self.props, event_json(s % sessions, stamp, s), self.frame_max)
                for s in range(first, min(seq + count, first + 1000))]
            await asyncio.gather(*self.conn.publish(2, messages))

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await self.conn.close()


def publisher_main(pipe: Connection, kind: str, port: int, url: str, exchange: str, cpu: int | None) -> None:
    """The publisher process: opens its publisher, then paces events at the rates the parent asks for."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    sys.path.insert(0, ROOT)
    import uvloop

    try:
        uvloop.run(_publisher(pipe, kind, port, url, exchange))
    except Exception as exc:  # tell the parent instead of leaving it waiting
        pipe.send(("error", repr(exc)))


async def _publisher(pipe: Connection, kind: str, port: int, url: str, exchange: str) -> None:
    publisher: AdminPublisher | JamesPublisher = AdminPublisher(port) if kind == "admin" else JamesPublisher(
        url, exchange)
    await publisher.open()
    pipe.send(("ready",))
    loop = asyncio.get_running_loop()
    while True:
        command, *args = await loop.run_in_executor(None, pipe.recv)
        if command == "close":
            await publisher.close()
            pipe.send(("closed",))
            return
        if command == "burst":
            assert isinstance(publisher, JamesPublisher)
            await publisher.burst(*args)
            pipe.send(("burst",))
            continue
        start, window, end, rate, sessions, seq = args
        sent = in_window = 0
        while (now := time.monotonic_ns()) < start:
            await asyncio.sleep((start - now) / 1e9)
        while True:
            now = time.monotonic_ns()
            if now >= end:
                break
            due = int((now - start) * rate / 1e9) - sent
            if due > 0:
                stamp = time.monotonic_ns()
                seqs = range(seq, seq + due)
                events = [event_json(s % sessions, stamp, s) for s in seqs]
                if isinstance(publisher, JamesPublisher):
                    publisher.send(events, [s % sessions for s in seqs])
                else:
                    publisher.send(events)
                seq += due
                sent += due
                if stamp >= window:
                    in_window += due
            await asyncio.sleep(TICK)
        pipe.send(("ran", sent, in_window, seq))


class Publisher:
    """The parent's handle on the publisher process."""

    def __init__(self, kind: str, port: int, url: str, exchange: str, cpu: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=publisher_main, args=(theirs, kind, port, url, exchange, cpu), daemon=True)
        self.proc.start()
        self._answer("ready", 60)

    def _answer(self, what: str, timeout: float) -> list[Any]:
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"the publisher did not answer ({what})")
        answer: list[Any] = self.pipe.recv()
        if answer[0] == "error":
            raise RuntimeError(f"publisher failed: {answer[1]}")
        return answer

    def start(self, start: int, window: int, end: int, rate: int, sessions: int, seq: int) -> None:
        self.pipe.send(("run", start, window, end, rate, sessions, seq))

    def burst(self, sessions: int, seq: int, count: int, timeout: float = 300) -> None:
        self.pipe.send(("burst", sessions, seq, count))
        self._answer("burst", timeout)

    def result(self, timeout: float) -> tuple[int, int, int]:
        _, sent, in_window, seq = self._answer("ran", timeout)
        return sent, in_window, seq

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pipe.send(("close",))
            self._answer("closed", 30)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# --- the harness -----------------------------------------------------------------------------------------

@dataclass
class Result:
    path: str
    target: int
    sent: int = 0
    seconds: float = 0.0
    received: int = 0
    latencies_us: dict[str, float] = field(default_factory=dict)
    gateway_cpu: float = 0.0  # share of one core
    broker_cpu: float | None = None
    gateway_us: float = 0.0  # CPU µs per event published in the window
    broker_us: float | None = None
    drained: bool = False
    sustained: bool = False


class GatewayUnderTest:
    def __init__(self, bus: str, exchange: str, amqp_url: str, cpu: int | None, root: str = ROOT) -> None:
        self.bus = bus
        env = {**os.environ, "GATEWAY_PORT": "0", "GATEWAY_BUS": bus, "GATEWAY_AMQP_EXCHANGE": exchange,
               "GATEWAY_AMQP_URL": amqp_url, "GATEWAY_JWT_SECRET": SECRET, "GATEWAY_ADMIN_TOKEN": ADMIN,
               "GATEWAY_DB": ":memory:", "GATEWAY_SMTP_PORT": "0", "GATEWAY_LOG_LEVEL": "WARNING",
               "GATEWAY_PING_INTERVAL": "0", "GATEWAY_MAX_SIZE_REQUEST": "10000000"}
        # Its own session: a Ctrl-C reaches only this script, which then stops the gateway in order.
        # `-m` puts the working directory first on sys.path: `root` may be another tree of the gateway (e.g. an
        # older commit, with the native modules built) to compare with.
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=root, env=env, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)
        if cpu is not None:
            os.sched_setaffinity(self.proc.pid, {cpu})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "127.0.0.1:" not in line:
            self.stop()
            raise RuntimeError(f"the gateway did not start: {line!r}")
        self.port = int(line.split("127.0.0.1:")[1].split()[0].strip("/"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Clients:
    def __init__(self, port: int, sessions: int, processes: int, cpu: int | None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        share = -(-sessions // processes)
        for k in range(processes):
            first, count = k * share, min(share, sessions - k * share)
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=client_main, args=(theirs, port, first, count, cpu), daemon=True)
            proc.start()
            self.pipes.append(ours)
            self.procs.append(proc)

    def ask(self, *command: Any, timeout: float = 300.0) -> list[Any]:
        for p in self.pipes:
            p.send(command)
        answers = []
        for p in self.pipes:
            if not p.poll(timeout):
                raise TimeoutError(f"a client process did not answer {command[0]!r}")
            answer = p.recv()
            if answer[0] == "error":
                raise RuntimeError(f"client process failed: {answer[1]}")
            answers.append(answer)
        return answers

    def wait_ready(self, timeout: float = 600.0) -> int:
        total = 0
        for p in self.pipes:
            if not p.poll(timeout):
                raise TimeoutError("the clients did not connect in time")
            answer = p.recv()
            if answer[0] != "ready":
                raise RuntimeError(f"client process failed: {answer}")
            total += answer[1]
        return int(total)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("close", timeout=30)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


async def wait_bindings(exchange: str, want: int, timeout: float = 300.0) -> None:
    """Until the broker routes every session's username to the gateway's queue (rabbitmqctl)."""
    deadline = time.monotonic() + timeout
    while True:
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "-q", "list_bindings", "source_name", "--formatter", "json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        have = sum(1 for row in json.loads(out or b"[]") if row.get("source_name") == exchange)
        if have >= want:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {have} of {want} bindings after {timeout:g}s")
        await asyncio.sleep(0.5)


ALL = (0, 1 << 62)  # a stamp window covering every event


async def received(clients: Clients, window: tuple[int, int] = ALL) -> int:
    return sum(int(a[1]) for a in clients.ask("count", *window))


async def drain(clients: Clients, expected: int, timeout: float) -> bool:
    """Wait until the clients hold `expected` pushes since the last reset; False when the gateway falls
    behind (no progress for 10 s, or `timeout`)."""
    deadline = time.monotonic() + timeout
    last, progress = -1, time.monotonic()
    while time.monotonic() < deadline:
        got = await received(clients)
        if got >= expected:
            return True
        if got != last:
            last, progress = got, time.monotonic()
        elif time.monotonic() - progress > 10:
            return False
        await asyncio.sleep(0.1)
    return False


async def measure(path: str, publisher: Publisher, clients: Clients, gateway: int, sessions: int, rate: int,
                  warmup: float, seconds: float, seq0: int) -> tuple[Result, int]:
    """Publish at `rate` for warmup + seconds; the samples of events published after the warm-up count."""
    from hdrh.histogram import HdrHistogram

    clients.ask("reset")
    result = Result(path, rate)
    beam = broker_pid()
    start = time.monotonic_ns() + 200_000_000  # time for the publisher to get the command
    window = start + int(warmup * 1e9)
    end = window + int(seconds * 1e9)
    publisher.start(start, window, end, rate, sessions, seq0)
    await asyncio.sleep(max(0.0, (window - time.monotonic_ns()) / 1e9))
    cpu0 = cpu_seconds(gateway)
    b0 = cpu_seconds(beam) if beam else 0.0
    t0 = time.monotonic_ns()
    await asyncio.sleep(max(0.0, (end - time.monotonic_ns()) / 1e9))
    measured = (time.monotonic_ns() - t0) / 1e9
    gateway_cpu = cpu_seconds(gateway) - cpu0
    broker_cpu = cpu_seconds(beam) - b0 if beam else None
    sent, in_window, seq = publisher.result(timeout=60)
    result.gateway_cpu = gateway_cpu / measured
    result.broker_cpu = broker_cpu / measured if broker_cpu is not None else None
    if in_window:
        result.gateway_us = gateway_cpu / (in_window * measured / seconds) * 1e6
        result.broker_us = broker_cpu / (in_window * measured / seconds) * 1e6 if broker_cpu is not None else None
    result.sent = in_window
    result.seconds = seconds
    # Every event published (warm-up included) must arrive before the next rate starts, or the next rate would
    # measure this one's backlog.
    result.drained = await drain(clients, sent, timeout=60)
    hist = HdrHistogram(1, 60_000_000, 3)  # µs, up to a minute
    for answer in clients.ask("collect", window, end):
        for ns in array.array("q", answer[1]):
            hist.record_value(max(1, ns // 1000))
    result.received = hist.get_total_count()
    for name, pct in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)):
        result.latencies_us[name] = hist.get_value_at_percentile(pct)
    result.latencies_us["max"] = hist.get_max_value()
    # Kept up: published at the rate, everything delivered, no backlog (a growing queue shows as p99 in seconds).
    result.sustained = (result.drained and result.received == in_window and in_window >= 0.97 * rate * seconds
                        and result.latencies_us["p99"] < SUSTAINED_P99_US)
    return result, seq


@dataclass
class Drain:
    """A backlog in the node's queue, consumed at the node's own pace."""

    events: int
    seconds: float = 0.0
    delivered: int = 0
    gateway_cpu: float = 0.0  # CPU seconds
    broker_cpu: float | None = None


async def measure_drain(publisher: Publisher, clients: Clients, gateway: GatewayUnderTest, sessions: int,
                        events: int, seq: int) -> tuple[Drain, int]:
    """Stop the gateway (SIGSTOP), let James put `events` in its queue (publisher confirms), let it go
    (SIGCONT) and time it until every session has its pushes: how many events/s one node on one core takes
    when the broker is not what limits the rate. Latency is not measured (the events waited on purpose)."""
    result = Drain(events)
    clients.ask("reset")
    share = -(-sessions // len(clients.pipes))
    expected = [0] * len(clients.pipes)
    for s in range(seq, seq + events):
        expected[(s % sessions) // share] += 1
    beam = broker_pid()
    os.kill(gateway.proc.pid, signal.SIGSTOP)
    try:
        publisher.burst(sessions, seq, events)
    finally:
        cpu0 = cpu_seconds(gateway.proc.pid)
        b0 = cpu_seconds(beam) if beam else 0.0
        start = time.monotonic_ns()
        os.kill(gateway.proc.pid, signal.SIGCONT)
    for pipe, want in zip(clients.pipes, expected, strict=True):
        pipe.send(("wait", want, 120.0))
    last = 0
    for pipe in clients.pipes:
        if not pipe.poll(130):
            raise TimeoutError("a client process did not answer 'wait'")
        _, got, last_receipt = pipe.recv()
        result.delivered += got
        last = max(last, last_receipt)
    result.seconds = (last - start) / 1e9
    result.gateway_cpu = cpu_seconds(gateway.proc.pid) - cpu0
    result.broker_cpu = cpu_seconds(beam) - b0 if beam else None
    return result, seq + events


def drain_row(d: Drain) -> str:
    rate = d.delivered / d.seconds if d.seconds > 0 else 0.0
    broker = (f"{d.broker_cpu / d.seconds:.0%} ({d.broker_cpu / d.events * 1e6:,.1f} µs/event)"
              if d.broker_cpu is not None else "-")
    return (f"| {d.events:,} | {d.delivered / d.events:.2%} | {d.seconds:.2f} | {rate:,.0f} "
            f"| {d.gateway_cpu / d.seconds:.0%} | {d.gateway_cpu / d.events * 1e6:,.1f} | {broker} |")


DRAIN_HEADER = ("| backlog events | delivered | seconds | events/s | gateway CPU | gateway µs/event "
                "| broker CPU (µs/event) |\n|---|---|---|---|---|---|---|")


async def run_bus(bus: str, args: argparse.Namespace, cpus: tuple[int | None, int | None]) -> list[Result]:
    exchange = f"bench-{uuid.uuid4().hex[:12]}"
    gateway = GatewayUnderTest(bus, exchange, args.amqp_url, cpus[0], args.gateway_root)
    clients: Clients | None = None
    results: list[Result] = []
    try:
        clients = Clients(gateway.port, args.sessions, args.client_processes, cpus[1])
        t0 = time.monotonic()
        n = clients.wait_ready()
        print(f"[{bus}] {n} sessions connected and push-enabled in {time.monotonic() - t0:.1f}s", flush=True)
        if bus == "amqp":
            await wait_bindings(exchange, args.sessions)
        paths = [(f"{bus}/admin", "admin")] if "admin" in args.paths else []
        if bus == "amqp" and "james" in args.paths:
            paths.append(("amqp/james", "james"))
        seq = 0
        for path, kind in paths:
            publisher = Publisher(kind, gateway.port, args.amqp_url, exchange, cpus[1])
            try:
                for rate in args.rates:
                    result, seq = await measure(path, publisher, clients, gateway.proc.pid, args.sessions, rate,
                                                args.warmup, args.seconds, seq)
                    results.append(result)
                    print(row(result), flush=True)
                    if not result.sustained:
                        # Higher rates would only queue more; say so instead of measuring a backlog.
                        print(f"[{path}] {rate:,} ev/s not sustained; higher rates skipped", flush=True)
                        break
            finally:
                publisher.close()
        if bus == "amqp" and "james" in args.paths and args.drain:
            publisher = Publisher("james", gateway.port, args.amqp_url, exchange, cpus[1])
            try:
                for _ in range(args.drain_runs):
                    drained, seq = await measure_drain(publisher, clients, gateway, args.sessions, args.drain, seq)
                    DRAINS.append(drained)
                    print(f"[amqp/james backlog] {drain_row(drained)}", flush=True)
            finally:
                publisher.close()
    finally:
        if clients is not None:
            clients.close()
        gateway.stop()
        if bus == "amqp":
            await delete_exchange(args.amqp_url, exchange)
    return results


async def delete_exchange(url: str, name: str) -> None:
    import aio_pika

    with contextlib.suppress(Exception):
        conn = await aio_pika.connect(url)
        async with conn:
            channel = await conn.channel()
            await channel.exchange_delete(name)


DRAINS: list[Drain] = []
HEADER = ("| path | target ev/s | achieved ev/s | delivered | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs "
          "| gateway CPU | gateway µs/event | broker CPU | broker µs/event | kept up |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(r: Result) -> str:
    lat = r.latencies_us
    broker = f"{r.broker_cpu:.0%}" if r.broker_cpu is not None else "-"
    broker_us = f"{r.broker_us:,.1f}" if r.broker_us is not None else "-"
    delivered = f"{r.received / r.sent:.2%}" if r.sent else "-"
    return (f"| {r.path} | {r.target:,} | {r.sent / r.seconds:,.0f} | {delivered} | {lat['p50']:,.0f} "
            f"| {lat['p90']:,.0f} | {lat['p99']:,.0f} | {lat['p99.9']:,.0f} | {lat['max']:,.0f} "
            f"| {r.gateway_cpu:.0%} | {r.gateway_us:,.1f} | {broker} | {broker_us} "
            f"| {'yes' if r.sustained else 'no'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--rates", default="1000,10000", help="comma-separated events/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds published before measuring")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--buses", default="memory,amqp")
    parser.add_argument("--paths", default="admin,james", help="admin (POST /admin/events), james (the exchange)")
    parser.add_argument("--amqp-url", default=os.environ.get("GATEWAY_AMQP_URL",
                                                             "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--drain", type=int, default=0,
                        help="also time the node draining a backlog of this many James events (0 = no)")
    parser.add_argument("--drain-runs", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true", help="let the scheduler place every process")
    parser.add_argument("--gateway-root", default=ROOT, help="run `python -m gateway` from this tree")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    args.rates = [int(r) for r in args.rates.split(",") if r]
    args.paths = set(args.paths.split(","))
    if not 1 <= args.sessions <= 50_000:
        parser.error("--sessions must be from 1 to 50000")
    ncpu = len(os.sched_getaffinity(0))
    cpus: tuple[int | None, int | None] = (0, 1) if ncpu >= 2 and not args.no_pin else (None, None)
    if cpus[1] is not None:
        os.sched_setaffinity(0, {cpus[1]})  # the publisher shares the clients' core, not the gateway's
    with socket.create_connection(("127.0.0.1", 5672), timeout=2):
        pass  # fail early when the broker is not there
    print(f"{args.sessions} sessions, {args.client_processes} client processes, rates {args.rates} ev/s, "
          f"{args.warmup:g}s warm-up + {args.seconds:g}s measured per rate; {ncpu} CPUs", flush=True)
    import uvloop

    results: list[Result] = []
    for bus in args.buses.split(","):
        results += uvloop.run(run_bus(bus, args, cpus))
    print()
    print(HEADER)
    for r in results:
        print(row(r))
    if DRAINS:
        print()
        print(DRAIN_HEADER)
        for d in DRAINS:
            print(drain_row(d))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rates": [r.__dict__ for r in results], "drains": [d.__dict__ for d in DRAINS]}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
