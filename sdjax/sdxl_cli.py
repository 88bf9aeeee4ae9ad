"""sdjax.sample's and sdjax.generate's SDXL flags: the second prompts, the refiner hand-off,
the refiner's aesthetic score and the size time ids; their checks (flags first, then the
models' kinds, before anything loads) and the refiner's loading. What they add to each call
and to the images' metadata is ``call_settings.SDXL``.
"""

from __future__ import annotations

import argparse
import sys

from sdjax import handoff
from sdjax.cli_args import UsageError, add_flag


def add_sdxl_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SDXL", "second prompts and the base→refiner hand-off")
    add_flag(g, "prompt_2", default=None, metavar="PROMPT",
             help="SDXL base models: the prompt of the second text encoder (default: --prompt)")
    add_flag(g, "negative_prompt_2", default=None, metavar="PROMPT",
             help="SDXL base models: the second encoder's negative prompt (default: "
                  "--negative_prompt)")
    add_flag(g, "refiner", default=None, metavar="MODEL", help="an SDXL refiner (a diffusers "
             "folder or a hub id such as stabilityai/stable-diffusion-xl-refiner-1.0) that "
             "finishes every image of an SDXL --model (text-to-image only)")
    add_flag(g, "refiner_switch_at", type=float, default=None, metavar="F",
             help="share of the schedule the base runs before the refiner takes over, "
                  f"0 < F < 1 (default {handoff.DEFAULT_SWITCH_AT}; diffusers' "
                  "denoising_end / denoising_start, the WebUI's 'Refiner switch at')")
    add_flag(g, "aesthetic_score", type=float, default=None, metavar="S",
             help="SDXL refiners (--refiner, or a refiner --model with --image): the "
                  "aesthetic score the images are conditioned on (default 6.0)")
    for name, (metavar, default) in SIZE_FLAGS.items():
        add_flag(g, name, type=parse_pair, default=None, metavar=metavar,
                 help=f"SDXL base models: diffusers' {name} time ids (default: {default})")


# SDXL's size conditioning: flag -> (metavar, default); call_settings.SIZE_FIELDS has their
# metadata fields.
SIZE_FLAGS = {
    "original_size": ("H,W", "the output's size"),
    "crops_coords_top_left": ("TOP,LEFT", "0,0"),
    "target_size": ("H,W", "the output's size"),
}


def parse_pair(value: str) -> tuple[int, int]:
    """``H,W`` (or ``TOP,LEFT``) -> two non-negative integers."""
    try:
        a, b = (int(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers A,B, got {value!r}") from None
    if a < 0 or b < 0:
        raise argparse.ArgumentTypeError(f"expected two non-negative integers, got {value!r}")
    return a, b


def check_sdxl_args(args: argparse.Namespace) -> None:
    """The flags alone, before anything is read."""
    if args.refiner is None:
        if args.refiner_switch_at is not None:
            raise UsageError("--refiner_switch_at needs a --refiner")
        return
    if getattr(args, "image", None) is not None:  # sdjax.generate has no --image
        raise UsageError("--refiner finishes text-to-image runs; it does not apply with "
                         "--image (img2img, inpainting, upscaling)")
    switch_at = handoff.DEFAULT_SWITCH_AT if args.refiner_switch_at is None \
        else args.refiner_switch_at
    try:
        args.refiner_switch_at = handoff.check_switch_at(switch_at, "--refiner_switch_at")
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_sdxl_models(args: argparse.Namespace, sdxl: bool) -> None:
    """What the models' files tell, before either model loads; ``sdxl``: whether --model
    loads as an SDXL pipeline."""
    given = [k for k in ("prompt_2", "negative_prompt_2", *SIZE_FLAGS)
             if getattr(args, k) is not None]
    if given and not sdxl:
        raise UsageError(f"--{given[0]} is for SDXL models (their second text encoder and "
                         f"size conditioning); {args.model} is not one")
    if args.refiner is not None:
        if not sdxl:
            raise UsageError(f"--refiner needs an SDXL base model; {args.model} is not an "
                             "SDXL model")
        try:
            handoff.check_refiner(args.refiner)
        except ValueError as e:
            raise UsageError(str(e)) from None


def load_refiner(args: argparse.Namespace, base, dtype: str, *, background_load: bool = False,
                 local_devices: bool = False):
    """The --refiner pipeline on the base's devices, or None."""
    if args.refiner is None:
        return None
    from sdjax.dispatch import pipeline_class
    refiner = pipeline_class(args.refiner).from_pretrained(
        args.refiner, dtype=dtype, num_devices=args.num_devices, vae=args.vae,
        matmul_precision=args.matmul_precision, background_load=background_load,
        local_devices=local_devices)
    handoff.check_loaded_pair(base, refiner)
    if refiner.note:
        print(refiner.note, file=sys.stderr)
    print(f"refiner: {args.refiner} from {args.refiner_switch_at:g} of the schedule",
          file=sys.stderr)
    return refiner


def with_refiner(counter: str, base, refiner) -> float:
    """A pipeline counter (``compile_seconds``, ``weights_wait_seconds``) of the base and, if
    there is one, the refiner, added."""
    return getattr(base, counter) + (getattr(refiner, counter) if refiner is not None else 0.0)

