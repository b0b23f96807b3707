"""What one event costs the gateway at k = 1 (one session per event), and how much of it is aiohttp's.

Two measurements, each in rotating rounds, all servers pinned to CPU 0 and this client to CPU 1:

- `gateway`: `python -m gateway` (memory bus, one push-enabled WebSocket session) is fed James StateChangeEvents on
  one `POST /admin/events` NDJSON stream, one line per chunk, each after the previous one's push arrived and a
  2 ms pause (the fan-out harness's k = 1 shape). Reported: user and system CPU of the gateway per event (from
  /proc), and with `--strace` the system calls per event (`strace -c -f`, a separate pass: strace slows the
  process down, so its pass gives counts, not times).
- `aiohttp` against `raw`: the same stream of lines into a minimal aiohttp handler that only counts lines
  (`request.content.iter_any()`, as the gateway reads it) and into a plain asyncio.Protocol that parses the chunked
  coding itself. Their difference is what aiohttp's per-chunk path (parser callbacks, StreamReader, the handler
  task's wake-up) costs per event, i.e. what the gateway's own ingest protocol (gateway/transport/ingest.py, which
  now reads these streams) saves.

Not a test and never part of the normal test run. Figures: bench/README.md, "Per event at k = 1".

    .venv/bin/python bench/event_cost.py --events 3000 --rounds 3 [--strace]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
import websockets

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token"
HEAD = (b"POST /admin/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-ndjson\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_of(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def chunk(line: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(line), line)


def event(i: int) -> bytes:
    return b'{"username":"alice","typeStates":{"Email":"s%d"}}\n' % i


async def gateway_round(events: int, strace: str | None) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(port), GATEWAY_USERS="alice:p",
               GATEWAY_ADMIN_TOKEN=TOKEN, GATEWAY_PING_INTERVAL="0", GATEWAY_SMTP_PORT="0", GATEWAY_DB=":memory:",
               GATEWAY_LOG_LEVEL="WARNING", GATEWAY_REQUIRE_NATIVE="1")
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "gateway"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        while "listening on" not in proc.stdout.readline():
            pass
        auth = "Basic " + base64.b64encode(b"alice:p").decode()
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/jmap/ws", subprotocols=["jmap"],  # type: ignore[list-item]
                                      additional_headers={"Authorization": auth}, compression=None)
        await ws.send('{"@type":"WebSocketPushEnable","dataTypes":null}')
        await asyncio.sleep(0.5)  # the enable's first read of the states is done
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD)

        async def one(i: int) -> None:
            writer.write(chunk(event(i)))
            marker = f'"s{i}"'
            while marker not in str(await asyncio.wait_for(ws.recv(), 10)):
                pass

        for i in range(200):  # warm-up
            await one(i)
        tracer = None
        if strace:
            tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(proc.pid), "-o", strace])
            await asyncio.sleep(1.0)
        (u0, s0), t0 = cpu_of(proc.pid), time.monotonic()
        for i in range(200, 200 + events):
            await one(i)
            await asyncio.sleep(0.002)
        (u1, s1), t1 = cpu_of(proc.pid), time.monotonic()
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            tracer.wait()
        await ws.close()
        writer.close()
        return {"user_us": 1e6 * (u1 - u0) / events, "sys_us": 1e6 * (s1 - s0) / events,
                "util": (u1 - u0 + s1 - s0) / (t1 - t0)}
    finally:
        proc.terminate()
        proc.wait()


# --- aiohttp against a raw protocol: the servers run in child processes (this file with --serve) --------------

async def serve_aiohttp(port: int) -> None:
    from aiohttp import web

    lines = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal lines
        async for data in request.content.iter_any():
            lines += data.count(b"\n")
        return web.Response(text=str(lines))

    app = web.Application()
    app.router.add_post("/admin/events", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


class RawStream(asyncio.Protocol):
    """The chunked coding parsed by hand: enough for a well-formed benchmark stream, nothing more."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.in_head = True
        self.lines = 0

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.in_head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            del buf[:end + 4]
            self.in_head = False
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            size = int(buf[:eol], 16)
            if len(buf) < eol + 4 + size:
                return
            self.lines += buf.count(b"\n", eol + 2, eol + 2 + size)
            del buf[:eol + 4 + size]


async def serve_raw(port: int) -> None:
    await asyncio.get_running_loop().create_server(RawStream, "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def layer_round(kind: str, events: int) -> float:
    port = free_port()
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, __file__, "--serve", kind, "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD)
        for i in range(200):
            writer.write(chunk(event(i)))
            await asyncio.sleep(0.002)
        u0, s0 = cpu_of(proc.pid)
        for i in range(events):
            writer.write(chunk(event(i)))
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.05)
        u1, s1 = cpu_of(proc.pid)
        writer.close()
        return 1e6 * (u1 - u0 + s1 - s0) / events
    finally:
        proc.kill()
        proc.wait()


async def main(args: argparse.Namespace) -> None:
    gw: list[dict[str, float]] = []
    layers: dict[str, list[float]] = {"aiohttp": [], "raw": []}
    for r in range(args.rounds):
        gw.append(await gateway_round(args.events, None))
        order = ["aiohttp", "raw"] if r % 2 == 0 else ["raw", "aiohttp"]
        for kind in order:
            layers[kind].append(await layer_round(kind, args.events))
        print(f"round {r + 1}: gateway user {gw[-1]['user_us']:.1f} sys {gw[-1]['sys_us']:.1f} µs/event; "
              f"aiohttp {layers['aiohttp'][-1]:.1f}, raw {layers['raw'][-1]:.1f} µs/chunk", flush=True)
    med = statistics.median
    print(f"gateway, k = 1: {med(g['user_us'] + g['sys_us'] for g in gw):.1f} µs of CPU per event (user "
          f"{med(g['user_us'] for g in gw):.1f}, system {med(g['sys_us'] for g in gw):.1f}), median of {args.rounds}")
    diff = [a - b for a, b in zip(layers["aiohttp"], layers["raw"], strict=True)]
    print(f"a line into aiohttp's streaming handler: {med(layers['aiohttp']):.1f} µs; into a raw protocol: "
          f"{med(layers['raw']):.1f} µs; aiohttp's share: {med(diff):.1f} µs per event (paired median)")
    if args.strace:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "strace.txt")
            await gateway_round(args.events, out)
            print(f"system calls of the gateway over {args.events} events (strace -c -f):")
            print(Path(out).read_text())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--strace", action="store_true", help="also count the gateway's system calls per event")
    p.add_argument("--serve", choices=["aiohttp", "raw"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        uvloop.run(serve_aiohttp(a.port) if a.serve == "aiohttp" else serve_raw(a.port))
    else:
        uvloop.run(main(a))
