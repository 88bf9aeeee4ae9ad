"""ControlNetModel of Stable Diffusion 1.x/2.x and SDXL (Zhang et al. 2023): a copy of the
UNet's encoder (its time embedding, down blocks and mid block, built from ``sdjax.models.unet``)
that also reads a control image through a small conditioning embedding, and hands the UNet
one residual per skip connection and one for the mid block, each through a 1x1 "zero"
convolution.

NHWC throughout; module attribute names follow diffusers' ``ControlNetModel`` so that the
weight table (``sdjax/weights/table_controlnet.py``) stays a handful of regular expressions.
The residuals come back unscaled: the conditioning scale, the guidance window, guess mode and
the WebUI's control modes are the sampler's (``sdjax.controlnet.source``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.layers import Dtype, TimestepEmbedding, conv, timestep_embedding
from sdjax.models.unet import (
    CROSS_DOWN,
    CROSS_UP,
    PLAIN_UP,
    TEXT_TIME,
    DownBlock,
    MidBlock,
    UNetConfig,
    _LevelSpec,
)

# ControlNetModel config keys that are not UNet keys, and the values we build.
_CONTROL_KEYS = ("conditioning_channels", "conditioning_embedding_out_channels",
                 "controlnet_conditioning_channel_order", "global_pool_conditions")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNetModel's config: the UNet fields its encoder shares (``unet``, whose up
    path is the mirror of the down path and unused), and the conditioning embedding's."""

    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr: bool = False  # controlnet_conditioning_channel_order == "bgr"
    # The shuffle models' global average pooling of every residual (diffusers forces guess
    # mode with it).
    global_pool_conditions: bool = False

    @property
    def num_residuals(self) -> int:
        """Down residuals (one per skip connection of the UNet)."""
        u = self.unet
        levels = len(u.block_out_channels)
        return 1 + levels * u.layers_per_block + levels - 1

    @property
    def family(self) -> str:
        """"sdxl" (SDXL's added text/time conditioning) or "sd" (1.x/2.x)."""
        return "sdxl" if self.unet.addition_embed_type == TEXT_TIME else "sd"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlNetConfig:
        """Parse a diffusers ControlNetModel ``config.json``; features we do not build raise a
        ValueError naming the key."""
        d = dict(d)
        name = d.pop("_class_name", "ControlNetModel")
        if name != "ControlNetModel":
            raise ValueError(f"ControlNet config _class_name {name!r} is not ControlNetModel")
        mine = {k: d.pop(k) for k in _CONTROL_KEYS if k in d}
        down = d.get("down_block_types", UNetConfig.down_block_types)
        d["up_block_types"] = [CROSS_UP if k == CROSS_DOWN else PLAIN_UP for k in down][::-1]
        d.setdefault("down_block_types", list(down))
        unet = UNetConfig.from_dict({k: v for k, v in d.items() if not k.startswith("_")})
        order = mine.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ValueError(f"ControlNet config controlnet_conditioning_channel_order={order!r}"
                             " is not supported (rgb, bgr)")
        channels = mine.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        return cls(unet=unet, conditioning_channels=int(mine.get("conditioning_channels", 3)),
                   conditioning_embedding_out_channels=tuple(channels), bgr=order == "bgr",
                   global_pool_conditions=bool(mine.get("global_pool_conditions", False)))

    def to_dict(self) -> dict[str, Any]:
        """diffusers' config.json of this ControlNet."""
        u = self.unet
        out = {"_class_name": "ControlNetModel", "in_channels": u.in_channels,
               "conditioning_channels": self.conditioning_channels,
               "flip_sin_to_cos": u.flip_sin_to_cos, "freq_shift": u.freq_shift,
               "down_block_types": list(u.down_block_types),
               "mid_block_type": u.mid_block_type,
               "only_cross_attention": _listed(u.only_cross_attention),
               "block_out_channels": list(u.block_out_channels),
               "layers_per_block": u.layers_per_block,
               "downsample_padding": u.downsample_padding,
               "mid_block_scale_factor": u.mid_block_scale_factor, "act_fn": u.act_fn,
               "norm_num_groups": u.norm_num_groups, "norm_eps": u.norm_eps,
               "cross_attention_dim": u.cross_attention_dim,
               "transformer_layers_per_block": _listed(u.transformer_layers_per_block),
               "attention_head_dim": _listed(u.attention_head_dim),
               "num_attention_heads": _listed(u.num_attention_heads),
               "use_linear_projection": u.use_linear_projection,
               "upcast_attention": u.upcast_attention,
               "addition_embed_type": u.addition_embed_type,
               "addition_time_embed_dim": u.addition_time_embed_dim,
               "projection_class_embeddings_input_dim": u.projection_class_embeddings_input_dim,
               "controlnet_conditioning_channel_order": "bgr" if self.bgr else "rgb",
               "conditioning_embedding_out_channels":
                   list(self.conditioning_embedding_out_channels),
               "global_pool_conditions": self.global_pool_conditions}
        return out


def _listed(value):
    return list(value) if isinstance(value, tuple) else value


def unet_encoder_config(base: UNetConfig, **changes) -> UNetConfig:
    """A ControlNet's UNet fields from its base UNet's config (a single file's architecture):
    the same encoder, taking the 4 latent channels (an inpainting UNet's extra channels are
    not the ControlNet's)."""
    return dataclasses.replace(base, in_channels=base.out_channels, num_class_embeds=None,
                               **changes)


