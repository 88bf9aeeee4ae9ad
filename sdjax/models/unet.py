"""UNet2DConditionModel of Stable Diffusion 1.x/2.x and SDXL: the latent-space noise predictor.

NHWC throughout. Module attribute names follow diffusers' so that the weight table
(``sdjax/weights/table_unet.py``) is a handful of regular expressions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.config_util import config_from_dict
from sdjax.models.layers import (
    Attention,
    Downsample2D,
    Dtype,
    GroupNorm,
    LayerNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv,
    linear,
    timestep_embedding,
)

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID_CROSS = "UNetMidBlock2DCrossAttn"

# diffusers UNet2DConditionModel options we do not implement, with the values under which they
# leave the network exactly as we build it. Any other value changes the math, so it is refused.
_MUST_BE_DEFAULT: dict[str, tuple] = {
    "class_embed_type": (None,),
    "class_embeddings_concat": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
# Keys that cannot change inference: dropout is off at inference, and the number of heads of
# the addition embedding belongs to the "text_image" type, which we refuse.
_NO_EFFECT = {"dropout", "addition_embed_type_num_heads"}
# Keys whose None means something other than "use the default"; we do not build those variants.
_NONE_NOT_SUPPORTED = {"norm_num_groups", "attention_head_dim", "mid_block_type"}
_TUPLES = ("down_block_types", "up_block_types", "block_out_channels", "attention_head_dim",
           "num_attention_heads", "sample_size", "only_cross_attention",
           "transformer_layers_per_block")
TEXT_TIME = "text_time"


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The UNet2DConditionModel config fields SD 1.x/2.x use. Defaults are diffusers' own, so
    a sparse ``config.json`` means the same network here as there."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    mid_block_type: str = MID_CROSS
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    # True (or per level): the first attention of each transformer block also attends to the
    # text instead of the image (the x4 upscaler's layout).
    only_cross_attention: bool | tuple[bool, ...] = False
    mid_block_only_cross_attention: bool | None = None
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    # One int, or one per level (SDXL: 1, 2, 10); the mid block takes the last level's.
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # diffusers' naming quirk: with num_attention_heads unset, attention_head_dim is the number
    # of heads per level (SD1: 8 heads everywhere; SD2: 5/10/20/20 heads of width 64).
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False  # layout of proj_in/proj_out weights only
    upcast_attention: bool = False  # our attention logits/softmax are float32 anyway
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # A learned embedding of an integer class label added to the time embedding (the x4
    # upscaler's noise level).
    num_class_embeds: int | None = None
    # SDXL's added conditioning ("text_time"): the pooled text embedding and the sinusoidal
    # embeddings (addition_time_embed_dim wide each) of the size/crop/aesthetic "time ids",
    # through an MLP from projection_class_embeddings_input_dim, added to the time embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        levels = len(self.block_out_channels)
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ValueError("UNet down_block_types, up_block_types and block_out_channels "
                             "must have the same length")
        for key, kinds, allowed in (("down_block_types", self.down_block_types,
                                     (CROSS_DOWN, PLAIN_DOWN)),
                                    ("up_block_types", self.up_block_types,
                                     (CROSS_UP, PLAIN_UP))):
            for kind in kinds:
                if kind not in allowed:
                    raise ValueError(f"UNet {key}: block type {kind!r} is not supported "
                                     f"(supported: {', '.join(allowed)})")
        if self.mid_block_type != MID_CROSS:
            raise ValueError(f"UNet mid_block_type {self.mid_block_type!r} is not supported "
                             f"(supported: {MID_CROSS})")
        if isinstance(self.only_cross_attention, tuple):
            _require(len(self.only_cross_attention) == levels, "only_cross_attention",
                     "must be one bool or one per level")
        _require(not self.dual_cross_attention, "dual_cross_attention",
                 "dual_cross_attention=True is not supported")
        _require(self.act_fn in ("silu", "swish"), "act_fn",
                 f"act_fn {self.act_fn!r} is not supported (only silu)")
        for key in ("layers_per_block", "cross_attention_dim"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value >= 1, key,
                     f"{key} must be one positive int (per-level lists are not supported), "
                     f"got {value!r}")
        for key in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, key)
            if isinstance(value, tuple):
                _require(len(value) == levels and all(isinstance(v, int) for v in value), key,
                         f"{key} must be an int or one int per level, got {value!r}")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            _require(getattr(self, key) % 2 == 1, key, f"{key} must be odd")
        _require(self.downsample_padding in (0, 1), "downsample_padding",
                 "downsample_padding must be 0 or 1")
        _require(all(d >= 1 for d in self.depth_per_level()), "transformer_layers_per_block",
                 "must be positive")
        _require(self.addition_embed_type in (None, TEXT_TIME), "addition_embed_type",
                 f"{self.addition_embed_type!r} is not supported (supported: None, "
                 f"{TEXT_TIME!r})")
        if self.addition_embed_type == TEXT_TIME:
            _require(bool(self.addition_time_embed_dim) and
                     bool(self.projection_class_embeddings_input_dim), "addition_embed_type",
                     "'text_time' needs addition_time_embed_dim and "
                     "projection_class_embeddings_input_dim")

    def depth_per_level(self) -> tuple[int, ...]:
        """Transformer blocks per attention at each level (down order); the up path mirrors
        it and the mid block takes the deepest level's (diffusers' defaults)."""
        value = self.transformer_layers_per_block
        return (value,) * len(self.block_out_channels) if isinstance(value, int) else value

    def heads_per_level(self) -> tuple[int, ...]:
        """Number of attention heads at each level (down order), diffusers' way: the number of
        heads is ``num_attention_heads or attention_head_dim``."""
        heads = self.num_attention_heads or self.attention_head_dim
        if isinstance(heads, int):
            heads = (heads,) * len(self.block_out_channels)
        return tuple(heads)

    def only_cross_per_level(self) -> tuple[bool, ...]:
        """only_cross_attention of each level (down order)."""
        value = self.only_cross_attention
        return (value,) * len(self.block_out_channels) if isinstance(value, bool) else value

    @property
    def mid_only_cross(self) -> bool:
        """diffusers: the mid block follows a single only_cross_attention bool unless told."""
        if self.mid_block_only_cross_attention is not None:
            return self.mid_block_only_cross_attention
        return self.only_cross_attention if isinstance(self.only_cross_attention, bool) else False

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5)."""
        return cls(sample_size=64, cross_attention_dim=768, attention_head_dim=8)

    @classmethod
    def sd21(cls) -> UNetConfig:
        """Stable Diffusion 2.x 768 v-model (stabilityai/stable-diffusion-2-1)."""
        return cls(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                   use_linear_projection=True, upcast_attention=True)

    @classmethod
    def sdxl_base(cls) -> UNetConfig:
        """SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0)."""
        return cls(sample_size=128, down_block_types=(PLAIN_DOWN, CROSS_DOWN, CROSS_DOWN),
                   up_block_types=(CROSS_UP, CROSS_UP, PLAIN_UP),
                   block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                   transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                   use_linear_projection=True, addition_embed_type=TEXT_TIME,
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)

    @classmethod
    def sdxl_refiner(cls) -> UNetConfig:
        """SDXL 1.0 refiner: four levels, 1280-wide context (text_encoder_2 only), and an
        aesthetic score in place of the target size among the time ids."""
        return cls(sample_size=128,
                   down_block_types=(PLAIN_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN),
                   up_block_types=(PLAIN_UP, CROSS_UP, CROSS_UP, PLAIN_UP),
                   block_out_channels=(384, 768, 1536, 1536), cross_attention_dim=1280,
                   transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
                   use_linear_projection=True, addition_embed_type=TEXT_TIME,
                   addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Parse a diffusers ``unet/config.json`` dict. Keys for features we do not build raise
        a ValueError naming the key, unless they hold the value that leaves the math as ours."""
        class_name = d.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise ValueError(f"UNet config _class_name {class_name!r} is not "
                             "UNet2DConditionModel")
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in d.items():
            if key.startswith("_") or key in _NO_EFFECT:
                continue
            if key in _MUST_BE_DEFAULT:
                if value not in _MUST_BE_DEFAULT[key]:
                    raise ValueError(f"UNet config {key}={value!r} is not supported (sdjax builds "
                                     f"SD 1.x/2.x UNets; supported: {_MUST_BE_DEFAULT[key]})")
            elif key not in fields:
                raise ValueError(f"unknown UNet config key {key!r} (={value!r}): sdjax cannot "
                                 "tell whether it changes the network")
            elif value is None and key in _NONE_NOT_SUPPORTED:
                raise ValueError(f"UNet config {key}=None is not supported")
            elif isinstance(value, list) and key not in _TUPLES:
                raise ValueError(f"UNet config {key}={value!r}: per-level lists are not "
                                 "supported for this key")
            elif isinstance(value, list) and any(v is None for v in value):
                raise ValueError(f"UNet config {key}={value!r}: None entries are not supported")
            elif isinstance(value, list) and any(isinstance(v, list) for v in value):
                raise ValueError(f"UNet config {key}={value!r}: nested per-layer lists are not "
                                 "supported")
        return config_from_dict(cls, d, tuples=_TUPLES)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"UNet config {key}: {message}")


class FeedForward(nnx.Module):
    """GEGLU feed-forward: diffusers' ``ff.net.0.proj`` is ``geglu``, ``ff.net.2`` is ``out``."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs, mult: int = 4):
        inner = dim * mult
        self.geglu = linear(dim, 2 * inner, dtype=dtype, rngs=rngs)
        self.out = linear(inner, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.geglu(x), 2, axis=-1)
        return self.out(h * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention on the text, GEGLU MLP; each residual."""

    def __init__(self, dim: int, *, heads: int, head_dim: int, context_dim: int, dtype,
                 rngs: nnx.Rngs, only_cross: bool = False):
        self.only_cross = only_cross
        self.norm1 = LayerNorm(dim, dtype=dtype)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim,
                               context_dim=context_dim if only_cross else None, dtype=dtype,
                               rngs=rngs)
        self.norm2 = LayerNorm(dim, dtype=dtype)
        self.attn2 = Attention(dim, heads=heads, head_dim=head_dim, context_dim=context_dim,
                               dtype=dtype, rngs=rngs)
        self.norm3 = LayerNorm(dim, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        h = self.norm1(x)
        x = x + (self.attn1(h, context) if self.only_cross else self.attn1(h))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, added to the input.

    SD1 stores proj_in/proj_out as 1x1 convs and SD2 as linears (``use_linear_projection``);
    on NHWC both are the same per-pixel linear map, so one layer serves both layouts."""

    def __init__(self, channels: int, *, heads: int, context_dim: int, depth: int, groups: int,
                 dtype, rngs: nnx.Rngs, only_cross: bool = False):
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype)
        self.proj_in = linear(channels, inner, dtype=dtype, rngs=rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads=heads, head_dim=head_dim, context_dim=context_dim,
                                  dtype=dtype, rngs=rngs, only_cross=only_cross)
            for _ in range(depth)])
        self.proj_out = linear(inner, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x)).reshape(b, h * w, -1)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens).reshape(b, h, w, c)


