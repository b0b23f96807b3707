"""Command-line entry point (`python -m gateway`, `jmap-gateway [run | settings | check]`): settings, logging
(text or JSON lines), event loop, signals, and with GATEWAY_WORKERS > 1 the supervisor of the worker processes.

A bad setting exits with status 2 and one line naming the variable, the value and what is allowed; a gateway
that cannot start (RabbitMQ unreachable, port taken) exits with status 1 and one line saying why.

Several workers (decisions):
- The parent is a supervisor only: it holds no sockets of clients, runs no gateway and no bus node. Each worker
  is a fresh interpreter (`python -m gateway --worker N --control-fd FD`, not a fork: no inherited event loop,
  threads or SQLite handles), a complete gateway and its own bus node (own node id, own queue).
- The port: the parent binds it first with SO_REUSEPORT (without listening, so the kernel never routes a
  connection to it) and hands the bound number to the workers, which listen on it with SO_REUSEPORT. That makes
  GATEWAY_PORT=0 work with several workers, reports a port in use once and early, and keeps the port reserved
  while a worker is being restarted. The start-up line is printed once, by the parent, when every worker listens.
- GATEWAY_BUS=memory with several workers is refused (status 2): a change committed or injected on one worker
  would never reach sessions held by another, a silent loss (except in front mode with
  GATEWAY_UPSTREAM_EVENTS=eventsource: each worker reads the upstream's streams for its own sessions). So is the
  embedded backend on `:memory:`, which would give every worker a store of its own.
- The embedded backend's SMTP listener runs in worker 1 only (one port, one process); the SQLite file is shared
  (WAL, one writer at a time). Worker 1 starts alone first, so it also creates a new database without racing.
- A worker that dies unexpectedly is logged and restarted (exponential back-off while it keeps dying young);
  the others keep serving meanwhile and its clients reconnect and resume from their pushState. A worker that
  cannot start during the initial start fails the whole start with its status.
- SIGTERM/SIGINT to the parent is forwarded (SIGTERM) to every worker, which shuts down gracefully (in-flight
  requests, then close 1001); the parent exits 0 once all have exited cleanly, 1 if one had to be killed.
  A worker whose parent vanishes (its control socket reaches end-of-file) shuts down the same way.
- Each worker has a control channel to the parent (a socket pair, gateway.group): it says when it is ready, and
  carries what makes the group look like one gateway: one /metrics page for all workers, whichever takes the
  scrape, and delegations granted through one worker applied by all of them (kept in the shared database).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import uvloop
from pythonjsonlogger.json import JsonFormatter

from gateway import native, preflight
from gateway.config import ConfigError, Settings, load
from gateway.errors import GatewayError, ListenError
from gateway.group import Channel, GroupHub, WorkerLink
from gateway.logs import install_redaction, settings_secrets
from gateway.sharing import Sharing

log = logging.getLogger(__name__)

# A worker that lived at least this long before dying is restarted at once; one dying younger backs off.
HEALTHY_AFTER = 60.0
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Beyond GATEWAY_SHUTDOWN_GRACE, the time a worker gets to close its sockets and its bus node.
STOP_MARGIN = 15.0


# Libraries whose INFO lines are noise for an operator (aiosmtpd: 2-3 per SMTP connection; picows: every accepted
# connection, at 100k connections; httpx: every upstream event stream opened): shown from WARNING, or all with DEBUG.
THIRD_PARTY_LOGGERS = ("mail", "picows", "aiohttp", "httpx", "httpcore")
_json_logging = False  # set by configure_logging: fatal() then writes its line as a JSON object too


class JsonLines(JsonFormatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, then the record's own fields
    (`extra=`, e.g. username), and `exc_info` with the traceback of an exception."""

    def __init__(self, fields: Mapping[str, object] | None = None) -> None:
        super().__init__(["levelname", "name", "message"], rename_fields={"levelname": "level", "name": "logger"},
                         static_fields=dict(fields or {}))

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)


