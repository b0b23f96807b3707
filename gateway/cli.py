"""Command-line entry point (`python -m gateway`, `jmap-gateway`): settings, logging, event loop, signals.

A bad setting exits with status 2 and one line naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import uvloop

from gateway import native
from gateway.config import ConfigError, Settings, load
from gateway.errors import GatewayError


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # picows logs every accepted connection at INFO; at 100k connections that is noise, not information.
    logging.getLogger("picows").setLevel(max(logging.WARNING, logging.getLevelName(level)))


async def serve(settings: Settings) -> None:
    from gateway.app import Gateway

    gateway = Gateway(settings)
    try:
        await gateway.start()
    except GatewayError as exc:
        # e.g. the RabbitMQ bus could not be set up: one clear line, then a non-zero exit.
        print(f"jmap-gateway: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"jmap-push-gateway listening on {settings.base_url(gateway.port)} "
          f"(WebSocket ws{settings.base_url(gateway.port).removeprefix('http')}/jmap/ws)", flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down")
    await gateway.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load(os.environ)
    except ConfigError as exc:
        print(f"jmap-gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if settings.require_native:
        try:
            native.require_all()
        except native.NativeMissing as exc:
            print(f"jmap-gateway: GATEWAY_REQUIRE_NATIVE is set but {exc}", file=sys.stderr)
            return 2
    uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
