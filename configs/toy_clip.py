"""Toy model, stage 1 of 4: a small CLIP text encoder with its own vocabulary, trained
contrastively against a small image tower on the synthetic shapes.

    python -m sdjax.train --config configs/toy_clip.py
"""

from sdjax.train.config import (
    ContrastiveConfig,
    DataConfig,
    OptimConfig,
    TokenizerConfig,
    TrainConfig,
)
from sdjax.train.shapes import VOCABULARY

MODEL_DIR = "runs/toy/model"  # the four stages assemble one diffusers folder here


def config() -> TrainConfig:
    return TrainConfig(
        task="clip",
        output_dir="runs/toy/clip",
        export_dir=MODEL_DIR,
        tokenizer=TokenizerConfig(words=VOCABULARY, model_max_length=16),
        text_encoder={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "hidden_act": "quick_gelu"},
        contrastive=ContrastiveConfig(projection_dim=64, image_channels=(32, 64, 128)),
        data=DataConfig(source="shapes", resolution=32),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=50, schedule="cosine",
                          weight_decay=0.01),
        batch_size=64,
        steps=600,
        seed=1,
        checkpoint_every=200,
        log_every=20,
    )
