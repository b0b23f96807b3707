"""Command line of the fan-out harness: `python -m bench.harness [--quick] [--install] [--scenarios ...]`, and
`python -m bench.harness report` to rebuild the Markdown and the plots from the JSON of an earlier run.

It owns the run's lifetime: everything it starts is stopped in a `finally`, on SIGINT/SIGTERM too, and the whole
run has a time limit (`--time-limit`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ORDER = ["single", "many", "idle", "slow", "e2e", "churn"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        sessions, _, accounts = item.partition(":")
        out.append((int(sessions), int(accounts)))
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.harness", description=__doc__)
    p.add_argument("command", nargs="?", default="run", choices=["run", "report"])
    p.add_argument("--quick", action="store_true", help="a few minutes: 2 pairs, fewer events, shorter steps")
    p.add_argument("--install", action="store_true", help="apt-get nginx+nchan, npm ci the ws peer, pip the bench deps")
    p.add_argument("--scenarios", default=",".join(DEFAULT_ORDER),
                   help="comma list of single,many,idle,slow,e2e,churn,profile (default: all but profile)")
    p.add_argument("--profile", action="store_true", help="also run py-spy on the gateway under fan-out")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="also run the gateway of this checkout (another commit, `make native` done there) as "
                        "gateway-base, side by side in scenarios 1 and 2")
    p.add_argument("--systems", default="", help="restrict to these (gateway,nchan,node-ws,websockets,floor)")
    p.add_argument("--pairs", type=int, default=None, help="repetitions per figure (default 5; --quick 2)")
    p.add_argument("--workers", type=int, default=8, help="load-generator processes")
    p.add_argument("--server-cpus", default=None, help="cores for the systems under test (default: 0)")
    p.add_argument("--load-cpus", default=None, help="cores for the load generator and publisher (default: rest)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--time-limit", type=float, default=3600, help="seconds; the run is stopped after this")
    p.add_argument("--connect-concurrency", type=int, default=64, help="upgrades in flight per worker")
    p.add_argument("--pub-connections", type=int, default=4, help="keep-alive HTTP connections of the publisher")
    p.add_argument("--drain-timeout", type=float, default=15.0)
    # 1. single-account fan-out
    p.add_argument("--ks", type=_ints, default=[1, 100, 1000, 10000], help="sessions of the one account")
    p.add_argument("--events-scale", type=float, default=None, help="multiplies the events per measurement")
    p.add_argument("--interleave", type=int, default=10,
                   help="events per turn when the systems take turns within a pair (0: one whole series each)")
    # 2. many accounts
    p.add_argument("--layouts", type=_layouts, default=[(10000, 10000), (10000, 1000)], help="sessions:accounts,...")
    p.add_argument("--rates", type=_ints, default=None, help="offered events/s, increasing")
    p.add_argument("--rate-duration", type=float, default=None, help="seconds per rate step")
    # 3. idle
    p.add_argument("--idle-sizes", type=_ints, default=[1000, 10000])
    # 4. slow consumers
    p.add_argument("--slow-sessions", type=int, default=1000)
    p.add_argument("--slow-accounts", type=int, default=10)
    p.add_argument("--slow-fraction", type=float, default=0.01)
    p.add_argument("--slow-rate", type=float, default=300, help="events/s over all the accounts")
    p.add_argument("--slow-duration", type=float, default=None)
    p.add_argument("--slow-fill", type=float, default=None, help="unmeasured seconds before each run with slow "
                   "consumers, for their backlog to build up (default 10; --quick 5)")
    p.add_argument("--slow-systems", default="gateway", help="comma list (the peers are optional here)")
    # 5. end to end
    p.add_argument("--e2e-k", type=int, default=1000)
    p.add_argument("--e2e-accounts", type=int, default=1000)
    p.add_argument("--e2e-rate", type=float, default=500)
    # 6. churn
    p.add_argument("--churn-duration", type=float, default=None)
    p.add_argument("--churn-concurrency", type=int, default=8, help="connect loops per worker")
    # profile
    p.add_argument("--profile-seconds", type=float, default=20)
    a = p.parse_args(argv)
    q = a.quick
    a.pairs = a.pairs or (2 if q else 5)
    a.events_scale = a.events_scale or (0.5 if q else 1.0)
    a.rates = a.rates or ([1000, 4000, 16000] if q else [1000, 2000, 4000, 8000, 16000])
    a.rate_duration = a.rate_duration or (1.5 if q else 2.5)
    a.slow_duration = a.slow_duration or (5.0 if q else 8.0)
    a.slow_fill = a.slow_fill or (5.0 if q else 10.0)
    a.churn_duration = a.churn_duration or (2.0 if q else 4.0)
    a.scenarios = [x for x in a.scenarios.split(",") if x]
    if a.profile and "profile" not in a.scenarios:
        a.scenarios.append("profile")
    a.systems = {x for x in a.systems.split(",") if x}
    a.slow_systems = [x for x in a.slow_systems.split(",") if x]
    ncpu = len(os.sched_getaffinity(0))
    cpus = sorted(os.sched_getaffinity(0))
    a.server_cpus = _ints(a.server_cpus) if a.server_cpus else (cpus[:1] if ncpu > 1 else None)
    a.load_cpus = _ints(a.load_cpus) if a.load_cpus else ([c for c in cpus if c not in a.server_cpus]
                                                          if a.server_cpus and ncpu > 1 else None)
    return a


def _loadavg() -> list[str]:
    try:
        with open("/proc/loadavg") as fh:
            return fh.read().split()[:3]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "kernel": platform.release(),
                            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_total_kib"] = int(fh.readline().split()[1])
    except OSError:
        pass
    import subprocess

    for name, cmd in (("nginx", ["nginx", "-v"]), ("node", ["node", "--version"])):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            info[name] = (r.stdout + r.stderr).strip()
        except (OSError, subprocess.TimeoutExpired):
            info[name] = None
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("picows", "websockets", "uvloop", "msgspec", "aiohttp", "aio-pika"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    lock = ROOT / "bench" / "peers" / "node-ws" / "node_modules" / "ws" / "package.json"
    if lock.exists():
        info["ws"] = json.loads(lock.read_text()).get("version")
    try:
        with open("/proc/loadavg") as fh:
            info["loadavg_at_start"] = fh.read().split()[:3]
    except OSError:
        pass
    return info


async def run(a: argparse.Namespace) -> int:
    from bench.harness import report
    from bench.harness.core import Bench, Progress
    from bench.harness.scenarios import SCENARIOS

    progress = Progress()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="bench-fanout-logs-"))
    if a.load_cpus:
        os.sched_setaffinity(0, a.load_cpus)  # the publisher runs with the load, off the server's core
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
                               "command": " ".join(["python -m bench.harness", *sys.argv[1:]]),
                               "quick": a.quick, "pairs": a.pairs, "interleave": a.interleave,
                               "server_cpus": a.server_cpus, "load_cpus": a.load_cpus, "workers": a.workers,
                               "scenarios": {}}
    progress.log(f"fan-out harness: scenarios {','.join(a.scenarios)}, {a.pairs} pairs, server cpus "
                 f"{a.server_cpus}, load cpus {a.load_cpus}, logs in {logdir}")
    bench = Bench(a, progress, logdir)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main_task.cancel)
    json_path = out / ("fanout-quick.json" if a.quick else "fanout.json")
    status = 0
    t_start = time.monotonic()
    try:
        await bench.start()
        for name in a.scenarios:
            if name not in SCENARIOS:
                progress.log(f"unknown scenario {name!r}")
                continue
            remaining = a.time_limit - (time.monotonic() - t_start)
            if remaining <= 0:
                progress.log(f"time limit reached: {name} not run")
                break
            t0 = time.monotonic()
            load_before = _loadavg()
            progress.log(f"scenario {name}: start (load average {' '.join(load_before)})")
            try:
                res = await asyncio.wait_for(SCENARIOS[name](bench), remaining)
            except TimeoutError:
                progress.log(f"scenario {name}: stopped at the time limit")
                res = {"error": "time limit"}
                status = 1
            except Exception as exc:  # one scenario failing must not lose the others' results
                import traceback

                progress.log(f"scenario {name} failed: {exc}")
                res = {"error": "".join(traceback.format_exception(exc))[-3000:]}
                status = 1
                for s in list(bench.running):
                    await bench.stop_system(s)
                await bench.disconnect()
            res["seconds"] = round(time.monotonic() - t0, 1)
            # The machine's load average around the scenario: other work on a shared host skews every figure.
            res["loadavg"] = {"before": load_before, "after": _loadavg()}
            results["scenarios"][name] = res
            progress.log(f"scenario {name}: done in {res['seconds']:.0f}s")
            results["skipped"] = bench.skipped
            json_path.write_text(json.dumps(results, separators=(",", ":")))
    except asyncio.CancelledError:
        progress.log("interrupted: stopping everything")
        status = 130
    finally:
        await bench.close()
    results["seconds"] = round(time.monotonic() - t_start, 1)
    results["skipped"] = bench.skipped
    json_path.write_text(json.dumps(results, separators=(",", ":")))
    md = report.write(results, out, quick=a.quick)
    progress.log(f"results: {json_path}, {md}")
    return status


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    if a.command == "report":
        from bench.harness import report

        out = Path(a.out)
        name = "fanout-quick.json" if a.quick else "fanout.json"
        print(report.write(json.loads((out / name).read_text()), out, quick=a.quick))
        return 0
    if a.install:
        from bench.harness.systems import install

        install(lambda text: print(f"install: {text}", file=sys.stderr, flush=True))
    import importlib.util

    wanted = ("hdrh", "numpy", "matplotlib", "picows", "websockets")
    missing = [m for m in wanted if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench.harness: missing Python packages {', '.join(missing)}: run with --install "
              "(make bench-fanout FANOUT_ARGS=--install) or pip install -e '.[bench]'", file=sys.stderr)
        return 2
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    try:
        return uvloop.run(run(a))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
