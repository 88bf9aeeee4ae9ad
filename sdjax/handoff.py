"""The SDXL base→refiner hand-off as one generation step, for the CLI and the server.

The base runs the first ``switch_at`` of the schedule and returns its latents; the refiner
takes them as ``image=`` and finishes the schedule (diffusers' ``denoising_end`` /
``denoising_start``, see docs/python-api.md). The WebUI calls the fraction "Refiner switch
at" (it counts steps where diffusers counts training timesteps: the same cut for most
schedules, see docs/cli.md). Both calls share the scheduler, the steps, the guidance and the
seed stream, so image i keeps the noise of (seed, i) whatever the batch or device count.

No JAX at import time: the CLI's --help and argument checks import this.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_SWITCH_AT = 0.8  # diffusers' example and the WebUI's default "Refiner switch at"


def check_switch_at(value, name: str) -> float:
    """A fraction strictly between 0 and 1 (at 0 or 1 one of the two models runs nothing)."""
    from sdjax.schedulers.cut import check_fraction
    return check_fraction(value, name)


def is_sdxl(model: str) -> bool:
    """Whether ``model`` (any form from_pretrained takes) loads as an SDXL pipeline; reads
    its model_index.json only (a hub id is fetched, as loading it would)."""
    from sdjax.dispatch import pipeline_class
    return getattr(pipeline_class(model), "SDXL", False)


def check_refiner(refiner: str, flag: str = "--refiner") -> None:
    """Refuse, before it loads, a refiner that is not an SDXL model (or not there), naming
    the flag: it finishes SDXL latents (SDXL's VAE scaling, 4 channels). Any SDXL model may
    finish (as the WebUI lets any checkpoint refine); refiner folders are made for it."""
    from sdjax.weights.errors import WeightsError
    try:
        refiner_is_sdxl = is_sdxl(refiner)
    except WeightsError as e:  # not found, offline, ...: say which model it was
        raise ValueError(f"{flag}: {e}") from None
    if not refiner_is_sdxl:
        raise ValueError(f"{flag} {refiner} is not an SDXL model (a refiner folder has "
                         "text_encoder_2/ and requires_aesthetics_score in model_index.json)")


def check_loaded_pair(base, refiner, flag: str = "--refiner") -> None:
    """The same rule on loaded pipelines (their loaders may accept more than folders)."""
    if not getattr(base, "SDXL", False):
        raise ValueError(f"{flag} needs an SDXL base model")
    if not getattr(refiner, "SDXL", False):
        raise ValueError(f"{flag}: not an SDXL model, so it cannot finish SDXL latents")
    if refiner.num_devices != base.num_devices:
        raise ValueError(f"{flag}: the refiner runs on {refiner.num_devices} device(s), the "
                         f"base on {base.num_devices}; load both with the same num_devices")


def check_schedule(base, refiner, scheduler: str, steps: int, switch_at: float,
                   flag: str = "--refiner_switch_at") -> None:
    """Refuse, before any call, a switch point that leaves one of the two models no step
    of this schedule (what the calls would refuse; the server must not fail a merged call)."""
    from sdjax.schedulers import cut, get_scheduler
    try:
        cut.denoising_end_stop(get_scheduler(scheduler, base.scheduler_config), steps, 0,
                               switch_at)
        cut.denoising_start_step(get_scheduler(scheduler, refiner.scheduler_config), steps,
                                 switch_at)
    except ValueError as e:
        raise ValueError(f"{flag} {switch_at:g} with {steps} {scheduler} steps: {e}") from None


def parameters(name: str, switch_at: float) -> dict[str, str]:
    """The WebUI's infotext fields for a refined image."""
    return {"Refiner": name, "Refiner switch at": f"{switch_at:g}"}


def refine(base, refiner, prompt: str | Sequence[str], *, switch_at: float,
           negative_prompt=None, prompt_2=None, negative_prompt_2=None,
           aesthetic_score: float | None = None, height: int | None = None,
           width: int | None = None, original_size=None, crops_coords_top_left=None,
           target_size=None, output_type: str = "uint8", **shared):
    """``base`` up to ``switch_at``, then ``refiner`` from there; returns the refiner's
    PipelineOutput. ``shared`` goes to both calls (num_inference_steps, guidance_scale,
    scheduler, seed / seeds, image_indices, batch_size_per_device, nan_check, guidance
    options): the refiner must continue the base's schedule with the same noise stream. The
    second prompts, the output size and SDXL's size time ids go to the base (the refiner's
    time ids default to the image's size, as diffusers' do), the aesthetic score to the
    refiner, whose one encoder reads ``prompt`` (as diffusers pairs them)."""
    latents = base(prompt, negative_prompt=negative_prompt, prompt_2=prompt_2,
                   negative_prompt_2=negative_prompt_2, height=height, width=width,
                   original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                   target_size=target_size, denoising_end=switch_at, output_type="latent",
                   **shared).images
    score = {} if aesthetic_score is None else {"aesthetic_score": aesthetic_score}
    return refiner(prompt, negative_prompt=negative_prompt, image=latents,
                   denoising_start=switch_at, output_type=output_type, **score, **shared)
