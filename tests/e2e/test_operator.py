"""The operator's first hour, with real processes: a taken port, JSON logs, the README's SMTP one-liner,
`jmap-gateway --help`, `settings` and `check`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from gateway.config import SPECS
from gateway.directory import account_id_for
from tests.conftest import BOB, USERS, basic

ROOT = Path(__file__).resolve().parents[2]
CORE, MAIL = "urn:ietf:params:jmap:core", "urn:ietf:params:jmap:mail"


def gateway_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GATEWAY_PORT": "0", "GATEWAY_SMTP_PORT": "0", "GATEWAY_USERS": USERS,
                "GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
    env.update({f"GATEWAY_{k}": v for k, v in overrides.items()})
    return env


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another program listens on, for as long as the test runs."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a taken port: one line naming the setting, exit status 1 ------------------------------------------------

@pytest.mark.parametrize(("setting", "what", "hint"), [
    ("SMTP_PORT", "SMTP", "0 = off"),
    ("PORT", "HTTP/WebSocket", "0 = any free port"),
])
def test_a_taken_port_gives_one_line_naming_the_setting(tmp_path: Path, taken_port: int, setting: str, what: str,
                                                        hint: str) -> None:
    env = gateway_env(tmp_path, **{setting: str(taken_port)})
    if setting == "PORT":
        env["GATEWAY_SMTP_PORT"] = str(free_port())  # SMTP starts first: it must not be the one that fails
    proc = run_cli(env=env)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"jmap-gateway: cannot start: 127.0.0.1:{taken_port} ({what}) is already in use; "
        f"set GATEWAY_{setting} to a free port ({hint})"]
    assert proc.stdout == ""


def test_a_taken_port_in_json_is_one_json_line(tmp_path: Path, taken_port: int) -> None:
    proc = run_cli(env=gateway_env(tmp_path, SMTP_PORT=str(taken_port), LOG_FORMAT="json"))
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "CRITICAL" and "GATEWAY_SMTP_PORT" in record["message"]


# --- JSON logs of a real process, the README's mail, the final `stopped` line --------------------------------

def readme_smtp_one_liner(port: int) -> str:
    """The README's quick-start command that sends Bob a mail, for a gateway whose SMTP port is `port`."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r'^(\.venv/bin/python -c "import smtplib.*?")$', text, flags=re.M | re.S)
    assert match, "the README's SMTP one-liner is missing"
    command = match.group(1)
    assert "2525" in command
    return command.replace(".venv/bin/python", sys.executable).replace("2525", str(port))


async def test_json_logs_readme_mail_and_the_stopped_line(tmp_path: Path) -> None:
    smtp_port = free_port()
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("w") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=err,
            env=gateway_env(tmp_path, LOG_FORMAT="json", SMTP_PORT=str(smtp_port)))
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        port = int(line.split("127.0.0.1:")[1].split()[0].strip("/"))
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/jmap/ws", subprotocols=[Subprotocol("jmap")],
                                      additional_headers={"Authorization": basic(BOB)}, ping_interval=None)
        acc = account_id_for(BOB[0])
        await ws.send(json.dumps({"@type": "WebSocketPushEnable", "dataTypes": ["Email"]}))
        # The README's one-liner, as an operator pastes it: a mail with From, Subject, Date and Message-ID.
        sent = await asyncio.create_subprocess_shell(readme_smtp_one_liner(smtp_port), cwd=ROOT)
        assert await asyncio.wait_for(sent.wait(), 60) == 0
        push = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert push["@type"] == "StateChange" and "Email" in push["changed"][acc]
        await ws.send(json.dumps({"@type": "Request", "id": "q", "using": [CORE, MAIL], "methodCalls": [
            ["Email/query", {"accountId": acc}, "q"],
            ["Email/get", {"accountId": acc, "#ids": {"resultOf": "q", "name": "Email/query", "path": "/ids"},
                           "properties": ["from", "subject", "sentAt", "messageId"]}, "g"]]}))
        answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
        (email,) = answer["methodResponses"][1][1]["list"]
        assert email["from"] == [{"name": "Carol", "email": "carol@example.org"}]
        assert email["subject"] == "hello" and email["sentAt"] and email["messageId"]

        proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 15)
        assert ws.close_code == 1001
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    records = [json.loads(text) for text in stderr_path.read_text().splitlines()]  # every line is JSON
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["time"])
        # aiosmtpd's per-connection INFO lines (logger "mail.log") stay out at the default level.
        assert not record["logger"].startswith("mail"), record
    last = records[-1]
    assert last["logger"] == "gateway.cli" and last["message"].startswith("stopped")
    assert last["sockets_closed"] == 1
    assert isinstance(last["requests_finished"], int) and isinstance(last["requests_cancelled"], int)


