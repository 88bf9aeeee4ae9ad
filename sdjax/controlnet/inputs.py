"""The host side of a call's ControlNets: its control images resized to the output size, and
per image the runtime arrays the sampler's residual source reads (``sdjax.controlnet.source``):

- ``control_image_K`` (N, H, W, 3) uint8: ControlNet K's image, RGB, resized with PIL's
  Lanczos as diffusers' control image processor does (the network divides by 255);
- ``control_weights`` (N, K, R + 1) float32: the factor of each of the R down residuals and
  the mid one: the conditioning scale, times diffusers' guess-mode ramp
  ``logspace(-1, 0, R + 1)``, times the WebUI extension's soft injection ``0.825 ** (12 -
  r)`` in its "prompt" and "controlnet" control modes;
- ``control_uncond`` (N, K) float32: 1, or 0 where the unconditional rows get no residuals
  (guess mode, and the extension's "ControlNet is more important");
- ``control_keep`` (N, K, E) float32: 1 at the UNet evaluations (of the E of the schedule)
  where the ControlNet runs: diffusers' ``keep = not (i / n < start or (i + 1) / n > end)``
  over the n evaluations that run.

Every rule raises one line naming the argument (the API, CLIs and server share them).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from sdjax import tasks, validation
from sdjax.schedulers.start import strength_for_start

CONTROL_MODES = ("balanced", "prompt", "controlnet")
# The WebUI extension's soft injection (scripts/hook.py): residual r of the 13 an SD 1.x
# ControlNet gives (12 = the mid block's) is scaled by SOFT ** (12 - r); SDXL's 10 take the
# first 10 of those factors.
SOFT, SOFT_TOP = 0.825, 12
FIELDS = ("control_image", "controlnet_conditioning_scale", "control_guidance_start",
          "control_guidance_end", "guess_mode", "control_mode")
DEFAULTS = {"control_image": None, "controlnet_conditioning_scale": 1.0,
            "control_guidance_start": 0.0, "control_guidance_end": 1.0, "guess_mode": False,
            "control_mode": "balanced"}


def check_no_control(given: dict[str, Any]) -> None:
    """A call without ControlNets takes none of their arguments."""
    for name in FIELDS:
        value = given[name]
        if value is not None and not (isinstance(value, (bool, int, float, str))
                                      and value == DEFAULTS[name]):
            raise ValueError(f"{name} needs a ControlNet: load one with "
                             "from_pretrained(..., controlnet=...) or pipe.load_controlnet")


def _per_net(value: Any, name: str, k: int) -> list:
    """One value for every ControlNet, or one per ControlNet."""
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"{name} has {len(value)} values for {k} ControlNet(s): give one, "
                             "or one per ControlNet")
        return list(value)
    return [value] * k


def check_scales(value: Any, k: int) -> list[float]:
    name = "controlnet_conditioning_scale"
    return [validation.check_number(v, name, minimum=0) for v in _per_net(value, name, k)]


def check_windows(start: Any, end: Any, k: int) -> list[tuple[float, float]]:
    """(start, end) fractions of the steps per ControlNet: in [0, 1], start below end."""
    out = []
    for s, e in zip(_per_net(start, "control_guidance_start", k),
                    _per_net(end, "control_guidance_end", k), strict=True):
        s = validation.check_number(s, "control_guidance_start")
        e = validation.check_number(e, "control_guidance_end")
        for name, v in (("control_guidance_start", s), ("control_guidance_end", e)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v:g}")
        if s >= e:
            raise ValueError(f"control_guidance_start ({s:g}) must be below "
                             f"control_guidance_end ({e:g})")
        out.append((s, e))
    return out


def check_modes(value: Any, k: int) -> list[str]:
    return [validation.check_choice(v, "control_mode", CONTROL_MODES)
            for v in _per_net(value, "control_mode", k)]


def _one_image(image: Any) -> np.ndarray:
    """A control image -> uint8 (H, W, 3); refused in one line when it is not one."""
    if not isinstance(image, (Image.Image, np.ndarray)):
        raise TypeError(f"control_image must be a PIL image or a uint8 (H, W, 3) array, got "
                        f"{type(image).__name__}")
    if isinstance(image, np.ndarray) and image.size == 0 or \
            isinstance(image, Image.Image) and 0 in image.size:
        raise ValueError("control_image is empty (0 pixels)")
    try:
        rgb = tasks.to_rgb(image)[0]
    except ValueError as e:
        raise ValueError(f"control_image: {e}") from None
    return rgb


def _images(value: Any) -> list[np.ndarray]:
    if isinstance(value, np.ndarray) and value.ndim == 4:
        return [_one_image(x) for x in value]
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("control_image is an empty list")
        return [_one_image(x) for x in value]
    return [_one_image(value)]


def split_images(value: Any, k: int) -> list[list[np.ndarray]]:
    """The control images of each of ``k`` ControlNets (each: one, one per prompt or one
    per image), from ``control_image`` as diffusers takes it: one ControlNet's image(s), or
    a list with one entry per ControlNet."""
    if k == 1:
        return [_images(value)]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"control_image: {k} ControlNets take a list of {k} images (one per "
                         "ControlNet)")
    if len(value) != k:
        more = "more" if len(value) > k else "fewer"
        raise ValueError(f"control_image: {len(value)} images for {k} ControlNets ({more} "
                         "images than ControlNets): give one per ControlNet")
    return [_images(v) for v in value]


def output_size(value: Any, k: int, factor: int) -> tuple[int, int]:
    """The size a call with these control images and no height/width makes: the first
    one's, rounded down to the VAE factor."""
    first = split_images(value, k)[0][0]
    return validation.round_size(*first.shape[:2], factor)


