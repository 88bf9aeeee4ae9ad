"""task="clip": train a CLIP text encoder contrastively against a small image tower.

Both towers project into a shared space; the symmetric cross-entropy over the batch's
text-image similarity matrix pulls each caption towards its image. Captions that occur
twice in a batch (frequent with small caption vocabularies) are all counted as matches
instead of being pushed apart as negatives. Only the text encoder is exported; the image
tower and the projections exist to train it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sdjax.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdjax.models.layers import GroupNorm, conv, linear
from sdjax.train import components
from sdjax.train.config import ContrastiveConfig, TrainConfig
from sdjax.train.data import to_unit_range
from sdjax.train.task import Metrics, Setup, remat
from sdjax.weights import export

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature here


class ImageTower(nnx.Module):
    """Stride-2 conv stages (GroupNorm, SiLU), global average pool, linear projection."""

    def __init__(self, channels: tuple[int, ...], out_dim: int, *, dtype, rngs: nnx.Rngs):
        ins = (3, *channels[:-1])
        self.convs = nnx.List([conv(a, b, 3, stride=2, dtype=dtype, rngs=rngs)
                               for a, b in zip(ins, channels, strict=True)])
        self.norms = nnx.List([GroupNorm(min(8, c), c, dtype=dtype) for c in channels])
        self.proj = linear(channels[-1], out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for c, n in zip(self.convs, self.norms, strict=True):
            x = jax.nn.silu(n(c(x)))
        return self.proj(x.mean(axis=(1, 2)))


class ContrastivePair(nnx.Module):
    def __init__(self, text: CLIPTextConfig, cfg: ContrastiveConfig, *, dtype,
                 rngs: nnx.Rngs):
        self.text_encoder = CLIPTextModel(text, dtype=dtype, rngs=rngs)
        self.text_projection = linear(text.hidden_size, cfg.projection_dim, use_bias=False,
                                      dtype=dtype, rngs=rngs)
        self.image_tower = ImageTower(cfg.image_channels, cfg.projection_dim, dtype=dtype,
                                      rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.init_logit_scale, dtype))

    def __call__(self, ids: jax.Array, images: jax.Array, eos_id: int):
        states = self.text_encoder(ids)
        # The pooled text feature is the state at the first end token (CLIP's choice; with
        # causal attention it is the first position that has read the whole caption).
        eos = jnp.argmax(ids == eos_id, axis=1)
        text = self.text_projection(states[jnp.arange(ids.shape[0]), eos])
        image = self.image_tower(images)
        return text, image, self.logit_scale[...]


@dataclasses.dataclass(frozen=True)
class ContrastiveTask:
    model: nnx.GraphDef
    eos_id: int
    dtype: str
    remat_policy: str | None

    def loss(self, params, frozen, batch, key) -> tuple[jax.Array, Metrics]:
        del frozen, key

        def forward(p, ids, x):
            model = nnx.merge(self.model, components.cast(p, jnp.dtype(self.dtype)))
            return model(ids, x.astype(self.dtype), self.eos_id)

        ids = batch["input_ids"]
        text, image, scale = remat(forward, self.remat_policy)(params["clip"], ids,
                                                               batch["pixels"])
        text = _normalize(text.astype(jnp.float32))
        image = _normalize(image.astype(jnp.float32))
        logits = jnp.exp(jnp.minimum(scale.astype(jnp.float32), MAX_LOGIT_SCALE)) * (
            text @ image.T)
        same = jnp.all(ids[:, None, :] == ids[None, :, :], axis=-1).astype(jnp.float32)
        targets = same / same.sum(axis=1, keepdims=True)
        loss = 0.5 * (optax.softmax_cross_entropy(logits, targets).mean()
                      + optax.softmax_cross_entropy(logits.T, targets).mean())
        # Top-1 text->image retrieval counting any image with the same caption as right.
        hit = jnp.take_along_axis(same, jnp.argmax(logits, axis=1)[:, None], axis=1)
        return loss, {"accuracy": hit.mean(), "logit_scale": scale.astype(jnp.float32)}


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


def setup(cfg: TrainConfig, place) -> Setup:
    if cfg.text_encoder is None and cfg.pretrained is None:
        raise ValueError("task 'clip' needs a text_encoder config dict or a pretrained folder")
    tok = components.tokenizer(cfg)
    te = components.network(cfg, "text_encoder", trainable=True, place=place,
                            overrides=components.text_encoder_overrides(tok))
    dtype = components.compute_dtype(cfg)
    rngs = nnx.Rngs(cfg.seed + 3)
    fresh = ContrastivePair(te.config, cfg.contrastive, dtype=jnp.float32, rngs=rngs)
    params = nnx.to_pure_dict(nnx.state(fresh))
    params["text_encoder"] = te.params  # the loaded or freshly initialised text encoder
    params = jax.tree.map(place, params)
    graph = nnx.split(nnx.eval_shape(
        lambda: ContrastivePair(te.config, cfg.contrastive, dtype=dtype, rngs=nnx.Rngs(0))))[0]
    task = ContrastiveTask(model=graph, eos_id=tok.eos_id, dtype=cfg.compute_dtype,
                           remat_policy=cfg.remat_policy)

    def prepare(images: np.ndarray, captions: list[str], index: np.ndarray):
        return {"pixels": to_unit_range(images), "input_ids": tok(captions)}

    def export_to(trained: dict, folder: Path) -> None:
        folder = Path(folder)
        module = nnx.merge(components.graph_of("text_encoder", te.config, jnp.float32),
                           trained["clip"]["text_encoder"])
        export.save_network(folder / "text_encoder", module,
                            export.text_encoder_token_ids(tok.tokenizer))
        export.save_tokenizer(folder / "tokenizer", tok.folder)

    return Setup(task=task, params={"clip": params}, frozen={}, prepare=prepare,
                 export=export_to)
