r"""A new concept for the toy model: a folder of shapes in a colour it has never seen,
captioned with a new word, to train a textual inversion or a LoRA on; and the measure of
whether the fine-tuned toy draws that colour.

    python -m sdjax.train.concept write --out runs/orange/data      # 30 images, "<orange>"
    python -m sdjax.train.concept measure \
        --embedding runs/orange/ti/export/learned_embeds.safetensors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sdjax.cli_args import Parser
from sdjax.train import shapes


def write_concept(folder: Path, *, colour: str = "orange", word: str = "<orange>",
                  count: int = 30, size: int = 32, seed: int = 0) -> None:
    """``count`` images ``i.png`` of ``colour`` shapes with captions ``i.txt`` naming the
    colour ``word`` (``a <orange> circle on a blue background``). Refuses a folder that
    already holds files rather than mix two concepts."""
    if colour not in shapes.NEW_COLOURS:
        raise ValueError(f"colour must be one of {', '.join(shapes.NEW_COLOURS)} (the toy "
                         f"knows the others already), got {colour!r}")
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty; give a new folder")
    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, text = shapes.sample(seed, i, size, colour=colour, word=word)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(text + "\n", encoding="utf-8")


def measure(pipe, prompt: str, colour: str, images: int = 8, steps: int = 20) -> dict:
    """Mean share of ``colour`` pixels in ``images`` images of ``prompt`` (seed 0, guidance
    7.5), with each image's share."""
    images = pipe([prompt] * images, num_inference_steps=steps, seed=0).images
    per = [shapes.colour_share(img, colour) for img in images]
    return {"mean": round(float(np.mean(per)), 4), "per_image": [round(p, 4) for p in per]}


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m sdjax.train.concept",
               description="Training images of a new colour word for the toy model, and the "
                           "share of that colour in what a fine-tuned toy draws.")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the training folder")
    w.add_argument("--out", required=True, type=Path, help="a new folder")
    w.add_argument("--colour", default="orange")
    w.add_argument("--word", default="<orange>", help="the word the captions use")
    w.add_argument("--count", type=int, default=30)
    w.add_argument("--size", type=int, default=32, help="pixels (the toy's 32)")
    w.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="share of the colour in the toy's images of a prompt")
    m.add_argument("--model", default="toy")
    m.add_argument("--embedding", action="append", default=[], help="embedding file(s)")
    m.add_argument("--lora", action="append", default=[], help="LoRA file(s)")
    m.add_argument("--prompt", default="a <orange> circle on a blue background")
    m.add_argument("--colour", default="orange")
    m.add_argument("--images", type=int, default=8, help="images (of seed 0)")
    args = p.parse_args(argv)
    try:
        if args.command == "write":
            write_concept(args.out, colour=args.colour, word=args.word, count=args.count,
                          size=args.size, seed=args.seed)
            print(f"wrote {args.count} images and captions to {args.out}")
            return 0
        from sdjax.pipeline import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype="float32")
        for path in args.embedding:
            pipe.load_textual_inversion(path)
        for path in args.lora:
            pipe.load_lora(path)
        result = measure(pipe, args.prompt, args.colour, args.images)
        print(json.dumps({"prompt": args.prompt, "colour": args.colour, **result}))
        return 0
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
