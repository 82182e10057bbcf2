#!/usr/bin/env python3
"""The import graph of the gosup package: printed folder by folder, checked
for circles and for arrows that point the wrong way.

    python scripts/imports.py [PACKAGE_DIR]     (default: supervisor/ of this repository)
    python -m scripts.imports [PACKAGE_DIR]

Exit status: 0 the graph is clean, 1 a circle or a forbidden arrow (listed on
stderr), 2 PACKAGE_DIR is not a package.

The source is parsed with `ast`, never imported, and every import counts: at
module level, inside a function, under ``if TYPE_CHECKING``. An import inside
a function still ties the two modules together; it only hides the arrow from
a reader. Deferred imports are shown with a ``~``.

The layers (docs/architecture.md draws them), lowest first:

    supervisor/__init__, protocol, fileops, history,   stdlib only (config: + protocol,
      config/*                                           fileops)
    core/*                                             + config, protocol, history
    health/*, files/*                                  + core; siblings: never each other
    service/*                                          everything above
    cli/*                                              only cli, config, protocol, history
    gosup, __main__ (the entry point)                  everything: it joins cli and service

and the status path (what `gosup status` imports when it starts: the module
level of ``__main__``, ``gosup`` and ``cli/client``, followed through every module
they import at module level) never loads asyncio, psutil or loguru.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LOW = ("init", "protocol", "fileops", "history", "config")
ALLOWED: dict[str, frozenset[str]] = {
    "init": frozenset(),
    "protocol": frozenset({"init"}),
    "fileops": frozenset({"init"}),  # hashing, durable renames, dropping big files: stdlib only
    "history": frozenset({"init", "protocol", "fileops"}),  # fileops: a rotation's drop
    "config": frozenset({"init", "protocol", "fileops", "config"}),
    "core": frozenset({*LOW, "core"}),
    "health": frozenset({*LOW, "core", "health"}),
    "files": frozenset({*LOW, "core", "files"}),
    "service": frozenset({*LOW, "core", "health", "files", "service"}),
    "cli": frozenset({*LOW, "cli"}),
    # The program's entry point (gosup.py, __main__.py): joins the command
    # line and the daemon, so it may import anything; nothing imports it.
    "entry": frozenset({*LOW, "core", "health", "files", "service", "cli", "entry"}),
}
RANK = {"init": 0, "protocol": 1, "fileops": 1, "history": 2, "config": 3, "cli": 3}
RANK |= {"core": 4, "health": 5, "files": 5, "service": 6, "entry": 7}
STDLIB_ONLY = frozenset({"init", "protocol", "fileops", "history", "config"})
STATUS_ENTRIES = ("__main__", "gosup", "cli.client")
NOT_ON_STATUS_PATH = frozenset({"asyncio", "psutil", "loguru"})

# Arrows that break the rules today, each with why it is still there. The
# check tolerates exactly these (and says so); a new one fails it. Remove an
# entry when its arrow is gone.
KNOWN: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    source: str  # module names relative to the package ("" is its __init__)
    target: str  # internal: relative name; external: "ext:<top-level name>"
    deferred: bool  # inside a function or under TYPE_CHECKING
    line: int

    @property
    def external(self) -> bool:
        return self.target.startswith("ext:")


@dataclass(frozen=True)
class Problem:
    source: str
    target: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{_show(self.source)}:{self.line} -> {_show(self.target)}: {self.why}"


# -- reading the package -------------------------------------------------------------


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by its name relative to the package."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


class _Collector(ast.NodeVisitor):
    def __init__(self, package: str, module: str, is_package: bool, known: set[str]) -> None:
        self.package, self.module, self.known = package, module, known
        here = module.split(".") if module else []
        self.here = here if is_package else here[:-1]  # the package relative imports start from
        self.imports: list[Import] = []
        self._deferred = 0

    def _add(self, absolute: str, line: int, names: tuple[str, ...] = ()) -> None:
        top = absolute.split(".")[0]
        if top != self.package:
            self.imports.append(Import(self.module, f"ext:{top}", self._deferred > 0, line))
            return
        rel = absolute[len(self.package) + 1 :]
        if rel not in self.known:
            targets = [f"?{rel}"]
        else:  # `from P import m, name`: the submodule m, and P itself for name
            subs = [f"{rel}.{n}" if rel else n for n in names]
            targets = [t for t in subs if t in self.known]
            if len(targets) < len(names) or not names:
                targets.append(rel)
        for target in targets:
            self.imports.append(Import(self.module, target, self._deferred > 0, line))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        names = tuple(a.name for a in node.names)
        if node.level == 0:
            self._add(node.module or "", node.lineno, names)
            return
        base = self.here[: len(self.here) - (node.level - 1)]
        absolute = ".".join([self.package, *base, *([node.module] if node.module else [])])
        self._add(absolute, node.lineno, names)

    def _nested(self, node: ast.AST) -> None:
        self._deferred += 1
        self.generic_visit(node)
        self._deferred -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", "")
        if name != "TYPE_CHECKING":
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._deferred += 1
        for child in node.body:
            self.visit(child)
        self._deferred -= 1
        for child in node.orelse:
            self.visit(child)


def imports(root: Path) -> list[Import]:
    """Every import statement of the package at ``root``."""
    mods = modules(root)
    found: list[Import] = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        collector = _Collector(root.name, name, path.name == "__init__.py", set(mods))
        collector.visit(tree)
        found += collector.imports
    return found


# -- the rules -----------------------------------------------------------------------


def layer(module: str) -> str | None:
    """The layer a module belongs to (None: a module outside every layer)."""
    if module == "":
        return "init"
    head, _, rest = module.partition(".")
    if head in ("protocol", "history") and not rest:
        return head
    if head == "fileops" and not rest:
        return "fileops"
    if head in ("gosup", "__main__") and not rest:
        return "entry"
    if head in ("config", "core", "health", "files", "service", "cli"):
        return head
    return None


def arrow_problems(edges: list[Import]) -> list[Problem]:
    problems = []
    for imp in edges:
        if imp.external:
            continue
        if imp.target.startswith("?"):
            problems.append(Problem(imp.source, imp.target, imp.line, "no such module"))
            continue
        src, dst = layer(imp.source), layer(imp.target)
        if src is None or dst is None:
            outside = imp.source if src is None else imp.target
            why = f"{_show(outside)} is in no layer (add it to a folder)"
            problems.append(Problem(imp.source, imp.target, imp.line, why))
        elif dst not in ALLOWED[src]:
            kind = "upward" if RANK[dst] > RANK[src] else "sideways" if src != dst else "?"
            allowed = ", ".join(sorted(ALLOWED[src])) or "nothing of the package"
            why = f"{kind} arrow: {src} may import {allowed}"
            problems.append(Problem(imp.source, imp.target, imp.line, why))
    return problems


def stdlib_problems(edges: list[Import]) -> list[Problem]:
    problems = []
    for imp in edges:
        name = imp.target.removeprefix("ext:")
        if imp.external and layer(imp.source) in STDLIB_ONLY and name not in STDLIB:
            why = f"{layer(imp.source)} imports the stdlib only"
            problems.append(Problem(imp.source, imp.target, imp.line, why))
    return problems


def status_path(edges: list[Import]) -> set[str]:
    """What `gosup status` loads: the module-level imports of its entry modules, followed."""
    eager: dict[str, list[str]] = {}
    for imp in edges:
        if not imp.deferred:
            eager.setdefault(imp.source, []).append(imp.target)
    seen: set[str] = set()
    todo = [m for entry in STATUS_ENTRIES for m in (entry, *_packages(entry))]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for target in eager.get(module, []):
            todo += [target] if target.startswith("ext:") else [target, *_packages(target)]
    return seen


def _packages(module: str) -> list[str]:
    """The packages whose __init__ runs before ``module`` ("" is the top one)."""
    parts = module.split(".") if module else []
    return [".".join(parts[:n]) for n in range(len(parts))]


def status_problems(edges: list[Import]) -> list[Problem]:
    loaded = status_path(edges)
    heavy = sorted(t for t in loaded if t.removeprefix("ext:") in NOT_ON_STATUS_PATH)
    first = {imp.target: imp for imp in reversed(edges) if imp.source in loaded}
    return [
        Problem(first[t].source, t, first[t].line, "loaded on the `gosup status` path")
        for t in heavy
    ]


def cycles(edges: list[Import]) -> list[list[str]]:
    """Every circle of modules (strongly connected components, Tarjan), sorted."""
    graph: dict[str, set[str]] = {}
    for imp in edges:
        if not imp.external:
            graph.setdefault(imp.source, set()).add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


STDLIB = frozenset(sys.stdlib_module_names)


# -- output --------------------------------------------------------------------------


def _show(module: str) -> str:
    if module.startswith("ext:"):
        return module[4:]
    return module or "__init__"


FOLDERS = (
    "init",
    "protocol",
    "history",
    "config",
    "core",
    "health",
    "files",
    "service",
    "cli",
    "entry",
)


def render(names: list[str], edges: list[Import]) -> Iterator[str]:
    """The internal graph, folder by folder: ``module -> target, ~deferred``."""
    by_source: dict[str, dict[str, bool]] = {name: {} for name in names}
    for imp in edges:
        if not imp.external:
            targets = by_source[imp.source]
            targets[imp.target] = targets.get(imp.target, True) and imp.deferred
    rank = {name: n for n, name in enumerate(FOLDERS)}
    order = sorted(by_source, key=lambda m: (rank.get(layer(m) or "", 99), m))
    folder = None
    for module in order:
        group = layer(module) or "(no layer)"
        top = ("init", "protocol", "fileops", "history", "entry")
        heading = "(top level)" if group in top else f"{group}/"
        if heading != folder:
            folder = heading
            yield heading
        targets = by_source[module]
        shown = [("~" if targets[t] else "") + _show(t) for t in sorted(targets)]
        yield f"  {_show(module):<22} -> {', '.join(shown) or '(nothing)'}"


def check(root: Path) -> tuple[list[Import], list[Problem], list[list[str]]]:
    """The package's imports, its rule violations (known ones left out) and its circles."""
    edges = imports(root)
    problems = arrow_problems(edges) + stdlib_problems(edges) + status_problems(edges)
    problems = [p for p in problems if (p.source, p.target) not in KNOWN]
    return edges, problems, cycles(edges)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parent.parent / "supervisor"
    parser.add_argument("package", nargs="?", type=Path, default=default)
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    args = parser.parse_args(argv)
    root: Path = args.package.resolve()
    if not (root / "__init__.py").is_file():
        print(f"imports: {root} is not a package (no __init__.py)", file=sys.stderr)
        return 2
    edges, problems, circles = check(root)
    if not args.quiet:
        names = list(modules(root))
        print(f"{root.name}: {len(names)} modules (~ = imported in a function or for types)")
        for line in render(names, edges):
            print(line)
    present = {(i.source, i.target) for i in edges}
    for (source, target), why in KNOWN.items():
        if (source, target) in present:
            print(f"known, to fix: {source} -> {target} ({why})", file=sys.stderr)
    for circle in circles:
        print(f"circle: {' <-> '.join(_show(m) for m in circle)}", file=sys.stderr)
    for problem in problems:
        print(f"forbidden: {problem}", file=sys.stderr)
    return 1 if problems or circles else 0


if __name__ == "__main__":
    sys.exit(main())
