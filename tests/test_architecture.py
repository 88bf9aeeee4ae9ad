"""The house's shape (docs/architecture.md): imports run one way, with no cycle among the
modules of sdjax/ (imports inside functions included), no module is longer than the size we
keep modules at, and the import graph the docs draw is the current one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600


def _graph_tool():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs/import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle_and_the_drawn_graph_is_current():
    tool = _graph_tool()
    edges = tool.graph()
    assert "sdjax.pipeline" in edges and "sdjax.sampling" in edges["sdjax.pipeline"]
    assert tool.cycles(edges) == []
    # The cycle finder finds one when there is one.
    assert tool.cycles({**edges, "sdjax.sampling": edges["sdjax.sampling"] | {
        "sdjax.pipeline"}})
    assert (ROOT / "docs/import_graph.dot").read_text() == tool.to_dot(edges), \
        "docs/import_graph.dot is stale: run python docs/import_graph.py"


def test_layers_import_downward_only():
    edges = _graph_tool().graph()
    front_ends = {"sdjax.sample", "sdjax.generate", "sdjax.serve", "sdjax.dispatch",
                  "sdjax.convert", "sdjax.train"}
    for module, targets in edges.items():
        if module.startswith(("sdjax.models", "sdjax.schedulers", "sdjax.weights")):
            below = {t for t in targets if t.startswith(("sdjax.pipeline", "sdjax.sdxl",
                                                          "sdjax.upscale", "sdjax.sampling"))}
            assert not below, f"{module} imports {below}"
        if module in ("sdjax.pipeline", "sdjax.sdxl", "sdjax.upscale", "sdjax.sampling"):
            above = {t for t in targets if t.startswith(tuple(front_ends))}
            assert not above, f"{module} imports {above}"


def test_modules_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "sdjax").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
