"""What the WebUI's hires fix and seamless tiling are, apart from running them: the upscaler
names (sdjax's and the WebUI's), the hires size rules, the value checks, the settings value
the front ends record (``CallSettings.hires``), its WebUI ``parameters`` fields, and the CLI
flags of ``sdjax.sample`` and ``sdjax.generate``. ``sdjax.hires`` runs the two passes.

No JAX at import time: the CLIs' --help and argument checks import this.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

from sdjax import validation
from sdjax.images import SAMPLER_LABELS, quote

# sdjax's names -> (F.interpolate mode, antialias) for latents, or PIL's filter for images.
UPSCALERS: Mapping[str, tuple[str, bool] | str] = {
    "latent": ("bilinear", False),
    "latent (antialiased)": ("bilinear", True),
    "latent (bicubic)": ("bicubic", False),
    "latent (bicubic antialiased)": ("bicubic", True),
    "latent (nearest)": ("nearest", False),
    "latent (nearest-exact)": ("nearest-exact", False),
    "lanczos": "LANCZOS",
    "nearest": "NEAREST",
}
# The WebUI's names of the same upscalers (its API, its lists and its infotext).
WEBUI_NAMES: Mapping[str, str] = {
    "latent": "Latent", "latent (antialiased)": "Latent (antialiased)",
    "latent (bicubic)": "Latent (bicubic)",
    "latent (bicubic antialiased)": "Latent (bicubic antialiased)",
    "latent (nearest)": "Latent (nearest)", "latent (nearest-exact)": "Latent (nearest-exact)",
    "lanczos": "Lanczos", "nearest": "Nearest"}
DEFAULT_STRENGTH = 0.7
# The fields of a call that configure its hires pass and have no default to fall back on.
EXTRA_FIELDS = ("hires_steps", "hires_prompt", "hires_negative_prompt", "hires_scheduler")


def check_upscaler(value: Any, name: str = "hires_upscaler") -> str:
    """sdjax's name of an upscaler given by its sdjax or WebUI name (any case)."""
    if isinstance(value, str) and value.strip().lower() in UPSCALERS:
        return value.strip().lower()
    raise ValueError(f"unknown {name} {value!r}; choose one of "
                     f"{', '.join(WEBUI_NAMES.values())}")


def is_latent(upscaler: str) -> bool:
    return isinstance(UPSCALERS[upscaler], tuple)


