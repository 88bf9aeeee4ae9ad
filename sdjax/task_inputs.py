"""The host side of a call's task, as one frozen value: which task (text-to-image, img2img,
inpainting), its batched arrays (resized images, binarised masks, latents given as the image),
the span of the schedule that runs (the start step from ``strength`` or ``denoising_start``,
the stop from ``denoising_end``), the output size, and the host post-processing of the
images ("only masked" inpainting's paste-back).

:func:`prepare` makes it; ``pipe.prepare(...)`` calls it with the model's facts, and a call
takes the value as it is (``pipe(prompts, task_inputs=...)``), so a server that validates a
request by preparing it never resizes, blurs or fills its images twice. The x4 upscaler's
inputs are its own (``sdjax.upscale``) but the same value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from sdjax import tasks, validation
from sdjax.schedulers import cut
from sdjax.schedulers.common import Scheduler, start_index


class ImageModel(NamedTuple):
    """What preparing a task needs to know of the model."""

    unet_in_channels: int
    latent_channels: int
    factor: int  # the VAE's downsampling factor
    default_hw: tuple[int, int]  # the size of text-to-image outputs


@dataclasses.dataclass(frozen=True, eq=False)
class TaskInputs:
    """One call's task, prepared on the host (see the module docstring)."""

    task: tasks.Task
    arrays: Mapping[str, np.ndarray]  # batched (one row per image), task.input_names
    height: int
    width: int
    start: int = 0  # the start step (sdjax.schedulers.start), a runtime input of the core
    stop: int | None = None  # the evaluation the loop stops before (denoising_end), or None
    finish: Callable[[np.ndarray], np.ndarray] | None = None  # host post-processing

    @property
    def num_images(self) -> int | None:
        """Rows of the arrays (None for text-to-image, which has none)."""
        return len(next(iter(self.arrays.values()))) if self.arrays else None

    @classmethod
    def concat(cls, parts: Sequence[TaskInputs]) -> TaskInputs:
        """The inputs of one call made of several prepared requests, in order; they must
        share the task, size and span (the server merges only such requests)."""
        first = parts[0]
        if len(parts) == 1:
            return first
        for p in parts[1:]:
            if (p.task, p.height, p.width, p.start, p.stop, sorted(p.arrays)) != (
                    first.task, first.height, first.width, first.start, first.stop,
                    sorted(first.arrays)):
                raise ValueError("prepared inputs of different tasks, sizes or spans cannot "
                                 "share a call")
        arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in first.arrays}
        finish = None
        if any(p.finish is not None for p in parts):
            finish = _concat_finish([(p.num_images, p.finish) for p in parts])
        return dataclasses.replace(first, arrays=arrays, finish=finish)


