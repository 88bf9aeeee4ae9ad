"""What each task feeds the sampling core (``sdjax.sampling``).

- txt2img: noise.
- img2img: the VAE-encoded image (posterior mean), noised to the step ``strength`` starts at;
  or latents given as the image (diffusers' hand-off from another model's ``denoising_end``),
  which ``denoising_start`` takes as they are, already noisy.
- inpainting: as img2img, plus the mask. 9-channel inpainting UNets take the downsampled mask
  and the masked image's latents as extra input channels; ordinary 4-channel UNets get the kept
  region's latents blended back after every step.
- x4 upscaling: noise, plus the low-resolution image (DDPM-noised to ``noise_level``) as extra
  input channels and the noise level as the UNet's class label.

Host side (numpy/PIL) this module turns the user's images and masks into the arrays the
compiled call takes, the way diffusers' image processors do; inside the call :func:`feed`
turns those arrays into latents and UNet inputs. It knows nothing of the CLI or files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sdjax import validation
from sdjax.vae_tiling import VaeTiling


@dataclasses.dataclass(frozen=True)
class Task:
    """A frozen description of one task; part of the compiled program's key."""

    name: str
    encodes_image: bool = False  # initial latents from the encoded `image` input
    latent_image: bool = False  # `image` holds those latents (scaled), not pixels: no encode
    noised_start: bool = True  # noise the image latents to the start step (False: as given)
    runtime_start: bool = False  # `strength` cuts the schedule at a traced start step
    pure_noise_at_full_strength: bool = False  # inpainting's strength 1: noise only
    mask_channels: bool = False  # 9-channel inpainting UNet: mask + masked-image latents
    blend: bool = False  # 4-channel inpainting: kept latents put back after each step
    low_res: Any = None  # the upscaler's low-res noise scheduler (a frozen DDPM)
    decode_tiles: VaeTiling | None = None  # decode in overlapping tiles (sdjax.vae_tiling)
    latent_fill: str | None = None  # inpainting: "noise" | "zero" start latents under the mask

    @property
    def input_names(self) -> tuple[str, ...]:
        """The batched arrays the task needs in the call's ``inputs``."""
        names = []
        if self.encodes_image or self.low_res is not None:
            names.append("image")
        if self.mask_channels or self.blend:
            names.append("mask")
        if self.low_res is not None:
            names.append("noise_level")
        return tuple(names)


# The WebUI's "Masked content" choices (validation.MASKED_CONTENT, in the order of its API's
# inpainting_fill). All but "original" first paint the masked region with colours of the kept
# one (fill_masked); "latent noise" / "latent nothing" then replace the masked region's
# start latents with the call's noise / zeros.
MASKED_CONTENT = validation.MASKED_CONTENT
_LATENT_FILL = {"latent noise": "noise", "latent nothing": "zero"}

TXT2IMG = Task("txt2img")
IMG2IMG = Task("img2img", encodes_image=True, runtime_start=True)
IMG2IMG_LATENTS = Task("img2img", encodes_image=True, runtime_start=True, latent_image=True)


def inpainting(unet_in_channels: int, latent_channels: int,
               masked_content: str = "original") -> Task:
    """The inpainting task for a UNet with ``unet_in_channels`` inputs."""
    fill = _LATENT_FILL.get(masked_content)
    if unet_in_channels == 2 * latent_channels + 1:
        return Task("inpaint", encodes_image=True, runtime_start=True,
                    pure_noise_at_full_strength=True, mask_channels=True, latent_fill=fill)
    if unet_in_channels == latent_channels:
        return Task("inpaint", encodes_image=True, runtime_start=True,
                    pure_noise_at_full_strength=True, blend=True, latent_fill=fill)
    raise ValueError(f"this UNet takes {unet_in_channels} input channels: inpainting needs "
                     f"{latent_channels} (any model) or {2 * latent_channels + 1} (an "
                     "inpainting model)")


def upscaling(low_res_scheduler, decode_tiles: VaeTiling | None = None) -> Task:
    return Task("upscale", low_res=low_res_scheduler, decode_tiles=decode_tiles)


class Feed(NamedTuple):
    """What the loop uses besides noise: each None when the task has none."""

    image_latents: jax.Array | None  # (B, h, w, C) scaled clean latents of the init image
    extra: jax.Array | None  # (B, h, w, k) channels appended to the UNet input every step
    class_labels: jax.Array | None  # (B,) int32
    repaint: jax.Array | None  # (B, h, w, 1) 1 where new content goes (inpainting)


def _signed(pixels: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1], as diffusers' processor: x / 255 * 2 - 1."""
    return 2.0 * (pixels.astype(jnp.float32) / 255.0) - 1.0


