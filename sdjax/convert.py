"""python -m sdjax.convert SRC DST: a model between the diffusers folder and the single-file
(CompVis/A1111 ``.safetensors``) layouts.

SRC is anything ``--model`` takes (a folder, a ``.safetensors``/``.ckpt``, a hub id). A DST
ending in ``.safetensors`` gets a single file, any other DST a diffusers folder. An existing
DST is never replaced unless ``--overwrite`` is given, and DST appears only once it is
complete (written under a temporary name, then renamed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from sdjax.cli_args import ModelOptions, Parser, UsageError, add_flag, run_main


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m sdjax.convert",
        description="Convert a Stable Diffusion model (SD 1.x/2.x or SDXL) between a diffusers "
                    "folder and an A1111/CompVis (SDXL: SGM) single .safetensors file.")
    p.add_argument("src", help="a diffusers folder, a .safetensors/.ckpt checkpoint or a hub id")
    p.add_argument("dst", type=Path, help="a .safetensors file (single file) or a folder "
                   "(diffusers layout)")
    add_flag(p, "half", action="store_true", help="write float16 weights (single files only)")
    add_flag(p, "overwrite", action="store_true", help="replace an existing DST")
    add_flag(p, "vae", default=None, help="another VAE to write in the model's place")
    add_flag(p, "config", default=None, help="single-file SRC: a preset or a diffusers folder "
             "with its configs (default: detected from the tensors)")
    add_flag(p, "prediction_type", default=None, choices=["epsilon", "v_prediction"],
             help="single-file SRC: the prediction type to record in the folder's scheduler")
    add_flag(p, "ema", action="store_true", help="single-file SRC: take the EMA UNet weights")
    return p


def _check(args) -> None:
    dst: Path = args.dst
    if dst.exists() and not args.overwrite:
        raise UsageError(f"{dst} exists; pass --overwrite to replace it")
    single = dst.suffix == ".safetensors"
    if args.half and not single:
        raise UsageError("--half applies to single-file output (DST ending in .safetensors)")
    if dst.exists() and single != dst.is_file():
        raise UsageError(f"{dst} exists and is a {'folder' if dst.is_dir() else 'file'}; "
                         "--overwrite replaces a file with a file and a folder with a folder")
    parent = dst.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"DST {dst}: its folder {parent} "
                         + ("is a file" if parent.exists() else "does not exist"))
    if args.prediction_type is not None and not Path(args.src).expanduser().is_file():
        raise UsageError("--prediction_type applies to a single-file SRC (whose file does not "
                         f"say it); the diffusers folder {args.src} records its own in "
                         "scheduler/")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{parent} is not writable")


def _write_folder(pipe, dst: Path) -> None:
    """Into a temporary sibling folder, then renamed into place: no half-written DST."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; DST gets the user's usual mode
    try:
        pipe.save_pretrained(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def run(args) -> int:
    _check(args)
    from sdjax.dispatch import pipeline_class
    pipe = pipeline_class(args.src).from_pretrained(args.src, dtype="float32", num_devices=1,
                                                   **ModelOptions.from_args(args).kwargs())
    if pipe.note:
        print(pipe.note, file=sys.stderr)
    if args.dst.suffix == ".safetensors":
        pipe.save_single_file(args.dst, half=args.half)
    else:
        _write_folder(pipe, args.dst)
    print(f"wrote {args.dst}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: run(args), lambda: "interrupted")


if __name__ == "__main__":
    sys.exit(main())
