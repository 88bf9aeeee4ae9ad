"""Prompt editing ``[a:b:when]``, alternation ``[a|b]`` and composable ``a AND b :0.7`` in the one
compiled loop (docs/sampling-core.md, "Prompt editing and AND").

Host side (:func:`plan`): each prompt is split at ``AND`` into weighted parts
(:func:`sdjax.prompt_syntax.split_and`), and each part and each negative prompt is scheduled over
the steps (:func:`sdjax.prompt_syntax.prompt_schedules`). A *slot* (the negative prompt, or
one part) holds its schedule's distinct texts, each encoded once per call, and a table that
says which of them each evaluation uses. The call's arrays:

- token ids and weights ``(images, E * chunks, 77)``: every row's ``E = K * P`` entries (``K``
  distinct prompts per slot, ``P`` parts, both bucketed), each entry its chunks, encoded as
  one long context by the ordinary encoding path (every chunk on its own, with its emphasis);
- ``prompt_steps`` int32 ``(images, 1 + P, S + 1)``: for the negative and each part, the entry
  that schedule position ``j`` uses (the first whose end step is >= ``j``); ``S`` is the
  schedule's steps (the call's steps, doubled for second-order schedulers as the WebUI does);
- ``prompt_weights`` float32 ``(images, P)``: the AND weights, 0 for padding parts.

Device side (:func:`plug_in`): a selector of the denoiser seam picks each row's entry at
evaluation ``i`` from schedule position ``i - first`` (the WebUI counts the evaluations that
run, from 0), and lays the UNet batch out as ``[uncond; part 0; ...; part P-1]``; a guide
combines it as ``uncond + scale * sum_i w_i (cond_i - uncond)`` (through
:func:`sdjax.sampling.combine_guidance`, so guidance rescale and interval still apply). Which
texts, which ends and which weights are runtime data: a new prompt or ``when`` recompiles only
when it moves ``K``, ``P`` or the chunk count to another bucket (``CoreSpec.prompt_entries``,
``prompt_parts``, ``composable``). A call whose prompts use none of the syntax is planned as
before (:func:`plan` returns None) and runs today's program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import sampling, validation
from sdjax.prompt_syntax import prompt_schedules, split_and

ENTRY_BUCKETS = (1, 2, 4, 8, 16)  # distinct prompts per slot (validation.MAX_SCHEDULE_PROMPTS)
PART_BUCKETS = (1, 2, 4, 8)       # AND parts (validation.MAX_AND_PARTS)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= n)


@dataclasses.dataclass(frozen=True)
class PromptStack:
    """A call's prompts as :func:`plan` lays them out (one row per prompt)."""

    texts: tuple[str, ...]  # the distinct texts to encode
    pos: np.ndarray  # (prompts, E) int: each entry's text, part-major
    neg: np.ndarray  # (prompts, E) int: the negative's K entries, padded with its first
    table: np.ndarray  # (prompts, 1 + P, S + 1) int32: the entry (within its slot) per position
    weights: np.ndarray  # (prompts, P) float32
    entries: int  # K
    parts: int  # P
    composable: bool  # AND, or a part weight other than 1: the composable guide

    @property
    def width(self) -> int:
        """Entries per row: K * P."""
        return self.entries * self.parts

    def token_arrays(self, tokenize: Callable, chunks: int | None = None
                     ) -> tuple[tuple[np.ndarray, np.ndarray], int]:
        """((ids, weights) of the rows [prompts; negatives], each ``(2 * prompts, E * chunks,
        77)``, the chunks per entry). ``tokenize(texts)`` -> (ids, weights), each (texts,
        chunks, 77); ``chunks``: tile to that count (SDXL's second encoder: the first's)."""
        ids, weights = tokenize(list(self.texts))
        have = ids.shape[1]
        if chunks is not None and chunks != have:
            if chunks % have:
                raise ValueError(f"the second text encoder's prompts need a context of {have} "
                                 f"chunks of 75 tokens and the first's {chunks}: generate "
                                 "them in separate calls")
            ids, weights = (np.tile(a, (1, chunks // have, 1)) for a in (ids, weights))
        index = np.concatenate([self.pos, self.neg])
        arrays = tuple(a[index].reshape(len(index), -1, a.shape[-1]) for a in (ids, weights))
        return arrays, ids.shape[1]

    def inputs(self, per_prompt: int) -> dict[str, np.ndarray]:
        """The batched runtime inputs of the plug-ins, one row per image."""
        out = {}
        if self.width > 1:
            out["prompt_steps"] = np.repeat(self.table, per_prompt, axis=0)
        if self.composable:
            out["prompt_weights"] = np.repeat(self.weights, per_prompt, axis=0)
        return out

    def spec_fields(self) -> dict:
        """The CoreSpec fields this layout compiles to."""
        return {"prompt_entries": self.entries, "prompt_parts": self.parts,
                "composable": self.composable}


def _slot(schedule: list[list], positions: int) -> tuple[list[str], np.ndarray]:
    """(a schedule's distinct texts in order, the text index each position 0..positions-1
    uses: the first entry whose end is >= the position, the last past every end)."""
    texts: list[str] = []
    index = {}
    for _, text in schedule:
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
    ends = np.asarray([end for end, _ in schedule])
    which = np.minimum(np.searchsorted(ends, np.arange(positions), side="left"),
                       len(schedule) - 1)
    return texts, np.asarray([index[schedule[k][1]] for k in which], np.int32)


def plan(prompts: Sequence[str], negatives: Sequence[str], steps: int,
         first_pass_steps: int | None = None) -> PromptStack | None:
    """The stack of a call's prompts and negative prompts (one negative per prompt) over a
    schedule of ``steps`` steps; None when none of them uses the syntax (each is its own one
    text, with no AND and no weight). ``first_pass_steps``: the call is a hires fix's second
    pass after that many steps (the WebUI's offsets, :func:`prompt_schedules`). Raises
    ValueError past the stated limits (:func:`sdjax.validation.check_prompt_syntax`)."""
    parts = [split_and(p) for p in prompts]
    texts_of = sorted({t for ps in parts for t, _ in ps} | set(negatives))
    found = (prompt_schedules(texts_of, steps) if first_pass_steps is None
             else prompt_schedules(texts_of, first_pass_steps, steps))
    schedules = dict(zip(texts_of, found, strict=True))

    def plain(text: str, original: str) -> bool:
        return schedules[text] == [[steps, text]] and text == original

    if all(len(ps) == 1 and ps[0][1] == 1.0 and plain(ps[0][0], p.rstrip())
           for ps, p in zip(parts, prompts, strict=True)) \
            and all(plain(n, n) for n in negatives):
        return None
    positions = steps + 1
    slots = []  # per prompt: [negative slot, part slots...], each (texts, table)
    for i, (ps, neg) in enumerate(zip(parts, negatives, strict=True)):
        row = [_slot(schedules[neg], positions)] + [_slot(schedules[t], positions)
                                                     for t, _ in ps]
        name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        validation.check_prompt_syntax(name, max(len(t) for t, _ in row[1:]), len(ps))
        validation.check_prompt_syntax(name.replace("prompt", "negative_prompt"),
                                       len(row[0][0]), 1)
        slots.append(row)
    k = _bucket(max(len(t) for row in slots for t, _ in row), ENTRY_BUCKETS)
    p = _bucket(max(len(ps) for ps in parts), PART_BUCKETS)
    distinct: dict[str, int] = {}

    def ids(texts: list[str], width: int) -> list[int]:
        padded = texts + [texts[0]] * (width - len(texts))
        return [distinct.setdefault(t, len(distinct)) for t in padded]

    pos = np.zeros((len(prompts), k * p), np.int64)
    neg = np.zeros_like(pos)
    table = np.zeros((len(prompts), 1 + p, positions), np.int32)
    weights = np.zeros((len(prompts), p), np.float32)
    for i, row in enumerate(slots):
        neg[i] = ids(row[0][0], k * p)
        table[i, 0] = row[0][1]
        for j in range(p):
            texts, which = row[1 + j] if 1 + j < len(row) else row[1]  # padding: part 0
            pos[i, j * k:(j + 1) * k] = ids(texts, k)
            table[i, 1 + j] = which
        weights[i, :len(parts[i])] = [w for _, w in parts[i]]
    composable = p > 1 or any(w != 1.0 for ps in parts for _, w in ps)
    return PromptStack(tuple(distinct), pos, neg, table, weights, k, p, composable)


def layout(tokenize: Callable, prompts: Sequence[str], negatives: Sequence[str],
           steps: int) -> tuple[int, int, int, bool]:
    """(chunks per prompt, K, P, composable): what the text of a call of these prompts compiles
    to. Calls that agree on it share one program, and so do their merged prompts (each count
    is a bucket, and the chunk bucket is one every prompt's chunk count divides)."""
    stack = plan(prompts, negatives, steps)
    if stack is None:
        return tokenize(list(prompts) + list(negatives))[0].shape[1], 1, 1, False
    return stack.token_arrays(tokenize)[1], stack.entries, stack.parts, stack.composable


# ---------------------------------------------------------------------- device side
def plug_in(nets: sampling.Networks, spec: sampling.CoreSpec) -> sampling.Networks:
    """``nets`` with the selector (several entries per row) and the composable guide (AND or
    part weights) that ``spec`` compiles; ``nets`` itself for plain prompts. An encoder of the
    pipeline's own (SDXL's) is told the entries per row, for its pooled outputs."""
    width = spec.prompt_entries * spec.prompt_parts
    changes = {}
    if width > 1:
        changes["select"] = _selector(spec.prompt_entries, spec.prompt_parts, spec.cfg)
        if nets.encoder is not None:
            changes["encoder"] = functools.partial(nets.encoder, entries=width)
    if spec.composable:
        changes["guide"] = _guide(spec.prompt_parts)
    return dataclasses.replace(nets, **changes) if changes else nets


def _pick(a: jax.Array, which: jax.Array) -> jax.Array:
    """Rows ``a`` (b, E, ...) and entry indices ``which`` (b, m) -> (m * b, ...): for each of
    the m columns, every row's entry, column-major (the UNet batch's groups of rows)."""
    b, m = which.shape
    got = jnp.take_along_axis(a, which.reshape(b, m, *([1] * (a.ndim - 2))), axis=1)
    return jnp.swapaxes(got, 0, 1).reshape(m * b, *a.shape[2:])


def _selector(entries: int, parts: int, cfg: bool) -> sampling.Selector:
    width = entries * parts

    def select(params, inputs, step, cond):
        table = inputs["prompt_steps"]  # (b, 1 + P, S + 1)
        b, _, positions = table.shape
        j = jnp.clip(step.index - step.first, 0, positions - 1)
        k = jax.lax.dynamic_index_in_dim(table, j, axis=2, keepdims=False)  # (b, 1 + P)
        part_entries = entries * jnp.arange(parts, dtype=k.dtype)[None] + k[:, 1:]

        def rows(a: jax.Array) -> jax.Array:  # (rows, E, ...) -> the UNet batch's rows
            got = _pick(a[-b:], part_entries)
            return jnp.concatenate([_pick(a[:b], k[:, :1]), got]) if cfg else got

        ctx = cond.context
        context = rows(ctx.reshape(ctx.shape[0], width, ctx.shape[1] // width, ctx.shape[2]))
        added = None
        if cond.added is not None:
            added = {}
            for name, value in cond.added.items():
                if name == "text_embeds":  # SDXL's pooled output: one per entry
                    added[name] = rows(value)
                else:  # one per row: the negative's, then the prompt's for every part
                    pos = jnp.concatenate([value[-b:]] * parts)
                    added[name] = jnp.concatenate([value[:b], pos]) if cfg else pos
        return sampling.Conditioning(context, added, cond.class_labels)

    return select


def _guide(parts: int) -> sampling.Guide:
    def guide(params, inputs, step, eps, guidance):
        w = inputs["prompt_weights"]  # (b, P)
        b = w.shape[0]
        uncond = eps[:b]
        composed = uncond
        for i in range(parts):
            composed = composed + w[:, i, None, None, None] * (eps[(1 + i) * b:(2 + i) * b]
                                                               - uncond)
        return sampling.combine_guidance(uncond, composed, guidance, step.sigma)

    return guide