def encode(vae, pixels: jax.Array, scaling: float, chunk: int) -> jax.Array:
    """[-1, 1] NHWC pixels -> scaled latents, the posterior mean (so a call is a pure
    function of its inputs), a chunk of images at a time like the decode."""
    dtype = vae.encoder.conv_in.kernel.dtype
    mean = jax.lax.map(lambda p: vae.encode(p[None].astype(dtype))[0][0], pixels,
                       batch_size=chunk)
    return scaling * mean.astype(jnp.float32)


def feed(task: Task, vae, scaling: float, inputs: Mapping[str, jax.Array],
         noise_keys: jax.Array, *, chunk: int, noise: jax.Array | None = None) -> Feed:
    """Inside the compiled call: the task's arrays -> what the loop consumes. ``noise`` is
    the call's latent noise ("latent noise" inpainting starts from it under the mask)."""
    image_latents = extra = labels = repaint = None
    if task.latent_image:
        image_latents = inputs["image"].astype(jnp.float32)
    elif task.encodes_image:
        pixels = _signed(inputs["image"])
        image_latents = encode(vae, pixels, scaling, chunk)
        if "mask" in inputs:
            mask = inputs["mask"].astype(jnp.float32)[..., None]
            # The latent grid samples the (binary) mask at each cell's first pixel: torch's
            # nearest-neighbour resize, which diffusers uses, at an integer factor.
            f = mask.shape[1] // image_latents.shape[1]
            small = mask[:, ::f, ::f]
            if task.latent_fill is not None:
                # The WebUI's "latent noise" / "latent nothing": the masked region starts from
                # the seed's noise (the same draw as the start noise, as the WebUI's) or zeros.
                under = noise if task.latent_fill == "noise" else 0.0
                image_latents = (1 - small) * image_latents + small * under
            if task.mask_channels:
                masked = encode(vae, pixels * (mask < 0.5), scaling, chunk)
                extra = jnp.concatenate([small, masked], axis=-1)
            # (9-channel UNets too: the WebUI's samplers blend with it whatever the model)
            repaint = small
    if task.low_res is not None:
        low = _signed(inputs["image"])
        labels = inputs["noise_level"].astype(jnp.int32)
        if "image_noise" in inputs:
            noise = inputs["image_noise"].astype(jnp.float32)
        else:  # a stream of its own, so the latent noise stays that of (seed, i)
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), low.shape[1:],
                                                         jnp.float32))(noise_keys)
        extra = task.low_res.add_noise(low, noise, labels)
    return Feed(image_latents, extra, labels, repaint)


# ---------------------------------------------------------------------------------- host side
def to_rgb(image) -> tuple[np.ndarray, str | None]:
    """PIL image or array -> uint8 (H, W, 3), and a note when it had to be converted (alpha
    or palette images; the CLI says so)."""
    note = None
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            note = f"converted a {image.mode} image to RGB"
            image = image.convert("RGB")
        return np.asarray(image, np.uint8), note
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"an image array must be uint8 (H, W, 3), got {a.dtype}")
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1), "converted a grayscale image to RGB"
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"an image array must be (H, W, 3), got shape {a.shape}")
    if a.shape[-1] == 4:
        return np.ascontiguousarray(a[..., :3]), "dropped the alpha channel of an RGBA image"
    return a, note


