"""task="textual_inversion": teach a frozen model a new word by training only its token
vectors (Gal et al. 2022). The new rows are their own parameter, written into the token
table inside the loss, so the gradient reaches nothing else and the rest of the table is
exactly the pretrained one. Exports diffusers' ``learned_embeds.safetensors`` and the
WebUI's ``.safetensors`` (:mod:`sdjax.weights.adapter_export`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.train import components
from sdjax.train.components import Params
from sdjax.train.config import TrainConfig
from sdjax.train.diffusion import adapter_task, caption_batch, frozen_model
from sdjax.train.task import Setup
from sdjax.weights import embeddings
from sdjax.weights.adapter_export import save_embedding

TABLE = ("embeddings", "token_embedding", "embedding")  # the text encoder's token table


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """The text encoder with the trained vectors in rows ``ids`` of its token table."""
    ids: tuple[int, ...]

    def __call__(self, params: dict[str, Params], frozen: dict[str, Params]
                 ) -> dict[str, Params]:
        te = frozen["text_encoder"]
        table = components.value_at(te, TABLE)
        rows = params["vectors"].astype(table.dtype)
        table = table.at[np.array(self.ids)].set(rows)
        return {**frozen, "text_encoder": components.with_value(te, TABLE, table)}


def init_token_id(tokenizer, word: str) -> int:
    """The id of ``word``, which must be exactly one known token of ``tokenizer``."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        pieces = tokenizer.tokenize(word)
        raise ValueError(f"textual_inversion.init_word {word!r} is not one token of the "
                         f"model's vocabulary (it reads as {len(pieces)}: "
                         f"{' '.join(pieces[:6])}); choose a single known word")
    return int(ids[0])


def setup(cfg: TrainConfig, place) -> Setup:
    ti = cfg.textual_inversion
    model = frozen_model(cfg, place)
    te = model.nets["text_encoder"]
    table = np.asarray(components.value_at(te.params, TABLE), np.float32)
    init = table[init_token_id(model.tokenizer.tokenizer, ti.init_word)]
    vectors = np.repeat(init[None], ti.num_vectors, axis=0)
    tokenizer, grown = embeddings.add_embedding(model.tokenizer.tokenizer, table, ti.token,
                                                vectors, source="textual_inversion.token")
    names = embeddings.token_names(ti.token, ti.num_vectors)
    dtype = components.compute_dtype(cfg)
    te_params = components.with_value(te.params, TABLE, place(jnp.asarray(grown, dtype)))
    te_graph = components.graph_of(
        "text_encoder", dataclasses.replace(te.config, vocab_size=grown.shape[0]), dtype)
    task = adapter_task(cfg, model, TokenRows(tuple(tokenizer.convert_tokens_to_ids(names))),
                        text_encoder=te_graph)
    frozen = {"text_encoder": te_params, "vae": model.nets["vae"].params,
              "unet": model.nets["unet"].params}
    tok = components.Tokenizer(model.tokenizer.folder, tokenizer)
    multi = {ti.token: names}

    def tokenize(captions: list[str]) -> np.ndarray:
        # A multi-vector token stands for all its tokens, as at sampling time.
        return tok([embeddings.expand_prompt(c, multi) for c in captions])

    def export_to(params: dict, folder: Path) -> None:
        save_embedding(folder, ti.token, np.asarray(jax.device_get(params["vectors"])))

    return Setup(task=task, params={"vectors": place(vectors)}, frozen=frozen,
                 prepare=caption_batch(cfg, tokenize), export=export_to)