def configure_logging(level: str, tag: str = "", fmt: str = "text", fields: Mapping[str, object] | None = None,
                      secrets: Iterable[str] = ()) -> None:
    """Log to stderr: `text` lines (with `[tag] ` before the logger name) or `json` lines (with `fields`); no
    credential in any line, whoever logs it (gateway.logs)."""
    global _json_logging
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonLines(fields))
    else:
        prefix = f"[{tag}] " if tag else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    install_redaction(secrets)
    _json_logging = fmt == "json"
    quiet = logging.DEBUG if level == "DEBUG" else max(logging.WARNING, logging.getLevelName(level))
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


def fatal(message: str) -> None:
    """The one line that says why the process stops: a JSON object when the logs are JSON, else plain text."""
    if _json_logging:
        log.critical(message)
    else:
        print(f"jmap-gateway: {message}", file=sys.stderr, flush=True)


def start_up_line(settings: Settings, port: int, workers: int = 1) -> str:
    """The line tests and operators read: `... listening on http://host:port (WebSocket ws://.../jmap/ws)`."""
    base = settings.base_url(port)
    extra = f", {workers} workers" if workers > 1 else ""
    return f"jmap-push-gateway listening on {base} (WebSocket ws{base.removeprefix('http')}/jmap/ws{extra})"


def refusal(settings: Settings) -> str | None:
    """Why these settings cannot run with GATEWAY_WORKERS > 1 (one line), or None."""
    n = settings.workers
    if n <= 1:
        return None
    if settings.bus == "memory" and settings.upstream_events != "eventsource":  # (each worker reads its streams)
        return (f"GATEWAY_WORKERS={n} needs GATEWAY_BUS=amqp: with the in-process memory bus a change on one "
                "worker would never reach the sessions held by the others")
    if not settings.upstream_url and settings.db_path == ":memory:":  # front mode has no embedded store
        return (f"GATEWAY_WORKERS={n} cannot share GATEWAY_DB=:memory: (every worker would have a mail store of "
                "its own): use a database file")
    return None


# --- one gateway process (the only one, or a worker) -----------------------------------------------------

@dataclass(frozen=True)
class WorkerRole:
    """What the supervisor told a worker on its command line."""

    index: int  # 1-based, for logs
    control_fd: int  # the worker's end of its control channel (gateway.group); EOF there: the parent died


async def serve(settings: Settings, worker: WorkerRole | None = None) -> None:
    from gateway.app import Gateway

    gateway = Gateway(settings)
    stop = asyncio.Event()
    link: WorkerLink | None = None
    if worker is not None:
        # Wired before the gateway listens: its first /metrics and its first delegation already use the group.
        sharing = gateway.role.delegations if isinstance(gateway.role.delegations, Sharing) else None
        link = WorkerLink(gateway.metrics.registry, sharing)

        def parent_gone() -> None:
            log.warning("the supervisor is gone; shutting down")
            stop.set()

        await link.connect(socket.socket(fileno=worker.control_fd), parent_gone)
        gateway.metrics.gather = link.page
        if sharing is not None:
            sharing.announce = link.announce
    try:
        await gateway.start()
    except (GatewayError, OSError) as exc:
        # e.g. RabbitMQ unreachable or the port taken: one clear line, then a non-zero exit.
        with contextlib.suppress(Exception):
            await gateway.stop(grace=0)
        where = f" (worker {worker.index})" if worker else ""
        fatal(f"cannot start{where}: {exc}")
        raise SystemExit(1) from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if link is None:
        print(start_up_line(settings, gateway.port), flush=True)
    else:
        link.ready(gateway.node_id)
    await stop.wait()
    log.info("shutting down")
    drained = await gateway.stop()
    if link is not None:
        await link.close()
    log.info("stopped: %d in-flight requests finished, %d cancelled; %d sockets closed", *drained,
             extra=drained._asdict())


# --- the supervisor (GATEWAY_WORKERS > 1) --------------------------------------------------------------

def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (host, port) with SO_REUSEPORT and do not listen: fixes the port for every worker."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _Worker:
    __slots__ = ("index", "proc", "ready_at")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.ready_at = 0.0


