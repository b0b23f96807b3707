"""Benchmark of the broadcast loop: one StateChange frame written to 1,000 and 10,000 recipients over real
loopback WebSockets (picows transports on the server side), compiled loop vs Python twin, next to the syscall
floor, a C loop that only send(2)s the same frame to the same sockets.

Not a test of correctness (tests/ does that) and never part of the normal run. The client ends live in a child
process (this file run as a script) that drains them with epoll, so that socket buffers never fill and the
limit of open files per process is respected. Reproduce and read the figures: see bench/README.md, "Broadcast".
"""

from __future__ import annotations

import array
import asyncio
import base64
import importlib
import os
import select
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import picows
import pytest
import uvloop
from picows import WSFrame, WSListener, WSTransport

from gateway import native

HEADROOM = 14
ACCOUNT = "a" * 64  # James-style accountId: hex SHA-256 of the username
STATES = {"Email": "e-1042", "Mailbox": "m-77", "EmailDelivery": "e-1042"}
# The size of a real push: one account, three types, a pushState token.
PAYLOAD = (b'{"@type":"StateChange","changed":{"' + ACCOUNT.encode()
           + b'":{"Email":"e-1042","Mailbox":"m-77","EmailDelivery":"e-1042"}},"pushState":"'
           + b"p" * 96 + b'"}')
SIZES = (1_000, 10_000)
ROUNDS = {1_000: 300, 10_000: 60}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 250  # client connections opened (and upgraded) at a time, below the listen backlog


def wire_frame(payload: bytes) -> bytes:
    """The bytes picows puts on the wire for an unmasked, final text frame (RFC 6455 §5.2)."""
    n = len(payload)
    if n < 126:
        return bytes([0x81, n]) + payload
    if n < 1 << 16:
        return bytes([0x81, 126]) + struct.pack("!H", n) + payload
    return bytes([0x81, 127]) + struct.pack("!Q", n) + payload


# --- the client process ----------------------------------------------------------------------------------

