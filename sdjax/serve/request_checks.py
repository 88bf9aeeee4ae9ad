"""Every field of a WebUI request checked by type before any work: one rule per kind of field,
read from the request model's own annotations, so a field another module adds is checked too.

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

# override_settings keys sdjax reads -> (accepted types, what to say)
OVERRIDE_SETTINGS: dict[str, tuple[tuple[type, ...], str]] = {
    "sd_model_checkpoint": ((str,), "a model title (a string)"),
    "CLIP_stop_at_last_layers": ((int,), "an integer"),
}


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


def check_request(model: type, data: Any) -> Any:
    """``data`` (the request body) checked against ``model``'s fields; raises a Pydantic error
    that names the first bad field. Unknown fields are ignored, as the WebUI does."""
    if not isinstance(data, Mapping):
        return data
    for name, field in model.model_fields.items():
        if name in data:
            check_value(name, field.annotation, data[name])
    overrides = data.get("override_settings")
    if isinstance(overrides, Mapping):
        for key, (accepted, what) in OVERRIDE_SETTINGS.items():
            value = overrides.get(key)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, accepted)):
                raise _fail(f"override_settings.{key}: must be {what}, got {value!r}")
    return data
