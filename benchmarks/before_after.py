"""The same sdjax call timed in two source trees, in fresh processes that alternate, so a
refactor's speed is measured against the code it replaces on the same machine in one run.

    git worktree add /tmp/before <commit>
    python -m benchmarks.before_after --trees /tmp/before . --shape mid --size 256

Each process loads the ``--shape`` model (``benchmarks.models``), compiles and runs one call,
then times ``--repeats`` calls; the lines give each run's median seconds per call, and the
last line the ratio of the trees' medians over all their runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _time_here(shape: str, size: int, steps: int, repeats: int) -> dict:
    """In the child: the call's steady-state seconds, the tree at the working directory."""
    import sdjax
    from benchmarks.models import ensure_folder
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(str(ensure_folder(shape)),
                                                         dtype="float32", num_devices=1)
    kw = dict(num_inference_steps=steps, height=size, width=size, seed=0, scheduler="euler")
    t0 = time.perf_counter()
    pipe("a photo", **kw)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe("a photo", **kw)
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "times_s": times, "sdjax": sdjax.__file__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trees", nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    p.add_argument("--shape", default="mid")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if a.child:
        sys.path.insert(0, os.getcwd())
        print(json.dumps(_time_here(a.shape, a.size, a.steps, a.repeats)))
        return 0
    env = {**os.environ, "SDJAX_COMPILATION_CACHE": "off", "JAX_PLATFORMS": "cpu"}
    medians: dict[str, list[float]] = {tree: [] for tree in a.trees}
    for _ in range(a.rounds):
        for tree in a.trees:
            # The child runs in the tree, which it puts first on sys.path: it imports that
            # tree's sdjax (and its benchmarks.models).
            out = subprocess.run([sys.executable, __file__, *argv, "--child"],
                                 cwd=Path(tree).resolve(), env=env, capture_output=True,
                                 text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            median = statistics.median(r["times_s"])
            medians[tree].append(median)
            print(f"{tree}: {a.shape} {a.size}² {a.steps} steps, first call {r['first_s']:.2f} s, "
                  f"median {median:.3f} s/call ({' '.join(f'{t:.3f}' for t in r['times_s'])}); "
                  f"{r['sdjax']}")
    before, after = (statistics.median(medians[t]) for t in a.trees)
    print(f"after / before: {after / before:.3f} (medians {after:.3f} / {before:.3f} s/call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
