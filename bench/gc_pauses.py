"""The garbage collector's pauses while a gateway takes on many sessions, with and without freezing.

Rounds alternate `GATEWAY_GC_FREEZE_AFTER=0` (CPython's collector as it is) and the default (1000): a fresh
`python -m gateway` (pinned to CPU 0) takes `--sessions` push-enabled WebSockets of distinct accounts from this
process (CPU 1), holds them for 10 s, then one event per account arrives over an
NDJSON stream. The gateway's own `/metrics` then gives its full collections, its collection pauses (histogram
buckets) and the frozen objects. Not a test and never part of the normal test run. Figures: bench/README.md.

    .venv/bin/python bench/gc_pauses.py --sessions 10000 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-admin-token"
KEY = base64.b64encode(os.urandom(16)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def masked_text(payload: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def session(port: int, user: str, held: list[asyncio.StreamWriter]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = base64.b64encode(f"{user}:p".encode()).decode()
    writer.write(f"GET /jmap/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: jmap\r\n"
                 f"Authorization: Basic {auth}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head[:100]
    writer.write(masked_text(b'{"@type":"WebSocketPushEnable","dataTypes":null}'))
    held.append(writer)


async def scrape(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    page = (await reader.read()).decode()
    writer.close()
    return page


def figure(page: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", page, re.M)
    return float(m.group(1)) if m else float("nan")


async def one_round(sessions: int, freeze_after: str) -> dict[str, float]:
    port = free_port()
    users = [f"u{i:05d}" for i in range(sessions)]
    env = dict(os.environ, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(port),
               GATEWAY_USERS=",".join(f"{u}:p" for u in users), GATEWAY_ADMIN_TOKEN=TOKEN,
               GATEWAY_PING_INTERVAL="0", GATEWAY_SMTP_PORT="0", GATEWAY_DB=":memory:", GATEWAY_LOG_LEVEL="WARNING",
               GATEWAY_REQUIRE_NATIVE="1", GATEWAY_MAX_CONNECTIONS_PER_USER="1000000",
               GATEWAY_GC_FREEZE_AFTER=freeze_after)
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "gateway"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    held: list[asyncio.StreamWriter] = []
    try:
        assert proc.stdout is not None
        while "listening on" not in proc.stdout.readline():
            pass
        for start in range(0, sessions, 200):
            await asyncio.gather(*(session(port, u, held) for u in users[start:start + 200]))
        await asyncio.sleep(10)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"".join(b'{"username":"%s","typeStates":{"Email":"s1"}}\n' % u.encode() for u in users)
        writer.write(b"POST /admin/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
                     b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (TOKEN.encode(), len(body), body))
        await asyncio.sleep(3)
        writer.close()
        page = await scrape(port)
        buckets = re.findall(r'^gateway_gc_pause_seconds_bucket\{le="([^"]+)"\} (\S+)$', page, re.M)
        cumulative = {le: float(n) for le, n in buckets}
        over_10ms = figure(page, "gateway_gc_pause_seconds_count") - cumulative.get("0.01", float("nan"))
        return {"full": figure(page, "gateway_gc_full_collections_total"),
                "pauses": figure(page, "gateway_gc_pause_seconds_count"),
                "pause_s": figure(page, "gateway_gc_pause_seconds_sum"),
                "over_10ms": float(over_10ms), "frozen": figure(page, "gateway_gc_frozen_objects"),
                "rss_mib": rss_mib(proc.pid)}
    finally:
        for w in held:
            w.close()
        proc.terminate()
        proc.wait()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def main(args: argparse.Namespace) -> None:
    for r in range(args.rounds):
        for freeze_after in (("0", "1000") if r % 2 == 0 else ("1000", "0")):
            got = await one_round(args.sessions, freeze_after)
            print(f"round {r + 1}, GATEWAY_GC_FREEZE_AFTER={freeze_after}: {got['full']:.0f} full collections, "
                  f"{got['pauses']:.0f} collections pausing {1e3 * got['pause_s']:.0f} ms in all, "
                  f"{got['over_10ms']:.0f} over 10 ms; {got['frozen']:.0f} objects frozen; RSS {got['rss_mib']:.0f} "
                  "MiB", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=2)
    uvloop.run(main(p.parse_args()))
