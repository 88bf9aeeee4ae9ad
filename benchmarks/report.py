"""The figures of a run: printed as ``name: value`` lines and appended to RESULTS.md."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from sdjax.runtime import resolve_matmul_precision

HEADER = """# Benchmark results

Rows are appended by `python -m benchmarks.throughput` (see README.md); newest last. Each row
is one run: every figure in it comes from that run, and the speedup is against diffusers
measured in the same run on the same weights. `s/batch` is the median warm call (prompts in,
pixels on the host); `UNet steps/s` counts denoising steps, each one UNet evaluation on the
2B-latent classifier-free-guidance batch; FLOPs are counted from the networks traced at the
run's shapes (benchmarks/flops.py, equal to XLA's count on CPU; rows before 2026-12-01 used
XLA's cost analysis, which gave none on GPUs). `n/a` means not measurable on that device (peak
memory, max batch and MFU on CPU) or switched off for that run.

| date | device | load avg | versions | command | workload | cold compile s | warm start s \
| s/batch | images/s | UNet steps/s | GFLOP/image | MFU | memory/device | max batch/device \
| diffusers s/batch | sdjax speedup | note |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
""".replace(" \\\n", " ")

# (key, label), in the order they print.
FIELDS: list[tuple[str, str]] = [
    ("model", "model"), ("controlnet", "ControlNet"), ("device", "device"),
    ("devices", "devices"),
    ("xla_cpu_threads", "XLA:CPU threads"), ("load_avg", "load average (1/5/15 min)"),
    ("dtype", "dtype"), ("matmul_precision", "matmul precision"), ("size", "image size"),
    ("steps", "steps"),
    ("scheduler", "scheduler"), ("unet_evaluations", "UNet evaluations per call"),
    ("batch", "images per call"), ("per_device_batch", "images per device"),
    ("load_s", "weights load s"), ("cold_compile_s", "cold compile s"),
    ("warm_start_s", "warm start s (fresh process to first image)"),
    ("warm_start_detail", "warm start detail"), ("first_call_s", "first call s"),
    ("s_per_batch", "s/batch (median)"), ("s_per_batch_runs", "s/batch runs"),
    ("images_per_s", "images/s"), ("unet_steps_per_s", "UNet steps/s"),
    ("gflop_per_image", "GFLOP/image"), ("gflop_detail", "GFLOP per device call by part"),
    ("achieved_tflops", "achieved TFLOP/s per device"), ("peak_tflops", "peak TFLOP/s"),
    ("mfu", "MFU"), ("xla_memory", "XLA memory estimate per device"),
    ("peak_memory", "peak device memory"), ("max_batch_per_device", "max batch per device"),
    ("diffusers_s_per_batch", "diffusers s/batch (median)"),
    ("diffusers_setup", "diffusers setup"), ("speedup", "sdjax speedup vs diffusers"),
    ("max_pixel_diff", "max |pixel| diff vs diffusers"),
]


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def print_fields(fields: dict) -> None:
    width = max(len(label) for _, label in FIELDS)
    for key, label in FIELDS:
        print(f"{label:<{width}}  {fmt(fields.get(key))}")


def append_row(path: Path, fields: dict, *, command: str, versions: dict[str, str],
               note: str = "") -> None:
    if not path.exists() or not path.read_text().strip():
        path.write_text(HEADER)
    v = ", ".join(f"{k} {versions[k]}" for k in ("jax", "flax", "torch", "diffusers"))
    # The precision is named only where it is not the dtype's own (float32: highest).
    precision = fields.get("matmul_precision")
    usual = resolve_matmul_precision(None, fields["dtype"]) or "default"
    dtype = fields["dtype"] + (f" ({precision} matmuls)" if precision not in (None, usual)
                               else "")
    net = fields.get("controlnet")
    model = fields["model"] + ("" if net is None else
                               f" + ControlNet ({'random' if net == 'random' else net})")
    workload = (f"{model} {dtype} {fields['size']} {fields['steps']} steps "
                f"({fields['scheduler']}, {fields['unet_evaluations']} evals) batch "
                f"{fields['batch']} on {fields['devices']} device(s)")
    memory = fields.get("peak_memory")
    if memory in (None, "n/a"):
        memory = f"n/a (XLA estimate {fields.get('xla_memory')})"
    speedup = fields.get("speedup")
    cells = [
        datetime.date.today().isoformat(), fields["device"], fields["load_avg"], v,
        f"`{command}`", workload, fmt(fields.get("cold_compile_s")),
        fmt(fields.get("warm_start_s")), fmt(fields.get("s_per_batch")),
        fmt(fields.get("images_per_s")), fmt(fields.get("unet_steps_per_s")),
        fmt(fields.get("gflop_per_image")), fmt(fields.get("mfu")), memory,
        fmt(fields.get("max_batch_per_device")), fmt(fields.get("diffusers_s_per_batch")),
        "n/a" if speedup is None else f"{speedup:.2f}x", note or "",
    ]
    row = "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |\n"
    # The rows table comes first; other sections (prose, other tables) may follow it, so the
    # row goes after the table's last line, not at the end of the file.
    lines = path.read_text().splitlines(keepends=True)
    header = next(i for i, line in enumerate(lines) if line.startswith("| date |"))
    end = header
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    if end and not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    path.write_text("".join(lines[:end] + [row] + lines[end:]))


def emit_json(record: dict, path: str | None) -> None:
    """Print a run's record as JSON, and save it to ``path`` when one is given."""
    print(json.dumps(record, indent=1))
    if path:
        Path(path).write_text(json.dumps(record, indent=1))
