"""StableDiffusionUpscalePipeline: the x4 upscaler (``stabilityai/stable-diffusion-x4-upscaler``
layout) on the same sampling core as text-to-image.

The UNet denoises latents the size of the low-resolution image, which it also takes as three
extra input channels after DDPM noise at ``noise_level`` was added to it (the low-res
scheduler), with the noise level as its class label; the VAE (factor 4) decodes to 4x the
input size. Loading is StableDiffusionPipeline's; this class adds the low-res scheduler and
the task's inputs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdjax import task_inputs, tasks
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.schedulers import get_scheduler
from sdjax.task_inputs import TaskInputs, TaskRequest
from sdjax.vae_tiling import VaeTiling
from sdjax.weights.errors import WeightsError
from sdjax.weights.files import read_json
from sdjax.weights.resolve import resolve_model

DEFAULT_MAX_NOISE_LEVEL = 350  # diffusers' default when model_index.json does not say
DEFAULT_NOISE_LEVEL = 20  # diffusers' default noise_level
# vae_tiling=None decodes in tiles above this many output pixels: a 256x256 input (1024x1024
# out) still decodes whole, a 512x512 one (2048x2048 out, whose whole decode needs its
# mid-block attention over 512x512 latents) in tiles.
TILED_DECODE_ABOVE = 1024 * 1024


class StableDiffusionUpscalePipeline(StableDiffusionPipeline):
    """``up(prompt, image=low_res, noise_level=20, num_inference_steps=75, guidance_scale=9.0,
    seed=0)`` -> images 4x the size of ``image``. Other arguments as StableDiffusionPipeline's
    (no height/width, mask_image or strength)."""

    UPSCALER = True
    low_res_scheduler = None
    max_noise_level = DEFAULT_MAX_NOISE_LEVEL
    # diffusers' StableDiffusionUpscalePipeline defaults, between a folder's sdjax.json and
    # the library's (sdjax.model_defaults.resolve).
    class_defaults = {"num_inference_steps": 75, "guidance_scale": 9.0}

    @classmethod
    def from_pretrained(cls, model: str, *args, **kwargs) -> StableDiffusionUpscalePipeline:
        folder = resolve_model(model)
        config_path = folder / "low_res_scheduler" / "scheduler_config.json"
        if not config_path.is_file():
            raise WeightsError(f"{folder} is not an x4 upscaler folder: missing "
                               "low_res_scheduler/scheduler_config.json")
        pipe = super().from_pretrained(model, *args, **kwargs)
        pipe.low_res_scheduler = get_scheduler("ddpm", read_json(config_path))
        index = folder / "model_index.json"
        if index.is_file():
            pipe.max_noise_level = int(read_json(index).get("max_noise_level",
                                                            DEFAULT_MAX_NOISE_LEVEL))
        extra = pipe.unet_config.in_channels - pipe.vae_config.latent_channels
        if extra != 3 or not pipe.unet_config.num_class_embeds:
            raise WeightsError(f"{folder}: the UNet is not an x4 upscaler's (it needs "
                               f"{pipe.vae_config.latent_channels + 3} input channels and a "
                               "class embedding)")
        return pipe

    @property
    def default_hw(self) -> tuple[int, int]:
        raise ValueError("the upscaler's output size is 4x its input image")

    def _prepare_task(self, r: TaskRequest) -> TaskInputs:
        """The x4 upscaler's task: ``image`` is the low-resolution input (no height/width,
        mask_image, strength or denoising_start: it starts from noise); ``noise_level``
        (default 20) the DDPM noise added to it; ``image_noise`` (NHWC float, shaped like the
        low-res image batch) replaces the noise drawn from (seed, i) for it. ``vae_tiling``:
        decode in overlapping tiles as diffusers' ``enable_vae_tiling`` does (True), whole
        (False), or tiles only above ``TILED_DECODE_ABOVE`` output pixels (None)."""
        if r.denoising_start is not None:
            raise ValueError("the upscaler has no denoising_start: it starts from noise")
        if r.image is None:
            raise ValueError("the upscaler needs an image to upscale (image=)")
        if r.mask_image is not None or r.strength is not None:
            raise ValueError("the upscaler takes no mask_image or strength")
        if r.height is not None or r.width is not None:
            raise ValueError("the upscaler takes no height/width: its output is 4x the image")
        if (r.mask_blur, r.padding_mask_crop, r.masked_content) != (0, None, "original"):
            raise ValueError("the upscaler takes no inpainting options")
        noise_level, image_noise = r.noise_level, r.image_noise
        noise_level = DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
        if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)) \
                or not 0 <= noise_level <= self.max_noise_level:
            raise ValueError(f"noise_level must be an integer in [0, {self.max_noise_level}], "
                             f"got {noise_level!r}")
        rgb = [tasks.to_rgb(x)[0] for x in tasks.as_list(r.image)]
        rgb = tasks.per_image(rgb, r.num_prompts, r.num_images_per_prompt, "image")
        f = self.vae_scale_factor
        # Like diffusers' processor, the low-res image is cut down to a multiple of the VAE
        # factor; its latents have its size and the output is f times larger.
        h, w = tasks.default_size(rgb[0], f)
        if h < f or w < f:
            raise ValueError(f"the image is too small to upscale ({rgb[0].shape[1]}x"
                             f"{rgb[0].shape[0]}; at least {f}x{f})")
        low = np.stack([tasks.resize(x, h, w, Image.Resampling.BICUBIC) for x in rgb])
        n = len(low)
        arrays = {"image": low, "noise_level": np.full((n,), noise_level, np.int32)}
        if image_noise is not None:
            image_noise = np.asarray(image_noise, np.float32)
            if image_noise.shape != (n, h, w, 3):
                raise ValueError(f"image_noise must have shape {(n, h, w, 3)}, got "
                                 f"{image_noise.shape}")
            arrays["image_noise"] = image_noise
        tiles = decode_tiling(self.vae_config, h, w, r.vae_tiling)
        inputs = TaskInputs(tasks.upscaling(self.low_res_scheduler, tiles), arrays, h * f, w * f)
        return task_inputs.stopped_at(inputs, r.scheduler, r.steps, r.denoising_end)


def decode_tiling(vae_config, h: int, w: int, vae_tiling: bool | None) -> VaeTiling | None:
    """How the upscaler decodes (h, w) latents: diffusers' tiles when ``vae_tiling`` is True,
    or None and the output exceeds ``TILED_DECODE_ABOVE`` pixels; None (a whole decode)
    otherwise, and for latents within one tile, as diffusers' tiled decode."""
    if vae_tiling not in (None, True, False):
        raise ValueError(f"vae_tiling must be None, True or False, got {vae_tiling!r}")
    f = vae_config.downsample_factor
    if vae_tiling is False or (vae_tiling is None and h * w * f * f <= TILED_DECODE_ABOVE):
        return None
    tiling = VaeTiling.for_vae(vae_config)
    return tiling if tiling.applies(h, w) else None
