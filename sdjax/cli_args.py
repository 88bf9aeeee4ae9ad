"""The flags that ``sdjax.sample``, ``sdjax.generate`` (and the server) share, their help text
and their checks, written once.

Every check here runs before the model loads, so a wrong flag costs nothing and leaves nothing
behind; what only the loaded model can tell (its VAE factor, its default size) is checked by
:func:`image_size` right after loading, before anything compiles. Value rules come from
:mod:`sdjax.validation`, which the Python API uses too.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from sdjax import cli_checks, hires_settings, validation

# Larger sizes belong to upscalers, and a mistyped --height 100000 should be refused rather
# than run out of memory after a long compile. 2048x2048 leaves room for SDXL (1024x1024
# native) and its 1.5-2x "hires" passes.
DEFAULT_MAX_PIXELS = 2048 * 2048
# The schedulers' noise schedules have 1000 training timesteps; more steps than that cannot be
# placed on them.
MAX_STEPS = 1000
# No Stable Diffusion model makes images narrower than this, so a side given alone that
# needs less than this of the other to fit --max_pixels is refused before the model loads.
MIN_SIDE = 64


class UsageError(Exception):
    """A flag (or a file it names) that cannot be used; the message is the whole report."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where the help text does not already say the default and
    there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        # Nothing to show for unset, empty or off (False, but not 0) defaults.
        if ("(default" in text or default is None or default is False
                or default in ("", [], argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line (``error: …``) and exit 2, like
    every other bad input, instead of the usage block."""

    def __init__(self, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kw)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """``--name`` with a hyphenated alias (``--num-devices``) when the name has underscores."""
    p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []),
                   **kw)


def parse_sampler_option(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` of ``--sampler_option``: the value as true/false, an integer, a number
    or else the text (sdjax.schedulers.check_sampler_options checks both)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    value = value.strip()
    if value.lower() in ("true", "false"):
        return name.strip(), value.lower() == "true"
    for kind in (int, float):
        try:
            return name.strip(), kind(value)
        except ValueError:
            pass
    return name.strip(), value


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The model, sampling and device flags of every sdjax command that generates images."""
    add_flag(p, "model", default="toy", help="'toy' (the small bundled demo model), a diffusers "
             "folder, a single .safetensors/.ckpt checkpoint (A1111 layout), or a Hugging Face "
             "hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
    add_flag(p, "negative_prompt", default="", help="what the images should not show")
    add_flag(p, "num_devices", type=int, default=None,
             help="devices to use (default: all); at the same --batch_size the images do not "
                  "depend on it (docs/tpu-gpu.md#reproducibility)")
    add_flag(p, "batch_size", type=int, default=None,
             help="images per device per compiled call (default: just enough for one call, at "
                  "most 8). At the same batch per device, runs of 2 or more devices and any "
                  "number of processes make bitwise equal images, and 1 device too with XLA's "
                  "default flags for every sampler compared; across batch sizes they may "
                  "differ by float rounding, one 8-bit level in rare pixels "
                  "(docs/tpu-gpu.md#reproducibility)")
    add_flag(p, "steps", type=int, default=None, help=f"denoising steps, 1 to {MAX_STEPS} "
             "(default: the model's sdjax.json, else 50)")
    add_flag(p, "guidance_scale", type=float, default=None, help="classifier-free guidance "
             "scale; 1 or less turns guidance off (default: the model's sdjax.json, else 7.5)")
    add_flag(p, "guidance_rescale", type=float, default=None, help="diffusers' CFG rescale, "
             "0 to 1 (default: the model's sdjax.json, else 0)")
    add_flag(p, "guidance_interval", type=parse_interval, default=None, metavar="LO,HI",
             help="guide only the steps whose noise level sigma is in [LO, HI], guidance 1 "
                  "elsewhere (default: the model's sdjax.json, else every step)")
    add_flag(p, "scheduler", default=None, help="pndm, ddim, ddpm, lms, euler, euler_a, heun, "
             "dpmpp_2m, dpmpp_2m_karras, lcm (default: the model's sdjax.json, else its scheduler "
             "config), or a WebUI sampler: \"Euler a\", \"DPM++ 2M\", \"DPM++ SDE\", ...")
    add_flag(p, "schedule_type", default=None, help="the WebUI's schedule type for a WebUI "
             "sampler: Automatic (its own), Uniform, Karras, Exponential, Polyexponential, "
             "\"SGM Uniform\", \"KL Optimal\", \"Align Your Steps\", Simple, Normal, DDIM, Beta")
    add_flag(p, "sampler_option", action="append", type=parse_sampler_option, default=None,
             metavar="NAME=VALUE", help="one of the WebUI's sampler parameters by its option "
             "name (repeatable): eta_ddim, uni_pc_variant, uni_pc_skip_type, uni_pc_order, "
             "uni_pc_lower_order_final; see docs/webui-samplers.md")
    add_flag(p, "seed", type=int, default=0, help="image i of the run uses noise from (seed, i); "
             "0 to 2**32-1, or -1 for a random seed (reported and written in the metadata)")
    add_flag(p, "rng", default=None, choices=list(validation.RNG_NAMES),
             help="the start noise's source: jax (default), nv (the WebUI's NV = its GPU "
                  "source), cpu (torch's CPU generator); see docs/python-api.md")
    add_flag(p, "subseed", type=int, default=None, help="the WebUI's variation seed (image i "
             "uses subseed + i), 0 to 2**32-1")
    add_flag(p, "subseed_strength", type=float, default=None, help="how much of the variation "
             "seed's noise, 0 to 1 (the WebUI's slerp)")
    add_flag(p, "seed_resize_from", type=parse_size_pair, default=None, metavar="H,W",
             help="the WebUI's 'resize seed from': draw the seed's noise at this height,width "
                  "and place it in the middle")
    add_flag(p, "eta_noise_seed_delta", type=int, default=None, metavar="N",
             help="the WebUI's ENSD: seed offset of its samplers' per-step noise")
    add_flag(p, "height", type=int, default=None, help="pixels, a multiple of the VAE factor "
             "(default: the model's size)")
    add_flag(p, "width", type=int, default=None, help="pixels (default: the model's size)")
    add_flag(p, "max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
             help="refuse a height x width above this many pixels")
    add_flag(p, "dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
             help="compute dtype; auto = float32 on CPU, bfloat16 on TPU/GPU")
    add_flag(p, "clip_skip", type=int, default=None, help="the WebUI's 'Clip skip': use the "
             "text encoder's hidden state N-1 layers before the last (default: the model's "
             "sdjax.json, else 1, the last)")
    add_flag(p, "matmul_precision", default=None, choices=["highest", "high", "default"],
             help="precision of dots and convolutions on TPU/GPU (unset: highest for float32, "
                  "true float32; XLA's default for bfloat16/float16); 'default' gives float32 "
                  "TF32 / bfloat16-pass speed")
    hires_settings.add_arguments(p)
    g = p.add_argument_group("model files", "single-file checkpoints (.safetensors/.ckpt in "
                             "the A1111/CompVis layout) and VAE swaps")
    add_flag(g, "vae", default=None, help="another VAE: a diffusers VAE folder or a single "
             "VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    add_flag(g, "config", default=None, help="single files: a preset (sd15, sd15-inpainting, "
             "sd21, sd21-v, sd2-inpainting, sdxl, sdxl-refiner) or a diffusers folder whose "
             "configs, tokenizer and "
             "scheduler to use; unset, the family is detected from the tensors")
    add_flag(g, "prediction_type", default=None, choices=["epsilon", "v_prediction"],
             help="override the model's; unset, its scheduler config decides (single files: "
                  "a .yaml of the same name beside the file, else the family's)")
    add_flag(g, "ema", action="store_true", help="single files with trained and EMA UNet "
             "weights: load the EMA copy instead of the trained weights (diffusers' choice)")
    a = p.add_argument_group("adapters", "LoRA and textual-inversion files, applied after the "
                             "model loads")
    add_flag(a, "lora", action="append", default=None, metavar="PATH[:SCALE]",
             help="a LoRA .safetensors (kohya/A1111 or diffusers), merged into the weights at "
                  "SCALE (default 1); repeat to stack several")
    add_flag(a, "embedding", action="append", default=None, metavar="PATH",
             help="a textual-inversion embedding (A1111 .pt/.safetensors or diffusers "
                  "learned_embeds); prompts use it by its file name (diffusers files: by the "
                  "token they hold); repeatable")
    add_flag(a, "lora_dir", type=Path, default=None, help="where a prompt's <lora:name:weight> "
             "tags find name.safetensors (here or in a folder below)")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The model-file flags and ``--matmul_precision``, as from_pretrained's keyword arguments
    (hashable, so callers can cache pipelines by them)."""
    config: str | None = None
    vae: str | None = None
    prediction_type: str | None = None
    ema: bool = False
    matmul_precision: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        # Commands without the sampling flags (convert) have no --matmul_precision.
        return cls(args.config, args.vae, args.prediction_type, args.ema,
                   getattr(args, "matmul_precision", None))

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


def parse_size_pair(value: str) -> tuple[int, int]:
    """``H,W`` -> (h, w) for --seed_resize_from."""
    try:
        h, w = (int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (two integers), got {value!r}") from None
    return h, w


def check_noise_args(args: argparse.Namespace) -> None:
    """--subseed, --subseed_strength, --seed_resize_from, --eta_noise_seed_delta."""
    if args.subseed is not None:
        validation.check_seed(args.subseed, "--subseed", allow_random=False)
    strength = validation.check_subseed_strength(args.subseed_strength or 0.0, 1,
                                                 "--subseed_strength")
    if strength.any() and args.subseed is None:
        raise ValueError("--subseed_strength needs a --subseed (the variation seed)")
    if validation.check_seed_resize_from(args.seed_resize_from, 1) is not None:
        validation.check_pixels(*args.seed_resize_from, args.max_pixels)
    if args.eta_noise_seed_delta is not None:
        validation.check_eta_noise_seed_delta(args.eta_noise_seed_delta)


def parse_interval(value: str) -> tuple[float, float]:
    """``LO,HI`` -> (lo, hi) for --guidance_interval (``inf`` allowed for HI)."""
    try:
        lo, hi = (float(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two numbers), got {value!r}") from None
    return lo, hi


# The flags sdjax.json may set, and the pipeline arguments they are.
_SETTING_FLAGS = {"steps": "num_inference_steps", "guidance_scale": "guidance_scale",
                  "guidance_rescale": "guidance_rescale",
                  "guidance_interval": "guidance_interval", "scheduler": "scheduler",
                  "clip_skip": "clip_skip"}


def apply_sampling_defaults(args: argparse.Namespace, pipe) -> str:
    """Fill the sampling flags left unset from the loaded model's sdjax.json (else the
    library's defaults), in place; returns a line saying what the run uses."""
    settings = pipe.sampling_settings(**{key: getattr(args, flag)
                                         for flag, key in _SETTING_FLAGS.items()})
    settings["scheduler"] = settings["scheduler"] or pipe.default_scheduler
    try:
        validation.check_int(settings["num_inference_steps"], "steps", maximum=MAX_STEPS)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for flag, key in _SETTING_FLAGS.items():
        setattr(args, flag, settings[key])
    interval = settings["guidance_interval"]
    return (f"sampling: {settings['scheduler']}, {settings['num_inference_steps']} steps, "
            f"guidance {settings['guidance_scale']:g}"
            + (f" in sigma [{interval[0]:g}, {interval[1]:g}]" if interval else "")
            + (f", rescale {settings['guidance_rescale']:g}"
               if settings["guidance_rescale"] else "")
            + (f", clip skip {settings['clip_skip']}" if (settings["clip_skip"] or 1) > 1 else ""))


def parse_lora(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); a colon not followed by a number is part of the
    path (``C:\\loras\\x.safetensors``)."""
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            return path, validation.check_number(float(tail), f"--lora {value}: SCALE")
        except ValueError as e:
            if "SCALE" in str(e):
                raise UsageError(str(e)) from None
    return value, 1.0


def apply_adapters(args: argparse.Namespace, pipe) -> list[str]:
    """Merge the ``--lora`` files and add the ``--embedding`` tokens to a loaded pipeline;
    returns a line per file for the log. A file that does not fit stops the run (exit 2)."""
    from sdjax.lora_tags import lora_line
    done = []
    for value in args.lora or []:
        path, scale = parse_lora(value)
        done.append(lora_line(pipe.load_lora(path, scale), scale))
    for path in args.embedding or []:
        done.append(f"embedding {pipe.load_textual_inversion(path)}")
    return done


def check_common_args(args: argparse.Namespace, *, allow_random_seed: bool = True) -> None:
    """Validate the flags of :func:`add_common_arguments` before anything loads."""
    from sdjax.schedulers import (
        ALL_SCHEDULER_NAMES,
        SCHEDULE_TYPES,
        check_sampler_options,
        refuse_not_fixed_step,
        webui_sampler_label,
    )

    try:
        if args.steps is not None:
            validation.check_int(args.steps, "--steps", minimum=1, maximum=MAX_STEPS)
        if args.guidance_scale is not None:
            validation.check_number(args.guidance_scale, "--guidance_scale", minimum=0)
        if args.guidance_rescale is not None:
            validation.check_guidance_rescale(args.guidance_rescale, 1, "--guidance_rescale")
        if args.guidance_interval is not None:
            validation.check_guidance_interval(args.guidance_interval, 1,
                                               "--guidance_interval")
        for name in ("batch_size", "num_devices"):
            if getattr(args, name) is not None:
                validation.check_int(getattr(args, name), f"--{name}", minimum=1)
        validation.check_seed(args.seed, "--seed", allow_random=allow_random_seed)
        validation.check_int(args.max_pixels, "--max_pixels", minimum=1)
        for name in ("height", "width"):
            if getattr(args, name) is not None:
                validation.check_int(getattr(args, name), f"--{name}", minimum=1)
        # The model's VAE factor is checked once it has loaded (image_size); the pixel budget
        # now, as far as the flags tell it.
        if args.height is not None and args.width is not None:
            validation.check_pixels(args.height, args.width, args.max_pixels)
        for name in ("height", "width"):
            v = getattr(args, name)
            if v is not None and v * MIN_SIDE > args.max_pixels:
                raise ValueError(f"--{name} {v} is too large: even {MIN_SIDE} pixels the "
                                 f"other way exceed --max_pixels {args.max_pixels}")
        refuse_not_fixed_step(args.scheduler, "--scheduler")
        validation.check_choice(args.scheduler, "--scheduler", ALL_SCHEDULER_NAMES,
                                allow_none=True)
        schedule_type = getattr(args, "schedule_type", None)
        if schedule_type is not None:
            args.schedule_type = validation.check_schedule_type(schedule_type, "--schedule_type",
                                                                SCHEDULE_TYPES)
            if args.scheduler is not None and webui_sampler_label(args.scheduler) is None:
                raise ValueError(f"--schedule_type is for the WebUI's samplers (--scheduler "
                                 f"\"DPM++ 2M\", ...), not --scheduler {args.scheduler}")
        if args.clip_skip is not None:
            validation.check_int(args.clip_skip, "--clip_skip", minimum=1)
        check_noise_args(args)
        check_sampler_options(dict(getattr(args, "sampler_option", None) or ()))
        hires = hires_settings.from_args(args)
        if hires is not None and getattr(args, "refiner", None) is not None:
            raise ValueError("the hires fix does not go with --refiner")
        if hires is not None and hires.scheduler is not None:
            refuse_not_fixed_step(hires.scheduler, "--hires_scheduler")
            validation.check_choice(hires.scheduler, "--hires_scheduler", ALL_SCHEDULER_NAMES)
        if args.lora_dir is not None and not args.lora_dir.expanduser().is_dir():
            raise ValueError(f"--lora_dir folder not found: {args.lora_dir}")
        cli_checks.check_model_flags(args)
        for flag, path, given in ([("--lora", parse_lora(v)[0], v) for v in args.lora or []]
                                  + [("--embedding", v, v) for v in args.embedding or []]):
            cli_checks.check_file_flag(flag, path, given)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def image_size(args: argparse.Namespace, pipe) -> tuple[int, int]:
    """(height, width) of the run: the flags or the model's size, checked against the loaded
    model's VAE factor and ``--max_pixels``."""
    height = args.height or pipe.default_hw[0]
    width = args.width or pipe.default_hw[1]
    try:
        for name, v in (("--height", height), ("--width", width)):
            validation.check_size(v, name, pipe.vae_scale_factor)
        validation.check_pixels(height, width, args.max_pixels)
        hires_settings.check_size(hires_settings.from_args(args), height, width,
                                  pipe.vae_scale_factor, args.max_pixels)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return height, width


def check_outdir(outdir: Path, flag: str = "--outdir") -> None:
    """Fail before the model loads if the results could not be written (nothing is created)."""
    try:
        validation.check_output_folder(outdir, flag)
    except ValueError as e:
        raise UsageError(str(e)) from None


def resolve_dtype(dtype: str) -> str:
    """``auto`` -> float32 on CPU (bfloat16 is slow there), bfloat16 on accelerators."""
    if dtype != "auto":
        return dtype
    import jax
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def report_seed(requested: int, used: int) -> None:
    """The WebUI prints the seed a random request got: it is the one that reproduces."""
    if requested == validation.RANDOM_SEED:
        print(f"seed: {used} (random)", file=sys.stderr)


def run_main(body: Callable[[], int], interrupted: Callable[[], str | None] = lambda: None) -> int:
    """A CLI's body, with the exits every sdjax command shares: bad input (a flag, a file, the
    weights) is one ``error:`` line and status 2, never a traceback; Ctrl-C is status 130 after
    the line ``interrupted()`` gives, if any."""
    from sdjax.weights.errors import WeightsError
    try:
        return body()
    except (UsageError, WeightsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        message = interrupted()
        if message:
            print(message, file=sys.stderr)
        return 130


def prompt_loras(prompts: list[str], lora_dir: Path | None) -> list[tuple[str, dict]]:
    """(text, {LoRA name: multiplier}) per prompt, its ``<lora:…>`` tags taken out; every
    name is looked up in ``lora_dir`` now, before the model loads."""
    from sdjax.lora_tags import find_lora, split_tags
    try:
        split = [split_tags(p) for p in prompts]
        for name in sorted({name for _, tags in split for name in tags}):
            find_lora(name, lora_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return split
