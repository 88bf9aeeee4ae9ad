"""The WebUI ControlNet extension's API on sdjax.serve: the ``alwayson_scripts.controlnet``
units of txt2img and img2img requests (its ``ControlNetUnit`` fields), and its
``/controlnet/model_list``, ``/controlnet/module_list``, ``/controlnet/detect`` and
``/controlnet/version`` routes (its ``scripts/api.py`` shapes).

A unit's image is decoded and preprocessed when the request is checked, so a bad one is that
request's 422 and merged calls only take prepared images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from sdjax import validation
from sdjax.controlnet import inputs as control_inputs
from sdjax.controlnet.preprocessors import ALIASES, PREPROCESSORS, RESOLUTION, SPECS, preprocess
from sdjax.controlnet.settings import MODE_LABELS, ControlNets, ControlUnit
from sdjax.images import png_base64
from sdjax.serve import uploads
from sdjax.serve.limits import BadRequest

API_VERSION = 2  # the extension's external_code.get_api_version() its clients check
# The extension's module names (and the long names its UI shows, alias_names=true).
MODULE_ALIASES = ALIASES
_MODES = {0: "balanced", 1: "prompt", 2: "controlnet",
          **{label.lower(): mode for mode, label in MODE_LABELS.items()},
          **{mode: mode for mode in MODE_LABELS}}
# The extension's ResizeMode: values, and the older labels its clients still send.
RESIZE_MODES = {0: "Just Resize", 1: "Crop and Resize", 2: "Resize and Fill",
                "just resize": "Just Resize", "crop and resize": "Crop and Resize",
                "resize and fill": "Resize and Fill",
                "scale to fit (inner fit)": "Crop and Resize",
                "envelope (outer fit)": "Resize and Fill"}


def _sliders(name: str) -> list[dict]:
    """module_detail's sliders of ``name``, as the extension's api_json."""
    spec = SPECS[name]
    shown = ([RESOLUTION] if spec.resolution and name != "shuffle" else []) + [
        s for s in (spec.a, spec.b) if s is not None]
    return [{"name": s.label, "value": s.value, "min": s.minimum, "max": s.maximum,
             "step": s.step} for s in shown]


def unit_params(module: str, res: Any, a: Any, b: Any, where: str
                ) -> tuple[int | None, float | None, float | None]:
    """(processor_res, threshold_a, threshold_b) of a unit or a detect call, as the extension
    reads them: -1 or missing is the default; a threshold outside its slider's range is its
    default too (the extension's bound check: clients such as webuiapi send 64 for every
    module); one that is not a number, or a processor_res that is not a whole number >= 1,
    is a 422. Those ``module`` does not use are None."""
    spec = SPECS[module]

    def number(value, field):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise BadRequest(f"{where}{field} must be a number, got {value!r}")
        return value

    out_res = None
    if spec.resolution:
        res = RESOLUTION.value if res in (None, -1) else number(res, "processor_res")
        if res != int(res) or res < 1:
            raise BadRequest(f"{where}processor_res must be a whole number >= 1, got {res!r}")
        # shuffle's resolution slider is hidden, with a [0, 1] range: always its 512
        out_res = RESOLUTION.value if module == "shuffle" else int(res)
    out = []
    for field, slider, value in (("threshold_a", spec.a, a), ("threshold_b", spec.b, b)):
        if slider is None:
            out.append(None)
            continue
        value = slider.value if value in (None, -1) else number(value, field)
        if not slider.minimum <= value <= slider.maximum:
            value = slider.value
        out.append(value)
    return out_res, out[0], out[1]


def shuffle_seed(seed: int, subseed: Any) -> int:
    """The NumPy seed the extension's set_numpy_seed gives a generation: its first seed plus
    its subseed (-1: the first seed again), modulo 2**32."""
    sub = seed if subseed in (None, -1) else max(int(subseed), 0)
    return (int(seed) + sub) & 0xFFFFFFFF


def _module(value: Any, where: str) -> str:
    key = str(value).strip().lower() if value is not None else "none"
    for name, alias in MODULE_ALIASES.items():
        if key in (name, alias):
            return name
    raise BadRequest(f"{where}: unknown module {value!r}; GET /controlnet/module_list lists "
                     f"them ({', '.join(PREPROCESSORS)})")


def _choice(table: dict, value: Any, where: str) -> str:
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, bool) or key not in table:
        raise BadRequest(f"{where}: {value!r} is not one of "
                         f"{', '.join(repr(k) for k in table)}")
    return table[key]


def _number(value: Any, where: str, minimum: float | None = None) -> float:
    try:
        return validation.check_number(value, where, minimum=minimum)
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None


def script_units(req) -> list[tuple[int, dict]]:
    """(index, unit) of the request's enabled ControlNet units (the script's name matched
    case-insensitively, as clients send "ControlNet" or "controlnet")."""
    scripts = req.alwayson_scripts or {}
    found = [v for k, v in scripts.items() if str(k).lower() == "controlnet"]
    if not found:
        return []
    args = found[0].get("args", []) if isinstance(found[0], dict) else found[0]
    if not isinstance(args, list):
        raise BadRequest("alwayson_scripts.controlnet.args must be a list of units")
    out = []
    for i, unit in enumerate(args):
        if not isinstance(unit, dict):
            raise BadRequest(f"alwayson_scripts.controlnet.args[{i}] must be an object")
        if unit.get("enabled", True) in (True, None):
            out.append((i, unit))
    return out


def _pixel_perfect(raw: tuple[int, int], target: tuple[int, int], resize: str) -> int:
    """The extension's pixel-perfect preprocessor resolution."""
    k0, k1 = target[0] / raw[0], target[1] / raw[1]
    k = min(k0, k1) if resize == "Resize and Fill" else max(k0, k1)
    return int(np.round(k * float(min(raw))))


