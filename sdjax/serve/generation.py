"""From a WebUI txt2img or img2img request to batcher work, and from its images back to the WebUI's
response: base64 PNGs with their ``parameters`` chunk, the request echoed, and ``info``.

A WebUI batch's image k has seed ``seed + k`` and is made exactly as ``sdjax.sample --seed
seed+k`` makes its first image: key (seed + k, index 0).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sdjax import __version__, handoff, validation
from sdjax import prompts as prompt_syntax
from sdjax.adapter_text import Adapters
from sdjax.call_settings import (
    SDXL,
    CallSettings,
    Img2Img,
    Inpainting,
    Sampling,
    Size,
    Upscaling,
)
from sdjax.images import SAMPLER_LABELS, png_base64
from sdjax.lora_tags import find_lora, split_tags, tag_key
from sdjax.schedulers.webui_sigmas import schedule_type_label
from sdjax.serve import controlnet_api, hires_fields, uploads
from sdjax.serve.batcher import ImageSpec, JobResult, Shape
from sdjax.serve.checkpoints import ModelRegistry
from sdjax.serve.limits import BadRequest, Limits, check_generation
from sdjax.serve.noise_fields import request_noise
from sdjax.serve.samplers import request_options, sampler_settings, scheduler_for
from sdjax.serve.schemas import Img2ImgRequest, Txt2ImgRequest, unsupported
from sdjax.task_inputs import TaskInputs
from sdjax.tasks import MASKED_CONTENT
from sdjax.upscale import DEFAULT_NOISE_LEVEL


@dataclasses.dataclass(frozen=True)
class Plan:
    shape: Shape
    specs: list[ImageSpec]
    seed: int               # the batch's first seed (-1 already replaced)
    request: Txt2ImgRequest | Img2ImgRequest | None = None  # with the model's defaults filled


def plan_txt2img(req: Txt2ImgRequest | Img2ImgRequest, registry: ModelRegistry,
                 limits: Limits, options: Mapping[str, Any] | None = None) -> Plan:
    """Validate ``req`` and say what to generate; raises BadRequest. May load a model.
    ``options``: the server's WebUI options (its noise source and ENSD)."""
    reason = unsupported(req)
    if reason:
        raise BadRequest(reason)
    wanted = (req.override_settings or {}).get("sd_model_checkpoint")
    title = registry.find(wanted)
    if title is None:
        raise BadRequest(f"model {wanted!r} not found; GET /sdapi/v1/sd-models lists them", 404)
    asked = req.sampler_name or req.sampler_index
    pipe = registry.get(title)
    req = with_model_defaults(req, pipe)
    try:
        # no sampler asked: the model's own scheduler (sdjax.json), as the CLIs run it; a
        # schedule type given with it is still one the WebUI knows
        if not asked and req.scheduler:
            schedule_type_label(req.scheduler)
        scheduler, schedule_type = (
            sampler_settings(asked, req.scheduler) if asked
            else (pipe.default_scheduler, None))
    except ValueError as e:
        raise BadRequest(str(e)) from None
    check_generation(width=req.width, height=req.height, steps=req.steps,
                     batch_size=req.batch_size, n_iter=req.n_iter, cfg_scale=req.cfg_scale,
                     seed=req.seed, limits=limits)
    if pipe.UPSCALER and not isinstance(req, Img2ImgRequest):
        raise BadRequest(f"{title} is an x4 upscaler: send the low-resolution image to "
                         "/sdapi/v1/img2img (the output is 4x its size)")
    if not pipe.UPSCALER:  # the upscaler's size is its image's (plan_img2img)
        try:
            pipe.check_size(req.height, req.width)
        except ValueError as e:
            raise BadRequest(str(e)) from None
    names_refiner = (req.refiner_checkpoint or "").strip() not in ("", "None", "none")
    if pipe.UPSCALER or names_refiner:
        # diffusers' own pipelines (the x4 upscaler, the base-to-refiner hand-off) keep the
        # diffusers-equivalent schedulers of the WebUI's names
        try:
            scheduler, schedule_type = scheduler_for(req.sampler_name or req.sampler_index,
                                                     req.scheduler), None
        except ValueError as e:
            raise BadRequest(str(e)) from None
    loras, clip_skip = _prompt_settings(req, registry, title)
    _check_prompt_lengths(req, pipe)
    try:  # prompt editing and AND's limits; the call's text layout, which requests share
        layout = pipe.prompt_layout([split_tags(req.prompt)[0]], [req.negative_prompt],
                                    req.steps, scheduler)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    refiner, switch_at = _refiner_settings(req, registry, title, scheduler)
    seed = validation.resolve_seed(req.seed)
    noise, subseed = request_noise(req, options, limits.max_pixels)
    n = req.batch_size * req.n_iter
    # Seeds past 2**32 - 1 wrap, as the uint32 the sampler takes would. With variation seeds
    # the WebUI gives every image the seed and image k the subseed + k.
    m = validation.MAX_SEED
    specs = [ImageSpec(req.prompt, req.negative_prompt, seed if subseed is not None
                       else (seed + k) % m, float(req.cfg_scale),
                       subseed=None if subseed is None else (subseed + k) % m)
             for k in range(n)]
    hires = hires_fields.hires(req, pipe, limits, refiner)
    if hires is not None and (hires.prompt or hires.negative_prompt):
        try:  # the hires pass's own prompts meet the same limits, before any work
            pipe.prompt_layout([split_tags(hires.prompt or req.prompt)[0]],
                               [hires.negative_prompt or req.negative_prompt],
                               hires.steps or req.steps, hires.scheduler or scheduler)
        except ValueError as e:
            raise BadRequest(f"hr_prompt: {e}") from None
    settings = CallSettings(
        title, request_sampling(pipe, req.steps, scheduler, clip_skip, schedule_type,
                                request_options(req, options)),
        Size(req.height, req.width),
        sdxl=SDXL() if refiner is None else SDXL(refiner=refiner, refiner_switch_at=switch_at),
        tiling=hires_fields.tiling(req, pipe), hires=hires, noise=noise)
    if not isinstance(req, Img2ImgRequest):  # img2img's units take its images (plan_img2img)
        settings, specs = _with_units(req, registry, pipe, settings, specs, limits)
    return Plan(Shape(settings, loras=loras, prompt_layout=layout,
                      guided=float(req.cfg_scale) > 1), specs, seed, req)


