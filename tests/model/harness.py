"""Synchronous test harness for the resume tests: gateway processes (`python -m gateway`) that can be restarted on
the same SQLite file, JMAP over HTTP (the oracle), SMTP delivery, admin calls, and push sockets as a client sees
them (`websockets.sync.client`).

No test logic here: every wait polls a condition with a deadline; nothing sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from tests.conftest import ADMIN, settings_env

ROOT = Path(__file__).resolve().parents[2]
CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
VACATION = "urn:ietf:params:jmap:vacationresponse"
USING = [CORE, MAIL, VACATION]
# The types a client can read the state of with `/get` and `ids: []` (RFC 8620 §5.1: `state` is always returned).
READABLE = ("Mailbox", "Email", "Thread", "VacationResponse")
STATE_CHANGE_EVENT = "org.apache.james.jmap.change.StateChangeEvent"
ABSENT: Any = object()  # `dataTypes` left out of a WebSocketPushEnable (RFC 8887 §4.3.5.2: same as null)
WAIT = 15.0  # seconds any condition gets before the test fails (generous: the machine is shared)


def basic(user: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT, step: float = 0.02) -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)  # a poll interval, not a wait for the condition itself


class GatewayProcess:
    """One `python -m gateway` process. `restart` starts it again with the same settings, hence the same SQLite
    file (and a new HTTP port; SMTP, when on, gets a new free port too)."""

    def __init__(self, workdir: Path, name: str, *, smtp: bool = True, **settings: str) -> None:
        self.workdir = workdir
        self.name = name
        self.smtp = smtp
        self.settings = {f"GATEWAY_{k}": v for k, v in settings.items()}
        self.settings.setdefault("GATEWAY_DB", str(workdir / "mail.sqlite3"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = ""
        self.smtp_port = 0
        self.starts = 0
        self.log = workdir / f"{name}.log"

    @property
    def ws_url(self) -> str:
        return "ws" + self.base.removeprefix("http") + "/jmap/ws"

    @property
    def session_url(self) -> str:
        return self.base + "/jmap/session"

    def start(self) -> None:
        assert self.proc is None, "already running"
        self.smtp_port = free_port() if self.smtp else 0
        env = dict(os.environ)
        env.update(settings_env(GATEWAY_SMTP_PORT=str(self.smtp_port), PYTHONUNBUFFERED="1", **self.settings))
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts} ---\n".encode())
            out.flush()
            offset = out.tell()
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        found: list[str] = []

        def listening() -> bool:
            assert self.proc is not None
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            match = re.search(r"jmap-push-gateway listening on (http://\S+)", text)
            if match:
                found.append(match.group(1))
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway {self.name} exited with {self.proc.returncode}:\n{text[-3000:]}")
            return False

        wait_for(listening, f"gateway {self.name} to listen", timeout=60)
        self.base = found[0]

    def stop(self, how: Literal["term", "kill"] = "term") -> int:
        """SIGTERM (graceful: sockets closed with 1001) or SIGKILL; returns the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            if how == "kill":
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def restart(self, how: Literal["term", "kill"] = "term") -> None:
        self.stop(how)
        self.start()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


# --- HTTP: the JMAP API (the oracle), admin calls ------------------------------------------------------------