class Supervisor:
    """Starts GATEWAY_WORKERS workers on one port, restarts those that die, stops them all on a signal; between
    them, the group's control channels (gateway.group: one /metrics, delegations on every worker)."""

    def __init__(self, settings: Settings, argv0: Sequence[str] = (sys.executable, "-m", "gateway")) -> None:
        self.settings = settings
        self._argv0 = list(argv0)
        self._ticket_secret = secrets.token_hex(32)
        self._workers = [_Worker(i + 1) for i in range(settings.workers)]
        self._group = GroupHub(settings.workers)
        self._stopping = False
        self._stop = asyncio.Event()
        self._keepers: list[asyncio.Task[None]] = []
        self.port = settings.port

    async def run(self) -> int:
        s = self.settings
        try:
            reservation = reserve_port(s.host, s.port)
        except OSError as exc:
            fatal("cannot start: " + str(ListenError("HTTP/WebSocket", s.host, s.port, "GATEWAY_HOST",
                                                     "GATEWAY_PORT", "0 = any free port", exc)))
            return 1
        self.port = reservation.getsockname()[1]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            # Worker 1 alone first: it creates a new database (and runs SMTP); then the others together.
            failed = await self._start(self._workers[0])
            if failed is None:
                results = await asyncio.gather(*(self._start(w) for w in self._workers[1:]))
                failed = next((r for r in results if r is not None), None)
            if failed is not None:
                await self._shutdown()
                return failed
            if self._stop.is_set():
                return await self._shutdown()
            print(start_up_line(s, self.port, len(self._workers)), flush=True)
            self._keepers = [asyncio.create_task(self._keep(w)) for w in self._workers]
            await self._stop.wait()
            log.info("stopping %d workers", len(self._workers))
            code = await self._shutdown()
            log.info("stopped: %d workers, exit status %d", len(self._workers), code)
            return code
        finally:
            reservation.close()

    async def _start(self, worker: _Worker) -> int | None:
        """Spawn `worker` and wait until it listens. None when it does; its exit status (not 0) when not."""
        if self._stopping:
            return None
        ours, theirs = socket.socketpair()
        channel = await Channel.open(ours, self._group.handler(worker.index))
        # The worker's channel before its process: whatever the group tells it from now on waits in the socket
        # until it reads it, so no delegation change falls between its loading the grants and its first read.
        self._group.join(worker.index, channel)
        env = dict(os.environ, GATEWAY_PORT=str(self.port))
        # One ticket key for every worker: a ticket issued by one is redeemed by whichever takes the upgrade.
        env.setdefault("GATEWAY_TICKET_SECRET", self._ticket_secret)
        if worker.index > 1:
            env["GATEWAY_SMTP_PORT"] = "0"  # one SMTP listener, in worker 1
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                *self._argv0, "--worker", str(worker.index), "--control-fd", str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), env=env)
        finally:
            theirs.close()
        ready = channel.ready
        gone = asyncio.ensure_future(channel.closed.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            waits: set[asyncio.Future[Any]] = {ready, gone, stop}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            gone.cancel()
        if ready.done():
            worker.ready_at = time.monotonic()
            self._group.mark_ready(worker.index)
            log.info("worker %d (pid %d) ready, bus node %s", worker.index, worker.proc.pid, ready.result())
            return None
        if not channel.closed.is_set():
            return None  # a stop was requested meanwhile; the shutdown takes care of the process
        # End of file before "ready": the worker exited (it printed why on stderr).
        status = await worker.proc.wait()
        return status if status > 0 else 1

    async def _keep(self, worker: _Worker) -> None:
        """Restart `worker` whenever it exits while the supervisor is not stopping."""
        failures = 0
        while True:
            proc = worker.proc
            assert proc is not None
            status = await proc.wait()
            if self._stopping:
                return
            channel = self._group.leave(worker.index)  # its counters stay counted
            if channel is not None:
                await channel.close()
            lived = time.monotonic() - worker.ready_at if worker.ready_at else 0.0
            failures = 0 if lived >= HEALTHY_AFTER else failures + 1
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS)) - 1] if failures else 0.0
            how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
            log.error("worker %d (pid %d) died unexpectedly (%s) after %.1fs; restarting it in %gs",
                      worker.index, proc.pid, how, lived, delay)
            worker.ready_at = 0.0
            self._group.restarts += 1
            if delay:
                await asyncio.sleep(delay)
            if self._stopping:
                return
            await self._start(worker)

    async def _shutdown(self) -> int:
        """Forward SIGTERM to every worker, wait for them (killing stragglers); 0 when all ended cleanly."""
        self._stopping = True
        # No restart may spawn a worker behind our back. (One cancelled mid-spawn is not lost either: its
        # control socket closes with the cancelled call, and a worker seeing that shuts down.)
        for task in self._keepers:
            task.cancel()
        await asyncio.gather(*self._keepers, return_exceptions=True)
        procs = [w.proc for w in self._workers if w.proc is not None]
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        code = 0
        deadline = time.monotonic() + self.settings.shutdown_grace + STOP_MARGIN
        for proc in procs:
            try:
                status = await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                log.error("worker pid %d did not stop in time; killing it", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                status = await proc.wait()
                code = 1
            # A worker signalled before it installed its handlers dies of the SIGTERM itself: still clean.
            if status not in (0, -signal.SIGTERM):
                code = 1
        # Open until every worker has ended: a draining worker may still take a scrape or a delegation.
        for channel in self._group.channels():
            await channel.close()
        return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jmap-gateway", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="JMAP over WebSocket (RFC 8887) push gateway.\n\n"
                    "commands:\n"
                    "  run       start the gateway (the default)\n"
                    "  settings  list every setting: its default, its meaning and the value set here\n"
                    "  check     validate this environment without starting: exit status 0 when fit to start, "
                    "2 otherwise\n\n"
                    "Every setting is a GATEWAY_* environment variable, validated at start: a bad value exits "
                    "with status 2\nand one line naming the variable.",
        epilog="settings (environment variables):\n" + preflight.settings_text(indent="  "))
    parser.add_argument("command", nargs="?", choices=("run", "settings", "check"), default="run",
                        metavar="command", help="run, settings or check (above)")
    # The supervisor's private arguments for its workers (GATEWAY_WORKERS > 1).
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    return parser


