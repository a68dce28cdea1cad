"""Find import circles among a package's modules, counting imports inside functions too.

Each layer of pyhv uses only the layers below it (DESIGN.md), so no module may import, directly
or through others, a module that imports it back -- at module level or inside a function (a
late import hides a circle, it does not remove it). Imports under `if TYPE_CHECKING:` are for
the type checker only and are not counted.

An import `from pyhv.a import b` counts as importing the module pyhv.a.b if there is one, else
pyhv.a. A package's own __init__ is not counted as imported by its submodules (Python runs it
first, but that order is not a dependency the code chose).

usage: python tools/import_cycles.py [--typing] [PACKAGE_DIR ...]   (default: pyhv)
Prints each circle as a chain of `module:line` hops and exits 1 if there is any. With --typing,
the imports under `if TYPE_CHECKING:` count too (a circle of annotations only: a back-reference,
e.g. a VP's `partition`, that no import at run time follows).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(
    tree: ast.Module, name: str, is_package: bool, typing: bool = False
) -> list[tuple[str, int]]:
    """(imported name, line) for every import the module runs, at any depth (and, with
    `typing`, those for the type checker only)."""
    out: list[tuple[str, int]] = []
    package = name if is_package else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if not typing and isinstance(child, ast.If) and _is_type_checking(child.test):
                for n in child.orelse:
                    visit_one(n)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b`: the module a.b if it exists (resolved later), else a
            out.extend((f"{base}.{a.name}\0{base}", node.lineno) for a in node.names)
        else:
            visit(node)

    visit(tree)
    return out


def graph(roots: list[Path], typing: bool = False) -> dict[str, dict[str, int]]:
    """module -> {imported module of the same packages: first line importing it}."""
    trees: dict[str, tuple[ast.Module, bool]] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            name = module_name(root, path)
            trees[name] = (ast.parse(path.read_text(), str(path)), path.name == "__init__.py")
    edges: dict[str, dict[str, int]] = {}
    for name, (tree, is_package) in trees.items():
        deps = edges.setdefault(name, {})
        for target, line in imports_of(tree, name, is_package, typing):
            if "\0" in target:
                sub, base = target.split("\0")
                target = sub if sub in trees else base
            if target in trees and target != name:
                deps.setdefault(target, line)
    return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return sorted(found)


def a_circle(edges: dict[str, dict[str, int]], comp: list[str]) -> list[tuple[str, int]]:
    """One circle through the component's first module: [(module, line of its next import)]."""
    members = set(comp)
    start = comp[0]
    # breadth-first back to start, inside the component
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges[v]:
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    path.reverse()
                    return [(m, edges[m][path[(i + 1) % len(path)]]) for i, m in enumerate(path)]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return [(m, 0) for m in comp]


def main(argv: list[str]) -> int:
    typing = "--typing" in argv
    roots = [Path(a).resolve() for a in argv if a != "--typing"] or [
        Path(__file__).resolve().parents[1] / "pyhv"
    ]
    edges = graph(roots, typing)
    found = cycles(edges)
    for comp in found:
        chain = a_circle(edges, comp)
        hops = " -> ".join(f"{m}:{line}" for m, line in chain)
        print(f"import circle among {', '.join(comp)}:\n  {hops} -> {chain[0][0]}")
    if found:
        print(
            f"{len(found)} import circle(s): move the shared code to the lower layer, or pass "
            "what the lower module needs in from the caller",
            file=sys.stderr,
        )
        return 1
    print(f"no import circles among {len(edges)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
