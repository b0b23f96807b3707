"""The six scenarios of the fan-out harness (bench/README.md, "Fan-out harness"), plus the profile run.

Each takes the `Bench` and returns a JSON-able summary. Systems of one scenario run side by side: all started
at once, and their measurements alternate (the order rotates per repetition), so every figure comes as pairs
taken moments apart; the report gives the median of the paired ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import systems as sysmod
from bench.harness.core import (
    Bench,
    Layout,
    cdf_points,
    encode_hist,
    median_ratio,
    rotate,
    summarize,
)

# gateway-sse: the same gateway, its sessions subscribed over RFC 8620 §7.3 event streams instead of WebSockets.
# gateway-base: another checkout's gateway (--baseline), for a change's effect measured in the same run.
SINGLE = ("gateway", "gateway-base", "gateway-post", "gateway-sse", "nchan", "node-ws", "websockets", "floor")
PEERS = ("gateway", "nchan", "node-ws", "websockets")
# The publish-path scenarios also run the gateway fed one POST per event (the peers' contract), beside the NDJSON
# stream its injectors use, so that both figures come from one run.
PUBLISHING = ("gateway", "gateway-base", "gateway-post", "nchan", "node-ws", "websockets")
P99_LIMIT_US = 50_000


def _events_for(k: int, scale: float) -> int:
    """Events per measurement at k sessions: enough receipts for stable figures, bounded time at 10k."""
    base = 200 if k <= 1 else 100 if k <= 100 else 40 if k <= 1000 else 12
    return max(3, int(base * scale))


async def _start_all(b: Bench, names: list[str], users: list[str], deflate: bool = False) -> list[sysmod.System]:
    started = []
    for name in names:
        try:
            started.append(await b.start_system(name, users, deflate))
        except Exception as exc:
            b.progress.log(f"{name}: could not start: {exc}")
            b.skipped[name] = f"start failed: {exc}"
    return started


# --- 1. single-account fan-out ------------------------------------------------------------------------------

async def single_account(b: Bench) -> dict[str, Any]:
    a = b.args
    b.progress.scenario = "1 single-account fan-out"
    names = b.usable(SINGLE)
    users = {k: f"k{k}" for k in a.ks}
    systems = await _start_all(b, names, list(users.values()))
    out: dict[str, Any] = {"ks": a.ks, "pairs": a.pairs, "interleave": a.interleave, "systems": {}, "connect": {}}

    def tag_of(s: sysmod.System, k: int) -> str:
        return f"{s.name}/k{k}"

    try:
        for s in sorted(systems, key=lambda x: not x.gateway):  # the gateway first: it calibrates the size
            layout = Layout([(users[k], k, 0) for k in a.ks], lambda u, _slow, s=s: f"{s.name}/{u}")
            out["connect"][s.name] = await b.connect(s, layout)
            await b.warmup(s, list(users.values()), [tag_of(s, k) for k in a.ks])
            if s.gateway:
                await b.calibrate(tag_of(s, a.ks[-1]))
        sizes = await b.stats()
        out["payload_bytes"] = {t: round(v["bytes"] / v["count"], 1) for t, v in sizes.items()
                                if not t.startswith("_") and v["count"]}
        await b.notify(True)
        for s in systems:  # warm-up series, not recorded: JIT (V8), allocator pools, TCP windows
            for k in a.ks:
                b.progress.status(f"warm-up k={k} {s.name}")
                await _fanout_series(b, s, users[k], k, max(3, _events_for(k, a.events_scale) // 4))
            await b.quiesce(s)
        await b.reset()
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {s.name: {k: [] for k in a.ks} for s in systems}
        for rep in range(a.pairs):
            for k in a.ks:
                events = _events_for(k, a.events_scale)
                if a.interleave:
                    b.progress.status(f"pair {rep + 1}/{a.pairs} k={k} interleaved")
                    series = await _interleaved_series(b, rotate(systems, rep), users[k], k, events, a.interleave)
                    for s in systems:
                        runs[s.name][k].append(series[s.name])
                    continue
                for s in rotate(systems, rep):
                    b.progress.status(f"pair {rep + 1}/{a.pairs} k={k} {s.name}")
                    runs[s.name][k].append(await _fanout_series(b, s, users[k], k, events))
                    await b.quiesce(s)
        await b.notify(False)
        hists = await b.collect([tag_of(s, k) for s in systems for k in a.ks])
        for s in systems:
            per_k: dict[str, Any] = {}
            for k in a.ks:
                series = runs[s.name][k]
                hist = hists[tag_of(s, k)][0]
                per_k[str(k)] = {
                    "runs": series,
                    "deliveries_per_cpu_s": _median([r["deliveries_per_cpu_s"] for r in series]),
                    "deliveries_per_s_wall": _median([r["deliveries_per_s_wall"] for r in series]),
                    "publish_to_last_ms": _median([r["publish_to_last_ms_median"] for r in series]),
                    "latency": summarize(hist), "cdf": cdf_points(hist), "hist": encode_hist(hist),
                    "missing": sum(r["missing"] for r in series),
                }
            out["systems"][s.name] = {"label": s.label, "k": per_k}
        out["ratios"] = _single_ratios(out, runs, a.ks)
    finally:
        await b.disconnect()
        for s in systems:
            await b.stop_system(s)
    return out


async def _fanout_series(b: Bench, s: sysmod.System, user: str, k: int, events: int) -> dict[str, Any]:
    """`events` events to one account of k sessions, one at a time: each waits for its last receipt."""
    fan: list[int] = []
    cpu0, load0, t0 = s.cpu_ns(), b.load_cpu_ns(), time.monotonic_ns()
    missing = await _fanout_events(b, s, user, k, events, fan)
    return _series_result(events, k, missing, fan, s.cpu_ns() - cpu0, b.load_cpu_ns() - load0,
                          time.monotonic_ns() - t0)


async def _interleaved_series(b: Bench, systems: list[sysmod.System], user: str, k: int, events: int,
                              block: int) -> dict[str, dict[str, Any]]:
    """`events` events per system, in blocks of `block` events taking turns (the order rotating per block).

    The machine's speed changes from one second to the next (a shared VM: the host moves its vCPUs, neighbours
    come and go), and a series of 200 events at k = 1 lasts half a second: measured one after the other, two
    systems' series can land in different regimes, and single ratios ranged 0.5-1.9x. Taking turns every few
    events puts every system under the same conditions; each system's CPU is read around its own blocks only."""
    fan: dict[str, list[int]] = {s.name: [] for s in systems}
    missing = dict.fromkeys(fan, 0)
    cpu = dict.fromkeys(fan, 0)
    load = dict.fromkeys(fan, 0)
    wall = dict.fromkeys(fan, 0)
    done = 0
    turn = 0
    while done < events:
        n = min(block, events - done)
        for s in rotate(systems, turn):
            cpu0, load0, t0 = s.cpu_ns(), b.load_cpu_ns(), time.monotonic_ns()
            missing[s.name] += await _fanout_events(b, s, user, k, n, fan[s.name])
            cpu[s.name] += s.cpu_ns() - cpu0
            load[s.name] += b.load_cpu_ns() - load0
            wall[s.name] += time.monotonic_ns() - t0
        done += n
        turn += 1
    return {s.name: _series_result(events, k, missing[s.name], fan[s.name], cpu[s.name], load[s.name],
                                   wall[s.name]) for s in systems}


