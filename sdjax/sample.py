"""python -m sdjax.sample: text-to-image, img2img (--image), inpainting (--image --mask) and
x4 upscaling (an upscaler --model with --image) from the command line.

Writes one PNG per image (with A1111-style ``parameters`` metadata) to --outdir and reports
compile time, generation time and images/s. Bad input gets one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from sdjax.cli_args import (
    ModelOptions,
    Parser,
    UsageError,
    add_common_arguments,
    add_flag,
    apply_adapters,
    apply_sampling_defaults,
    check_common_args,
    check_outdir,
    image_size,
    prompt_loras,
    report_seed,
    resolve_dtype,
    run_main,
)
from sdjax.controlnet import cli as controlnet_cli
from sdjax.sdxl_cli import (
    add_sdxl_arguments,
    check_sdxl_args,
    check_sdxl_models,
    load_refiner,
    with_refiner,
)

MAX_PROMPTS = 10_000  # beyond this, a dataset job: python -m sdjax.generate
MAX_IMAGES = 10_000   # prompts x --num_images, for the same reason


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m sdjax.sample",
        description="Generate images from text prompts with Stable Diffusion in JAX. "
                    "Every device produces its share of each batch in one compiled call. "
                    "Unset sampling flags take the model's sdjax.json, else the pipeline's "
                    "defaults: 50 steps and guidance 7.5, 75 and 9 for x4 upscaler models.")
    add_common_arguments(p)
    add_flag(p, "prompt", action="append", default=None, help="a prompt; repeat for several")
    add_flag(p, "prompts_file", type=Path, help="a text file with one prompt per line")
    add_flag(p, "num_images", type=int, default=1, help="images per prompt")
    add_flag(p, "outdir", type=Path, default=Path("outputs"), help="where the PNGs go")
    add_flag(p, "grid", action="store_true", help="also write a grid of all images")
    add_flag(p, "from_png", type=Path, help="make the image a WebUI (or sdjax) PNG's "
             "'parameters' text names: its prompt, seed, sampler, size, hires fix, ...; the "
             "flags given here win, and what cannot be honoured is said, one line each")
    add_image_arguments(p)
    add_sdxl_arguments(p)
    controlnet_cli.add_arguments(p, add_flag)
    return p


# sdjax.tasks.MASKED_CONTENT with underscores (spelled out here: --help imports no JAX).
MASKED_CONTENT_FLAGS = ("fill", "original", "latent_noise", "latent_nothing")


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    """img2img, inpainting and upscaling flags, and the output check."""
    add_flag(p, "image", type=Path, help="init image: img2img, inpainting with --mask, or the "
             "low-resolution input of an upscaler model")
    add_flag(p, "mask", type=Path, help="inpainting mask, the size of --image (white = repaint)")
    add_flag(p, "strength", type=float, help="share of the schedule that runs from the image, "
             "in (0, 1] (default: 0.8 for img2img, 1.0 for inpainting)")
    add_flag(p, "mask_blur", type=float, default=None, help="inpainting: blur the mask edge by "
             "this many pixels (default: 0)")
    add_flag(p, "only_masked_padding", type=int, help="inpainting: generate only the mask's "
             "bounding box plus this many pixels at full size and paste it back (the WebUI's "
             "'only masked')")
    add_flag(p, "masked_content", choices=MASKED_CONTENT_FLAGS, help="inpainting: what the "
             "masked region starts from, the WebUI's 'Masked content' (default: original)")
    add_flag(p, "noise_level", type=int, default=None, help="upscaler models: noise added to "
             "the low-resolution input (default: 20)")
    add_flag(p, "no_nan_check", action="store_true", help="keep images whose latents or pixels "
             "hold NaN/inf instead of failing")


def _prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --prompts_file: {e}") from None
        from_file = [line.strip() for line in text.splitlines() if line.strip()]
        if not from_file:
            raise UsageError(f"--prompts_file {args.prompts_file} has no prompts (it is empty "
                             "or blank)")
        prompts += from_file
    if not prompts:
        if args.model != "toy":
            raise UsageError("give at least one --prompt or a --prompts_file")
        prompts = ["a red circle on a blue background"]
    if len(prompts) > MAX_PROMPTS:
        raise UsageError(f"{len(prompts)} prompts is more than sdjax.sample takes "
                         f"({MAX_PROMPTS}); use python -m sdjax.generate for datasets")
    if len(prompts) * args.num_images > MAX_IMAGES:
        raise UsageError(f"{len(prompts)} prompt(s) x --num_images {args.num_images} is more "
                         f"images than sdjax.sample makes ({MAX_IMAGES}); use python -m "
                         "sdjax.generate for datasets")
    return prompts


def _check_args(args) -> None:
    check_common_args(args)
    if args.num_images < 1:
        raise UsageError(f"--num_images must be at least 1, got {args.num_images}")
    if args.image is None:
        for flag in ("mask", "strength", "only_masked_padding", "masked_content"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} needs an --image")
    elif args.mask is None:
        for flag in ("only_masked_padding", "masked_content"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} needs a --mask")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    if args.mask is None and args.mask_blur is not None:
        raise UsageError("--mask_blur needs a --mask (it blurs the inpainting mask's edge)")
    for flag in ("mask_blur", "only_masked_padding", "noise_level"):
        if (getattr(args, flag) or 0) < 0:
            raise UsageError(f"--{flag} must not be negative, got {getattr(args, flag)}")
    check_sdxl_args(args)
    controlnet_cli.check(args, UsageError)
    if args.image is not None and (args.hires_scale is not None
                                   or args.hires_size is not None):
        raise UsageError("the hires fix (--hires_scale, --hires_size) is text-to-image's: "
                         "leave --image out")


def _open_image(path: Path, flag: str):
    """A PIL image read whole now (so a broken file fails before the model loads)."""
    from PIL import Image, UnidentifiedImageError
    if not path.is_file():
        raise UsageError(f"--{flag} {path}: "
                         + ("is a folder; give an image file" if path.is_dir()
                            else "file not found"))
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"--{flag} {path}: not a readable image ({e})") from None


def _load_images(args):
    """(init image as RGB, mask or None), refused or converted (and said so) before loading."""
    if args.image is None:
        return None, None
    image = _open_image(args.image, "image")
    if image.mode != "RGB":
        print(f"note: --image {args.image} is {image.mode}; converted to RGB", file=sys.stderr)
        image = image.convert("RGB")
    mask = None
    if args.mask is not None:
        mask = _open_image(args.mask, "mask")
        if mask.size != image.size:
            raise UsageError(f"--mask is {mask.size[0]}x{mask.size[1]} but --image is "
                             f"{image.size[0]}x{image.size[1]}")
    return image, mask


class _StopAfterBatch:
    """Ctrl-C during generation: the first finishes and writes the batch in hand, then the
    run stops; a second one stops at once. The flag is ours, so a library that catches
    KeyboardInterrupt in a callback cannot swallow the request."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopAfterBatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this batch (Ctrl-C again to stop now)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run(args, written: list[Path]) -> int:
    """The run; ``written`` collects the files as they appear, so an interruption can say
    what is there."""
    import jax
    import numpy as np
    from tqdm import tqdm

    from sdjax.call_settings import CallSettings
    from sdjax.dispatch import pipeline_class
    from sdjax.handoff import check_schedule, refine
    from sdjax.images import make_grid, next_index, save_png
    from sdjax.parallel import maybe_initialize_distributed, random_seed

    _check_args(args)
    prompts = _prompts(args)
    check_outdir(args.outdir)
    maybe_initialize_distributed()  # before resolve_dtype() asks JAX for its backend
    image, mask = _load_images(args)
    control = controlnet_cli.load_images(args, _open_image)
    split = dict(zip(prompts, prompt_loras(prompts, args.lora_dir), strict=True))
    cls = pipeline_class(args.model)
    upscaler = cls.UPSCALER
    if upscaler:
        if image is None:
            raise UsageError("an upscaler model needs --image (the low-resolution input)")
        for flag in ("mask", "strength", "height", "width", "only_masked_padding",
                     "masked_content", "hires_scale", "hires_size"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag} does not apply to an upscaler model")
    check_sdxl_models(args, cls.SDXL)  # the refiner's files are found before the base loads
    if args.model == "toy":
        print("Using the bundled toy model (shapes and colours only); pass --model for real "
              "Stable Diffusion weights.", file=sys.stderr)
    dtype = resolve_dtype(args.dtype)
    # The tensors load while the first batch compiles (or comes out of the compile cache).
    pipe = cls.from_pretrained(args.model, dtype=dtype, num_devices=args.num_devices,
                               background_load=True, **ModelOptions.from_args(args).kwargs(),
                               controlnet=[path for path, _ in args.controlnet or []] or None)
    if pipe.note:
        print(pipe.note, file=sys.stderr)
    refiner = load_refiner(args, pipe, dtype, background_load=True)
    for line in apply_adapters(args, pipe):
        print(line, file=sys.stderr)
    sampling = apply_sampling_defaults(args, pipe)
    from sdjax.adapter_text import Adapters
    from sdjax.lora_tags import TagLoras, group_by_tags
    tag_loras = TagLoras(pipe, args.lora_dir, say=lambda line: print(line, file=sys.stderr))
    seed = random_seed(args.seed)  # after loading: a multi-host run has started by then
    report_seed(args.seed, seed)
    controlnet_cli.default_size(args, control, pipe.vae_scale_factor)
    size, task = _task_settings(args, pipe, image, mask, upscaler)
    settings = CallSettings.from_args(args, size, task)
    if refiner is not None:
        check_schedule(pipe, refiner, args.scheduler, args.steps, args.refiner_switch_at)
    print(sampling, file=sys.stderr)  # once the run's settings have all passed their checks
    height, width, scheduler = size.height, size.width, args.scheduler
    jobs = [(p, k) for p in prompts for k in range(args.num_images)]
    per_device = args.batch_size or min(8, -(-len(jobs) // pipe.num_devices))
    batch = per_device * pipe.num_devices
    # One LoRA set per compiled call: prompts with different <lora:…> tags go in different
    # batches (image i still uses the noise of (seed, i), so grouping changes no image).
    groups = group_by_tags(split[p][1] for p, _ in jobs)
    batches = [idx[b:b + batch] for idx in groups.values() for b in range(0, len(idx), batch)]
    images = {} if image is None else {
        "image": image, **({} if mask is None else {"mask_image": mask})}
    for key in groups:  # every tag's LoRA is checked against the model before any image
        tag_loras.use(dict(key))  # (and said, as --lora says its own)
    adapters = Adapters.of(pipe, args.lora_dir, fixed=tag_loras.fixed)

    t_gen = 0.0
    compile_before = with_refiner("compile_seconds", pipe, refiner)
    wait_before = with_refiner("weights_wait_seconds", pipe, refiner)
    all_images = []
    start = None
    with _StopAfterBatch() as stop:
        for idx in tqdm(batches, desc="batches", unit="batch", disable=len(batches) <= 1):
            if stop.requested:
                break
            chunk = [jobs[i] for i in idx]
            t0 = time.perf_counter()
            tag_loras.use(split[chunk[0][0]][1])
            call = dict(negative_prompt=args.negative_prompt, seed=seed, image_indices=idx,
                        batch_size_per_device=per_device, nan_check=not args.no_nan_check,
                        **settings.pipeline_kwargs(), **images,
                        **controlnet_cli.call_kwargs(args, control))
            texts = [split[p][0] for p, _ in chunk]
            out = pipe(texts, **call) if refiner is None else refine(pipe, refiner, texts,
                                                                     **call)
            t_gen += time.perf_counter() - t0
            if jax.process_index() != 0:
                continue  # multi-host: every process holds all images; the first writes them
            if start is None:
                # Made only now, so a run that fails before its first image leaves no folder.
                args.outdir.mkdir(parents=True, exist_ok=True)
                start = next_index(args.outdir)
            for i, (prompt, _), pixels in zip(idx, chunk, out.images, strict=True):
                path = args.outdir / f"{start + i:05d}-{seed}-{i}.png"
                text = settings.parameters(prompt, args.negative_prompt, seed, index=i,
                                           adapters=adapters)
                save_png(pixels, path, text)
                written.append(path)
            if args.grid:
                all_images.append(out.images)
    if jax.process_index() != 0:
        return 130 if stop.requested else 0
    if stop.requested:
        print(f"interrupted: {_wrote(written, args.outdir)}; {len(jobs) - len(written)} of "
              f"{len(jobs)} image(s) not made", file=sys.stderr)
        return 130
    if args.grid:
        grid_path = args.outdir / f"{start:05d}-grid.png"
        save_png(make_grid(np.concatenate(all_images)), grid_path, f"grid of {len(jobs)}")
        written.append(grid_path)

    compile_s = with_refiner("compile_seconds", pipe, refiner) - compile_before
    # The first batch also waited for whatever of the load its compile did not cover.
    load_s = with_refiner("weights_wait_seconds", pipe, refiner) - wait_before
    gen_s = max(t_gen - compile_s - load_s, 1e-9)
    print(_wrote(written, args.outdir))
    print(f"devices: {pipe.num_devices} x {jax.devices()[0].platform}, batch {batch} "
          f"({per_device}/device), {dtype}, {scheduler}, {args.steps} steps, guidance "
          f"{args.guidance_scale:g}, {width}x{height}, seed {seed}")
    waited = f"rest of the load: {load_s:.1f}s  " if load_s >= 0.05 else ""
    print(f"compile: {compile_s:.1f}s  {waited}generation: {gen_s:.2f}s  "
          f"{len(jobs) / gen_s:.2f} images/s")
    return 0


def _wrote(written: list[Path], outdir: Path) -> str:
    if not written:
        return "wrote nothing"
    return (f"wrote {len(written)} file(s) to {outdir}/: {written[0].name}"
            + (f" … {written[-1].name}" if len(written) > 1 else ""))


def _task_settings(args, pipe, image, mask, upscaler: bool):
    """(the output's Size, the image task's settings or None); the size of what will be made
    is checked against the model and --max_pixels before compiling."""
    from sdjax import validation
    from sdjax.call_settings import Img2Img, Inpainting, Size, Upscaling
    from sdjax.schedulers.common import start_index
    f = pipe.vae_scale_factor
    if args.noise_level is not None and not upscaler:
        raise UsageError(f"--noise_level applies to x4 upscaler models; {args.model} is not one")
    if image is None:
        return Size(*image_size(args, pipe)), None
    w, h = image.size
    fit_h, fit_w = validation.round_size(h, w, f)
    if upscaler:
        if args.noise_level is None:
            from sdjax.upscale import DEFAULT_NOISE_LEVEL
            args.noise_level = DEFAULT_NOISE_LEVEL
        if not 0 <= args.noise_level <= pipe.max_noise_level:
            raise UsageError(f"--noise_level must be an integer in [0, {pipe.max_noise_level}] "
                             f"for this model, got {args.noise_level}")
        if (fit_h, fit_w) != (h, w):
            print(f"note: --image {w}x{h} is cut down to {fit_w}x{fit_h}, a multiple of {f}",
                  file=sys.stderr)
        height, width = fit_h * f, fit_w * f  # the x4 upscaler's factor is its VAE's
        task = Upscaling(args.noise_level)
    else:
        height, width = args.height or fit_h, args.width or fit_w
        if (height, width) != (h, w):
            print(f"note: --image {w}x{h} is resized to {width}x{height} (a multiple of {f})",
                  file=sys.stderr)
        strength = (args.strength if args.strength is not None
                    else validation.default_strength(inpainting=mask is not None))
        start_index(args.steps, strength)  # refuses a strength that leaves no step, now
        task = Img2Img(strength) if mask is None else Inpainting(
            strength, args.mask_blur or 0, args.only_masked_padding,
            (args.masked_content or "original").replace("_", " "))
    try:
        for name, v in (("height", height), ("width", width)):
            validation.check_size(v, f"output {name}", f)
        validation.check_pixels(height, width, args.max_pixels)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Size(height, width), task


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    written: list[Path] = []

    def body() -> int:
        if args.from_png is not None:
            from sdjax.from_png import use
            use(args, parser, argv)
        return run(args, written)

    return run_main(body,
                    lambda: f"interrupted: {_wrote(written, args.outdir)}")


if __name__ == "__main__":
    sys.exit(main())