def as_latents(image, channels: int) -> list[np.ndarray] | None:
    """Latents given as img2img's ``image`` (as diffusers takes an image with the latent
    channel count): float arrays (h, w, C) or (N, h, w, C), or a list of them -> a list of
    float32 (h, w, C); None when ``image`` is pixels (PIL images, uint8 arrays)."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if any(isinstance(x, Image.Image) for x in items):
        return None
    arrays = [np.asarray(x) for x in items]
    if not arrays or not all(np.issubdtype(a.dtype, np.floating) for a in arrays):
        return None
    out = []
    for a in arrays:
        if a.ndim not in (3, 4) or a.shape[-1] != channels:
            raise ValueError(f"an image array must be uint8 (H, W, 3) pixels, or float "
                             f"(h, w, {channels}) / (N, h, w, {channels}) latents; got "
                             f"{a.dtype} {a.shape}")
        out.extend(a if a.ndim == 4 else [a])
    if any(x.shape != out[0].shape for x in out):
        raise ValueError(f"latents given as image must share one shape, got "
                         f"{sorted({x.shape for x in out})}")
    if not all(np.isfinite(x).all() for x in out):
        raise ValueError("latents given as image hold NaN or infinite values")
    return [x.astype(np.float32) for x in out]


def to_gray(mask) -> np.ndarray:
    """PIL image or array -> uint8 (H, W), grayscale as PIL's "L" (white = repaint)."""
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L"), np.uint8)
    a = np.asarray(mask)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise ValueError(f"a mask array must be uint8 or bool, got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    return a if a.ndim == 2 else np.asarray(Image.fromarray(a[..., :3]).convert("L"))


def binarize(gray: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 grayscale mask -> uint8 (height, width) of 0/1: resized, then binarised at 0.5,
    as diffusers' mask processor does."""
    gray = resize(gray, height, width)
    return (gray.astype(np.float32) / 255.0 >= 0.5).astype(np.uint8)


def resize(a: np.ndarray, height: int, width: int,
           resample: Image.Resampling = Image.Resampling.LANCZOS) -> np.ndarray:
    """Resize like diffusers' processors (PIL; Lanczos, the upscaler's bicubic); masks are
    rebinarised afterwards."""
    if a.shape[:2] == (height, width):
        return a
    return np.asarray(Image.fromarray(a).resize((width, height), resample))


def as_list(images) -> list:
    """One image, a list of them, or an (N, H, W, C) array -> a list."""
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def per_image(items: Sequence, n_prompts: int, per_prompt: int, what: str) -> list:
    """Spread images over the call's ``n_prompts * per_prompt`` images: one for all, one per
    prompt, or one per image."""
    n = n_prompts * per_prompt
    if len(items) == 1:
        return list(items) * n
    if len(items) == n_prompts:
        return [x for x in items for _ in range(per_prompt)]
    if len(items) == n:
        return list(items)
    raise ValueError(f"{len(items)} {what}s for {n_prompts} prompt(s) x {per_prompt} "
                     f"image(s): give one, one per prompt, or one per image")


def default_size(image: np.ndarray, factor: int) -> tuple[int, int]:
    """The image's size rounded down to the VAE factor (diffusers' default for image input)."""
    return validation.round_size(*image.shape[:2], factor)


def blur_mask(mask: np.ndarray, radius: float) -> np.ndarray:
    """uint8 (H, W) 0/255 -> float32 [0, 1], Gaussian-blurred by ``radius`` pixels (the
    WebUI's "mask blur": a soft edge for pasting back; the model still sees it binarised)."""
    from PIL import ImageFilter
    if radius <= 0:
        return mask.astype(np.float32) / 255.0
    soft = Image.fromarray(mask).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(soft, np.float32) / 255.0


# The WebUI's "fill": (blur radius, times composited) from the blurriest layer up; the last,
# unblurred layer puts the kept region back exactly.
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) image, uint8 (H, W) mask (white = repaint) -> the image with the
    masked region painted from the kept region's colours, as the WebUI's "fill" does: the
    kept region (alpha = 255 - mask, premultiplied) blurred ever less and composited layer
    over layer."""
    from PIL import ImageFilter
    kept = Image.fromarray(np.dstack([image, 255 - mask]), "RGBA").convert("RGBa")
    out = Image.new("RGBA", kept.size)
    for radius, times in FILL_LAYERS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return np.asarray(out.convert("RGB"))


def only_masked_box(gray: np.ndarray, padding: int, height: int, width: int
                    ) -> tuple[int, int, int, int]:
    """The "only masked" region of a uint8 (blurred) mask: like the WebUI (its
    get_crop_region takes the bounding box of every non-zero pixel), a blurred edge too faint
    to be repainted still widens the region, so the paste-back's feather fits inside it."""
    return crop_region(gray > 0, padding, height, width)


def crop_region(mask: np.ndarray, padding: int, height: int, width: int
                ) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the region the WebUI's "only masked" mode generates: the
    mask's bounding box grown by ``padding`` pixels, then widened (or heightened) to the
    generation's aspect ratio, kept inside the image."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        raise ValueError("the mask is empty: nothing to inpaint")
    h_img, w_img = mask.shape
    top, bottom = max(rows[0] - padding, 0), min(rows[-1] + 1 + padding, h_img)
    left, right = max(cols[0] - padding, 0), min(cols[-1] + 1 + padding, w_img)
    target = width / height
    h, w = bottom - top, right - left
    if w / h < target:  # too tall: widen around the centre, then shift inside the image
        w = min(round(h * target), w_img)
        left = min(max((left + right - w) // 2, 0), w_img - w)
        right = left + w
    else:
        h = min(round(w / target), h_img)
        top = min(max((top + bottom - h) // 2, 0), h_img - h)
        bottom = top + h
    return int(top), int(left), int(bottom), int(right)


class OnlyMasked(NamedTuple):
    """Host-side state of the "only masked" mode: where each image's region came from."""

    originals: np.ndarray  # (N, H, W, 3) uint8
    alphas: np.ndarray  # (N, H, W) float32, the blurred masks
    boxes: list[tuple[int, int, int, int]]

    def paste(self, generated: np.ndarray) -> np.ndarray:
        """Generated regions back into the originals, through the feathered masks."""
        out = self.originals.astype(np.float32).copy()
        for i, (top, left, bottom, right) in enumerate(self.boxes):
            region = resize(generated[i], bottom - top, right - left).astype(np.float32)
            a = self.alphas[i, top:bottom, left:right, None]
            out[i, top:bottom, left:right] = a * region + (1 - a) * out[i, top:bottom, left:right]
        return np.round(out).astype(np.uint8)