async def _fanout_events(b: Bench, s: sysmod.System, user: str, k: int, events: int, fan: list[int]) -> int:
    """Publish `events` events one at a time to `user`'s k sessions; publish-to-last times into `fan`. Returns
    the deliveries missing."""
    group = f"{s.name}|{user}"
    missing = 0
    timeout = 10 + k / 1000
    for _ in range(events):
        seq = b.next_seq()
        fut = b.pool.expect(seq, group)
        ns = await b.publish(s, user, seq)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout)
        last, n = b.pool.finish(seq)
        missing += k - n
        if n == k:
            fan.append(last - ns)
        # A pause between events: the next publish must not overlap this one's tail.
        await asyncio.sleep(0.002)
    return missing


def _series_result(events: int, k: int, missing: int, fan: list[int], cpu: int, load_cpu: int,
                   wall: int) -> dict[str, Any]:
    delivered = events * k - missing
    return {
        "events": events, "missing": missing, "cpu_ms": round(cpu / 1e6, 2),
        "server_cpu_util": round(cpu / wall, 3), "load_cpu_util": round(load_cpu / wall, 3),
        "deliveries_per_cpu_s": round(delivered / (cpu / 1e9), 1) if cpu else None,
        "publish_to_last_ms_median": round(statistics.median(fan) / 1e6, 3) if fan else None,
        "publish_to_last_ms_max": round(max(fan) / 1e6, 3) if fan else None,
        "deliveries_per_s_wall": round(k / (statistics.median(fan) / 1e9), 1) if fan else None,
    }