def _with_units(req, registry: ModelRegistry, pipe, settings: CallSettings,
                specs: list[ImageSpec], limits: Limits, init_images=None
                ) -> tuple[CallSettings, list[ImageSpec]]:
    """The request's ControlNet units: in the settings (the set of ControlNets and their
    weights and windows are the call's) and each image's control images in its spec."""
    units, control = controlnet_api.plan_units(
        req, registry, pipe, (settings.size.height, settings.size.width), limits.max_pixels,
        len(specs), init_images, seed=specs[0].seed if specs else 0)
    if units is None:
        return settings, specs
    if settings.sdxl.refiner is not None or settings.hires is not None:
        raise BadRequest("alwayson_scripts.controlnet: sdjax.serve runs ControlNet units "
                         "without the refiner and the hires fix")
    return (dataclasses.replace(settings, controlnet=units),
            [dataclasses.replace(s, control_images=tuple(zip(c, units.units, strict=True)))
             for s, c in zip(specs, control, strict=True)])


def with_model_defaults(req: Txt2ImgRequest | Img2ImgRequest, pipe):
    """``req`` with the fields it leaves out (None) taken from the model, as the CLIs take
    them: its sdjax.json steps, guidance scale and scheduler, the size it was trained at."""
    update: dict = {}
    if req.steps is None or req.cfg_scale is None:
        defaults = pipe.sampling_settings()
        update.update({k: defaults[d] for k, d in (("steps", "num_inference_steps"),
                                                   ("cfg_scale", "guidance_scale"))
                       if getattr(req, k) is None})
    if req.height is None or req.width is None:
        # the upscaler's output size is its image's (plan_img2img): the WebUI's 512 stands in
        height, width = (512, 512) if pipe.UPSCALER else pipe.default_hw
        update.update({k: v for k, v in (("height", height), ("width", width))
                       if getattr(req, k) is None})
    if req.sampler_name is None and req.sampler_index is None:
        update["sampler_name"] = SAMPLER_LABELS[pipe.default_scheduler]
    return req.model_copy(update=update) if update else req


