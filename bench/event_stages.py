"""Where one event's CPU goes in the gateway, stage by stage, in the two shapes of real mail traffic.

The gateway (`python -m gateway`, memory bus, pinned to CPU 0) is fed James StateChangeEvents on four
`POST /admin/events` NDJSON streams and measured with its event path cut short at each stage in turn
(bench/stages/sitecustomize.py: `wake`, `decode`, `frame`, `full`); the differences between stages are what each
stage costs. The rounds rotate the stages, so that the machine's drift hits every stage alike.

- `--shape k1`: one push-enabled session, one event at a time, 2 ms apart (the fan-out harness's k = 1 shape);
- `--shape many`: `--accounts` accounts with one session each, events to uniformly chosen accounts at `--rate`
  events/s, open loop, written in bursts per millisecond tick as the harness's publisher does.

The sessions are minimal WebSocket clients of this process's own (pinned to CPU 1) that only count what arrives,
so that their cost does not compete with the measured process. `--perf` records the `full` stage with
`perf record -e cpu-clock` (no hardware counters needed) and prints the share of the kernel and of user space;
`--flamegraph SVG` records it with py-spy (native frames included) into a flame graph.

Not a test and never part of the normal test run. Figures: bench/README.md, "Per event, measured by turns, stage
by stage".

    .venv/bin/python bench/event_stages.py --shape k1 --rounds 4 --events 2000
    .venv/bin/python bench/event_stages.py --shape many --accounts 10000 --rate 4000 --seconds 5 --rounds 3 --perf
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
from event_cost import HEAD, TOKEN, chunk, free_port
from gc_pauses import masked_text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.harness.systems import cpu_ns  # noqa: E402  (the harness's reading: schedstat of every thread)

STAGES = ("wake", "decode", "frame", "full")
STREAMS = 4


class Session(asyncio.Protocol):
    """A push-enabled RFC 8887 session that counts the StateChanges it receives and parses nothing else."""

    received = 0

    def __init__(self, user: str, ready: asyncio.Future[None]) -> None:
        self.user = user
        self.ready = ready
        self.head = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        auth = base64.b64encode(f"{self.user}:p".encode()).decode()
        self.transport.write(
            f"GET /jmap/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: jmap\r\nAuthorization: Basic {auth}\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        if self.ready.done():
            Session.received += data.count(b"StateChange")
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            assert self.transport is not None
            self.transport.write(masked_text(b'{"@type":"WebSocketPushEnable","dataTypes":null}'))
            self.ready.set_result(None)


def tracer_command(kind: str, path: str, pid: int) -> list[str]:
    """`perf`: cpu-clock samples (no hardware counters needed); `flamegraph`: py-spy with native frames, as SVG."""
    if kind == "perf":
        return ["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-p", str(pid), "-o", path]
    pyspy = Path(sys.executable).with_name("py-spy")  # the `bench` extra installs it into the venv
    return [str(pyspy) if pyspy.exists() else "py-spy", "record", "--native", "--rate", "1000",
            "--format", "flamegraph", "--pid", str(pid), "--output", path]


async def measure(stage: str, args: argparse.Namespace, trace: tuple[str, str] | None = None) -> dict[str, float]:
    port = free_port()
    users = [f"u{i:05d}" for i in range(args.accounts if args.shape == "many" else 1)]
    env = dict(os.environ, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(port),
               GATEWAY_USERS=",".join(f"{u}:p" for u in users), GATEWAY_ADMIN_TOKEN=TOKEN,
               GATEWAY_PING_INTERVAL="0", GATEWAY_SMTP_PORT="0", GATEWAY_DB=":memory:", GATEWAY_LOG_LEVEL="WARNING",
               GATEWAY_REQUIRE_NATIVE="1", BENCH_STAGE=stage, PYTHONPATH=str(ROOT / "bench" / "stages"))
    proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-m", "gateway"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []
    try:
        assert proc.stdout is not None
        while "listening on" not in proc.stdout.readline():
            pass
        for i in range(0, len(users), 200):  # a few hundred handshakes at a time
            ready = []
            for user in users[i:i + 200]:
                fut: asyncio.Future[None] = loop.create_future()
                ready.append(fut)
                tr, _ = await loop.create_connection(lambda u=user, f=fut: Session(u, f), "127.0.0.1", port)
                transports.append(tr)
            await asyncio.gather(*ready)
        await asyncio.sleep(1.0)  # every enable's first read of the states is done
        writers = []
        for _ in range(STREAMS):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEAD)
            writers.append(writer)
        seq = 0

        def publish() -> None:
            nonlocal seq
            seq += 1
            user = users[0] if len(users) == 1 else random.choice(users)
            writers[seq % STREAMS].write(chunk(b'{"username":"%s","typeStates":{"Email":"s%d"}}\n'
                                               % (user.encode(), seq)))

        async def run(seconds: float, events: int) -> int:
            if args.shape == "k1":
                for _ in range(events):
                    publish()
                    await asyncio.sleep(0.002)
                return events
            t0 = time.monotonic()
            sent = 0
            while (elapsed := time.monotonic() - t0) < seconds:
                while sent < int(elapsed * args.rate) + 1:
                    publish()
                    sent += 1
                await asyncio.sleep(max(0.001, sent / args.rate - (time.monotonic() - t0)))
            return sent

        await run(1.0, 300)  # warm-up
        await asyncio.sleep(0.2)
        received, cpu0 = Session.received, cpu_ns([proc.pid])
        tracer = None
        if trace:
            tracer = subprocess.Popen(tracer_command(trace[0], trace[1], proc.pid), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            await asyncio.sleep(0.5)
            cpu0 = cpu_ns([proc.pid])
        sent = await run(args.seconds, args.events)
        await asyncio.sleep(0.3)  # the last pushes
        cpu = cpu_ns([proc.pid]) - cpu0
        if tracer is not None:
            tracer.send_signal(2)
            tracer.wait()
        return {"us_per_event": cpu / 1e3 / sent, "sent": sent, "received": Session.received - received}
    finally:
        for tr in transports:
            tr.close()
        proc.terminate()
        proc.wait()


def perf_split(path: str) -> str:
    """Share of the samples in the kernel and in each user-space object of the largest shares."""
    out = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort", "dso", "-g", "none", "--stdio"],
                         capture_output=True, text=True).stdout
    rows = [line.split(None, 1) for line in out.splitlines() if line.strip() and not line.startswith("#")]
    shares = [(float(pct.rstrip("%")), name.strip()) for pct, name in rows if pct.endswith("%")]
    kernel = sum(p for p, name in shares if name.startswith("[kernel"))
    top = ", ".join(f"{name} {p:.1f}%" for p, name in shares[:6])
    return f"kernel {kernel:.1f}%, user space {100 - kernel:.1f}% ({top})"


async def main(args: argparse.Namespace) -> None:
    results: dict[str, list[dict[str, float]]] = {s: [] for s in STAGES}
    for r in range(args.rounds):
        for stage in STAGES[r % len(STAGES):] + STAGES[:r % len(STAGES)]:
            res = await measure(stage, args)
            results[stage].append(res)
            print(f"round {r + 1} {stage}: {res['us_per_event']:.1f} µs/event ({res['received']:.0f} pushes for "
                  f"{res['sent']:.0f} events)", flush=True)
    if args.rounds:
        med = {s: statistics.median(x["us_per_event"] for x in results[s]) for s in STAGES}
        shape = "one session, events 2 ms apart" if args.shape == "k1" else \
            f"{args.accounts} accounts of one session, {args.rate} events/s"
        print(f"gateway CPU per event ({shape}), median of {args.rounds} rounds:")
        previous = 0.0
        for stage in STAGES:
            print(f"  {stage:>6}: {med[stage]:6.1f} µs  ({med[stage] - previous:+.1f})")
            previous = med[stage]
    if args.perf:
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "perf.data")
            await measure("full", args, ("perf", path))
            print("full stage, perf cpu-clock samples:", perf_split(path))
    if args.flamegraph:
        await measure("full", args, ("flamegraph", str(Path(args.flamegraph).resolve())))
        print(f"full stage, py-spy flame graph: {args.flamegraph}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["k1", "many"], default="k1")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the four stages (0: only --perf/--flamegraph)")
    p.add_argument("--events", type=int, default=2000, help="events per measurement (k1)")
    p.add_argument("--accounts", type=int, default=10000, help="accounts, one session each (many)")
    p.add_argument("--rate", type=int, default=4000, help="events/s (many)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement (many)")
    p.add_argument("--perf", action="store_true", help="also profile the full stage with perf (cpu-clock)")
    p.add_argument("--flamegraph", metavar="SVG", help="also profile the full stage with py-spy (native frames)")
    a = p.parse_args()
    os.sched_setaffinity(0, [1])
    uvloop.run(main(a))
