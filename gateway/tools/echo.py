"""`python -m gateway.tools.echo`: a WebSocket echo server on the gateway's own transport stack, without JMAP.

Same front protocol, picows transport, coalescer, permessage-deflate and limits as the gateway, so external
conformance suites (Autobahn's fuzzing client, see `scripts/autobahn.sh`) test what production runs. Every
message comes back with its opcode; there is no authentication and no subprotocol requirement.
Settings are the gateway's (`GATEWAY_PORT` defaults to 9001 here, `GATEWAY_MAX_MESSAGE_BYTES` to 64 MiB).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import uvloop

from gateway.app import Gateway
from gateway.cli import configure_logging
from gateway.config import ConfigError, Settings, load
from gateway.directory import Directory, Principal
from gateway.session import EchoSession
from gateway.transport.front import RequestHead
from gateway.upstream.core import CoreOnly

_DEFAULTS = {
    "GATEWAY_PORT": "9001",
    "GATEWAY_REQUIRE_SUBPROTOCOL": "false",
    "GATEWAY_MAX_MESSAGE_BYTES": str(64 * 1024 * 1024),
    "GATEWAY_MAX_CONNECTIONS_PER_USER": "100000",
    "GATEWAY_PING_INTERVAL": "0",
    "GATEWAY_SMTP_PORT": "0",
}
_ECHO = Directory(()).principal("echo")


async def _anyone(head: RequestHead) -> Principal:
    return _ECHO  # no authentication: conformance suites send none


def echo_gateway(settings: Settings) -> Gateway:
    """A gateway whose sessions echo every message, with no authentication and no JMAP."""
    return Gateway(settings, request_path=CoreOnly(), session_class=EchoSession, upgrade_auth=_anyone)


async def serve() -> None:
    settings = load({**_DEFAULTS, **os.environ})
    configure_logging(settings.log_level)
    gateway = echo_gateway(settings)
    await gateway.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo server listening on ws://{settings.host}:{gateway.port}/jmap/ws", flush=True)
    await stop.wait()
    await gateway.stop(grace=1)


def main() -> int:
    try:
        uvloop.run(serve())
    except ConfigError as exc:
        print(f"echo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