def _concat_finish(pieces: list[tuple[int, Callable | None]]) -> Callable:
    def finish(images: np.ndarray) -> np.ndarray:
        out, at = [], 0
        for n, fn in pieces:
            part = images[at:at + n]
            out.append(part if fn is None else fn(part))
            at += n
        return np.concatenate(out)
    return finish


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class TaskOptions:
    """A call's task arguments (fields of ``sdjax.call.Call`` too, and of ``pipe.prepare``):
    img2img with ``image``, inpainting with ``mask_image``, the x4 upscaler's input; their
    meanings are in docs/python-api.md. Written once, here."""

    image: object = None  # PIL | uint8 (H, W, 3) | a list / (N, H, W, 3) | latents
    mask_image: object = None  # white = repaint
    strength: float | None = None  # None: 0.8 for img2img, 1.0 for inpainting
    mask_blur: float = 0
    padding_mask_crop: int | None = None  # the WebUI's "only masked" padding
    masked_content: str = "original"  # tasks.MASKED_CONTENT
    denoising_start: float | None = None  # img2img from another model's denoising_end
    denoising_end: float | None = None
    # The x4 upscaler's (sdjax.upscale); refused by the others.
    noise_level: int | None = None  # None: 20
    image_noise: object = None  # the low-res image's noise, replacing the draw from (seed, i)
    vae_tiling: bool | None = None  # decode in tiles: True, False, None = above a size

    def task_options(self) -> dict[str, object]:
        """These fields by name (of a Call, too)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TaskOptions)}


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class TaskRequest(TaskOptions):
    """What a call says of its task, with the image count, the steps and the scheduler
    resolved; the pipelines turn it into :class:`TaskInputs`."""

    num_prompts: int
    num_images_per_prompt: int
    steps: int
    scheduler: Scheduler
    height: int | None = None
    width: int | None = None


def prepare(model: ImageModel, r: TaskRequest) -> TaskInputs:
    """The task of a call from the user's images, or text-to-image without one; raises
    ``ValueError`` naming the argument. ``mask_blur`` (pixels) softens the mask before it is
    binarised and, with ``padding_mask_crop``, is the feathered edge of the paste-back.
    ``padding_mask_crop`` is the WebUI's "only masked" inpainting: the mask's bounding box
    plus this many pixels is generated at the full ``height`` x ``width`` and pasted back.
    ``masked_content`` is the WebUI's (``tasks.MASKED_CONTENT``). ``denoising_start``
    (img2img, in place of ``strength``) starts at that fraction of the schedule from the
    image as it is (diffusers' hand-off); ``denoising_end`` stops there."""
    for name in ("noise_level", "image_noise", "vae_tiling"):
        if getattr(r, name) is not None:
            raise ValueError(f"{name} is for x4 upscaler models")
    denoising_start = r.denoising_start
    if denoising_start is not None:
        denoising_start = cut.check_fraction(denoising_start, "denoising_start")
        if r.image is None or r.mask_image is not None:
            raise ValueError("denoising_start is img2img's: pass image= (latents from a "
                             "denoising_end call, or an image) and no mask_image")
        if r.strength is not None:
            raise ValueError("strength and denoising_start both say where img2img starts: "
                             "give one")
    inputs = _image_task(model, r, from_strength=denoising_start is None)
    if denoising_start is not None:
        # The image is the latents another model stopped at (its denoising_end), already
        # noisy: the run starts at the step where that one ended, adding no noise.
        inputs = dataclasses.replace(
            inputs, start=cut.denoising_start_step(r.scheduler, r.steps, denoising_start),
            task=dataclasses.replace(inputs.task, noised_start=False))
    return stopped_at(inputs, r.scheduler, r.steps, r.denoising_end, denoising_start)


def stopped_at(inputs: TaskInputs, scheduler: Scheduler, steps: int,
               denoising_end: float | None, denoising_start: float | None = None
               ) -> TaskInputs:
    """``inputs`` with the evaluation a ``denoising_end`` run stops before (unchanged for
    None)."""
    if denoising_end is None:
        return inputs
    denoising_end = cut.check_fraction(denoising_end, "denoising_end")
    if denoising_start is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start ({denoising_start:g}) must be below "
                         f"denoising_end ({denoising_end:g})")
    return dataclasses.replace(inputs, stop=cut.denoising_end_stop(
        scheduler, steps, inputs.start, denoising_end))


def check_size(height: int, width: int, factor: int) -> None:
    for name, v in (("height", height), ("width", width)):
        validation.check_size(v, name, factor)


