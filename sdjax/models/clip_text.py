"""CLIP text transformer (the text tower of CLIP), as used by Stable Diffusion 1.x and 2.x, and
SDXL's second encoder with its text projection (transformers' CLIPTextModelWithProjection)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models.config_util import config_from_dict
from sdjax.models.layers import LayerNorm, attention, linear

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # The pooled output reads the first end-of-text token; configs from before transformers
    # fixed this id (it said 2) meant the highest id, which is where the old code looked.
    eos_token_id: int = 2
    projection_dim: int = 768  # width of text_projection (CLIPTextModelWithProjection only)

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported CLIP hidden_act {self.hidden_act!r}; "
                             f"known: {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("CLIP hidden_size must divide into num_attention_heads")

    @classmethod
    def sd15(cls) -> CLIPTextConfig:
        """OpenAI CLIP ViT-L/14 text tower."""
        return cls()

    @classmethod
    def sd21(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-H/14 text tower as diffusers exports it (last layer dropped)."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, hidden_act="gelu", projection_dim=512)

    @classmethod
    def sdxl_2(cls) -> CLIPTextConfig:
        """OpenCLIP ViT-bigG/14 text tower, SDXL's text_encoder_2 (with its projection)."""
        return cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, hidden_act="gelu", projection_dim=1280)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
        # Full CLIPConfig files nest the text tower under "text_config".
        return config_from_dict(cls, d.get("text_config", d))


class CLIPEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                         param_dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                            dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj = linear(d, d, dtype=dtype, rngs=rngs)
        self.k_proj = linear(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = linear(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads,
                        is_causal=True)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        eps = cfg.layer_norm_eps
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        self.self_attn = CLIPAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        self.mlp = CLIPMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, skip: int = 0) -> jax.Array:
        """The hidden state after all layers but the last ``skip``."""
        for layer in self.layers[:len(self.layers) - skip]:
            x = layer(x)
        return x


class CLIPTextModel(nnx.Module):
    """Token ids (B, T) -> last hidden state (B, T, D), after the final layer norm.

    Attention is causal, so padding after the end token never changes earlier positions and
    no attention mask is needed (Stable Diffusion pipelines pass none either)."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, input_ids: jax.Array, clip_skip: int = 1) -> jax.Array:
        """``clip_skip`` > 1 (the WebUI's "Clip skip"): the hidden state ``clip_skip - 1``
        layers before the last, through the final layer norm (the later layers do not run)."""
        if not 1 <= clip_skip <= len(self.encoder.layers):
            raise ValueError(f"clip_skip must be in [1, {len(self.encoder.layers)}] for this "
                             f"text encoder, got {clip_skip}")
        hidden = self.encoder(self.embeddings(input_ids), skip=clip_skip - 1)
        return self.final_layer_norm(hidden)

    def hidden_states(self, input_ids: jax.Array) -> list[jax.Array]:
        """transformers' ``output_hidden_states``: the embeddings, then each layer's output
        (none layer-normed). SDXL conditions on ``[-2]``; XLA drops the layers after the one
        used."""
        states = [self.embeddings(input_ids)]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return states

    def pool(self, input_ids: jax.Array, last_hidden: jax.Array) -> jax.Array:
        """(B, D): the layer-normed final state at each sequence's end-of-text token."""
        eos = self.config.eos_token_id
        where = (jnp.argmax(input_ids, axis=-1) if eos == 2
                 else jnp.argmax(input_ids == eos, axis=-1))
        normed = self.final_layer_norm(last_hidden)
        return jnp.take_along_axis(normed, where[:, None, None], axis=1)[:, 0]


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIPTextModel plus ``text_projection`` (no bias) of the pooled output: SDXL's second
    text encoder, whose projected pooled output is the UNet's ``text_embeds``."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.text_projection = linear(cfg.hidden_size, cfg.projection_dim, use_bias=False,
                                      dtype=dtype, rngs=rngs)

    def penultimate_and_pooled(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the penultimate layer's states (B, T, D), the projected pooled output (B, P))."""
        states = self.hidden_states(input_ids)
        return states[-2], self.text_projection(self.pool(input_ids, states[-1]))