def drain_clients(port: int, count: int) -> None:
    """Open `count` WebSockets to the server, say "ready", then for each line on stdin read and discard all
that arrived and answer "ok"; return when stdin closes."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    for start in range(0, count, BATCH):
        batch = []
        for _ in range(min(BATCH, count - start)):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(request)
            batch.append(s)
        for s in batch:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    raise ConnectionError("server closed during the upgrade")
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(head.decode(errors="replace"))
            s.setblocking(False)
            socks[s.fileno()] = s
            ep.register(s.fileno(), select.EPOLLIN)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    # Drain on request, between rounds, not during them: a reader waiting in epoll_wait would make every send
    # of the round pay for waking it (a loopback artefact; real clients are on other hosts), and on a 2-core
    # machine its reading would compete with the writer being measured.
    for _ in sys.stdin:
        while True:
            events = ep.poll(0)
            if not events:
                break
            for fd, _ in events:
                s = socks[fd]
                try:
                    while s.recv(1 << 16):
                        pass
                    ep.unregister(fd)  # b"": the server closed it
                    s.close()
                except BlockingIOError:
                    pass
        sys.stdout.write("ok\n")
        sys.stdout.flush()


# --- the server side -------------------------------------------------------------------------------------

class Rig:
    """A picows server with `count` upgraded connections from a draining child process."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.loop = uvloop.new_event_loop()
        self.transports: list[WSTransport] = []
        self.disconnected = 0
        self.pauses = 0
        self._all_in: asyncio.Future[None] = self.loop.create_future()
        self._all_out: asyncio.Future[None] = self.loop.create_future()
        self.server = self.loop.run_until_complete(picows.ws_create_server(
            lambda _request: _Listener(self), "127.0.0.1", 0, backlog=1024, read_buffer_init_size=4096))
        port = self.server.sockets[0].getsockname()[1]
        # The child imports this file (for drain_clients), hence the package on its path.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        self.client = self.loop.run_until_complete(asyncio.create_subprocess_exec(
            sys.executable, __file__, "drain", str(port), str(count), env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE))
        self._saved_affinity = os.sched_getaffinity(0)
        cpus = sorted(self._saved_affinity)
        if len(cpus) >= 2:
            # One core each: no migrations in the measured loop, and the drainer never preempts the writer.
            os.sched_setaffinity(0, {cpus[0]})
            os.sched_setaffinity(self.client.pid, {cpus[1]})
        self.loop.run_until_complete(self._wait_ready())
        self.fds = array.array("i", [t.underlying_transport.get_extra_info("socket").fileno()
                                     for t in self.transports])

    async def _wait_ready(self) -> None:
        assert self.client.stdout is not None
        exited: asyncio.Future[Any] = asyncio.ensure_future(self.client.wait())
        waiting: set[asyncio.Future[Any]] = {self._all_in, exited}
        done, _ = await asyncio.wait(waiting, timeout=300, return_when=asyncio.FIRST_COMPLETED)
        if self._all_in not in done:
            exited.cancel()
            raise RuntimeError(f"the client process did not connect (exit status {self.client.returncode})")
        exited.cancel()
        assert await self.client.stdout.readline() == b"ready\n"

    def connected(self, transport: WSTransport) -> None:
        self.transports.append(transport)
        if len(self.transports) == self.count:
            self._all_in.set_result(None)

    def gone(self) -> None:
        self.disconnected += 1
        if self.disconnected == len(self.transports) and not self._all_out.done():
            self._all_out.set_result(None)

    def settle(self) -> None:
        """Between rounds: one loop turn (anything a partial write left to uvloop gets written), then the client
        process empties every socket."""
        self.loop.run_until_complete(self._drain())

    async def _drain(self) -> None:
        await asyncio.sleep(0)
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write(b"d\n")
        assert await self.client.stdout.readline() == b"ok\n"

    def buffered(self) -> int:
        return sum(t.underlying_transport.get_write_buffer_size() for t in self.transports)

    def close(self) -> None:
        for t in self.transports:
            t.disconnect(False)
        self.loop.run_until_complete(asyncio.wait_for(self._all_out, 60))
        assert self.client.stdin is not None
        self.client.stdin.close()
        self.loop.run_until_complete(asyncio.wait_for(self.client.wait(), 60))
        self.server.close()
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()
        os.sched_setaffinity(0, self._saved_affinity)


