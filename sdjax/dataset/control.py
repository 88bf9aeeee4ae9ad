"""``python -m sdjax.generate``'s ControlNets: ``sdjax.sample``'s flags (``--controlnet
PATH[:SCALE]``, ``--control_image``, ``--control_preprocessor``, ``--control_start``,
``--control_end``, ``--guess_mode``, ``--control_mode``) and the prompt table's per-row
``control_image`` column (a file name relative to the table), so that a dataset can be made
from control maps. A row's image is the control image of every ControlNet (each through its
own preprocessor); a row without one takes each ControlNet's ``--control_image``.
"""

from __future__ import annotations

import argparse
import collections
import posixpath
from pathlib import Path

import numpy as np

from sdjax.controlnet import cli as controlnet_cli
from sdjax.dataset.storage import is_url, open_input


class ControlImageError(ValueError):
    """A control image that cannot be read (the CLI's exit 2, one line)."""


def check(args: argparse.Namespace, usage_error) -> None:
    """sample's pairing rules, except that the table's column may give the images."""
    if args.controlnet and getattr(args, "refiner", None):
        raise usage_error("--controlnet does not go with --refiner in sdjax.generate")
    had = getattr(args, "image", None)
    args.image = "the table's control_image column"  # stands in for sample's init image
    try:
        controlnet_cli.check(args, usage_error)
    finally:
        args.image = had


def manifest_json(args: argparse.Namespace) -> dict:
    """The ControlNet flags given, for the dataset's manifest (none without --controlnet)."""
    nets = args.controlnet or []
    if not nets:
        return {}
    names = args.control_preprocessor or []
    return {"controlnet": [
        {"path": str(path), "scale": scale,
         "start": (args.control_start or [])[k] if k < len(args.control_start or []) else 0.0,
         "end": (args.control_end or [])[k] if k < len(args.control_end or []) else 1.0,
         "preprocessor": names[k] if k < len(names) else "none",
         "control_image": (str(args.control_image[k]) if k < len(args.control_image or [])
                           else None)}
        for k, (path, scale) in enumerate(nets)],
        "guess_mode": bool(args.guess_mode), "control_mode": args.control_mode or "balanced"}


def _read(location: str, what: str):
    from PIL import Image, UnidentifiedImageError
    try:
        with open_input(location) as f, Image.open(f) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ControlImageError(f"{what} {location}: file not found") from None
    except IsADirectoryError:
        raise ControlImageError(f"{what} {location}: is a folder; give an image file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ControlImageError(f"{what} {location}: not a readable image ({e})") from None


class ControlImages:
    """Each sample's control images (one per ControlNet), read and preprocessed once per
    file (the last few kept: rows usually come with their images in order)."""

    def __init__(self, args: argparse.Namespace, table: str, keep: int = 64):
        from sdjax.controlnet.preprocessors import preprocess
        self._preprocess = preprocess
        self.names = [n for n, _ in args.controlnet or []]
        pre = args.control_preprocessor or []
        self.modules = [pre[k] if k < len(pre) else "none" for k in range(len(self.names))]
        self.seed = controlnet_cli.shuffle_seed(args)
        self.table = table
        given = args.control_image or []
        self.defaults = [self._made(str(given[k]), k, "--control_image")
                         if k < len(given) else None for k in range(len(self.names))]
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._keep = keep

    def location(self, name: str) -> str:
        if is_url(self.table):
            return posixpath.join(posixpath.dirname(self.table), name)
        return str(Path(self.table).parent / name)

    def _made(self, location: str, k: int, what: str) -> np.ndarray:
        image = _read(location, what)
        # at the image's own resolution, as sample runs the preprocessors
        return self._preprocess(self.modules[k], image, processor_res=min(image.size),
                                seed=self.seed)

    def for_row(self, name: str | None, row: int) -> list[np.ndarray]:
        if name is None:
            missing = [k for k, d in enumerate(self.defaults) if d is None]
            if missing:
                raise ControlImageError(
                    f"row {row + 1} of {self.table} has no control_image and --controlnet "
                    f"{self.names[missing[0]]} has no --control_image")
            return list(self.defaults)
        if name not in self._cache:
            where = self.location(name)
            self._cache[name] = [self._made(where, k, f"row {row + 1}: control_image")
                                 for k in range(len(self.names))]
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(name)
        return self._cache[name]

    def call_kwargs(self, images: list[list[np.ndarray]]) -> dict:
        """``pipe(...)``'s control_image for a batch: per ControlNet, one per image."""
        k = len(self.names)
        nets = [[imgs[j] for imgs in images] for j in range(k)]
        return {"control_image": nets[0] if k == 1 else nets}
