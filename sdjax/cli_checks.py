"""Checks of the CLIs' file and model flags that say what is really wrong: an empty
``--model``, ``--config``/``--ema`` on a diffusers folder, a ``--lora PATH:SCALE`` whose scale
is not a number, and a folder where a file belongs. Called by
:func:`sdjax.cli_args.check_common_args` before anything loads; each raises one ValueError
line naming the flag.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def check_model_flags(args: argparse.Namespace) -> None:
    model = getattr(args, "model", None)
    if model is None:
        return
    if not str(model).strip():
        raise ValueError("--model is empty: give 'toy', a diffusers folder, a .safetensors "
                         "file or a Hugging Face hub id")
    given = [flag for flag, on in (("--config", getattr(args, "config", None) is not None),
                                   ("--ema", bool(getattr(args, "ema", False)))) if on]
    if given and Path(model).expanduser().is_dir():
        raise ValueError(f"{' and '.join(given)}: for single-file checkpoints only; --model "
                         f"{model} is a diffusers folder, which brings its own configs and "
                         "weights")


def check_file_flag(flag: str, path: str | Path, given: str | None = None) -> None:
    """``path`` (what ``flag`` was given, as ``given`` when it differs) is an existing file."""
    p = Path(path).expanduser()
    if p.is_file():
        return
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file")
    if flag == "--lora" and given and ":" in given:
        head, _, tail = given.rpartition(":")
        if Path(head).expanduser().is_file():
            raise ValueError(f"--lora {given}: the scale {tail!r} is not a number "
                             "(--lora PATH[:SCALE])")
    raise ValueError(f"{flag} {path}: file not found")
