"""Toy model, stage 4 of 4: the stage-3 UNet trained on, at a lower learning rate and with a
third of the captions empty.

Why a stage of its own: after stage 3 the unconditional model (trained on 10% of the samples)
still draws blends of the three shapes, and classifier-free guidance at 7.5, which pushes away
from it, exaggerates square corners into stars. This stage moved shape accuracy at guidance 7.5
from 0.625 to 0.667 (24 prompts, 20 steps); 50% empty captions instead of 30% made it worse
(0.54), so the gap to the 0.75 target is not only the unconditional model.

    python -m sdjax.train --config configs/toy_unet_tune.py
"""

from sdjax.train.config import DataConfig, DiffusionConfig, OptimConfig, TrainConfig

MODEL_DIR = "runs/toy/model"


def config() -> TrainConfig:
    return TrainConfig(
        task="unet",
        output_dir="runs/toy/unet_tune",
        pretrained=MODEL_DIR,   # the UNet, text encoder, VAE and scheduler of stages 1-3
        export_dir=MODEL_DIR,
        diffusion=DiffusionConfig(caption_dropout=0.3, min_snr_gamma=5.0),
        data=DataConfig(source="shapes", resolution=32),
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=100, schedule="cosine",
                          final_lr_fraction=0.1, weight_decay=0.01),
        batch_size=32,
        steps=3000,
        seed=4,
        ema_decay=0.999,
        checkpoint_every=500,
        log_every=25,
    )
