"""The WebUI's hires fix and tiling fields of a request (``enable_hr``, ``hr_scale``,
``hr_resize_x/y``, ``hr_upscaler``, ``hr_second_pass_steps``, ``denoising_strength``,
``hr_prompt``, ``hr_negative_prompt``, ``hr_sampler_name``, ``tiling``) as the call's
settings, and the upscaler lists the WebUI serves."""

from __future__ import annotations

from sdjax import hires_settings
from sdjax.hires_settings import WEBUI_NAMES, Hires
from sdjax.serve.limits import BadRequest, Limits
from sdjax.serve.samplers import scheduler_for

# What the WebUI's hr_sampler_name / hr_prompt send for "the first pass's".
_SAME = (None, "", "Use same sampler")


def tiling(req, pipe) -> bool:
    """The request's ``tiling`` (the x4 upscaler decodes in tiles: refused there)."""
    if req.tiling and pipe.UPSCALER:
        raise BadRequest("tiling is not supported with the x4 upscaler (it decodes in tiles)")
    return bool(req.tiling)


def hires(req, pipe, limits: Limits, refiner: str | None) -> Hires | None:
    """The request's hires fix, or None without ``enable_hr``; raises BadRequest."""
    if not getattr(req, "enable_hr", False):
        return None
    if refiner is not None:
        raise BadRequest("enable_hr does not go with refiner_checkpoint in sdjax.serve")
    try:
        upscaler = hires_settings.check_upscaler(req.hr_upscaler or "Latent", "hr_upscaler")
        strength = hires_settings.check_strength(
            hires_settings.DEFAULT_STRENGTH if req.denoising_strength is None
            else req.denoising_strength, "denoising_strength")
        if req.hr_resize_x or req.hr_resize_y:
            scale, size = None, (req.hr_resize_y, req.hr_resize_x)
        else:
            scale, size = req.hr_scale, None
        names = ("hr_scale", "hr_resize_x/hr_resize_y")
        hires_settings.check_size(Hires(scale, size), req.height, req.width,
                                  pipe.vae_scale_factor, limits.max_pixels, names)
        steps = req.hr_second_pass_steps
        if not 0 <= steps <= limits.max_steps:
            raise ValueError(f"hr_second_pass_steps must be between 0 and {limits.max_steps}, "
                             f"got {steps}")
        scheduler = (None if req.hr_sampler_name in _SAME
                     else scheduler_for(req.hr_sampler_name, req.hr_scheduler or None))
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
    return Hires(scale, size, upscaler, steps or None, strength,
                 None if req.hr_prompt in _SAME or req.hr_prompt == req.prompt
                 else req.hr_prompt,
                 None if req.hr_negative_prompt in _SAME
                 or req.hr_negative_prompt == req.negative_prompt else req.hr_negative_prompt,
                 scheduler)


def upscalers() -> list[dict]:
    """``GET /sdapi/v1/upscalers``: the WebUI's UpscalerItem shape (the image upscalers; the
    latent ones are /sdapi/v1/latent-upscale-modes), with its "None" first."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None,
             "scale": 4} for name in ("None", "Lanczos", "Nearest")]


def latent_upscale_modes() -> list[dict]:
    """``GET /sdapi/v1/latent-upscale-modes``."""
    return [{"name": label} for key, label in WEBUI_NAMES.items()
            if hires_settings.is_latent(key)]
