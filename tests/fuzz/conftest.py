"""The fuzzing harness: one real gateway process (embedded backend, planted secrets), a well-behaved client that
keeps doing echo round trips on its own socket, and the oracles every fuzz target is checked against.

Oracles: the process stays up; its answers stay within the vocabulary (checked by each target); its RSS stays
under a bound; no line of its log holds a credential and none is an ERROR (the gateway's own fault); the
well-behaved client keeps being served throughout. Budget: FUZZ_SECONDS (default 60) of fuzzing in all, shared by
the targets; `make fuzz` sets it to 1800. Counts go to stdout at the end (`-s`) and to FUZZ_REPORT when set.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.gateway_process import GatewayProcess

BOB, BOB_PW = "bob@example.com", "Fz-bob-Pw-81c2d9e4"
ALICE, ALICE_PW = "alice@example.com", "Fz-alice-Pw-0b5e77aa"
ADMIN_TOKEN = "Fz-admin-Tk-9d0c31f5e2"
JWT_SECRET = "Fz-jwt-Secret-6a4f2b19-of-32-bytes!"
TICKET_SECRET = "Fz-ticket-Key-3e8c5d70aa"
CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
TARGETS = 5  # the fuzz targets sharing FUZZ_SECONDS
RSS_SLACK_KIB = 256 * 1024  # growth over the warmed-up RSS that fails the run


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def fuzz_seconds() -> float:
    return float(os.environ.get("FUZZ_SECONDS", "60"))


class Echoer(threading.Thread):
    """The well-behaved client: push-enabled, echo round trips one after another on its own socket."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True, name="fuzz-echoer")
        self.port = port
        self.round_trips = 0
        self.pushes = 0
        self.failure: str | None = None
        self._halt = threading.Event()
        self._progress = threading.Condition()

    def run(self) -> None:
        try:
            with connect(f"ws://127.0.0.1:{self.port}/jmap/ws", subprotocols=["jmap"],  # type: ignore[list-item]
                         additional_headers={"Authorization": basic(BOB, BOB_PW)}, compression=None,
                         open_timeout=30, max_size=None) as ws:
                ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": None}))
                n = 0
                while not self._halt.is_set():
                    n += 1
                    self._round_trip(ws, f"echo-{n}")
        except Exception as exc:  # any failure of the well-behaved client is the finding
            if not self._halt.is_set():
                self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            with self._progress:
                self._progress.notify_all()

    def _round_trip(self, ws: ClientConnection, rid: str) -> None:
        ws.send(json.dumps({"@type": "Request", "id": rid, "using": [CORE],
                            "methodCalls": [["Core/echo", {"n": rid}, "c"]]}))
        while True:
            msg = json.loads(ws.recv(timeout=30))
            if msg.get("@type") == "StateChange":
                assert isinstance(msg["changed"], dict)
                self.pushes += 1
                continue
            assert msg["@type"] == "Response" and msg["requestId"] == rid, msg
            assert msg["methodResponses"] == [["Core/echo", {"n": rid}, "c"]], msg
            with self._progress:
                self.round_trips += 1
                self._progress.notify_all()
            return

    def wait_progress(self, timeout: float = 60.0) -> None:
        """Block until one more round trip is done (a deadline, not a timing assertion: it fails only when
        the client is not served at all)."""
        with self._progress:
            start = self.round_trips
            self._progress.wait_for(lambda: self.round_trips > start or self.failure is not None
                                    or not self.is_alive(), timeout)
            assert self.failure is None, f"the well-behaved client failed: {self.failure}"
            assert self.round_trips > start, "the well-behaved client is no longer served"

    def stop(self) -> None:
        self._halt.set()
        self.join(40)


