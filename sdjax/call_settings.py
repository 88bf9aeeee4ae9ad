"""One generation call's settings, as one frozen value that ``sdjax.sample``, ``sdjax.generate``
and ``sdjax.serve`` each build once, and from which both the pipeline's keyword arguments and
the images' WebUI ``parameters`` text come, so the two cannot drift apart.

Grouped by part: sampling, size, the image task (img2img, inpainting, x4 upscaling) and SDXL.
What changes per image (prompt, negative prompt, seed, its index, and in the server the
guidance scale, since it merges requests with different ones) is passed per image. LoRAs are
not here: they are merged into the pipeline's weights (``lora_tags.TagLoras``), not passed to
a call; the images' prompts keep their ``<lora:…>`` tags as the WebUI does, and
:meth:`CallSettings.parameters` takes the pipeline's adapters (``adapter_text.Adapters``) to
name them all as the WebUI does.

No JAX at import time: the CLIs' --help and argument checks import this.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from sdjax import handoff, hires_settings
from sdjax.adapter_text import Adapters
from sdjax.controlnet.settings import ControlNets
from sdjax.hires_settings import Hires
from sdjax.images import format_parameters, guidance_parameters


def _number(value: float | int) -> str:
    # The WebUI writes integers as given and floats shortest; the CLI's float flags and the
    # server's integer fields both keep the text they always had.
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The schedule and the guidance; ``guidance_scale`` None: one per image (the server)."""
    steps: int
    scheduler: str
    guidance_scale: float | None
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] | None = None
    clip_skip: int | None = None
    schedule_type: str | None = None  # a WebUI sampler's schedule type (None: Automatic)
    # The WebUI's sampler options that differ from its defaults, as (name, value) pairs
    # (sdjax.schedulers.SAMPLER_OPTIONS; the server's /sdapi/v1/options and override_settings).
    options: tuple[tuple[str, Any], ...] = ()

    def pipeline_kwargs(self) -> dict[str, Any]:
        out = {"num_inference_steps": self.steps, "guidance_scale": self.guidance_scale,
               "scheduler": self.scheduler, "guidance_rescale": self.guidance_rescale,
               "guidance_interval": self.guidance_interval, "clip_skip": self.clip_skip}
        if self.schedule_type is not None:
            out["schedule_type"] = self.schedule_type
        if self.options:
            out["sampler_options"] = dict(self.options)
        return out

    def schedule_label(self) -> str | None:
        """The ``Schedule type`` the WebUI writes for this sampler (None: not a WebUI one)."""
        from sdjax.schedulers import WEBUI_SAMPLER_NAMES, schedule_type_label
        from sdjax.schedulers.webui import SAMPLERS, infotext_schedule
        if self.scheduler in WEBUI_SAMPLER_NAMES and self.scheduler not in SAMPLERS:
            # DDIM, PLMS, LCM: no schedule of their own; the WebUI writes what was chosen
            return schedule_type_label(self.schedule_type)
        return infotext_schedule(self.scheduler, self.schedule_type)

    def parameters(self) -> dict[str, str]:
        fields = guidance_parameters(self.guidance_rescale, self.guidance_interval,
                                     self.clip_skip)
        eta = dict(self.options).get("eta_ddim", 0)
        if eta and self.scheduler in ("DDIM", "DDIM CFG++"):
            fields["Eta DDIM"] = f"{eta:g}"  # the WebUI's: where its DDIM runs with one
        return fields


@dataclasses.dataclass(frozen=True)
class Size:
    """The output's size in pixels."""
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class Img2Img:
    strength: float

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"strength": self.strength}

    def parameters(self) -> dict[str, str]:
        return {"Denoising strength": f"{self.strength:g}"}


@dataclasses.dataclass(frozen=True)
class Inpainting:
    """img2img with a mask; ``padding`` not None is the WebUI's "only masked" mode with that
    many pixels around the mask. ``invert_mask`` is recorded only: the front end has already
    inverted the mask it passes, so it does not keep the server from merging two calls."""
    strength: float
    mask_blur: float = 0
    padding: int | None = None
    masked_content: str = "original"  # sdjax.tasks.MASKED_CONTENT
    invert_mask: bool = dataclasses.field(default=False, compare=False)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"strength": self.strength, "mask_blur": self.mask_blur,
                "padding_mask_crop": self.padding, "masked_content": self.masked_content}

    def parameters(self) -> dict[str, str]:
        fields = {"Denoising strength": f"{self.strength:g}",
                  "Mask blur": _number(self.mask_blur)}
        if self.invert_mask:
            fields["Mask mode"] = "Inpaint not masked"
        fields["Masked content"] = self.masked_content
        if self.padding is not None:
            fields.update({"Inpaint area": "Only masked",
                           "Masked area padding": str(self.padding)})
        return fields


