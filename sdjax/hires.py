"""The WebUI's hires fix: a text-to-image call, then an img2img call on its upscaled output.

The second pass is exactly ``pipe(prompt, image=<the first pass, upscaled>,
strength=hires_denoising_strength, num_inference_steps=hires_steps or the first pass's,
scheduler=hires_scheduler or the first pass's, seeds=<the first pass's seeds>,
first_pass_steps=<the first pass's steps, doubled for second-order samplers>)`` at the hires
size: ``first_pass_steps`` schedules edited prompts as the WebUI's hires pass does
(``[a:b:0.5]`` is all ``b``, ``[a:b:1.5]`` switches halfway through it). Latent upscalers
resize the first pass's latents as torch's ``F.interpolate`` does for their mode
(:mod:`sdjax.latent_resize`); image upscalers resize its uint8 images with PIL (the WebUI's
Lanczos and Nearest) and the second call encodes them. Each pass is an ordinary
call of the pipeline, so each has its own cached executable and is sharded like any call; the
first pass's result comes to the host between the two.

The sizes are the WebUI's: ``hires_scale`` gives ``int(size * scale)``; a ``hires_size``
(height, width) of another aspect ratio is covered at the image's aspect and the centre is
cropped, in latent units, as the WebUI truncates its latents (a 0 in it takes the image's
aspect). The result is rounded down to the VAE factor.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from sdjax import latent_resize, validation
from sdjax.hires_settings import (
    EXTRA_FIELDS,
    UPSCALERS,
    WEBUI_NAMES,
    Sizes,
    centre_crop,
    check_strength,
    check_upscaler,
    is_latent,
    sizes,
)
from sdjax.schedulers import ALL_SCHEDULER_NAMES


def check(pipe, c) -> tuple[str, Sizes]:
    """The hires fields of call ``c`` checked before anything runs: (upscaler, sizes)."""
    if getattr(pipe, "UPSCALER", False):
        raise ValueError("the hires fix is for text-to-image models, not the x4 upscaler")
    if c.task_inputs is not None or c.image is not None or c.mask_image is not None:
        raise ValueError("the hires fix is a text-to-image call's second pass: leave image=, "
                         "mask_image= and task_inputs= out")
    if c.output_type not in ("uint8", "float", "latent"):
        raise ValueError(f"output_type must be 'uint8', 'float' or 'latent', not "
                         f"{c.output_type!r}")
    if c.first_pass_steps is not None:
        raise ValueError("first_pass_steps is the hires pass's own (sdjax.hires sets it): "
                         "leave it out of a call with hires_scale or hires_size")
    upscaler = check_upscaler(c.hires_upscaler)
    check_strength(c.hires_denoising_strength)
    if c.hires_steps is not None:
        validation.check_int(c.hires_steps, "hires_steps", minimum=0)
    validation.check_choice(c.hires_scheduler, "hires_scheduler", ALL_SCHEDULER_NAMES,
                            allow_none=True)
    for name in ("hires_prompt", "hires_negative_prompt"):
        validation.check_prompts(getattr(c, name), name, allow_none=True)
    factor = pipe.vae_scale_factor
    height, width = (validation.check_size(v, k, factor) if v is not None else d
                     for k, v, d in (("height", c.height, pipe.default_hw[0]),
                                     ("width", c.width, pipe.default_hw[1])))
    return upscaler, sizes(height, width, factor, c.hires_scale, c.hires_size)


def _per_prompt(value, prompts):
    """A hires prompt given once for a call of several prompts: the same for each."""
    if isinstance(value, str) and not isinstance(prompts, str):
        return [value] * len(list(prompts))
    return value


def upscale(first: np.ndarray, upscaler: str, s: Sizes) -> np.ndarray:
    """The first pass's output (latents, or uint8 images) upscaled and cropped to the hires
    pass's input."""
    how = UPSCALERS[upscaler]
    if isinstance(how, tuple):
        out = latent_resize.interpolate(first, s.resized, *how)
        return np.asarray(centre_crop(out, s.crop))
    h, w = (v * s.factor for v in s.resized)
    resample = getattr(Image.Resampling, how)
    images = np.stack([np.asarray(Image.fromarray(im).resize((w, h), resample))
                       for im in first])
    return centre_crop(images, (s.crop[0] * s.factor, s.crop[1] * s.factor))


def submit(pipe, c):
    """``pipe.submit(c)`` for a call with hires_scale or hires_size: the first pass runs to
    the host, then the second is submitted (its PendingImages is returned)."""
    upscaler, s = check(pipe, c)
    cleared = {"hires_scale": None, "hires_size": None, **dict.fromkeys(EXTRA_FIELDS)}
    first = dataclasses.replace(c, **cleared,
                                output_type="latent" if is_latent(upscaler) else "uint8")
    out = pipe.submit(first).result()
    # The WebUI schedules the hires pass's prompts after the first pass's steps (doubled for
    # samplers with two evaluations per step, as its firstpass_steps are).
    steps, sched = pipe._schedule(c.num_inference_steps, c.scheduler, c.schedule_type,
                                  c.sampler_options)
    image = upscale(out.images, upscaler, s)
    latent = is_latent(upscaler)
    second = dataclasses.replace(
        c, **cleared,
        prompt=c.prompt if c.hires_prompt is None else _per_prompt(c.hires_prompt, c.prompt),
        negative_prompt=(c.negative_prompt if c.hires_negative_prompt is None
                         else _per_prompt(c.hires_negative_prompt, c.prompt)),
        num_inference_steps=c.hires_steps or c.num_inference_steps,
        scheduler=c.hires_scheduler or c.scheduler,
        image=image, strength=float(c.hires_denoising_strength),
        height=None if latent else s.pixels[0], width=None if latent else s.pixels[1],
        seeds=out.seeds, latents=None, first_pass_steps=steps * sched.order)
    return pipe.submit(second)


def check_one_pass(c) -> None:
    """A call that is one pass: ``tiling`` a bool, no hires fix (``pipe.compile`` and
    ``pipe.lower`` take one pass; ``submit`` runs the hires fix's two) and no hires options
    without it."""
    if not isinstance(c.tiling, (bool, np.bool_)):
        raise TypeError(f"tiling must be True or False, got {c.tiling!r}")
    if c.first_pass_steps is not None:
        validation.check_int(c.first_pass_steps, "first_pass_steps", minimum=1)
    if c.hires_scale is not None or c.hires_size is not None:
        raise ValueError("the hires fix is two calls: compile or lower each pass on its own "
                         "(the second is img2img on the first's upscaled output)")
    for name in EXTRA_FIELDS:
        if getattr(c, name) is not None:
            raise ValueError(f"{name} is the hires fix's: give hires_scale or hires_size too")


__all__ = ["check_one_pass", "UPSCALERS", "WEBUI_NAMES", "EXTRA_FIELDS", "Sizes", "sizes", "check",
           "check_upscaler", "check_strength", "is_latent", "upscale", "submit"]
