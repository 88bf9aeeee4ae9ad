"""Draw the import graph of the ``sdjax`` package (every ``import`` of an sdjax module, at the
top of a file or inside a function), as docs/architecture.md shows it.

    python docs/import_graph.py            # writes docs/import_graph.dot (and .svg with graphviz)
    python docs/import_graph.py --check    # exit 1 if the graph has a cycle or the .dot is stale

Modules are grouped by package; an edge A -> B means A imports B. The rule the picture
checks: imports run one way (models and schedulers at the bottom, weights and the core above
them, the pipelines above that, the front ends on top), so the graph has no cycle.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sdjax"
DOT = Path(__file__).resolve().parent / "import_graph.dot"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The sdjax modules ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from sdjax import tasks` imports the module sdjax.tasks.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = sorted(p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts)
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def to_dot(edges: dict[str, set[str]]) -> str:
    """Graphviz text: one cluster per subpackage, edges pointing down to what is imported.
    The package's ``__init__`` (lazy names for users) is left out: it points at everything."""
    edges = {k: v - {"sdjax"} for k, v in edges.items() if k != "sdjax"}
    groups: dict[str, list[str]] = {}
    for m in sorted(edges):
        parts = m.split(".")
        groups.setdefault(parts[1] if len(parts) > 2 else "", []).append(m)
    lines = ["digraph sdjax {", '  rankdir=BT; node [shape=box, fontsize=10, fontname="sans"];',
             '  edge [color="#00000055", arrowsize=0.5];']
    for group, members in sorted(groups.items()):
        indent = "  "
        if group:
            lines.append(f'  subgraph "cluster_{group}" {{ label="{group}/"; style=rounded;')
            indent = "    "
        for m in members:
            label = m.split(".")[-1] if group else m.removeprefix("sdjax.")
            lines.append(f'{indent}"{m}" [label="{label}"];')
        if group:
            lines.append("  }")
    for src in sorted(edges):
        for dst in sorted(edges[src]):
            lines.append(f'  "{src}" -> "{dst}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="check, write nothing")
    args = p.parse_args(argv)
    edges = graph()
    found = cycles(edges)
    for comp in found:
        print("import cycle: " + " <-> ".join(comp), file=sys.stderr)
    dot = to_dot(edges)
    if args.check:
        stale = not DOT.is_file() or DOT.read_text(encoding="utf-8") != dot
        if stale:
            print(f"{DOT.name} is out of date: run python docs/import_graph.py", file=sys.stderr)
        return 1 if found or stale else 0
    DOT.write_text(dot, encoding="utf-8")
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg", str(DOT), "-o", str(DOT.with_suffix(".svg"))],
                       check=True)
    else:
        print("graphviz's dot not found: wrote only the .dot", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