def check_strength(value: Any, name: str = "hires_denoising_strength") -> float:
    v = validation.check_number(value, name)
    if not 0.0 < v <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {v:g}")
    return v


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Where the hires pass's size comes from: the first pass's latents are resized to
    ``resized`` (latent rows, columns), then ``crop`` (rows, columns) is cut off."""

    resized: tuple[int, int]
    crop: tuple[int, int]
    factor: int

    @property
    def latent(self) -> tuple[int, int]:
        return (self.resized[0] - self.crop[0], self.resized[1] - self.crop[1])

    @property
    def pixels(self) -> tuple[int, int]:
        """(height, width) of the hires output."""
        return (self.latent[0] * self.factor, self.latent[1] * self.factor)


def sizes(height: int, width: int, factor: int, scale: Any = None, size: Any = None,
          names: tuple[str, str] = ("hires_scale", "hires_size")) -> Sizes:
    """The hires size of a ``height`` x ``width`` first pass, as the WebUI works it out:
    ``int(side * scale)``; or a ``size`` (height, width) covered at the image's aspect, its
    centre cropped in latent units (the WebUI's truncate_x/y), a 0 taking the image's aspect.
    Rounded down to the VAE factor. Raises ``ValueError`` naming ``names``."""
    if (scale is None) == (size is None):
        raise ValueError(f"the hires fix takes {names[0]} or {names[1]}, one of them")
    crop = (0, 0)
    if scale is not None:
        scale = validation.check_number(scale, names[0])
        if scale <= 1:
            raise ValueError(f"{names[0]} must be above 1, got {scale:g}")
        up = (int(height * scale), int(width * scale))
    else:
        if isinstance(size, (str, bytes)) or not hasattr(size, "__len__") or len(size) != 2:
            raise ValueError(f"{names[1]} must be (height, width), got {size!r}")
        th, tw = (validation.check_int(v, f"{names[1]}[{i}]", minimum=0)
                  for i, v in enumerate(size))
        if th == tw == 0:
            raise ValueError(f"{names[1]} must give a height or a width (0 = from the aspect)")
        if th == 0:
            up = (tw * height // width, tw)
        elif tw == 0:
            up = (th, th * width // height)
        else:
            up = ((tw * height // width, tw) if width / height < tw / th
                  else (th, th * width // height))
            crop = ((up[0] - th) // factor, (up[1] - tw) // factor)
    out = Sizes((up[0] // factor, up[1] // factor), crop, factor)
    if min(out.latent) < 1:
        raise ValueError(f"the hires size {up[0]}x{up[1]} is below the VAE factor {factor}")
    return out


def centre_crop(x, crop: tuple[int, int]):
    """Cut ``crop`` = (rows, columns) off an (N, H, W, ...) array, the odd one at the end, as
    the WebUI truncates its hires latents."""
    cy, cx = crop
    return x[:, cy // 2:x.shape[1] - (cy + 1) // 2, cx // 2:x.shape[2] - (cx + 1) // 2]


@dataclasses.dataclass(frozen=True)
class Hires:
    """A front end's hires fix settings (``pipe(...)``'s ``hires_*`` arguments); None where the
    first pass's applies. ``size`` is (height, width), a 0 from the aspect."""

    scale: float | None = None
    size: tuple[int, int] | None = None
    upscaler: str = "latent"
    steps: int | None = None
    denoising_strength: float = DEFAULT_STRENGTH
    prompt: str | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"hires_scale": self.scale, "hires_size": self.size,
                "hires_upscaler": self.upscaler, "hires_steps": self.steps,
                "hires_denoising_strength": self.denoising_strength,
                "hires_prompt": self.prompt, "hires_negative_prompt": self.negative_prompt,
                "hires_scheduler": self.scheduler}

    def parameters(self, sampling: Any = None, prompt: str | None = None,
                   negative_prompt: str | None = None) -> dict[str, str]:
        """The WebUI's infotext fields (``Hires resize`` is width x height, as it writes it).
        ``sampling``: the first pass's (``call_settings.Sampling``); ``prompt`` and
        ``negative_prompt``: the image's. As the WebUI's ``create_infotext``: ``Hires
        sampler`` where it is not the first pass's, ``Hires schedule type`` where the hires
        pass's schedule is not the first pass's ``Schedule type``, ``Hires prompt`` and
        ``Hires negative prompt`` where not the image's, quoted as it quotes them."""
        fields = {"Denoising strength": f"{self.denoising_strength:g}"}
        if self.scale is not None:
            fields["Hires upscale"] = f"{self.scale:g}"
        else:
            fields["Hires resize"] = f"{self.size[1]}x{self.size[0]}"
        if self.steps:
            fields["Hires steps"] = str(self.steps)
        fields["Hires upscaler"] = WEBUI_NAMES[self.upscaler]
        first = None if sampling is None else sampling.scheduler
        if self.scheduler is not None and self.scheduler != first:
            fields["Hires sampler"] = SAMPLER_LABELS.get(self.scheduler, self.scheduler)
            if sampling is not None:
                from sdjax.schedulers.webui import infotext_schedule
                label = infotext_schedule(self.scheduler, sampling.schedule_type)
                if label not in (None, "Automatic", sampling.schedule_label()):
                    fields["Hires schedule type"] = label
        for name, value, image in (("Hires prompt", self.prompt, prompt),
                                   ("Hires negative prompt", self.negative_prompt,
                                    negative_prompt)):
            if value is not None and value != image:
                fields[name] = quote(value)
        return fields

    def flags(self) -> dict[str, Any]:
        """The settings given, by flag name, as JSON holds them (run.json, samples' json)."""
        out = {"hires_scale": self.scale,
               "hires_size": None if self.size is None else list(self.size),
               "hires_upscaler": self.upscaler, "hires_steps": self.steps,
               "hires_denoising_strength": self.denoising_strength,
               "hires_prompt": self.prompt, "hires_negative_prompt": self.negative_prompt,
               "hires_scheduler": self.scheduler}
        return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- the CLIs
