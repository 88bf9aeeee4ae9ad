"""Throughput of the whole sampling call, against the hardware and against diffusers.

    python -m benchmarks.throughput --model mid --steps 10 --batch 1

One run measures, for one model shape / dtype / size / steps / batch / device count: the cold
compile, the warm start of a fresh process through the persistent compilation cache, the
steady-state seconds per batch (median), images/s and UNet steps/s, FLOPs per image counted
from the traced networks (the same on every backend) and the MFU against ``--peak_tflops``,
device memory and the largest batch per
device that fits (GPU/TPU), and the same workload in diffusers with the ratio. It prints every
field and appends a row to benchmarks/RESULTS.md. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import models
from sdjax.runtime import resolve_matmul_precision

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# Environment that changes what XLA or the libraries do; recorded with the command.
_ENV_PREFIXES = ("XLA_", "JAX_", "SDJAX_", "OMP_", "MKL_", "TF_CPP_")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny",
                   help=f"a shape ({', '.join(models.NAMES)}; random weights but toy) or a "
                        "diffusers folder")
    p.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | float16 (default: float32 on CPU, else bfloat16)")
    p.add_argument("--size", type=int, default=None, help="height and width in pixels")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default=None, help="default: the model's own")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--batch", type=int, default=1, help="images per call over all devices")
    p.add_argument("--controlnet", nargs="?", const="random", default=None,
                   help="txt2img through a ControlNet: a ControlNet folder, 'toy-edges', or "
                        "with no value a random one made from the model's UNet (diffusers' "
                        "from_unet, every weight randomized); diffusers runs its "
                        "StableDiffusionControlNetPipeline")
    p.add_argument("--num_devices", type=int, default=None, help="default: all")
    p.add_argument("--repeats", type=int, default=5, help="timed warm calls (median)")
    p.add_argument("--compare", choices=["diffusers", "none"], default="diffusers")
    p.add_argument("--diffusers_dtype", default=None,
                   help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the cores this process may use, which is "
                        "also the size of XLA:CPU's pool)")
    p.add_argument("--warm_start", action=argparse.BooleanOptionalAction, default=True,
                   help="time a fresh process through the compilation cache")
    p.add_argument("--max_batch", action=argparse.BooleanOptionalAction, default=True,
                   help="search the largest batch per device that fits (GPU/TPU only)")
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                   help="count the networks' FLOPs (traced only, no compile) for MFU")
    p.add_argument("--matmul_precision", choices=["default", "high", "highest"], default=None,
                   help="sdjax's matmul_precision (default: highest for float32); "
                        "diffusers float32 on CUDA gets TF32 unless it is highest")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="device peak for MFU (default: known GPUs/TPUs in half precision, "
                        "known GPUs in float32)")
    p.add_argument("--compilation_cache", default=None,
                   help="cache dir (default: a fresh temporary one, so the compile is cold)")
    p.add_argument("--models_dir", type=Path, default=None,
                   help="where random-weight shapes are written (default ~/.cache/sdjax/...)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                   help="append a row to --results")
    p.add_argument("--note", default="", help="free text for the RESULTS.md row")
    p.add_argument("--json", type=Path, default=None, help="also write the fields here")
    return p.parse_args(argv)


def command_line(argv: list[str]) -> str:
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
           if k.startswith(_ENV_PREFIXES) and k != "XLA_PYTHON_CLIENT_PREALLOCATE"]
    return " ".join(env + ["python -m benchmarks.throughput", *map(shlex.quote, argv)])


def _child(module: str, args: list[str]) -> dict:
    """Run ``python -m module args`` and return the JSON of its last output line."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode:
        raise RuntimeError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    # Children (warm start, diffusers) run while this process still holds its buffers; on a
    # GPU, JAX's default 75% preallocation would starve them.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import jax
    import numpy as np

    from benchmarks import hardware, report, sdjax_bench
    from benchmarks.workload import Workload

    folder = (models.ensure_folder(a.model, a.models_dir) if a.model in models.NAMES
              else Path(a.model))
    cpu = jax.default_backend() == "cpu"
    dtype = a.dtype or ("float32" if cpu else "bfloat16")
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    sample = unet_cfg.get("sample_size") or 64
    default = sample * 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    height = a.height or a.size or default
    width = a.width or a.size or default
    controlnet = None
    if a.controlnet == "random":
        controlnet = str(models.ensure_controlnet(folder, a.models_dir))
    elif a.controlnet is not None:
        from sdjax.weights.controlnet_files import resolve
        controlnet = str(resolve(a.controlnet))
    w = Workload(folder=str(folder), dtype=dtype, height=height, width=width, steps=a.steps,
                 batch=a.batch, num_devices=a.num_devices, scheduler=a.scheduler,
                 guidance=a.guidance_scale, matmul_precision=a.matmul_precision,
                 controlnet=controlnet)

    with tempfile.TemporaryDirectory(prefix="sdjax-bench-") as tmp:
        cache = a.compilation_cache or os.path.join(tmp, "jax_cache")
        res = sdjax_bench.run(w, cache_dir=cache, repeats=a.repeats,
                              search_max_batch=a.max_batch and not cpu, flops=a.flops)
        scheduler = a.scheduler or "model default"
        devices = len(jax.devices()) if a.num_devices is None else a.num_devices

        warm = None
        if a.warm_start:
            warm = _child("benchmarks.warm_start", ["--workload", w.to_json(), "--cache", cache])
        ref = None
        if a.compare == "diffusers":
            pixels = os.path.join(tmp, "diffusers.npy")
            extra = ["--dtype", a.diffusers_dtype] if a.diffusers_dtype else []
            ref = _child("benchmarks.diffusers_bench",
                         ["--workload", w.to_json(), "--repeats", str(a.repeats), "--threads",
                          str(a.threads or hardware.cpu_count()), "--out", pixels, *extra])
            ref["max_pixel_diff"] = float(np.abs(np.load(pixels) - res.images).max())

    s = res.s_per_batch
    total = res.flops.get("total")
    per_image = total / res.per_device_batch if total else None
    achieved = total / s / 1e12 if total else None  # per device: each runs its own shard
    peak = a.peak_tflops or hardware.default_peak_tflops(dtype, full_float32=w.full_float32)
    fields = {
        "model": a.model, "controlnet": a.controlnet, "device": hardware.device_kind(),
        "devices": devices,
        "xla_cpu_threads": hardware.cpu_count() if cpu else None,
        "load_avg": hardware.load_average(), "dtype": dtype,
        "matmul_precision": resolve_matmul_precision(a.matmul_precision, dtype) or "default",
        "size": f"{width}x{height}",
        "steps": a.steps, "scheduler": scheduler, "unet_evaluations": res.unet_evaluations,
        "batch": a.batch, "per_device_batch": res.per_device_batch, "load_s": res.load_s,
        "cold_compile_s": res.cold_compile_s,
        "warm_start_s": None if warm is None else warm["done_at"] - warm["started_at"],
        "warm_start_detail": None if warm is None else (
            f"imports {warm['import_s']:.2f} s, configs and shapes {warm['open_s']:.2f} s, "
            f"compile (cache) while the tensors load {warm['compile_s']:.2f} s, rest of the "
            f"load {warm['load_wait_s']:.2f} s, first call {warm['first_call_s']:.2f} s, "
            f"cache hits {warm['cache_hits']}, misses {warm['cache_misses']}"),
        "first_call_s": res.first_call_s, "s_per_batch": s,
        "s_per_batch_runs": " ".join(f"{t:.3f}" for t in res.times_s),
        "images_per_s": a.batch / s, "unet_steps_per_s": res.unet_evaluations / s,
        "gflop_per_image": None if per_image is None else per_image / 1e9,
        "gflop_detail": None if not res.flops else ", ".join(
            f"{k} {v / 1e9:.4g}" for k, v in res.flops.items()),
        "achieved_tflops": achieved, "peak_tflops": peak,
        "mfu": achieved / peak if achieved and peak else None,
        "xla_memory": report.gib(res.xla_memory_bytes),
        "peak_memory": None if res.peak_memory_bytes is None else report.gib(
            res.peak_memory_bytes),
        "max_batch_per_device": res.max_batch_per_device,
        "diffusers_s_per_batch": None if ref is None else ref["s_per_batch"],
        "diffusers_setup": None if ref is None else (
            f"{ref['device']} {ref['dtype']}{' (TF32)' if ref.get('tf32') else ''}, "
            f"{ref['threads']} torch threads, attention "
            f"{ref['attention']}, runs " + " ".join(f"{t:.3f}" for t in ref["times_s"])),
        "speedup": None if ref is None else ref["s_per_batch"] / s,
        "max_pixel_diff": None if ref is None else ref["max_pixel_diff"],
    }
    report.print_fields(fields)
    if a.json:
        a.json.write_text(json.dumps(fields, indent=2))
    if a.record:
        report.append_row(a.results, fields, command=command_line(argv),
                          versions=hardware.versions(), note=a.note)
        print(f"appended a row to {a.results}")
    return fields


if __name__ == "__main__":
    main()