def _median(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _single_ratios(out: dict[str, Any], runs: dict[str, dict[int, list[dict[str, Any]]]],
                   ks: list[int]) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    if "gateway" not in runs:
        return ratios
    for peer in runs:
        if peer == "gateway":
            continue
        for k in ks:
            g, p = runs["gateway"][k], runs[peer][k]
            ratios.setdefault(peer, {})[str(k)] = {
                "deliveries_per_cpu_s": median_ratio(
                    (x["deliveries_per_cpu_s"], y["deliveries_per_cpu_s"]) for x, y in zip(g, p, strict=False)),
                "deliveries_per_s_wall": median_ratio(
                    (x["deliveries_per_s_wall"], y["deliveries_per_s_wall"]) for x, y in zip(g, p, strict=False)),
            }
    return ratios


# --- 2. many accounts, open loop ----------------------------------------------------------------------------

async def many_accounts(b: Bench) -> dict[str, Any]:
    a = b.args
    b.progress.scenario = "2 many accounts"
    out: dict[str, Any] = {"layouts": {}, "pairs": a.pairs, "duration_s": a.rate_duration}
    for sessions, accounts in a.layouts:
        key = f"{sessions}x{accounts}"
        b.progress.scenario = f"2 many accounts {sessions} sessions / {accounts} accounts"
        per = sessions // accounts
        users = [f"u{i:05d}" for i in range(accounts)]
        systems = await _start_all(b, b.usable(PUBLISHING), users)
        res: dict[str, Any] = {"sessions": sessions, "accounts": accounts, "systems": {}, "connect": {}}
        try:
            for s in sorted(systems, key=lambda x: not x.gateway):
                layout = Layout([(u, per, 0) for u in users], lambda _u, _slow, s=s: s.name)
                res["connect"][s.name] = await b.connect(s, layout)
                await b.warmup(s, users, [s.name])
                if s.gateway:
                    await b.calibrate(s.name)
            steps: dict[str, list[list[dict[str, Any]]]] = {s.name: [[] for _ in range(a.pairs)] for s in systems}
            for rep in range(a.pairs):
                failures: dict[str, int] = {}
                for rate in a.rates:
                    for s in rotate(systems, rep):
                        if failures.get(s.name, 0) >= 2:
                            continue  # saturated: two rates in a row missed (one miss may be the machine's noise)
                        b.progress.status(f"pair {rep + 1}/{a.pairs} {rate}/s {s.name}")
                        step = await b.open_loop(s, users, rate, a.rate_duration, s.name, per)
                        d = step.as_dict()
                        d.pop("extra")  # the encoded histogram: the percentiles and CDF points above suffice here
                        steps[s.name][rep].append(d)
                        if step.aborted or step.received < step.expected:
                            failures[s.name] = 2  # deliveries lost or a publish backlog: saturated for sure
                        elif _saturated(step):
                            failures[s.name] = failures.get(s.name, 0) + 1
                        else:
                            failures[s.name] = 0
                        await b.quiesce(s)
            for s in systems:
                res["systems"][s.name] = {"label": s.label, "pairs": steps[s.name],
                                          "by_rate": _by_rate(steps[s.name]),
                                          "max_rate_p99_under_50ms": _max_ok_rate(steps[s.name])}
            res["ratios"] = _many_ratios(steps)
        finally:
            await b.disconnect()
            for s in systems:
                await b.stop_system(s)
        out["layouts"][key] = res
    return out


def _ok(step: Any) -> bool:
    lat = step["latency"] if isinstance(step, dict) else step.latency
    recv = step["received"] if isinstance(step, dict) else step.received
    exp = step["expected"] if isinstance(step, dict) else step.expected
    aborted = step["aborted"] if isinstance(step, dict) else step.aborted
    return (not aborted and exp > 0 and recv >= exp and lat.get("count", 0) > 0
            and lat["p99_us"] < P99_LIMIT_US)


def _saturated(step: Any) -> bool:
    return not _ok(step)


def _by_rate(pairs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per offered rate: the median over pairs of p50/p99/p999, delivered share, achieved deliveries/s."""
    rates: dict[float, list[dict[str, Any]]] = {}
    for rep in pairs:
        for st in rep:
            rates.setdefault(st["offered_rate"], []).append(st)
    out = {}
    for rate, sts in sorted(rates.items()):
        lat = [st["latency"] for st in sts if st["latency"].get("count")]
        out[str(int(rate))] = {
            "runs": len(sts),
            "ok_runs": sum(1 for st in sts if _ok(st)),
            "p50_us": _median([x["p50_us"] for x in lat]),
            "p99_us": _median([x["p99_us"] for x in lat]),
            "p999_us": _median([x["p999_us"] for x in lat]),
            "max_us": _median([x["max_us"] for x in lat]),
            "delivered": _median([st["received"] / st["expected"] if st["expected"] else None for st in sts]),
            "deliveries_per_s": _median([st["received"] / st["duration_s"] if st["duration_s"] else None
                                         for st in sts]),
            "server_cpu_util": _median([st["server_cpu_util"] for st in sts]),
            "load_cpu_util": _median([st["load_cpu_util"] for st in sts]),
            "pub_lag_p99_us": _median([st["pub_lag"].get("p99_us") for st in sts]),
            "server_cpu_us_per_event": _median([st.get("server_cpu_us_per_event") for st in sts]),
        }
    return out


def _max_ok_rate(pairs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The highest offered rate at which the median over pairs had p99 < 50 ms with every delivery made."""
    per_pair = []
    for rep in pairs:
        ok = [st["offered_rate"] for st in rep if _ok(st)]
        per_pair.append(max(ok) if ok else 0)
    # The lower median: always a rate that was tested (and on an even count, the more conservative one).
    return {"median": statistics.median_low(per_pair) if per_pair else None, "per_pair": per_pair}


def _many_ratios(steps: dict[str, list[list[dict[str, Any]]]]) -> dict[str, Any]:
    """p99(gateway) / p99(peer) at the same offered rate, paired by repetition."""
    if "gateway" not in steps:
        return {}
    out: dict[str, Any] = {}
    for peer, reps in steps.items():
        if peer == "gateway":
            continue
        per_rate: dict[str, Any] = {}
        rates = sorted({st["offered_rate"] for rep in reps for st in rep})
        for rate in rates:
            pairs = []
            for g_rep, p_rep in zip(steps["gateway"], reps, strict=False):
                g = next((st for st in g_rep if st["offered_rate"] == rate), None)
                p = next((st for st in p_rep if st["offered_rate"] == rate), None)
                if g and p and g["latency"].get("count") and p["latency"].get("count"):
                    pairs.append((g["latency"]["p99_us"], p["latency"]["p99_us"]))
            r = median_ratio(pairs)
            if r:
                per_rate[str(int(rate))] = r
        out[peer] = {"p99": per_rate}
    return out


# --- 3. idle capacity ---------------------------------------------------------------------------------------

async def idle_capacity(b: Bench) -> dict[str, Any]:
    a = b.args
    b.progress.scenario = "3 idle capacity"
    sizes = sorted(a.idle_sizes)
    accounts = max(1, min(1000, sizes[-1]))
    users = [f"i{i:04d}" for i in range(accounts)]
    out: dict[str, Any] = {"sizes": sizes, "accounts": accounts, "runs": {}}
    for deflate in (False, True):
        mode = "deflate" if deflate else "plain"
        for name in b.usable(PEERS):
            b.progress.status(f"{name} {mode}")
            try:
                s = await b.start_system(name, users, deflate)
            except Exception as exc:
                b.progress.log(f"{name}: could not start: {exc}")
                continue
            try:
                out["runs"].setdefault(name, {})[mode] = await _idle_run(b, s, users, sizes, deflate)
            finally:
                await b.disconnect()
                await b.stop_system(s)
    return out


async def _idle_run(b: Bench, s: sysmod.System, users: list[str], sizes: list[int], deflate: bool) -> dict[str, Any]:
    await asyncio.sleep(1.0)  # let start-up allocations settle before the baseline
    base_rss = s.rss()
    base_k = sysmod.kernel_memory()
    extensions = "permessage-deflate; client_max_window_bits" if deflate else None
    points = []
    have = 0
    negotiated = 0
    for n in sizes:
        count = n - have
        groups: dict[str, int] = {}
        for i in range(have, n):
            u = users[i % len(users)]
            groups[u] = groups.get(u, 0) + 1
        layout = Layout([(u, c, 0) for u, c in groups.items()], lambda _u, _slow, s=s: f"{s.name}/idle")
        conn = await b.connect(s, layout, extensions)
        negotiated += conn["negotiated"].get(f"{s.name}/idle", 0)
        have = n
        await asyncio.sleep(1.5)  # idle: nothing moves; let lazy allocations happen before reading
        rss = s.rss()
        k = sysmod.kernel_memory()
        point = {"connections": n, "connected_now": conn["connected"], "failed": count - conn["connected"],
                 "rss_bytes": rss, "rss_per_conn": round((rss - base_rss) / n, 1)}
        for key in ("slab_bytes", "tcp_mem_bytes"):
            if k[key] is not None and base_k[key] is not None:
                point[f"{key}_per_conn_both_ends"] = round((k[key] - base_k[key]) / n, 1)  # type: ignore[operator]
        points.append(point)
    marginal = None
    if len(points) > 1:
        p0, p1 = points[-2], points[-1]
        marginal = round((p1["rss_bytes"] - p0["rss_bytes"]) / (p1["connections"] - p0["connections"]), 1)
    return {"baseline_rss": base_rss, "points": points, "rss_per_conn_marginal": marginal,
            "negotiated": negotiated, "offered": deflate, "label": s.label}


# --- 4. slow consumers --------------------------------------------------------------------------------------

async def slow_consumers(b: Bench) -> dict[str, Any]:
    a = b.args
    b.progress.scenario = "4 slow consumers"
    accounts = a.slow_accounts
    per = a.slow_sessions // accounts
    slow_per = max(1, round(per * a.slow_fraction))
    users = [f"w{i:03d}" for i in range(accounts)]
    out: dict[str, Any] = {"sessions": per * accounts, "accounts": accounts, "slow": slow_per * accounts,
                           "rate": a.slow_rate, "duration_s": a.slow_duration, "pairs": a.pairs, "systems": {}}
    for name in b.usable(a.slow_systems):
        try:
            s = await b.start_system(name, users)
        except Exception as exc:
            b.progress.log(f"{name}: could not start: {exc}")
            continue
        others, slow = f"{s.name}/others", f"{s.name}/slow"
        try:
            layout = Layout([(u, per, slow_per) for u in users], lambda _u, is_slow, o=others, sl=slow: sl if is_slow
                            else o)
            await b.connect(s, layout)
            await b.warmup(s, users, [others, slow])
            base_rss = s.rss()
            runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
            for rep in range(a.pairs):
                for mode in rotate(["without", "with"], rep):
                    b.progress.status(f"{s.name} pair {rep + 1}/{a.pairs} {mode} slow consumers")
                    fill = None
                    kmem0 = sysmod.kernel_memory()["tcp_mem_bytes"]
                    if mode == "with":
                        await b.pool.call_all("pause", tag=slow)
                        fill = await _fill_slow(b, s, users, others, per - slow_per)
                    rss: list[int] = []
                    sampler = asyncio.get_running_loop().create_task(_sample_rss(s, rss))
                    before = await _gateway_counters(s)
                    try:
                        step = await b.open_loop(s, users, a.slow_rate, a.slow_duration, others, per - slow_per,
                                                 abort_backlog=5.0)
                    finally:
                        sampler.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await sampler
                    after = await _gateway_counters(s)
                    d = step.as_dict()
                    d.pop("extra")
                    d["rss_max"] = max(rss) if rss else None
                    d["rss_end"] = rss[-1] if rss else None
                    d["rss_samples"] = rss[:: max(1, len(rss) // 20)]
                    d["gateway_counters"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                    d["fill"] = fill
                    d["server_send_queues"] = sysmod.send_queues(s.port)
                    kmem1 = sysmod.kernel_memory()["tcp_mem_bytes"]
                    # Machine-wide TCP buffer memory: the slow sockets' unread backlog sits in the kernel first.
                    d["tcp_mem_bytes_end"] = kmem1
                    d["tcp_mem_bytes_delta"] = kmem1 - kmem0 if kmem0 is not None and kmem1 is not None else None
                    runs[mode].append(d)
                    if mode == "with":
                        await b.pool.call_all("resume", tag=slow)
                    await b.reset([slow])
                    await b.quiesce(s)
                    await asyncio.sleep(0.5)
            out["systems"][s.name] = {
                "label": s.label, "baseline_rss": base_rss, "runs": runs,
                "p99_ratio_with_vs_without": median_ratio(
                    (w["latency"].get("p99_us"), wo["latency"].get("p99_us"))
                    for w, wo in zip(runs["with"], runs["without"], strict=False)),
                "p50_ratio_with_vs_without": median_ratio(
                    (w["latency"].get("p50_us"), wo["latency"].get("p50_us"))
                    for w, wo in zip(runs["with"], runs["without"], strict=False)),
                "rss_growth_max_bytes": max((r["rss_max"] or 0) - base_rss for r in runs["with"]) if runs["with"]
                else None,
            }
        finally:
            await b.disconnect()
            await b.stop_system(s)
    return out


async def _fill_slow(b: Bench, s: sysmod.System, users: list[str], others: str, per_event: int) -> dict[str, Any]:
    """Before a measured run with slow consumers: publish (unmeasured) for `--slow-fill` seconds, so that their
    backlog builds up in the server's socket buffers (and, once those are full, in the server itself)."""
    a = b.args
    t0 = time.monotonic()
    start = await _gateway_counters(s)
    await b.open_loop(s, users, a.slow_rate, a.slow_fill, others, per_event)
    now = await _gateway_counters(s)
    merged = now.get("gateway_slow_client_merges_total", 0) - start.get("gateway_slow_client_merges_total", 0)
    return {"seconds": round(time.monotonic() - t0, 1), "merges_seen": merged}


async def _sample_rss(s: sysmod.System, into: list[int]) -> None:
    while True:
        into.append(s.rss())
        await asyncio.sleep(0.25)


async def _gateway_counters(s: sysmod.System) -> dict[str, float]:
    """A few of the gateway's Prometheus counters (merges, slow closes, pushes); {} for the peers."""
    if not s.gateway:
        return {}
    url = f"http://127.0.0.1:{s.port}/metrics"
    loop = asyncio.get_running_loop()
    try:
        text = await loop.run_in_executor(None, lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    except OSError:
        return {}
    wanted = ("gateway_slow_client_merges_total", "gateway_slow_client_closes_total",
              "gateway_pushes_delivered_total")
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = float(value)
    return out


# --- 5. end to end: RabbitMQ and the memory bus -------------------------------------------------------------

async def end_to_end(b: Bench) -> dict[str, Any]:
    a = b.args
    b.progress.scenario = "5 end to end (buses)"
    names = b.usable(["gateway", "gateway-amqp"])
    k_big = a.e2e_k
    users_many = [f"m{i:04d}" for i in range(a.e2e_accounts)]
    fan_users = {1: "e1", k_big: f"e{k_big}"}
    users = [*fan_users.values(), *users_many]
    systems = await _start_all(b, names, users)
    out: dict[str, Any] = {"pairs": a.pairs, "systems": {}, "k": [1, k_big], "rate": a.e2e_rate,
                           "accounts": a.e2e_accounts,
                           "broker": "reachable" if "gateway-amqp" in names else b.skipped.get("gateway-amqp")}
    try:
        for s in systems:
            layout = Layout([(fan_users[1], 1, 0), (fan_users[k_big], k_big, 0), *[(u, 1, 0) for u in users_many]],
                            lambda u, _slow, s=s: f"{s.name}/{u}" if u.startswith("e") else f"{s.name}/many")
            await b.connect(s, layout)
            await b.warmup(s, users, [f"{s.name}/{u}" for u in fan_users.values()] + [f"{s.name}/many"])
        await b.reset()
        runs: dict[str, dict[str, list[Any]]] = {s.name: {"k1": [], f"k{k_big}": [], "rate": []} for s in systems}
        for rep in range(a.pairs):
            for s in rotate(systems, rep):
                b.progress.status(f"pair {rep + 1}/{a.pairs} {s.name}")
                await b.notify(True)
                for k, user in fan_users.items():
                    runs[s.name][f"k{k}"].append(await _fanout_series(b, s, user, k, _events_for(k, a.events_scale)))
                await b.notify(False)
                step = await b.open_loop(s, users_many, a.e2e_rate, a.rate_duration, f"{s.name}/many", 1)
                d = step.as_dict()
                d.pop("extra")
                runs[s.name]["rate"].append(d)
                await b.quiesce(s)
        hists = await b.collect([f"{s.name}/{u}" for s in systems for u in fan_users.values()])
        for s in systems:
            out["systems"][s.name] = {
                "label": s.label, "runs": runs[s.name],
                "fanout_latency": {f"k{k}": summarize(hists[f"{s.name}/{u}"][0]) for k, u in fan_users.items()},
                "cdf": {f"k{k}": cdf_points(hists[f"{s.name}/{u}"][0]) for k, u in fan_users.items()},
                "publish_to_last_ms": {f"k{k}": _median([r["publish_to_last_ms_median"]
                                                         for r in runs[s.name][f"k{k}"]]) for k in fan_users},
                "rate_p99_us": _median([r["latency"].get("p99_us") for r in runs[s.name]["rate"]]),
                "rate_p50_us": _median([r["latency"].get("p50_us") for r in runs[s.name]["rate"]]),
            }
        if "gateway" in runs and "gateway-amqp" in runs:
            g, q = runs["gateway"], runs["gateway-amqp"]
            out["ratios_amqp_vs_memory"] = {
                f"publish_to_last_k{k}": median_ratio((x["publish_to_last_ms_median"], y["publish_to_last_ms_median"])
                                                      for x, y in zip(q[f"k{k}"], g[f"k{k}"], strict=False))
                for k in fan_users}
            out["ratios_amqp_vs_memory"]["rate_p99"] = median_ratio(
                (x["latency"].get("p99_us"), y["latency"].get("p99_us")) for x, y in zip(q["rate"], g["rate"],
                                                                                          strict=False))
    finally:
        await b.disconnect()
        for s in systems:
            await b.stop_system(s)
    return out


# --- 6. connection churn ------------------------------------------------------------------------------------

async def churn(b: Bench) -> dict[str, Any]:
    a = b.args
    b.progress.scenario = "6 connection churn"
    users = [f"c{i:03d}" for i in range(100)]
    systems = await _start_all(b, b.usable(PEERS), users)
    out: dict[str, Any] = {"duration_s": a.churn_duration, "concurrency": a.churn_concurrency * a.workers,
                           "pairs": a.pairs, "systems": {}}
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
    try:
        for rep in range(a.pairs):
            for s in rotate(systems, rep):
                b.progress.status(f"pair {rep + 1}/{a.pairs} {s.name}")
                user = users[rep % len(users)]
                cpu_s0, cpu_l0 = s.cpu_ns(), b.load_cpu_ns()
                t0 = time.monotonic()
                replies = await b.pool.call_all("churn", url=s.sub_url(user), headers=s.sub_headers(user),
                                                duration=a.churn_duration, concurrency=a.churn_concurrency)
                wall = time.monotonic() - t0
                done = sum(r["done"] for r in replies)
                failed = sum(r["failed"] for r in replies)
                cpu = (s.cpu_ns() - cpu_s0) / 1e9
                runs[s.name].append({
                    "upgrades": done, "failed": failed, "errors": [e for r in replies for e in r["errors"]][:3],
                    "upgrades_per_s": round(done / wall, 1), "upgrades_per_cpu_s": round(done / cpu, 1) if cpu
                    else None, "server_cpu_util": round(cpu / wall, 3),
                    "load_cpu_util": round((b.load_cpu_ns() - cpu_l0) / 1e9 / wall, 3)})
                await b.quiesce(s)
                await asyncio.sleep(0.5)
        for s in systems:
            r = runs[s.name]
            out["systems"][s.name] = {"label": s.label, "runs": r,
                                      "upgrades_per_s": _median([x["upgrades_per_s"] for x in r]),
                                      "upgrades_per_cpu_s": _median([x["upgrades_per_cpu_s"] for x in r]),
                                      "server_cpu_util": _median([x["server_cpu_util"] for x in r]),
                                      "load_cpu_util": _median([x["load_cpu_util"] for x in r])}
        if "gateway" in runs:
            out["ratios"] = {peer: {
                "upgrades_per_s": median_ratio((x["upgrades_per_s"], y["upgrades_per_s"])
                                               for x, y in zip(runs["gateway"], r, strict=False)),
                "upgrades_per_cpu_s": median_ratio((x["upgrades_per_cpu_s"], y["upgrades_per_cpu_s"])
                                                   for x, y in zip(runs["gateway"], r, strict=False))}
                for peer, r in runs.items() if peer != "gateway"}
    finally:
        for s in systems:
            await b.stop_system(s)
    return out


# --- profile: where the gateway's time goes under single-account fan-out ------------------------------------

async def profile(b: Bench) -> dict[str, Any]:
    """py-spy (sampling, with native frames) on the gateway while it fans events out to k sessions of one
    account back to back. Writes the raw collapsed stacks next to the results and a summary of self time."""
    a = b.args
    b.progress.scenario = "profile (py-spy)"
    k = a.ks[-1]
    user = f"k{k}"
    s = await b.start_system("gateway", [user])
    out: dict[str, Any] = {"k": k, "seconds": a.profile_seconds}
    raw = b.logdir / "profile-gateway-fanout.txt"  # raw stacks stay with the logs; the summary goes to the JSON
    try:
        await b.connect(s, Layout([(user, k, 0)], lambda _u, _s: "gateway/profile"))
        await b.warmup(s, [user], ["gateway/profile"])
        await b.notify(True)
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(s.pids()[0]),
                                "--native", "--rate", "250", "--format", "raw", "--duration",
                                str(int(a.profile_seconds)), "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        cpu0 = s.cpu_ns()
        deadline = time.monotonic() + a.profile_seconds
        events = 0
        try:
            await asyncio.sleep(0.5)  # py-spy attaches
            while time.monotonic() < deadline and spy.poll() is None:
                await _fanout_series(b, s, user, k, 1)
                events += 1
                b.progress.status(f"{events} events to {k} sessions under py-spy")
        finally:
            cpu = s.cpu_ns() - cpu0
            try:
                _, err = await asyncio.get_running_loop().run_in_executor(None, lambda: spy.communicate(timeout=60))
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
        out["events"] = events
        out["deliveries_per_cpu_s"] = round(events * k / (cpu / 1e9), 1) if cpu else None
        out["py_spy_stderr"] = err.decode(errors="replace")[-500:]
        if raw.exists():
            out["top_self"], out["top_inclusive"], out["samples"] = _summarize_stacks(raw)
        # The same load once more, recorded as a flame graph (an SVG picture) for bench/results.
        svg = Path(a.out) / f"profile-gateway-k{k}-flamegraph.svg"
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(s.pids()[0]),
                                "--native", "--rate", "250", "--format", "flamegraph", "--duration",
                                str(int(a.profile_seconds)), "--output", str(svg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + a.profile_seconds
        await asyncio.sleep(0.5)
        while time.monotonic() < deadline and spy.poll() is None:
            await _fanout_series(b, s, user, k, 1)
        await asyncio.get_running_loop().run_in_executor(None, spy.wait)
        if svg.exists():
            # py-spy titles the picture with its command line: no path of this machine goes into bench/results.
            text = svg.read_text().replace(str(Path(sys.executable).parent / "py-spy"), "py-spy")
            svg.write_text(text.replace(str(svg), svg.name))
        out["flamegraph"] = svg.name if svg.exists() else None
        await b.notify(False)
    finally:
        await b.disconnect()
        await b.stop_system(s)
    return out


def _summarize_stacks(path: Path) -> tuple[list[tuple[str, float]], list[tuple[str, float]], int]:
    """Self and inclusive share of the event loop's busy samples per frame, from py-spy's collapsed stacks
    ("a;b;c count"). Other threads (the embedded backend's executor, idle) and the loop waiting in epoll are
    left out: what remains is where the serving thread spends its CPU."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if "_run_module_as_main" not in stack or frames[-1].startswith(("epoll_pwait", "epoll_wait")):
            continue
        n = int(count)
        total += n
        leaf = frames[-1]
        self_t[leaf] = self_t.get(leaf, 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    total = max(total, 1)
    top_self = sorted(((f, round(100 * n / total, 2)) for f, n in self_t.items()), key=lambda x: -x[1])[:25]
    top_incl = sorted(((f, round(100 * n / total, 2)) for f, n in incl.items()), key=lambda x: -x[1])[:40]
    return top_self, top_incl, total


SCENARIOS = {
    "single": single_account, "many": many_accounts, "idle": idle_capacity, "slow": slow_consumers,
    "e2e": end_to_end, "churn": churn, "profile": profile,
}
