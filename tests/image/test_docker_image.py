"""The container image, built from the Dockerfile and run for real with podman (daemonless): `/healthz`, the
Dockerfile's HEALTHCHECK, a session request, and one push (SMTP delivery into the container -> StateChange on a
WebSocket), then a graceful stop.

It takes minutes (a base image, a compiler, pip), so it runs under CI=true, where it fails when no image can be
built or run, and elsewhere only with GATEWAY_IMAGE_TEST=1. The base is the Dockerfile's pinned one when a
registry serves it, else one built from Debian's packages (scripts/debian-base-image.sh).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shutil
import smtplib
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
import websockets
from websockets.typing import Subprotocol

from gateway.directory import account_id_for
from tests.conftest import BOB, USERS, basic, in_ci

ROOT = Path(__file__).resolve().parents[2]
LOCAL_BASE = "localhost/jmap-gateway-base:bookworm"
IMAGE = "localhost/jmap-push-gateway:image-test"
BUILD_TIMEOUT = 1800

# Building takes minutes: far past the suite's default per-test timeout.
pytestmark = [pytest.mark.image, pytest.mark.timeout(BUILD_TIMEOUT + 600)]


def unavailable(reason: str) -> None:
    """No image can be had: a failure under CI, a skip elsewhere."""
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def podman(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}", pytrace=False)
    return proc


def default_base() -> str:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert match, "the Dockerfile has no default BASE_IMAGE"
    return match.group(1)


def base_image(errors: list[str]) -> str | None:
    """The Dockerfile's pinned base when it can be had (local or pulled), else a base built from Debian's packages."""
    pinned = default_base()
    if podman("image", "exists", pinned).returncode == 0:
        return pinned
    pulled = podman("pull", "--quiet", pinned, timeout=600)
    if pulled.returncode == 0:
        return pinned
    errors.append(f"podman pull {pinned}: {pulled.stderr.strip()[-500:]}")
    if shutil.which("mmdebstrap") is None:
        errors.append("mmdebstrap is missing: no base image from Debian's packages (apt-get install mmdebstrap)")
        return None
    built = subprocess.run([str(ROOT / "scripts/debian-base-image.sh"), LOCAL_BASE], capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT)
    if built.returncode != 0:
        errors.append(f"scripts/debian-base-image.sh: {built.stdout[-1000:]}{built.stderr[-2000:]}")
        return None
    return LOCAL_BASE


def runtime_options(base: str, errors: list[str]) -> list[str] | None:
    """The first set of `podman run`/`build` options that runs a container here. Sandboxes differ: without
    CAP_SYS_RESOURCE podman's default rlimits cannot be set (so ask for lower ones), and crun refuses a hybrid
    cgroup v1/v2 layout that runc accepts."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    limits = ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]
    candidates = [[], limits]
    if shutil.which("runc"):
        candidates.append(["--runtime", "runc", *limits])
    for options in candidates:
        proc = podman("run", "--rm", *options, base, "python3", "-c", "print('ok')")
        if proc.returncode == 0 and proc.stdout.strip() == "ok":
            return options
        errors.append(f"podman run {' '.join(options) or '(defaults)'}: {proc.stderr.strip()[-500:]}")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Built:
    image: str
    base: str
    options: list[str]
    seconds: float


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    if not in_ci() and os.environ.get("GATEWAY_IMAGE_TEST") != "1":
        pytest.skip("builds and runs the container image (minutes): under CI=true, or with GATEWAY_IMAGE_TEST=1")
    if shutil.which("podman") is None:
        unavailable("podman is not installed (.ci/run installs podman, runc and mmdebstrap from Debian's packages)")
    errors: list[str] = []
    base = base_image(errors)
    if base is None:
        unavailable("no base image:\n" + "\n".join(errors))
    assert base is not None
    options = runtime_options(base, errors)
    if options is None:
        unavailable("podman cannot run a container here:\n" + "\n".join(errors))
    assert options is not None
    started = time.monotonic()
    # --layers=false: no intermediate images left behind; docker format: keeps HEALTHCHECK (OCI has none).
    podman("build", *options, "--layers=false", "--format", "docker", "--build-arg", f"BASE_IMAGE={base}",
           "--tag", IMAGE, str(ROOT), timeout=BUILD_TIMEOUT, check=True)
    try:
        yield Built(IMAGE, base, options, time.monotonic() - started)
    finally:
        podman("rmi", "--force", IMAGE)


@dataclass
class Running:
    name: str
    http_port: int
    smtp_port: int


