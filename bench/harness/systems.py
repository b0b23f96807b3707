"""The systems under test and how to run them: jmap-push-gateway, nchan, a Node `ws` server, a Python
`websockets` server and the syscall floor, behind one small contract (subscribe over WebSocket by account,
publish over HTTP), plus what the harness reads from /proc about them (CPU time, RSS, kernel memory).

Every process is started in its own session (process group) with a parent-death signal, pinned to the server
cores, and stopped by its group id. No scenario logic here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / "bench" / "peers"
NODE_DIR = PEERS / "node-ws"
NCHAN_MODULES = (Path("/usr/lib/nginx/modules/ngx_nchan_module.so"),
                 Path("/usr/share/nginx/modules/ngx_nchan_module.so"))
ADMIN_TOKEN = "bench-admin-token"
PASSWORD = "p"
EVENT_TYPE = "org.apache.james.jmap.change.StateChangeEvent"
STATE_TYPES = ("Email", "Mailbox")  # what one event changes: a realistic flag change or move

_PR_SET_PDEATHSIG = 1


def account_id(username: str) -> str:
    """James's accountId: lowercase hex SHA-256 of the username (DESIGN.md §5)."""
    return hashlib.sha256(username.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _preexec(cpus: Sequence[int] | None) -> Any:
    libc = ctypes.CDLL(None, use_errno=True)

    def run() -> None:
        # Die with the harness even if it is killed hard; and run on the server cores only.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return run


# --- /proc readings ----------------------------------------------------------------------------------------

def cpu_ns(pids: Sequence[int]) -> int:
    """CPU time of every thread of `pids`, in ns (schedstat: exact, unlike the 10 ms ticks of /proc/pid/stat)."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may hold spaces: the fields after it start behind the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def kernel_memory() -> dict[str, int | None]:
    """TCP buffer memory (sockstat) and total slab bytes (slabinfo, root only), machine-wide."""
    out: dict[str, int | None] = {"tcp_mem_bytes": None, "tcp_inuse": None, "slab_bytes": None}
    try:
        with open("/proc/net/sockstat") as fh:
            for line in fh:
                if line.startswith("TCP:"):
                    parts = line.split()
                    fields = dict(zip(parts[1::2], parts[2::2], strict=False))
                    out["tcp_mem_bytes"] = int(fields["mem"]) * os.sysconf("SC_PAGE_SIZE")
                    out["tcp_inuse"] = int(fields["inuse"])
    except (OSError, KeyError, ValueError):
        pass
    try:
        total = 0
        with open("/proc/slabinfo") as fh:
            for line in fh:
                if line.startswith(("slabinfo", "#")):
                    continue
                parts = line.split()
                total += int(parts[2]) * int(parts[3])  # num_objs * objsize
        out["slab_bytes"] = total
    except (OSError, ValueError, IndexError):
        pass
    return out


def send_queues(port: int) -> dict[str, int]:
    """Unsent bytes in the kernel of the server's sockets on `port` (/proc/net/tcp tx_queue): where a slow
    consumer's backlog sits before the server's own buffers see any of it."""
    sizes = []
    try:
        with open("/proc/net/tcp") as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                local, state, queues = parts[1], parts[3], parts[4]
                if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:  # ESTABLISHED, server side
                    tx = int(queues.split(":")[0], 16)
                    if tx:
                        sizes.append(tx)
    except (OSError, ValueError, IndexError, StopIteration):
        return {}
    return {"sockets_with_backlog": len(sizes), "total_bytes": sum(sizes), "max_bytes": max(sizes, default=0)}


def broker_reachable(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# --- the systems -------------------------------------------------------------------------------------------

class System:
    """One server under test. Subclasses say how to start it and how its URLs and publish requests look."""

    name = "system"
    label = "system"
    gateway = False  # clients must enable push (RFC 8887) instead of choosing a channel in the URL
    publish_via = "http"

    def __init__(self, *, server_cpus: Sequence[int] | None, deflate: bool = False, users: Sequence[str] = (),
                 logdir: Path) -> None:
        self.server_cpus = list(server_cpus) if server_cpus else None
        self.deflate = deflate
        self.users = list(users)
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pub_port = 0
        self._log: IO[bytes] | None = None
        self._pids: list[int] = []
        self.pad = 0  # pushState length of the peers' bodies, to match the gateway's frame size
        self.events_to: dict[str, tuple[int, int]] = {}  # user -> (open-loop events sent, last publish ns)

    # contract -------------------------------------------------------------------------------------------

    def sub_url(self, user: str) -> str:
        return f"ws://127.0.0.1:{self.port}/sub/{user}"

    def sub_headers(self, user: str) -> list[tuple[str, str]]:
        return []

    def body(self, user: str, state: str) -> bytes:
        """The StateChange every peer pushes as is (the gateway builds its own from a James event)."""
        states = ",".join(f'"{t}":"{state}"' for t in STATE_TYPES)
        return (f'{{"@type":"StateChange","changed":{{"{account_id(user)}":{{{states}}}}},'
                f'"pushState":"1{"A" * self.pad}"}}').encode()

    def pub_request(self, user: str, state: str, seq: int) -> bytes:
        body = self.body(user, state)
        return (b"POST /pub/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (user.encode(), len(body), body))

    # lifecycle ------------------------------------------------------------------------------------------

    def command(self) -> tuple[list[str], dict[str, str], Path | None]:
        raise NotImplementedError

    async def start(self) -> None:
        cmd, env, cwd = self.command()
        self._log = open(self.logdir / f"{self.name}.log", "ab")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._log, start_new_session=True,
                                     preexec_fn=_preexec(self.server_cpus))
        await self._wait_ready()
        self._pids = [self.proc.pid, *children_of(self.proc.pid)]

    async def _wait_ready(self) -> None:
        """Default: the server prints `listening <port> [<pub port>]` on stdout when it accepts connections."""
        assert self.proc is not None and self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        line = await asyncio.wait_for(loop.run_in_executor(None, self.proc.stdout.readline), 60)
        text = line.decode(errors="replace").strip()
        if "listening" not in text:
            raise RuntimeError(f"{self.name} did not start: {text!r} (see {self.logdir / (self.name + '.log')})")
        self.parse_listening(text)

    def parse_listening(self, text: str) -> None:
        parts = text.split()
        self.port = int(parts[1])
        self.pub_port = int(parts[2]) if len(parts) > 2 else self.port

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group: nginx workers and any stray child too
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill_now(self) -> None:
        """Last-resort cleanup (atexit, signals): no waiting."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        return list(self._pids)

    def cpu_ns(self) -> int:
        return cpu_ns(self._pids)

    def rss(self) -> int:
        return rss_bytes(self._pids)

    async def wait_port(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} (see {self.logdir})")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not listen on {port} within {timeout}s")


