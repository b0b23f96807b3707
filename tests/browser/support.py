"""Helpers for the real-browser tests: headless Chromium under WebDriver (Debian's `chromium` and
`chromium-driver`), a same-origin front that serves the test page and relays the rest to the gateway while
recording the bytes, and a scanner of the WebSocket frames it saw.

No test logic here. A missing Chromium skips the tests, except under CI=true: there it fails them (`.ci/run`
installs both packages).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
PAGE = Path(__file__).with_name("push_page.html")

# Without the background-networking flags Chromium keeps dialling out (component updates, sync, field trials),
# which a closed network refuses; --no-sandbox because the tests run as root.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(reason)


def require_chromium() -> tuple[str, str]:
    """Paths of the Chromium binary and its chromedriver; skip (fail under CI) when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        _unavailable("Chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    assert browser is not None and driver is not None
    return browser, driver


def start_chromium(user_data_dir: Path) -> Any:
    """A headless Chromium under chromedriver with a fresh profile. Blocking: call it in a thread from a loop.

    Both binaries are given by path, so Selenium Manager (which would download drivers) never runs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


# --- the same-origin front -----------------------------------------------------------------------------------

@dataclass
class Flow:
    """One relayed connection: the client's first request head and every byte after it, both ways."""

    head: bytes
    to_server: bytearray = field(default_factory=bytearray)  # after the head
    to_client: bytearray = field(default_factory=bytearray)
    client: asyncio.StreamWriter | None = field(default=None, repr=False, compare=False)

    def abort(self) -> None:
        """Drop the browser's connection, as a network failure would."""
        if self.client is not None:
            _abort(self.client)

    @property
    def path(self) -> str:
        return self.head.split(b" ", 2)[1].decode("latin-1")

    @property
    def is_websocket(self) -> bool:
        return header(self.head, "upgrade").lower() == "websocket"


def header(head: bytes, name: str) -> str:
    """The value of the header `name` in an HTTP head ('' when absent; repeated ones joined by ', ')."""
    values = []
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == name:
            values.append(value.strip())
    return ", ".join(values)


class SameOriginFront:
    """A loopback HTTP front, like the reverse proxy a webmail sits behind: it answers `GET /` with the test page
    and relays every connection whose first request is for /jmap/ or /.well-known/ to the gateway byte for byte
    (WebSocket upgrades included), keeping a copy of each as a Flow. The page and the gateway thus share one
    origin, which is what spares the page CORS (the gateway sends no CORS headers).

    `upstream_port` may be set after start(), so the gateway can be started with this front's URL as its
    GATEWAY_PUBLIC_URL."""

    def __init__(self, page: bytes) -> None:
        self.page = page
        self.upstream_port = 0
        self.port = 0
        self.flows: list[Flow] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._writers.add(writer)
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
                return
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if not (path.startswith(b"/jmap/") or path.startswith(b"/.well-known/")):
                self._answer_locally(writer, path)
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._writers.add(up_writer)
            flow = Flow(head, client=writer)
            self.flows.append(flow)
            up_writer.write(head)
            await asyncio.gather(self._pipe(reader, up_writer, flow.to_server),
                                 self._pipe(up_reader, writer, flow.to_client))
        finally:
            _abort(writer)
            self._writers.discard(writer)

    def _answer_locally(self, writer: asyncio.StreamWriter, path: bytes) -> None:
        if path in (b"/", b"/index.html"):
            status, body, kind = b"200 OK", self.page, b"text/html; charset=utf-8"
        else:
            status, body, kind = b"404 Not Found", b"not here\n", b"text/plain"
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind + b"\r\nCache-Control: no-store\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, copy: bytearray) -> None:
        try:
            while data := await src.read(65536):
                copy += data
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            # One side ended: end the other, as a proxy does when either peer goes away.
            with contextlib.suppress(Exception):
                dst.write_eof()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            _abort(writer)
        # Aborted transports end every relay at once; wait for them, so no handler outlives the test's loop.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def websocket_flows(self) -> list[Flow]:
        return [f for f in self.flows if f.is_websocket]

    def event_source_flows(self) -> list[Flow]:
        """Connections that carried an event-source request: as their first request, or after others (browsers
        reuse a keep-alive connection for an EventSource)."""
        return [f for f in self.flows if b"GET /jmap/eventsource/" in f.head + f.to_server]


def _abort(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.transport.abort()


# --- WebSocket frames as seen on the wire ----------------------------------------------------------------------

class Frame(NamedTuple):
    fin: bool
    rsv1: bool  # RFC 7692 §6: set on the first frame of a compressed message
    opcode: int
    payload: bytes  # unmasked


def scan_frames(data: bytes | bytearray) -> list[Frame]:
    """The complete RFC 6455 §5.2 frames at the start of `data` (masked or not); a trailing partial frame is
    ignored."""
    frames: list[Frame] = []
    i, n = 0, len(data)
    while i + 2 <= n:
        b0, b1 = data[i], data[i + 1]
        length, j = b1 & 0x7F, i + 2
        if length == 126:
            if j + 2 > n:
                break
            (length,) = struct.unpack_from("!H", data, j)
            j += 2
        elif length == 127:
            if j + 8 > n:
                break
            (length,) = struct.unpack_from("!Q", data, j)
            j += 8
        mask = b""
        if b1 & 0x80:  # client to server: a masking key precedes the payload
            mask, j = bytes(data[j:j + 4]), j + 4
        if j + length > n:
            break
        payload = bytes(data[j:j + length])
        if mask:
            payload = bytes(b ^ mask[k % 4] for k, b in enumerate(payload))
        frames.append(Frame(bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F, payload))
        i = j + length
    return frames


def text_messages(frames: list[Frame]) -> list[tuple[bool, str]]:
    """(compressed, text) of each unfragmented text message; compressed ones inflated as RFC 7692 §7.2.2 says
    (append 00 00 ff ff, raw DEFLATE). Every agreed offer has no context takeover, so each inflates alone."""
    out: list[tuple[bool, str]] = []
    for f in frames:
        if f.opcode == 1 and f.fin:
            data = zlib.decompressobj(-15).decompress(f.payload + b"\x00\x00\xff\xff") if f.rsv1 else f.payload
            out.append((f.rsv1, data.decode("utf-8")))
    return out


def split_response(data: bytes | bytearray) -> tuple[bytes, bytes]:
    """An upgrade's answer as (response head, the frames after it)."""
    end = bytes(data).find(b"\r\n\r\n")
    assert end >= 0, "no complete response head in the relayed bytes"
    return bytes(data[:end + 4]), bytes(data[end + 4:])