@dataclasses.dataclass(frozen=True)
class _LevelSpec:
    """What a down/up block at one level needs besides channel counts."""

    temb: int
    groups: int
    eps: float
    heads: int | None  # None: no attention at this level
    context_dim: int
    depth: int
    only_cross: bool = False


def _transformer(channels: int, spec: _LevelSpec, *, dtype, rngs) -> Transformer2DModel:
    return Transformer2DModel(channels, heads=spec.heads, context_dim=spec.context_dim,
                              depth=spec.depth, groups=spec.groups, dtype=dtype, rngs=rngs,
                              only_cross=spec.only_cross)


def _resnet(cin: int, cout: int, spec: _LevelSpec, *, dtype, rngs,
            output_scale_factor: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(cin, cout, temb_channels=spec.temb, groups=spec.groups, eps=spec.eps,
                         output_scale_factor=output_scale_factor, dtype=dtype, rngs=rngs)


class DownBlock(nnx.Module):
    """diffusers' CrossAttnDownBlock2D (``spec.heads`` set) or DownBlock2D. Returns the output
    and every intermediate state the up path will concatenate back."""

    def __init__(self, cin: int, cout: int, *, layers: int, spec: _LevelSpec, downsample: bool,
                 padding: int, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([_resnet(cin if i == 0 else cout, cout, spec, dtype=dtype,
                                         rngs=rngs) for i in range(layers)])
        self.attentions = (nnx.List([_transformer(cout, spec, dtype=dtype, rngs=rngs)
                                     for _ in range(layers)])
                           if spec.heads is not None else None)
        self.downsamplers = (nnx.List([Downsample2D(cout, padding=padding, dtype=dtype,
                                                    rngs=rngs)])
                             if downsample else None)

    def __call__(self, x: jax.Array, temb: jax.Array,
                 context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) pairs."""

    def __init__(self, channels: int, *, spec: _LevelSpec, output_scale_factor: float, dtype,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([_resnet(channels, channels, spec, dtype=dtype, rngs=rngs,
                                         output_scale_factor=output_scale_factor)
                                 for _ in range(2)])
        self.attentions = nnx.List([_transformer(channels, spec, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x, context), temb)
        return x


class UpBlock(nnx.Module):
    """diffusers' CrossAttnUpBlock2D (``spec.heads`` set) or UpBlock2D: each resnet takes the
    running state concatenated (channels last) with the most recent unused skip."""

    def __init__(self, cin: int, skip_channels: list[int], cout: int, *, spec: _LevelSpec,
                 upsample: bool, dtype, rngs: nnx.Rngs):
        ins = [cin] + [cout] * (len(skip_channels) - 1)
        self.resnets = nnx.List([_resnet(c + s, cout, spec, dtype=dtype, rngs=rngs)
                                 for c, s in zip(ins, skip_channels, strict=True)])
        self.attentions = (nnx.List([_transformer(cout, spec, dtype=dtype, rngs=rngs)
                                     for _ in skip_channels])
                           if spec.heads is not None else None)
        self.upsamplers = (nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)])
                           if upsample else None)

    def __call__(self, x: jax.Array, skips: list[jax.Array], temb: jax.Array, context: jax.Array,
                 output_size: tuple[int, int] | None) -> jax.Array:
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[i]], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, output_size)
        return x


class UNet2DConditionModel(nnx.Module):
    """Noisy latents (B, h, w, C) NHWC, timesteps (B,) or scalar (float allowed: Euler-type
    schedulers use fractional ones), text states (B, T, D) -> noise (or v) prediction NHWC.

    Computes in ``dtype`` (the parameters are stored in it); the timestep embedding, GroupNorm
    and LayerNorm statistics and attention softmax stay in float32."""

    def __init__(self, cfg: UNetConfig, *, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        ch = cfg.block_out_channels
        heads = cfg.heads_per_level()
        levels = len(ch)

        only_cross = cfg.only_cross_per_level()
        depth = cfg.depth_per_level()

        def spec(level: int, cross: bool, mid: bool = False) -> _LevelSpec:
            return _LevelSpec(temb=cfg.time_embed_dim, groups=cfg.norm_num_groups,
                              eps=cfg.norm_eps, heads=heads[level] if cross else None,
                              context_dim=cfg.cross_attention_dim,
                              depth=depth[level],
                              only_cross=cfg.mid_only_cross if mid else only_cross[level])

        self.conv_in = conv(cfg.in_channels, ch[0], cfg.conv_in_kernel, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, dtype=dtype,
                                                rngs=rngs)
        self.class_embedding = (nnx.Embed(cfg.num_class_embeds, cfg.time_embed_dim,
                                          dtype=dtype, param_dtype=dtype, rngs=rngs)
                                if cfg.num_class_embeds else None)
        self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim,
                                                cfg.time_embed_dim, dtype=dtype, rngs=rngs)
                              if cfg.addition_embed_type == TEXT_TIME else None)

        # Channel count of every state the down path hands to the up path, in push order.
        skip_channels = [ch[0]]
        down = []
        for i, kind in enumerate(cfg.down_block_types):
            last = i == levels - 1
            down.append(DownBlock(ch[max(i - 1, 0)], ch[i], layers=cfg.layers_per_block,
                                  spec=spec(i, kind == CROSS_DOWN), downsample=not last,
                                  padding=cfg.downsample_padding, dtype=dtype, rngs=rngs))
            skip_channels += [ch[i]] * (cfg.layers_per_block + (0 if last else 1))
        self.down_blocks = nnx.List(down)

        self.mid_block = MidBlock(ch[-1], spec=spec(levels - 1, True, mid=True),
                                  output_scale_factor=cfg.mid_block_scale_factor, dtype=dtype,
                                  rngs=rngs)

        up = []
        x_channels = ch[-1]
        for i, kind in enumerate(cfg.up_block_types):
            level = levels - 1 - i
            n = cfg.layers_per_block + 1
            taken, skip_channels = skip_channels[-n:][::-1], skip_channels[:-n]
            up.append(UpBlock(x_channels, taken, ch[level], spec=spec(level, kind == CROSS_UP),
                              upsample=level > 0, dtype=dtype, rngs=rngs))
            x_channels = ch[level]
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps, dtype=dtype)
        self.conv_out = conv(ch[0], cfg.out_channels, cfg.conv_out_kernel, dtype=dtype,
                             rngs=rngs)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | float,
                 encoder_hidden_states: jax.Array,
                 class_labels: jax.Array | None = None,
                 added_cond: dict[str, jax.Array] | None = None,
                 down_residuals: Sequence[jax.Array] | None = None,
                 mid_residual: jax.Array | None = None) -> jax.Array:
        """``added_cond`` (SDXL): ``text_embeds`` (B, D) pooled text and ``time_ids`` (B, k).
        ``down_residuals`` (one per skip connection: the conv_in output, then each down
        block's resnets and downsampler, in order) and ``mid_residual`` are added to the skips
        and to the mid block's output, as diffusers' ``down_block_additional_residuals`` and
        ``mid_block_additional_residual``: what a ControlNet feeds the UNet."""
        cfg = self.config
        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (x.shape[0],))
        temb = timestep_embedding(t, cfg.block_out_channels[0],
                                  flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        temb = self.time_embedding(temb.astype(self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet has a class embedding: pass class_labels")
            temb = temb + self.class_embedding(jnp.asarray(class_labels, jnp.int32))
        if self.add_embedding is not None:
            temb = temb + self._added_embedding(added_cond)
        context = encoder_hidden_states.astype(self.dtype)

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, new = block(x, temb, context)
            skips += new
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down residuals for {len(skips)} skips")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals, strict=True)]
        x = self.mid_block(x, temb, context)
        if mid_residual is not None:
            x = x + mid_residual.astype(x.dtype)
        for block in self.up_blocks:
            n = len(block.resnets)
            taken, skips = skips[-n:][::-1], skips[:-n]
            # Upsample to the next skip's size, which is how odd latent sizes line up; the
            # common even case keeps the plain 2x repeat (no gather).
            size = tuple(skips[-1].shape[1:3]) if skips else None
            if size == (2 * x.shape[1], 2 * x.shape[2]):
                size = None
            x = block(x, taken, temb, context, size)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))

    def _added_embedding(self, added_cond: dict[str, jax.Array] | None) -> jax.Array:
        """SDXL's "text_time" embedding: [pooled text, sinusoid of each time id] -> MLP."""
        cfg = self.config
        if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
            raise ValueError("this UNet has SDXL's added conditioning: pass added_cond with "
                             "text_embeds and time_ids")
        text, ids = added_cond["text_embeds"], added_cond["time_ids"]
        times = timestep_embedding(jnp.asarray(ids, jnp.float32).reshape(-1),
                                   cfg.addition_time_embed_dim,
                                   flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        times = times.reshape(ids.shape[0], -1)
        return self.add_embedding(jnp.concatenate([text.astype(jnp.float32), times],
                                                  axis=-1).astype(self.dtype))
