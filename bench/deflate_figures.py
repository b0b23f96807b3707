"""Figures for permessage-deflate (issue 4), measured side by side in one run on real loopback sockets.

1. Bytes on the wire saved for a typical `Email/get` response (from the embedded backend) and for a StateChange.
2. Memory per idle connection, with and without compression negotiated: the gateway's RSS delta / connections.
3. Fan-out throughput with compression vs without: time to deliver E events to K sessions of one account.

Runs the gateway as a subprocess and the clients in another process; alternates plain and compressed runs and
reports the median of the paired ratios (these machines are noisy). Usage:
`.venv/bin/python bench/deflate_figures.py [--connections 2000] [--sessions 1000] [--events 200] [--pairs 5]`
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
ADMIN = "bench-admin"
USER = ("bench@example.com", "pw")
AUTH = "Basic " + base64.b64encode(f"{USER[0]}:{USER[1]}".encode()).decode()
EVENT = "org.apache.james.jmap.change.StateChangeEvent"


def start_gateway(extra: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_PORT": "0", "GATEWAY_USERS": f"{USER[0]}:{USER[1]}",
           "GATEWAY_ADMIN_TOKEN": ADMIN, "GATEWAY_SMTP_PORT": "0", "GATEWAY_DB": ":memory:",
           "GATEWAY_PING_INTERVAL": "0", "GATEWAY_MAX_CONNECTIONS_PER_USER": "100000",
           "GATEWAY_LOG_LEVEL": "WARNING", **(extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, int(line.split("127.0.0.1:")[1].split()[0].strip("/"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# --- the client process: many raw WebSocket connections ------------------------------------------------------

async def _open(port: int, deflate: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    head = (f"GET /jmap/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: jmap\r\n"
            f"Authorization: {AUTH}\r\n")
    if deflate:
        head += "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    writer.write((head + "\r\n").encode())
    response = await reader.readuntil(b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 101"), response[:80]
    assert (b"permessage-deflate" in response) == deflate
    return reader, writer


def _mask(payload: bytes) -> bytes:
    return bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload  # zero mask: payload unchanged


async def _read_frames(reader: asyncio.StreamReader, count: int) -> int:
    got = 0
    while got < count:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        await reader.readexactly(n)
        if b0 & 0x0F == 1:
            got += 1
    return got


async def _clients(port: int, n: int, deflate: bool, enable: bool, events: int, ready: object, go: object) -> None:
    conns = [await _open(port, deflate) for _ in range(n)]
    if enable:
        for _, w in conns:
            w.write(_mask(b'{"@type":"WebSocketPushEnable"}'))
            w.write(_mask(b'{"@type":"Request","id":"s","using":[],"methodCalls":[]}'))
        for r, _ in conns:
            await _read_frames(r, 1)
    ready.set()  # type: ignore[attr-defined]
    await asyncio.get_running_loop().run_in_executor(None, go.wait)  # type: ignore[attr-defined]
    if events:
        await asyncio.gather(*(_read_frames(r, events) for r, _ in conns))
    for _, w in conns:
        w.close()


def client_process(port: int, n: int, deflate: bool, enable: bool, events: int, ready: object, go: object) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    asyncio.run(_clients(port, n, deflate, enable, events, ready, go))


def run_clients(port: int, n: int, deflate: bool, enable: bool, events: int):  # type: ignore[no-untyped-def]
    ctx = get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=client_process, args=(port, n, deflate, enable, events, ready, go))
    proc.start()
    if not ready.wait(120):
        proc.kill()
        raise RuntimeError("clients did not connect")
    return proc, go


# --- the three figures --------------------------------------------------------------------------------------

def wire_bytes() -> dict[str, dict[str, int]]:
    from gateway._deflate_py import Compressor

    email_get = json.loads((ROOT / "bench" / "data" / "email_get_response.json").read_text())
    state_change = {"@type": "StateChange", "changed": {"a" * 64: {"Email": "12-3f2a", "Mailbox": "13-3f2a",
                                                                   "Thread": "11-3f2a", "EmailDelivery": "14-3f2a"}},
                    "pushState": "1" + "x" * 120}
    out = {}
    c = Compressor(6, 15)
    for name, obj in (("Email/get response", email_get), ("StateChange", state_change)):
        raw = json.dumps(obj, separators=(",", ":")).encode()
        out[name] = {"plain": len(raw), "deflate": len(c.compress(raw))}
    return out


def idle_memory(connections: int, deflate: bool) -> float:
    proc, port = start_gateway()
    try:
        time.sleep(0.5)
        before = rss_kib(proc.pid)
        clients, go = run_clients(port, connections, deflate, enable=True, events=0)
        time.sleep(1.0)
        after = rss_kib(proc.pid)
        go.set()
        clients.join(60)
        return (after - before) * 1024 / connections
    finally:
        proc.terminate()
        proc.wait(30)


def fanout_seconds(sessions: int, events: int, deflate: bool) -> float:
    import urllib.request

    proc, port = start_gateway()
    try:
        clients, go = run_clients(port, sessions, deflate, enable=True, events=events)
        body = json.dumps([{"type": EVENT, "username": USER[0],
                            "typeStates": {"Email": f"e{i}-" + "s" * 40, "Mailbox": f"m{i}-" + "t" * 40}}
                           for i in range(events)]).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/events", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {ADMIN}"})
        go.set()
        started = time.perf_counter()
        urllib.request.urlopen(request, timeout=60).read()
        clients.join(120)
        assert clients.exitcode == 0
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    print("wire bytes:", json.dumps(wire_bytes()))
    mem = {False: [], True: []}  # type: dict[bool, list[float]]
    fan = {False: [], True: []}  # type: dict[bool, list[float]]
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for deflate in order:
            mem[deflate].append(idle_memory(args.connections, deflate))
            fan[deflate].append(fanout_seconds(args.sessions, args.events, deflate))
        print(f"pair {i + 1}: idle B/conn plain {mem[False][-1]:.0f} deflate {mem[True][-1]:.0f}; "
              f"fan-out s plain {fan[False][-1]:.3f} deflate {fan[True][-1]:.3f}", flush=True)
    mem_diff = statistics.median(b - a for a, b in zip(mem[False], mem[True], strict=True))
    fan_ratio = statistics.median(b / a for a, b in zip(fan[False], fan[True], strict=True))
    deliveries = args.sessions * args.events
    print(json.dumps({
        "idle_bytes_per_connection_plain_median": statistics.median(mem[False]),
        "idle_bytes_per_connection_deflate_median": statistics.median(mem[True]),
        "deflate_minus_plain_bytes_per_connection_median_of_pairs": mem_diff,
        "fanout_deliveries_per_s_plain_median": deliveries / statistics.median(fan[False]),
        "fanout_deliveries_per_s_deflate_median": deliveries / statistics.median(fan[True]),
        "fanout_time_ratio_deflate_over_plain_median_of_pairs": fan_ratio,
    }, indent=2))


if __name__ == "__main__":
    main()
