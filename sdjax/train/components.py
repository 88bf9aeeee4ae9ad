"""Getting the networks and the tokenizer a recipe names: loaded from a pretrained diffusers
folder, or built fresh from a config dict; trained ones as float32 master weights, frozen
ones directly in the compute dtype."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.train.config import TrainConfig
from sdjax.train.tokenizer import write_clip_tokenizer
from sdjax.weights.diffusers_folder import NETWORKS, load_network, load_tokenizer, read_config
from sdjax.weights.resolve import resolve_model

Params = dict[str, Any]  # nnx.to_pure_dict of one network


@dataclasses.dataclass(frozen=True)
class Network:
    """One network of a run: its config, the graph to compute with, and its weights."""
    name: str
    config: Any
    graphdef: nnx.GraphDef  # built in the compute dtype
    params: Params


def compute_dtype(cfg: TrainConfig) -> jnp.dtype:
    return jnp.dtype(cfg.compute_dtype)


def cast(params: Params, dtype) -> Params:
    """Master weights -> compute dtype (a no-op in float32)."""
    return jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x, params)


def graph_of(name: str, config: Any, dtype) -> nnx.GraphDef:
    model = NETWORKS[name].model
    return nnx.split(nnx.eval_shape(lambda: model(config, dtype=dtype, rngs=nnx.Rngs(0))))[0]


def pretrained_folder(cfg: TrainConfig) -> Path | None:
    return resolve_model(cfg.pretrained) if cfg.pretrained else None


def network(cfg: TrainConfig, name: str, *, trainable: bool,
            place: Callable[[np.ndarray], jax.Array], overrides: Mapping[str, Any] | None = None,
            seed_offset: int = 0) -> Network:
    """``name`` ("unet" | "vae" | "text_encoder") for this run. A config dict in the recipe
    means a fresh, randomly initialised network; otherwise it comes from ``pretrained``."""
    fresh: Mapping[str, Any] | None = getattr(cfg, name)
    dtype = compute_dtype(cfg)
    store = jnp.float32 if trainable else dtype
    kind = NETWORKS[name]
    if fresh is not None:
        config = kind.config.from_dict({**fresh, **(overrides or {})})
        if not trainable:
            raise ValueError(f"{name} is frozen in a {cfg.task!r} run, so it must come from "
                             "`pretrained`, not be built fresh")
        rngs = nnx.Rngs(cfg.seed + seed_offset)
        module = kind.model(config, dtype=store, rngs=rngs)
        params = jax.tree.map(place, nnx.to_pure_dict(nnx.state(module)))
    else:
        folder = pretrained_folder(cfg)
        if folder is None:
            raise ValueError(f"the recipe needs a {name}: give `pretrained` or a `{name}` "
                             "config dict")
        config = read_config(folder, name)
        module = load_network(folder, name, dtype=store, place=place, config=config)
        params = nnx.to_pure_dict(nnx.state(module))
    return Network(name, config, graph_of(name, config, dtype), params)


class Tokenizer:
    """The run's CLIPTokenizer, with its files' folder (copied into the export) and a cache
    of caption -> ids (captions repeat a lot)."""

    def __init__(self, folder: Path, tokenizer: Any):
        self.folder, self.tokenizer = folder, tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def __call__(self, texts: list[str]) -> np.ndarray:
        for t in texts:
            if t not in self._cache:
                self._cache[t] = tuple(self.tokenizer(t, padding="max_length", truncation=True,
                                                      max_length=self.max_length).input_ids)
        return np.array([self._cache[t] for t in texts], np.int32)


def tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The recipe's fresh vocabulary (written under output_dir) or the pretrained one."""
    from transformers import CLIPTokenizer

    if cfg.tokenizer is not None:
        folder = Path(cfg.output_dir) / "tokenizer"
        write_clip_tokenizer(folder, cfg.tokenizer.words,
                             model_max_length=cfg.tokenizer.model_max_length)
        return Tokenizer(folder, CLIPTokenizer.from_pretrained(str(folder)))
    folder = pretrained_folder(cfg)
    if folder is None:
        raise ValueError("the recipe needs a tokenizer: give `pretrained` or `tokenizer`")
    return Tokenizer(folder / "tokenizer", load_tokenizer(folder))


def text_encoder_overrides(tok: Tokenizer) -> dict[str, int]:
    """A fresh text encoder is sized to its vocabulary and prompt length."""
    return {"vocab_size": tok.vocab_size, "max_position_embeddings": tok.max_length}


def value_at(tree: Params, path: tuple) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def with_value(tree: Params, path: tuple, value: Any) -> Params:
    """A copy of the nested dict ``tree`` with ``value`` at ``path``; only the dicts along
    the path are copied (the arrays are shared), so it is cheap inside a traced loss."""
    head, *rest = path
    return {**tree, head: with_value(tree[head], tuple(rest), value) if rest else value}
