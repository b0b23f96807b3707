"""Shared fixtures: a real gateway on a loopback port in the test's (uvloop) event loop, and clients for it."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
import websockets

from gateway.app import Gateway
from gateway.config import load
from gateway.upstream.core import CoreOnly

ADMIN = "admin-secret"
BOB = ("bob@example.com", "bob-pw")
ALICE = ("alice@example.com", "alice-pw")
CAROL = ("carol@example.com", "carol-pw")
USERS = ",".join(f"{u}:{p}" for u, p in (BOB, ALICE, CAROL))


def basic(user: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()


def settings_env(**overrides: str) -> dict[str, str]:
    env = {"GATEWAY_PORT": "0", "GATEWAY_USERS": USERS, "GATEWAY_ADMIN_TOKEN": ADMIN,
           "GATEWAY_SMTP_PORT": "0", "GATEWAY_DB": ":memory:", "GATEWAY_LOG_LEVEL": "WARNING",
           # In-process gateways would freeze the test process's objects too (tests/e2e/test_teardown.py and the
           # gateway processes of the integration tests run the freezing).
           "GATEWAY_GC_FREEZE_AFTER": "0"}
    env.update(overrides)
    return env


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every async test runs on uvloop, the loop the gateway runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Start gateways with settings overrides (GATEWAY_* names without the prefix, e.g. PING_INTERVAL="1")."""
    started: list[Gateway] = []

    async def factory(request_path: Any = None, backend: bool = False, **overrides: str) -> Gateway:
        """`backend=True` runs the embedded mail backend (the default role); otherwise the transport and push
        tests use the core request path (Core/echo only), so their expectations do not depend on mail state."""
        env = settings_env(**{f"GATEWAY_{k}": v for k, v in overrides.items()})
        if request_path is None and not backend and "UPSTREAM_URL" not in overrides:
            request_path = CoreOnly()  # with UPSTREAM_URL the gateway is in front mode: its proxy path
        gw = Gateway(load(env), request_path=request_path)
        await gw.start()
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        await gw.stop(grace=0)


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


def ws_url(gw: Gateway, query: str = "") -> str:
    return f"ws://127.0.0.1:{gw.port}/jmap/ws" + (f"?{query}" if query else "")


def http_url(gw: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


async def connect(gw: Gateway, user: tuple[str, str] = BOB, **kwargs: Any) -> websockets.ClientConnection:
    kwargs.setdefault("subprotocols", ["jmap"])
    kwargs.setdefault("additional_headers", {"Authorization": basic(user)})
    kwargs.setdefault("compression", None)
    kwargs.setdefault("ping_interval", None)
    return await websockets.connect(ws_url(gw), **kwargs)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