@dataclasses.dataclass(frozen=True)
class Upscaling:
    """The x4 upscaler: its output size follows from the low-resolution image."""
    noise_level: int

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"noise_level": self.noise_level}

    def parameters(self) -> dict[str, str]:
        return {"Noise level": str(self.noise_level)}


ImageTask = Img2Img | Inpainting | Upscaling

# The WebUI's names of its noise sources (its randn_source option) -> sdjax's rng.
RANDN_SOURCES = {"GPU": "nv", "NV": "nv", "CPU": "cpu"}


@dataclasses.dataclass(frozen=True)
class Noise:
    """The start noise's settings (sdjax.noise). ``rng_given``: written as the WebUI's ``RNG:``
    (the WebUI writes none for its default GPU source, nor do we for a default). ``subseed``
    None: one per image (the server's merged calls pass them)."""
    rng: str = "jax"
    rng_given: bool = False
    subseed: int | None = None
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None  # (height, width) in pixels
    eta_noise_seed_delta: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Noise:
        """The CLIs' noise flags (a command without them gives the defaults)."""
        rng = getattr(args, "rng", None)
        strength = getattr(args, "subseed_strength", None) or 0.0
        return cls(rng or "jax", rng is not None,
                   getattr(args, "subseed", None) if strength else None, strength,
                   getattr(args, "seed_resize_from", None),
                   getattr(args, "eta_noise_seed_delta", None) or 0)

    def pipeline_kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.rng == "jax" else {"rng": self.rng}
        if self.subseed_strength:
            out.update(subseed_strength=self.subseed_strength)
            if self.subseed is not None:
                out["subseed"] = self.subseed
        if self.seed_resize_from is not None:
            out["seed_resize_from"] = self.seed_resize_from
        if self.eta_noise_seed_delta:
            out["eta_noise_seed_delta"] = self.eta_noise_seed_delta
        return out

    def parameters(self, subseed: int | None = None) -> dict[str, str]:
        """The WebUI's fields (``subseed``: the image's own variation seed)."""
        fields = {}
        subseed = self.subseed if subseed is None else subseed
        if self.subseed_strength and subseed is not None:
            fields.update({"Variation seed": str(subseed),
                           "Variation seed strength": f"{self.subseed_strength:g}"})
        if self.seed_resize_from is not None:
            h, w = self.seed_resize_from
            fields["Seed resize from"] = f"{w}x{h}"
        if self.eta_noise_seed_delta:
            fields["ENSD"] = str(self.eta_noise_seed_delta)
        if self.rng_given and self.rng != "jax":
            fields["RNG"] = self.rng.upper()
        return fields

# SDXL's size conditioning: setting -> its metadata field (space-separated: the parameters
# line separates its fields with commas).
SIZE_FIELDS = {"original_size": "Original size", "crops_coords_top_left": "Crop top left",
               "target_size": "Target size"}


@dataclasses.dataclass(frozen=True)
class SDXL:
    """SDXL's settings, None where not given (the pipeline's defaults apply). ``refiner``: the
    model that finishes each image from ``refiner_switch_at`` of the schedule (the call is
    then ``sdjax.handoff.refine``)."""
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    aesthetic_score: float | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    refiner: str | None = None
    refiner_switch_at: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SDXL:
        """The CLIs' SDXL flags (``sdxl_cli``); a command without them gives none."""
        return cls(**{f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)})

    def flags(self) -> dict[str, Any]:
        """The settings given, by their flag names (the refiner itself aside)."""
        out = {k: getattr(self, k) for k in ("prompt_2", "negative_prompt_2",
                                             "aesthetic_score", *SIZE_FIELDS)
               if getattr(self, k) is not None}
        if self.refiner is not None:
            out["refiner_switch_at"] = self.refiner_switch_at
        return out

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What the base's call (or, with a refiner, the hand-off) adds."""
        return {"switch_at" if k == "refiner_switch_at" else k: v
                for k, v in self.flags().items()}

    def parameters(self) -> dict[str, str]:
        """The WebUI's names where it has them."""
        fields = {}
        if self.refiner is not None:
            fields.update(handoff.parameters(self.refiner, self.refiner_switch_at))
        if self.aesthetic_score is not None:
            fields["Aesthetic score"] = f"{self.aesthetic_score:g}"
        for name, field in SIZE_FIELDS.items():
            if getattr(self, name) is not None:
                fields[field] = " ".join(map(str, getattr(self, name)))
        return fields


