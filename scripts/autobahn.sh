#!/usr/bin/env bash
# WebSocket conformance: Autobahn|Testsuite's fuzzing client against `python -m gateway.tools.echo`, the gateway's
# own transport stack (picows, coalescer, permessage-deflate, limits) without JMAP. Cases 1-7, 9 and 12-13.
# Prints a summary per case group and fails unless every case is OK, NON-STRICT or INFORMATIONAL (issue 4).
# Results and how to read them: docs/conformance.md. The HTML report stays in .autobahn/report/ (not committed).
#
# usage: scripts/autobahn.sh [case pattern ...]     default: the cases of scripts/autobahn/fuzzingclient.json
#        e.g. scripts/autobahn.sh '7.*' 12.1.1
#
# wstest (autobahntestsuite) runs on Python 2.7 only. The script makes an isolated virtualenv for it in
# .autobahn/venv with the pins of scripts/autobahn/requirements-py27.txt (made once, reused while the pins and the
# interpreter stay the same; needs PyPI, a C compiler and the Python 2.7 headers).
#
# environment:
#   PYTHON27          Python 2.7 for wstest (default: pyenv's 2.7.18, else python2.7 on PATH)
#   GATEWAY_PYTHON    Python of the gateway (default: .venv/bin/python); the native modules must be built
#   AUTOBAHN_DIR      work directory (default: .autobahn): venv/, report/, spec files and logs
#   AUTOBAHN_PORT     port of the echo server (default: 0, a free port)
#   AUTOBAHN_JOBS     wstest processes run in parallel, each on a share of the cases (default: 4)
#   AUTOBAHN_TIMEOUT  seconds after which wstest is stopped (default: 3600)
#   GATEWAY_*         passed on to the echo server (e.g. GATEWAY_DEFLATE_LEVEL, GATEWAY_DEFLATE_MIN_BYTES)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/scripts/autobahn
GATEWAY_PYTHON=${GATEWAY_PYTHON:-$ROOT/.venv/bin/python}
case $GATEWAY_PYTHON in /*|"") ;; */*) GATEWAY_PYTHON=$PWD/$GATEWAY_PYTHON ;; esac
cd "$ROOT"

