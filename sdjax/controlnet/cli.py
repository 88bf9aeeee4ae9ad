"""``python -m sdjax.sample``'s ControlNet flags: ``--controlnet PATH[:SCALE]``,
``--control_image PATH``, ``--control_preprocessor NAME``, ``--control_start F``,
``--control_end F`` (each repeatable, paired with the ControlNets in order), ``--guess_mode``,
``--control_mode``. Nothing here imports JAX: the flags are checked before the model loads.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from sdjax.controlnet.preprocessors import PREPROCESSORS

CONTROL_MODES = ("balanced", "prompt", "controlnet")  # sdjax.controlnet.inputs.CONTROL_MODES


def parse_controlnet(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a tail that is not a number belongs to the path."""
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return value, 1.0
        if not math.isfinite(scale) or scale < 0:
            raise argparse.ArgumentTypeError(f"the scale of --controlnet {value} must be a "
                                             "finite number >= 0")
        return path, scale
    return value, 1.0


def shuffle_seed(args: argparse.Namespace) -> int | None:
    """The shuffle preprocessor's NumPy seed, as the WebUI extension's for a generation with
    this --seed and --subseed (none: the seed again): their sum modulo 2**32."""
    seed = getattr(args, "seed", 0)
    if seed is None or seed < 0:
        return None
    sub = getattr(args, "subseed", None)
    return (seed + (seed if sub is None else sub)) & 0xFFFFFFFF


def add_arguments(p: argparse.ArgumentParser, add_flag) -> None:
    add_flag(p, "controlnet", type=parse_controlnet, action="append", default=None,
             help="a ControlNet PATH[:SCALE] (a diffusers folder or hub id, or an original "
             "control_*.pth/.safetensors); repeat for several")
    add_flag(p, "control_image", type=Path, action="append", default=None,
             help="the control image of each --controlnet, in order (default with --image: "
             "the init image)")
    add_flag(p, "control_preprocessor", choices=PREPROCESSORS, action="append", default=None,
             help="what each control image goes through first, as the WebUI ControlNet "
             "extension's preprocessor of that name with its default thresholds, at the image's "
             "own resolution (default: none)")
    add_flag(p, "control_start", type=float, action="append", default=None,
             help="each ControlNet's start, a fraction of the steps (default 0)")
    add_flag(p, "control_end", type=float, action="append", default=None,
             help="each ControlNet's end, a fraction of the steps (default 1)")
    add_flag(p, "guess_mode", action="store_true", help="diffusers' guess mode")
    add_flag(p, "control_mode", choices=CONTROL_MODES, default=None,
             help="the WebUI extension's Control Mode (default: balanced)")


def check(args: argparse.Namespace, usage_error) -> None:
    """The pairing rules, before anything loads."""
    nets = len(args.controlnet or [])
    if not nets:
        for flag in ("control_image", "control_preprocessor", "control_start", "control_end",
                     "control_mode"):
            if getattr(args, flag):
                raise usage_error(f"--{flag} needs a --controlnet")
        if args.guess_mode:
            raise usage_error("--guess_mode needs a --controlnet")
        return
    for flag in ("control_image", "control_preprocessor", "control_start", "control_end"):
        given = len(getattr(args, flag) or [])
        if given > nets:
            raise usage_error(f"{given} --{flag} for {nets} --controlnet (more than "
                              "ControlNets): give at most one per --controlnet")
    if "shuffle" in (args.control_preprocessor or []) and shuffle_seed(args) is None:
        raise usage_error("--control_preprocessor shuffle needs a --seed >= 0 (its flow is "
                          "drawn from the seed, as the WebUI extension's)")
    images = len(args.control_image or [])
    if images < nets and (images or args.image is None):
        raise usage_error(f"{nets} --controlnet need {nets} --control_image (only with "
                          "--image and none given does the init image stand in)")
    starts = args.control_start or []
    ends = args.control_end or []
    for k in range(nets):
        s = starts[k] if k < len(starts) else 0.0
        e = ends[k] if k < len(ends) else 1.0
        if not (0 <= s <= 1 and 0 <= e <= 1) or s >= e:
            raise usage_error(f"--control_start {s:g} / --control_end {e:g}: each in [0, 1], "
                              "start below end")


def load_images(args: argparse.Namespace, open_image) -> list | None:
    """The control images, read and preprocessed (None: the init image stands in)."""
    if not args.control_image:
        return None
    from sdjax.controlnet.preprocessors import preprocess
    names = args.control_preprocessor or []
    out = []
    for k, path in enumerate(args.control_image):
        image = open_image(path, "control_image").convert("RGB")
        # At the image's own resolution, so that the output takes its size.
        out.append(preprocess(names[k] if k < len(names) else "none", image,
                              processor_res=min(image.size), seed=shuffle_seed(args)))
    return out


def default_size(args: argparse.Namespace, images: list | None, factor: int) -> None:
    """Text-to-image with control images and no --height/--width: the first image's size,
    rounded down to the VAE factor (as the Python API)."""
    if images and args.image is None:
        h, w = images[0].shape[:2]
        args.height = args.height or max(factor, h // factor * factor)
        args.width = args.width or max(factor, w // factor * factor)


def call_kwargs(args: argparse.Namespace, images: list | None) -> dict[str, Any]:
    """The control images of ``pipe(...)`` (the ControlNets' weights, windows and modes are
    in ``CallSettings.controlnet``, from ``ControlNets.from_args``)."""
    nets = args.controlnet or []
    if not nets or images is None:
        return {}
    return {"control_image": images[0] if len(nets) == 1 else images}
