"""Warm start with and without ``background_load``: fresh processes, alternating.

    python -m benchmarks.background_load --model sd15 --dtype bfloat16 --rounds 3

Each round starts one child process per mode on the same compilation cache (filled by a first,
untimed child). A child times from_pretrained, then ``compile`` for one call (a cache hit),
then ``wait_for_weights``: the moment its first call could start running. The call itself is
left out: it is the same in both modes and, on a CPU, long and noisy. Prints every child's
figures and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time


def child(folder: str, dtype: str, size: int, steps: int, cache: str, background: bool) -> None:
    from sdjax import StableDiffusionPipeline
    from sdjax.dispatch import pipeline_class

    t0 = time.perf_counter()
    cls: type[StableDiffusionPipeline] = pipeline_class(folder)
    pipe = cls.from_pretrained(folder, dtype=dtype, num_devices=1, compilation_cache=cache,
                               background_load=background)
    t1 = time.perf_counter()
    pipe.compile(["a photo of a cat"], height=size, width=size, num_inference_steps=steps)
    t2 = time.perf_counter()
    pipe.wait_for_weights()
    t3 = time.perf_counter()
    print(json.dumps({"from_pretrained_s": t1 - t0, "compile_s": t2 - t1,
                      "wait_s": t3 - t2, "ready_s": t3 - t0}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.background_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", help="a benchmarks.models shape or a folder")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=("plain", "background"), help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.folder, a.dtype, a.size, a.steps, a.cache, a.child == "background")
        return

    from pathlib import Path

    from benchmarks.models import NAMES, ensure_folder
    folder = str(ensure_folder(a.model) if a.model in NAMES else Path(a.model))

    def run(mode: str, cache: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "benchmarks.background_load", "--child",
                              mode, "--folder", folder, "--cache", cache, "--dtype", a.dtype,
                              "--size", str(a.size), "--steps", str(a.steps)],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as cache:
        run("plain", cache)  # fills the cache
        rows: dict[str, list[dict]] = {"plain": [], "background": []}
        for _ in range(a.rounds):
            for mode in rows:
                r = run(mode, cache)
                rows[mode].append(r)
                print(mode, " ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    med = {mode: statistics.median(r["ready_s"] for r in rs) for mode, rs in rows.items()}
    print(f"{a.model} {a.dtype} {a.size}x{a.size}: ready after (median of {a.rounds}) "
          f"plain {med['plain']:.2f} s, background {med['background']:.2f} s "
          f"({med['plain'] / med['background']:.2f}x)")


if __name__ == "__main__":
    main()