def _crop_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """"Crop and Resize": the centre of ``image`` at the output's aspect ratio (the
    pipeline then resizes it to the output size)."""
    h, w = image.shape[:2]
    k = max(height / h, width / w)
    ch, cw = min(h, round(height / k)), min(w, round(width / k))
    top, left = (h - ch) // 2, (w - cw) // 2
    return image[top:top + ch, left:left + cw]


def _unit_image(unit: dict, where: str, max_pixels: int) -> np.ndarray | None:
    image = unit.get("image", unit.get("input_image"))
    if isinstance(image, dict):
        if image.get("mask"):
            raise BadRequest(f"{where}.image: a mask is not supported by sdjax.serve")
        image = image.get("image")
    if image in (None, ""):
        return None
    if not isinstance(image, str):
        raise BadRequest(f"{where}.image must be a base64 image")
    return uploads.decode(image, f"{where}.image", max_pixels)


def plan_units(req, registry, pipe, size: tuple[int, int], max_pixels: int, n: int,
               init_images: list[np.ndarray] | None = None, seed: int = 0
               ) -> tuple[ControlNets | None, list[tuple[np.ndarray, ...]] | None]:
    """(the call's ControlNet settings, each of the ``n`` images' control images), or
    (None, None) without enabled units. ``init_images``: img2img's, one or one per image,
    which stand in for a unit without an image; ``seed``: the first image's (shuffle's
    NumPy seed, with the request's subseed). Raises BadRequest."""
    units = script_units(req)
    if not units:
        return None, None
    library = registry.controlnets
    if not library:
        raise BadRequest("alwayson_scripts.controlnet: this server has no ControlNet "
                         "(python -m sdjax.serve --controlnet PATH)")
    height, width = size
    settings, images = [], []
    for i, unit in units:
        where = f"alwayson_scripts.controlnet.args[{i}]"
        module = _module(unit.get("module"), where)
        name = library.find(unit.get("model", ""))
        if name is None:
            raise BadRequest(f"{where}: unknown model {unit.get('model')!r}; GET "
                             "/controlnet/model_list lists them")
        weight = _number(unit.get("weight", 1.0), f"{where}.weight", 0)
        start = _number(unit.get("guidance_start", 0.0), f"{where}.guidance_start")
        end = _number(unit.get("guidance_end", 1.0), f"{where}.guidance_end")
        try:
            control_inputs.check_windows(start, end, 1)
        except ValueError as e:
            raise BadRequest(f"{where}: {e}") from None
        mode = _choice(_MODES, unit.get("control_mode", 0), f"{where}.control_mode")
        resize = _choice(RESIZE_MODES, unit.get("resize_mode", "Crop and Resize"),
                         f"{where}.resize_mode")
        if resize == "Resize and Fill":
            raise BadRequest(f"{where}.resize_mode: {resize!r} is not supported by "
                             "sdjax.serve: use 'Just Resize' or 'Crop and Resize'")
        pixel_perfect = unit.get("pixel_perfect", False)
        if not isinstance(pixel_perfect, bool):
            raise BadRequest(f"{where}.pixel_perfect must be true or false")
        res, low, high = unit_params(module, unit.get("processor_res"),
                                     unit.get("threshold_a"), unit.get("threshold_b"),
                                     f"{where}.")
        try:
            library.entry(pipe, name)  # read once, checked against this model's family
        except (ValueError, OSError) as e:
            raise BadRequest(f"{where}.model: {e}") from None
        raw = _unit_image(unit, where, max_pixels)
        sources = [raw] * n if raw is not None else (
            None if init_images is None else
            (init_images * n if len(init_images) == 1 else init_images))
        if sources is None:
            raise BadRequest(f"{where}.image: give a base64 control image (only img2img "
                             "takes the init image instead)")
        made, cache = [], {}
        for src in sources:
            if id(src) not in cache:
                r = res
                if pixel_perfect and res is not None:
                    r = _pixel_perfect(src.shape[:2], (height, width), resize)
                try:
                    out = preprocess(module, src, processor_res=512 if r is None else r,
                                     threshold_a=low,
                                     threshold_b=high, seed=shuffle_seed(
                                         seed, getattr(req, "subseed", -1)))
                except (ImportError, ValueError, TypeError) as e:
                    raise BadRequest(f"{where}: {e}") from None
                cache[id(src)] = _crop_to(out, height, width) if resize == "Crop and Resize" \
                    else out
            made.append(cache[id(src)])
        images.append(made)
        settings.append(ControlUnit(name, weight, start, end, mode,
                                    module=module, title=library.title(name),
                                    processor_res=None if res is None else int(res),
                                    threshold_a=low, threshold_b=high,
                                    pixel_perfect=pixel_perfect, resize_mode=resize))
    return ControlNets(tuple(settings)), [tuple(per) for per in zip(*images, strict=True)]