@functools.lru_cache(maxsize=64)
def _evaluations(scheduler, steps: int, start: int) -> tuple[int, int]:
    """(the schedule's UNet evaluations, the first that runs from start step ``start``)."""
    total = scheduler.num_evaluations(scheduler.set_timesteps(steps))
    if start == 0:
        return total, 0
    run = scheduler.num_evaluations(scheduler.set_timesteps(steps,
                                                            strength_for_start(steps, start)))
    return total, total - run


def keep_table(windows: Sequence[tuple[float, float]], scheduler, steps: int,
               start: int) -> np.ndarray:
    """(K, E) 1/0: whether ControlNet k runs at evaluation i (diffusers' controlnet_keep over
    the evaluations that run)."""
    total, first = _evaluations(scheduler, steps, start)
    n = total - first
    out = np.zeros((len(windows), total), np.float32)
    for k, (s, e) in enumerate(windows):
        for i in range(first, total):
            j = i - first
            out[k, i] = 0.0 if (j / n < s or (j + 1) / n > e) else 1.0
    return out


def weights(scales: Sequence[float], guess: Sequence[bool], modes: Sequence[str],
            residuals: int) -> tuple[np.ndarray, np.ndarray]:
    """((K, R + 1) residual factors, (K,) unconditional-row factors) of the module docstring."""
    r = np.arange(residuals + 1)
    ramp = np.logspace(-1, 0, residuals + 1, dtype=np.float32)
    soft = (SOFT ** (SOFT_TOP - r)).astype(np.float32)
    rows, uncond = [], []
    for scale, g, mode in zip(scales, guess, modes, strict=True):
        w = np.full(residuals + 1, np.float32(scale), np.float32)
        if g:
            w = ramp * np.float32(scale)
        if mode != "balanced":
            w = w * soft
        rows.append(w)
        uncond.append(0.0 if g or mode == "controlnet" else 1.0)
    return np.stack(rows).astype(np.float32), np.asarray(uncond, np.float32)


def prepare(call, *, configs: Sequence, n_prompts: int, per_prompt: int, height: int, width: int,
            scheduler, steps: int, start: int, init_images: np.ndarray | None
            ) -> dict[str, np.ndarray]:
    """The batched runtime arrays of ``call``'s ControlNet arguments (the module docstring)
    for ``n_prompts * per_prompt`` images of ``height`` x ``width``. ``configs`` are the
    ControlNets' configs; ``init_images`` the task's uint8 images (img2img,
    inpainting), which stand in for a missing control image, as in the WebUI extension."""
    k, n = len(configs), n_prompts * per_prompt
    given = {name: getattr(call, name) for name in FIELDS}
    if given["control_image"] is None:
        if init_images is None:
            raise ValueError(f"this pipeline has {k} ControlNet(s): pass control_image= (one "
                             "image per ControlNet)")
        per_net = [list(init_images)] * k
    else:
        per_net = split_images(given["control_image"], k)
    scales = check_scales(given["controlnet_conditioning_scale"], k)
    windows = check_windows(given["control_guidance_start"], given["control_guidance_end"], k)
    modes = check_modes(given["control_mode"], k)
    guess = given["guess_mode"]
    if not isinstance(guess, (bool, np.bool_)):
        raise TypeError(f"guess_mode must be True or False, got {type(guess).__name__}")
    residuals = {cfg.num_residuals for cfg in configs}
    if len(residuals) != 1:
        raise ValueError("the ControlNets give different numbers of residuals")
    w, uncond = weights(scales, [bool(guess) or cfg.global_pool_conditions
                                 for cfg in configs], modes, residuals.pop())
    out = {}
    for i, images in enumerate(per_net):
        if len(images) not in (1, n_prompts, n):
            raise ValueError(f"control_image: {len(images)} images for one ControlNet and "
                             f"{n_prompts} prompt(s) x {per_prompt} image(s): give one, one "
                             "per prompt, or one per image")
        images = tasks.per_image(images, n_prompts, per_prompt, "control image")
        out[f"control_image_{i}"] = np.stack([tasks.resize(x, height, width) for x in images])
    keep = keep_table(windows, scheduler, steps, start)
    out["control_weights"] = np.broadcast_to(w, (n, *w.shape)).copy()
    out["control_uncond"] = np.broadcast_to(uncond, (n, k)).copy()
    out["control_keep"] = np.broadcast_to(keep, (n, *keep.shape)).copy()
    return out
