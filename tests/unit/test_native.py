"""Tests of gateway.native: which compiled modules count as production, what status() reports and what
GATEWAY_REQUIRE_NATIVE requires; every module built from native/ is either a production module with a twin or a
support module (benchmark and test helpers) that is never required."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from gateway import native
from tests.native_impl import load_bench, load_impl

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p.stem for p in (ROOT / "native" / "gateway").glob("*.pyx"))


def test_every_native_source_is_classified_once() -> None:
    assert set(native.NATIVE_MODULES).isdisjoint(native.SUPPORT_MODULES)
    assert sorted([*native.NATIVE_MODULES, *native.SUPPORT_MODULES]) == SOURCES


@pytest.mark.parametrize("name", native.NATIVE_MODULES)
def test_production_modules_have_a_twin_a_contract_and_a_stub(name: str) -> None:
    assert importlib.import_module(f"gateway.{name}_py").__name__ == f"gateway.{name}_py"
    assert (ROOT / "native" / "gateway" / f"{name}.pxd").is_file()  # DESIGN.md §2: mirrors the package path
    assert (ROOT / "gateway" / f"{name}.pyi").is_file()


@pytest.mark.parametrize("name", native.SUPPORT_MODULES)
def test_support_modules_have_no_twin(name: str) -> None:
    with pytest.raises(ImportError):
        importlib.import_module(f"gateway.{name}_py")
    assert (ROOT / "gateway" / f"{name}.pyi").is_file()


def test_status_reports_the_production_modules_only() -> None:
    for name in native.NATIVE_MODULES:
        load_impl(name, "native")  # fails under CI=true when a module was not built
    load_bench()
    assert native.status() == dict.fromkeys(native.NATIVE_MODULES, True)
    native.require_all()


def test_a_missing_support_module_is_not_required(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in native.NATIVE_MODULES:
        load_impl(name, "native")
    for name in native.SUPPORT_MODULES:
        monkeypatch.setitem(sys.modules, f"gateway.{name}", None)  # makes the import fail
    native.require_all()
    assert set(native.status()) == set(native.NATIVE_MODULES)


def test_a_missing_production_module_is_reported_and_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gateway._broadcast", None)
    assert native.status()["_broadcast"] is False
    with pytest.raises(native.NativeMissing, match=r"gateway\._broadcast\b"):
        native.require_all()
    # Nothing falls back silently: the twin is what load() gives, and is_native says so.
    module = native.load("_broadcast", native=True)
    assert module.__name__ == "gateway._broadcast_py" and not native.is_native(module)
