"""Train, measure and install the toy model's ControlNet: ``python -m sdjax.train.toy_controlnet``.

Runs configs/toy_controlnet.py (the toy's shapes with their edge maps as control maps), then
measures placement: for EVAL_SEEDS evaluation shapes (drawn as the training ones are, from
another stream), the prompt is the shape's caption and the control map its edges; an image
places the shape when the shape it draws (its pixels not of the background colour,
:func:`sdjax.train.shapes.shape_region`) overlaps the region the edge map encloses
(:func:`sdjax.train.shapes.filled`) with IoU >= PLACED_IOU. The same prompts and seeds are
generated without the ControlNet, as the baseline. Installs the ControlNet folder, its
training log, the summary with both measurements, and the README's example edge maps as
``sdjax/assets/toy-edges`` (``--controlnet toy-edges``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

NAME = "toy-edges"
REPO = Path(__file__).resolve().parents[2]
EVAL_SEEDS = 32
EVAL_STREAM = 1000  # the shapes stream the evaluation maps come from (training uses seed 0)
PLACED_IOU = 0.5
# The README's edge maps: (file, shape, centre x, centre y, side) on the toy's 32x32 canvas.
EXAMPLES = (("circle_left.png", "circle", 10.0, 16.0, 13.0),
            ("square_bottom_right.png", "square", 21.0, 21.0, 12.0))


def eval_maps(n: int, size: int = 32) -> tuple[list[str], list[np.ndarray]]:
    """(prompts, uint8 edge maps) of the first ``n`` evaluation shapes."""
    from sdjax.train import shapes
    from sdjax.train.data import CONTROL_JITTER

    prompts, maps = [], []
    for i in range(n):
        image, caption = shapes.sample(EVAL_STREAM, i, size, control="edges",
                                       jitter=CONTROL_JITTER)
        prompts.append(caption)
        maps.append(image[..., 3:])
    return prompts, maps


def placement(images, maps) -> dict[str, float]:
    """Mean IoU of each image's shape with its map's region, and the share with IoU >=
    PLACED_IOU."""
    from sdjax.train import shapes

    ious = [shapes.iou(shapes.shape_region(img), shapes.filled(m))
            for img, m in zip(images, maps, strict=True)]
    return {"mean_iou": round(float(np.mean(ious)), 4),
            "placed": round(float(np.mean([x >= PLACED_IOU for x in ious])), 4)}


def evaluate(controlnet: str | Path, n: int = EVAL_SEEDS, seed: int = 0,
             model: str = "toy") -> dict[str, dict[str, float]]:
    """Placement of ``n`` evaluation shapes without and with ``controlnet``, with the toy's
    sampling defaults, from the same seed."""
    from sdjax.pipeline import StableDiffusionPipeline

    prompts, maps = eval_maps(n)
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype="float32", num_devices=1)
    without = pipe(prompts, seed=seed).images
    pipe.load_controlnet(str(controlnet))
    with_cn = pipe(prompts, control_image=maps, seed=seed).images
    return {"without": placement(without, maps), "with": placement(with_cn, maps)}


def write_examples(folder: Path, size: int = 32) -> list[Path]:
    """The README's edge maps (white outlines on black) as PNGs in ``folder``."""
    from PIL import Image

    from sdjax.train import shapes

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, shape, cx, cy, side in EXAMPLES:
        Image.fromarray(shapes.control_map("edges", shape, size, cx, cy, side)).save(
            folder / name)
        out.append(folder / name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdjax.train.toy_controlnet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "toy_controlnet.py")
    p.add_argument("--work", type=Path, default=Path("runs/toy-edges"),
                   help="checkpoints, log and export")
    p.add_argument("--out", type=Path, default=REPO / "sdjax" / "assets" / NAME,
                   help="where the finished ControlNet is installed")
    p.add_argument("--seeds", type=int, default=EVAL_SEEDS, help="evaluation shapes")
    p.add_argument("--no_install", action="store_true", help="train and evaluate only")
    args = p.parse_args(argv)

    from sdjax.train.config import load_config, override
    from sdjax.train.loop import train
    from sdjax.train.toy import final_record, install

    cfg = override(load_config(args.config), {"output_dir": str(args.work)})
    start = time.perf_counter()
    result = train(cfg)
    last = result.history[-1]
    print(f"[toy-edges] {cfg.steps} steps in {last['elapsed_s']:.0f} s, final loss "
          f"{last['loss']:.4f}", flush=True)
    accuracy = evaluate(result.export_dir, args.seeds)
    summary = {"command": "python -m sdjax.train.toy_controlnet", "steps": cfg.steps,
               "batch_size": cfg.batch_size, "train_s": last["elapsed_s"],
               "final": final_record(result.history),
               "placement": accuracy,
               "eval": {"shapes": args.seeds, "stream": EVAL_STREAM, "seed": 0,
                        "placed_iou": PLACED_IOU, "model": "toy (its sampling defaults)"},
               "wall_s_this_invocation": round(time.perf_counter() - start, 1)}
    print(f"[toy-edges] placement: {json.dumps(accuracy)}", flush=True)
    if args.no_install:
        return 0

    def fill(staging: Path) -> None:
        (staging / "training").mkdir(parents=True)
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copyfile(result.export_dir / f, staging / f)
        shutil.copyfile(args.work / "log.jsonl", staging / "training" / "log.jsonl")
        write_examples(staging / "examples")

    install(args.out, fill, summary, NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
