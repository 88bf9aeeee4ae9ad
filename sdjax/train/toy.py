"""Rebuild the bundled toy model from scratch: ``python -m sdjax.train.toy``.

Runs the four recipes in configs/ (toy_clip.py, toy_vae.py, toy_unet.py, toy_unet_tune.py)
with the trainer, each stage adding its part to one diffusers folder, then measures prompt
following on the evaluation prompts and installs the folder, with the training logs and a
summary, as ``sdjax/assets/toy``. An interrupted run resumes from the stage's last checkpoint.

The installed folder carries SAMPLING_DEFAULTS as its ``sdjax.json``: what a call gives
nothing for uses them. They were chosen on the 24 evaluation prompts with seeds 0-3 (96
images; colour = shape and background colour both right, shape = the shape right; measured
with ``pipe(prompts, seeds=..., image_indices=..., **settings)`` and
``sdjax.train.shapes.accuracy``, issue 13):

    scheduler  steps  guidance  interval (sigma)  rescale   colour  shape
    dpmpp_2m   20     1         -                 -         0.979   0.875
    dpmpp_2m   20     7.5       -                 0         1.000   0.688
    dpmpp_2m   20     7.5       -                 0.7       1.000   0.677
    dpmpp_2m   20     7.5       [0, 5]            0         1.000   0.656
    dpmpp_2m   20     7.5       [0, 5]            0.7       1.000   0.708
    dpmpp_2m   20     7.5       [0.3, inf]        0         1.000   0.875
    dpmpp_2m   20     7.5       [0.3, inf]        0.7       1.000   0.875
    dpmpp_2m   20     7.5       [0.3, 5]          0         1.000   0.833
    dpmpp_2m   20     7.5       [0.3, 5]          0.7       1.000   0.875
    dpmpp_2m   20     7.5       [1, inf]          0         1.000   0.958
    dpmpp_2m   20     7.5       [1, inf]          0.7       1.000   0.938
    dpmpp_2m   20     7.5       [2, inf]          0 / 0.7   1.000   0.938
    dpmpp_2m   50     1         -                 -         0.979   0.844
    dpmpp_2m   50     7.5       -                 0         1.000   0.708
    dpmpp_2m   50     7.5       -                 0.7       1.000   0.688
    dpmpp_2m   50     7.5       [0, 5]            0 / 0.7   1.000   0.698 / 0.688
    dpmpp_2m   50     7.5       [1, inf]          0         1.000   0.958
    dpmpp_2m   15     1         -                 -         0.979   0.844
    dpmpp_2m   15     7.5       [1, inf]          0         1.000   0.958  <- SAMPLING_DEFAULTS
    dpmpp_2m   10     1         -                 -         0.979   0.844
    dpmpp_2m   10     7.5       [1, inf]          0         1.000   0.927

Guidance at the low noise levels (sigma < 1) is what pushes squares' corners out into stars;
guiding only the high noise levels keeps guidance's colour accuracy and gains shape accuracy
over guidance 1. The schedule's sigmas stay below 14.6, so "inf" (1e9 or 1000 in the runs)
means no upper bound. tests/test_toy.py checks the chosen row.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

STAGES = ("clip", "vae", "unet", "unet_tune")
REPO = Path(__file__).resolve().parents[2]
# The toy's sdjax.json (see the table above); guidance stays the library's 7.5.
SAMPLING_DEFAULTS = {"num_inference_steps": 15, "scheduler": "dpmpp_2m",
                     "guidance_interval": [1.0, 1000.0]}
EVAL_PROMPTS = 24  # shapes.prompt_grid(EVAL_PROMPTS): every colour both ways, every shape


def evaluate(folder: Path, steps: int | None = None, seed: int = 0) -> dict:
    """Prompt following on the EVAL_PROMPTS evaluation prompts at guidance 7.5 and 1, with
    the folder's sampling defaults (``steps`` None: its default step count)."""
    from sdjax.pipeline import StableDiffusionPipeline
    from sdjax.train import shapes

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype="float32")
    prompts = shapes.prompt_grid(EVAL_PROMPTS)
    out = {}
    for g in (7.5, 1.0):
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=g, seed=seed).images
        out[f"guidance_{g}"] = shapes.accuracy(images, prompts)
    return out


def final_record(history: list[dict]) -> dict[str, float]:
    """A training run's last log record's numbers, rounded for a summary."""
    return {k: round(v, 5) for k, v in history[-1].items() if isinstance(v, float)}


def install(out: Path, fill: Callable[[Path], None], summary: dict, label: str) -> None:
    """Writes an asset into a staging folder beside ``out`` (``fill`` it, then its
    ``training/summary.json``) and only then puts it in the place of ``out``: an interrupted
    install leaves the old asset whole."""
    staging = out.with_name(out.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    fill(staging)
    (staging / "training" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"[{label}] installed {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdjax.train.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=Path, default=REPO / "configs")
    p.add_argument("--work", type=Path, default=Path("runs/toy"),
                   help="checkpoints, logs and the assembled folder")
    p.add_argument("--out", type=Path, default=REPO / "sdjax" / "assets" / "toy",
                   help="where the finished model is installed")
    p.add_argument("--no_install", action="store_true", help="train and evaluate only")
    args = p.parse_args(argv)

    from sdjax.train.config import load_config, override
    from sdjax.train.loop import train

    model = args.work / "model"
    summary: dict = {"command": "python -m sdjax.train.toy", "machine": platform.machine(),
                     "stages": {}}
    start = time.perf_counter()
    for stage in STAGES:
        cfg = load_config(args.configs / f"toy_{stage}.py")
        sets = {"output_dir": str(args.work / stage), "export_dir": str(model)}
        if cfg.pretrained is not None:
            sets["pretrained"] = str(model)
        cfg = override(cfg, sets)
        t0 = time.perf_counter()
        result = train(cfg)
        last = result.history[-1]
        summary["stages"][stage] = {
            "steps": cfg.steps, "batch_size": cfg.batch_size,
            "wall_s_this_invocation": round(time.perf_counter() - t0, 1),
            "train_s": last["elapsed_s"], "final": final_record(result.history)}
        print(f"[toy] {stage}: {cfg.steps} steps in {last['elapsed_s']:.0f} s, "
              f"final loss {last['loss']:.4f}", flush=True)
    summary["train_s_total"] = round(sum(s["train_s"] for s in summary["stages"].values()), 1)
    from sdjax import model_defaults
    model_defaults.write(model, SAMPLING_DEFAULTS)
    summary["accuracy"] = evaluate(model)
    summary["eval"] = {"prompts": EVAL_PROMPTS, "seed": 0, **SAMPLING_DEFAULTS}
    summary["wall_s_total_this_invocation"] = round(time.perf_counter() - start, 1)
    print(f"[toy] prompt following: {json.dumps(summary['accuracy'])}", flush=True)
    if args.no_install:
        return 0

    def fill(staging: Path) -> None:
        shutil.copytree(model, staging)
        (staging / "training").mkdir()
        for stage in STAGES:
            shutil.copyfile(args.work / stage / "log.jsonl",
                            staging / "training" / f"{stage}.jsonl")

    install(args.out, fill, summary, "toy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
