"""Chooses between the compiled hot-path modules and their pure-Python twins, and says which one runs.

Convention: native module `gateway._<name>` (built from `native/gateway/_<name>.pyx`, its C-level contract in
the `.pxd` beside it) and its twin `gateway._<name>_py` expose the same API. Nothing falls back silently: the
choice is logged, exported in `/metrics`, and `GATEWAY_REQUIRE_NATIVE=1` makes a missing native module fatal.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# The production modules: each has a twin, status() reports them, require_all() requires them.
NATIVE_MODULES: tuple[str, ...] = ("_coalesce", "_deflate", "_broadcast", "_ingest")
# Also built from native/ but no part of the gateway: benchmark and test helpers, without a twin; never
# required, never reported, never loaded by the gateway.
SUPPORT_MODULES: tuple[str, ...] = ("_bench",)


class NativeMissing(RuntimeError):
    """A compiled module is required but cannot be imported."""


def load(name: str, *, native: bool = True) -> ModuleType:
    """The native module `gateway.<name>` when `native` and importable, else its twin `gateway.<name>_py`."""
    if native:
        try:
            return importlib.import_module(f"gateway.{name}")
        except (ImportError, ValueError):
            # ValueError: Cython's binary-compatibility check (e.g. a picows other than the one built against).
            pass
    return importlib.import_module(f"gateway.{name}_py")


def is_native(module: ModuleType) -> bool:
    return not module.__name__.endswith("_py")


def status() -> dict[str, bool]:
    """Which native modules import on this machine (only modules whose twin exists are considered)."""
    result: dict[str, bool] = {}
    for name in NATIVE_MODULES:
        try:
            importlib.import_module(f"gateway.{name}_py")
        except ImportError:
            continue
        try:
            importlib.import_module(f"gateway.{name}")
            result[name] = True
        except (ImportError, ValueError):
            result[name] = False
    return result


def require_all() -> None:
    missing = [name for name, ok in status().items() if not ok]
    if missing:
        raise NativeMissing("compiled modules missing: " + ", ".join(f"gateway.{m}" for m in missing)
                            + " (build them with `make native`)")


def main() -> int:
    """`python -m gateway.native` (the last step of `make native`): one line saying which modules are compiled."""
    status_ = status()
    missing = [f"gateway.{name}" for name, ok in status_.items() if not ok]
    if missing:
        print("native modules missing: " + ", ".join(missing) + " (their Python twins would run)")
        return 1
    print("native build done: " + ", ".join(f"gateway.{name}" for name in status_) + " compiled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
