"""Textual inversion on the toy model: the new word ``<magenta>`` (a colour it never saw),
learnt as one token vector from 30 images, everything else frozen.

    python -m sdjax.train.concept write --out runs/magenta/data
    python -m sdjax.train --config configs/toy_ti.py
    python -m sdjax.sample --model toy --embedding runs/magenta/ti/export/learned_embeds.safetensors \
        --prompt "a <magenta> circle on a blue background"
"""

from sdjax.train.config import (
    DataConfig,
    OptimConfig,
    TextualInversionConfig,
    TrainConfig,
)


def config() -> TrainConfig:
    return TrainConfig(
        task="textual_inversion",
        output_dir="runs/magenta/ti",
        pretrained="toy",
        textual_inversion=TextualInversionConfig(token="<magenta>", init_word="red"),
        data=DataConfig(source="folder", path="runs/magenta/data", resolution=32),
        optim=OptimConfig(learning_rate=5e-3, warmup_steps=10, weight_decay=0.0),
        batch_size=16,
        steps=300,
        seed=0,
        checkpoint_every=100,
        log_every=10,
    )
