"""A ControlNet for the toy model: where the shape goes, from its edge map. The toy's shapes
with their outlines as control maps (data.control "edges"), placed anywhere within 25% of the
image's centre (the toy itself saw 10%), so the place is the map's to say; the toy's UNet,
VAE and text encoder frozen. Installed as sdjax/assets/toy-edges by
``python -m sdjax.train.toy_controlnet`` (which runs this recipe and measures placement).

    python -m sdjax.train --config configs/toy_controlnet.py
    python -m sdjax.sample --model toy --controlnet runs/toy-edges/export \\
        --control_image sdjax/assets/toy-edges/examples/circle_left.png \\
        --prompt "a red circle on a blue background"
"""

from sdjax.train.config import (
    ControlNetTrainConfig,
    DataConfig,
    DiffusionConfig,
    OptimConfig,
    TrainConfig,
)


def config() -> TrainConfig:
    return TrainConfig(
        task="controlnet",
        output_dir="runs/toy-edges",
        pretrained="toy",
        controlnet=ControlNetTrainConfig(conditioning_embedding_out_channels=(16, 32, 64),
                                         name="toy-edges"),
        data=DataConfig(source="shapes", resolution=32, control="edges"),
        # A tenth of the captions empty, as the toy's guidance needs an unconditional half.
        diffusion=DiffusionConfig(caption_dropout=0.1),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=20, schedule="cosine",
                          final_lr_fraction=0.1, weight_decay=0.0),
        batch_size=32,
        steps=600,
        seed=0,
        checkpoint_every=100,
        log_every=10,
    )