def _sampler_options(args: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    """``--sampler_option`` pairs as ``Sampling.options`` holds them (the last of a name
    wins), checked."""
    from sdjax.schedulers import SAMPLER_OPTIONS, check_sampler_options
    checked = check_sampler_options(dict(getattr(args, "sampler_option", None) or ()))
    return tuple((k, checked[k]) for k in SAMPLER_OPTIONS if k in checked)


@dataclasses.dataclass(frozen=True)
class CallSettings:
    """What one call of a front end makes, apart from the per-image values. Hashable: the
    server merges requests whose settings are equal."""
    model: str  # as the metadata names it
    sampling: Sampling
    size: Size
    task: ImageTask | None = None  # None: text to image
    sdxl: SDXL = SDXL()
    tiling: bool = False  # the WebUI's seamless tiling
    hires: Hires | None = None  # the WebUI's hires fix (the size above is the first pass's)
    noise: Noise = Noise()
    controlnet: ControlNets | None = None  # the call's ControlNet units (the images per image)

    @classmethod
    def from_args(cls, args: argparse.Namespace, size: Size,
                  task: ImageTask | None = None) -> CallSettings:
        """A CLI run's settings, from its flags once ``cli_args.apply_sampling_defaults`` has
        filled the sampling ones in, and the size (and task) it worked out."""
        return cls(args.model, Sampling(args.steps, args.scheduler, args.guidance_scale,
                                        args.guidance_rescale, args.guidance_interval,
                                        args.clip_skip, getattr(args, "schedule_type", None),
                                        _sampler_options(args)),
                   size, task, SDXL.from_args(args), bool(getattr(args, "tiling", False)),
                   hires_settings.from_args(args), Noise.from_args(args),
                   ControlNets.from_args(args))

    def pipeline_kwargs(self, *, task: bool = True) -> dict[str, Any]:
        """The keyword arguments of ``pipe(...)`` / ``pipe.submit(...)``, or of
        ``sdjax.handoff.refine(...)`` when ``sdxl.refiner`` is set, without the per-image
        ones (prompts, negative prompts, seeds, images, masks). ``task=False`` leaves out the
        task's settings, for a caller that passes them with its images."""
        out = self.sampling.pipeline_kwargs()
        if not isinstance(self.task, Upscaling):  # the upscaler's size is the image's x4
            out.update(height=self.size.height, width=self.size.width)
        if task and self.task is not None:
            out.update(self.task.pipeline_kwargs())
        out.update(self.sdxl.pipeline_kwargs())
        if self.tiling:
            out["tiling"] = True
        if self.hires is not None:
            out.update(self.hires.pipeline_kwargs())
        out.update(self.noise.pipeline_kwargs())
        if self.controlnet is not None:
            out.update(self.controlnet.pipeline_kwargs())
        return out

    def extra_parameters(self, subseed: int | None = None, prompt: str | None = None,
                         negative_prompt: str | None = None) -> dict[str, str]:
        """The metadata fields after ``Model``: the noise's, guidance options, the task's,
        SDXL's, tiling's, the hires fix's (``prompt``, ``negative_prompt``: the image's, which
        its ``Hires prompt`` is written where it differs from)."""
        return {**self.noise.parameters(subseed), **self.sampling.parameters(),
                **(self.task.parameters() if self.task is not None else {}),
                **self.sdxl.parameters(),
                **({"Tiling": "True"} if self.tiling else {}),
                **({} if self.hires is None else self.hires.parameters(
                    self.sampling, prompt, negative_prompt)),
                **({} if self.controlnet is None else self.controlnet.parameters())}

    def parameters(self, prompt: str, negative_prompt: str, seed: int, *,
                   index: int | None = None, guidance_scale: float | None = None,
                   subseed: int | None = None, adapters: Adapters | None = None) -> str:
        """The WebUI's ``parameters`` text of one image. ``guidance_scale`` and ``subseed``:
        the image's own, where the settings have none (the server's merged calls).
        ``adapters``: the pipeline's LoRAs and embeddings, written as the WebUI writes them
        (tags in the prompt, ``Lora hashes``, ``TI hashes``: :mod:`sdjax.adapter_text`)."""
        scale = self.sampling.guidance_scale if guidance_scale is None else guidance_scale
        extra = self.extra_parameters(subseed, prompt, negative_prompt)
        if adapters is not None:
            extra.update(adapters.parameters(prompt, negative_prompt))
            prompt = adapters.prompt(prompt)
        return format_parameters(
            prompt=prompt, negative_prompt=negative_prompt, steps=self.sampling.steps,
            sampler=self.sampling.scheduler, guidance_scale=scale, seed=seed, index=index,
            schedule_type=self.sampling.schedule_label(),
            width=self.size.width, height=self.size.height, model=self.model, extra=extra)