# --- --help, settings, check ---------------------------------------------------------------------------------

def _documented(text: str) -> None:
    for spec in SPECS:
        default = spec.default or "unset"
        assert f"{spec.name} (default: {default}" in text, spec.name
        assert " ".join(text.split()).count(" ".join(spec.help.split())) >= 1, spec.name


def test_help_lists_every_setting_with_default_and_meaning(tmp_path: Path) -> None:
    proc = run_cli("--help", env=gateway_env(tmp_path))
    assert proc.returncode == 0
    assert "check" in proc.stdout and "settings" in proc.stdout
    _documented(proc.stdout)


def test_settings_shows_values_set_here_and_hides_secrets(tmp_path: Path) -> None:
    proc = run_cli("settings", env=gateway_env(tmp_path, ADMIN_TOKEN="s3cret-token",
                                               AMQP_URL="amqp://gw:pa55@broker:5672/"))
    assert proc.returncode == 0
    _documented(proc.stdout)
    assert "GATEWAY_PORT (default: 8080; set: 0)" in proc.stdout
    assert "s3cret-token" not in proc.stdout and "pa55" not in proc.stdout
    assert "set: amqp://gw:******@broker:5672/" in proc.stdout


def test_unknown_argument_is_a_usage_error(tmp_path: Path) -> None:
    proc = run_cli("serve", env=gateway_env(tmp_path))
    assert proc.returncode == 2 and "usage: jmap-gateway" in proc.stderr


def test_check_passes_on_a_fit_environment(tmp_path: Path) -> None:
    key = tmp_path / "jwt.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    proc = run_cli("check", env=gateway_env(tmp_path, JWT_PUBLIC_KEY=str(key), PORT=str(free_port()),
                                            SMTP_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert all(line.startswith("ok  ") for line in lines[:-1]) and lines[-1].startswith("check: all ")
    assert any("EC secp256r1 key" in line for line in lines)
    assert any(f"{tmp_path / 'data'} will be created" in line for line in lines)
    assert not (tmp_path / "data").exists()  # a check creates nothing


def test_check_names_every_problem_and_exits_2(tmp_path: Path, taken_port: int) -> None:
    (tmp_path / "not-a-dir").write_text("")
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("not a key")
    proc = run_cli("check", env=gateway_env(tmp_path, JWT_PUBLIC_KEY=str(bad_key), PORT=str(taken_port),
                                            DATA_DIR=str(tmp_path / "not-a-dir" / "data")))
    assert proc.returncode == 2
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 3, proc.stdout
    assert "is not a PEM public key" in failures[0]
    assert "not a directory" in failures[1]
    assert f"127.0.0.1:{taken_port} (HTTP/WebSocket) is already in use; set GATEWAY_PORT" in failures[2]
    assert proc.stdout.splitlines()[-1].startswith("check: 3 of ")


def test_check_reports_a_bad_setting(tmp_path: Path) -> None:
    proc = run_cli("check", env=gateway_env(tmp_path, LOG_FORMAT="xml"))
    assert proc.returncode == 2
    assert "FAIL  settings: GATEWAY_LOG_FORMAT='xml' is invalid: expected one of text, json" in proc.stdout
