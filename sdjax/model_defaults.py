"""Per-model sampling defaults: the ``sdjax.json`` a model folder may carry, and the one rule
that decides which value a call uses.

    {"num_inference_steps": 4, "guidance_scale": 0, "scheduler": "euler_a"}

A value the caller gives wins; else the model's ``sdjax.json``; else the pipeline class's
defaults (the upscaler's 75 steps, guidance 9); else the library's. Few-step models (Turbo,
LCM) carry their 1-4 steps and guidance 0 here, so they do the right thing with no flags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdjax import validation

FILENAME = "sdjax.json"

# None for scheduler means "the model's scheduler config decides"; for guidance_interval,
# "guidance at every step"; for clip_skip, the text encoder's last layer.
LIBRARY_DEFAULTS: Mapping[str, Any] = {
    "num_inference_steps": 50,
    "guidance_scale": 7.5,
    "guidance_rescale": 0.0,
    "guidance_interval": None,
    "scheduler": None,
    "clip_skip": None,
}


def check_value(key: str, value: Any) -> Any:
    """One setting's value as the pipeline takes it; TypeError/ValueError naming ``key``."""
    if key == "num_inference_steps":
        return validation.check_int(value, key, minimum=1)
    if key == "clip_skip":
        return None if value is None else validation.check_int(value, key, minimum=1)
    if key == "guidance_scale":
        return validation.check_number(value, key, minimum=0)
    if key == "guidance_rescale":
        return validation.check_guidance_rescale(value, 1)[0].item()
    if key == "guidance_interval":
        bounds = validation.check_guidance_interval(value, 1, key)
        return None if bounds is None else tuple(float(b) for b in bounds[0])
    if key == "scheduler":
        from sdjax.schedulers import ALL_SCHEDULER_NAMES
        return validation.check_choice(value, key, ALL_SCHEDULER_NAMES, allow_none=True)
    raise ValueError(f"unknown setting {key!r}; known: {', '.join(LIBRARY_DEFAULTS)}")


def read(folder: Path) -> dict[str, Any]:
    """The checked settings of ``folder/sdjax.json`` ({} without one). A file that is not a
    JSON object of known settings with values of the right type raises ValueError naming it."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of sampling settings")
    try:
        return {key: check_value(key, value) for key, value in data.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def write(folder: Path, settings: Mapping[str, Any]) -> None:
    """Save ``settings`` as ``folder/sdjax.json`` (nothing is written when empty)."""
    if settings:
        (Path(folder) / FILENAME).write_text(json.dumps(dict(settings), indent=2) + "\n")


def resolve(given: Mapping[str, Any], model: Mapping[str, Any],
            class_defaults: Mapping[str, Any] = {}) -> dict[str, Any]:
    """Each known setting: ``given`` unless None, else the model's, else the class's, else
    the library's."""
    out = {}
    for key, library in LIBRARY_DEFAULTS.items():
        value = given.get(key)
        for source in (model, class_defaults):
            if value is None:
                value = source.get(key)
        out[key] = library if value is None else value
    return out