class Target:
    """What every fuzz target gets: the process, the secrets to plant, the counters and the shared checks."""

    def __init__(self, gw: GatewayProcess, echoer: Echoer, ticket: str, token: str) -> None:
        self.gw = gw
        self.port = gw.port
        self.echoer = echoer
        self.ticket = ticket
        self.jwt = token
        self.baseline_rss = gw.rss_kib()
        self.peak_rss = self.baseline_rss
        self.counts: dict[str, Counter[str]] = {}
        self.examples: Counter[str] = Counter()

    @property
    def credentials(self) -> list[str]:
        """Planted credentials in the forms a client sends them."""
        return [basic(BOB, BOB_PW).split()[1], basic(ALICE, ALICE_PW).split()[1], BOB_PW, ALICE_PW, ADMIN_TOKEN,
                JWT_SECRET, TICKET_SECRET, self.ticket, self.jwt]

    def credential_pieces(self) -> set[str]:
        """What the log must not contain: each credential, and every 12 characters of it (a log that cuts a
        value keeps a piece); of a Basic form only the pieces that encode password bytes."""
        pieces: set[str] = set()
        for user, password in ((BOB, BOB_PW), (ALICE, ALICE_PW)):
            encoded = basic(user, password).split()[1]
            start = (len(user) + 1) // 3 * 4  # the first base64 quantum holding password bytes
            pieces |= {encoded} | {encoded[i:i + 12] for i in range(start, len(encoded) - 11, 4)}
        for secret in (BOB_PW, ALICE_PW, ADMIN_TOKEN, JWT_SECRET, TICKET_SECRET, self.ticket, self.jwt):
            pieces |= {secret} | {secret[i:i + 12] for i in range(0, len(secret) - 11, 4)}
        return pieces

    def count(self, target: str, what: str) -> None:
        self.counts.setdefault(target, Counter())[what] += 1

    def check_process(self) -> None:
        assert self.gw.alive(), f"the gateway died\n{self.gw.stderr()[-3000:]}"
        rss = self.gw.rss_kib()
        self.peak_rss = max(self.peak_rss, rss)
        assert rss < self.baseline_rss + RSS_SLACK_KIB, f"RSS {rss} KiB, warmed up at {self.baseline_rss} KiB"

    def run_for(self, name: str, seconds: float, batch: Callable[[], None]) -> None:
        """Run the hypothesis test `batch` again and again (fresh random examples each time) for `seconds`;
        the well-behaved client must have been served after every batch."""
        deadline = time.monotonic() + seconds
        while True:
            batch()
            self.check_process()
            self.echoer.wait_progress()
            if time.monotonic() >= deadline:
                break
        assert self.examples[name] > 0


@pytest.fixture(scope="module")  # torn down (process stopped, log checked) right after the fuzz targets
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    stderr = tmp_path_factory.mktemp("fuzz") / "gateway.stderr"
    gw = GatewayProcess(stderr, USERS=f"{BOB}:{BOB_PW},{ALICE}:{ALICE_PW}", ADMIN_TOKEN=ADMIN_TOKEN,
                        JWT_SECRET=JWT_SECRET, TICKET_SECRET=TICKET_SECRET, MAX_SIZE_REQUEST="1000000",
                        PING_INTERVAL="0", MAX_CONNECTIONS_PER_USER="100000")
    echoer: Echoer | None = None
    try:
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{gw.port}/jmap/ws/ticket", method="POST",
                                     headers={"Authorization": basic(ALICE, ALICE_PW)})
        with urllib.request.urlopen(req, timeout=30) as r:
            ticket = json.loads(r.read())["value"]
        token = jwt.encode({"sub": BOB, "exp": int(time.time()) + 86400}, JWT_SECRET, algorithm="HS256")
        echoer = Echoer(gw.port)
        echoer.start()
        echoer.wait_progress()
        t = Target(gw, echoer, ticket, token)
        yield t
        t.check_process()
        echoer.wait_progress()
        report(t)
    finally:
        if echoer is not None:
            echoer.stop()
        status = gw.stop()
    log = gw.stderr()
    assert status == 0, f"the gateway exited with {status}\n{log[-3000:]}"
    errors = [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]
    assert not errors, "the gateway logged its own faults:\n" + "\n".join(errors[:30])
    found = sorted(piece for piece in t.credential_pieces() if piece in log)
    assert not found, f"credentials in the log: {found}"


def report(t: Target) -> None:
    summary: dict[str, Any] = {
        "fuzz_seconds": fuzz_seconds(), "examples": dict(t.examples), "answers": {k: dict(v) for k, v in
                                                                                  t.counts.items()},
        "echo_round_trips": t.echoer.round_trips, "pushes_to_the_echo_client": t.echoer.pushes,
        "rss_kib": {"warmed_up": t.baseline_rss, "peak": t.peak_rss},
    }
    text = json.dumps(summary, indent=1, sort_keys=True)
    print("\nfuzz summary:\n" + text)
    path = os.environ.get("FUZZ_REPORT")
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(text + "\n")
