"""task="controlnet": a ControlNet for a frozen model, as diffusers' ``train_controlnet.py``
trains one (Zhang et al. 2023). The UNet, VAE and text encoder stay fixed; the ControlNet
starts as a copy of the UNet's encoder (its time embedding, input conv, down blocks and mid
block, as ``ControlNetModel.from_unet``) whose outputs go through zero-initialised 1x1
convolutions, with a conditioning embedding whose last conv is zero too, so step 0 is the
pretrained model. It learns the denoising loss on (image, control map, caption) triples with
its residuals added to the frozen UNet's skips. Exports a diffusers ``ControlNetModel``
folder and, inside it, the same weights in the original single-file layout the WebUI loads
(``<controlnet.name>.safetensors``)."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.models.controlnet import ControlNetConfig, ControlNetModel, unet_encoder_config
from sdjax.models.unet import UNetConfig
from sdjax.train import components
from sdjax.train.components import Params
from sdjax.train.config import TrainConfig
from sdjax.train.data import Prepare
from sdjax.train.diffusion import FrozenModel, adapter_task, caption_batch, frozen_model
from sdjax.train.task import Setup
from sdjax.weights import export
from sdjax.weights.controlnet_files import load_controlnet, save_original

# diffusers' default conditioning embedding; a VAE of factor 2**k uses its first k + 1.
DEFAULT_EMBEDDING = (16, 32, 96, 256)
# What ControlNetModel.from_unet copies from the UNet.
COPIED = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block")
# What starts at zero: the zero convolutions and the conditioning embedding's last conv.
ZEROED = (("controlnet_down_blocks",), ("controlnet_mid_block",),
          ("controlnet_cond_embedding", "conv_out"))


def vae_factor(vae_config) -> int:
    return 2 ** (len(vae_config.block_out_channels) - 1)


def embedding_channels(given: tuple[int, ...] | None, factor: int) -> tuple[int, ...]:
    """The conditioning embedding's channels for a VAE of ``factor``: ``given``, checked to
    downsample by that factor, else diffusers' default cut to it."""
    steps = int(round(math.log2(factor)))
    if given is None:
        if steps + 1 > len(DEFAULT_EMBEDDING):
            raise ValueError(f"the VAE downsamples {factor}x: give "
                             "controlnet.conditioning_embedding_out_channels")
        return DEFAULT_EMBEDDING[:steps + 1]
    if len(given) != steps + 1:
        raise ValueError(f"controlnet.conditioning_embedding_out_channels {list(given)} "
                         f"downsamples the control image {2 ** (len(given) - 1)}x, the model's "
                         f"VAE {factor}x: give {steps + 1} channel counts")
    return tuple(given)


def _matches(a, b) -> bool:
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(x.shape == y.shape for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                      strict=True)))


def from_unet(unet_config: UNetConfig, unet_params: Params, channels: tuple[int, ...],
              seed: int) -> tuple[ControlNetConfig, Params]:
    """(config, float32 weights) of a new ControlNet for the UNet: its encoder copied, the
    zero convolutions and the conditioning embedding's last conv zero, the rest of the
    conditioning embedding randomly initialised (seeded). An input conv of another width
    than the ControlNet's (an inpainting UNet's) is not copied."""
    cfg = ControlNetConfig(unet=unet_encoder_config(unet_config),
                           conditioning_embedding_out_channels=channels)
    model = ControlNetModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model))
    for name in COPIED:
        if name in params and name in unet_params and _matches(params[name], unet_params[name]):
            params[name] = jax.tree.map(lambda x: np.asarray(x, np.float32), unet_params[name])
    for path in ZEROED:
        params = components.with_value(
            params, path, jax.tree.map(np.zeros_like, components.value_at(params, path)))
    return cfg, params


def initial(cfg: TrainConfig, model: FrozenModel, place) -> tuple[ControlNetConfig, Params]:
    """The ControlNet the run starts from: ``controlnet.pretrained``, else a new one made
    from the model's UNet."""
    unet, vae = model.nets["unet"], model.nets["vae"]
    factor = vae_factor(vae.config)
    if cfg.controlnet.pretrained is not None:
        net = load_controlnet(cfg.controlnet.pretrained, unet.config, dtype=jnp.float32,
                              place=place)
        got = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
        if got != factor:
            raise ValueError(f"controlnet.pretrained {cfg.controlnet.pretrained}: its "
                             f"conditioning embedding downsamples {got}x, the model's VAE "
                             f"{factor}x")
        return net.config, nnx.to_pure_dict(nnx.state(net))
    channels = embedding_channels(cfg.controlnet.conditioning_embedding_out_channels, factor)
    config, params = from_unet(unet.config, unet.params, channels, cfg.seed + 3)
    return config, jax.tree.map(place, params)


def graph(config: ControlNetConfig, dtype) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: ControlNetModel(config, dtype=dtype,
                                                            rngs=nnx.Rngs(0))))[0]


def control_batch(cfg: TrainConfig, tokenize) -> Prepare:
    """The denoising loss's batch with ``control``: the control map in [0, 1], the source's
    three channels after the image's."""
    base = caption_batch(cfg, tokenize)

    def prepare(images: np.ndarray, captions: list[str], index: np.ndarray):
        if images.shape[-1] != 6:
            raise ValueError("task 'controlnet' needs a control map with every image "
                             "(data.control)")
        out = base(images[..., :3], captions, index)
        out["control"] = images[..., 3:].astype(np.float32) / 255.0
        return out

    return prepare


def setup(cfg: TrainConfig, place) -> Setup:
    model = frozen_model(cfg, place)
    config, params = initial(cfg, model, place)
    task = adapter_task(cfg, model, None,
                        controlnet=graph(config, components.compute_dtype(cfg)))
    frozen = {name: net.params for name, net in model.nets.items()}
    name = cfg.controlnet.name

    def export_to(trained: dict, folder: Path) -> None:
        module = nnx.merge(graph(config, jnp.float32),
                           components.cast(jax.device_get(trained["controlnet"]), jnp.float32))
        export.save_network(folder, module)
        save_original(Path(folder) / f"{name}.safetensors", module)

    return Setup(task=task, params={"controlnet": params}, frozen=frozen,
                 prepare=control_batch(cfg, model.tokenizer), export=export_to)
