"""The harness's machinery shared by every scenario: the pool of load-generator processes, starting and stopping
systems, connecting clients, warm-up, publishing (closed and open loop), collecting histograms, the progress
display and the statistics (percentiles, median of paired ratios).

Everything started here is registered for cleanup: `Bench.close()` (in a `finally`) stops servers by process
group and ends every worker; the workers also end on their own when the harness's pipe closes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from bench.harness import systems as sysmod
from bench.harness.loadgen import worker_main
from bench.harness.publisher import AmqpPublisher, HttpPublisher, NdjsonPublisher

HIST_MAX_US = 120_000_000
DEFAULT_PAD = 330  # pushState length of the gateway's pushes in these layouts (calibrated at run time if it runs)


def new_hist() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


def summarize(hist: HdrHistogram) -> dict[str, Any]:
    """Percentiles in µs (HdrHistogram, 3 significant digits)."""
    n = hist.get_total_count()
    if not n:
        return {"count": 0}
    return {"count": n, "p50_us": hist.get_value_at_percentile(50), "p90_us": hist.get_value_at_percentile(90),
            "p99_us": hist.get_value_at_percentile(99), "p999_us": hist.get_value_at_percentile(99.9),
            "max_us": hist.get_max_value(), "mean_us": round(hist.get_mean_value(), 1)}


def cdf_points(hist: HdrHistogram) -> list[tuple[float, int]]:
    """(percentile, µs) pairs, dense in the tail, small enough to keep in the JSON summary for the plots."""
    if not hist.get_total_count():
        return []
    pts = [0.0, 1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97, 98, 99, 99.5, 99.7, 99.9, 99.95, 99.99, 100]
    return [(p, hist.get_value_at_percentile(p)) for p in pts]


def encode_hist(hist: HdrHistogram) -> str:
    return base64.b64encode(hist.encode()).decode()


def median_ratio(pairs: Iterable[tuple[float | None, float | None]]) -> dict[str, Any] | None:
    """The median of the per-pair ratios a/b (robust to drift that hits both members of a pair alike)."""
    ratios = [a / b for a, b in pairs if a is not None and b]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "pairs": len(ratios),
            "ratios": [round(r, 4) for r in ratios]}


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    """Alternate the order between repetitions (pairs), so neither member of a pair always runs first."""
    if not items:
        return []
    k %= len(items)
    seq = list(items[k:]) + list(items[:k])
    return seq if k % 2 == 0 else list(reversed(seq))


class Progress:
    """One status line rewritten in place on a terminal, plus permanent log lines; plain lines otherwise."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self.scenario = ""
        self._last_plain = 0.0
        self._status = ""

    def _stamp(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"[{s // 60:02d}:{s % 60:02d}]"

    def log(self, text: str) -> None:
        if self.tty and self._status:
            self.stream.write("\r\x1b[2K")
        self.stream.write(f"{self._stamp()} {text}\n")
        self.stream.flush()
        self._status = ""

    def status(self, text: str) -> None:
        line = f"{self._stamp()} {self.scenario}: {text}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line[:200])
            self.stream.flush()
            self._status = line
        elif time.monotonic() - self._last_plain > 10:
            self._last_plain = time.monotonic()
            self.stream.write(line + "\n")
            self.stream.flush()


@dataclass
class Layout:
    """Who connects: (user, sessions, slow sessions among them), tagged for the statistics."""

    groups: list[tuple[str, int, int]]
    tag: Callable[[str, bool], str]


@dataclass
class StepResult:
    offered_rate: float
    duration_s: float
    sent: int
    expected: int
    received: int
    latency: dict[str, Any]
    cdf: list[tuple[float, int]]
    pub_lag: dict[str, Any]
    server_cpu_util: float
    load_cpu_util: float
    achieved_rate: float
    aborted: str | None = None
    merged: int = 0  # events delivered as part of a newer state for their account (loadgen.record)
    server_cpu_us_per_event: float | None = None  # the server's CPU over the step and its drain, per event sent
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Pool:
    """The load-generator processes, spread over 127.0.0.x source addresses, pinned to the load cores."""

    def __init__(self, n: int, cpus: Sequence[int] | None) -> None:
        self.n = n
        self.cpus = list(cpus) if cpus else None
        self.procs: list[Any] = []
        self.pipes: list[Connection] = []
        self._futures: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self.members: dict[str, set[int]] = {}  # group -> workers with reading members in it
        self.done: dict[int, dict[int, tuple[int, int]]] = {}  # seq -> worker -> (last ns, count)
        self._waiters: dict[int, tuple[set[int], asyncio.Future[None]]] = {}
        self._ready: set[int] = set()

    async def start(self) -> None:
        ctx = mp.get_context("spawn")
        loop = asyncio.get_running_loop()
        for i in range(self.n):
            parent, child = ctx.Pipe()
            # One source address per worker: each gets its own ephemeral port range towards every server port.
            proc = ctx.Process(target=worker_main, args=(child, i, f"127.0.0.{10 + i}", self.cpus), daemon=True,
                               name=f"bench-load-{i}")
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)
            loop.add_reader(parent.fileno(), self._readable, i)
        deadline = time.monotonic() + 60
        while len(self._ready) < self.n:
            if time.monotonic() > deadline:
                raise RuntimeError("load-generator workers did not start")
            await asyncio.sleep(0.05)

    def _readable(self, i: int) -> None:
        pipe = self.pipes[i]
        try:
            # uvloop makes a watched fd non-blocking; large replies (histograms) must be read whole.
            os.set_blocking(pipe.fileno(), True)
            while pipe.poll():
                msg = pipe.recv()
                self._dispatch(msg)
        except (EOFError, OSError) as exc:
            asyncio.get_running_loop().remove_reader(pipe.fileno())
            for fut in self._futures.values():
                if not fut.done():
                    self.procs[i].join(1)
                    fut.set_exception(RuntimeError(f"load worker {i} died (exit code {self.procs[i].exitcode}; "
                                                   f"{type(exc).__name__}: {exc})"))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            fut = self._futures.pop(msg["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        note = msg.get("note")
        if note == "ready":
            self._ready.add(msg["worker"])
        elif note == "done":
            seq = msg["seq"]
            self.done.setdefault(seq, {})[msg["worker"]] = (msg["last"], msg["n"])
            waiter = self._waiters.get(seq)
            if waiter is not None and waiter[0] <= set(self.done[seq]) and not waiter[1].done():
                waiter[1].set_result(None)

    async def call(self, i: int, op: str, timeout: float = 600, **kw: Any) -> dict[str, Any]:
        self._next += 1
        cid = self._next
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures[cid] = fut
        self.pipes[i].send({"id": cid, "op": op, **kw})
        try:
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._futures.pop(cid, None)
        if "error" in reply:
            raise RuntimeError(f"load worker {i}: {op}: {reply['error']}")
        return reply

    async def call_all(self, op: str, timeout: float = 600, **kw: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.call(i, op, timeout, **kw) for i in range(self.n))))

    def expect(self, seq: int, group: str) -> asyncio.Future[None]:
        """A future set when every worker with members in `group` has seen all of them receive `seq`."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        workers = set(self.members.get(group, ()))
        self._waiters[seq] = (workers, fut)
        if workers <= set(self.done.get(seq, {})):
            fut.set_result(None)
        return fut

    def finish(self, seq: int) -> tuple[int, int]:
        """(last receipt ns, receipts) of `seq`, and forget it."""
        self._waiters.pop(seq, None)
        got = self.done.pop(seq, {})
        if not got:
            return 0, 0
        return max(v[0] for v in got.values()), sum(v[1] for v in got.values())

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for i, pipe in enumerate(self.pipes):
            with contextlib.suppress(Exception):
                loop.remove_reader(pipe.fileno())
            with contextlib.suppress(Exception):
                self.pipes[i].send({"id": 0, "op": "exit"})
        deadline = time.monotonic() + 15
        for p in self.procs:
            while p.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if p.is_alive():
                p.terminate()
                p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
        for pipe in self.pipes:
            pipe.close()
        self.procs, self.pipes = [], []

    def kill_now(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()


class Bench:
    """What every scenario uses. One per harness run."""

    def __init__(self, args: Any, progress: Progress, logdir: Path) -> None:
        self.args = args
        self.progress = progress
        self.logdir = logdir
        self.pool = Pool(args.workers, args.load_cpus)
        self.running: list[sysmod.System] = []
        self.publishers: dict[str, Any] = {}
        self.seq = 0
        self.pad = DEFAULT_PAD
        self.rng = random.Random(args.seed)
        self.skipped: dict[str, str] = {}

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        for s in list(self.running):
            await self.stop_system(s)
        await self.pool.stop()

    def kill_now(self) -> None:
        for s in self.running:
            s.kill_now()
        self.pool.kill_now()

    def usable(self, names: Sequence[str]) -> list[str]:
        out = []
        for name in names:
            base = "gateway" if name.startswith("gateway") else name
            if self.args.systems and base not in self.args.systems:
                continue
            why = sysmod.available(name)
            if name == "gateway-base" and not self.args.baseline:
                continue  # only with --baseline
            if why:
                if name not in self.skipped:
                    self.progress.log(f"skipping {name}: {why}")
                self.skipped[name] = why
                continue
            out.append(name)
        return out

    async def start_system(self, name: str, users: Sequence[str] = (), deflate: bool = False) -> sysmod.System:
        kw: dict[str, Any] = {"server_cpus": self.args.server_cpus, "deflate": deflate, "users": users,
                              "logdir": self.logdir}
        if name == "gateway-amqp":
            s: sysmod.System = sysmod.Gateway(bus="amqp", **kw)
        elif name == "gateway-post":
            s = sysmod.Gateway(publish="post", **kw)
        elif name == "gateway-sse":
            s = sysmod.Gateway(sse=True, **kw)
        elif name == "gateway-base":
            s = sysmod.Gateway(root=Path(self.args.baseline).resolve(), **kw)
        else:
            s = sysmod.SYSTEMS[name](**kw)
        s.pad = self.pad
        self.running.append(s)
        await s.start()
        return s

    async def stop_system(self, s: sysmod.System) -> None:
        pub = self.publishers.pop(s.name, None)
        if isinstance(pub, NdjsonPublisher):
            await pub.aclose()
        elif isinstance(pub, HttpPublisher):
            pub.close()
        elif isinstance(pub, AmqpPublisher):
            with contextlib.suppress(Exception):
                await pub.aclose()
        await s.stop()
        if s in self.running:
            self.running.remove(s)

    # --- clients -------------------------------------------------------------------------------------------

    async def connect(self, s: sysmod.System, layout: Layout, extensions: str | None = None) -> dict[str, Any]:
        """Open every session of `layout` on `s`, spread round-robin over the workers."""
        per_worker: list[list[Any]] = [[] for _ in range(self.pool.n)]
        i = 0
        for user, count, slow in layout.groups:
            group = f"{s.name}|{user}"
            for j in range(count):
                is_slow = j < slow
                item = (layout.tag(user, is_slow), group, s.sub_url(user), s.sub_headers(user), s.gateway, is_slow)
                per_worker[i % self.pool.n].append(item)
                i += 1
        total = i
        started = time.monotonic()
        self.progress.status(f"{s.name}: connecting {total} sessions")
        replies = await asyncio.gather(*(
            self.pool.call(w, "connect", items=items, concurrency=self.args.connect_concurrency,
                           extensions=extensions) for w, items in enumerate(per_worker)))
        ok = sum(r["ok"] for r in replies)
        errors = [e for r in replies for e in r["errors"]][:5]
        negotiated: dict[str, int] = {}
        for w, r in enumerate(replies):
            for tag, n in r["negotiated"].items():
                negotiated[tag] = negotiated.get(tag, 0) + n
            for group, n in r["groups"].items():
                if n > 0:
                    self.pool.members.setdefault(group, set()).add(w)
        took = time.monotonic() - started
        if ok < total:
            self.progress.log(f"{s.name}: {total - ok} of {total} sessions failed to connect: {errors}")
        return {"sessions": total, "connected": ok, "errors": errors, "negotiated": negotiated,
                "seconds": round(took, 2), "upgrades_per_s": round(ok / took, 1) if took else None}

    async def disconnect(self, tags: Sequence[str] | None = None) -> None:
        await self.pool.call_all("close", tags=list(tags) if tags is not None else None)
        if tags is None:
            self.pool.members.clear()

    async def stats(self, touched: bool = False) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for r in await self.pool.call_all("stats", touched=touched):
            for tag, v in r["stats"].items():
                if tag == "_touched":
                    t = merged.setdefault("_touched", {})
                    for k, (got, n) in v.items():
                        cur = t.setdefault(k, [0, 0])
                        cur[0] += got
                        cur[1] += n
                    continue
                cur = merged.setdefault(tag, {"count": 0, "bytes": 0, "other": 0, "merged": 0})
                for k in ("count", "bytes", "other", "merged"):
                    cur[k] += v.get(k, 0)
        return merged

    async def collect(self, tags: Sequence[str]) -> dict[str, tuple[HdrHistogram, dict[str, int]]]:
        out: dict[str, tuple[HdrHistogram, dict[str, int]]] = {
            t: (new_hist(), {"count": 0, "bytes": 0, "merged": 0}) for t in tags}
        for r in await self.pool.call_all("collect", tags=list(tags)):
            for tag, v in r["tags"].items():
                hist, counts = out[tag]
                counts["count"] += v["count"]
                counts["bytes"] += v["bytes"]
                counts["merged"] += v.get("merged", 0)
                if v["hist"]:
                    hist.add(HdrHistogram.decode(base64.b64decode(v["hist"])))
        return out

    async def reset(self, tags: Sequence[str] | None = None) -> None:
        await self.pool.call_all("reset", tags=list(tags) if tags is not None else None)

    async def notify(self, on: bool) -> None:
        await self.pool.call_all("notify", on=on)

    # --- publishing ----------------------------------------------------------------------------------------

    async def publisher(self, s: sysmod.System) -> Any:
        pub = self.publishers.get(s.name)
        if pub is None:
            if s.publish_via == "amqp":
                pub = AmqpPublisher()
            elif s.publish_via == "ndjson":
                assert isinstance(s, sysmod.Gateway)
                pub = NdjsonPublisher("127.0.0.1", s.pub_port, s.stream_head(), self.args.pub_connections)
            else:
                pub = HttpPublisher("127.0.0.1", s.pub_port, self.args.pub_connections)
            await pub.open()
            self.publishers[s.name] = pub
        elif isinstance(pub, HttpPublisher) and pub.lost:
            n = await pub.ensure()
            pub.lost = 0
            if n:
                self.progress.log(f"{s.name}: the server closed {n} publisher connection(s); reconnected")
        return pub

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def publish(self, s: sysmod.System, user: str, seq: int) -> int:
        """Send one event stamped with CLOCK_MONOTONIC now; returns the stamp (ns)."""
        pub = await self.publisher(s)
        ns = time.monotonic_ns()
        state = f"t{ns}-{seq}"
        if s.publish_via == "amqp":
            assert isinstance(s, sysmod.Gateway)
            await pub.publish(user, s.event(user, state, seq))
        else:
            pub.publish(s.pub_request(user, state, seq))
        return ns

    async def warmup(self, s: sysmod.System, users: Sequence[str], tags: Sequence[str], rounds: int = 6) -> None:
        """One event per account, paced; then wait until every session of `tags` has received one. Proves that
        every subscription is live before anything is measured. Over RabbitMQ the gateway binds its routing keys
        asynchronously, so an early event may find no binding: then another round."""
        pub = await self.publisher(s)
        missing = -1
        for _ in range(rounds):
            for n, user in enumerate(users):
                await self.publish(s, user, self.next_seq())
                if n % 500 == 499:  # paced: at most 500 publish requests in flight
                    await pub.drain(30)
                    self.progress.status(f"{s.name}: warm-up {n + 1}/{len(users)} accounts")
            await pub.drain(60)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                touched = (await self.stats(touched=True)).get("_touched", {})
                missing = sum(touched.get(t, [0, 0])[1] - touched.get(t, [0, 0])[0] for t in tags)
                if missing == 0:
                    break
                await asyncio.sleep(0.2)
            if getattr(pub, "first_error", None):
                raise RuntimeError(f"{s.name}: publishing failed: {pub.first_error}")
            if missing == 0:
                return
        raise RuntimeError(f"{s.name}: {missing} sessions never received a warm-up event in {rounds} rounds")

    async def calibrate(self, gateway_tag: str) -> None:
        """Make the peers' bodies as long as the gateway's pushes (its pushState), so every system writes frames
        of the same size. Uses the warm-up pushes the gateway just delivered."""
        st = (await self.stats()).get(gateway_tag)
        if not st or not st["count"]:
            return
        mean = st["bytes"] / st["count"]
        probe = sysmod.System(server_cpus=None, logdir=self.logdir)
        probe.pad = 0
        base = len(probe.body("u00000", f"t{time.monotonic_ns()}-{self.seq}"))
        self.pad = max(0, round(mean - base))
        for s in self.running:
            s.pad = self.pad

    async def quiesce(self, s: sysmod.System, limit: float = 20.0) -> None:
        """Wait until the server is idle (< 5% of a core over 200 ms): a saturated system must not steal the
        next system's core."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and s.alive:
            c0 = s.cpu_ns()
            await asyncio.sleep(0.2)
            if s.cpu_ns() - c0 < 0.05 * 0.2e9:
                return

    def load_cpu_ns(self) -> int:
        return sysmod.cpu_ns([*self.pool.pids(), os.getpid()])

    async def open_loop(self, s: sysmod.System, users: Sequence[str], rate: float, duration: float, tag: str,
                        per_event: int, abort_backlog: float = 1.0) -> StepResult:
        """Events at a fixed rate (open loop) for `duration`, each to a uniformly chosen account; then wait for
        the deliveries, and summarise `tag`'s latencies. `per_event` = deliveries expected per event in `tag`."""
        await self.reset([tag])
        pub = await self.publisher(s)
        lag = new_hist()
        interval = 1e9 / rate
        cpu_s0, cpu_l0 = s.cpu_ns(), self.load_cpu_ns()
        t0 = time.monotonic_ns()
        end = t0 + int(duration * 1e9)
        sent = 0
        aborted = None
        choose = self.rng.choice
        http = s.publish_via in ("http", "ndjson")
        while True:
            now = time.monotonic_ns()
            if now >= end:
                break
            due = int((now - t0) / interval) + 1
            burst = 0
            while sent < due and burst < 2000:
                seq = self.next_seq()
                user = choose(users)
                ns = time.monotonic_ns()
                if http:
                    # The account's event number and the previous one's publish time: a server that merges events
                    # of one account (state-based push) is credited for what it merged (loadgen.record).
                    n, prev = s.events_to.get(user, (0, ns))
                    s.events_to[user] = (n + 1, ns)
                    pub.publish(s.pub_request(user, f"t{ns}-{seq}-{n + 1}-{prev}", seq))
                else:
                    await self.publish(s, user, seq)
                lag.record_value(max(1, min(HIST_MAX_US, int((ns - (t0 + sent * interval)) // 1000))))
                sent += 1
                burst += 1
            if pub.outstanding > max(2000, rate * abort_backlog):
                aborted = f"server backlog: {pub.outstanding} publish requests unanswered"
                break
            # Sleep until the next event is due, at least 1 ms: uvloop's timers have millisecond resolution and
            # a shorter sleep would spin, stealing the load generator's core.
            wait = (t0 + sent * interval - time.monotonic_ns()) / 1e9
            await asyncio.sleep(max(0.001, wait))
        elapsed = (time.monotonic_ns() - t0) / 1e9
        expected = sent * per_event
        # Deliveries: wait until all arrived, or until nothing has arrived for a while.
        deadline = time.monotonic() + self.args.drain_timeout
        received = 0
        last_change = time.monotonic()
        while time.monotonic() < deadline:
            got = (await self.stats()).get(tag, {}).get("count", 0)
            if got != received:
                received, last_change = got, time.monotonic()
            if received >= expected or time.monotonic() - last_change > 3.0:
                break
            await asyncio.sleep(0.1)
        await pub.drain(5)
        busy = (time.monotonic_ns() - t0) / 1e9
        cpu_s, cpu_l = s.cpu_ns() - cpu_s0, self.load_cpu_ns() - cpu_l0
        hist, counts = (await self.collect([tag]))[tag]
        return StepResult(offered_rate=rate, duration_s=round(elapsed, 3), sent=sent, expected=expected,
                          received=counts["count"], latency=summarize(hist), cdf=cdf_points(hist),
                          pub_lag=summarize(lag), server_cpu_util=round(cpu_s / 1e9 / busy, 3),
                          load_cpu_util=round(cpu_l / 1e9 / busy, 3), achieved_rate=round(sent / elapsed, 1),
                          aborted=aborted, merged=counts.get("merged", 0), extra={"hist": encode_hist(hist)},
                          server_cpu_us_per_event=round(cpu_s / 1e3 / sent, 1) if sent else None)
