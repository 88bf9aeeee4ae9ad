"""Benchmark model shapes, written once as random-weight diffusers folders.

Speed does not depend on the weights' values, so nothing is downloaded: each shape is built
with diffusers/transformers (PyTorch) at its default initialisation and saved with
``save_pretrained``; sdjax and diffusers then both load that same folder. Building runs in a
child process (``python -m benchmarks.models --shape mid``) so the process that times JAX
never imports torch and never shares the cores with torch's idle OpenMP threads.

Shapes:
  tiny  the tests' tiny SD1 layout (2 levels, 32/64 channels); seconds end to end
  toy   sdjax's bundled toy model (``sdjax/assets/toy``), real trained weights
  mid   SD 1.5 layout (4 levels, 2 resnets each, 8 transformer blocks, VAE with 4 levels)
        at ~0.3x the channels (96/192/384/384, head width 48) and a 6-layer 384-wide CLIP
  mid8  mid with SD 1.5's head count, 8 heads at every level (head widths 12/24/48): at 512²
        its first level attends over 4096 tokens with 8 heads, as SD 1.5 does
  sd15  SD 1.5 (860M UNet, ViT-L/14 text, the SD VAE)
  sd21  SD 2.1 (865M UNet with per-level heads and linear projections, OpenCLIP ViT-H text)
  sdxl  SDXL 1.0 base (2.6B UNet, ViT-L + OpenCLIP ViT-bigG text, the SDXL VAE)
  sdxl-tiny  the tests' tiny SDXL layout (3 levels, 16/32/32 channels, two small encoders)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sdjax.models.clip_text import CLIPTextConfig
from sdjax.models.unet import UNetConfig
from sdjax.models.vae import VAEConfig

VERSION = "v1"  # bump when a shape changes, so stale cached folders are not reused
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "circle", "square", "on", "the",
         "green", "background", "painting", "city", "at", "night"]

_SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
_SD2_SCHEDULER = {**_SD1_SCHEDULER, "_class_name": "DDIMScheduler",
                  "prediction_type": "v_prediction"}
_SDXL_SCHEDULER = {**_SD1_SCHEDULER, "_class_name": "EulerDiscreteScheduler",
                   "timestep_spacing": "leading", "interpolation_type": "linear"}


@dataclasses.dataclass(frozen=True)
class Shape:
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    scheduler: dict
    sd2_tokenizer: bool = False  # SD2 pads with "!" instead of the end token
    text_2: CLIPTextConfig | None = None  # SDXL's second encoder (its tokenizer pads with "!")


_TINY_UNET = UNetConfig(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
_TINY_VAE = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                      sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2)

_MID_UNET = UNetConfig(sample_size=32, block_out_channels=(96, 192, 384, 384),
                       attention_head_dim=(2, 4, 8, 8), cross_attention_dim=384)
_MID_VAE = VAEConfig(block_out_channels=(32, 64, 128, 128), sample_size=256)
_MID_TEXT = CLIPTextConfig(vocab_size=1024, hidden_size=384, intermediate_size=1536,
                           num_hidden_layers=6, num_attention_heads=6)

SHAPES: dict[str, Shape] = {
    "tiny": Shape(_TINY_UNET, _TINY_VAE,
                  CLIPTextConfig(vocab_size=1024, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4),
                  _SD1_SCHEDULER),
    "mid": Shape(_MID_UNET, _MID_VAE, _MID_TEXT, _SD1_SCHEDULER),
    # (diffusers' SD1 UNets call their head count attention_head_dim.)
    "mid8": Shape(dataclasses.replace(_MID_UNET, attention_head_dim=8), _MID_VAE, _MID_TEXT,
                  _SD1_SCHEDULER),
    "sd15": Shape(UNetConfig.sd15(), VAEConfig.sd15(), CLIPTextConfig.sd15(), _SD1_SCHEDULER),
    "sd21": Shape(UNetConfig.sd21(), VAEConfig.sd21(), CLIPTextConfig.sd21(), _SD2_SCHEDULER,
                  sd2_tokenizer=True),
    "sdxl": Shape(UNetConfig.sdxl_base(), VAEConfig.sdxl(), CLIPTextConfig.sd15(),
                  _SDXL_SCHEDULER, text_2=CLIPTextConfig.sdxl_2()),
    "sdxl-tiny": Shape(
        UNetConfig(sample_size=8, layers_per_block=1, block_out_channels=(16, 32, 32),
                   down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
                   up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
                   transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 4),
                   cross_attention_dim=80, norm_num_groups=8, use_linear_projection=True,
                   addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=24 + 6 * 8),
        dataclasses.replace(_TINY_VAE, scaling_factor=0.13025),
        CLIPTextConfig(vocab_size=1024, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=3, num_attention_heads=4),
        _SDXL_SCHEDULER,
        text_2=CLIPTextConfig(vocab_size=1024, hidden_size=48, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu",
                              projection_dim=24)),
}
NAMES = ("toy", *SHAPES)


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "sdjax" / "benchmark_models"


def ensure_folder(shape: str, root: Path | None = None) -> Path:
    """The diffusers folder of ``shape``, built (in a child process) on first use."""
    if shape == "toy":
        from sdjax.weights.resolve import resolve_model
        return resolve_model("toy")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(NAMES)}")
    root = root or default_root()
    folder = root / f"{shape}-{VERSION}"
    if not (folder / "model_index.json").exists():
        subprocess.run([sys.executable, "-m", "benchmarks.models", "--shape", shape,
                        "--root", str(root)], check=True)
    return folder


def ensure_controlnet(folder: Path, root: Path | None = None) -> Path:
    """A random ControlNet for the model ``folder``, made by diffusers'
    ``ControlNetModel.from_unet`` with every weight randomized (its zero convolutions too, so
    it changes the images) and written (in a child process) beside the shapes on first use."""
    root = root or default_root()
    out = root / f"{folder.name}-controlnet-{VERSION}"
    if not (out / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "benchmarks.models", "--controlnet_for",
                        str(folder), "--root", str(root)], check=True)
    return out


def build_controlnet(folder: Path, out: Path) -> None:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    vae_levels = len(json.loads((folder / "vae" / "config.json").read_text())
                     ["block_out_channels"])
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:vae_levels])
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    net.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _kwargs(cfg) -> dict:
    # sdjax's config fields carry diffusers' names; None means "diffusers' default".
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


def build(shape: str, folder: Path) -> None:
    """Write ``folder`` as ``StableDiffusionPipeline.save_pretrained`` does (random weights)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from diffusers import StableDiffusionPipeline as TorchPipeline
    from transformers import CLIPTextConfig as HFTextConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdjax.train.tokenizer import write_clip_tokenizer

    spec = SHAPES[shape]
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = write_clip_tokenizer(tmp / "tokenizer-src", WORDS,
                                 pad_token="!" if spec.sd2_tokenizer else "<|endoftext|>")
    torch.manual_seed(0)

    def encoder(text: CLIPTextConfig, cls=CLIPTextModel, **extra):
        return cls(HFTextConfig(
            vocab_size=max(vocab, text.vocab_size),
            hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=text.num_attention_heads,
            max_position_embeddings=text.max_position_embeddings, hidden_act=text.hidden_act,
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1, **extra))

    te = encoder(spec.text)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp / "tokenizer-src"))
    vae = AutoencoderKL(**_kwargs(spec.vae))
    unet = UNet2DConditionModel(**_kwargs(spec.unet))
    if spec.text_2 is not None:
        write_clip_tokenizer(tmp / "tokenizer-src", WORDS, pad_token="!")
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
            text_encoder_2=encoder(spec.text_2, CLIPTextModelWithProjection,
                                   projection_dim=spec.text_2.projection_dim),
            tokenizer_2=CLIPTokenizer.from_pretrained(str(tmp / "tokenizer-src")),
            scheduler=EulerDiscreteScheduler.from_config(spec.scheduler))
    else:
        scheduler_cls = DDIMScheduler if spec.scheduler["_class_name"] == "DDIMScheduler" \
            else PNDMScheduler
        pipe = TorchPipeline(
            vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
            scheduler=scheduler_cls.from_config(spec.scheduler), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp))
    shutil.rmtree(tmp / "tokenizer-src")
    # Rename last: a folder with model_index.json is always complete.
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a random-weight benchmark model folder.")
    p.add_argument("--shape", choices=sorted(SHAPES))
    p.add_argument("--controlnet_for", type=Path, default=None,
                   help="instead: write a random ControlNet for this model folder")
    p.add_argument("--root", type=Path, default=default_root())
    a = p.parse_args(argv)
    a.root.mkdir(parents=True, exist_ok=True)
    if a.controlnet_for is not None:
        out = a.root / f"{a.controlnet_for.name}-controlnet-{VERSION}"
        build_controlnet(a.controlnet_for, out)
        print(out)
        return
    if a.shape is None:
        p.error("give --shape or --controlnet_for")
    folder = a.root / f"{a.shape}-{VERSION}"
    build(a.shape, folder)
    print(folder)


if __name__ == "__main__":
    main()
