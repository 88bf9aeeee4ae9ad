"""The WebUI's sampler names <-> sdjax's scheduler names.

Labels come from :data:`sdjax.images.SAMPLER_LABELS` (what our PNG metadata already says), so
the name a client sends, the one ``/sdapi/v1/samplers`` lists and the one written into the
image's ``parameters`` are the same string.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdjax.images import SAMPLER_LABELS
from sdjax.schedulers import (
    SAMPLER_OPTIONS,
    WEBUI_ALIASES,
    WEBUI_SAMPLER_NAMES,
    check_sampler_options,
    refuse_not_fixed_step,
    webui,
    webui_sigmas,
)
from sdjax.serve.limits import BadRequest

# Other spellings clients send: the WebUI's own aliases (k-diffusion names), "PNDM" (which the
# WebUI calls PLMS), and our names themselves.
_ALIASES = {
    "pndm": ["PNDM", "plms"], "ddim": [], "ddpm": [], "lms": ["k_lms"], "euler": ["k_euler"],
    "euler_a": ["k_euler_a", "k_euler_ancestral"], "heun": ["k_heun"],
    "dpmpp_2m": ["k_dpmpp_2m"], "dpmpp_2m_karras": ["k_dpmpp_2m_ka"], "lcm": ["k_lcm"],
}

# Newer WebUI versions send the noise schedule apart from the sampler ("DPM++ 2M" + "Karras").
_SCHEDULES = {"": None, "automatic": None, "karras": "_karras"}

DEFAULT_SAMPLER = "Euler"  # the WebUI API's default when a request names none


def sampler_aliases(name: str) -> list[str]:
    """Every spelling of our scheduler ``name`` that :func:`scheduler_for` accepts."""
    return [name, *_ALIASES.get(name, [])]


def scheduler_for(sampler_name: str | None, schedule: str | None = None) -> str:
    """Our scheduler name for a WebUI ``sampler_name`` (and optional ``scheduler`` field);
    raises ValueError naming the choices."""
    wanted = (sampler_name or DEFAULT_SAMPLER).strip().lower()
    found = None
    for ours, label in SAMPLER_LABELS.items():
        if wanted in (s.lower() for s in (label, *sampler_aliases(ours))):
            found = ours
            break
    if found is None:
        raise ValueError(f"unknown sampler {sampler_name!r}; choose one of "
                         f"{', '.join(SAMPLER_LABELS.values())}")
    key = (schedule or "").strip().lower()
    if key not in _SCHEDULES:
        raise ValueError(f"unknown scheduler {schedule!r}; choose Automatic or Karras")
    suffix = _SCHEDULES[key]
    if suffix and not found.endswith(suffix):
        if found + suffix not in SAMPLER_LABELS:
            raise ValueError(f"the {SAMPLER_LABELS[found]} sampler has no {schedule} schedule")
        found += suffix
    return found


def sampler_settings(sampler_name: str | None,
                     schedule: str | None = None) -> tuple[str, str | None]:
    """(our scheduler name, the WebUI schedule type or None) for a request's ``sampler_name``
    and ``scheduler`` (WebUI 1.9 on): the WebUI's k-diffusion samplers by their labels or
    aliases, with any schedule type (older names such as "DPM++ 2M Karras" carry theirs);
    its DDIM, PLMS and LCM (``sdjax.schedulers.webui_timesteps``); the others (DDPM, sdjax's
    diffusers-equivalent names) as :func:`scheduler_for` maps them. Raises ValueError
    naming the choices."""
    refuse_not_fixed_step(sampler_name)
    wanted = (sampler_name or DEFAULT_SAMPLER).strip().lower()
    for label in WEBUI_SAMPLER_NAMES:
        names = [label, *WEBUI_ALIASES[label]]
        if wanted in (n.lower() for n in names):
            return label, webui_sigmas.schedule_type_label(schedule or None)
        if wanted in (f"{n} karras".lower() for n in names[:1]) or wanted in (
                f"{n}_ka".lower() for n in names[1:]):
            if (schedule or "automatic").strip().lower() not in ("automatic", "karras"):
                raise ValueError(f"{sampler_name} has the Karras schedule, not {schedule}")
            return label, "Karras"
    try:
        return scheduler_for(sampler_name, schedule), None
    except ValueError as e:
        if not str(e).startswith("unknown sampler"):
            raise
        names = ", ".join(item["name"] for item in sampler_list())
        raise ValueError(f"unknown sampler {sampler_name!r}; choose one of {names}") from None


def sampler_list() -> list[dict]:
    """``GET /sdapi/v1/samplers``: the WebUI's SamplerItem shape: its samplers (options:
    their own schedule type), then sdjax's other schedulers (DDPM, and "DPM++ 2M Karras" as
    older clients send it)."""
    def options(label):
        own = webui.SAMPLERS[label].scheduler if label in webui.SAMPLERS else None
        return {"scheduler": own.lower()} if own else {}

    listed = [{"name": label, "aliases": list(WEBUI_ALIASES[label]), "options": options(label)}
              for label in WEBUI_SAMPLER_NAMES]
    names = {item["name"] for item in listed}
    return listed + [{"name": label, "aliases": sampler_aliases(ours),
                      "options": {"scheduler": "karras"} if ours.endswith("_karras") else {}}
                     for ours, label in SAMPLER_LABELS.items() if label not in names]


def scheduler_list() -> list[dict]:
    """``GET /sdapi/v1/schedulers``: the WebUI's SchedulerItem shape."""
    rho = {"Karras": 7.0, "Polyexponential": 1.0}
    inner = ("Uniform", "SGM Uniform", "Simple", "Normal", "DDIM", "Beta")
    return [{"name": label.lower().replace(" ", "_"), "label": label,
             "aliases": ["SGMUniform"] if label == "SGM Uniform" else None,
             "default_rho": rho.get(label, -1.0), "need_inner_model": label in inner}
            for label in webui_sigmas.SCHEDULE_TYPES]


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The WebUI sampler options (``eta_ddim``, ``uni_pc_variant``, ``uni_pc_skip_type``,
    ``uni_pc_order``, ``uni_pc_lower_order_final``) of an options or override_settings
    object, checked (422 if bad); other keys are not these."""
    try:
        return check_sampler_options({k: options[k] for k in SAMPLER_OPTIONS if k in options})
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None


def request_options(req, options: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The sampler options a request runs with: the server's (``POST /sdapi/v1/options``),
    then its ``override_settings``; those that differ from the WebUI's defaults, as
    ``Sampling.options`` holds them (so requests at the defaults still merge)."""
    merged = {**SAMPLER_OPTIONS, **check_options(options or {}),
              **check_options(req.override_settings or {})}
    return tuple((k, v) for k, v in merged.items() if v != SAMPLER_OPTIONS[k])
