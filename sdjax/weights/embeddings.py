"""Textual-inversion embeddings: new token vectors for the text encoder's token table.

Three file layouts: the WebUI's ``.pt`` (``string_to_param: {"*": (n, D)}``, read with the
restricted unpickler, never ``torch.load``) and ``.safetensors`` (``emb_params: (n, D)``),
both named by the file's stem as the WebUI names them; and diffusers' ``learned_embeds``
(``{token: (D,) or (n, D)}``), named by the token they hold, as diffusers names them. SDXL
embeddings (:func:`read_sdxl_embedding`) hold one vector set per text encoder, ``clip_l`` and
``clip_g``, and are named by the file's stem. An
embedding of ``n`` vectors becomes the tokens ``name``, ``name_1``, … ``name_{n-1}`` and a
prompt's ``name`` is expanded to all of them, as diffusers does.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.validation import check_adapter_dtype
from sdjax.weights.errors import AdapterError, WeightsError
from sdjax.weights.files import open_tensor_file

_WEBUI_KEYS = ("string_to_param.", "emb_params")
# The WebUI's .pt also keeps the placeholder's id; it is not a vector.
_IGNORED = ("string_to_token.",)
# SDXL embeddings hold one vector set per text encoder.
_SDXL_KEYS = ("clip_l", "clip_g")


def read_embedding(path: str | Path, token: str | None = None) -> tuple[str, np.ndarray]:
    """(token, vectors (n, D) float32) of the embedding file ``path``."""
    path = Path(path)
    tensors, keys = _open(path)
    key, default = _vectors_key(path, keys)
    return (token if token is not None else default), _vectors(path, tensors, key)


def read_sdxl_embedding(path: str | Path, token: str | None = None,
                        needed: tuple[str, ...] = _SDXL_KEYS
                        ) -> tuple[str, dict[str, np.ndarray]]:
    """(token, {"clip_l": (n, 768), "clip_g": (n, 1280)} float32) of the SDXL embedding
    file ``path``: clip_l's rows are for SDXL's first text encoder, clip_g's for its second
    (and a refiner's one, which ``needed`` = ("clip_g",) asks for alone); the token defaults
    to the file's stem, as the WebUI names it."""
    path = Path(path)
    tensors, keys = _open(path)
    if not any(k in _SDXL_KEYS for k in keys):
        raise AdapterError(f"{path}: not an SDXL embedding (no clip_l/clip_g vectors; found "
                           f"{', '.join(sorted(keys)[:4]) or 'no tensors'}): an SD1.x/SD2.x "
                           "embedding does not fit SDXL's two text encoders")
    missing = [k for k in needed if k not in keys]
    if missing:
        raise AdapterError(f"{path}: an SDXL embedding without its {missing[0]} vectors, "
                           f"which this model needs ({' and '.join(needed)})")
    sets = {k: _vectors(path, tensors, k) for k in needed}
    if len({v.shape[0] for v in sets.values()}) > 1:
        raise AdapterError(f"{path}: clip_l holds {sets['clip_l'].shape[0]} vectors and "
                           f"clip_g {sets['clip_g'].shape[0]}; they must match")
    return (token if token is not None else path.stem), sets


def _open(path: Path) -> tuple:
    """(the file's tensors, the names of those that may be vectors)."""
    try:
        tensors = open_tensor_file(path)
    except WeightsError as e:  # missing, unreadable or corrupt file
        raise AdapterError(str(e)) from None
    return tensors, [k for k in tensors if not k.startswith(_IGNORED)]


def _vectors(path: Path, tensors, key: str) -> np.ndarray:
    """``tensors[key]`` as (n, D) float32 vectors."""
    try:
        raw = tensors[key]
        check_adapter_dtype(raw.dtype, "embedding", str(path))
        vectors = np.array(raw, np.float32)
    except (WeightsError, ValueError) as e:  # a corrupt tensor, or not floating point
        raise AdapterError(str(e)) from None
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise AdapterError(f"{path}: embedding {key} has shape {vectors.shape}, not "
                           "(vectors, width)")
    return vectors


def _vectors_key(path: Path, keys: list[str]) -> tuple[str, str]:
    """(the key of the vectors, the token they default to)."""
    if any(k in _SDXL_KEYS for k in keys):
        raise AdapterError(f"{path}: an SDXL embedding (clip_l/clip_g); this model is not SDXL")
    webui = [k for k in keys if k.startswith(_WEBUI_KEYS)]
    if len(webui) == 1:
        return webui[0], path.stem
    if len(keys) == 1 and not webui:
        return keys[0], keys[0]
    raise AdapterError(f"{path}: not a textual-inversion embedding (expected one of "
                       f"string_to_param, emb_params or a single token; found "
                       f"{', '.join(sorted(keys)[:4]) or 'no tensors'})")


def token_names(token: str, count: int) -> list[str]:
    """The tokens a ``count``-vector embedding adds, in diffusers' naming."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def add_embedding(tokenizer, table: np.ndarray, token: str, vectors: np.ndarray,
                  *, source: str = "embedding") -> tuple[object, np.ndarray]:
    """(a copy of ``tokenizer`` with the new tokens, ``table`` grown with their vectors).
    Neither argument is changed, so a refusal leaves the caller's pipeline as it was."""
    if vectors.shape[1] != table.shape[1]:
        raise AdapterError(f"{source}: vectors of width {vectors.shape[1]}, but this text "
                           f"encoder's are {table.shape[1]} wide (an embedding for another "
                           "model family)")
    if not token or re.search(r"\s", token):
        raise AdapterError(f"{source}: token {token!r} must be one word without spaces")
    names = token_names(token, vectors.shape[0])
    vocab = tokenizer.get_vocab()
    taken = [n for n in names if n in vocab or n + "</w>" in vocab
             or n.lower() + "</w>" in vocab]
    if taken:
        raise AdapterError(f"{source}: token {taken[0]!r} is already a word of the tokenizer; "
                           "choose another token (token=… / a file of another name)")
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(names)
    ids = grown.convert_tokens_to_ids(names)
    rows = max(table.shape[0], max(ids) + 1)
    new = np.zeros((rows, table.shape[1]), np.float32)
    new[:table.shape[0]] = table
    new[ids] = vectors
    return grown, new


def token_table(text_encoder: nnx.Module) -> np.ndarray:
    """A CLIP text encoder's token-embedding table (vocab, width), float32 on the host."""
    return np.asarray(text_encoder.embeddings.token_embedding.embedding.get_value(), np.float32)


def set_token_table(text_encoder: nnx.Module, table: np.ndarray, place: Callable) -> None:
    """Give ``text_encoder`` (changed in place) the token table ``table``. Its size lives in
    the module too (``Embed.num_embeddings``, the config that a saved folder records)."""
    embed = text_encoder.embeddings.token_embedding
    dtype = embed.embedding.get_value().dtype
    embed.num_embeddings = table.shape[0]
    text_encoder.config = dataclasses.replace(text_encoder.config, vocab_size=table.shape[0])
    embed.embedding.set_value(place(jnp.asarray(table, dtype)))


def expand_prompt(prompt: str, multi: Mapping[str, list[str]]) -> str:
    """``name`` -> ``name name_1 …`` for each multi-vector embedding in the prompt."""
    if not multi:
        return prompt
    rx = re.compile("|".join(re.escape(t) for t in sorted(multi, key=len, reverse=True)))
    return rx.sub(lambda m: " ".join(multi[m[0]]), prompt)
