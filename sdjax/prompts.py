"""Prompts as the AUTOMATIC1111 WebUI reads them: emphasis weights, ``BREAK`` and prompts of any
length in 75-token chunks; and their encoding by a CLIP text encoder inside the compiled call.

Host side (:func:`parse_attention`, :func:`chunk_prompt`, :func:`prompt_arrays`): the text
becomes, per prompt, ``n`` chunks of 77 token ids (start, 75 prompt tokens, end, padded as the
tokenizer pads; the tokenizer's length where it is not 77) and a weight per id. Device side
(:func:`encode`): each chunk is encoded on its own, its outputs multiplied by the weights and
rescaled to the chunk's original mean (the WebUI's default "Original" emphasis), and the
chunks concatenated along the sequence.

How the chunk count becomes a static shape: a call's prompts and negative prompts may have
different chunk counts ``n``; the call has one context length ``m`` (:func:`context_chunks`).
Where every ``n`` divides a bucket (:data:`CONTEXT_BUCKETS`) or their least common multiple is
at most :data:`MAX_CONTEXT_CHUNKS`, each prompt's chunks are *repeated* to ``m``: repeating
every key and value of the UNet's cross-attention the same number of times leaves its softmax
average unchanged, so a prompt gives the image it would give alone (the WebUI's default, which
runs a cond and uncond of different lengths separately) whatever else shares the batch;
mathematically neutral, the repetition can still move the last bits of float arithmetic.
Otherwise (say prompt 5 and negative prompt 7 chunks) ``m`` is the longest prompt's count and
a prompt whose count does not divide it is padded with the empty prompt's chunk, as the WebUI
does with its "pad prompt/negative prompt" option (``pad_cond`` in its CFG denoiser). A prompt
longer than :data:`MAX_CONTEXT_CHUNKS` chunks is refused, naming the limit. One-chunk calls
(every prompt of at most 75 tokens) are exactly the plain diffusers encoding.

Prompt editing ``[a:b:0.5]``, alternation ``[a|b]`` and composable ``AND`` are read before this
(:mod:`sdjax.prompt_syntax`, :func:`prompt_schedules`; the call's layout in
:mod:`sdjax.prompt_editing`): each text a schedule holds is encoded here like any prompt.
Textual-inversion tokens are not kept together across a chunk boundary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from sdjax.prompt_syntax import prompt_schedules, split_and  # noqa: F401  (sdjax.prompts' API)

COMMA_BACKTRACK = 20     # the WebUI's default "comma_padding_backtrack"
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = -1.0             # the weight that marks a BREAK in parse_attention's output
# Context lengths (in chunks) that calls are compiled for: the smallest one that every chunk
# count of the call divides. 6 takes prompts of 2, 3 and 6 chunks (up to 450 tokens).
CONTEXT_BUCKETS = (1, 6, 12, 24)
MAX_CONTEXT_CHUNKS = 24

# One token of the attention syntax per match, in the WebUI's order of precedence: escapes,
# brackets, ":weight)" (a weight only right before a closing round bracket), plain text, ":".
_ATTENTION = re.compile(r"""
    \\[()\[\]\\]    # an escaped bracket or backslash: the character itself
  | \\              # a lone backslash: dropped
  | [(\[]           # opening brackets
  | :([+-]?[.\d]+)\)  # an explicit weight and its closing bracket
  | [)\]]           # closing brackets
  | [^\\()\[\]:]+   # text
  | :               # a colon that starts no weight: text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def chunk_tokens(tokenizer) -> int:
    """Prompt tokens per chunk: the tokenizer's length less the start and end tokens; 75 in
    every Stable Diffusion model (77 positions), fewer in the bundled toy."""
    return tokenizer.model_max_length - 2


def parse_attention(text: str) -> list[tuple[str, float]]:
    """``text`` -> runs of (text, weight), neighbours of equal weight merged; a ``BREAK`` is the
    run ``("BREAK", -1.0)``. ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:w)``
    multiplies by ``w``; brackets left open apply to the end of the text, closing brackets
    without an opening one and escaped ones (``\\(``) are text. Never raises: a weight that
    is not a number (``(x:1.2.3)``) is text, closed as ``(x)``."""
    runs: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])  # a lone backslash vanishes, as in the WebUI
        elif token == "(":
            rounds.append(len(runs))
        elif token == "[":
            squares.append(len(runs))
        elif weight is not None and rounds:
            try:
                factor = float(weight)
            except ValueError:  # "1.2.3": the WebUI raises here; we read it as text
                runs.append([token[:-1], 1.0])
                factor = ROUND
            scale(rounds.pop(), factor)
        elif token == ")" and rounds:
            scale(rounds.pop(), ROUND)
        elif token == "]" and squares:
            scale(squares.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append(["BREAK", BREAK])
                runs.append([part, 1.0])
    for start in rounds:
        scale(start, ROUND)
    for start in squares:
        scale(start, SQUARE)
    if not runs:
        runs = [["", 1.0]]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, float(w)) for t, w in merged]