def _check_prompt_lengths(req: Txt2ImgRequest | Img2ImgRequest, pipe) -> None:
    """A prompt or negative prompt past the context limit is this request's 422, naming the
    field, before it can join (and fail) a merged call."""
    expand = prompt_syntax.expander(pipe.store.embedding_tokens)
    for name, text in (("prompt", split_tags(req.prompt)[0]),
                       ("negative_prompt", req.negative_prompt)):
        try:
            n = prompt_syntax.prompt_chunks([text], pipe.tokenizer, expand)[0]
            prompt_syntax.check_chunks(n, name)
        except ValueError as e:
            raise BadRequest(str(e)) from None


def request_sampling(pipe, steps: int, scheduler: str, clip_skip: int,
                     schedule_type: str | None = None, options: tuple = ()) -> Sampling:
    """A request's sampling settings: each image has its own guidance scale, and the model's
    sdjax.json guidance options apply (requests have no fields for them); ``options``: the
    WebUI sampler options (``samplers.request_options``)."""
    defaults = pipe.sampling_settings()
    return Sampling(steps, scheduler, None, defaults["guidance_rescale"],
                    defaults["guidance_interval"], clip_skip, schedule_type, options)


def _refiner_settings(req: Txt2ImgRequest | Img2ImgRequest, registry: ModelRegistry,
                      title: str, scheduler: str) -> tuple[str | None, float | None]:
    """(the refiner's title, refiner_switch_at) from the WebUI's fields, or (None, None).
    refiner_switch_at alone is ignored, as the WebUI does (its page always sends one)."""
    try:
        refiner = registry.find_refiner(req.refiner_checkpoint)
        if refiner is None:
            return None, None
        if isinstance(req, Img2ImgRequest):
            raise ValueError("refiner_checkpoint: sdjax.serve runs the refiner on txt2img only")
        switch_at = handoff.check_switch_at(
            handoff.DEFAULT_SWITCH_AT if req.refiner_switch_at is None
            else req.refiner_switch_at, "refiner_switch_at")
        base, refiner_pipe = registry.get(title), registry.get(refiner)
        handoff.check_loaded_pair(base, refiner_pipe, "refiner_checkpoint")
        handoff.check_schedule(base, refiner_pipe, scheduler, req.steps, switch_at,
                               "refiner_switch_at")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return refiner, switch_at


def _prompt_settings(req: Txt2ImgRequest | Img2ImgRequest, registry: ModelRegistry,
                     title: str) -> tuple[tuple[tuple[str, float], ...], int]:
    """(the prompt's <lora:…> tags, each found in the LoRA folder; clip skip from the
    WebUI's ``CLIP_stop_at_last_layers`` override)."""
    try:
        _, tags = split_tags(req.prompt)
        for name in tags:
            find_lora(name, registry.lora_dir)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    model_default = registry.get(title).sampling_settings()["clip_skip"] or 1
    clip_skip = (req.override_settings or {}).get("CLIP_stop_at_last_layers", model_default)
    layers = registry.get(title).text_encoder_config.num_hidden_layers
    try:
        clip_skip = validation.check_int(clip_skip, "CLIP_stop_at_last_layers", minimum=1,
                                         maximum=layers)
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
    return tag_key(tags), clip_skip