def _image_task(model: ImageModel, r: TaskRequest, *, from_strength: bool) -> TaskInputs:
    """Text-to-image, img2img or inpainting, from the user's images; ``from_strength`` False:
    the start step comes from elsewhere (denoising_start), so ``strength`` is not read."""
    n_prompts, per_prompt, height, width = (r.num_prompts, r.num_images_per_prompt, r.height,
                                            r.width)
    image, mask_image, strength, masked_content = (r.image, r.mask_image, r.strength,
                                                   r.masked_content)
    mask_blur, padding_mask_crop = r.mask_blur, r.padding_mask_crop
    inpainting_unet = model.unet_in_channels != model.latent_channels
    if image is None:
        if mask_image is not None:
            raise ValueError("mask_image needs an image to inpaint")
        if strength is not None:
            raise ValueError("strength needs an image (img2img or inpainting)")
        if inpainting_unet:
            raise ValueError(f"this UNet takes {model.unet_in_channels} input channels: it is "
                             "an inpainting model; pass image= and mask_image=")
        height = model.default_hw[0] if height is None else height
        width = model.default_hw[1] if width is None else width
        return TaskInputs(tasks.TXT2IMG, {}, height, width)
    if mask_image is None and inpainting_unet:
        raise ValueError("this is an inpainting model: pass mask_image= with image=")
    if mask_image is None and padding_mask_crop is not None:
        raise ValueError("padding_mask_crop needs a mask_image")
    if masked_content not in tasks.MASKED_CONTENT or (
            mask_image is None and masked_content != "original"):
        raise ValueError(f"masked_content must be one of {', '.join(tasks.MASKED_CONTENT)} "
                         f"with a mask_image, got {masked_content!r}")
    start = 0
    if from_strength:
        strength = (validation.default_strength(mask_image is not None) if strength is None
                    else strength)
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) \
                or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
        # A WebUI sampler takes strength as the WebUI's denoising strength (its step rule).
        webui_start = getattr(r.scheduler, "webui_start", None)
        start = (start_index(r.steps, float(strength)) if webui_start is None
                 else webui_start(r.steps, float(strength))[1])
    latents = tasks.as_latents(image, model.latent_channels)
    if latents is not None:
        if mask_image is not None:
            raise ValueError("inpainting needs an image, not latents, with mask_image")
        height, width = _latent_image_size(latents[0], height, width, model.factor)
        arrays = {"image": np.stack(tasks.per_image(latents, n_prompts, per_prompt, "image"))}
        return TaskInputs(tasks.IMG2IMG_LATENTS, arrays, height, width, start)
    rgb = [tasks.to_rgb(x)[0] for x in tasks.as_list(image)]
    rgb = tasks.per_image(rgb, n_prompts, per_prompt, "image")
    default = tasks.default_size(rgb[0], model.factor)
    height = default[0] if height is None else height
    width = default[1] if width is None else width
    check_size(height, width, model.factor)
    if mask_image is None:
        arrays = {"image": np.stack([tasks.resize(x, height, width) for x in rgb])}
        return TaskInputs(tasks.IMG2IMG, arrays, height, width, start)
    grays = [tasks.to_gray(m) for m in tasks.as_list(mask_image)]
    grays = tasks.per_image(grays, n_prompts, per_prompt, "mask")
    for g in grays:  # one rule for every front end (validation)
        validation.check_mask_not_empty(g)
    if mask_blur:
        grays = [np.round(tasks.blur_mask(g, mask_blur) * 255).astype(np.uint8) for g in grays]
    finish = None
    if padding_mask_crop is not None:
        finish, rgb, grays = _only_masked(rgb, grays, padding_mask_crop, height, width)
    images = [tasks.resize(x, height, width) for x in rgb]
    if masked_content != "original":  # the WebUI fills for every other choice
        images = [tasks.fill_masked(x, tasks.resize(g, height, width))
                  for x, g in zip(images, grays, strict=True)]
    arrays = {"image": np.stack(images),
              "mask": np.stack([tasks.binarize(g, height, width) for g in grays])}
    task = tasks.inpainting(model.unet_in_channels, model.latent_channels, masked_content)
    return TaskInputs(task, arrays, height, width, start, finish=finish)


def _latent_image_size(latents: np.ndarray, height: int | None, width: int | None,
                       factor: int) -> tuple[int, int]:
    """The (height, width) of the images that latents given as ``image`` make; a height or
    width given too must agree (latents are not resized)."""
    size = (latents.shape[0] * factor, latents.shape[1] * factor)
    if (height or size[0], width or size[1]) != size:
        raise ValueError(f"latents of {latents.shape[0]}x{latents.shape[1]} make "
                         f"{size[0]}x{size[1]} images (height x width): leave height and "
                         "width out or give those")
    return size


def _only_masked(rgb, grays, padding, height, width):
    """Crop each image and (already blurred) mask to its region; the paste-back that undoes
    it through the mask."""
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"padding_mask_crop must be an integer >= 0, got {padding!r}")
    if any(x.shape[:2] != rgb[0].shape[:2] or g.shape != x.shape[:2]
           for x, g in zip(rgb, grays, strict=True)):
        raise ValueError("padding_mask_crop needs every image and mask at one size")
    boxes = [tasks.only_masked_box(g, padding, height, width) for g in grays]
    alphas = np.stack([tasks.blur_mask(g, 0) for g in grays])
    finish = tasks.OnlyMasked(np.stack(rgb), alphas, boxes).paste
    rgb = [x[t:b, l:r] for x, (t, l, b, r) in zip(rgb, boxes, strict=True)]
    grays = [g[t:b, l:r] for g, (t, l, b, r) in zip(grays, boxes, strict=True)]
    return finish, rgb, grays