class Chunks(NamedTuple):
    """A prompt's chunks: token ids (n, 77) and a weight per id (n, 77)."""

    ids: np.ndarray
    weights: np.ndarray

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1).any())


def chunk_prompt(prompt: str, tokenizer, expand: Callable[[str], str] = lambda s: s) -> Chunks:
    """The WebUI's chunks of ``prompt``: its runs tokenized (``expand`` rewrites each run's
    text first: textual-inversion names), cut every 75 tokens, or at ``BREAK``, or after the
    last comma when one is among the last 20 tokens of a full chunk (the rest moves on to the
    next chunk); each chunk wrapped in the start and end tokens and padded to 77 as the
    tokenizer pads (end token, then its pad token)."""
    runs = parse_attention(prompt)
    texts = [expand(t) for t, _ in runs]
    # verbose=False: transformers warns about sequences longer than 77; these are chunked.
    tokenized = tokenizer(texts, add_special_tokens=False, truncation=False,
                          verbose=False).input_ids
    comma = tokenizer.get_vocab().get(",</w>")
    size = chunk_tokens(tokenizer)
    chunks: list[tuple[list[int], list[float]]] = []
    toks: list[int] = []
    ws: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal toks, ws, last_comma
        chunks.append((toks, ws))
        toks, ws, last_comma = [], [], -1

    for ids, (text, weight) in zip(tokenized, runs, strict=True):
        if weight == BREAK and text == "BREAK":
            close()
            continue
        for tok in ids:
            if tok == comma:
                last_comma = len(toks)
            elif (len(toks) == size and last_comma != -1
                  and len(toks) - last_comma <= COMMA_BACKTRACK):
                cut = last_comma + 1
                moved = toks[cut:], ws[cut:]
                toks, ws = toks[:cut], ws[:cut]
                close()
                toks, ws = list(moved[0]), list(moved[1])
            if len(toks) == size:
                close()
            toks.append(tok)
            ws.append(weight)
    if toks or not chunks:
        close()
    return _wrap(chunks, tokenizer)


def _wrap(chunks: Sequence[tuple[list[int], list[float]]], tokenizer) -> Chunks:
    width = tokenizer.model_max_length
    ids = np.full((len(chunks), width), tokenizer.pad_token_id, np.int32)
    weights = np.ones((len(chunks), width), np.float32)
    for i, (toks, ws) in enumerate(chunks):
        ids[i, 0] = tokenizer.bos_token_id
        ids[i, 1:len(toks) + 1] = toks
        ids[i, len(toks) + 1] = tokenizer.eos_token_id
        weights[i, 1:len(ws) + 1] = ws
    return Chunks(ids, weights)


def check_chunks(n: int, name: str = "prompt") -> int:
    """``n`` (a prompt's chunk count) if it is within :data:`MAX_CONTEXT_CHUNKS`, else the
    one-line ValueError that names the limit."""
    if n > MAX_CONTEXT_CHUNKS:
        raise ValueError(f"{name} is too long: {n} chunks of 75 tokens (the chunk size of "
                         f"SD models; fewer in the toy), past the limit of {MAX_CONTEXT_CHUNKS} "
                         f"chunks ({MAX_CONTEXT_CHUNKS * 75} tokens); shorten it")
    return n


def context_chunks(counts: Sequence[int]) -> int:
    """The chunk count a call with prompts of ``counts`` chunks is compiled for: a bucket that
    every count divides, else their least common multiple when it is at most
    :data:`MAX_CONTEXT_CHUNKS` (each prompt's chunks repeat to fill it), else the longest
    count (the others padded with the empty chunk, :func:`prompt_arrays`)."""
    for n in counts:
        check_chunks(n)
    need = math.lcm(*counts)
    for bucket in CONTEXT_BUCKETS:
        if bucket % need == 0:
            return bucket
    return need if need <= MAX_CONTEXT_CHUNKS else max(counts)


