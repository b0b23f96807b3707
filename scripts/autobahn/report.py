"""Helper of scripts/autobahn.sh: writes the fuzzing client's spec files and judges the report it produces.

`spec` fills in scripts/autobahn/fuzzingclient.json (port, output directory) and, for parallel runs, splits its
case patterns over several specs. `summary` reads every index.json under the report directory, prints the counts
per case group and every case that is not plainly OK, and exits non-zero when the run does not conform.
Python 3 standard library only (it runs on the gateway's interpreter, not on wstest's Python 2.7).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

# Autobahn|Testsuite's verdicts (autobahntestsuite/case/case.py). The rule: every case's behaviour
# must be one of these.
ACCEPTED = ("OK", "NON-STRICT", "INFORMATIONAL")
COLUMNS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
# Closing behaviour: the report colours UNCLEAN and FAILED red (a failure); WRONG CODE and FAILED BY CLIENT
# yellow (listed here, but no failure, as in the report).
CLOSE_FAILURES = ("UNCLEAN", "FAILED")

GROUPS = {
    "1": "Framing",
    "2": "Pings/Pongs",
    "3": "Reserved bits",
    "4": "Opcodes",
    "5": "Fragmentation",
    "6": "UTF-8 handling",
    "7": "Close handling",
    "9": "Limits/performance",
    "12": "permessage-deflate: payloads",
    "13": "permessage-deflate: parameters",
}
# Sub-groups of the long chapters, and the seconds each took in one sequential run (2 cores, 2026-11): used only
# to balance parallel jobs, so rough figures do.
WEIGHTS = {
    "1.*": 1, "2.*": 1, "3.*": 1, "4.*": 1, "5.*": 1, "6.*": 4, "7.*": 2, "9.*": 5,
    "12.1.*": 23, "12.2.*": 75, "12.3.*": 129, "12.4.*": 38, "12.5.*": 107,
    "13.1.*": 57, "13.2.*": 49, "13.3.*": 41, "13.4.*": 44, "13.5.*": 34, "13.6.*": 47, "13.7.*": 34,
}


def case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split("."))


def expand(pattern: str) -> list[str]:
    """'12.*' -> its sub-group patterns, so that a long chapter can be spread over several jobs."""
    subs = [p for p in WEIGHTS if p != pattern and p.startswith(pattern[:-1])] if pattern.endswith(".*") else []
    return subs or [pattern]


def split(patterns: list[str], jobs: int) -> list[list[str]]:
    """Longest-processing-time-first: each pattern to the job with the least work so far."""
    parts = sorted((p for pattern in patterns for p in expand(pattern)), key=lambda p: -WEIGHTS.get(p, 10))
    bins: list[tuple[int, list[str]]] = [(0, []) for _ in range(max(1, min(jobs, len(parts))))]
    for p in parts:
        i = min(range(len(bins)), key=lambda j: bins[j][0])
        load, members = bins[i]
        bins[i] = (load + WEIGHTS.get(p, 10), [*members, p])
    return [members for _, members in bins]


def cmd_spec(args: argparse.Namespace) -> int:
    template = json.loads(Path(args.template).read_text())
    patterns = args.cases or template["cases"]
    parts = split(patterns, args.jobs) if args.jobs > 1 else [patterns]
    workdir = Path(args.workdir)
    for n, cases in enumerate(parts, 1):
        spec = json.loads(json.dumps(template).replace("@PORT@", str(args.port)))
        spec["cases"] = cases
        spec["outdir"] = str(Path(args.reportdir) / (f"part{n}" if len(parts) > 1 else ""))
        path = workdir / f"fuzzingclient-{n}.json"
        path.write_text(json.dumps(spec, indent=2) + "\n")
        print(path)
    return 0


def load_results(reportdir: Path) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for index in sorted(reportdir.rglob("index.json")):
        for agent_cases in json.loads(index.read_text()).values():
            for case_id, result in agent_cases.items():
                results[case_id] = {**result, "_dir": index.parent}
    return results


def load_known(path: Path | None) -> dict[str, str]:
    """known-failures.txt: `<case id>  # why`, one per line."""
    known: dict[str, str] = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            case_id, _, why = line.partition("#")
            if case_id.strip():
                known[case_id.strip()] = why.strip()
    return known


def detail(result: dict[str, Any]) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((result["_dir"] / result["reportfile"]).read_text())
        return data
    except (OSError, ValueError, KeyError):
        return {}


def cmd_summary(args: argparse.Namespace) -> int:
    reportdir = Path(args.reportdir)
    results = load_results(reportdir)
    known = load_known(Path(args.known) if args.known else None)
    expected_groups = [p.split(".")[0] for p in args.expect or []]

    counts: dict[str, Counter[str]] = defaultdict(Counter)
    seconds: Counter[str] = Counter()
    notes: list[tuple[str, dict[str, Any], str]] = []
    failures: list[str] = []
    for case_id in sorted(results, key=case_key):
        r = results[case_id]
        group = case_id.split(".")[0]
        behavior, close = r["behavior"], r["behaviorClose"]
        counts[group][behavior if behavior in COLUMNS else "other"] += 1
        seconds[group] += r.get("duration", 0) / 1000
        bad = behavior not in ACCEPTED or close in CLOSE_FAILURES
        if behavior != "OK" or close != "OK":
            verdict = "FAIL" if bad and case_id not in known else "known" if bad else "pass"
            notes.append((case_id, r, verdict))
        if bad and case_id not in known:
            failures.append(case_id)
    missing = [g for g in expected_groups if g not in counts]

    cols = (*COLUMNS, "other")
    head = f"{'group':<34}" + "".join(f"{c:>{len(c) + 2}}" for c in (*cols, "seconds"))
    print(f"\nAutobahn|Testsuite fuzzing client, {len(results)} cases ({reportdir})\n")
    print(head)
    print("-" * len(head))
    total: Counter[str] = Counter()
    for group in sorted(counts, key=int):
        total.update(counts[group])
        name = f"{group} {GROUPS.get(group, '')}"
        print(f"{name:<34}" + "".join(f"{counts[group][c]:>{len(c) + 2}}" for c in cols)
              + f"{seconds[group]:>9.1f}")
    print("-" * len(head))
    print(f"{'total':<34}" + "".join(f"{total[c]:>{len(c) + 2}}" for c in cols)
          + f"{sum(seconds.values()):>9.1f}")

    if notes:
        print("\nCases that are not plainly OK (behaviour / closing behaviour, close code the server sent):")
        for case_id, r, verdict in notes:
            d = detail(r)
            reason = d.get("remoteCloseReason") or ""
            print(f"  [{verdict:>5}] {case_id:<9} {r['behavior']} / {r['behaviorClose']}, "
                  f"close {r.get('remoteCloseCode')}{' ' + repr(reason) if reason else ''}")
            print(f"            {d.get('result', '')} / {d.get('resultClose', '')}")
            if verdict == "known":
                print(f"            known failure: {known[case_id]}")
    still_failing = {case_id for case_id, _, verdict in notes if verdict == "known"}
    gone = sorted((c for c in known if c in results and c not in still_failing), key=case_key)
    for case_id in gone:
        print(f"\nnote: {case_id} is listed in {args.known} but conforms in this run; remove it from that list "
              "if it keeps passing.")

    if args.markdown:
        write_markdown(Path(args.markdown), counts, seconds, notes, known)

    if missing:
        print(f"\nFAILED: no results for case group(s) {', '.join(missing)} (did wstest crash?)")
        return 1
    if not results:
        print("\nFAILED: no results at all")
        return 1
    if failures:
        print(f"\nFAILED: {len(failures)} case(s) not OK, NON-STRICT or INFORMATIONAL: {', '.join(failures)}")
        return 1
    print("\nPASSED: every case is OK, NON-STRICT or INFORMATIONAL"
          + (f", except the known failure(s) {', '.join(sorted(still_failing, key=case_key))}"
             if still_failing else ""))
    return 0


def write_markdown(path: Path, counts: dict[str, Counter[str]], seconds: Counter[str],
                   notes: list[tuple[str, dict[str, Any], str]], known: dict[str, str]) -> None:
    lines = ["| group | " + " | ".join(COLUMNS) + " | other | seconds |",
             "|---|" + "---:|" * (len(COLUMNS) + 2)]
    total: Counter[str] = Counter()
    for group in sorted(counts, key=int):
        total.update(counts[group])
        lines.append(f"| {group} {GROUPS.get(group, '')} | "
                     + " | ".join(str(counts[group][c]) for c in (*COLUMNS, "other"))
                     + f" | {seconds[group]:.0f} |")
    lines.append("| **total** | " + " | ".join(f"**{total[c]}**" for c in (*COLUMNS, "other"))
                 + f" | **{sum(seconds.values()):.0f}** |")
    lines += ["", "| case | behaviour | closing behaviour | close code sent | verdict |", "|---|---|---|---|---|"]
    for case_id, r, verdict in notes:
        lines.append(f"| {case_id} | {r['behavior']} | {r['behaviorClose']} | {r.get('remoteCloseCode')} "
                     f"| {verdict} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    spec = sub.add_parser("spec", help="write the fuzzing client spec file(s); prints their paths")
    spec.add_argument("--template", required=True)
    spec.add_argument("--port", type=int, required=True)
    spec.add_argument("--workdir", required=True)
    spec.add_argument("--reportdir", required=True)
    spec.add_argument("--jobs", type=int, default=1)
    spec.add_argument("cases", nargs="*", help="case patterns (default: the template's)")
    spec.set_defaults(func=cmd_spec)
    summary = sub.add_parser("summary", help="judge the report")
    summary.add_argument("reportdir")
    summary.add_argument("--known", help="known-failures file")
    summary.add_argument("--expect", nargs="*", help="case patterns that must have results")
    summary.add_argument("--markdown", help="also write the tables as Markdown to this file")
    summary.set_defaults(func=cmd_summary)
    args = parser.parse_args()
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
