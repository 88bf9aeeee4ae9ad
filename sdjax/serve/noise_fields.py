"""The WebUI's noise fields and options on the server: a request's ``subseed``,
``subseed_strength``, ``seed_resize_from_h/w``, and the options ``randn_source`` ("GPU", the
WebUI's default, and "NV" draw with sdjax's ``nv``; "CPU" with ``cpu``) and
``eta_noise_seed_delta``, set by ``POST /sdapi/v1/options`` or per request in
``override_settings``, as the WebUI reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdjax import validation
from sdjax.call_settings import RANDN_SOURCES, Noise
from sdjax.serve.limits import BadRequest

DEFAULT_OPTIONS = {"randn_source": "GPU", "eta_noise_seed_delta": 0}


def check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The noise options of an options or override_settings object, checked (422 if bad)."""
    out = {}
    if "randn_source" in options:
        source = options["randn_source"]
        if source not in RANDN_SOURCES:
            raise BadRequest(f"randn_source must be one of {', '.join(RANDN_SOURCES)}, got "
                             f"{source!r}")
        out["randn_source"] = source
    if "eta_noise_seed_delta" in options:
        try:
            out["eta_noise_seed_delta"] = validation.check_eta_noise_seed_delta(
                options["eta_noise_seed_delta"])
        except (TypeError, ValueError) as e:
            raise BadRequest(str(e)) from None
    return out


def request_noise(req, options: Mapping[str, Any] | None, max_pixels: int
                  ) -> tuple[Noise, int | None]:
    """(the request's noise settings, its first subseed with -1 resolved, or None without
    variation seeds); raises BadRequest."""
    merged = {**DEFAULT_OPTIONS, **(options or {}),
              **check_options(req.override_settings or {})}
    source = merged["randn_source"]
    try:
        strength = float(validation.check_subseed_strength(req.subseed_strength, 1)[0])
        subseed = None
        if strength:
            subseed = validation.resolve_seed(validation.check_seed(req.subseed, "subseed"))
        resize = None
        if req.seed_resize_from_h > 0 and req.seed_resize_from_w > 0:
            resize = (req.seed_resize_from_h, req.seed_resize_from_w)
            validation.check_seed_resize_from(resize, 1)
            validation.check_pixels(*resize, max_pixels)
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
    noise = Noise(RANDN_SOURCES[source], source != "GPU", None, strength, resize,
                  merged["eta_noise_seed_delta"])
    return noise, subseed
