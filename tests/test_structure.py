"""The package's shape: no import cycle between subpackages, leaf modules stay leaves, and no
module grows past 400 lines (STYLE.md: split a module once it passes ~400 lines).

Every import counts, at module level or inside a function: a lazy import that would close a
cycle is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"liftq_cli": ROOT / "src" / "liftq_cli", "liftq_kernels": ROOT / "kernels"}
MAX_LINES = 400


def sources() -> list[Path]:
    return sorted([*(ROOT / "src" / "liftq_cli").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])


def module_name(path: Path) -> str:
    base = ROOT / "src" if "src" in path.relative_to(ROOT).parts[:1] else ROOT / "kernels"
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to: liftq_cli.quant.job ->
    liftq_cli.quant; liftq_cli (the package __init__) -> liftq_cli.__init__; the kernels
    package is one unit."""
    parts = module.split(".")
    if parts[0] == "liftq_kernels":
        return "liftq_kernels"
    return f"liftq_cli.{parts[1]}" if len(parts) > 1 else "liftq_cli.__init__"


def imports(path: Path) -> set[str]:
    """Every liftq module `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from liftq_cli.quant import blocks` imports the module liftq_cli.quant.blocks
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    known = {module_name(p) for p in sources()}
    edges: dict[str, set[str]] = {}
    for path in sources():
        source = unit(module_name(path))
        for target in imports(path):
            while target not in known and "." in target:  # a name imported from a module
                target = target.rpartition(".")[0]
            if target in known and unit(target) != source:
                edges.setdefault(source, set()).add(unit(target))
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_subpackages():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


@pytest.mark.parametrize("leaf", ["lattice_config.py", "errors.py", "version.py"])
def test_leaf_modules_import_nothing_of_liftq(leaf):
    assert imports(ROOT / "src" / "liftq_cli" / leaf) == set()


def test_the_layering_holds():
    """The dependency direction the issue tracker agreed on (issue 18): io and plan sit
    below the quantizer; the recipe below it; nothing below imports the CLI."""
    edges = graph()
    below = {
        "liftq_cli.io": {"liftq_cli.quant", "liftq_cli.plan", "liftq_cli.recipe"},
        "liftq_cli.plan": {"liftq_cli.quant", "liftq_cli.recipe", "liftq_cli.runtime"},
        "liftq_cli.recipe": {"liftq_cli.quant", "liftq_cli.runtime"},
        "liftq_cli.quant": {"liftq_cli.runtime", "liftq_cli.evaluate", "liftq_cli.hub"},
    }
    for source, forbidden in below.items():
        assert not edges.get(source, set()) & forbidden, (source, edges.get(source))
    users = [s for s, targets in edges.items() if "liftq_cli.cli" in targets]
    assert users == ["liftq_cli.__main__"], users  # `python -m liftq_cli` (torchrun) is the CLI


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by stage"
