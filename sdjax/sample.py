"""python -m sdjax.sample: text-to-image from the command line.

Writes one PNG per image (with A1111-style ``parameters`` metadata) to --outdir and reports
compile time, generation time and images/s. Bad input gets one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

MAX_PROMPTS = 10_000  # beyond this, a dataset job: python -m sdjax.generate


def add_flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """``--name`` with a hyphenated alias (``--num-devices``) when the name has underscores."""
    p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []),
                   **kw)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The model, sampling and device flags that sdjax.sample and sdjax.generate share."""
    add_flag(p, "model", default="toy", help="'toy' (the small bundled demo model), a diffusers "
             "folder, a single .safetensors/.ckpt checkpoint (A1111 layout), or a Hugging Face "
             "hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5")
    add_flag(p, "negative_prompt", default="", help="what the images should not show")
    add_flag(p, "num_devices", type=int, default=None, help="devices to use (default: all)")
    add_flag(p, "batch_size", type=int, default=None,
             help="images per device per compiled call (default: just enough for one call, at "
                  "most 8)")
    add_flag(p, "steps", type=int, default=50, help="denoising steps")
    add_flag(p, "guidance_scale", type=float, default=7.5, help="classifier-free guidance scale")
    add_flag(p, "scheduler", default=None, help="pndm, ddim, ddpm, lms, euler, euler_a, heun, "
             "dpmpp_2m, dpmpp_2m_karras (default: the model's own)")
    add_flag(p, "seed", type=int, default=0, help="image i of the run uses noise from (seed, i)")
    add_flag(p, "height", type=int, default=None, help="pixels, a multiple of the VAE factor "
             "(default: the model's size)")
    add_flag(p, "width", type=int, default=None, help="pixels (default: the model's size)")
    add_flag(p, "dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
             help="compute dtype; auto = float32 on CPU, bfloat16 on TPU/GPU")
    g = p.add_argument_group("model files", "single-file checkpoints (.safetensors/.ckpt in "
                             "the A1111/CompVis layout) and VAE swaps")
    add_flag(g, "vae", default=None, help="another VAE: a diffusers VAE folder or a single "
             "VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    add_flag(g, "config", default=None, help="single files: a preset (sd15, sd15-inpainting, "
             "sd21, sd21-v, sd2-inpainting) or a diffusers folder whose configs, tokenizer and "
             "scheduler to use; unset, the family is detected from the tensors")
    add_flag(g, "prediction_type", default=None, choices=["epsilon", "v_prediction"],
             help="override the model's; unset, its scheduler config decides (single files: "
                  "a .yaml of the same name beside the file, else the family's)")
    add_flag(g, "ema", action="store_true", help="single files with trained and EMA UNet "
             "weights: load the EMA copy instead of the trained weights (diffusers' choice)")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The model-file flags, as from_pretrained's keyword arguments (hashable, so callers can
    cache pipelines by them)."""
    config: str | None = None
    vae: str | None = None
    prediction_type: str | None = None
    ema: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        return cls(args.config, args.vae, args.prediction_type, args.ema)

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sdjax.sample",
        description="Generate images from text prompts with Stable Diffusion in JAX. "
                    "Every device produces its share of each batch in one compiled call.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(p)
    add_flag(p, "prompt", action="append", default=None, help="a prompt; repeat for several")
    add_flag(p, "prompts_file", type=Path, help="a text file with one prompt per line")
    add_flag(p, "num_images", type=int, default=1, help="images per prompt")
    add_flag(p, "outdir", type=Path, default=Path("outputs"), help="where the PNGs go")
    add_flag(p, "grid", action="store_true", help="also write a grid of all images")
    return p


class UsageError(Exception):
    pass


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --prompts_file: {e}") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        if args.model != "toy":
            raise UsageError("give at least one --prompt or a --prompts_file")
        prompts = ["a red circle on a blue background"]
    if len(prompts) > MAX_PROMPTS:
        raise UsageError(f"{len(prompts)} prompts is more than sdjax.sample takes "
                         f"({MAX_PROMPTS}); use python -m sdjax.generate for datasets")
    return prompts


def check_common_args(args: argparse.Namespace) -> None:
    """Validate the flags of :func:`add_common_arguments` before anything loads."""
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance_scale < 0:
        raise UsageError(f"--guidance_scale must not be negative, got {args.guidance_scale}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch_size must be at least 1")
    if args.num_devices is not None and args.num_devices < 1:
        raise UsageError("--num_devices must be at least 1")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v < 8:
            raise UsageError(f"--{name} must be a positive multiple of 8, got {v}")
    if args.scheduler is not None:
        from sdjax.schedulers import SCHEDULER_NAMES
        if args.scheduler not in SCHEDULER_NAMES:
            raise UsageError(f"unknown --scheduler {args.scheduler!r}; choose one of "
                             f"{', '.join(SCHEDULER_NAMES)}")


def resolve_dtype(dtype: str) -> str:
    """``auto`` -> float32 on CPU (bfloat16 is slow there), bfloat16 on accelerators."""
    if dtype != "auto":
        return dtype
    import jax
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _check_args(args) -> None:
    check_common_args(args)
    if args.num_images < 1:
        raise UsageError(f"--num_images must be at least 1, got {args.num_images}")


def check_outdir(outdir: Path) -> None:
    """Fail before the model loads if the results could not be written."""
    existing = outdir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--outdir {outdir}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        raise UsageError(f"--outdir {outdir} is not writable") from None


def run(args) -> int:
    import jax
    import numpy as np
    from tqdm import tqdm

    from sdjax.images import format_parameters, make_grid, next_index, save_png
    from sdjax.pipeline import StableDiffusionPipeline

    _check_args(args)
    prompts = _prompts(args)
    check_outdir(args.outdir)
    if args.model == "toy":
        print("Using the bundled toy model (shapes and colours only); pass --model for real "
              "Stable Diffusion weights.", file=sys.stderr)
    dtype = resolve_dtype(args.dtype)

    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=dtype,
                                                   num_devices=args.num_devices,
                                                   **ModelOptions.from_args(args).kwargs())
    if pipe.note:
        print(pipe.note, file=sys.stderr)
    height = args.height or pipe.default_hw[0]
    width = args.width or pipe.default_hw[1]
    pipe.check_size(height, width)
    scheduler = args.scheduler or pipe.default_scheduler
    jobs = [(p, k) for p in prompts for k in range(args.num_images)]
    per_device = args.batch_size or min(8, -(-len(jobs) // pipe.num_devices))
    batch = per_device * pipe.num_devices

    for p in prompts:
        n_tok = len(pipe.tokenizer(p).input_ids)
        if n_tok > pipe.max_prompt_tokens:
            print(f"warning: prompt truncated to {pipe.max_prompt_tokens} tokens: {p[:60]}…",
                  file=sys.stderr)

    args.outdir.mkdir(parents=True, exist_ok=True)
    start = next_index(args.outdir)
    written = []
    t_gen = 0.0
    compile_before = pipe.compile_seconds
    all_images = []
    for b0 in tqdm(range(0, len(jobs), batch), desc="batches", unit="batch",
                   disable=len(jobs) <= batch):
        chunk = jobs[b0:b0 + batch]
        t0 = time.perf_counter()
        out = pipe([p for p, _ in chunk], negative_prompt=args.negative_prompt,
                   num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                   height=height, width=width, seed=args.seed, scheduler=scheduler,
                   image_indices=range(b0, b0 + len(chunk)), batch_size_per_device=per_device)
        t_gen += time.perf_counter() - t0
        if jax.process_index() != 0:
            continue  # multi-host: every process holds all images; the first writes them
        for j, ((prompt, _), image) in enumerate(zip(chunk, out.images, strict=True)):
            i = b0 + j
            path = args.outdir / f"{start + i:05d}-{args.seed}-{i}.png"
            save_png(image, path, format_parameters(
                prompt=prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                sampler=scheduler, guidance_scale=args.guidance_scale, seed=args.seed,
                index=i, width=width, height=height, model=args.model))
            written.append(path)
        if args.grid:
            all_images.append(out.images)
    if args.grid:
        grid_path = args.outdir / f"{start:05d}-grid.png"
        save_png(make_grid(np.concatenate(all_images)), grid_path, f"grid of {len(jobs)}")
        written.append(grid_path)

    if jax.process_index() != 0:
        return 0
    compile_s = pipe.compile_seconds - compile_before
    gen_s = max(t_gen - compile_s, 1e-9)
    print(f"wrote {len(written)} file(s) to {args.outdir}/: {written[0].name}"
          + (f" … {written[-1].name}" if len(written) > 1 else ""))
    print(f"devices: {pipe.num_devices} x {jax.devices()[0].platform}, batch {batch} "
          f"({per_device}/device), {dtype}, {scheduler}, {args.steps} steps, {width}x{height}")
    print(f"compile: {compile_s:.1f}s  generation: {gen_s:.2f}s  "
          f"{len(jobs) / gen_s:.2f} images/s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sdjax.weights.errors import WeightsError
    try:
        return run(args)
    except (UsageError, WeightsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