def _size(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH, got {value!r}") from None
    return h, w


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--tiling`` and the ``--hires_*`` flags."""
    g = p.add_argument_group("tiling and hires fix", "the WebUI's seamless tiling and its "
                             "hires fix (a second, img2img pass on the upscaled first one)")

    def flag(name, **kw):
        g.add_argument(f"--{name}", f"--{name.replace('_', '-')}", **kw)

    flag("tiling", action="store_true", help="seamless tiling: every convolution pads "
         "circularly, so the image tiles without a seam")
    flag("hires_scale", type=float, help="hires fix: the second pass at this many times the "
         "size (above 1)")
    flag("hires_size", type=_size, metavar="HEIGHT,WIDTH", help="hires fix at this size (of "
         "another aspect: cover it and crop the centre; 0 = from the aspect)")
    flag("hires_upscaler", default="latent", help="latent, 'latent (antialiased)', 'latent "
         "(bicubic)', 'latent (bicubic antialiased)', 'latent (nearest)', 'latent "
         "(nearest-exact)', lanczos, nearest (the WebUI's names too)")
    flag("hires_steps", type=int, help="the hires pass's steps (default: the first pass's)")
    flag("hires_denoising_strength", type=float, default=DEFAULT_STRENGTH,
         help="the hires pass's img2img strength, in (0, 1]")
    flag("hires_prompt", help="the hires pass's prompt (default: the first pass's)")
    flag("hires_negative_prompt", help="the hires pass's negative prompt (default: the "
         "first pass's)")
    flag("hires_scheduler", help="the hires pass's scheduler (default: the first pass's)")


def from_args(args: argparse.Namespace) -> Hires | None:
    """The hires settings of a CLI run's flags (None without --hires_scale/--hires_size);
    raises ``ValueError`` naming the flag."""
    if getattr(args, "hires_scale", None) is None and getattr(args, "hires_size", None) is None:
        for name in EXTRA_FIELDS:
            if getattr(args, name, None) is not None:
                raise ValueError(f"--{name} needs --hires_scale or --hires_size")
        return None
    sizes(512, 512, 8, args.hires_scale, args.hires_size,
          names=("--hires_scale", "--hires_size"))  # the values; the size once it is known
    if args.hires_steps is not None:
        validation.check_int(args.hires_steps, "--hires_steps", minimum=0)
    return Hires(args.hires_scale, args.hires_size,
                 check_upscaler(args.hires_upscaler, "--hires_upscaler"), args.hires_steps,
                 check_strength(args.hires_denoising_strength, "--hires_denoising_strength"),
                 args.hires_prompt, args.hires_negative_prompt, args.hires_scheduler)


def check_size(hires: Hires | None, height: int, width: int, factor: int,
               max_pixels: int, names: tuple[str, str] = ("--hires_scale", "--hires_size")
               ) -> None:
    """The hires pass's size within ``max_pixels`` (``ValueError`` naming the flag)."""
    if hires is None:
        return
    h, w = sizes(height, width, factor, hires.scale, hires.size, names).pixels
    if h * w > max_pixels:
        raise ValueError(f"the hires size {w}x{h} is {h * w} pixels, more than the limit of "
                         f"{max_pixels} (max_pixels)")
