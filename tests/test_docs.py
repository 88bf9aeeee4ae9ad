"""The code blocks of the README and docs/ marked runnable (info string ``bash runnable`` or
``python runnable``; docs/README.md states the convention) run on the toy model, offline,
from an empty temporary folder, so whatever they write lands there and not in the checkout."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```(\w+) runnable\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
TIMEOUT_S = 300


def runnable_blocks(path: Path) -> list[tuple[str, str]]:
    """[(language, code)] of the page's runnable blocks, in order."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(path.read_text(encoding="utf-8"))]


PAGES_WITH_BLOCKS = [p for p in PAGES if runnable_blocks(p)]


def test_the_convention_is_in_use():
    langs = {lang for p in PAGES_WITH_BLOCKS for lang, _ in runnable_blocks(p)}
    assert langs == {"bash", "python"}


def test_no_page_points_outside_the_repository():
    for path in [*PAGES, ROOT / "tpu" / "README.md", ROOT / "CHANGELOG.md"]:
        text = path.read_text(encoding="utf-8")
        # No link to the design notes beside the checkout, which users never have.
        assert not re.search(r"\.\./shared|DESIGN\.md", text), path.name
        for target, anchor in re.findall(r"\]\(([^)#]*)(?:#([^)]*))?\)", text):
            if "://" in target:
                continue
            linked = path.parent / target if target else path
            assert linked.exists(), f"{path.name}: broken link {target}"
            if anchor:
                assert anchor in _anchors(linked), f"{path.name}: no #{anchor} in {target}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", PAGES_WITH_BLOCKS, ids=lambda p: p.name)
def test_runnable_blocks(path, tmp_path, toy_run_env):
    env = {**os.environ, **toy_run_env}
    blocks = runnable_blocks(path)
    for lang, code in blocks:
        if lang == "bash":
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=TIMEOUT_S)
            assert r.returncode == 0, f"{code}\n{r.stdout}\n{r.stderr[-3000:]}"
    # A page's Python blocks are one session, like a notebook's cells.
    python = "\n\n".join(code for lang, code in blocks if lang == "python")
    if python:
        r = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=TIMEOUT_S)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-3000:]}"
    assert any(tmp_path.iterdir()), "the blocks ran in the temporary folder"