def call_images(specs) -> dict[str, Any]:
    """``pipe(...)``'s ControlNet arguments for a merged call: per ControlNet, each image's
    control image, weight, window and mode (requests that differ there share the call)."""
    per_image = [s.control_images for s in specs]
    if per_image[0] is None:
        return {}
    k = len(per_image[0])
    nets = [[units[j][0] for units in per_image] for j in range(k)]
    out: dict[str, Any] = {"control_image": nets[0] if k == 1 else nets}
    for field, attr in (("controlnet_conditioning_scale", "weight"),
                        ("control_guidance_start", "guidance_start"),
                        ("control_guidance_end", "guidance_end"),
                        ("control_mode", "control_mode")):
        out[field] = [[getattr(units[j][1], attr) for units in per_image] for j in range(k)]
    return out


def _detect(body: dict, max_pixels: int) -> dict:
    def field(name: str, default):
        return body.get(f"controlnet_{name}", body.get(name, default))

    module = _module(field("module", "none"), "controlnet_module")
    images = body.get("controlnet_input_images") or body.get("controlnet_images") or []
    if not isinstance(images, list) or not images:
        raise BadRequest("controlnet_input_images: give a list of base64 images")
    res, low, high = unit_params(module, field("processor_res", None),
                                 field("threshold_a", None), field("threshold_b", None),
                                 "controlnet_")
    # the extension's detect seeds nothing: shuffle draws from NumPy's state as it is
    params = dict(processor_res=512 if res is None else res, threshold_a=low, threshold_b=high,
                  seed=int(np.random.randint(0, 2**31)) if module == "shuffle" else None)
    out = []
    for i, data in enumerate(images):
        if not isinstance(data, str):
            raise BadRequest(f"controlnet_input_images[{i}] must be a base64 image")
        image = uploads.decode(data, f"controlnet_input_images[{i}]", max_pixels)
        try:
            made = preprocess(module, image, **params)
        except (ImportError, ValueError, TypeError) as e:
            raise BadRequest(str(e)) from None
        out.append(png_base64(made))
    return {"images": out, "info": "Success"}


def _parse_value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_png_units(params: dict[str, str]) -> dict[str, Any]:
    """png-info's fields of each ``ControlNet N`` unit, as the extension pastes them:
    ``ControlNet 0 module`` = "canny", ``ControlNet 0 weight`` = 1.0, ..."""
    out = {}
    for key, value in params.items():
        if not (key.startswith("ControlNet ") and key[11:].isdigit()):
            continue
        for item in str(value).split(","):
            name, sep, text = item.strip().partition(": ")
            if sep:
                out[f"{key} {'_'.join(w.lower() for w in name.split())}"] = _parse_value(text)
    return out


def add_controlnet_routes(app: FastAPI, registry, max_pixels: int) -> None:
    @app.get("/controlnet/version")
    async def version():
        return {"version": API_VERSION}

    @app.get("/controlnet/model_list")
    async def model_list(update: bool = True):
        return {"model_list": await run_in_threadpool(registry.controlnets.titles)}

    @app.get("/controlnet/module_list")
    async def module_list(alias_names: bool = False):
        names = list(PREPROCESSORS)
        return {"module_list": [MODULE_ALIASES[m] for m in names] if alias_names else names,
                "module_detail": {MODULE_ALIASES[m] if alias_names else m: {
                    "model_free": False, "sliders": _sliders(m)} for m in names}}

    @app.post("/controlnet/detect")
    async def detect(body: dict[str, Any]):
        return await run_in_threadpool(_detect, body, max_pixels)
