"""A call's ControlNet units as the front ends say them (``CallSettings.controlnet``): the
pipeline's per-ControlNet arguments, and the WebUI extension's ``ControlNet N`` fields of the
PNG ``parameters`` text (its ``scripts/infotext.py`` order: Module, Model, Weight, Resize
Mode, Processor Res, Threshold A, Threshold B, Guidance Start, Guidance End, Pixel Perfect,
Control Mode; a field the unit has no value for, as the extension's hidden sliders, left out).

``sdjax.sample``, ``sdjax.generate`` and ``sdjax.serve`` build it; no JAX at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

MODE_LABELS = {"balanced": "Balanced", "prompt": "My prompt is more important",
               "controlnet": "ControlNet is more important"}


def _float(value: float) -> str:
    return str(float(value))  # as the extension writes its float fields: 1.0, 0.5


@dataclasses.dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a call. ``model`` (which ControlNet, in the call's order) is part
    of the compiled call; the weight, window and mode are runtime inputs, and the rest only
    says how its image was made (the server merges requests that differ in those)."""
    model: str
    weight: float = dataclasses.field(default=1.0, compare=False)
    guidance_start: float = dataclasses.field(default=0.0, compare=False)
    guidance_end: float = dataclasses.field(default=1.0, compare=False)
    control_mode: str = dataclasses.field(default="balanced", compare=False)
    module: str = dataclasses.field(default="none", compare=False)
    title: str | None = dataclasses.field(default=None, compare=False)  # "name [hash]"
    processor_res: int | None = dataclasses.field(default=None, compare=False)
    threshold_a: float | None = dataclasses.field(default=None, compare=False)
    threshold_b: float | None = dataclasses.field(default=None, compare=False)
    pixel_perfect: bool = dataclasses.field(default=False, compare=False)
    resize_mode: str = dataclasses.field(default="Just Resize", compare=False)

    def infotext(self) -> str:
        fields = [("Module", self.module), ("Model", self.title or self.model),
                  ("Weight", _float(self.weight)), ("Resize Mode", self.resize_mode)]
        for name, value in (("Processor Res", self.processor_res),
                            ("Threshold A", self.threshold_a),
                            ("Threshold B", self.threshold_b)):
            if value is not None and value != -1:
                fields.append((name, f"{value:g}"))
        fields += [("Guidance Start", _float(self.guidance_start)),
                   ("Guidance End", _float(self.guidance_end)),
                   ("Pixel Perfect", str(bool(self.pixel_perfect))),
                   ("Control Mode", MODE_LABELS[self.control_mode])]
        # the extension's separators (", " and ": ") cannot appear inside a value
        return ", ".join(f"{k}: {str(v).replace(',', ' ').replace(':', ' ')}"
                         for k, v in fields)


def _default(module: str, which: str) -> float | None:
    from sdjax.controlnet.preprocessors import SPECS
    slider = getattr(SPECS[module], which) if module in SPECS else None
    return None if slider is None else slider.value


@dataclasses.dataclass(frozen=True)
class ControlNets:
    """The call's units, in the order of the pipeline's ControlNets."""
    units: tuple[ControlUnit, ...]
    guess_mode: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ControlNets | None:
        """``sdjax.sample``/``sdjax.generate``'s ``--controlnet PATH[:SCALE]`` and the flags
        paired with it (``sdjax.controlnet.cli``); None without ``--controlnet``."""
        nets = getattr(args, "controlnet", None) or []
        if not nets:
            return None
        starts = getattr(args, "control_start", None) or []
        ends = getattr(args, "control_end", None) or []
        names = getattr(args, "control_preprocessor", None) or []
        mode = getattr(args, "control_mode", None) or "balanced"
        units = []
        for k, (path, scale) in enumerate(nets):
            module = names[k] if k < len(names) else "none"
            units.append(ControlUnit(
                str(path), scale, starts[k] if k < len(starts) else 0.0,
                ends[k] if k < len(ends) else 1.0, mode, module=module,
                title=Path(str(path).rstrip("/\\")).stem,
                # the CLIs run the preprocessors at the image's own resolution, with the
                # extension's default thresholds
                threshold_a=_default(module, "a"), threshold_b=_default(module, "b")))
        return cls(tuple(units), bool(getattr(args, "guess_mode", False)))

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(u.model for u in self.units)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """``pipe(...)``'s per-ControlNet arguments (the control images are per image)."""
        u = self.units
        return {"controlnet_conditioning_scale": [x.weight for x in u],
                "control_guidance_start": [x.guidance_start for x in u],
                "control_guidance_end": [x.guidance_end for x in u],
                "control_mode": [x.control_mode for x in u], "guess_mode": self.guess_mode}

    def parameters(self) -> dict[str, str]:
        """The extension's ``ControlNet N`` fields, quoted as the WebUI quotes a value with
        commas in it."""
        return {f"ControlNet {k}": f'"{u.infotext()}"' for k, u in enumerate(self.units)}
