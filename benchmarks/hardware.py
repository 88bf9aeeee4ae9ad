"""What the benchmark ran on: device, peak FLOP/s for MFU, memory counters, versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import jax

# Dense half-precision (bf16/fp16) peak TFLOP/s per JAX device, from the vendors' spec sheets
# (no sparsity). On TPU v2/v3 a JAX device is one core, half a chip. Matched by substring of
# ``device_kind``, longest first, so "H100 PCIe" wins over "H100".
PEAK_HALF_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v2": 22.5,
    "TPU v3": 61.5,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def device_kind() -> str:
    d = jax.devices()[0]
    return d.device_kind if d.platform != "cpu" else f"cpu ({cpu_model()})"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_count() -> int:
    """Cores this process may run on (what XLA:CPU's thread pool and torch default to)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# float32 on NVIDIA GPUs: full precision runs on the CUDA cores, TF32 (XLA's "default"
# precision) on the tensor cores; dense, from the same spec sheets. No TPU figure: there
# float32 is several bfloat16 passes, as many as the precision asks for.
PEAK_FLOAT32_TFLOPS: dict[str, float] = {
    "H100 PCIe": 51.0, "H100": 67.0, "H200": 67.0, "A100": 19.5, "L4": 30.3,
}
PEAK_TF32_TFLOPS: dict[str, float] = {
    "H100 PCIe": 378.0, "H100": 494.7, "H200": 494.7, "A100": 156.0, "L4": 60.0,
}


def default_peak_tflops(dtype: str, full_float32: bool = True) -> float | None:
    """The device's dense peak for ``dtype`` (float32: at full precision, or TF32 where
    ``full_float32`` is false), or None where we do not know one (CPUs, TPUs in float32)."""
    if jax.default_backend() == "cpu":
        return None
    if dtype in ("bfloat16", "float16"):
        table = PEAK_HALF_TFLOPS
    elif dtype == "float32" and jax.default_backend() == "gpu":
        table = PEAK_FLOAT32_TFLOPS if full_float32 else PEAK_TF32_TFLOPS
    else:
        return None
    kind = jax.devices()[0].device_kind
    for key in sorted(table, key=len, reverse=True):
        if key.lower() in kind.lower():
            return table[key]
    return None


def memory_stats() -> dict | None:
    """The first device's allocator counters (GPU/TPU); None on CPU, where XLA keeps none."""
    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # backends without the counters raise different errors
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
