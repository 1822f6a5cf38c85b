"""The package's shape, checked: imports point down the layers, no import circles, and no
long function without a reason written next to it (docs/architecture.md has the picture)."""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "udp_tunnel"

# Which parts of the package each part may import (always itself, and the standard library).
LAYERS = {
    "wire": set(),
    "addr": set(),
    "core": {"wire", "addr"},
    "ops": {"core", "wire", "addr"},
    "io": {"ops", "core", "wire", "addr"},
    "cli": {"agent", "ops", "core", "wire", "addr", "config", "demo", "version"},
    "agent": {"io", "ops", "core", "wire", "addr", "config", "version"},
    "demo": {"cli", "version"},
    "config": {"core", "wire", "addr", "cli", "ops"},
    "version": set(),  # the package's __init__ (its version)
    "main": {"cli"},
}
LONG = 50  # lines; a longer function says why on its def line ("# long: ...")


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def part(module: str) -> str:
    """udp_tunnel.core.outside -> core, udp_tunnel.cli -> cli, udp_tunnel -> version."""
    parts = module.split(".")
    if len(parts) == 1:
        return "version"
    if parts[1] == "__main__":
        return "main"
    return parts[1]


def imports(name: str, path: pathlib.Path) -> set[str]:
    """Every udp_tunnel module `name` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("udp_tunnel"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("udp_tunnel") \
                and node.level == 0:
            for a in node.names:  # `from udp_tunnel.core import outside` imports a module
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    found.discard(name)
    return found


MODULES = modules()
GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def test_every_module_is_in_a_known_layer():
    assert {part(m) for m in MODULES} <= set(LAYERS)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_from_its_own_layer_and_those_below(name):
    mine = part(name)
    upward = sorted(m for m in GRAPH[name] if part(m) != mine and part(m) not in LAYERS[mine])
    assert upward == [], f"{name} ({mine}) imports {upward}"


def test_the_wire_format_imports_nothing_but_the_standard_library():
    for name in MODULES:
        if part(name) == "wire":
            assert all(part(m) == "wire" for m in GRAPH[name]), name


def test_no_import_circle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH.get(m, ())):
            if n not in GRAPH:
                continue
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_check_catches_an_upward_import(tmp_path):
    """The checks above can fail: a core module that imports the I/O layer is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from udp_tunnel.io import loop\n")
    assert part("udp_tunnel.io.loop") not in LAYERS["core"]
    assert imports("udp_tunnel.core.bad", bad) == {"udp_tunnel.io.loop"}


def long_functions(path: pathlib.Path, root: pathlib.Path = SRC) -> list[str]:
    lines = path.read_text().splitlines()
    out = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            header = lines[node.lineno - 1] + (lines[node.lineno] if node.lineno < len(lines) else "")
            if length > LONG and "# long:" not in header:
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_is_longer_than_fifty_lines_without_a_reason_next_to_it():
    found = [f for path in MODULES.values() for f in long_functions(path)]
    assert found == [], "\n".join(found)


def test_the_long_function_check_can_fail_and_takes_a_reason(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n" + "    x = 1\n" * 60 + "def g():  # long: a table\n" + "    x = 1\n" * 60)
    assert long_functions(f, tmp_path) == ["x.py:1 f (61 lines)"]
