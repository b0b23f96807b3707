"""What one `/metrics` scrape costs: a single gateway process against a process group (GATEWAY_WORKERS=N), whose
page is gathered from every worker through the supervisor (gateway.group) and merged (gateway.metrics.merge).

For each configuration: start `python -m gateway` (RabbitMQ bus, the embedded backend), open some push sessions so
that the page holds what a busy gateway's does, then scrape it sequentially, each scrape on a new connection (so
that any worker takes it). Reported: the page's size, the client's latency (median, p95), and the CPU the
gateway's processes (supervisor and workers together, from /proc) spent per scrape. Then the parts of a scrape in
this process: one registry's page, its figures encoded for the channel, and the supervisor's decode, merge and
page of N workers' figures.

Not a test and never part of the normal test run (plain script; `make bench` only collects `test_*.py`). Needs
the RabbitMQ at GATEWAY_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/). Figures: bench/README.md,
"Scraping a process group".

    .venv/bin/python bench/scrape_cost.py --scrapes 300 --sessions 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import statistics
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable

import aio_pika
import aiohttp
import msgspec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gateway.group import Figures  # noqa: E402
from gateway.metrics import Metrics, exposition, figures, merge  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
USER = ("bob@example.com", "bob")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def group_pids(root: int) -> list[int]:
    pids = [root]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[1]) == root:
                    pids.append(int(entry))
    return pids


async def measure(workers: int, scrapes: int, sessions: int) -> dict[str, float]:
    data = tempfile.mkdtemp(prefix="scrape-cost-")
    exchange = f"bench-scrape-{uuid.uuid4().hex}"
    env = {**os.environ, "GATEWAY_PORT": "0", "GATEWAY_SMTP_PORT": "0", "GATEWAY_BUS": "amqp",
           "GATEWAY_AMQP_EXCHANGE": exchange, "GATEWAY_WORKERS": str(workers), "GATEWAY_LOG_LEVEL": "WARNING",
           "GATEWAY_DB": os.path.join(data, "mail.sqlite3"), "GATEWAY_USERS": f"{USER[0]}:{USER[1]}",
           "GATEWAY_MAX_CONNECTIONS_PER_USER": str(sessions + 1)}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        port = int(line.split("127.0.0.1:")[1].split()[0].strip("/"))
        auth = "Basic " + base64.b64encode(f"{USER[0]}:{USER[1]}".encode()).decode()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            sockets = [await http.ws_connect(f"ws://127.0.0.1:{port}/jmap/ws", protocols=["jmap"],
                                             headers={"Authorization": auth}) for _ in range(sessions)]
            for ws in sockets:
                await ws.send_str('{"@type":"WebSocketPushEnable","dataTypes":null}')
            size = 0
            for _ in range(20):  # warm-up: every worker has answered a few
                async with aiohttp.ClientSession() as one, one.get(f"http://127.0.0.1:{port}/metrics") as r:
                    size = len(await r.read())
            pids = group_pids(proc.pid)
            cpu_before = sum(cpu_seconds(p) for p in pids)
            latencies = []
            for _ in range(scrapes):
                connector = aiohttp.TCPConnector(force_close=True)
                async with aiohttp.ClientSession(connector=connector) as one:
                    start = time.perf_counter()
                    async with one.get(f"http://127.0.0.1:{port}/metrics") as r:
                        await r.read()
                        assert r.status == 200
                    latencies.append(time.perf_counter() - start)
            cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
            for ws in sockets:
                await ws.close()
    finally:
        proc.terminate()
        await proc.wait()
        connection = await aio_pika.connect(env.get("GATEWAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
        async with connection:
            await (await connection.channel()).exchange_delete(exchange)
    latencies.sort()
    return {"workers": workers, "bytes": size, "p50_ms": statistics.median(latencies) * 1e3,
            "p95_ms": latencies[int(len(latencies) * 0.95)] * 1e3, "cpu_ms": cpu / scrapes * 1e3}


def parts(workers: int, sessions: int) -> dict[str, float]:
    """Microseconds of each part of a scrape, in this process, on a registry like a serving worker's."""
    m = Metrics()
    m.connections.inc(sessions)
    for code in ("1000", "1001", "1008", "1013"):
        m.close(int(code))
    for route in ("/jmap/session", "/jmap/api", "/metrics", "/healthz", "/readyz", "/jmap/ws/ticket"):
        for status in ("200", "401", "404"):
            m.http_requests.labels(route, status).inc()
    for kind in ("Response", "RequestError", "StateChange"):
        m.message_out(kind)
    m.fanout.observe(0.0002)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Figures)
    frame = encoder.encode(Figures(1, figures(m.registry)))
    frames = [frame] * workers

    def page() -> bytes:
        return exposition(merge([(str(i), decoder.decode(f).families) for i, f in enumerate(frames, 1)]))

    def best(fn: Callable[[], object], number: int = 200) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    return {"render_us": best(m.render),
            "figures_encode_us": best(lambda: encoder.encode(Figures(1, figures(m.registry)))),
            "merge_page_us": best(page), "frame_bytes": len(frame)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    print("workers  page bytes  p50 ms  p95 ms  CPU ms/scrape (all processes)")
    for n in (int(w) for w in args.workers.split(",")):
        r = await measure(n, args.scrapes, args.sessions)
        print(f"{n:7d}  {r['bytes']:10.0f}  {r['p50_ms']:6.2f}  {r['p95_ms']:6.2f}  {r['cpu_ms']:6.2f}")
    print("\nparts (this process, µs; best of 5 runs of 200):")
    for n in (int(w) for w in args.workers.split(",")):
        p = parts(n, args.sessions)
        print(f"  {n} workers: one registry's page {p['render_us']:.0f}, its figures encoded "
              f"{p['figures_encode_us']:.0f} ({p['frame_bytes']:.0f} B), decode + merge + page of {n} "
              f"{p['merge_page_us']:.0f}")


if __name__ == "__main__":
    asyncio.run(main())
