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
import os
import select
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
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
    """Open `count` WebSockets to the server, say "ready", then read and discard until stdin closes."""
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
    stdin = sys.stdin.fileno()
    ep.register(stdin, select.EPOLLIN)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for fd, _ in ep.poll():
            if fd == stdin:
                return  # the benchmark is done (stdin closed)
            s = socks[fd]
            try:
                while s.recv(1 << 16):
                    pass
                ep.unregister(fd)  # b"": the server closed it
                s.close()
            except BlockingIOError:
                pass


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
        self.client = subprocess.Popen([sys.executable, __file__, "drain", str(port), str(count)],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.loop.run_until_complete(asyncio.wait_for(self._all_in, 300))
        assert self.client.stdout is not None
        assert self.client.stdout.readline() == b"ready\n"
        self.fds = array.array("i", [t.underlying_transport.get_extra_info("socket").fileno()
                                     for t in self.transports])

    def connected(self, transport: WSTransport) -> None:
        self.transports.append(transport)
        if len(self.transports) == self.count:
            self._all_in.set_result(None)

    def gone(self) -> None:
        self.disconnected += 1
        if self.disconnected == len(self.transports) and not self._all_out.done():
            self._all_out.set_result(None)

    def settle(self) -> None:
        # Between rounds: one loop turn, so anything a partial write left to uvloop gets written.
        self.loop.run_until_complete(asyncio.sleep(0))

    def buffered(self) -> int:
        return sum(t.underlying_transport.get_write_buffer_size() for t in self.transports)

    def close(self) -> None:
        for t in self.transports:
            t.disconnect(False)
        self.loop.run_until_complete(asyncio.wait_for(self._all_out, 60))
        assert self.client.stdin is not None
        self.client.stdin.close()
        self.client.wait(60)
        self.server.close()
        self.loop.run_until_complete(self.server.wait_closed())
        self.loop.close()


class _Listener(WSListener):  # type: ignore[misc]
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


@pytest.fixture(scope="module", params=SIZES, ids=[f"{n}" for n in SIZES])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(request.param)
    yield r
    r.close()


RESULTS: dict[tuple[int, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    print("\n\nBroadcast, per recipient (median of rounds / recipients):")
    for n in SIZES:
        got = {what: RESULTS.get((n, what)) for what in ("floor", "native", "python")}
        if None in got.values():
            continue
        floor, nat, py = got["floor"], got["native"], got["python"]
        assert floor is not None and nat is not None and py is not None
        print(f"  {n:>6} recipients: floor {floor:7.0f} ns  native {nat:7.0f} ns  python {py:7.0f} ns"
              f"  | native/floor {nat / floor:.2f}x  python/native {py / nat:.2f}x"
              f"  | overhead above floor: native {nat - floor:5.0f} ns, python {py - floor:5.0f} ns"
              f" ({(py - floor) / max(nat - floor, 1.0):.1f}x)")


@pytest.mark.parametrize("what", ["floor", "native", "python"])
def test_broadcast(benchmark: Any, modules: tuple[ModuleType, ModuleType], rig: Rig, what: str) -> None:
    compiled, twin = modules
    n = rig.count
    if what == "floor":
        frame = wire_frame(PAYLOAD)
        fds = rig.fds

        def one_round() -> int:
            written: int = compiled._floor_send(fds, frame)
            return written
    else:
        module = compiled if what == "native" else twin
        targets: dict[Any, None] = {module.Target(t, False): None for t in rig.transports}
        if module is compiled:
            assert all(compiled._is_fast_path(t) for t in targets)  # the C path, not the Python fallback
        plain = bytearray(HEADROOM) + PAYLOAD
        broadcast = module.broadcast

        def one_round() -> int:
            written: int = broadcast(targets, plain, None, ACCOUNT, STATES)
            return written

    pauses = rig.pauses
    written = benchmark.pedantic(one_round, setup=rig.settle, rounds=ROUNDS[n], warmup_rounds=3)
    assert written == n
    assert rig.pauses == pauses, "the client process fell behind: some sockets were paused"
    rig.settle()
    assert rig.buffered() == 0
    benchmark.extra_info["recipients"] = n
    if benchmark.stats is not None:
        median_ns = benchmark.stats.stats.median * 1e9 / n
        benchmark.extra_info["ns_per_recipient"] = round(median_ns, 1)
        RESULTS[(n, what)] = median_ns


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "drain":
    drain_clients(int(sys.argv[2]), int(sys.argv[3]))