WORK=${AUTOBAHN_DIR:-$ROOT/.autobahn}
case $WORK in /*) ;; *) WORK=$ROOT/$WORK ;; esac
VENV=$WORK/venv
REPORT=$WORK/report
REQUIREMENTS=$HERE/requirements-py27.txt
VIRTUALENV_PIN="virtualenv==16.7.12"  # the last single-file virtualenv; runs on 2.7 and bundles pip 20.3.4
JOBS=${AUTOBAHN_JOBS:-4}
TIMEOUT=${AUTOBAHN_TIMEOUT:-3600}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1 PYTHONWARNINGS=ignore

say() { printf '[autobahn] %s\n' "$*"; }
die() { printf '[autobahn] ERROR: %s\n' "$*" >&2; exit 2; }

start=$(date +%s)

# --- Python 2.7 --------------------------------------------------------------------------------------------------
find_python27() {
    local candidates=()
    [[ -n ${PYTHON27:-} ]] && { echo "$PYTHON27"; return; }
    if command -v pyenv >/dev/null 2>&1; then candidates+=("$(pyenv root)/versions/2.7.18/bin/python"); fi
    candidates+=("${PYENV_ROOT:-$HOME/.pyenv}/versions/2.7.18/bin/python")
    for c in "${candidates[@]}"; do [[ -x $c ]] && { echo "$c"; return; }; done
    command -v python2.7 || true
}
PY27=$(find_python27)
if [[ -z $PY27 || ! -x $PY27 ]]; then
    die "no Python 2.7 found (wstest, Autobahn|Testsuite's client, runs only on Python 2.7).
  Looked for \$PYTHON27, pyenv's 2.7.18 (\${PYENV_ROOT:-~/.pyenv}/versions/2.7.18) and python2.7 on PATH.
  Install one, e.g. \`pyenv install 2.7.18\`, or point PYTHON27 at a python2.7 binary. Conformance was NOT tested."
fi
version=$("$PY27" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
[[ $version == 2.7 ]] || die "$PY27 is Python '${version:-?}', not 2.7 (set PYTHON27)"

# --- wstest's virtualenv, made once ------------------------------------------------------------------------------
stamp="$("$PY27" -c 'import sys; print(sys.executable)') $VIRTUALENV_PIN $(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [[ ! -x $VENV/bin/wstest || $(cat "$VENV/.installed" 2>/dev/null) != "$stamp" ]]; then
    say "creating the Python 2.7 environment for wstest in $VENV ($PY27)"
    rm -rf "$VENV" "$WORK/bootstrap"
    mkdir -p "$WORK"
    # virtualenv goes into a private directory, not into the interpreter's site-packages.
    "$PY27" -m pip install -q --target "$WORK/bootstrap" "$VIRTUALENV_PIN" \
        || die "could not install $VIRTUALENV_PIN for $PY27"
    PYTHONPATH=$WORK/bootstrap "$PY27" -m virtualenv -q --no-download "$VENV" || die "virtualenv failed"
    # Every dependency is pinned in the file: no resolution, so nothing newer than Python 2.7 can slip in.
    "$VENV/bin/pip" install -q --no-deps -r "$REQUIREMENTS" || die "installing $REQUIREMENTS failed"
    "$VENV/bin/pip" check || die "the pinned set in $REQUIREMENTS is inconsistent"
    echo "$stamp" > "$VENV/.installed"
fi
"$VENV/bin/wstest" -a >/dev/null 2>&1 || die "wstest in $VENV does not start; delete $VENV to rebuild it"

# --- the echo server ---------------------------------------------------------------------------------------------
[[ -x $GATEWAY_PYTHON ]] || die "no gateway Python at $GATEWAY_PYTHON (run \`make native\`, or set GATEWAY_PYTHON)"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# The run must test the compiled hot path that production runs (GATEWAY_REQUIRE_NATIVE=1 in the Dockerfile).
PYTHONWARNINGS= "$GATEWAY_PYTHON" -c 'from gateway import native; native.require_all()' \
    || die "the gateway's native modules are not importable: run \`make native\` first"

mkdir -p "$WORK"
rm -rf "$REPORT"
SERVER_LOG=$WORK/server.log
server_pid=""
wstest_pids=()
cleanup() {
    local pid
    for pid in "${wstest_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

GATEWAY_PORT=${AUTOBAHN_PORT:-0} GATEWAY_HOST=127.0.0.1 PYTHONWARNINGS= \
    "$GATEWAY_PYTHON" -m gateway.tools.echo >"$SERVER_LOG" 2>&1 &
server_pid=$!
port=""
for _ in $(seq 300); do
    port=$(sed -n 's|^echo server listening on ws://[^/]*:\([0-9]*\)/.*|\1|p' "$SERVER_LOG")
    [[ -n $port ]] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$SERVER_LOG" >&2; die "the echo server did not start"; }
    sleep 0.1
done
[[ -n $port ]] || { cat "$SERVER_LOG" >&2; die "the echo server did not say which port it listens on"; }
impl=$(grep -o 'coalescer: [a-z]*, broadcast: [a-z]*' "$SERVER_LOG" || true)
say "echo server (pid $server_pid) on ws://127.0.0.1:$port/jmap/ws; $impl"

# --- the fuzzing client ------------------------------------------------------------------------------------------
mapfile -t specs < <("$GATEWAY_PYTHON" "$HERE/report.py" spec --template "$HERE/fuzzingclient.json" --port "$port" \
    --workdir "$WORK" --reportdir "$REPORT" --jobs "$JOBS" "$@")
patterns=("$@")
[[ ${#patterns[@]} -gt 0 ]] || mapfile -t patterns < <("$GATEWAY_PYTHON" -c \
    'import json, sys; print("\n".join(json.load(open(sys.argv[1]))["cases"]))' "$HERE/fuzzingclient.json")
say "wstest $("$VENV/bin/wstest" -a 2>/dev/null | tr -s '\n ' ' ')"
say "cases ${patterns[*]} in ${#specs[@]} job(s); report in $REPORT"
rm -f "$WORK"/wstest-*.log
for i in "${!specs[@]}"; do
    timeout --signal=TERM "$TIMEOUT" "$VENV/bin/wstest" -m fuzzingclient -s "${specs[$i]}" \
        >"$WORK/wstest-$((i + 1)).log" 2>&1 &
    wstest_pids+=($!)
done
status=0
ticks=0
while :; do
    alive=0
    for pid in "${wstest_pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 1 ]] || break
    sleep 1
    if (( ++ticks % 30 == 0 )); then
        say "$(cat "$WORK"/wstest-*.log | grep -c '^Running test case' || true) cases started, $((ticks / 60)) min"
    fi
    kill -0 "$server_pid" 2>/dev/null || break
done
if ! kill -0 "$server_pid" 2>/dev/null; then
    tail -n 30 "$SERVER_LOG" >&2
    die "the echo server died during the run (log: $SERVER_LOG)"  # the EXIT trap stops wstest
fi
for pid in "${wstest_pids[@]}"; do wait "$pid" || status=$?; done
wstest_pids=()
cleanup
if [[ $status != 0 ]]; then
    tail -n 20 "$WORK"/wstest-*.log >&2
    die "wstest exited with status $status$([[ $status == 124 ]] && echo " (timeout after ${TIMEOUT}s)")"
fi

# --- verdict -----------------------------------------------------------------------------------------------------
set +e
"$GATEWAY_PYTHON" "$HERE/report.py" summary "$REPORT" --known "$HERE/known-failures.txt" \
    --expect "${patterns[@]}" --markdown "$WORK/summary.md"
verdict=$?
set -e
elapsed=$(( $(date +%s) - start ))
html=$REPORT/index.html
[[ ${#specs[@]} -gt 1 ]] && html="$REPORT/part*/index.html"
say "took $((elapsed / 60)) min $((elapsed % 60)) s; HTML report: $html"
exit $verdict
