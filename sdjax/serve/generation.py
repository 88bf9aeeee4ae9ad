"""From a WebUI txt2img request to batcher work, and from its images back to the WebUI's
response: base64 PNGs with their ``parameters`` chunk, the request echoed, and ``info``.

A WebUI batch's image k has seed ``seed + k`` and is made exactly as ``sdjax.sample --seed
seed+k`` makes its first image: key (seed + k, index 0).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time

import numpy as np

from sdjax import __version__, validation
from sdjax.images import SAMPLER_LABELS, encode_png, format_parameters
from sdjax.serve.batcher import ImageSpec, JobResult, Shape
from sdjax.serve.checkpoints import ModelRegistry
from sdjax.serve.limits import BadRequest, Limits, check_generation
from sdjax.serve.samplers import scheduler_for
from sdjax.serve.schemas import Txt2ImgRequest, unsupported


@dataclasses.dataclass(frozen=True)
class Plan:
    shape: Shape
    specs: list[ImageSpec]
    seed: int               # the batch's first seed (-1 already replaced)


def plan_txt2img(req: Txt2ImgRequest, registry: ModelRegistry, limits: Limits) -> Plan:
    """Validate ``req`` and say what to generate; raises BadRequest. May load a model."""
    reason = unsupported(req)
    if reason:
        raise BadRequest(reason)
    try:
        scheduler = scheduler_for(req.sampler_name or req.sampler_index, req.scheduler)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    wanted = (req.override_settings or {}).get("sd_model_checkpoint")
    title = registry.find(wanted)
    if title is None:
        raise BadRequest(f"model {wanted!r} not found; GET /sdapi/v1/sd-models lists them", 404)
    check_generation(width=req.width, height=req.height, steps=req.steps,
                     batch_size=req.batch_size, n_iter=req.n_iter, cfg_scale=req.cfg_scale,
                     seed=req.seed, limits=limits)
    try:
        registry.get(title).check_size(req.height, req.width)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    seed = validation.resolve_seed(req.seed)
    n = req.batch_size * req.n_iter
    # Seeds past 2**32 - 1 wrap, as the uint32 the sampler takes would.
    specs = [ImageSpec(req.prompt, req.negative_prompt, (seed + k) % validation.MAX_SEED,
                       float(req.cfg_scale)) for k in range(n)]
    return Plan(Shape(title, req.height, req.width, req.steps, scheduler), specs, seed)


def run_call(registry: ModelRegistry):
    """The batcher's ``run``: one compiled call for images of one shape."""
    def run(shape: Shape, specs: list[ImageSpec]) -> np.ndarray:
        pipe = registry.get(shape.model)
        return pipe([s.prompt for s in specs],
                    negative_prompt=[s.negative_prompt for s in specs],
                    num_inference_steps=shape.steps,
                    guidance_scale=[s.guidance_scale for s in specs],
                    height=shape.height, width=shape.width, scheduler=shape.scheduler,
                    seeds=[s.seed for s in specs], image_indices=[0] * len(specs)).images
    return run


def infotext(spec: ImageSpec, shape: Shape) -> str:
    return format_parameters(prompt=spec.prompt, negative_prompt=spec.negative_prompt,
                             steps=shape.steps, sampler=shape.scheduler,
                             guidance_scale=spec.guidance_scale, seed=spec.seed,
                             width=shape.width, height=shape.height, model=shape.model)


def images_response(req: Txt2ImgRequest, plan: Plan, result: JobResult) -> dict:
    """The WebUI's TextToImageResponse for a finished job (PNG encoding happens here, so call
    it off the event loop)."""
    shape = plan.shape
    texts = [infotext(spec, shape) for spec in result.specs]
    images = [base64.b64encode(encode_png(im, text)).decode("ascii")
              for im, text in zip(result.images, texts, strict=True)] if req.send_images else []
    seeds = [s.seed for s in result.specs] or [plan.seed]
    info = {
        "prompt": req.prompt, "all_prompts": [s.prompt for s in result.specs],
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": [s.negative_prompt for s in result.specs],
        "seed": plan.seed, "all_seeds": seeds,
        "subseed": req.subseed, "all_subseeds": [req.subseed] * len(seeds),
        "subseed_strength": req.subseed_strength,
        "width": shape.width, "height": shape.height,
        "sampler_name": SAMPLER_LABELS[shape.scheduler], "cfg_scale": req.cfg_scale,
        "steps": shape.steps, "batch_size": req.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": shape.model, "sd_model_hash": None,
        "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": getattr(req, "denoising_strength", None),
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts,
        "styles": req.styles or [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "version": f"sdjax {__version__}",
    }
    return {"images": images, "parameters": req.model_dump(), "info": json.dumps(info)}