@pytest.fixture
def container(built: Built) -> Iterator[Running]:
    name = f"jmap-gateway-test-{uuid.uuid4().hex[:8]}"
    http_port, smtp_port = free_port(), free_port()
    proc = podman("run", "--detach", "--name", name, *built.options, "--health-interval", "disable",
                  "--publish", f"127.0.0.1:{http_port}:8080", "--publish", f"127.0.0.1:{smtp_port}:2525",
                  "--env", f"GATEWAY_USERS={USERS}", "--env", "GATEWAY_LOG_FORMAT=json",
                  "--env", f"GATEWAY_PUBLIC_URL=http://127.0.0.1:{http_port}", built.image)
    if proc.returncode != 0:
        pytest.fail(f"podman run failed: {proc.stderr[-2000:]}", pytrace=False)
    try:
        yield Running(name, http_port, smtp_port)
    finally:
        podman("rm", "--force", "--time", "0", name)


def http_get(url: str, authorization: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read()


def wait_healthy(run: Running, deadline: float) -> bytes:
    """Poll /healthz through the published port until it answers, while the container is running."""
    while True:
        try:
            status, body = http_get(f"http://127.0.0.1:{run.http_port}/healthz")
            if status == 200:
                return body
        except OSError:
            pass
        state = podman("inspect", "--format", "{{.State.Status}}", run.name).stdout.strip()
        if state != "running" or time.monotonic() > deadline:
            logs = podman("logs", run.name)
            pytest.fail(f"the container is {state}, /healthz does not answer:\n{logs.stdout}{logs.stderr}",
                        pytrace=False)
        time.sleep(0.2)  # polling interval of a condition with a deadline, not a wait for it


def send_mail(port: int) -> None:
    msg = EmailMessage()
    msg["From"] = "Carol <carol@example.org>"
    msg["To"] = BOB[0]
    msg["Subject"] = "into the container"
    msg.set_content("Hello through the published SMTP port.")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.send_message(msg)


def test_image_metadata(built: Built) -> None:
    inspected = json.loads(podman("image", "inspect", built.image, check=True).stdout)[0]
    config = inspected["Config"]
    assert "/var/lib/gateway/data" in config["Volumes"]
    assert {"8080/tcp", "2525/tcp"} <= set(config["ExposedPorts"])
    assert config["User"] == "gateway"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["GATEWAY_SMTP_HOST"] == "0.0.0.0" and env["GATEWAY_HOST"] == "0.0.0.0"
    assert env["GATEWAY_REQUIRE_NATIVE"] == "1"
    assert inspected["Healthcheck"]["Test"][0] == "CMD-SHELL" and "/healthz" in inspected["Healthcheck"]["Test"][1]


async def test_the_image_serves_pushes_and_stops_gracefully(built: Built, container: Running) -> None:
    body = await asyncio.to_thread(wait_healthy, container, time.monotonic() + 120)
    assert json.loads(body) == {"status": "ok"}
    # The Dockerfile's own HEALTHCHECK command, run inside the container.
    check = await asyncio.to_thread(podman, "healthcheck", "run", container.name)
    assert check.returncode == 0, check.stdout + check.stderr

    status, raw = await asyncio.to_thread(http_get, f"http://127.0.0.1:{container.http_port}/jmap/session",
                                          basic(BOB))
    session = json.loads(raw)
    assert status == 200 and session["username"] == BOB[0]
    ws_url = session["capabilities"]["urn:ietf:params:jmap:websocket"]["url"]
    assert ws_url == f"ws://127.0.0.1:{container.http_port}/jmap/ws"

    acc = account_id_for(BOB[0])
    async with websockets.connect(ws_url, subprotocols=[Subprotocol("jmap")],
                                  additional_headers={"Authorization": basic(BOB)}, ping_interval=None) as ws:
        await ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": None}))
        # SMTP listens on 0.0.0.0 inside the container, so the published port reaches it.
        await asyncio.to_thread(send_mail, container.smtp_port)
        push = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert push["@type"] == "StateChange"
        assert {"Email", "EmailDelivery"} <= set(push["changed"][acc])

        stop = await asyncio.to_thread(podman, "stop", "--time", "30", container.name)
        assert stop.returncode == 0, stop.stderr
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 30)
        assert ws.close_code == 1001
    exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip()
    assert exit_code == "0"
    logs = podman("logs", container.name)
    lines = (logs.stdout + logs.stderr).splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and records[-1]["message"].startswith("stopped") and records[-1]["sockets_closed"] == 1
    image_id = podman("image", "inspect", "--format", "{{.Id}}", built.image).stdout.strip()
    size = podman("image", "inspect", "--format", "{{.Size}}", built.image).stdout.strip()
    print(f"image {image_id[:12]} ({int(size) / 1e6:.0f} MB, base {built.base}) built in {built.seconds:.0f} s; "
          f"/healthz answered {body.decode()}")