def plan_img2img(req: Img2ImgRequest, registry: ModelRegistry, limits: Limits,
                 options: Mapping[str, Any] | None = None) -> Plan:
    """Validate an img2img / inpainting request (every txt2img check, then the images) and
    say what to generate; raises BadRequest. May load a model."""
    plan = plan_txt2img(req, registry, limits, options)
    req = plan.request
    if req.resize_mode != 0:
        raise BadRequest(f"resize_mode={req.resize_mode} is not supported by sdjax.serve: "
                         "only 0 (just resize)")
    if req.initial_noise_multiplier not in (None, 1, 1.0):
        raise BadRequest(f"initial_noise_multiplier={req.initial_noise_multiplier!r} is not "
                         "supported by sdjax.serve")
    if not 0 < req.denoising_strength <= 1:  # 0 would run no step at all
        raise BadRequest("denoising_strength must be in (0, 1], got "
                         f"{req.denoising_strength}")
    if not req.init_images:
        raise BadRequest("init_images: give at least one base64 image")
    n = len(plan.specs)
    if len(req.init_images) not in (1, n):
        raise BadRequest(f"init_images: {len(req.init_images)} images for {n} image(s) to "
                         "make: give one, or one per image (batch_size * n_iter)")
    images = [uploads.decode(d, f"init_images[{i}]", limits.max_pixels)
              for i, d in enumerate(req.init_images)]
    title = plan.shape.settings.model
    pipe = registry.get(title)
    mask, task, source_size = None, Img2Img(req.denoising_strength), None
    if pipe.UPSCALER:
        if req.mask:
            raise BadRequest(f"{title} is an x4 upscaler: it takes no mask")
        # No WebUI field says the upscaler's noise level: the pipeline's default.
        task = Upscaling(DEFAULT_NOISE_LEVEL)
    elif req.mask:
        mask, task = _mask_task(req, images, limits)
        if task.padding is not None:
            source_size = mask.shape
    settings, specs = _with_units(req, registry, pipe, plan.shape.settings, plan.specs,
                                  limits, images)
    images = images * n if len(images) == 1 else images
    settings = dataclasses.replace(settings, task=task)
    specs = [dataclasses.replace(s, task_inputs=_prepare(pipe, settings, im, mask))
             for s, im in zip(specs, images, strict=True)]
    if isinstance(task, Upscaling):  # the output is 4x the image: one size per call
        sizes = {(s.task_inputs.height, s.task_inputs.width) for s in specs}
        if len(sizes) > 1:
            raise BadRequest("init_images: the upscaler needs every image at one size")
        size = Size(*sizes.pop())
        try:
            validation.check_pixels(size.height, size.width, limits.max_pixels)
        except ValueError as e:
            raise BadRequest(f"the upscaled output: {e}") from None
        settings = dataclasses.replace(settings, size=size)
    return Plan(dataclasses.replace(plan.shape, settings=settings, source_size=source_size),
                specs, plan.seed, plan.request)


def _mask_task(req: Img2ImgRequest, images: list[np.ndarray], limits: Limits
               ) -> tuple[np.ndarray, Inpainting]:
    """The mask as the pipeline takes it (white = repaint) and the call's inpainting
    settings, in the WebUI's field names."""
    # inpainting_fill, mask_blur and the padding are in range (request_checks.RANGES)
    mask = uploads.decode(req.mask, "mask", limits.max_pixels, mask=True)
    for i, im in enumerate(images):
        if im.shape[:2] != mask.shape:
            raise BadRequest(f"mask: {mask.shape[1]}x{mask.shape[0]} is not the size of "
                             f"init_images[{i}] ({im.shape[1]}x{im.shape[0]})")
    if req.inpainting_mask_invert:
        mask = 255 - mask
    # The WebUI's mask_blur sets both directions; the pipeline blurs with one radius.
    blur_x, blur_y = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (
        req.mask_blur_x, req.mask_blur_y)
    if blur_x != blur_y:
        raise BadRequest(f"mask_blur_x={blur_x} and mask_blur_y={blur_y}: sdjax.serve blurs "
                         "masks with one radius; give mask_blur")
    padding = req.inpaint_full_res_padding if req.inpaint_full_res else None
    return mask, Inpainting(req.denoising_strength, blur_x, padding,
                            MASKED_CONTENT[req.inpainting_fill],
                            invert_mask=bool(req.inpainting_mask_invert))


def _prepare(pipe, settings: CallSettings, image: np.ndarray, mask: np.ndarray | None):
    """One image's task inputs, prepared (resized, blurred, filled) once, now: a bad one
    (strength out of range, an empty mask, a model that needs a mask) is this request's 422
    and never fails a merged call, which takes the prepared value as it is."""
    options = {} if mask is None else {"mask_image": mask}
    if not isinstance(settings.task, Upscaling):  # the upscaler's output is 4x the image
        options.update(height=settings.size.height, width=settings.size.width)
    try:
        return pipe.prepare(1, 1, num_inference_steps=settings.sampling.steps,
                            scheduler=settings.sampling.scheduler, image=image, **options,
                            **settings.task.pipeline_kwargs())
    except ValueError as e:
        raise BadRequest(str(e)) from None


def adapters_of(registry: ModelRegistry, title: str) -> Adapters:
    """Model ``title``'s LoRAs and embeddings as its images' PNG text names them."""
    return Adapters.of(registry.get(title), registry.lora_dir,
                       fixed=registry.tag_loras(title).fixed)


