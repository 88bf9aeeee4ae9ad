"""task="lora": low-rank updates of a frozen model's projection layers (Hu et al. 2021).
Only the factors are trained; the loss merges ``W + alpha / rank * down @ up`` from the
frozen ``W`` at every step, so the networks run unchanged (no wrapped layers) and the
update costs two small matmuls per layer. B (``up``) starts at zero, so step 0 is the
pretrained model. Exports diffusers/PEFT and kohya files (:mod:`sdjax.weights.adapter_export`)
that :meth:`StableDiffusionPipeline.load_lora` reads back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from sdjax.train import components
from sdjax.train.components import Params
from sdjax.train.config import LoraConfig, TrainConfig
from sdjax.train.diffusion import adapter_task, caption_batch, frozen_model
from sdjax.train.task import Setup
from sdjax.weights.adapter_export import save_lora
from sdjax.weights.lora import Target, lora_targets


@dataclasses.dataclass(frozen=True)
class LoraMerge:
    """The networks with each target kernel replaced by its merged value."""
    targets: tuple[tuple[str, tuple], ...]   # (network, kernel path), in params' order
    scale: float                             # alpha / rank

    def __call__(self, params: dict[str, Params], frozen: dict[str, Params]
                 ) -> dict[str, Params]:
        nets = dict(frozen)
        for (net, path), f in zip(self.targets, params["layers"], strict=True):
            w = components.value_at(nets[net], path)
            delta = (f["down"] @ f["up"]) * self.scale
            nets[net] = components.with_value(nets[net], path, w + delta.astype(w.dtype))
        return nets


def find_targets(modules: Mapping[str, nnx.Module], lc: LoraConfig) -> list[Target]:
    """The layers of ``modules`` ("unet", "text_encoder"; abstract ones will do) that the
    recipe names; an error when it names none."""
    found: list[Target] = []
    for net, patterns in (("unet", lc.unet_targets), ("text_encoder", lc.text_encoder_targets)):
        if patterns:
            found += lora_targets(modules[net], net, patterns)
    if not found:
        raise ValueError(f"lora: no layer of the model matches lora.unet_targets "
                         f"{list(lc.unet_targets)} or lora.text_encoder_targets "
                         f"{list(lc.text_encoder_targets)}")
    return found


def init_factors(shapes: list[tuple[int, int]], rank: int, seed: int) -> list[dict]:
    """down as PEFT initialises A (uniform in +-1/sqrt(fan_in)), up (B) zero."""
    rng = np.random.default_rng([seed, 7])
    return [{"down": rng.uniform(-1, 1, (n_in, rank)).astype(np.float32) / np.sqrt(n_in),
             "up": np.zeros((rank, n_out), np.float32)} for n_in, n_out in shapes]


def setup(cfg: TrainConfig, place) -> Setup:
    lc = cfg.lora
    model = frozen_model(cfg, place)
    layers = find_targets({name: nnx.merge(model.nets[name].graphdef, model.nets[name].params)
                           for name in ("unet", "text_encoder")}, lc)
    shapes = [components.value_at(model.nets[t.network].params, t.path).shape for t in layers]
    alpha = float(lc.alpha if lc.alpha is not None else lc.rank)
    task = adapter_task(cfg, model, LoraMerge(tuple((t.network, t.path) for t in layers),
                                              alpha / lc.rank))
    params = {"layers": jax.tree.map(place, init_factors(shapes, lc.rank, cfg.seed))}
    frozen = {name: net.params for name, net in model.nets.items()}

    def export_to(trained: dict, folder: Path) -> None:
        save_lora(folder, layers, jax.device_get(trained["layers"]), rank=lc.rank, alpha=alpha,
                  name=lc.name)

    return Setup(task=task, params=params, frozen=frozen,
                 prepare=caption_batch(cfg, model.tokenizer), export=export_to)
