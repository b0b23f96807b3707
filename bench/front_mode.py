"""Front-mode figures (bench/README.md, "Front mode"): what the gateway adds in front of an upstream JMAP server.

1. Request round trip, same run, requests alternating between three paths to one upstream (a `python -m gateway`
   process with the embedded backend): POSTed straight to the upstream's apiUrl; POSTed to the front's /jmap/api;
   sent as a Request over a WebSocket to the front. The front is a second `python -m gateway` process with
   GATEWAY_UPSTREAM_URL. Per path p50/p99, and the paired difference (front minus direct, same round).
2. Upgrades per second at the front, with the upstream-validated session cached (warm) and with
   GATEWAY_AUTH_CACHE_TTL=0 (every upgrade fetches the session upstream), many distinct users.

Not a test and not part of `make bench`: run `.venv/bin/python bench/front_mode.py` (see --help).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

ROOT = Path(__file__).resolve().parents[1]
CORE, MAIL = "urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Process:
    def __init__(self, proc: subprocess.Popen[bytes], base: str) -> None:
        self.proc = proc
        self.base = base
        self.port = int(base.rsplit(":", 1)[1])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_gateway(**env: str) -> Process:
    full = {**os.environ, "GATEWAY_PORT": "0", "GATEWAY_LOG_LEVEL": "WARNING", "GATEWAY_PING_INTERVAL": "0",
            "GATEWAY_MAX_CONNECTIONS_PER_USER": "1000000", "GATEWAY_SMTP_PORT": "0", "GATEWAY_DB": ":memory:",
            "GATEWAY_BUS": "memory", **env}
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    found = re.search(r"listening on (http://\S+)", line)
    if found is None:
        proc.kill()
        raise SystemExit(f"the gateway did not start: {line!r}")
    return Process(proc, found.group(1))


def seed(smtp_port: int, user: str, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as smtp:
        for i in range(count):
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "carol@example.org", user, f"message {i}"
            msg.set_content(f"Body of message {i}.\n" * 20)
            smtp.send_message(msg)


# --- round trips ---------------------------------------------------------------------------------------------

class Client(WSListener):
    """One WebSocket to the front; each message completes the future of the request in flight."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.waiting: asyncio.Future[bytes] | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT and self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(frame.get_payload_as_bytes())

    async def call(self, payload: bytes) -> bytes:
        assert self.transport is not None
        self.waiting = asyncio.get_running_loop().create_future()
        self.transport.send(WSMsgType.TEXT, payload)
        return await self.waiting


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def round_trips(upstream: Process, front: Process, account: str, auth: str, rounds: int) -> list[str]:
    requests = {
        "Core/echo": {"using": [CORE], "methodCalls": [["Core/echo", {"hello": "world"}, "c"]]},
        "mail sync (Mailbox/get + Email/query + Email/get of 20)": {"using": [CORE, MAIL], "methodCalls": [
            ["Mailbox/get", {"accountId": account, "ids": None}, "m"],
            ["Email/query", {"accountId": account, "limit": 20}, "q"],
            ["Email/get", {"accountId": account, "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                           "properties": ["subject", "from", "receivedAt", "keywords", "preview"]}, "g"]]},
    }
    headers = {"Authorization": auth, "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=1)
    lines = []
    async with aiohttp.ClientSession(connector=connector) as http:
        ws_headers = {"Authorization": auth, "Sec-WebSocket-Protocol": "jmap"}
        _, ws = await ws_connect(Client, f"ws://127.0.0.1:{front.port}/jmap/ws", extra_headers=ws_headers,
                                 enable_auto_ping=False)
        # The upstream is an all-in-one gateway: a socket to it shows the front's hop with the same client stack.
        _, ws_up = await ws_connect(Client, f"ws://127.0.0.1:{upstream.port}/jmap/ws", extra_headers=ws_headers,
                                    enable_auto_ping=False)
        assert isinstance(ws, Client) and isinstance(ws_up, Client)

        async def direct(body: bytes) -> bytes:
            async with http.post(f"{upstream.base}/jmap/api", data=body, headers=headers) as r:
                return await r.read()

        async def via_front_http(body: bytes) -> bytes:
            async with http.post(f"{front.base}/jmap/api", data=body, headers=headers) as r:
                return await r.read()

        for name, request in requests.items():
            body = json.dumps(request).encode()
            message = json.dumps({"@type": "Request", "id": "r", **request}).encode()
            paths = {"direct HTTP to the upstream": lambda b=body: direct(b),
                     "HTTP via the front": lambda b=body: via_front_http(b),
                     "WebSocket via the front": lambda m=message: ws.call(m),
                     "(WebSocket to the upstream itself)": lambda m=message: ws_up.call(m)}
            times: dict[str, list[float]] = {k: [] for k in paths}
            order = list(paths)
            warmup = max(50, rounds // 10)
            for i in range(warmup + rounds):
                # Alternate the order too, so that no path always runs right after another.
                for key in order[i % len(order):] + order[:i % len(order)]:
                    t0 = time.perf_counter_ns()
                    answer = await paths[key]()
                    dt = (time.perf_counter_ns() - t0) / 1000
                    if i == 0:
                        assert b"methodResponses" in answer, answer[:300]
                    if i >= warmup:
                        times[key].append(dt)
            base = times["direct HTTP to the upstream"]
            lines.append(f"| {name} | {len(body)} B request | | | |")
            for key, values in times.items():
                if key == "direct HTTP to the upstream":
                    lines.append(f"| | {key} | {pct(values, .5):,.0f} | {pct(values, .99):,.0f} | |")
                    continue
                added = [v - b for v, b in zip(values, base, strict=True)]
                lines.append(f"| | {key} | {pct(values, .5):,.0f} | {pct(values, .99):,.0f} | "
                             f"{pct(added, .5):+,.0f} / {pct(added, .99):+,.0f} |")
        for client in (ws, ws_up):
            assert client.transport is not None
            client.transport.disconnect()
    return lines


# --- upgrades per second -------------------------------------------------------------------------------------

async def upgrade_once(port: int, auth: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /jmap/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Protocol: jmap\r\nAuthorization: {auth}\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.decode(errors="replace"))
    writer.transport.abort()


async def upgrades_per_second(port: int, auths: list[str], total: int, concurrency: int) -> float:
    queue = iter(range(total))

    async def worker() -> None:
        for i in queue:
            await upgrade_once(port, auths[i % len(auths)])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - t0)


async def main_async(args: argparse.Namespace) -> None:
    users = [(f"user{i}@example.com", f"pw{i}") for i in range(args.users)]
    users_env = ",".join(f"{u}:{p}" for u, p in users)
    smtp_port = free_port()
    upstream = start_gateway(GATEWAY_USERS=users_env, GATEWAY_SMTP_PORT=str(smtp_port))
    session_url = f"{upstream.base}/jmap/session"
    fronts: list[Process] = []
    try:
        user, password = users[0]
        await asyncio.to_thread(seed, smtp_port, user, 20)
        front = start_gateway(GATEWAY_UPSTREAM_URL=session_url)
        fronts.append(front)
        account = hashlib.sha256(user.encode()).hexdigest()
        print("## Request round trip (µs; added = front minus direct in the same round, p50 / p99)\n")
        print("| request | path | p50 | p99 | added p50 / p99 |\n|---|---|---|---|---|")
        for line in await round_trips(upstream, front, account, basic(user, password), args.rounds):
            print(line)

        auths = [basic(u, p) for u, p in users]
        cached = start_gateway(GATEWAY_UPSTREAM_URL=session_url, GATEWAY_AUTH_CACHE_TTL="3600")
        uncached = start_gateway(GATEWAY_UPSTREAM_URL=session_url, GATEWAY_AUTH_CACHE_TTL="0")
        fronts += [cached, uncached]
        await upgrades_per_second(cached.port, auths, len(auths), args.concurrency)  # warms the cache
        await upgrades_per_second(uncached.port, auths, len(auths), args.concurrency)  # same warm-up
        print(f"\n## Upgrades per second ({args.users} users, {args.concurrency} in flight, "
              f"{args.upgrades} upgrades, best of {args.repeat})\n")
        print("| authentication | upgrades/s |\n|---|---|")
        for name, proc in (("cached (warm)", cached), ("uncached (GATEWAY_AUTH_CACHE_TTL=0)", uncached),
                           ("(all-in-one gateway, local Basic: the upstream itself)", upstream)):
            best = max([await upgrades_per_second(proc.port, auths, args.upgrades, args.concurrency)
                        for _ in range(args.repeat)])
            print(f"| {name} | {best:,.0f} |")
    finally:
        for proc in fronts:
            proc.stop()
        upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2000, help="measured requests per path and request kind")
    parser.add_argument("--users", type=int, default=1000, help="distinct users for the upgrade figures")
    parser.add_argument("--upgrades", type=int, default=5000, help="upgrades per measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="upgrades in flight")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per case (the best is kept)")
    args: Any = parser.parse_args()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
