"""The one way tests pick a native module or its twin: a missing build fails under CI=true, else skips."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

from gateway import native


def load_impl(name: str, which: str) -> ModuleType:
    """`which` is "native" or "python"; the parameter of every twin-comparing fixture."""
    if which == "python":
        return native.load(name, native=False)
    module = native.load(name, native=True)
    if native.is_native(module):
        return module
    _missing(name)


def load_bench() -> ModuleType:
    """gateway._bench, the compiled test and benchmark helpers (it has no twin)."""
    try:
        return importlib.import_module("gateway._bench")
    except (ImportError, ValueError):
        _missing("_bench")


def _missing(name: str) -> NoReturn:
    # A missing build must not turn into a green run in CI: there the native half of every test fails.
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"gateway.{name} is not compiled (run `make native`)")
    pytest.skip(f"gateway.{name} is not compiled (run `make native`)")
