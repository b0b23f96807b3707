"""Fixtures shared by the embedded backend's unit tests: a backend on a fresh SQLite file, and Bob's client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.unit.test_backend_support import BOB, Client, Env, backend_env


@pytest.fixture
async def env(tmp_path: Any) -> AsyncIterator[Env]:
    async with backend_env(str(tmp_path / "mail.sqlite3")) as e:
        yield e


@pytest.fixture
def bob(env: Env) -> Client:
    return env.client(BOB)
