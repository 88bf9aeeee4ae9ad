"""Child process: the same workload in diffusers (PyTorch), from the same folder (with a
ControlNet: ``StableDiffusionControlNetPipeline``). Prints one
JSON line and saves the last call's pixels for the parity check.

    python -m benchmarks.diffusers_bench --workload JSON --repeats 5 --out pixels.npy

Float32 on CPU and float16 with PyTorch's SDPA attention on CUDA, as the issue asks; it runs
apart from the JAX process so neither library's idle worker threads take cores from the other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.workload import Workload
from sdjax.schedulers import diffusers_equivalent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, float16 on CUDA")
    p.add_argument("--out", default=None, help="where to save the last call's pixels (.npy)")
    a = p.parse_args(argv)

    import diffusers
    import torch

    w = Workload.from_json(a.workload)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, a.dtype or ("float16" if cuda else "float32"))
    t0 = time.perf_counter()
    control = {}
    if w.controlnet is not None:
        from PIL import Image

        net = diffusers.ControlNetModel.from_pretrained(w.controlnet, torch_dtype=dtype)
        pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
            w.folder, controlnet=net, torch_dtype=dtype, safety_checker=None,
            requires_safety_checker=False)
        control = {"image": Image.fromarray(w.control_image())}
    elif (Path(w.folder) / "text_encoder_2").is_dir():  # SDXL
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(w.folder, torch_dtype=dtype)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            w.folder, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(device)
    load_s = time.perf_counter() - t0
    if w.scheduler:
        cls, extra = diffusers_equivalent(w.scheduler)
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    if cuda and dtype == torch.float32:
        # The same float32 as sdjax's: TF32 in both libraries or in neither (torch's default
        # is TF32 convolutions with full-precision matmuls).
        torch.backends.cuda.matmul.allow_tf32 = not w.full_float32
        torch.backends.cudnn.allow_tf32 = not w.full_float32
    latents = torch.from_numpy(w.latents().transpose(0, 3, 1, 2).copy()).to(device, dtype)

    def call() -> np.ndarray:
        with torch.inference_mode():
            out = pipe(w.prompts(), negative_prompt=[""] * w.batch, latents=latents,
                       num_inference_steps=w.steps, guidance_scale=w.guidance,
                       height=w.height, width=w.width, output_type="np", **control).images
        if cuda:
            torch.cuda.synchronize()
        return out

    t0 = time.perf_counter()
    call()  # first call: allocator warm-up, kernel selection
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        images = call()
        times.append(time.perf_counter() - t0)
    if a.out:
        np.save(a.out, images.astype(np.float32))
    attn = type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))]).__name__
    print(json.dumps({
        "load_s": load_s, "first_call_s": first, "times_s": times,
        "s_per_batch": statistics.median(times), "device": device,
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
        "attention": attn, "torch": torch.__version__,
        "tf32": bool(cuda and dtype == torch.float32 and not w.full_float32),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }))


if __name__ == "__main__":
    main()