def http(method: str, url: str, *, authorization: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": authorization, "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    try:
        with opener.open(req, timeout=WAIT) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def api(base: str, user: tuple[str, str], calls: list[list[Any]]) -> dict[str, Any]:
    """One JMAP request over `POST /jmap/api`; returns call id -> arguments (method errors fail the test)."""
    status, body = http("POST", base + "/jmap/api", authorization=basic(user),
                        body={"using": USING, "methodCalls": calls})
    assert status == 200, f"JMAP API answered {status}: {body}"
    out: dict[str, Any] = {}
    for name, args, call_id in body["methodResponses"]:
        assert name != "error", f"method error for {call_id}: {args}"
        out[call_id] = args
    return out


def state_calls(account_id: str, types: Iterable[str] = READABLE) -> list[list[Any]]:
    return [[f"{t}/get", {"accountId": account_id, "ids": []}, t] for t in types]


def server_states(base: str, user: tuple[str, str], account_id: str) -> dict[str, str]:
    """The oracle: the current state of every readable type, as the JMAP API itself reports it."""
    answers = api(base, user, state_calls(account_id))
    return {t: answers[t]["state"] for t in READABLE}


def email_ids(base: str, user: tuple[str, str], account_id: str) -> list[str]:
    ids: list[str] = api(base, user, [["Email/query", {"accountId": account_id}, "q"]])["q"]["ids"]
    return ids


def admin_publish(base: str, username: str, type_states: dict[str, str]) -> None:
    """`POST /admin/events` with one Apache James StateChangeEvent (DESIGN.md §5)."""
    event = {"type": STATE_CHANGE_EVENT, "eventId": str(uuid.uuid4()), "username": username,
             "typeStates": type_states}
    status, body = http("POST", base + "/admin/events", authorization=f"Bearer {ADMIN}", body=event)
    assert status == 202, f"/admin/events answered {status}: {body}"


def admin_delegation(base: str, owner: str, delegate: str, grant: bool) -> int:
    status, _ = http("PUT" if grant else "DELETE", f"{base}/admin/delegations/{owner}/{delegate}",
                     authorization=f"Bearer {ADMIN}")
    return status


def send_mail(port: int, recipients: list[str], subject: str, sender: str = "carol@example.org") -> None:
    """A real SMTP conversation; returns after the server's 250 to DATA, i.e. once the mail is committed."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.org>"
    msg.set_content(f"{subject}\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as smtp:
        refused = smtp.send_message(msg, to_addrs=recipients)
    assert not refused, refused


# --- push sockets ---------------------------------------------------------------------------------------------

class SocketClosed(Exception):
    """The server closed the socket (e.g. a restart)."""


class PushSocket:
    """One client WebSocket (subprotocol `jmap`). Every StateChange read, while waiting for anything, goes to
    `on_push` in arrival order, so the caller's view of the stream is exactly what a client sees."""

    def __init__(self, url: str, authorization: str, on_push: Callable[[dict[str, Any]], None]) -> None:
        self.on_push = on_push
        self._stack = ExitStack()
        self._ws: ClientConnection = self._stack.enter_context(connect(
            url, subprotocols=[Subprotocol("jmap")], additional_headers={"Authorization": authorization},
            compression=None, ping_interval=None, close_timeout=2, open_timeout=WAIT, proxy=None, max_size=None))
        assert self._ws.subprotocol == "jmap"
        self._ids = 0
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        try:
            self._ws.send(json.dumps(message))
        except ConnectionClosed as exc:
            self.closed = True
            raise SocketClosed(str(exc)) from exc

    def recv(self, timeout: float) -> dict[str, Any] | None:
        """The next message that is not a StateChange (those go to `on_push`), or None after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                raw = self._ws.recv(timeout=left)
            except TimeoutError:
                return None
            except ConnectionClosed as exc:
                self.closed = True
                raise SocketClosed(str(exc)) from exc
            msg: dict[str, Any] = json.loads(raw)
            if msg.get("@type") == "StateChange":
                self.on_push(msg)
                continue
            return msg

    def request(self, calls: list[list[Any]], using: list[str] | None = None) -> dict[str, Any]:
        """Send a Request and return its Response (a RequestError fails); pushes before it go to `on_push`."""
        self._ids += 1
        rid = f"q{self._ids}"
        self.send({"@type": "Request", "id": rid, "using": using or USING, "methodCalls": calls})
        deadline = time.monotonic() + WAIT
        while True:
            msg = self.recv(deadline - time.monotonic())
            if msg is None:
                raise AssertionError(f"no answer to request {rid} within {WAIT}s")
            if msg.get("requestId") == rid:
                assert msg.get("@type") == "Response", msg
                return msg

    def barrier(self) -> None:
        """A round trip: the server wrote everything it sent before the answer to this echo, and TCP keeps the
        order, so every push written before it has reached `on_push` when this returns."""
        self.request([["Core/echo", {"barrier": True}, "b"]], using=[CORE])

    def enable(self, data_types: Any, push_state: str | None) -> None:
        msg: dict[str, Any] = {"@type": "WebSocketPushEnable"}
        if data_types is not ABSENT:
            msg["dataTypes"] = None if data_types is None else sorted(data_types)
        if push_state is not None:
            msg["pushState"] = push_state
        self.send(msg)

    def disable(self) -> None:
        self.send({"@type": "WebSocketPushDisable"})

    def pump(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        """Read the socket until `predicate` holds (checked after every message); False after `timeout`."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self.recv(min(left, 0.5))
            except SocketClosed:
                return predicate()
        return True

    def close(self) -> None:
        self.closed = True
        self._stack.close()


class Client:
    """A client as a person's mail app is: one socket at a time, the states it was told (merged from every
    StateChange, newest wins), and the last pushState it received, kept across sockets."""

    def __init__(self, user: tuple[str, str]) -> None:
        self.user = user
        self.socket: PushSocket | None = None
        self.known: dict[str, dict[str, str]] = {}
        self.push_state: str | None = None
        self.pushes: list[dict[str, Any]] = []

    def _on_push(self, msg: dict[str, Any]) -> None:
        self.pushes.append(msg)
        for acc, states in msg["changed"].items():
            self.known.setdefault(acc, {}).update(states)
        if msg.get("pushState"):
            self.push_state = msg["pushState"]

    def connect(self, gw: GatewayProcess) -> PushSocket:
        self.close()
        self.socket = PushSocket(gw.ws_url, basic(self.user), self._on_push)
        return self.socket

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None

    def enable(self, data_types: Any = None, *, resume: bool = True) -> None:
        assert self.socket is not None
        self.socket.enable(data_types, self.push_state if resume else None)

    def sync(self, account_id: str, types: Iterable[str] = READABLE) -> None:
        """Read the states over the socket, as a client does after enabling without pushState."""
        assert self.socket is not None
        answer = self.socket.request(state_calls(account_id, types))
        for _name, args, call_id in answer["methodResponses"]:
            self.known.setdefault(account_id, {})[call_id] = args["state"]

    def state(self, account_id: str, type_: str) -> str | None:
        return self.known.get(account_id, {}).get(type_)

    def converge(self, want: dict[str, dict[str, str]], what: str = "the server's states",
                 timeout: float = WAIT) -> None:
        """Read the socket until the known states include `want` (account -> type -> state); fail after
        `timeout` seconds."""
        assert self.socket is not None

        def done() -> bool:
            return all(self.state(acc, t) == v for acc, states in want.items() for t, v in states.items())

        if not self.socket.pump(done, timeout):
            diff = {(acc, t): (self.state(acc, t), v) for acc, states in want.items() for t, v in states.items()
                    if self.state(acc, t) != v}
            raise AssertionError(f"the client did not converge to {what}; (known, wanted) = {diff}")

    def until_push(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Read the socket until a push satisfying `predicate` has arrived (since the call); returns it."""
        assert self.socket is not None
        start = len(self.pushes)

        def seen() -> bool:
            return any(predicate(p) for p in self.pushes[start:])

        if not self.socket.pump(seen):
            raise AssertionError(f"no push {what} within {WAIT}s; pushes since: {self.pushes[start:]}")
        return next(p for p in self.pushes[start:] if predicate(p))


PROBE = "com.example.Probe"  # a custom type only the routing probe publishes


def wait_routed(client: Client, publisher: GatewayProcess, username: str, account_id: str) -> None:
    """Until events for `username` published on `publisher` reach the client's socket: publish a probe event
    (a custom type) and read the socket for it, again until one arrives. This is what "the node the client is on
    is bound at the broker" looks like from outside; the client's dataTypes must include PROBE (or be null)."""
    assert client.socket is not None
    deadline = time.monotonic() + WAIT
    n = 0
    while True:
        n += 1
        value = f"probe-{uuid.uuid4().hex[:8]}"
        start = len(client.pushes)
        admin_publish(publisher.base, username, {PROBE: value})

        def arrived(value: str = value, start: int = start) -> bool:
            return any(p["changed"].get(account_id, {}).get(PROBE) == value for p in client.pushes[start:])

        if client.socket.pump(arrived, timeout=0.5):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"events for {username} published on {publisher.name} never reached the socket "
                                 f"({n} probes)")


class DelayProxy:
    """A TCP relay to `target` that holds every byte the client sends for `delay` seconds (0 = pass at once),
    keeping their order: a slow link between one gateway and the broker, so that its binding changes reach the
    broker late while the other nodes' publishes do not. Threads, not asyncio: the tests around it are
    synchronous."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.delay = 0.0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            sends: queue.Queue[tuple[float, bytes]] = queue.Queue()
            threading.Thread(target=self._read, args=(client, sends), daemon=True).start()
            threading.Thread(target=self._write_later, args=(sends, upstream), daemon=True).start()
            threading.Thread(target=self._relay, args=(upstream, client), daemon=True).start()

    def _read(self, src: socket.socket, sends: queue.Queue[tuple[float, bytes]]) -> None:
        try:
            while data := src.recv(65536):
                sends.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        sends.put((0.0, b""))

    def _write_later(self, sends: queue.Queue[tuple[float, bytes]], dst: socket.socket) -> None:
        while True:
            due, data = sends.get()
            if not data:
                break
            if self._stop.wait(max(0.0, due - time.monotonic())):  # the injected delay; returns early on close
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _relay(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
