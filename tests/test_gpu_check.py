"""benchmarks/gpu_check.sh, short of a GPU: the script parses, every flag it passes is one its
entry points take, and its closing table reads the runs' JSON (missing runs say so). The
whole script once ran on CPU with tiny shapes (the dry run in its header) in about 4 minutes,
too long for the suite."""

import json
import re
import subprocess
from pathlib import Path

from benchmarks import gpu_table, throughput

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_script_flags_exist():
    text = SCRIPT.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    bench_flags = set(vars(throughput.parse_args([])))  # argparse dests: --steps -> steps
    used = set(re.findall(r"(?<![\w-])--([a-z][a-z_-]+)", code))
    # pip's and nvidia-smi's own, and benchmarks.models' --shape/--root
    others = {"no-index", "no-deps", "no-compile", "no-cache-dir", "target", "query-gpu",
              "format", "shape", "root"}
    unknown = {f for f in used - others if f.removeprefix("no-") not in bench_flags}
    assert not unknown, unknown
    assert "matmul_precision" in used  # the TF32 run asks for it explicitly
    for module in re.findall(r"-m (benchmarks\.\w+)", code):
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module


def test_table_from_the_runs_json(tmp_path, capsys):
    (tmp_path / "toy_f32.json").write_text(json.dumps({"max_pixel_diff": 9.1e-5, "batch": 8}))
    (tmp_path / "b16.json").write_text(json.dumps({
        "batch": 16, "s_per_batch": 2.0, "diffusers_s_per_batch": 4.0, "cold_compile_s": 30.0,
        "warm_start_s": 7.5, "warm_start_detail": "imports 2 s", "gflop_per_image": 83000.0,
        "mfu": 0.5, "max_pixel_diff": 0.1}))
    gpu_table.main([str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["| figure | sdjax | diffusers |", "| --- | --- | --- |"]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    assert rows["toy float32 vs diffusers float32, max pixel difference (full float32)"][0] \
        == "9.1e-05"
    assert rows["the same with TF32 in both (matmul_precision=default)"][0] == "not measured"
    assert rows["batch 16, s per batch"] == ["2 (8 images/s)", "4 (4 images/s) |"]
    assert rows["batch 1, s per image"][0] == "not measured"
    assert rows["warm start, fresh process to first image, s"][0] == "7.5 (imports 2 s)"
    assert rows["MFU, batch 16 / batch 1"][0] == "0.5 / not measured"
