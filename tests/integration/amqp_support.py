"""Helpers for the RabbitMQ integration tests: where the broker is and whether it is up, a TCP proxy that can
cut a client's connection, the broker's own view of bindings, queues and connections, and condition polling.

No test logic and no fixtures here. A missing broker skips the tests, except under CI=true: there it fails
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from yarl import URL

BROKER_URL = os.environ.get("GATEWAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the RabbitMQ integration tests must run)", pytrace=False)
    pytest.skip(reason)


def require_broker() -> str:
    """The broker's URL; skip (fail under CI) if nothing accepts TCP connections there."""
    url = URL(BROKER_URL)
    host, port = url.host or "127.0.0.1", url.port or 5672
    try:
        with socket.create_connection((host, port), timeout=2):
            pass
    except OSError as exc:
        _unavailable(f"RabbitMQ is not reachable at {host}:{port} ({exc}); start it with "
                     "`rabbitmq-server -detached` or set GATEWAY_AMQP_URL")
    return BROKER_URL


def require_rabbitmqctl() -> None:
    """Skip (fail under CI) the broker-side checks when rabbitmqctl is not on this machine."""
    if shutil.which("rabbitmqctl") is None:
        _unavailable("rabbitmqctl is not installed here; the broker-side checks need it")


async def rabbitmqctl_json(*args: str) -> list[dict[str, Any]]:
    """Run `rabbitmqctl <args> --formatter json` and return its rows."""
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "-q", *args, "--formatter", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {err.decode(errors='replace')}")
    rows: list[dict[str, Any]] = json.loads(out or b"[]")
    return rows


async def bindings_of(exchange: str) -> set[tuple[str, str]]:
    """(routing key, destination queue) of every binding whose source is `exchange`."""
    rows = await rabbitmqctl_json("list_bindings", "source_name", "routing_key", "destination_name")
    return {(r["routing_key"], r["destination_name"]) for r in rows if r["source_name"] == exchange}


async def queues() -> dict[str, dict[str, Any]]:
    """Every queue of the default vhost by name, with its type, arguments and message counts."""
    rows = await rabbitmqctl_json("list_queues", "name", "type", "arguments", "exclusive", "durable",
                                  "messages_ready", "messages_unacknowledged")
    return {r["name"]: r for r in rows}


async def connection_names() -> set[str]:
    """The `connection_name` client property of every open connection."""
    rows = await rabbitmqctl_json("list_connections", "client_properties")
    names: set[str] = set()
    for row in rows:
        props = row.get("client_properties")
        # rabbitmqctl renders the AMQP table as a list of [key, type, value] triples.
        if isinstance(props, list):
            for item in props:
                if isinstance(item, list) and len(item) == 3 and item[0] == "connection_name":
                    names.add(str(item[2]))
        elif isinstance(props, dict) and "connection_name" in props:
            names.add(str(props["connection_name"]))
    return names


async def eventually(predicate: Callable[[], bool], *, timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def eventually_async(predicate: Callable[[], Any], *, timeout: float = 15.0,
                           what: str = "condition") -> None:
    """Like `eventually` for an async predicate (e.g. one that asks rabbitmqctl)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SeverableProxy:
    """A TCP relay between a client and the broker that can cut every connection and refuse new ones, and hold
    back what the broker sends.

    `sever()` aborts both sides of every relayed connection (the broker sees its client vanish and drops the
    exclusive queue) and closes new connections at once until `restore()`. `hold()` keeps every byte from the
    broker in the proxy (`held()` shows them) until `release()` writes them to the client in one write, so
    that the client reads many deliveries at once; `sever()` while holding drops them.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.refusing = False
        self.port = 0
        self._holding = False
        self._held: list[tuple[asyncio.StreamWriter, bytearray]] = []

    @classmethod
    def to_broker(cls) -> SeverableProxy:
        url = URL(BROKER_URL)
        return cls(url.host or "127.0.0.1", url.port or 5672)

    def url(self) -> str:
        """The broker URL with host and port replaced by this proxy's."""
        return str(URL(BROKER_URL).with_host("127.0.0.1").with_port(self.port))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            _abort(writer)
            return
        self._writers.update((writer, up_writer))
        for src, dst, from_broker in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pipe(src, dst, from_broker))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_broker: bool) -> None:
        try:
            while data := await src.read(65536):
                if from_broker and self._holding:
                    for held_dst, buf in self._held:
                        if held_dst is dst:
                            buf += data
                            break
                    else:
                        self._held.append((dst, bytearray(data)))
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            _abort(dst)
            self._writers.discard(dst)

    def hold(self) -> None:
        self._holding = True

    def held(self) -> bytes:
        """Everything held back so far, of every connection."""
        return b"".join(bytes(buf) for _, buf in self._held)

    def release(self) -> None:
        self._holding = False
        held, self._held = self._held, []
        for dst, buf in held:
            if not dst.is_closing():  # its connection may have gone meanwhile
                dst.write(bytes(buf))

    def sever(self) -> None:
        self._holding = False
        self._held.clear()
        self.refusing = True
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()

    def restore(self) -> None:
        self.refusing = False

    async def close(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class SilentServer:
    """Accepts TCP connections and never answers: a broker that hangs during the handshake."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)

    async def close(self) -> None:
        for writer in self._writers:
            _abort(writer)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class TlsRelay:
    """A TLS server in front of the broker's plain port (what a broker with a TLS listener looks like to a
    client), with a throwaway self-signed certificate for 127.0.0.1 written to `cafile`."""

    def __init__(self, cafile: str) -> None:
        self.cafile = cafile
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        import datetime
        import ipaddress
        import ssl

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        pem = cert.public_bytes(serialization.Encoding.PEM)
        with open(self.cafile, "wb") as fh:
            fh.write(pem)
        keyfile = self.cafile + ".key"
        with open(keyfile, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cafile, keyfile)
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, query: str) -> str:
        return str(URL(BROKER_URL).with_scheme("amqps").with_host("127.0.0.1").with_port(self.port)) + query

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        url = URL(BROKER_URL)
        up_reader, up_writer = await asyncio.open_connection(url.host or "127.0.0.1", url.port or 5672)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            _abort(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        for writer in self._writers:
            _abort(writer)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()
