"""Building blocks shared by the VAE and the UNet (and norms/attention used by CLIP).

Everything is NHWC. Attribute names follow diffusers' module names so the weight mapping
tables stay readable side by side with the PyTorch checkpoints.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = jnp.dtype


def linear(in_features: int, out_features: int, *, dtype: Dtype, rngs: nnx.Rngs,
           use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                      param_dtype=dtype, rngs=rngs)


# The WebUI's seamless tiling: every convolution whose own padding is symmetric (torch's
# Conv2d ``padding=p``) pads circularly instead of with zeros, as torch's
# ``padding_mode="circular"`` does. Read while a program is traced, so the sampler compiles
# it in (``sampling.CoreSpec.tiling``); explicit asymmetric zero pads (the VAE encoder's
# Downsample2D, an ``F.pad`` before a ``padding=0`` conv in torch) stay zeros, as there.
_CIRCULAR = contextvars.ContextVar("sdjax_circular_padding", default=False)


@contextlib.contextmanager
def circular_padding(on: bool = True) -> Iterator[None]:
    """Within this block (while tracing), the networks' convolutions pad circularly."""
    token = _CIRCULAR.set(bool(on))
    try:
        yield
    finally:
        _CIRCULAR.reset(token)


def _conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
    """``lax.conv_general_dilated``, its symmetric explicit padding made circular (a wrap
    pad, then a VALID convolution) inside :func:`circular_padding`."""
    if _CIRCULAR.get() and not isinstance(padding, str):
        pads = [tuple(p) for p in padding]
        if any(lo for lo, _ in pads) and all(lo == hi for lo, hi in pads):
            lhs = jnp.pad(lhs, [(0, 0), *pads, (0, 0)], mode="wrap")
            padding = "VALID"
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def conv(in_channels: int, out_channels: int, kernel: int, *, dtype: Dtype, rngs: nnx.Rngs,
         stride: int = 1, padding: int | tuple = "SAME_AS_TORCH") -> nnx.Conv:
    if padding == "SAME_AS_TORCH":
        padding = kernel // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(in_channels, out_channels, kernel_size=(kernel, kernel),
                    strides=(stride, stride), padding=padding, dtype=dtype,
                    param_dtype=dtype, rngs=rngs,
                    conv_general_dilated=_conv_general_dilated)


