"""Toy model, stage 2 of 4: a small AutoencoderKL, 32x32 RGB <-> 8x8x4 latents (factor 4).

    python -m sdjax.train --config configs/toy_vae.py
"""

from sdjax.train.config import AutoencoderConfig, DataConfig, OptimConfig, TrainConfig

MODEL_DIR = "runs/toy/model"


def config() -> TrainConfig:
    return TrainConfig(
        task="vae",
        output_dir="runs/toy/vae",
        export_dir=MODEL_DIR,
        vae={"block_out_channels": [16, 32, 64], "layers_per_block": 1, "latent_channels": 4,
             "norm_num_groups": 8, "sample_size": 32,
             "down_block_types": ["DownEncoderBlock2D"] * 3,
             "up_block_types": ["UpDecoderBlock2D"] * 3},
        autoencoder=AutoencoderConfig(mse_weight=1.0, l1_weight=0.1, kl_weight=1e-4,
                                      scaling_batches=8),
        data=DataConfig(source="shapes", resolution=32),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=100, schedule="cosine",
                          final_lr_fraction=0.05, weight_decay=0.0),
        batch_size=32,
        steps=2000,
        seed=2,
        ema_decay=0.999,
        checkpoint_every=500,
        log_every=25,
    )
