"""The import graph of the internvl_tune package, and what breaks its layers: a cycle among modules, a cycle among
packages, a command module imported from below, a private name imported from another module.

    python tools/import_graph.py          # prints each module's imports of the package; exit 1 on any of those

Every `import` / `from ... import` of an `internvl_tune` module counts, at module level or inside a function
(a deferred import only hides a circle until the day someone moves it up). `from internvl_tune.pkg import name`
counts as an import of `internvl_tune.pkg.name` when that is a module, else of `internvl_tune.pkg`.

Packages are the sub-packages (`data`, `model`, ...) and the top-level modules (`config`, `judge`, ...): one that
imports another stands above it, so two that import each other have no order, and what both need belongs in the
lower one. The command modules (`cli`, and `chat` under it) are the top: nothing else imports them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "internvl_tune"


def modules(src: Path = SRC) -> dict[str, Path]:
    """Module name -> file, for every module of the package (a package is named by its `__init__.py`)."""
    found = {}
    for file in sorted((src / PACKAGE).rglob("*.py")):
        parts = file.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    known = modules(src)
    graph: dict[str, set[str]] = {}
    for name, file in known.items():
        is_package = file.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in known:  # `import a.b.c` of a non-module attribute path
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


COMMAND_MODULES = (f"{PACKAGE}.cli", f"{PACKAGE}.chat")


def package_of(module: str) -> str:
    """`internvl_tune.data.jsonl` -> `internvl_tune.data`; a top-level module (`internvl_tune.config`) is its own."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Package -> the other packages its modules import."""
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = packages.setdefault(package_of(module), set())
        edges.update(package_of(t) for t in targets if package_of(t) not in (package_of(module), PACKAGE))
    return packages


def command_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, command module) for every import of a command module from outside the CLI."""
    return sorted((m, t) for m, ts in graph.items() for t in ts if t in COMMAND_MODULES and m != COMMAND_MODULES[0])


def private_imports(src: Path = SRC) -> list[tuple[str, str]]:
    """(importer, `module.name`) for every `_name` (not a dunder) imported from another module of the package."""
    found = []
    for name, file in modules(src).items():
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith(PACKAGE):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and node.module != name:
                        found.append((name, f"{node.module}.{alias.name}"))
    return sorted(found)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; [] when acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def main() -> int:
    graph = import_graph()
    for name in sorted(graph):
        print(f"{name}: {', '.join(sorted(graph[name])) or '-'}")
    cycles = find_cycles(graph)
    package_cycles = find_cycles(package_graph(graph))
    problems = [f"cycle: {' <-> '.join(c)}" for c in cycles]
    problems += [f"package cycle: {' <-> '.join(c)}" for c in package_cycles]
    problems += [f"{m} imports the command module {t}" for m, t in command_imports(graph)]
    problems += [f"{m} imports the private {t}" for m, t in private_imports()]
    for problem in problems:
        print(problem, file=sys.stderr)
    print(
        f"{len(graph)} modules, {sum(map(len, graph.values()))} imports, {len(package_cycles)} package cycles, "
        f"{len(problems) - len(cycles) - len(package_cycles)} layer breaks, {len(cycles)} cycles"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
