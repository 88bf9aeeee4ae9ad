"""LoRA on the toy model: the new colour word ``magenta`` (spelt, in the toy's vocabulary, as
seven letter tokens) from 30 images, as rank-4 updates of the UNet's attention projections
and the text encoder's; everything else frozen.

    python -m sdjax.train.concept write --word magenta --out runs/magenta/lora_data
    python -m sdjax.train --config configs/toy_lora.py
    python -m sdjax.sample --model toy --lora runs/magenta/lora/export/magenta.safetensors \
        --prompt "a magenta circle on a blue background"

(The word is ``magenta``, not ``<magenta>``: the toy's prompts hold 16 tokens, and
``<magenta>`` spelt in letters would push ``background`` out of the caption.)
"""

from sdjax.train.config import DataConfig, LoraConfig, OptimConfig, TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        task="lora",
        output_dir="runs/magenta/lora",
        pretrained="toy",
        lora=LoraConfig(rank=4, alpha=4.0, name="magenta",
                        unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                        text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj")),
        data=DataConfig(source="folder", path="runs/magenta/lora_data", resolution=32),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=10, weight_decay=0.0),
        batch_size=16,
        steps=300,
        seed=0,
        checkpoint_every=100,
        log_every=10,
    )
