"""Peak host memory while loading a full-size SD UNet, against the size of the loaded params.

    python benchmarks/load_memory.py --shape sd15 --dtype bfloat16

Writes a random-weight diffusers UNet of that shape once (float32 safetensors, cached under
--workdir), then loads it in a fresh process with sdjax and reports that process's peak RSS
(ru_maxrss), its RSS just before loading (imports), and the bytes of the loaded parameters.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _write_unet(folder: Path, shape: str) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from sdjax.models.unet import UNetConfig
    cfg = getattr(UNetConfig, shape)()
    kwargs = {k: v for k, v in vars(cfg).items() if v is not None}
    torch.manual_seed(0)
    with torch.no_grad():
        UNet2DConditionModel(**kwargs).save_pretrained(str(folder / "unet"))


def _measure(folder: Path, dtype: str) -> dict:
    import jax

    from sdjax.pipeline import parse_dtype
    from sdjax.weights.diffusers_folder import load_network
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    unet = load_network(folder, "unet", dtype=parse_dtype(dtype))
    seconds = time.perf_counter() - t0
    from flax import nnx
    params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(unet, nnx.Param)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_before_load_gb": before / 1e9, "peak_rss_gb": peak / 1e9,
            "params_gb": params / 1e9, "load_seconds": seconds,
            "peak_over_params": (peak - before) / params}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="sd15", choices=["sd15", "sd21"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sdjax-bench-unet"))
    p.add_argument("--child", choices=["write", "measure"], help=argparse.SUPPRESS)
    a = p.parse_args()
    folder = a.workdir / a.shape
    if a.child == "write":
        _write_unet(folder, a.shape)
        return
    if a.child == "measure":
        print(json.dumps(_measure(folder, a.dtype)))
        return

    # Each step in its own process: a child forked from a process that once held the torch
    # model would inherit its RSS high-water mark.
    def child(step: str) -> str:
        return subprocess.run([sys.executable, __file__, "--child", step, "--shape", a.shape,
                               "--dtype", a.dtype, "--workdir", str(a.workdir)],
                              capture_output=True, text=True, check=True).stdout

    if not (folder / "unet" / "config.json").exists():
        child("write")
    print(child("measure").strip().splitlines()[-1])


if __name__ == "__main__":
    main()
