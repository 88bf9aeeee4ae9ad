"""Process-wide runtime settings of the compiled sampler and the trainer: the dtype names, the
matmul precision a float32 program is traced under, and JAX's persistent compilation cache.

Its own module so that training (``sdjax.train``) and the benchmarks use the same rules
without importing the pipelines.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CACHE_ENV = "SDJAX_COMPILATION_CACHE"
# jax.default_matmul_precision's names for float32 dots and convolutions on GPUs and TPUs:
# "highest" is true float32; "high" and "default" are XLA's faster reduced forms (TF32 on
# NVIDIA GPUs, bfloat16 passes on TPUs). CPUs compute float32 either way.
MATMUL_PRECISIONS = ("default", "high", "highest")


def parse_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    d = jnp.dtype(dtype)
    if d not in [jnp.dtype(v) for v in DTYPES.values()]:
        raise ValueError(f"unsupported dtype {d}")
    return d


def resolve_matmul_precision(precision: str | None, dtype: jnp.dtype) -> str | None:
    """The precision the sampler is compiled with: ``precision`` if given, else "highest" for
    a float32 pipeline (float32 means float32 on every backend) and None, XLA's own default,
    for half-precision ones, whose dots take half-precision inputs anyway."""
    if precision is not None:
        if precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, "
                             f"not {precision!r}")
        return precision
    return "highest" if jnp.dtype(dtype) == jnp.float32 else None


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache, so a second process start skips the
    compile. ``SDJAX_COMPILATION_CACHE`` moves it (a path) or turns it off (``0``/``off``).
    Returns the directory used, or None when disabled."""
    setting = path or os.environ.get(CACHE_ENV)
    if setting and setting.lower() in ("0", "off", "false", "none"):
        return None
    if not setting:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        setting = os.path.join(base, "sdjax", "jax_cache")
    try:
        os.makedirs(setting, exist_ok=True)
    except OSError:
        return None  # a read-only home must not stop sampling; it only costs the compile
    jax.config.update("jax_compilation_cache_dir", setting)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return setting
