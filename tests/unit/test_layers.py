"""The shape of the package: no import cycles between modules, and the layer contracts of pyproject.toml
(`[tool.importlinter]`, which `make lint` checks with lint-imports) hold. The graph is grimp's, the library
import-linter is built on; function-level imports count too, so a cycle cannot hide behind a late import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(m: str) -> None:
        nonlocal counter
        index[m] = low[m] = counter
        counter += 1
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("gateway", include_external_packages=False)
    # A package imports its own modules through __init__ only when it re-exports them; ours do not.
    assert _cycles(graph) == []


def test_no_transport_module_imports_the_composition_root() -> None:
    graph = grimp.build_graph("gateway")
    transport = {m for m in graph.modules if m.startswith("gateway.transport")}
    for module in transport:
        assert not graph.find_modules_directly_imported_by(module) & {"gateway.app", "gateway.roles", "gateway.cli"}


def test_the_layer_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
