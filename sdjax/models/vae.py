"""AutoencoderKL: the Stable Diffusion VAE (encoder to a diagonal Gaussian, decoder back)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.config_util import config_from_dict
from sdjax.models.layers import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    attention,
    conv,
    linear,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    force_upcast: bool = True
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    act_fn: str = "silu"

    def __post_init__(self):
        if set(self.down_block_types) != {"DownEncoderBlock2D"} or set(
                self.up_block_types) != {"UpDecoderBlock2D"}:
            raise ValueError("only DownEncoderBlock2D/UpDecoderBlock2D VAEs are supported")
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError("VAE down_block_types and block_out_channels differ in length")
        if self.act_fn != "silu":
            raise ValueError(f"unsupported VAE act_fn {self.act_fn!r}")
        if self.shift_factor not in (None, 0, 0.0):
            raise ValueError("VAE shift_factor is not supported (SD 1.x/2.x VAEs have none)")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side: one factor of 2 per level but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd15(cls) -> VAEConfig:
        return cls()

    @classmethod
    def sd21(cls) -> VAEConfig:
        return cls(sample_size=768)

    @classmethod
    def sdxl(cls) -> VAEConfig:
        """SDXL's VAE: SD's architecture, its own weights and latent scale. Its float16 decode
        overflows, hence force_upcast (float16 pipelines run it in float32)."""
        return cls(sample_size=1024, scaling_factor=0.13025, force_upcast=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        return config_from_dict(cls, d, tuples=("block_out_channels", "down_block_types",
                                                "up_block_types"))


class SpatialSelfAttention(nnx.Module):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual
    (diffusers' ``Attention`` as the VAE mid-block configures it)."""

    def __init__(self, channels: int, *, groups: int, dtype, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype)
        self.to_q = linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_k = linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_v = linear(channels, channels, dtype=dtype, rngs=rngs)
        self.to_out = linear(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        out = attention(self.to_q(t), self.to_k(t), self.to_v(t), heads=1)
        return x + self.to_out(out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        g = cfg.norm_num_groups
        self.resnets = nnx.List([
            ResnetBlock2D(channels, channels, temb_channels=None, groups=g, eps=1e-6,
                          dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List(
            [SpatialSelfAttention(channels, groups=g, dtype=dtype, rngs=rngs)]
            if cfg.mid_block_add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class EncoderBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, *, groups: int, downsample: bool, dtype,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None, groups=groups,
                          eps=1e-6, dtype=dtype, rngs=rngs) for i in range(n)])
        self.downsamplers = nnx.List(
            [Downsample2D(cout, padding=0, dtype=dtype, rngs=rngs)] if downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class DecoderBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, n: int, *, groups: int, upsample: bool, dtype,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None, groups=groups,
                          eps=1e-6, dtype=dtype, rngs=rngs) for i in range(n)])
        self.upsamplers = nnx.List(
            [Upsample2D(cout, dtype=dtype, rngs=rngs)] if upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        ch = cfg.block_out_channels
        g = cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups=g,
                         downsample=i < len(ch) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], cfg, dtype=dtype, rngs=rngs)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=1e-6, dtype=dtype)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        ch = tuple(reversed(cfg.block_out_channels))
        g = cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, ch[0], 3, dtype=dtype, rngs=rngs)
        self.mid_block = MidBlock(ch[0], cfg, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups=g,
                         upsample=i < len(ch) - 1, dtype=dtype, rngs=rngs)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=1e-6, dtype=dtype)
        self.conv_out = conv(ch[-1], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Images NHWC in [-1, 1] <-> latents NHWC (unscaled: multiply by
    ``config.scaling_factor`` for the diffusion model, divide before decoding)."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = (conv(2 * lc, 2 * lc, 1, dtype=dtype, rngs=rngs)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (conv(lc, lc, 1, dtype=dtype, rngs=rngs)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (mean, logvar) of the latent distribution; logvar clipped to [-30, 20] as the
        reference does, so exp() stays finite."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x)[0])
