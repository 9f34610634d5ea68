"""The project's import graph read from source (every import statement: top level, inside functions, under
``TYPE_CHECKING``), for the layout tests."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dama_settings", "dama_client", "dama_engine", "jobstore", "api", "worker", "migrations")


@dataclass(frozen=True)
class Import:
    importer: str  # the importing module
    target: str  # the imported module (a package's __init__ is the package's name)
    names: tuple[str, ...]  # the names taken from it (empty for ``import x``)
    line: int
    via: str  # the module named in the statement (``from via import names``)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def _absolute(module: str, path: Path, level: int, name: str | None) -> str:
    if not level:
        return name or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(modules: dict[str, Path]) -> Iterator[Import]:
    """Every import of a project module by a project module."""
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        yield Import(module, alias.name, (), node.lineno, alias.name)
            elif isinstance(node, ast.ImportFrom):
                via = _absolute(module, path, node.level, node.module)
                if via not in modules:
                    continue
                plain = tuple(a.name for a in node.names if f"{via}.{a.name}" not in modules)
                if plain:
                    yield Import(module, via, plain, node.lineno, via)
                for alias in node.names:
                    if f"{via}.{alias.name}" in modules:
                        yield Import(module, f"{via}.{alias.name}", (), node.lineno, via)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found
