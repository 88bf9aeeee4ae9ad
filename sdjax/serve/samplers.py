"""The WebUI's sampler names <-> sdjax's scheduler names.

Labels come from :data:`sdjax.images.SAMPLER_LABELS` (what our PNG metadata already says), so
the name a client sends, the one ``/sdapi/v1/samplers`` lists and the one written into the
image's ``parameters`` are the same string.
"""

from __future__ import annotations

from sdjax.images import SAMPLER_LABELS

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


def sampler_list() -> list[dict]:
    """``GET /sdapi/v1/samplers``: the WebUI's SamplerItem shape."""
    return [{"name": label, "aliases": sampler_aliases(ours),
             "options": {"scheduler": "karras"} if ours.endswith("_karras") else {}}
            for ours, label in SAMPLER_LABELS.items()]
