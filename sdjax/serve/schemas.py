"""Request and response bodies of the WebUI API, with its field names and defaults.

Clients send the WebUI's whole request object, so every field it defines is accepted here.
Fields that change the image in ways sdjax does not implement (face restoration,
scripts) are refused by :func:`unsupported` when set to anything but their
default, rather than ignored: a client must not get an image other than the one it asked for.
Unknown fields are ignored, as the WebUI does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdjax.serve.request_checks import check_request

# field -> the values that mean "off" (the WebUI's defaults and what clients commonly send)
_MUST_BE_OFF = {
    "restore_faces": (False, None),
    "script_name": (None, ""), "script_args": ([], None),
    "alwayson_scripts": ({}, None), "save_images": (False, None), "styles": ([], None),
    "firstpass_image": (None, ""),
}


class _Request(BaseModel):
    """The fields txt2img and img2img share (the WebUI's StableDiffusionProcessing)."""
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _types(cls, data):  # every field by type before any work (request_checks)
        return check_request(cls, data)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None   # neither: the model's default sampler
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    # None: the model's own default (its sdjax.json, its training size), as the CLIs do
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(_Request):
    enable_hr: bool = False
    denoising_strength: float | None = None
    firstpass_image: str | None = None
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_Request):
    """img2img and inpainting; the fields are those of the WebUI's img2img request."""
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0          # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True     # "only masked"
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    denoising_strength: float = 0.75
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str  # a JSON string, as the WebUI sends it


class PngInfoRequest(BaseModel):
    image: str


def unsupported(request: _Request) -> str | None:
    """The first field set to something sdjax cannot do, as a one-line reason, or None."""
    for name, off in _MUST_BE_OFF.items():
        if name in type(request).model_fields:
            value = getattr(request, name)
            if value not in off:
                return f"{name}={value!r} is not supported by sdjax.serve"
    return None
