"""Draw the import graph of the ``sdjax`` package (every ``import`` of an sdjax module, at the
top of a file or inside a function), as docs/architecture.md shows it.

    python docs/import_graph.py            # writes docs/import_graph.dot (and .svg with graphviz)
    python docs/import_graph.py --check    # exit 1 if the graph has a cycle or the .dot is stale

The picture shows each subpackage (models/, weights/, schedulers/, serve/, train/, dataset/)
as one node and each top-level module as its own; an edge A -> B means A imports B, and
importers are drawn above what they import. The rule it shows (and --check checks on the
full module graph): imports run one way (models and schedulers at the bottom, weights and
the core above them, the pipelines above that, the front ends on top), so there is no cycle.
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


def collapse(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The picture's graph: each subpackage (``sdjax.weights``, ``sdjax.serve``, ...) one
    node, each top-level module its own; the package's ``__init__`` files are left out (the
    lazy names they offer users point at everything)."""
    def node(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for src, targets in edges.items():
        if src == "sdjax":
            continue
        dsts = {node(t) for t in targets if t != "sdjax"} - {node(src)}
        out.setdefault(node(src), set()).update(dsts)
    return out


def to_dot(edges: dict[str, set[str]]) -> str:
    """Graphviz text of the collapsed graph, importers above what they import; the
    subpackages (several modules each) are drawn as folders."""
    graph = collapse(edges)
    packages = {".".join(m.split(".")[:2]) for m in edges if m.count(".") >= 2}
    lines = ["digraph sdjax {", '  rankdir=TB; node [shape=box, fontsize=11, fontname="sans"];',
             '  edge [color="#00000066", arrowsize=0.6];']
    for m in sorted(graph):
        label = m.removeprefix("sdjax.") + ("/" if m in packages else "")
        style = ', shape=folder, style=filled, fillcolor="#eeeeee"' if m in packages else ""
        lines.append(f'  "{m}" [label="{label}"{style}];')
    for src in sorted(graph):
        for dst in sorted(graph[src]):
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
