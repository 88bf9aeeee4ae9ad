"""The arguments of one pipeline call, as one frozen value: its fields are the signature of
``pipe(...)``, ``pipe.submit``, ``pipe.compile`` and ``pipe.lower`` (written once, here) and
their documentation. docs/python-api.md says what each means.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sdjax.task_inputs import TaskInputs, TaskOptions


@dataclasses.dataclass(frozen=True, eq=False)
class Call(TaskOptions):
    """One call: prompts and sampling, then (keyword-only) the task (TaskOptions' fields, or
    a prepared ``task_inputs``), the batch, guidance options and SDXL's conditioning. None =
    not given: the model's sdjax.json, the class's or the library's default
    (``pipe.sampling_settings``)."""

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | Sequence[float] | None = None  # one, or one per image
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int = 1
    seed: int = 0  # image i's noise comes from (seed, i); -1 picks a random seed
    latents: Any = None  # the start noise, NHWC (N, h, w, C), unscaled N(0, 1)
    scheduler: str | None = None
    _: dataclasses.KW_ONLY
    # The task's own arguments are TaskOptions' fields (img2img with image=, inpainting with
    # mask_image=, the upscaler's noise_level=, ...); or task_inputs=, a value pipe.prepare
    # made, which holds them.
    task_inputs: TaskInputs | None = None
    # The batch: per-image seeds and indices (override (seed, i)), the compiled batch shape,
    # the decode's chunk, what comes back, the NaN check.
    seeds: Sequence[int] | None = None
    image_indices: Sequence[int] | None = None
    batch_size_per_device: int | None = None
    decode_chunk: int | None = None
    output_type: str = "uint8"  # "uint8" | "float" | "latent"
    nan_check: bool = True
    # Live previews (sdjax.previews): on_step(step, total, images) on the host after each
    # evaluation, images the WebUI's "Approx cheap" of each image's denoised estimate
    # (uint8, the latents' size). None: no callback in the compiled call.
    on_step: Any = None
    # The WebUI's noise (sdjax.noise): the source ("jax" | "nv" | "cpu"), variation seeds
    # (image i's subseed is subseed + i; strength one or one per image), the size in pixels
    # (height, width) the seed's noise is drawn at, and ENSD (the seed offset of the WebUI
    # samplers' per-step noise). ``subseeds``: one per image, as ``seeds`` (with the image's
    # index: (subseed, i)).
    rng: str = "jax"
    subseed: int | None = None
    subseed_strength: float | Sequence[float] = 0.0
    seed_resize_from: Sequence[int] | None = None
    eta_noise_seed_delta: int = 0
    subseeds: Sequence[int] | None = None
    # Guidance options and the text encoder's layer (each one value or one per image).
    guidance_rescale: float | Sequence[float] | None = None
    guidance_interval: Any = None  # (sigma_lo, sigma_hi)
    clip_skip: int | None = None
    # The WebUI's schedule type for a WebUI sampler name in scheduler= ("Karras", ...;
    # None: "Automatic", the sampler's own default).
    schedule_type: str | None = None
    # The WebUI's sampler parameters by its option names (sdjax.schedulers.SAMPLER_OPTIONS:
    # eta_ddim, uni_pc_variant, uni_pc_skip_type, uni_pc_order, uni_pc_lower_order_final);
    # each WebUI sampler reads those it uses (compiled in), the others are checked only.
    sampler_options: Mapping[str, Any] | None = None
    # SDXL's conditioning (StableDiffusionXLPipeline; refused by the others).
    prompt_2: str | Sequence[str] | None = None
    negative_prompt_2: str | Sequence[str] | None = None
    original_size: Sequence[int] | None = None
    crops_coords_top_left: Sequence[int] | None = None
    target_size: Sequence[int] | None = None
    negative_original_size: Sequence[int] | None = None
    negative_crops_coords_top_left: Sequence[int] | None = None
    negative_target_size: Sequence[int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    # ControlNet (pipe.load_controlnet): the control image(s), one entry per ControlNet
    # (each one image, one per prompt or one per image); scale, window and control mode one
    # value or one per ControlNet. sdjax.controlnet.inputs reads them.
    control_image: Any = None
    controlnet_conditioning_scale: float | Sequence[float] = 1.0
    control_guidance_start: float | Sequence[float] = 0.0
    control_guidance_end: float | Sequence[float] = 1.0
    guess_mode: bool = False
    control_mode: str | Sequence[str] = "balanced"  # "balanced" | "prompt" | "controlnet"
    # The WebUI's seamless tiling (compiled in) and hires fix: a second, img2img pass at
    # hires_scale x the size (or at hires_size = (height, width)) on the upscaled first pass
    # (sdjax.hires; hires_steps None/0: the first pass's, hires_* None: the first pass's).
    tiling: bool = False
    hires_scale: float | None = None
    hires_size: Sequence[int] | None = None
    hires_upscaler: str = "latent"
    hires_steps: int | None = None
    hires_denoising_strength: float = 0.7
    hires_prompt: str | Sequence[str] | None = None
    hires_negative_prompt: str | Sequence[str] | None = None
    hires_scheduler: str | None = None
    # This call is a hires fix's second pass after a first pass of that many schedule steps
    # (the WebUI's firstpass_steps: steps, doubled for samplers with two evaluations per
    # step): prompt editing's `when` counts on from there (sdjax.prompts.prompt_schedules'
    # hires_steps). sdjax.hires sets it; None: a call of its own.
    first_pass_steps: int | None = None

    def sdxl_arguments(self) -> dict[str, Any]:
        """The SDXL conditioning arguments given (not None)."""
        return {k: getattr(self, k) for k in SDXL_FIELDS if getattr(self, k) is not None}


    def given_task_inputs(self, n: int) -> TaskInputs:
        """``task_inputs`` for ``n`` images, checked against the rest of the call: the task's
        own arguments are in it (a height or width given too must agree)."""
        prepared = self.task_inputs
        if not isinstance(prepared, TaskInputs):
            raise TypeError(f"task_inputs must be what pipe.prepare returns, got "
                            f"{type(prepared).__name__}")
        defaults = {f.name: f.default for f in dataclasses.fields(Call)}
        for k in TASK_FIELDS:
            value = getattr(self, k)
            if k in ("height", "width") and value in (None, getattr(prepared, k)):
                continue
            if value is not defaults[k] and not (isinstance(value, (str, int, float))
                                                 and value == defaults[k]):
                raise ValueError(f"task_inputs= is the prepared task: {k}={value!r} does not go "
                                 "with it")
        if prepared.num_images not in (None, n):
            raise ValueError(f"task_inputs holds {prepared.num_images} images for {n}")
        return prepared

HIRES_FIELDS = ("hires_scale", "hires_size", "hires_upscaler", "hires_steps",
                "hires_denoising_strength", "hires_prompt", "hires_negative_prompt",
                "hires_scheduler")
SDXL_FIELDS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left",
               "target_size", "negative_original_size", "negative_crops_coords_top_left",
               "negative_target_size", "aesthetic_score", "negative_aesthetic_score")
# What pipe.prepare takes of a call (besides the prompt count and the sampling settings).
TASK_FIELDS = ("height", "width", *(f.name for f in dataclasses.fields(TaskOptions)))


def build(cls: type, name: str, *args, **kwargs):
    """``cls(*args, **kwargs)``, a wrong argument named as the caller's (``submit() got an
    unexpected keyword argument 'x'``), not as the dataclass's ``__init__``."""
    try:
        return cls(*args, **kwargs)
    except TypeError as e:
        raise TypeError(str(e).replace(f"{cls.__name__}.__init__()", f"{name}()")) from None


def takes_call(method: Callable) -> Callable:
    """``method(self, call: Call)`` offered as ``method(self, prompt, ...)`` with Call's
    fields as its signature (``help()``, ``inspect.signature`` and notebooks show them);
    a wrong keyword is a ``TypeError`` naming it, as with any Python function. A ``Call``
    value passed alone is taken as it is."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], Call):
            return method(self, args[0])  # a Call value as it is
        return method(self, build(Call, method.__name__, *args, **kwargs))

    params = list(inspect.signature(Call).parameters.values())
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    wrapper.__signature__ = inspect.Signature(
        [self_param, *params], return_annotation=inspect.signature(method).return_annotation)
    return wrapper