class ConditioningEmbedding(nnx.Module):
    """The control image (B, H, W, C) in [0, 1] -> features at the latent size: a 3x3 conv,
    then (3x3 conv, strided 3x3 conv) pairs, SiLU after each, and a last 3x3 conv."""

    def __init__(self, out_channels: int, in_channels: int, channels: tuple[int, ...], *,
                 dtype: Dtype, rngs: nnx.Rngs):
        self.conv_in = conv(in_channels, channels[0], 3, dtype=dtype, rngs=rngs)
        blocks = []
        for cin, cout in zip(channels[:-1], channels[1:], strict=True):
            blocks.append(conv(cin, cin, 3, dtype=dtype, rngs=rngs))
            blocks.append(conv(cin, cout, 3, stride=2, dtype=dtype, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.conv_out = conv(channels[-1], out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.silu(self.conv_in(x))
        for block in self.blocks:
            x = jax.nn.silu(block(x))
        return self.conv_out(x)


class ControlNetModel(nnx.Module):
    """(noisy latents (B, h, w, 4), timesteps, text states, control image (B, H, W, C) in
    [0, 1], SDXL's ``added_cond``) -> (down residuals, one per skip of the UNet; the mid
    block's residual), unscaled."""

    def __init__(self, cfg: ControlNetConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        u = cfg.unet
        ch = u.block_out_channels
        heads, depth, only_cross = u.heads_per_level(), u.depth_per_level(), \
            u.only_cross_per_level()
        levels = len(ch)

        def spec(level: int, cross: bool, mid: bool = False) -> _LevelSpec:
            return _LevelSpec(temb=u.time_embed_dim, groups=u.norm_num_groups, eps=u.norm_eps,
                              heads=heads[level] if cross else None,
                              context_dim=u.cross_attention_dim, depth=depth[level],
                              only_cross=u.mid_only_cross if mid else only_cross[level])

        self.conv_in = conv(u.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(ch[0], u.time_embed_dim, dtype=dtype, rngs=rngs)
        self.add_embedding = (TimestepEmbedding(u.projection_class_embeddings_input_dim,
                                                u.time_embed_dim, dtype=dtype, rngs=rngs)
                              if u.addition_embed_type == TEXT_TIME else None)
        self.controlnet_cond_embedding = ConditioningEmbedding(
            ch[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels,
            dtype=dtype, rngs=rngs)
        zero = [conv(ch[0], ch[0], 1, dtype=dtype, rngs=rngs)]
        down = []
        for i, kind in enumerate(u.down_block_types):
            last = i == levels - 1
            down.append(DownBlock(ch[max(i - 1, 0)], ch[i], layers=u.layers_per_block,
                                  spec=spec(i, kind == CROSS_DOWN), downsample=not last,
                                  padding=u.downsample_padding, dtype=dtype, rngs=rngs))
            zero += [conv(ch[i], ch[i], 1, dtype=dtype, rngs=rngs)
                     for _ in range(u.layers_per_block + (0 if last else 1))]
        self.down_blocks = nnx.List(down)
        self.controlnet_down_blocks = nnx.List(zero)
        self.mid_block = MidBlock(ch[-1], spec=spec(levels - 1, True, mid=True),
                                  output_scale_factor=u.mid_block_scale_factor, dtype=dtype,
                                  rngs=rngs)
        self.controlnet_mid_block = conv(ch[-1], ch[-1], 1, dtype=dtype, rngs=rngs)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | float,
                 encoder_hidden_states: jax.Array, control: jax.Array,
                 added_cond: dict[str, jax.Array] | None = None
                 ) -> tuple[list[jax.Array], jax.Array]:
        cfg, u = self.config, self.config.unet
        x = sample.astype(self.dtype)
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (x.shape[0],))
        temb = timestep_embedding(t, u.block_out_channels[0], flip_sin_to_cos=u.flip_sin_to_cos,
                                  freq_shift=u.freq_shift)
        temb = self.time_embedding(temb.astype(self.dtype))
        if self.add_embedding is not None:
            temb = temb + self._added_embedding(added_cond)
        context = encoder_hidden_states.astype(self.dtype)
        control = control.astype(self.dtype)
        if cfg.bgr:
            control = control[..., ::-1]
        x = self.conv_in(x) + self.controlnet_cond_embedding(control)
        skips = [x]
        for block in self.down_blocks:
            x, new = block(x, temb, context)
            skips += new
        x = self.mid_block(x, temb, context)
        down = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        if cfg.global_pool_conditions:
            down = [d.mean(axis=(1, 2), keepdims=True) for d in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return down, mid

    def _added_embedding(self, added_cond: dict[str, jax.Array] | None) -> jax.Array:
        """SDXL's "text_time" embedding, as the UNet's."""
        u = self.config.unet
        if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise ValueError("this ControlNet has SDXL's added conditioning: pass added_cond "
                             "with text_embeds and time_ids")
        text, ids = added_cond["text_embeds"], added_cond["time_ids"]
        times = timestep_embedding(jnp.asarray(ids, jnp.float32).reshape(-1),
                                   u.addition_time_embed_dim, flip_sin_to_cos=u.flip_sin_to_cos,
                                   freq_shift=u.freq_shift).reshape(ids.shape[0], -1)
        return self.add_embedding(jnp.concatenate([text.astype(jnp.float32), times],
                                                  axis=-1).astype(self.dtype))
