"""Every field of a WebUI request checked by type before any work: one rule per kind of field,
read from the request model's own annotations, so a field another module adds is checked too,
and every field's range (:data:`RANGES`), used by the request's task or not.

Pydantic converts in "lax" mode: it takes ``true`` for an integer (``steps: true`` ran one
step), ``"NaN"`` for a float (a NaN that made the response invalid JSON after the image was
made) and any Python string, lone UTF-16 surrogates included (which the tokenizer cannot
read). These rules refuse each, in one line naming the field, before Pydantic converts;
:data:`OVERRIDE_SETTINGS` types the ``override_settings`` keys sdjax reads.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic_core import PydanticCustomError

from sdjax.validation import MASKED_CONTENT

# override_settings keys sdjax reads -> (accepted types, what to say)
OVERRIDE_SETTINGS: dict[str, tuple[tuple[type, ...], str]] = {
    "sd_model_checkpoint": ((str,), "a model title (a string)"),
    "CLIP_stop_at_last_layers": ((int,), "an integer"),
}


# field -> (lowest, highest or None): the range a value must be in whatever the task, so that
# a field the task does not use (a txt2img's denoising_strength without the hires fix, an
# img2img's mask_blur without a mask) is checked all the same. Where a task uses a field it
# may ask for more (img2img's strength above 0, the hires fix's hr_scale above 1). A field every
# request's plan checks with its own rule is not here (subseed_strength:
# validation.check_subseed_strength).
RANGES: dict[str, tuple[float, float | None]] = {
    "denoising_strength": (0, 1), "refiner_switch_at": (0, 1),
    "eta": (0, None), "image_cfg_scale": (0, None), "initial_noise_multiplier": (0, None),
    "hr_scale": (0, None), "hr_second_pass_steps": (0, None), "hr_resize_x": (0, None),
    "hr_resize_y": (0, None), "mask_blur": (0, None), "mask_blur_x": (0, None),
    "mask_blur_y": (0, None), "inpaint_full_res_padding": (0, None),
    "inpainting_mask_invert": (0, 1), "seed_resize_from_h": (-1, None),
    "seed_resize_from_w": (-1, None),
}
# field -> its labelled choices (the index is the value)
CHOICES: dict[str, tuple[str, ...]] = {"inpainting_fill": MASKED_CONTENT}


def _kinds(annotation: Any) -> set[type]:
    """The plain types an annotation allows (``int | None`` -> {int, NoneType})."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    return {origin or annotation} if isinstance(origin or annotation, type) else set()


def _fail(message: str):
    return PydanticCustomError("sdjax_field", "{message}", {"message": message})


def _check_text(value: Any, where: str) -> None:
    """Strings anywhere in ``value``: no lone surrogate (not Unicode text)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(f"{where}: contains a lone UTF-16 surrogate (not valid Unicode text); "
                        "send the text as UTF-8") from None
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{where}[{i}]")


def check_value(name: str, annotation: Any, value: Any) -> None:
    """One field's type rule: numbers are numbers (not booleans), finite; text is Unicode."""
    kinds = _kinds(annotation)
    if value is None or not kinds:
        _check_text(value, name)
        return
    numeric = kinds & {int, float}
    if numeric and bool not in kinds and isinstance(value, bool):
        raise _fail(f"{name}: a number, not {str(value).lower()}")
    if float in kinds and isinstance(value, (str, float)):
        try:
            number = float(value)
        except ValueError:
            number = 0.0  # not a number at all: Pydantic says so
        if not math.isfinite(number):
            raise _fail(f"{name}: must be a finite number, got {value!r}")
    _check_text(value, name)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        return float(value)
    except ValueError:
        return None  # not a number: Pydantic says so


def check_range(name: str, value: Any) -> None:
    """One field's range (:data:`RANGES`, :data:`CHOICES`), whatever the task."""
    number = _number(value)
    if number is None:
        return
    if name in CHOICES:
        labels = CHOICES[name]
        if number not in range(len(labels)):
            choices = ", ".join(f"{k} ({label})" for k, label in enumerate(labels))
            raise _fail(f"{name} must be one of {choices}; got {value}")
    if name in RANGES:
        low, high = RANGES[name]
        if high is not None and not low <= number <= high:
            raise _fail(f"{name} must be in [{low:g}, {high:g}], got {value}")
        if number < low:
            raise _fail(f"{name} must be >= {low:g}, got {value}")


def check_request(model: type, data: Any) -> Any:
    """``data`` (the request body) checked against ``model``'s fields; raises a Pydantic error
    that names the first bad field. Unknown fields are ignored, as the WebUI does."""
    if not isinstance(data, Mapping):
        return data
    for name, field in model.model_fields.items():
        if name in data:
            check_value(name, field.annotation, data[name])
            check_range(name, data[name])
    overrides = data.get("override_settings")
    if isinstance(overrides, Mapping):
        try:
            check_settings(overrides, "override_settings.")
        except ValueError as e:
            raise _fail(str(e)) from None
    return data


def check_settings(settings: Mapping[str, Any], where: str = "") -> None:
    """The :data:`OVERRIDE_SETTINGS` keys of an options object (``override_settings``, or
    the body of ``POST /sdapi/v1/options``) by type; ValueError naming the first bad one."""
    for key, (accepted, what) in OVERRIDE_SETTINGS.items():
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, accepted)):
            raise ValueError(f"{where}{key}: must be {what}, got {value!r}")
