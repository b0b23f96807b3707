"""Turns the harness's JSON summary into `fanout-results.md` (tables, the issue's targets with their gaps) and PNG
plots (matplotlib, headless). Pure post-processing: `python -m bench.harness report` reruns it on saved JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

KIB = 1024
ORDER = ["gateway", "gateway-base", "gateway-post", "gateway-sse", "gateway-amqp", "nchan", "node-ws", "websockets",
         "floor"]
COLORS = {"gateway": "#1f77b4", "gateway-base": "#8c564b",
          "gateway-post": "#aec7e8", "gateway-sse": "#d62728", "gateway-amqp": "#17becf",
          "nchan": "#2ca02c", "node-ws": "#ff7f0e", "websockets": "#9467bd", "floor": "#7f7f7f"}


def _sorted(names: Any) -> list[str]:
    return sorted(names, key=lambda n: ORDER.index(n) if n in ORDER else 99)


def _f(v: Any, digits: int = 0, suffix: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float | int):
        return f"{v:,.{digits}f}{suffix}"
    return str(v)


def _ms(us: Any) -> str:
    return "n/a" if us is None else f"{us / 1000:,.2f}"


def _ratio(r: dict[str, Any] | None) -> str:
    if not r:
        return "n/a"
    return f"**{r['median']:.2f}x** ({r['min']:.2f}-{r['max']:.2f}, {r['pairs']} pairs)"


def _verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "met"
    gap = (target / value) if higher_is_better else (value / target)
    return f"missed: {gap:.2f}x short" if higher_is_better else f"missed: {gap:.2f}x over"


# --- targets -----------------------------------------------------------------------------------------------

def targets(results: dict[str, Any]) -> list[list[str]]:
    sc = results.get("scenarios", {})
    rows: list[list[str]] = []
    single = sc.get("single", {})
    if "ratios" in single:
        k = str(single["ks"][-1])
        for peer, target in (("nchan", 1.0), ("websockets", 5.0), ("floor", 0.7)):
            r = single["ratios"].get(peer, {}).get(k, {}).get("deliveries_per_cpu_s")
            rows.append([f"deliveries/s per core, 1 account x {int(k):,} sessions: gateway / {peer}",
                         f"≥ {target}x", _ratio(r), _verdict(r["median"] if r else None, target, True)])
        if "1" in single["ratios"].get("nchan", {}):
            # Issue 13: mail traffic is one event for one account with one to three sessions.
            r = single["ratios"]["nchan"]["1"].get("deliveries_per_cpu_s")
            rows.append(["deliveries/s per core, one session per event (k = 1): gateway / nchan", "≥ 1.0x",
                         _ratio(r), _verdict(r["median"] if r else None, 1.0, True)])
    many = sc.get("many", {})
    for lay in many.get("layouts", {}).values():
        r_all = lay.get("ratios", {}).get("nchan", {}).get("p99", {})
        g = lay.get("systems", {}).get("gateway", {})
        best = g.get("max_rate_p99_under_50ms", {}).get("median")
        # The comparison at the highest rate the gateway sustains (p99 < 50 ms): the operating point that matters.
        rate = str(int(best)) if best else (max(r_all, key=int) if r_all else None)
        r = r_all.get(rate) if rate else None
        rows.append([f"p99, {lay['sessions']:,} sessions over {lay['accounts']:,} accounts, same offered rate "
                     f"({_f(float(rate) if rate else None)} ev/s): gateway / nchan", "≤ 1.0x", _ratio(r),
                     _verdict(r["median"] if r else None, 1.0, False)])
        if lay["sessions"] == lay["accounts"] and "4000" in r_all and rate != "4000":
            # Issue 13's operating point: one session per account at 4,000 events/s.
            r = r_all["4000"]
            rows.append([f"p99, {lay['sessions']:,} sessions over {lay['accounts']:,} accounts at 4,000 ev/s "
                         f"({many.get('duration_s', '?')} s steps): gateway / nchan", "≤ 1.0x", _ratio(r),
                         _verdict(r["median"] if r else None, 1.0, False)])
    idle = sc.get("idle", {}).get("runs", {}).get("gateway", {})
    for mode, target in (("plain", 8), ("deflate", 10)):
        run = idle.get(mode)
        if not run:
            continue
        per = run.get("rss_per_conn_marginal") or run["points"][-1]["rss_per_conn"]
        note = ""
        if mode == "deflate":
            n = run["points"][-1]["connections"]
            note = (f" (permessage-deflate negotiated on {run['negotiated']:,} of {n:,})" if run["negotiated"]
                    else " (permessage-deflate **not negotiated**: the gateway does not answer the offer)")
        rows.append([f"idle memory per connection, user space (RSS), {'with' if mode == 'deflate' else 'without'} "
                     f"compression{note}", f"≤ {target} KiB", f"**{per / KIB:.2f} KiB**",
                     _verdict(per / KIB, target, False)])
    slow = sc.get("slow", {}).get("systems", {}).get("gateway")
    if slow:
        r = slow.get("p99_ratio_with_vs_without")
        rows.append(["slow consumers (1% stop reading): others' p99 with / without", "≤ 1.2x", _ratio(r),
                     _verdict(r["median"] if r else None, 1.2, False)])
    return rows


# --- sections ----------------------------------------------------------------------------------------------

def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def section_single(s: dict[str, Any]) -> list[str]:
    lines = ["## 1. Single-account fan-out", "",
             "One account with k sessions; events one at a time (each waits for its last receipt). Deliveries per "
             "CPU-second = deliveries / CPU time the server process used (schedstat), i.e. per core. Wall figures "
             "include the load generator and the machine's other work. Latency: publish → each receipt. "
             + (f"Within a pair the systems take turns every {s['interleave']} events (the order rotating per turn), "
                "so that every system meets the machine's same conditions."
                if s.get("interleave") else "Within a pair each system runs its whole series in turn."), ""]
    gw_ratio = s.get("ratios", {})
    for k in s["ks"]:
        rows = []
        for name in _sorted(s["systems"]):
            d = s["systems"][name]["k"][str(k)]
            lat = d["latency"]
            r = gw_ratio.get(name, {}).get(str(k), {}).get("deliveries_per_cpu_s")
            rows.append([s["systems"][name]["label"], _f(d["deliveries_per_cpu_s"]),
                         "1 (reference)" if name == "gateway" else _ratio(r), _f(d["deliveries_per_s_wall"]),
                         _f(d["publish_to_last_ms"], 2), _ms(lat.get("p50_us")), _ms(lat.get("p99_us")),
                         _ms(lat.get("p999_us")), _ms(lat.get("max_us")), _f(d["missing"])])
        lines += [f"**k = {k:,}**", ""]
        lines += _table(["system", "deliveries per CPU-s", "gateway / system (paired)", "deliveries/s (wall)",
                         "publish→last ms", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "missing"], rows)
        lines.append("")
    if s.get("payload_bytes"):
        sizes = sorted(set(s["payload_bytes"].values()))
        lines += [f"Pushed payload sizes (bytes, mean per system and k): {', '.join(_f(x, 0) for x in sizes)}.", ""]
    return lines


def section_many(s: dict[str, Any]) -> list[str]:
    lines = ["## 2. Many accounts, open loop", "",
             f"Events at a fixed rate for {s['duration_s']} s per step, each to a uniformly chosen account; p99 is the "
             "median over pairs; a step is OK when every delivery arrived and p99 < 50 ms. A system leaves the sweep "
             "after two failing rates in a row (or one with lost deliveries).", ""]
    for _key, lay in s["layouts"].items():
        lines += [f"**{lay['sessions']:,} sessions over {lay['accounts']:,} accounts**", ""]
        names = _sorted(lay["systems"])
        rates = sorted({int(r) for n in names for r in lay["systems"][n]["by_rate"]})
        # Runs before the harness recorded it have no CPU per event: no column of n/a then.
        has_cpu = any(br.get("server_cpu_us_per_event") is not None
                      for n in names for br in lay["systems"][n]["by_rate"].values())
        rows = []
        for rate in rates:
            row = [f"{rate:,}"]
            for n in names:
                br = lay["systems"][n]["by_rate"].get(str(rate))
                if br is None:
                    row.append("—")
                    continue
                mark = "" if br["ok_runs"] == br["runs"] else f" ({br['runs'] - br['ok_runs']}/{br['runs']} failed)"
                row.append(f"{_ms(br['p50_us'])} / {_ms(br['p99_us'])}{mark}")
            ratio = lay.get("ratios", {}).get("nchan", {}).get("p99", {}).get(str(rate))
            row.append(_ratio(ratio) if ratio else "n/a")
            here = [lay["systems"][n]["by_rate"][str(rate)] for n in names if str(rate) in lay["systems"][n]["by_rate"]]
            row.append(_f(max((x["load_cpu_util"] for x in here if x["load_cpu_util"] is not None), default=None), 2))
            # The publisher's own lateness: a late publisher sends a burst, and a burst's last events wait for the
            # ones before them at the server and at the receivers (the tail then measures the load generator).
            row.append(_ms(max((x["pub_lag_p99_us"] for x in here if x.get("pub_lag_p99_us") is not None),
                               default=None)))
            if has_cpu:
                row.append(" / ".join(_f(lay["systems"][n]["by_rate"].get(str(rate), {}).get(
                    "server_cpu_us_per_event"), 0) for n in names))
            rows.append(row)
        cpu_head = ["server CPU µs per event (" + " / ".join(lay["systems"][n]["label"] for n in names) + ")"]
        lines += _table(["offered ev/s", *[f"{lay['systems'][n]['label']} p50/p99 ms" for n in names],
                         "p99 gateway / nchan", "load-generator CPU (max)", "publisher lag p99 ms (max)",
                         *(cpu_head if has_cpu else [])], rows)
        lines += ["", "Highest offered rate with p99 < 50 ms (median over pairs): " + ", ".join(
            f"{lay['systems'][n]['label']} {_f(lay['systems'][n]['max_rate_p99_under_50ms']['median'])} ev/s"
            for n in names) + ".", ""]
    return lines


def section_idle(s: dict[str, Any]) -> list[str]:
    lines = ["## 3. Idle capacity", "",
             "RSS of the server process(es) per idle connection: over the baseline at each size, and the marginal "
             "cost between the two sizes (the best per-connection figure). Kernel: slab bytes machine-wide per "
             "connection, both ends (client and server socket) of the loopback connection counted.", ""]
    rows = []
    for name in _sorted(s["runs"]):
        for mode, run in s["runs"][name].items():
            pts = run["points"]
            neg = "n/a" if mode == "plain" else (f"{run['negotiated']:,}/{pts[-1]['connections']:,}"
                                                   if run["negotiated"] else "not negotiated")
            rows.append([run["label"], mode, *[_f(p["rss_per_conn"] / KIB, 2) for p in pts],
                         _f((run["rss_per_conn_marginal"] or 0) / KIB, 2),
                         _f(pts[-1].get("slab_bytes_per_conn_both_ends", 0) / KIB, 2), neg,
                         _f(sum(p["failed"] for p in pts))])
    sizes = [f"RSS KiB/conn @ {n:,}" for n in s["sizes"]]
    lines += _table(["system", "compression", *sizes, "marginal KiB/conn", "kernel slab KiB/conn (both ends)",
                     "deflate negotiated", "failed"], rows)
    lines.append("")
    return lines


def section_slow(s: dict[str, Any]) -> list[str]:
    lines = ["## 4. Slow consumers", "",
             f"{s['sessions']:,} sessions over {s['accounts']} accounts, {s['slow']} of them "
             f"({s['slow'] / s['sessions']:.0%}) "
             f"stop reading (4 KiB receive buffer, reading paused); {s['rate']:g} events/s; each run with them is "
             f"preceded by an unmeasured fill phase; {s['duration_s']} s measured. Latency of the other sessions.", ""]
    rows = []
    for name in _sorted(s["systems"]):
        v = s["systems"][name]
        for mode in ("without", "with"):
            runs = v["runs"][mode]
            p99 = sorted(r["latency"].get("p99_us") or 0 for r in runs)
            p50 = sorted(r["latency"].get("p50_us") or 0 for r in runs)
            rss = max((r["rss_max"] or 0) for r in runs) if runs else 0
            kmem = [r.get("tcp_mem_bytes_delta") for r in runs if r.get("tcp_mem_bytes_delta") is not None]
            merges = sum(r["gateway_counters"].get("gateway_slow_client_merges_total", 0) for r in runs)
            backlog = max((r.get("server_send_queues") or {}).get("max_bytes", 0) for r in runs) if runs else 0
            closes = sum(r["gateway_counters"].get("gateway_slow_client_closes_total", 0) for r in runs)
            rows.append([v["label"], mode, _ms(p50[len(p50) // 2] if p50 else None),
                         _ms(p99[len(p99) // 2] if p99 else None), _f((rss - v["baseline_rss"]) / KIB / KIB, 1),
                         _f(max(kmem) / KIB / KIB, 1) if kmem else "n/a", _f(backlog / KIB, 0),
                         _f(merges) if v["label"].startswith("jmap") else "n/a",
                         _f(closes) if v["label"].startswith("jmap") else "n/a"])
        rows.append([v["label"], "**with / without**", _ratio(v.get("p50_ratio_with_vs_without")),
                     _ratio(v.get("p99_ratio_with_vs_without")), "", "", "", "", ""])
    lines += _table(["system", "slow consumers", "others p50 ms", "others p99 ms", "RSS growth MiB (max)",
                     "kernel TCP memory growth MiB", "largest kernel send queue KiB", "merged pushes",
                     "1013 closes"], rows)
    lines.append("")
    return lines


def section_e2e(s: dict[str, Any]) -> list[str]:
    lines = ["## 5. End to end: RabbitMQ and the memory bus", "",
             f"The same gateway with GATEWAY_BUS=memory (events via POST /admin/events) and GATEWAY_BUS=amqp (James "
             f"StateChangeEvents published to jmapEvent-exchange with aio-pika). Broker: {s.get('broker')}.", ""]
    rows = []
    for name in _sorted(s["systems"]):
        v = s["systems"][name]
        for k in s["k"]:
            lat = v["fanout_latency"][f"k{k}"]
            rows.append([v["label"], f"1 account x {k:,}", _f(v["publish_to_last_ms"][f"k{k}"], 2),
                         _ms(lat.get("p50_us")), _ms(lat.get("p99_us")), _ms(lat.get("max_us"))])
        rows.append([v["label"], f"{s['accounts']:,} accounts, {s['rate']:g} ev/s", "", _ms(v["rate_p50_us"]),
                     _ms(v["rate_p99_us"]), ""])
    lines += _table(["system", "load", "publish→last ms", "p50 ms", "p99 ms", "max ms"], rows)
    r = s.get("ratios_amqp_vs_memory")
    if r:
        lines += ["", "amqp / memory (paired): " + ", ".join(f"{k} {_ratio(v)}" for k, v in r.items()) + "."]
    lines.append("")
    return lines


def section_churn(s: dict[str, Any]) -> list[str]:
    lines = ["## 6. Connection churn", "",
             f"Upgrade then close at once, {s['concurrency']} loops in parallel, {s['duration_s']} s per run. The "
             "gateway authenticates every upgrade (Basic) and requires the `jmap` subprotocol; the peers do no "
             "authentication.", ""]
    rows = []
    for name in _sorted(s["systems"]):
        v = s["systems"][name]
        r = s.get("ratios", {}).get(name, {})
        rows.append([v["label"], _f(v["upgrades_per_s"]), _f(v["upgrades_per_cpu_s"]),
                     "1 (reference)" if name == "gateway" else _ratio(r.get("upgrades_per_cpu_s")),
                     _f(v["server_cpu_util"], 2), _f(v["load_cpu_util"], 2),
                     _f(sum(x["failed"] for x in v["runs"]))])
    lines += _table(["system", "upgrades/s (wall)", "upgrades per CPU-s", "gateway / system per CPU-s",
                     "server CPU util", "load CPU util", "failed"], rows)
    lines.append("")
    return lines


def section_profile(s: dict[str, Any]) -> list[str]:
    lines = ["## Profile of the gateway under single-account fan-out", "",
             f"py-spy (native frames, 250 Hz) for {s.get('seconds')} s, {s.get('events')} events to "
             f"{s.get('k'):,} sessions, {_f(s.get('deliveries_per_cpu_s'))} deliveries per CPU-s while profiled; "
             f"{_f(s.get('samples'))} samples.", ""]
    if s.get("top_self"):
        lines += _table(["frame (self time)", "% of samples"], [[f"`{f[:110]}`", _f(p, 1)] for f, p in
                                                               s["top_self"][:15]])
        lines.append("")
    return lines


# --- plots -------------------------------------------------------------------------------------------------

def plots(results: dict[str, Any], out: Path, prefix: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    sc = results.get("scenarios", {})
    single = sc.get("single", {})
    if "systems" in single:
        ks = [k for k in single["ks"] if k >= 100] or single["ks"]
        fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
        for ax, k in zip(axes[0], ks, strict=False):
            for name in _sorted(single["systems"]):
                cdf = single["systems"][name]["k"][str(k)]["cdf"]
                if cdf:
                    # A logit y axis spreads the tail (p99, p99.9) that a linear axis squashes against 100.
                    pts = [(v / 1000, min(max(p / 100, 0.001), 0.9999)) for p, v in cdf]
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker=".",
                            label=single["systems"][name]["label"], color=COLORS.get(name))
            ax.set_xscale("log")
            ax.set_yscale("logit")
            ax.set_xlabel("publish → receipt (ms)")
            ax.set_ylabel("fraction of deliveries")
            ax.set_title(f"1 account x {k:,} sessions")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{prefix}latency-cdf.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
        fig, ax = plt.subplots(figsize=(7, 4))
        names = _sorted(single["systems"])
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            vals = [single["systems"][name]["k"][str(k)]["deliveries_per_cpu_s"] or 0 for k in single["ks"]]
            ax.bar([j + i * width for j in range(len(single["ks"]))], vals, width,
                   label=single["systems"][name]["label"], color=COLORS.get(name))
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(single["ks"]))])
        ax.set_xticklabels([f"k={k:,}" for k in single["ks"]])
        ax.set_ylabel("deliveries per CPU-second (one core)")
        ax.set_title("Single-account fan-out: deliveries per core")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"{prefix}deliveries-per-core.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    many = sc.get("many", {})
    if many.get("layouts"):
        lays = list(many["layouts"].values())
        fig, axes = plt.subplots(2, len(lays), figsize=(6 * len(lays), 7), squeeze=False)
        for col, lay in enumerate(lays):
            for name in _sorted(lay["systems"]):
                br = lay["systems"][name]["by_rate"]
                rates = sorted(int(r) for r in br)
                axes[0][col].plot(rates, [(br[str(r)]["p99_us"] or 0) / 1000 for r in rates], marker="o",
                                  label=lay["systems"][name]["label"], color=COLORS.get(name))
                # Every delivery arrives in the end (or the step failed), so received/s only mirrors the offered
                # rate; the server's CPU per second shows how much of its one core each rate costs.
                axes[1][col].plot(rates, [br[str(r)]["server_cpu_util"] or 0 for r in rates], marker="o",
                                  label=lay["systems"][name]["label"], color=COLORS.get(name))
            axes[0][col].axhline(50, color="red", linestyle="--", linewidth=0.8)
            axes[1][col].axhline(1.0, color="red", linestyle="--", linewidth=0.8)
            for row, ylabel in ((0, "p99 latency (ms)"), (1, "server CPU (cores used)")):
                ax = axes[row][col]
                ax.set_xscale("log")
                ax.set_yscale("log" if row == 0 else "linear")
                ax.set_xlabel("offered events/s")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            axes[0][col].set_title(f"{lay['sessions']:,} sessions / {lay['accounts']:,} accounts")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{prefix}many-accounts-rate.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    idle = sc.get("idle", {})
    if idle.get("runs"):
        names = _sorted(idle["runs"])
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, mode in enumerate(("plain", "deflate")):
            vals = [(idle["runs"][n].get(mode, {}).get("rss_per_conn_marginal") or 0) / KIB for n in names]
            ax.bar([j + i * 0.4 for j in range(len(names))], vals, 0.4,
                   label="without compression" if mode == "plain" else "permessage-deflate offered")
        ax.axhline(8, color="red", linestyle="--", linewidth=0.8, label="target 8 KiB (plain)")
        ax.axhline(10, color="darkred", linestyle=":", linewidth=0.8, label="target 10 KiB (deflate)")
        ax.set_xticks([j + 0.2 for j in range(len(names))])
        ax.set_xticklabels([next(iter(idle["runs"][n].values()))["label"] for n in names], fontsize=8)
        ax.set_ylabel("server RSS per idle connection (KiB)")
        ax.set_title("Idle memory per connection (marginal, 1k → 10k)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"{prefix}idle-memory.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    return written


def write(results: dict[str, Any], out: Path, quick: bool = False) -> Path:
    prefix = "fanout-quick-" if quick else "fanout-"
    sc = results.get("scenarios", {})
    m = results.get("machine", {})
    lines = [f"# Fan-out harness results{' (quick mode)' if quick else ''}", "",
             f"Run {results.get('started')}, {results.get('seconds', 0) / 60:.1f} min, {results.get('pairs')} pairs "
             f"per figure; server cores {results.get('server_cpus')}, load-generator cores {results.get('load_cpus')}"
             f", {results.get('workers')} load processes. Machine: {m.get('cpu')}, {m.get('cpus')} CPUs, Linux "
             f"{m.get('kernel')}, Python {m.get('python')}; {m.get('nginx')}, node {m.get('node')} (ws "
             f"{m.get('ws')}), websockets {m.get('websockets')}, picows {m.get('picows')}, uvloop {m.get('uvloop')}.",
             "", f"Command: `{results.get('command')}`", ""]
    if results.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in results["skipped"].items()), ""]
    loads = {n: s.get("loadavg") for n, s in sc.items() if s.get("loadavg")}
    if loads:
        lines += ["Machine load average (1 min) before → after each scenario: " + ", ".join(
            f"{n} {v['before'][0] if v['before'] else '?'} → {v['after'][0] if v['after'] else '?'}"
            for n, v in loads.items()) + ".", ""]
    rows = targets(results)
    if rows:
        lines += ["## The issue's targets", "", "Ratios are medians of paired ratios (each pair measured moments "
                  "apart, order alternating).", ""]
        lines += _table(["target", "wanted", "measured", "verdict"], rows)
        lines.append("")
    for name, fn in (("single", section_single), ("many", section_many), ("idle", section_idle),
                     ("slow", section_slow), ("e2e", section_e2e), ("churn", section_churn),
                     ("profile", section_profile)):
        s = sc.get(name)
        if not s:
            continue
        if "error" in s:
            lines += [f"## {name}: failed", "", "```", s["error"][-1500:], "```", ""]
            continue
        try:
            lines += fn(s)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            lines += [f"## {name}: cannot render ({type(exc).__name__}: {exc})", ""]
    pngs = plots(results, out, prefix)
    if pngs:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    path = out / f"{prefix}results.md"
    path.write_text("\n".join(lines))
    return path
