"""The notebooks run top to bottom on CPU with the toy model: the cell tagged ``install`` is
skipped, and a cell after the one tagged ``parameters`` sets the toy, 2 steps and a temporary
output folder, as papermill would. A cell that raises fails the test."""

import subprocess
import sys
from pathlib import Path

import pytest

from sdjax.train.toy import SAMPLING_DEFAULTS

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _tagged(nb, tag):
    return [i for i, c in enumerate(nb.cells) if tag in c.metadata.get("tags", [])]


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= {"sdjax_colab_tpu.ipynb", "sdjax_kaggle.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_tagged(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the outputs"
    assert len(_tagged(nb, "install")) == 1 and len(_tagged(nb, "parameters")) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom_on_cpu(path, tmp_path, toy_run_env, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    out = tmp_path / "out"
    # The toy at the README command's shape (its sdjax.json's steps, one image per call, one
    # device): the docs' and the wheel's runs compile that sampler into the shared cache, and
    # the notebooks load it from there instead of compiling their own.
    steps = SAMPLING_DEFAULTS["num_inference_steps"]
    overrides = nbformat.v4.new_code_cell(
        f'MODEL = "toy"\nSTEPS = {steps}\nIMAGES_PER_DEVICE = 1\nOUTDIR = {str(out)!r}')
    nb.cells.insert(_tagged(nb, "parameters")[0] + 1, overrides)
    del nb.cells[_tagged(nb, "install")[0]]
    for k, v in toy_run_env.items():  # the kernel inherits this environment
        monkeypatch.setenv(k, v)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "1 device(s)" in text and "1 images (1 per device)" in text
    # Compiled once for the batch, and still once after new prompts, seed and guidance.
    assert text.count("compiled samplers: 1") == 2, text
    assert (out / "grid.png").is_file()
    assert sorted(p.name for p in (out / "dataset").glob("*.tar")) == ["00000.tar"]


def test_ruff_checks_the_notebooks():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", *map(str, NOTEBOOKS)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
