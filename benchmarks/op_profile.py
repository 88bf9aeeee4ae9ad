"""Where one UNet evaluation's time goes, by op class, in sdjax and in diffusers.

    python -m benchmarks.op_profile [--model mid8] [--size 512] [--batch 2] [--runs 2]

sdjax: the UNet is compiled as sampling compiles it (``parallel.compiler_options``), run under
``jax.profiler.trace``, and each thunk's time in XLA's trace is charged to the class of the
entry-computation instruction it ran (read from the optimised HLO: a fusion is classed by what
its body holds, convolution before dot before reduce). The attention loops (``lax.map`` in
``layers._attention_cpu``) are the ``while`` instructions. diffusers: ``torch.profiler`` self
CPU time per aten op, classed by name.

Caveats, both measured on jaxlib 0.10.2: thunks XLA:CPU runs concurrently are summed, so the
classes can add up to more than the wall time; and without the YNNPACK hand-off (latent grids up
to 32x32, see parallel.py) XLA's own convolutions and dots run asynchronously and the trace
records only their dispatch: profile those sizes with ``--ynnpack`` to see YNNPACK's split.
torch's self times leave out Python overhead, shown as the gap to its wall time.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CLASSES = ("attention", "convolution", "matmul", "reduction", "copy/concat", "elementwise")

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (?:\(.*?\)|\S+) ([\w\-]+)\((.*)")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", re.S | re.M)


def _body_class(body: str) -> str:
    for op, cls in ((" convolution(", "convolution"), (" dot(", "matmul"),
                    (" reduce(", "reduction")):
        if op in body:
            return cls
    if any(op in body for op in (" copy(", " transpose(", " concatenate(")):
        return "copy/concat"
    return "elementwise"


def classify_hlo(hlo_text: str) -> dict[str, str]:
    """{entry instruction name: op class} for an optimised HLO module's text
    (``compiled.as_text()``)."""
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
    entry = re.search(r"^ENTRY[^\n]*\n(.*?)^\}", hlo_text, re.S | re.M)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    classes = {}
    for line in entry.group(1).splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, op, rest = m.groups()
        if op in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
            continue
        if op == "while":
            classes[name] = "attention"
        elif op == "fusion":
            called = re.search(r"calls=%([\w.\-]+)", rest)
            classes[name] = _body_class(bodies.get(called.group(1), "") if called else "")
        elif op == "convolution":
            classes[name] = "convolution"
        elif op == "dot":
            classes[name] = "matmul"
        elif op in ("reduce", "reduce-window"):
            classes[name] = "reduction"
        elif op in ("copy", "transpose", "concatenate"):
            classes[name] = "copy/concat"
        else:
            classes[name] = "elementwise"
    return classes


def sdjax_profile(fn, args: tuple, runs: int, options: dict | None) -> tuple[dict, float]:
    """({class: ms per run}, median wall ms per run) for ``jax.jit(fn)(*args)``."""
    compiled = jax.jit(fn, compiler_options=options).lower(*args).compile()
    classes = classify_hlo(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    walls = []
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(runs):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                walls.append(time.perf_counter() - t0)
        trace = sorted(Path(d).rglob("*.xplane.pb"))[-1]
        data = jax.profiler.ProfileData.from_file(str(trace))
    ns = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in classes:
                    ns[classes[event.name]] += event.duration_ns
    return ({c: ns[c] / runs / 1e6 for c in CLASSES}, statistics.median(walls) * 1e3)


def torch_class(op: str) -> str | None:
    """The class of an aten op name; None for wrappers whose time is their children's."""
    name = op.removeprefix("aten::")
    if "attention" in name:
        return "attention"
    if "conv" in name:
        return "convolution"
    if name in ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear"):
        return "matmul"
    if "norm" in name or name in ("mean", "sum", "var", "var_mean"):
        return "reduction"
    if name in ("copy_", "cat", "clone", "contiguous", "to", "_to_copy", "empty_like",
                "upsample_nearest2d", "_unsafe_view", "view", "permute", "transpose",
                "reshape", "t", "expand", "slice", "select", "unsqueeze", "as_strided",
                "empty", "empty_strided", "resolve_conj", "resolve_neg", "detach"):
        return "copy/concat"
    return "elementwise"


def torch_profile(fn, runs: int) -> tuple[dict, float]:
    """({class: self CPU ms per run}, median wall ms per run) for ``fn()``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        walls = []
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                walls.append(time.perf_counter() - t0)
    us = collections.Counter()
    for event in prof.key_averages():
        cls = torch_class(event.key)
        if cls is not None:
            us[cls] += event.self_cpu_time_total
    return ({c: us[c] / runs / 1e3 for c in CLASSES}, statistics.median(walls) * 1e3)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.op_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mid8")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--batch", type=int, default=2, help="latents per UNet evaluation")
    p.add_argument("--runs", type=int, default=2, help="profiled evaluations per library")
    p.add_argument("--ynnpack", action="store_true",
                   help="compile with XLA's defaults (YNNPACK on) whatever the size")
    args = p.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks import hardware
    from benchmarks.models import ensure_folder
    from sdjax import parallel
    from sdjax.weights.diffusers_folder import load_network, read_config

    torch.set_num_threads(hardware.cpu_count())
    folder = ensure_folder(args.model)
    cfg = read_config(folder, "unet")
    unet = load_network(folder, "unet", dtype=jnp.float32, place=jnp.asarray, config=cfg)
    side = args.size // 8
    rng = np.random.default_rng(0)
    z = rng.standard_normal((args.batch, side, side, cfg.in_channels), np.float32)
    context = rng.standard_normal((args.batch, 77, cfg.cross_attention_dim), np.float32)
    steps = np.full((args.batch,), 500, np.int32)
    graph, params = nnx.split(unet)

    def run_unet(p, z, s, c):
        return nnx.merge(graph, p)(z, s, c)

    options = None if args.ynnpack else parallel.compiler_options(parallel.make_mesh(1),
                                                                  side * side)
    ours, our_wall = sdjax_profile(run_unet, (params, z, steps, context), args.runs, options)
    tu = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    zt = torch.from_numpy(z).permute(0, 3, 1, 2).contiguous()
    theirs, their_wall = torch_profile(
        lambda: tu(zt, torch.from_numpy(steps), torch.from_numpy(context)), args.runs)

    print(f"{args.model} UNet, {args.size}² ({side}x{side} latents), batch {args.batch}, "
          f"{args.runs} profiled runs each; sdjax options: {options or 'XLA defaults'}")
    print("| op class | sdjax ms | diffusers ms | sdjax / diffusers |\n| --- | --- | --- | --- |")
    for c in CLASSES:
        ratio = f"{ours[c] / theirs[c]:.2f}" if theirs[c] > 0 else "n/a"
        print(f"| {c} | {ours[c]:.1f} | {theirs[c]:.1f} | {ratio} |")
    print(f"| sum of classes | {sum(ours.values()):.1f} | {sum(theirs.values()):.1f} | |")
    print(f"| wall per evaluation (median, under the profiler) | {our_wall:.1f} | "
          f"{their_wall:.1f} | {our_wall / their_wall:.2f} |")


if __name__ == "__main__":
    main()