class Gateway(System):
    name = "gateway"
    label = "jmap-push-gateway"
    gateway = True

    def __init__(self, *, bus: str = "memory", publish: str = "ndjson", sse: bool = False,
                 root: Path | None = None, **kw: Any) -> None:
        """`publish`: "ndjson" streams events to `POST /admin/events` (one long request, a line per event, the
        injector path issue 13 built), "post" sends one request per event (the peers' contract). `sse`: the
        sessions subscribe over RFC 8620 §7.3 event streams (`eventSourceUrl`) instead of WebSockets. `root`: run
        the gateway of another checkout (`--baseline`, its native modules built), as `gateway-base`."""
        super().__init__(**kw)
        self.bus = bus
        self.publish_via = publish
        self.sse = sse
        self.root = root
        if root is not None:
            self.name = "gateway-base"
            self.label = "jmap-push-gateway (baseline checkout)"
        elif sse:
            self.name = "gateway-sse"
            self.label = "jmap-push-gateway (EventSource)"
        elif bus != "memory":
            self.name = f"gateway-{bus}"
            self.label = f"jmap-push-gateway ({bus})"
            self.publish_via = bus
        elif publish == "post":
            self.name = "gateway-post"
            self.label = "jmap-push-gateway (a POST per event)"
            self.publish_via = "http"

    def command(self) -> tuple[list[str], dict[str, str], Path | None]:
        users = ",".join(f"{u}:{PASSWORD}" for u in self.users)
        if len(users) > 120_000:
            # One environment string may not exceed 128 KiB (MAX_ARG_STRLEN): use shorter usernames.
            raise ValueError("GATEWAY_USERS too long for one environment variable; use fewer/shorter users")
        env = {
            "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": "0", "GATEWAY_USERS": users or "bench:p",
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN, "GATEWAY_MAX_CONNECTIONS_PER_USER": "1000000",
            "GATEWAY_PING_INTERVAL": "0", "GATEWAY_SMTP_PORT": "0", "GATEWAY_DB": ":memory:",
            "GATEWAY_LOG_LEVEL": "WARNING", "GATEWAY_REQUIRE_NATIVE": "1", "GATEWAY_BUS": self.bus,
            "PYTHONUNBUFFERED": "1",
        }
        if self.root is not None:
            # Its own package first on the path (the venv's editable install points at this checkout).
            env["PYTHONPATH"] = str(self.root)
            return [sys.executable, "-m", "gateway"], env, self.root
        return [sys.executable, "-m", "gateway"], env, ROOT

    def parse_listening(self, text: str) -> None:
        # "jmap-push-gateway listening on http://127.0.0.1:PORT (WebSocket ws://...)"
        self.port = self.pub_port = int(text.split("127.0.0.1:")[1].split()[0].strip("/"))

    def sub_url(self, user: str) -> str:
        if self.sse:
            return f"http://127.0.0.1:{self.port}/jmap/eventsource/?types=*&closeafter=no&ping=0"
        return f"ws://127.0.0.1:{self.port}/jmap/ws"

    def sub_headers(self, user: str) -> list[tuple[str, str]]:
        import base64

        token = base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
        if self.sse:
            return [("Authorization", f"Basic {token}")]
        return [("Authorization", f"Basic {token}"), ("Sec-WebSocket-Protocol", "jmap")]

    def event(self, user: str, state: str, seq: int) -> bytes:
        """An Apache James StateChangeEvent (DESIGN.md §5), as the bus carries it."""
        states = ",".join(f'"{t}":"{state}"' for t in STATE_TYPES)
        return (f'{{"type":"{EVENT_TYPE}","eventId":"00000000-0000-4000-8000-{seq:012d}",'
                f'"username":"{user}","typeStates":{{{states}}}}}').encode()

    def pub_request(self, user: str, state: str, seq: int) -> bytes:
        if self.publish_via == "ndjson":
            return self.event(user, state, seq) + b"\n"  # one line of the stream
        body = self.event(user, state, seq)
        return (b"POST /admin/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def stream_head(self) -> bytes:
        """The head of the NDJSON stream request (chunked: it lasts as long as the publisher)."""
        return (b"POST /admin/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-ndjson\r\n"
                b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n")


class Nchan(System):
    name = "nchan"
    label = "nchan (nginx)"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.prefix: Path | None = None

    def command(self) -> tuple[list[str], dict[str, str], Path | None]:
        module = next((m for m in NCHAN_MODULES if m.exists()), None)
        if module is None:
            raise RuntimeError("libnginx-mod-nchan is not installed (run with --install)")
        self.prefix = Path(tempfile.mkdtemp(prefix="bench-nchan-"))
        self.port = self.pub_port = free_port()
        conf = (PEERS / "nginx.conf").read_text()
        for key, value in (("@PREFIX@", str(self.prefix)), ("@PORT@", str(self.port)),
                           ("@NCHAN_MODULE@", str(module)), ("@DEFLATE@", "on" if self.deflate else "off")):
            conf = conf.replace(key, value)
        (self.prefix / "nginx.conf").write_text(conf)
        return ["nginx", "-p", str(self.prefix), "-c", str(self.prefix / "nginx.conf")], {}, self.prefix

    async def _wait_ready(self) -> None:
        await self.wait_port(self.port)
        # The worker process is what serves: wait until the master has forked it.
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while not children_of(self.proc.pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await super().stop()
        if self.prefix is not None:
            shutil.rmtree(self.prefix, ignore_errors=True)
            self.prefix = None


class NodeWs(System):
    name = "node-ws"
    label = "Node ws"

    def command(self) -> tuple[list[str], dict[str, str], Path | None]:
        if not (NODE_DIR / "node_modules" / "ws").is_dir():
            raise RuntimeError("bench/peers/node-ws has no node_modules (run with --install: npm ci)")
        env = {"PORT": "0", "HOST": "127.0.0.1", "DEFLATE": "1" if self.deflate else "0"}
        return ["node", str(NODE_DIR / "server.js")], env, NODE_DIR


class PyWebsockets(System):
    name = "websockets"
    label = "Python websockets"

    def command(self) -> tuple[list[str], dict[str, str], Path | None]:
        env = {"PORT": "0", "PUB_PORT": "0", "HOST": "127.0.0.1", "DEFLATE": "1" if self.deflate else "0",
               "PYTHONUNBUFFERED": "1"}
        return [sys.executable, str(PEERS / "pyws_server.py")], env, PEERS


class Floor(System):
    name = "floor"
    label = "syscall floor"

    def command(self) -> tuple[list[str], dict[str, str], Path | None]:
        env = {"PORT": "0", "HOST": "127.0.0.1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        return [sys.executable, str(PEERS / "floor_server.py")], env, PEERS


SYSTEMS: dict[str, type[System]] = {
    "gateway": Gateway, "nchan": Nchan, "node-ws": NodeWs, "websockets": PyWebsockets, "floor": Floor,
}


def available(name: str) -> str | None:
    """None when `name` can run here, else why not."""
    if name == "nchan":
        if shutil.which("nginx") is None or not any(m.exists() for m in NCHAN_MODULES):
            return "nginx/libnginx-mod-nchan not installed (--install)"
    elif name == "node-ws":
        if shutil.which("node") is None:
            return "node not installed"
        if not (NODE_DIR / "node_modules" / "ws").is_dir():
            return "node_modules missing (--install runs npm ci)"
    elif name == "floor":
        try:
            from gateway._bench import floor_send  # noqa: F401
        except ImportError:
            return "gateway._bench is not compiled (make native)"
    elif name == "gateway-amqp" and not broker_reachable():
        return "no RabbitMQ at 127.0.0.1:5672"
    return None


def install(log: Any) -> None:
    """`--install`: what the peers need, through the ordinary clients (apt-get, npm, pip)."""
    if shutil.which("nginx") is None or not any(m.exists() for m in NCHAN_MODULES):
        if os.geteuid() != 0:
            log("nchan: not root, cannot apt-get install nginx libnginx-mod-nchan; skipping")
        else:
            log("apt-get install nginx libnginx-mod-nchan")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx",
                            "libnginx-mod-nchan"], check=True, env=env, timeout=900)
    if shutil.which("npm") is not None:
        log("npm ci (bench/peers/node-ws)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True,
                       timeout=600)
    else:
        log("npm not found: the Node ws peer will be skipped")
    import tomllib

    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    log("pip install " + " ".join(wanted))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *wanted], check=True, timeout=900)
