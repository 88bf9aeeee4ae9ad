"""The table that benchmarks/gpu_check.sh prints last: the figures of its runs side by side.

    python -m benchmarks.gpu_table OUT_DIR

Reads the ``--json`` files the script's ``benchmarks.throughput`` runs wrote into OUT_DIR
(``toy_f32.json``, ``toy_tf32.json``, ``b16.json``, ``b1.json``); a run that is missing (it
failed or ran out of time) shows as ``not measured``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.report import fmt

RUNS = ("toy_f32", "toy_tf32", "b16", "b1")
MISSING = "not measured"


def load_runs(folder: Path) -> dict[str, dict]:
    out = {}
    for name in RUNS:
        path = folder / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def _throughput(run: dict | None, key: str) -> str:
    """``s per batch (images/s)`` of sdjax (``s_per_batch``) or diffusers."""
    if run is None or run.get(key) is None:
        return MISSING
    s = run[key]
    return f"{fmt(s)} ({fmt(run['batch'] / s)} images/s)"


def rows(runs: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(figure, sdjax, diffusers) rows."""
    full, tf32, b16, b1 = (runs.get(name) for name in RUNS)

    def field(run, key, digits=3):
        return MISSING if run is None else fmt(run.get(key), digits)

    batch = b16["batch"] if b16 else "N"
    out = [
        ("toy float32 vs diffusers float32, max pixel difference (full float32)",
         field(full, "max_pixel_diff"), "reference"),
        ("the same with TF32 in both (matmul_precision=default)",
         field(tf32, "max_pixel_diff"), "reference"),
        (f"batch {batch}, s per batch", _throughput(b16, "s_per_batch"),
         _throughput(b16, "diffusers_s_per_batch")),
        ("batch 1, s per image", field(b1, "s_per_batch"), field(b1, "diffusers_s_per_batch")),
        (f"cold compile (batch {batch}), s", field(b16, "cold_compile_s"), "-"),
        ("warm start, fresh process to first image, s",
         MISSING if b16 is None or b16.get("warm_start_s") is None else
         f"{fmt(b16['warm_start_s'])} ({b16.get('warm_start_detail')})", "-"),
        ("GFLOP per image", field(b16 or b1, "gflop_per_image", 4), "-"),
        (f"MFU, batch {batch} / batch 1",
         f"{field(b16, 'mfu')} / {field(b1, 'mfu')}", "-"),
        (f"bfloat16 vs diffusers (float16 on CUDA; batch {batch}), max pixel difference",
         field(b16, "max_pixel_diff"), "reference"),
    ]
    return out


def markdown(table: list[tuple[str, str, str]]) -> str:
    lines = ["| figure | sdjax | diffusers |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_table",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder gpu_check.sh wrote its JSON files to")
    a = p.parse_args(argv)
    print(markdown(rows(load_runs(a.out))))


if __name__ == "__main__":
    main()