def exact(counts: Sequence[int], chunks: int) -> bool:
    """Whether prompts of ``counts`` chunks in a context of ``chunks`` are all repeated, none
    padded (so each gives what it gives alone, up to float rounding)."""
    return all(chunks % n == 0 for n in counts)


def fit_chunks(c: Chunks, chunks: int, empty: Chunks) -> Chunks:
    """``c`` in a context of ``chunks``: repeated when its count divides it, else followed by
    the ``empty`` prompt's chunk as many times as needed (the WebUI's ``pad_cond``)."""
    n = len(c.ids)
    if n > chunks:
        raise ValueError(f"a prompt of {n} chunks of 75 tokens does not fit a context of "
                         f"{chunks} chunks")
    if chunks % n == 0:
        return Chunks(np.tile(c.ids, (chunks // n, 1)), np.tile(c.weights, (chunks // n, 1)))
    pad = chunks - n
    return Chunks(np.concatenate([c.ids, np.tile(empty.ids, (pad, 1))]),
                  np.concatenate([c.weights, np.tile(empty.weights, (pad, 1))]))


def prompt_chunks(prompts: Sequence[str], tokenizer,
                  expand: Callable[[str], str] = lambda s: s) -> list[int]:
    """Each prompt's chunk count (what a server checks before it merges requests)."""
    return [len(chunk_prompt(p, tokenizer, expand).ids) for p in dict.fromkeys(prompts)]


def prompt_arrays(prompts: Sequence[str], tokenizer, chunks: int | None = None,
                  expand: Callable[[str], str] = lambda s: s) -> tuple[np.ndarray, np.ndarray]:
    """(ids, weights), each (len(prompts), chunks, 77): every prompt's chunks repeated or
    padded to ``chunks`` (:func:`fit_chunks`; default: :func:`context_chunks` of these
    prompts)."""
    cache: dict[str, Chunks] = {}  # a call repeats its prompts (images per prompt, negatives)
    parsed = [cache[p] if p in cache else cache.setdefault(p, chunk_prompt(p, tokenizer, expand))
              for p in prompts]
    if chunks is None:
        chunks = context_chunks([len(c.ids) for c in parsed])
    empty = chunk_prompt("", tokenizer)
    fitted = [fit_chunks(c, chunks, empty) for c in parsed]
    return np.stack([c.ids for c in fitted]), np.stack([c.weights for c in fitted])


def expander(multi: Mapping[str, list[str]]) -> Callable[[str], str]:
    """A run's text with each multi-vector embedding name spelled as all its tokens."""
    from sdjax.weights.embeddings import expand_prompt
    return lambda text: expand_prompt(text, multi)


def encode(text_encoder, ids, weights, clip_skip: int = 1):
    """Text-encoder outputs (N, chunks * 77, D) of ``ids`` (N, chunks, 77), each chunk encoded
    on its own, with the WebUI's emphasis (:func:`emphasize`). ``clip_skip`` > 1: an earlier
    layer's states, through the final layer norm, as the WebUI does."""
    flat = ids.reshape(-1, ids.shape[-1])
    z = text_encoder(flat) if clip_skip == 1 else text_encoder(flat, clip_skip=clip_skip)
    return emphasize(z, weights)


def emphasize(z, weights):
    """The text encoder's states ``z`` (N * chunks, 77, D) of (N, chunks, 77) token ids, with
    their ``weights`` (N, chunks, 77) -> (N, chunks * 77, D). Chunks whose weights are not all
    1 get the WebUI's emphasis: ``z *= w`` and ``z *= mean(z before) / mean(z after)`` over
    the chunk (all its positions and features). Chunks of weight 1 are the encoder's output
    untouched, bit for bit. Traced (jnp); the weights are a runtime array, so new weights never
    recompile."""
    import jax.numpy as jnp

    n, c, t = weights.shape
    w = weights.reshape(n * c, t, 1).astype(jnp.float32)
    z32 = z.astype(jnp.float32)
    before = z32.mean(axis=(1, 2), keepdims=True)
    scaled = z32 * w
    after = scaled.mean(axis=(1, 2), keepdims=True)
    # An all-zero chunk would make the WebUI's ratio 0/0 (NaN images); keep its scale.
    scaled = scaled * jnp.where(after == 0, 1.0, before / jnp.where(after == 0, 1.0, after))
    plain = jnp.all(w == 1, axis=(1, 2), keepdims=True)
    z = jnp.where(plain, z, scaled.astype(z.dtype))
    return z.reshape(n, c * t, z.shape[-1])
