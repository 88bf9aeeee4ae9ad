"""What each user-supplied value must be, checked in one place before anything loads or compiles.

The Python API, the CLIs (through :mod:`sdjax.cli_args`) and the server call these, so a wrong
value gets the same one-line message wherever it comes from, naming the argument and what it
should be. Wrong types raise ``TypeError``, wrong values ``ValueError``. Nothing here imports
JAX: the CLIs check their flags before paying for it.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The sampler's PRNG seeds are uint32: larger values would silently alias smaller ones
# (2**32 would give seed 0's pixels while the metadata says otherwise), so they are refused.
MAX_SEED = 2**32
RANDOM_SEED = -1  # the WebUI's convention: pick a random seed and report it
# The WebUI's "Masked content" choices for inpainting, in the order of its API's
# inpainting_fill (0-3) (sdjax.tasks implements them).
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
# The start noise's sources (sdjax.noise): JAX's own, the WebUI's NV (its "GPU"), torch's CPU.
RNG_NAMES = ("jax", "nv", "cpu")


def _show(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"{text} ({type(value).__name__})" if not isinstance(value, (int, float)) \
        or isinstance(value, bool) else text


def check_int(value: Any, name: str, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """An integer (numpy integers included, bools and floats refused) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {_show(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_number(value: Any, name: str, *, minimum: float | None = None) -> float:
    """A finite real number (ints accepted, bools and strings refused), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        bound = "negative" if minimum == 0 else f"below {minimum:g}"
        raise ValueError(f"{name} must not be {bound}, got {value:g}")
    return value


def check_seed(value: Any, name: str = "seed", *, allow_random: bool = True) -> int:
    """An integer in [0, 2**32), or -1 (random) where ``allow_random``."""
    seed = check_int(value, name)
    if allow_random and seed == RANDOM_SEED:
        return seed
    if not 0 <= seed < MAX_SEED:
        also = " or -1 for a random seed" if allow_random else ""
        raise ValueError(f"{name} must be in [0, 2**32){also}, got {seed}")
    return seed


def resolve_seed(seed: int) -> int:
    """``seed``, or a fresh random one for -1 (the caller reports it: it is what reproduces)."""
    return random.SystemRandom().randrange(MAX_SEED) if seed == RANDOM_SEED else seed


def check_size(value: Any, name: str, factor: int = 1) -> int:
    """A height or width: a positive integer multiple of the model's VAE factor."""
    v = check_int(value, name)
    if v < factor or v % factor:
        what = "positive integer" if factor == 1 else f"positive multiple of {factor}"
        raise ValueError(f"{name} must be a {what}, got {v}")
    return v


def round_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """(height, width) rounded down to multiples of ``factor`` (the VAE's): the size an
    image input gives when no size is asked for (diffusers' rule)."""
    return height // factor * factor, width // factor * factor


# diffusers' defaults: img2img keeps some of the image; inpainting repaints the masked region
# from pure noise, since the kept region is restored anyway.
IMG2IMG_STRENGTH = 0.8
INPAINTING_STRENGTH = 1.0


def default_strength(inpainting: bool) -> float:
    """The strength of an image call that gives none."""
    return INPAINTING_STRENGTH if inpainting else IMG2IMG_STRENGTH


def check_mask_not_empty(gray: np.ndarray, name: str = "mask") -> None:
    """An inpainting mask must mark something to repaint (a non-zero pixel): an empty one
    would give back the image unchanged. The same rule for every front end."""
    if not np.asarray(gray).any():
        raise ValueError(f"the {name} is empty: nothing to inpaint (white marks what to repaint)")


# Adapter dtypes: floating point tensors only (int8/bool LoRA or an int32 embedding would be
# merged as numbers that mean nothing).
ADAPTER_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_adapter_dtype(dtype: Any, what: str, source: str) -> None:
    """A LoRA's or embedding's tensor dtype: floating point, else a ValueError naming it."""
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name.lower().removeprefix("torch.") not in ADAPTER_DTYPES:
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise ValueError(f"{source}: {what} tensors are {name}; {article} {what} holds "
                         f"floating-point weights ({', '.join(ADAPTER_DTYPES)})")


def check_pixels(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise ValueError(f"{width}x{height} is {height * width} pixels, more than the limit of "
                         f"{max_pixels} (max_pixels)")


def check_output_folder(path: Path, name: str) -> None:
    """``path`` is, or can become, a writable folder; nothing is created to find out."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name} {path}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        raise ValueError(f"{name} {path} is not writable") from None


def check_prompts(value: Any, name: str = "prompt", *, allow_none: bool = False,
                  count: int | None = None) -> list[str] | None:
    """A string or a non-empty list of strings -> a list; ``count`` fixes its length."""
    if value is None and allow_none:
        return None
    what = "a string or a list of strings" + (" (or None)" if allow_none else "")
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, bytearray)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be {what}, got {_show(value)}")
    items = list(value)
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a string, got {_show(p)}")
    if not items:
        raise ValueError(f"{name} is an empty list; give at least one prompt")
    if count is not None and len(items) != count:
        raise ValueError(f"{len(items)} entries in {name} for {count} prompts")
    return items


# Prompt editing, alternation and composable AND (sdjax.prompt_editing): the most distinct
# prompts one prompt's schedule may hold (each is encoded and kept through the loop), and the
# most AND parts one prompt may have (each is one more UNet pass per step).
MAX_SCHEDULE_PROMPTS = 16
MAX_AND_PARTS = 8


def check_prompt_syntax(name: str, distinct: int, parts: int) -> None:
    """A prompt's distinct schedule prompts and AND parts within the stated limits."""
    if distinct > MAX_SCHEDULE_PROMPTS:
        raise ValueError(f"{name} makes {distinct} distinct prompts over its steps (prompt "
                         f"editing [a:b:n] / alternation [a|b]); the limit is "
                         f"{MAX_SCHEDULE_PROMPTS} (MAX_SCHEDULE_PROMPTS)")
    if parts > MAX_AND_PARTS:
        raise ValueError(f"{name} has {parts} AND parts; the limit is {MAX_AND_PARTS} "
                         "(MAX_AND_PARTS)")


def check_latents(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Initial noise: a float array of exactly ``shape`` (NHWC), every value finite."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"latents must be a float array of shape {shape}") from None
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise TypeError(f"latents must be a float array of shape {shape}, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"latents must have shape {shape} (NHWC), got {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError("latents contain NaN or infinite values")
    return arr


def check_guidance(value: Any, n: int) -> np.ndarray:
    """One finite, non-negative guidance scale for all ``n`` images, or one per image (how the
    server merges requests that differ only in their guidance into one call)."""
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
        items = list(value)
        if len(items) != n:
            raise ValueError(f"guidance_scale needs one value or one per image ({n}), got "
                             f"{len(items)}")
        return np.array([check_number(v, f"guidance_scale[{i}]", minimum=0)
                         for i, v in enumerate(items)], np.float32)
    return np.full((n,), check_number(value, "guidance_scale", minimum=0), np.float32)


def _per_image(value: Any, n: int, name: str) -> list:
    """``value`` for all ``n`` images, or a list of one per image."""
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
        items = list(value)
        if len(items) != n:
            raise ValueError(f"{name} needs one value or one per image ({n}), got {len(items)}")
        return items
    return [value] * n


def check_guidance_rescale(value: Any, n: int, name: str = "guidance_rescale") -> np.ndarray:
    """diffusers' CFG rescale factor in [0, 1], for all ``n`` images or one per image."""
    items = _per_image(value, n, name)
    out = np.array([check_number(v, name if len(items) == 1 else f"{name}[{i}]", minimum=0)
                    for i, v in enumerate(items)], np.float32)
    if (out > 1).any():
        raise ValueError(f"{name} must be in [0, 1], got {float(out.max()):g}")
    return out


def _interval(value: Any, name: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)) \
            or len(value) != 2:
        raise TypeError(f"{name} must be None or a pair (sigma_lo, sigma_hi), got "
                        f"{_show(value)}")
    lo, hi = value
    for bound in (lo, hi):
        if isinstance(bound, bool) or not isinstance(bound, (int, float, np.integer,
                                                              np.floating)):
            raise TypeError(f"{name} bounds must be numbers, got {_show(bound)}")
    lo, hi = float(lo), float(hi)  # hi may be inf: "up to the first step"
    if math.isnan(lo) or math.isnan(hi) or not 0 <= lo <= hi or math.isinf(lo):
        raise ValueError(f"{name} must be (sigma_lo, sigma_hi) with 0 <= sigma_lo <= "
                         f"sigma_hi, got ({lo:g}, {hi:g})")
    return lo, hi


def check_guidance_interval(value: Any, n: int, name: str = "guidance_interval"
                            ) -> np.ndarray | None:
    """None (guidance at every step), a pair (sigma_lo, sigma_hi) for all ``n`` images, or a
    list of one pair (or None) per image -> (n, 2) float32 bounds, None for no interval."""
    if value is None:
        return None
    # A pair of numbers is one interval for every image; anything else is one entry per image.
    single = (isinstance(value, (Sequence, np.ndarray)) and len(value) == 2
              and all(isinstance(v, (int, float, np.integer, np.floating))
                      and not isinstance(v, bool) for v in value))
    items = [value] * n if single else _per_image(value, n, name)
    bounds = [(0.0, math.inf) if v is None else _interval(v, f"{name}[{i}]" if not single
                                                          else name)
              for i, v in enumerate(items)]
    return np.array(bounds, np.float32)


def check_choice(value: Any, name: str, choices: Sequence[str], *,
                 allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_schedule_type(value: Any, name: str, choices: Sequence[str]) -> str | None:
    """A WebUI schedule type (``choices``: its labels) in any of the WebUI's spellings
    ("Karras", "karras", "sgm_uniform", "SGMUniform"), as its label; None stays None."""
    if value is None:
        return None
    key = value.strip().lower().replace("_", " ") if isinstance(value, str) else None
    for label in choices:
        if key in (label.lower(), label.lower().replace(" ", "")):
            return label
    raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def check_call(*, prompt: Any, negative_prompt: Any, num_inference_steps: Any,
               guidance_scale: Any, height: Any, width: Any, num_images_per_prompt: Any,
               seed: Any, seeds: Any, image_indices: Any, scheduler: Any,
               scheduler_names: Sequence[str], factor: int
               ) -> tuple[list[str], list[str], list[int] | None, np.ndarray]:
    """The checks of one pipeline call, in argument order. Returns (prompts, negative prompts,
    explicit per-image seeds or None, the guidance scale of each image); raises
    TypeError/ValueError naming the argument."""
    prompts = check_prompts(prompt)
    negatives = check_prompts(negative_prompt, "negative_prompt", allow_none=True,
                              count=None if isinstance(negative_prompt, str) else len(prompts))
    if negatives is None:
        negatives = [""] * len(prompts)
    elif len(negatives) == 1 and isinstance(negative_prompt, str):
        negatives = negatives * len(prompts)
    check_int(num_inference_steps, "num_inference_steps", minimum=1)
    for name, v in (("height", height), ("width", width)):
        if v is not None:
            check_size(v, name, factor)
    n = len(prompts) * check_int(num_images_per_prompt, "num_images_per_prompt", minimum=1)
    guidance = check_guidance(guidance_scale, n)
    check_seed(seed)
    per_image = None
    if seeds is not None:
        per_image = [check_seed(s, f"seeds[{i}]", allow_random=False)
                     for i, s in enumerate(_sequence(seeds, "seeds", n))]
    if image_indices is not None:
        for i, k in enumerate(_sequence(image_indices, "image_indices", n)):
            check_int(k, f"image_indices[{i}]", minimum=0, maximum=MAX_SEED - 1)
    check_choice(scheduler, "scheduler", scheduler_names, allow_none=True)
    return prompts, negatives, per_image, guidance


def _sequence(value: Any, name: str, n: int) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, range, np.ndarray)):
        raise TypeError(f"{name} must be a list with one entry per image, got {_show(value)}")
    items = list(value)
    if len(items) != n:
        raise ValueError(f"{name} needs one entry per image ({n}), got {len(items)}")
    return items


def check_subseed_strength(value: Any, n: int, name: str = "subseed_strength") -> np.ndarray:
    """The WebUI's variation strength in [0, 1], for all ``n`` images or one per image."""
    items = _per_image(value, n, name)
    out = np.array([check_number(v, name if len(items) == 1 or not isinstance(
        value, (Sequence, np.ndarray)) else f"{name}[{i}]", minimum=0)
        for i, v in enumerate(items)], np.float32)
    if (out > 1).any():
        raise ValueError(f"{name} must be in [0, 1], got {float(out.max()):g}")
    return out


def check_variation(subseed: Any, strength: Any, subseeds: Any, n: int
                    ) -> tuple[list[int] | None, np.ndarray | None]:
    """(one subseed per image (-1 still to resolve) or None, one strength per image or None):
    None for a call without variation seeds (no subseed and strength 0)."""
    strengths = check_subseed_strength(strength, n)
    if subseeds is not None:
        if subseed is not None:
            raise ValueError("give subseed or subseeds (one per image), not both")
        return ([check_seed(s, f"subseeds[{i}]", allow_random=False)
                 for i, s in enumerate(_sequence(subseeds, "subseeds", n))], strengths)
    if subseed is None:
        if strengths.any():
            raise ValueError("subseed_strength needs a subseed (the variation seed)")
        return None, None
    return [check_seed(subseed, "subseed")] * n, strengths


def check_seed_resize_from(value: Any, factor: int) -> tuple[int, int] | None:
    """None, or (height, width) in pixels: the size the seed's noise is drawn at (the
    WebUI's "resize seed from"), at least one latent cell each way."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)) \
            or len(value) != 2:
        raise TypeError(f"seed_resize_from must be None or (height, width), got "
                        f"{_show(value)}")
    h, w = (check_int(v, f"seed_resize_from {k}", minimum=factor, maximum=2**16)
            for k, v in zip(("height", "width"), value, strict=True))
    return h, w


def check_eta_noise_seed_delta(value: Any) -> int:
    return check_int(value, "eta_noise_seed_delta", minimum=0, maximum=MAX_SEED - 1)
