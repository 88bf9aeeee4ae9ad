"""python -m sdjax.sample: text-to-image from the command line.

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

# The shared flags live in sdjax.cli_args; these names are re-exported for existing callers.
from sdjax.cli_args import (  # noqa: F401
    ModelOptions,
    Parser,
    UsageError,
    add_common_arguments,
    add_flag,
    apply_adapters,
    check_common_args,
    check_outdir,
    image_size,
    report_seed,
    resolve_dtype,
)

MAX_PROMPTS = 10_000  # beyond this, a dataset job: python -m sdjax.generate
MAX_IMAGES = 10_000   # prompts x --num_images, for the same reason


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m sdjax.sample",
        description="Generate images from text prompts with Stable Diffusion in JAX. "
                    "Every device produces its share of each batch in one compiled call.")
    add_common_arguments(p)
    add_flag(p, "prompt", action="append", default=None, help="a prompt; repeat for several")
    add_flag(p, "prompts_file", type=Path, help="a text file with one prompt per line")
    add_flag(p, "num_images", type=int, default=1, help="images per prompt")
    add_flag(p, "outdir", type=Path, default=Path("outputs"), help="where the PNGs go")
    add_flag(p, "grid", action="store_true", help="also write a grid of all images")
    return p


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

    from sdjax.images import format_parameters, make_grid, next_index, save_png
    from sdjax.parallel import maybe_initialize_distributed, random_seed
    from sdjax.pipeline import StableDiffusionPipeline

    _check_args(args)
    prompts = _prompts(args)
    check_outdir(args.outdir)
    maybe_initialize_distributed()  # before resolve_dtype() asks JAX for its backend
    if args.model == "toy":
        print("Using the bundled toy model (shapes and colours only); pass --model for real "
              "Stable Diffusion weights.", file=sys.stderr)
    dtype = resolve_dtype(args.dtype)

    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=dtype,
                                                   num_devices=args.num_devices,
                                                   **ModelOptions.from_args(args).kwargs())
    if pipe.note:
        print(pipe.note, file=sys.stderr)
    for line in apply_adapters(args, pipe):
        print(line, file=sys.stderr)
    seed = random_seed(args.seed)  # after loading: a multi-host run has started by then
    report_seed(args.seed, seed)
    height, width = image_size(args, pipe)
    scheduler = args.scheduler or pipe.default_scheduler
    jobs = [(p, k) for p in prompts for k in range(args.num_images)]
    per_device = args.batch_size or min(8, -(-len(jobs) // pipe.num_devices))
    batch = per_device * pipe.num_devices

    for p in prompts:
        # verbose=False: transformers' own "sequence length is longer" warning would repeat
        # this one in other words.
        n_tok = len(pipe.tokenizer(p, verbose=False).input_ids)
        if n_tok > pipe.max_prompt_tokens:
            print(f"warning: prompt truncated to {pipe.max_prompt_tokens} tokens: {p[:60]}…",
                  file=sys.stderr)

    t_gen = 0.0
    compile_before = pipe.compile_seconds
    all_images = []
    start = None
    with _StopAfterBatch() as stop:
        for b0 in tqdm(range(0, len(jobs), batch), desc="batches", unit="batch",
                       disable=len(jobs) <= batch):
            if stop.requested:
                break
            chunk = jobs[b0:b0 + batch]
            t0 = time.perf_counter()
            out = pipe([p for p, _ in chunk], negative_prompt=args.negative_prompt,
                       num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                       height=height, width=width, seed=seed, scheduler=scheduler,
                       image_indices=range(b0, b0 + len(chunk)), batch_size_per_device=per_device)
            t_gen += time.perf_counter() - t0
            if jax.process_index() != 0:
                continue  # multi-host: every process holds all images; the first writes them
            if start is None:
                # Made only now, so a run that fails before its first image leaves no folder.
                args.outdir.mkdir(parents=True, exist_ok=True)
                start = next_index(args.outdir)
            for j, ((prompt, _), image) in enumerate(zip(chunk, out.images, strict=True)):
                i = b0 + j
                path = args.outdir / f"{start + i:05d}-{seed}-{i}.png"
                save_png(image, path, format_parameters(
                    prompt=prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                    sampler=scheduler, guidance_scale=args.guidance_scale, seed=seed,
                    index=i, width=width, height=height, model=args.model))
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

    compile_s = pipe.compile_seconds - compile_before
    gen_s = max(t_gen - compile_s, 1e-9)
    print(_wrote(written, args.outdir))
    print(f"devices: {pipe.num_devices} x {jax.devices()[0].platform}, batch {batch} "
          f"({per_device}/device), {dtype}, {scheduler}, {args.steps} steps, {width}x{height}, "
          f"seed {seed}")
    print(f"compile: {compile_s:.1f}s  generation: {gen_s:.2f}s  "
          f"{len(jobs) / gen_s:.2f} images/s")
    return 0


def _wrote(written: list[Path], outdir: Path) -> str:
    if not written:
        return "wrote nothing"
    return (f"wrote {len(written)} file(s) to {outdir}/: {written[0].name}"
            + (f" … {written[-1].name}" if len(written) > 1 else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sdjax.weights.errors import WeightsError
    written: list[Path] = []
    try:
        return run(args, written)
    except (UsageError, WeightsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {_wrote(written, args.outdir)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
