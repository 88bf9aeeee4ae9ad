"""Toy model, stage 3 of 4: the UNet, on latents of the stage-2 VAE, conditioned on the
stage-1 text encoder (both frozen), with 10% empty captions for classifier-free guidance.

    python -m sdjax.train --config configs/toy_unet.py
"""

from sdjax.train.config import DataConfig, DiffusionConfig, OptimConfig, TrainConfig

MODEL_DIR = "runs/toy/model"

# What the export's scheduler/ says: DPM-Solver++(2M) samples this model well in ~20 steps.
SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 1,
    # Read by the other samplers built from this file (as in SD's own configs): without them
    # DDIM would clip its x0 estimate to [-1, 1] and PNDM would run its slow Runge-Kutta warm-up.
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "use_karras_sigmas": False,
    "final_sigmas_type": "zero",
}


def config() -> TrainConfig:
    return TrainConfig(
        task="unet",
        output_dir="runs/toy/unet",
        pretrained=MODEL_DIR,
        export_dir=MODEL_DIR,
        unet={"sample_size": 8, "in_channels": 4, "out_channels": 4,
              "block_out_channels": [48, 96], "layers_per_block": 1,
              "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
              "cross_attention_dim": 64, "attention_head_dim": 4, "norm_num_groups": 8},
        diffusion=DiffusionConfig(caption_dropout=0.1, min_snr_gamma=5.0, scheduler=SCHEDULER),
        data=DataConfig(source="shapes", resolution=32),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=200, schedule="cosine",
                          final_lr_fraction=0.05, weight_decay=0.01),
        batch_size=32,
        steps=3400,
        seed=3,
        ema_decay=0.999,
        checkpoint_every=500,
        log_every=25,
    )
