"""LoRA on the toy model: the new colour word ``<orange>`` (to the toy's vocabulary, eight
letter and bracket tokens) from the same 30 images as configs/toy_ti.py, as rank-4 updates of
the UNet's and the text encoder's attention projections; everything else frozen.

    python -m sdjax.train.concept write --out runs/orange/data
    python -m sdjax.train --config configs/toy_lora.py
    python -m sdjax.sample --model toy --prompt "a <orange> circle on a blue background" \\
        --lora runs/orange/lora/export/orange.safetensors
"""

from sdjax.train.config import DataConfig, LoraConfig, OptimConfig, TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        task="lora",
        output_dir="runs/orange/lora",
        pretrained="toy",
        lora=LoraConfig(rank=4, alpha=4.0, name="orange",
                        unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                        text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj")),
        data=DataConfig(source="folder", path="runs/orange/data", resolution=32),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=10, weight_decay=0.0),
        batch_size=16,
        steps=600,
        seed=0,
        checkpoint_every=200,
        log_every=10,
    )
