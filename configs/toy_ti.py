"""Textual inversion on the toy model: the new word ``<orange>`` (a colour it never saw),
learnt as one token vector from 30 images, everything else frozen.

    python -m sdjax.train.concept write --out runs/orange/data
    python -m sdjax.train --config configs/toy_ti.py
    python -m sdjax.sample --model toy --prompt "a <orange> circle on a blue background" \\
        --embedding runs/orange/ti/export/learned_embeds.safetensors
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
        output_dir="runs/orange/ti",
        pretrained="toy",
        textual_inversion=TextualInversionConfig(token="<orange>", init_word="red"),
        data=DataConfig(source="folder", path="runs/orange/data", resolution=32),
        optim=OptimConfig(learning_rate=5e-3, warmup_steps=10, weight_decay=0.0),
        batch_size=16,
        steps=600,
        seed=0,
        checkpoint_every=200,
        log_every=10,
    )