class _Listener(WSListener):
    def __init__(self, rig: Rig) -> None:
        self.rig = rig

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.rig.connected(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        pass

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.rig.gone()

    def pause_writing(self) -> None:
        # The client did not keep up: the figures would no longer be about broadcasting. Counted and checked.
        self.rig.pauses += 1


@pytest.fixture(scope="module")
def modules() -> tuple[ModuleType, ModuleType]:
    compiled = native.load("_broadcast", native=True)
    if not native.is_native(compiled):
        pytest.fail("gateway._broadcast is not compiled: build it first (setup.py build_ext --inplace)")
    return compiled, native.load("_broadcast", native=False)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    try:
        return importlib.import_module("gateway._bench")
    except ImportError:
        pytest.fail("gateway._bench is not compiled: build it first (setup.py build_ext --inplace)")


@pytest.fixture(scope="module", params=SIZES, ids=[f"{n}" for n in SIZES])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(request.param)
    yield r
    r.close()


MODES = ("floor", "native", "python")


def one_round(mode: str, modules: tuple[ModuleType, ModuleType], bench: ModuleType, rig: Rig) -> Callable[[], int]:
    """A callable that writes the frame once to every connection of `rig`, the way `mode` says."""
    compiled, twin = modules
    if mode == "floor":
        frame = wire_frame(PAYLOAD)
        fds = rig.fds
        return lambda: int(bench.floor_send(fds, frame))
    module = compiled if mode == "native" else twin
    targets: dict[Any, None] = {module.Target(t, False): None for t in rig.transports}
    if module is compiled:
        assert all(bench.is_fast_path(t) for t in targets)  # the C path, not the Python fallback
    plain = bytearray(HEADROOM) + PAYLOAD
    broadcast = module.broadcast
    return lambda: int(broadcast(targets, plain, None, ACCOUNT, STATES))


def check_clean(rig: Rig, pauses_before: int) -> None:
    assert rig.pauses == pauses_before, "the client process fell behind: some sockets were paused"
    rig.settle()
    assert rig.buffered() == 0, "some writes were partial and went through the transport's buffer"


SEPARATE: dict[tuple[int, str], float] = {}
SIDE_BY_SIDE: dict[tuple[int, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    print("\n\nBroadcast of one frame, ns per recipient (median round / recipients):")
    for title, results in (("side by side (interleaved rounds)", SIDE_BY_SIDE), ("separate runs", SEPARATE)):
        print(f"  {title}:")
        for n in SIZES:
            floor, nat, py = (results.get((n, m)) for m in MODES)
            if floor is None or nat is None or py is None:
                continue
            print(f"    {n:>6} recipients: floor {floor:5.0f}  native {nat:5.0f}  python {py:5.0f}"
                  f"  | native/floor {nat / floor:.2f}x (target <= 1.2)  python/native {py / nat:.2f}x"
                  f" (target >= 3)  | above the floor: native {nat - floor:4.0f}, python {py - floor:4.0f}"
                  f" ({(py - floor) / max(nat - floor, 1.0):.1f}x)")


@pytest.mark.parametrize("mode", MODES)
def test_broadcast(benchmark: Any, modules: tuple[ModuleType, ModuleType], bench: ModuleType, rig: Rig,
                   mode: str) -> None:
    """One mode at a time: pytest-benchmark's own statistics of one broadcast."""
    run = one_round(mode, modules, bench, rig)
    pauses = rig.pauses
    written = benchmark.pedantic(run, setup=rig.settle, rounds=ROUNDS[rig.count], warmup_rounds=3)
    assert written == rig.count
    check_clean(rig, pauses)
    benchmark.extra_info["recipients"] = rig.count
    benchmark.extra_info["transport"] = type(rig.transports[0].underlying_transport).__qualname__
    if benchmark.stats is not None:
        per_recipient = benchmark.stats.stats.median * 1e9 / rig.count
        benchmark.extra_info["ns_per_recipient"] = round(per_recipient, 1)
        SEPARATE[(rig.count, mode)] = per_recipient


def test_side_by_side(benchmark: Any, modules: tuple[ModuleType, ModuleType], bench: ModuleType, rig: Rig) -> None:
    """The three modes in rotating order within every round, so that drift of the machine (other tenants,
    frequency, page cache) hits all three alike; these are the figures to compare. pytest-benchmark's own time
    of this test covers a whole rotation including the drains between modes and is not itself a figure."""
    runs = {mode: one_round(mode, modules, bench, rig) for mode in MODES}
    times: dict[str, list[int]] = {mode: [] for mode in MODES}
    rotation = [0]
    pauses = rig.pauses

    def rotate() -> None:
        k = rotation[0]
        rotation[0] += 1
        for mode in MODES[k % 3:] + MODES[:k % 3]:
            rig.settle()
            started = time.perf_counter_ns()
            written = runs[mode]()
            times[mode].append(time.perf_counter_ns() - started)
            assert written == rig.count

    warmup = 2
    benchmark.pedantic(rotate, rounds=ROUNDS[rig.count], warmup_rounds=warmup)
    check_clean(rig, pauses)
    for mode in MODES:
        per_recipient = statistics.median(times[mode][warmup:]) / rig.count
        SIDE_BY_SIDE[(rig.count, mode)] = per_recipient
        benchmark.extra_info[f"{mode}_ns_per_recipient"] = round(per_recipient, 1)
    benchmark.extra_info["recipients"] = rig.count


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "drain":
    drain_clients(int(sys.argv[2]), int(sys.argv[3]))
