"""Training with optax and orbax: the UNet on (image, caption) pairs with the VAE and text
encoder frozen (or the text encoder trained too), a VAE on images, a CLIP text encoder
contrastively, and adapters of a frozen model (textual inversion, LoRA); EMA, checkpoints that
resume on the same loss curve, export to diffusers.

    python -m sdjax.train --config configs/toy_unet.py
    python -m sdjax.train.toy      # the bundled toy model, all four stages
"""

from __future__ import annotations

__all__ = ["TrainConfig", "load_config", "train"]


def __getattr__(name: str):
    # Lazy, so the CLI's --help and recipe files do not pay for importing JAX.
    if name == "train":
        from sdjax.train.loop import train
        return train
    if name in ("TrainConfig", "load_config"):
        from sdjax.train import config
        return getattr(config, name)
    raise AttributeError(f"module 'sdjax.train' has no attribute {name!r}")