def check(env: dict[str, str]) -> int:
    """`jmap-gateway check`: one line per check, a last line with the verdict; 0 when fit to start, else 2."""
    results = preflight.run_checks(env, refusal)
    for result in results:
        print(result.line())
    failed = sum(1 for result in results if not result.ok)
    not_contacted = "the RabbitMQ broker and the upstream are not contacted"
    if failed:
        print(f"check: {failed} of {len(results)} checks failed ({not_contacted})")
        return 2
    print(f"check: all {len(results)} checks passed ({not_contacted})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if (args.worker is None) != (args.control_fd is None) or (args.worker is not None and args.command != "run"):
        parser.error("--worker and --control-fd go together, and only with run")
    if args.command == "settings":
        print(preflight.settings_text(os.environ))
        return 0
    if args.command == "check":
        return check(dict(os.environ))
    worker = WorkerRole(args.worker, args.control_fd) if args.worker is not None else None
    try:
        settings = load(os.environ)
    except ConfigError as exc:
        print(f"jmap-gateway: {exc}", file=sys.stderr)
        return 2
    if worker is None:
        problem = refusal(settings)
        if problem is not None:
            print(f"jmap-gateway: {problem}", file=sys.stderr)
            return 2
    if worker is not None:
        tag, fields = f"worker {worker.index}", {"worker": worker.index}
    elif settings.workers > 1:
        tag, fields = "supervisor", {"worker": 0}
    else:
        tag, fields = "", {}
    configure_logging(settings.log_level, tag, settings.log_format, fields, settings_secrets(settings))
    if settings.require_native:
        try:
            native.require_all()
        except native.NativeMissing as exc:
            fatal(f"GATEWAY_REQUIRE_NATIVE is set but {exc}")
            return 2
    if worker is None and settings.workers > 1:
        return uvloop.run(Supervisor(settings).run())
    uvloop.run(serve(settings, worker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