def run_call(registry: ModelRegistry, on_step: Callable | None = None,
             previews: Callable[[], bool] = lambda: False, max_batch: int | None = None):
    """The batcher's ``run``: one compiled call for images of one shape. ``on_step``: where
    the call's live previews go while ``previews()`` (sdjax.previews; not for the refiner's
    two calls). ``max_batch``: every call is padded to it (rounded up to a multiple of the
    devices), so a shape has one compiled batch and an image's pixels never depend on how
    many others share its call (XLA picks kernels by shape: another batch per device may
    round differently); None: just enough rows for the call's images."""
    def run(shape: Shape, specs: list[ImageSpec]) -> np.ndarray:
        settings = shape.settings
        pipe = registry.get(settings.model)
        per_device = None if max_batch is None else -(-max_batch // pipe.num_devices)
        try:
            registry.tag_loras(settings.model).use(dict(shape.loras))
        except ValueError as e:  # a LoRA file that does not fit this model: the request's 422
            raise BadRequest(str(e)) from None
        names = () if settings.controlnet is None else settings.controlnet.models
        if names or getattr(pipe, "controlnets", None):  # exactly the call's, in its order
            registry.controlnets.use(pipe, names)
        images = {}
        if settings.task is not None:
            images["task_inputs"] = TaskInputs.concat([s.task_inputs for s in specs])
        prompts = [split_tags(s.prompt)[0] for s in specs]
        # The task's settings are in its prepared inputs (above).
        call = {**settings.pipeline_kwargs(task=False),
                "negative_prompt": [s.negative_prompt for s in specs],
                "guidance_scale": [s.guidance_scale for s in specs],
                "seeds": [s.seed for s in specs], "image_indices": [0] * len(specs),
                "batch_size_per_device": per_device}
        if settings.noise.subseed_strength:  # the WebUI's subseed + k, one per image
            call["subseeds"] = [s.subseed for s in specs]
        call.update(controlnet_api.call_images(specs))  # each image's units
        if settings.sdxl.refiner is not None:  # txt2img only (_refiner_settings)
            return handoff.refine(pipe, registry.get(settings.sdxl.refiner), prompts,
                                  **call).images
        if on_step is not None and previews():
            call["on_step"] = on_step
        return pipe(prompts, **call, **images).images
    return run


def images_response(req: Txt2ImgRequest | Img2ImgRequest, plan: Plan, result: JobResult,
                    adapters: Adapters | None = None) -> dict:
    """The WebUI's TextToImageResponse (or ImageToImageResponse) for a finished job (PNG
    encoding happens here, so call it off the event loop). ``adapters``: the model's LoRAs
    and embeddings, for the PNG text (:func:`adapters_of`)."""
    settings = plan.shape.settings
    texts = [settings.parameters(spec.prompt, spec.negative_prompt, spec.seed,
                                 guidance_scale=spec.guidance_scale, subseed=spec.subseed,
                                 adapters=adapters)
             for spec in result.specs]
    images = [png_base64(im, text)
              for im, text in zip(result.images, texts, strict=True)] if req.send_images else []
    seeds = [s.seed for s in result.specs] or [plan.seed]
    subseeds = [s.subseed if s.subseed is not None else req.subseed
                for s in result.specs] or [req.subseed]
    info = {
        "prompt": req.prompt, "all_prompts": [s.prompt for s in result.specs],
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [s.negative_prompt for s in result.specs],
        "seed": plan.seed, "all_seeds": seeds,
        "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": req.subseed_strength,
        "width": settings.size.width, "height": settings.size.height,
        "sampler_name": SAMPLER_LABELS.get(settings.sampling.scheduler,
                                           settings.sampling.scheduler),
        "cfg_scale": req.cfg_scale, "steps": settings.sampling.steps,
        "batch_size": req.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": settings.model, "sd_model_hash": None,
        "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": getattr(req, "denoising_strength", None),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts,
        "styles": req.styles or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": settings.sampling.clip_skip, "is_using_inpainting_conditioning": False,
        "version": f"sdjax {__version__}",
    }
    parameters = req.model_dump()
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        # as the WebUI: the inputs are not sent back unless asked for
        parameters["init_images"], parameters["mask"] = None, None
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}
