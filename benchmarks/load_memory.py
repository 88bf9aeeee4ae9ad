"""Peak host memory while loading a full-size SD UNet, against the size of the loaded params.

    python benchmarks/load_memory.py --shape sd15 --dtype bfloat16
    python benchmarks/load_memory.py --shape sd15 --dtype bfloat16 --source folder
    python benchmarks/load_memory.py --shape sd15 --dtype bfloat16 --source single

Writes random weights of that shape once (float32 safetensors, cached under --workdir), then
loads them in a fresh process with sdjax and reports that process's peak RSS (ru_maxrss), its
RSS just before loading (imports), the bytes of the loaded parameters and the load time.
``--source unet`` (default) loads a diffusers UNet alone; ``folder`` the whole pipeline from a
diffusers folder; ``single`` the same weights from one CompVis-layout ``.safetensors`` (as
A1111 users hold them; written from the folder by ``python -m sdjax.convert``); ``ckpt`` the
same as a ``torch.save({"state_dict": ...})`` pickle, read by sdjax's restricted unpickler.
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


def _write_pipeline(folder: Path, shape: str) -> None:
    """A whole random-weight diffusers folder of the family's shapes (UNet written above)."""
    import dataclasses

    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdjax.weights.clip_bpe import write_clip_vocabulary
    from sdjax.weights.export import save_model_index, save_scheduler
    from sdjax.weights.families import PRESETS
    family = PRESETS["sd15" if shape == "sd15" else "sd21-v"]
    torch.manual_seed(0)
    with torch.no_grad():
        AutoencoderKL(**{k: v for k, v in vars(family.vae).items() if v is not None}
                      ).save_pretrained(str(folder / "vae"))
        CLIPTextModel(CLIPTextConfig(**dataclasses.asdict(family.text_encoder))
                      ).save_pretrained(str(folder / "text_encoder"))
    write_clip_vocabulary(folder / "tokenizer", pad_token=family.pad_token)
    config = family.scheduler_config(family.prediction_type)
    save_scheduler(folder / "scheduler", config)
    save_model_index(folder, config["_class_name"])


def _measure(folder: Path, dtype: str, source: str) -> dict:
    import jax

    from sdjax.pipeline import StableDiffusionPipeline
    from sdjax.runtime import parse_dtype
    from sdjax.weights.diffusers_folder import load_network
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if source == "unet":
        unet = load_network(folder, "unet", dtype=parse_dtype(dtype))
        from flax import nnx
        state = nnx.state(unet, nnx.Param)
    else:
        path = folder if source == "folder" else folder.with_suffix(
            ".ckpt" if source == "ckpt" else ".safetensors")
        state = StableDiffusionPipeline.from_pretrained(str(path), dtype=dtype,
                                                        num_devices=1).params
    seconds = time.perf_counter() - t0
    params = sum(x.nbytes for x in jax.tree.leaves(state))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"source": source, "rss_before_load_gb": before / 1e9, "peak_rss_gb": peak / 1e9,
            "params_gb": params / 1e9, "load_seconds": seconds,
            "peak_over_params": (peak - before) / params}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="sd15", choices=["sd15", "sd21"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/sdjax-bench-unet"))
    p.add_argument("--source", default="unet", choices=["unet", "folder", "single", "ckpt"])
    p.add_argument("--child", choices=["write", "write_pipeline", "measure"],
                   help=argparse.SUPPRESS)
    a = p.parse_args()
    folder = a.workdir / a.shape
    if a.child == "write":
        _write_unet(folder, a.shape)
        return
    if a.child == "write_pipeline":
        _write_pipeline(folder, a.shape)
        return
    if a.child == "measure":
        print(json.dumps(_measure(folder, a.dtype, a.source)))
        return

    # Each step in its own process: a child forked from a process that once held the torch
    # model would inherit its RSS high-water mark.
    def child(step: str) -> str:
        return subprocess.run([sys.executable, __file__, "--child", step, "--shape", a.shape,
                               "--dtype", a.dtype, "--workdir", str(a.workdir), "--source",
                               a.source], capture_output=True, text=True, check=True).stdout

    if not (folder / "unet" / "config.json").exists():
        child("write")
    if a.source != "unet" and not (folder / "model_index.json").exists():
        child("write_pipeline")
    single = folder.with_suffix(".safetensors")
    if a.source in ("single", "ckpt") and not single.exists():
        subprocess.run([sys.executable, "-m", "sdjax.convert", str(folder), str(single)],
                       check=True, capture_output=True)
    if a.source == "ckpt" and not folder.with_suffix(".ckpt").exists():
        subprocess.run([sys.executable, "-c", "import sys, torch; from safetensors.torch import "
                        "load_file; torch.save({'state_dict': load_file(sys.argv[1])}, "
                        "sys.argv[2])", str(single), str(folder.with_suffix(".ckpt"))],
                       check=True)
    print(child("measure").strip().splitlines()[-1])


if __name__ == "__main__":
    main()