class GroupNorm(nnx.Module):
    """GroupNorm whose statistics are always computed in float32 (bf16/fp16 variance
    underflows on SD activations); the output is cast back to the input dtype."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
                 dtype: Dtype = jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"{num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_channels,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # Reduce over space per channel first, then over each group's channels: XLA:CPU runs
        # this up to 4x faster than one reduction over (space, group channels) at UNet/VAE
        # shapes, and about as fast at the others (python -m benchmarks.cpu_ops).
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        xf = x.astype(jnp.float32).reshape(b, -1, c)
        n = xf.shape[1] * (c // g)

        def group_mean(channel_sums: jax.Array) -> jax.Array:  # (B, C) -> (B, 1, C)
            per_group = channel_sums.reshape(b, g, c // g).sum(-1) / n
            return jnp.repeat(per_group, c // g, axis=1)[:, None, :]

        centred = xf - group_mean(xf.sum(1))
        var = group_mean(jnp.square(centred).sum(1))
        y = centred * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.reshape(x.shape).astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with float32 statistics."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, dtype: Dtype = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(axis=-1, keepdims=True)
        var = jnp.square(xf - mean).mean(axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def _use_cudnn(q: jax.Array) -> bool:
    # cuDNN's fused kernel wants half precision and head sizes it supports; everything
    # else (CPU, TPU, float32) takes XLA's implementation, which keeps softmax in float32.
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


# Logit elements per step of the CPU attention: a step's float32 logits (about 2 MB) stay in
# the cache between the two products and the softmax. Wide heads (the VAE's single 512-wide head)
# spend more per logit on the products, so their blocks may be 4x larger. Measured at 1024 and
# 4096 tokens with 1-8 heads of 40-512 (python -m benchmarks.cpu_ops).
_CPU_BLOCK_ELEMENTS = 1 << 19
_CPU_WIDE_HEAD = 256


def _cpu_blocks(heads: int, t: int, s: int, d: int) -> tuple[int, int]:
    """(heads per step, queries per block) for :func:`_attention_cpu`."""
    budget = _CPU_BLOCK_ELEMENTS * (4 if d >= _CPU_WIDE_HEAD else 1)
    if t * s <= budget:
        block = t
    else:
        block = 64
        while block * 2 * s <= budget and block * 2 < t:
            block *= 2
    if block < t:
        return 1, block
    # Short sequences (cross-attention, CLIP) batch a few heads per step instead; up to twice
    # the budget: their steps are short, and fewer of them cost less loop overhead.
    group = max(g for g in range(1, heads + 1) if heads % g == 0
                and (g == 1 or g * t * s <= 2 * budget))
    return group, block


def _attention_cpu(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool) -> jax.Array:
    """XLA:CPU form of softmax(q k^T / sqrt(d)) v on (B, T, N, D) float inputs.

    A few heads and one block of queries at a time, in a loop (``lax.map``) rather than all
    heads batched: batched over SD 1.5's 8 heads at 4096 tokens the logits were 64 MB per
    block and 3.7x slower than this, which keeps each step's logits in cache. The softmax is
    normalised after the value product (T*D divisions, not T*S). Logits and softmax are
    float32."""
    b, t, n, _ = q.shape
    s = k.shape[1]
    scale = np.float32(1 / math.sqrt(q.shape[-1]))
    group, block = _cpu_blocks(b * n, t, s, q.shape[-1])
    # (B*N/group, group, T|S, D)
    q, k, v = (a.transpose(0, 2, 1, 3).reshape(b * n // group, group, a.shape[1], a.shape[3])
               for a in (q, k, v))
    whole = t - t % block

    def one_block(qb: jax.Array, start: jax.Array | int, kh: jax.Array,
                  vh: jax.Array) -> jax.Array:
        logits = jnp.einsum("gtd,gsd->gts", qb, kh, preferred_element_type=jnp.float32)
        logits = logits * scale
        if is_causal:
            rows = start + jnp.arange(qb.shape[1])[:, None]
            logits = jnp.where(rows >= jnp.arange(s)[None, :], logits, -jnp.inf)
        weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        out = jnp.einsum("gts,gsd->gtd", weights.astype(vh.dtype), vh,
                         preferred_element_type=jnp.float32)
        return out / weights.sum(-1, keepdims=True)

    def heads_step(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        qh, kh, vh = args
        if whole == t and block == t:
            return one_block(qh, 0, kh, vh)
        parts = []
        if whole:
            blocks = qh[:, :whole].reshape(group, whole // block, block, -1).swapaxes(0, 1)
            out = jax.lax.map(lambda a: one_block(a[0], a[1], kh, vh),
                              (blocks, jnp.arange(0, whole, block)))
            parts.append(out.swapaxes(0, 1).reshape(group, whole, -1))
        if whole < t:
            parts.append(one_block(qh[:, whole:], whole, kh, vh))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    steps = q.shape[0]
    out = heads_step((q[0], k[0], v[0]))[None] if steps == 1 else \
        jax.lax.map(heads_step, (q, k, v))  # (B*N/group, group, T, Dv)
    return out.reshape(b, n, t, -1).transpose(0, 2, 1, 3)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *,
              is_causal: bool = False) -> jax.Array:
    """Multi-head scaled dot-product attention on (B, T, D) inputs.

    GPUs and TPUs go through ``jax.nn.dot_product_attention`` (GPUs get the fused cuDNN
    kernel in half precision); CPUs through :func:`_attention_cpu`. The logits and softmax
    are float32 outside cuDNN, which is also what diffusers'
    ``upcast_attention``/``upcast_softmax`` ask for.
    """
    b, t, d = q.shape
    s = k.shape[1]
    q = q.reshape(b, t, heads, d // heads)
    k = k.reshape(b, s, heads, d // heads)
    v = v.reshape(b, s, heads, v.shape[-1] // heads)
    dtype = q.dtype
    if jax.default_backend() == "cpu":
        if dtype == jnp.float16:
            # XLA:CPU has no float16 x float16 -> float32 dot.
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        return _attention_cpu(q, k, v, is_causal).reshape(b, t, -1).astype(dtype)
    impl = "cudnn" if _use_cudnn(q) else "xla"
    try:
        out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation=impl)
    except (ValueError, NotImplementedError, RuntimeError):
        if impl == "xla":
            raise
        out = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
    return out.reshape(b, t, -1).astype(dtype)


class Attention(nnx.Module):
    """diffusers' ``Attention`` (to_q/to_k/to_v/to_out.0) on token sequences (B, T, D).

    ``context_dim`` set = cross-attention; the VAE mid-block uses it with one head and
    biased projections.
    """

    def __init__(self, query_dim: int, *, heads: int, head_dim: int,
                 context_dim: int | None = None, qkv_bias: bool = False,
                 dtype: Dtype, rngs: nnx.Rngs):
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = linear(query_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_k = linear(context_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_v = linear(context_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_out = linear(inner, query_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-Conv twice, with an optional time-embedding shift and a 1x1 shortcut
    when the channel count changes (diffusers' ``ResnetBlock2D``, default options)."""

    def __init__(self, in_channels: int, out_channels: int, *, temb_channels: int | None,
                 groups: int, eps: float, dtype: Dtype, rngs: nnx.Rngs,
                 output_scale_factor: float = 1.0):
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.time_emb_proj = (linear(temb_channels, out_channels, dtype=dtype, rngs=rngs)
                              if temb_channels else None)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, dtype=dtype)
        self.conv2 = conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (conv(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv. ``padding=0`` is the VAE encoder's variant, which pads only the
    bottom/right edge by one before the conv (as the original LDM code did)."""

    def __init__(self, channels: int, *, padding: int, dtype: Dtype, rngs: nnx.Rngs):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = conv(channels, channels, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.conv = conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        if output_size is None:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            # An explicit size is how the UNet matches an odd-sized skip connection; torch's
            # "nearest" then reads source index floor(i * in / out).
            rows = np.arange(output_size[0]) * x.shape[1] // output_size[0]
            cols = np.arange(output_size[1]) * x.shape[2] // output_size[1]
            x = x[:, rows][:, :, cols]
        return self.conv(x)


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps, computed in float32 (diffusers'
    ``get_timestep_embedding``)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """Linear-SiLU-Linear MLP on the sinusoidal embedding."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
        self.linear_1 = linear(in_channels, time_embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
