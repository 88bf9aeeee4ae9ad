"""Dataset generation throughput against the sampler's own, on the same settings.

    python -m benchmarks.generate_throughput --model tiny --steps 10 --batch_size 8

Issue 7 asks that ``python -m sdjax.generate`` stay within 10% of the sampler's images/s: the
host's encoding and writing must hide behind the devices' work. One pipeline is loaded and
compiled once; then, in alternating rounds (so drift on a shared machine hits both alike):

  sampler    ``--batches`` calls of ``pipe(...)`` back to back, each waiting for its images
             (what sdjax.sample does per batch): the sampler's own images/s
  generate   ``generate_shards``, the code path of sdjax.generate, making the same number of
             images as webdataset shards (PNG unless --format) in a temporary folder

It prints the median images/s of each and generate / sampler. ``--model`` is a benchmark shape
from benchmarks.models (tiny, mid, sd15, sd21: random weights), ``toy`` or a diffusers folder.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

from benchmarks import report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generate_throughput",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="benchmark shape, 'toy' or diffusers folder")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--num_devices", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=8, help="images per device per call")
    p.add_argument("--batches", type=int, default=16, help="batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--format", default="png", choices=["png", "jpg", "webp"])
    p.add_argument("--samples_per_shard", type=int, default=None,
                   help="default: 4 batches' worth, so shards are published during a round")
    p.add_argument("--encode_threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result record to this file")
    return p.parse_args(argv)


def _folder(model: str) -> str:
    if model == "toy" or os.path.isdir(model):
        return model
    from benchmarks import models  # builds random-weight shapes on first use
    return str(models.ensure_folder(model))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    from sdjax.call_settings import CallSettings, Sampling, Size
    from sdjax.cli_args import resolve_dtype
    from sdjax.dataset.prompts import Row
    from sdjax.dataset.shards import Layout
    from sdjax.dataset.storage import Store
    from sdjax.generate import Settings, generate_shards, plan_samples
    from sdjax.pipeline import StableDiffusionPipeline

    dtype = resolve_dtype(args.dtype)
    pipe = StableDiffusionPipeline.from_pretrained(_folder(args.model), dtype=dtype,
                                                   num_devices=args.num_devices)
    height = args.height or pipe.default_hw[0]
    width = args.width or pipe.default_hw[1]
    batch = args.batch_size * pipe.num_devices
    n = batch * args.batches
    words = ["a photo of a cat", "a red circle", "a painting of a city at night",
             "a blue square on a green background"]
    rows = [Row(f"{words[i % len(words)]}, number {i}") for i in range(n)]
    call = CallSettings(args.model, Sampling(args.steps, pipe.default_scheduler, 7.5),
                        Size(height, width))
    settings = Settings(call, dtype=dtype, seed=0, negative_prompt="", image_format=args.format,
                        quality=None if args.format == "png" else 95)
    layout = Layout(n, 1, args.samples_per_shard or 4 * batch)
    threads = args.encode_threads or min(16, os.cpu_count() or 1)

    def sampler_round() -> float:
        t0 = time.perf_counter()
        for b in range(args.batches):
            chunk = rows[b * batch:(b + 1) * batch]
            pipe([r.prompt for r in chunk], num_inference_steps=args.steps,
                 guidance_scale=7.5, height=height, width=width,
                 scheduler=call.sampling.scheduler, seeds=[0] * batch,
                 image_indices=range(b * batch, (b + 1) * batch),
                 batch_size_per_device=args.batch_size)
        return n / (time.perf_counter() - t0)

    def generate_round() -> float:
        with tempfile.TemporaryDirectory(prefix="sdjax-genbench-") as tmp:
            store = Store(tmp)
            t0 = time.perf_counter()
            generate_shards(pipe, settings, layout,
                            plan_samples(iter(rows), layout, range(layout.num_shards), settings),
                            store, per_device=args.batch_size, encode_threads=threads)
            rate = n / (time.perf_counter() - t0)
            store.close()
        return rate

    t0 = time.perf_counter()
    sampler_round()  # compiles; generate uses the same executable (same static settings)
    compile_s = time.perf_counter() - t0
    sampler, generate = [], []
    for r in range(args.rounds):
        sampler.append(sampler_round())
        generate.append(generate_round())
        print(f"round {r}: sampler {sampler[-1]:.2f} images/s, generate {generate[-1]:.2f} "
              f"images/s", file=sys.stderr)
    s, g = statistics.median(sampler), statistics.median(generate)
    record = {
        "benchmark": "generate_throughput", "command": " ".join(sys.argv),
        "model": args.model, "dtype": dtype, "size": f"{width}x{height}", "steps": args.steps,
        "devices": f"{pipe.num_devices} x {jax.devices()[0].platform}",
        "batch_size_per_device": args.batch_size, "images_per_round": n,
        "format": args.format, "encode_threads": threads, "cpu_count": os.cpu_count(),
        "host": platform.node(), "first_call_seconds": round(compile_s, 2),
        "sampler_images_per_second": round(s, 3), "generate_images_per_second": round(g, 3),
        "generate_over_sampler": round(g / s, 3),
        "rounds": {"sampler": [round(x, 3) for x in sampler],
                   "generate": [round(x, 3) for x in generate]},
    }
    report.emit_json(record, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
