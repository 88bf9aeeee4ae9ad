"""A scheduler state whose start step is a runtime input: img2img and inpainting cut the
schedule by ``strength`` (diffusers' ``get_timesteps``), and making that cut a traced index
instead of a static one lets every strength share one compiled sampler.

``set_timesteps(n, strength)`` of each scheduler already reproduces what diffusers does when it
starts mid-schedule (PNDM's restarted counter, LMS's shorter history, DPM-Solver's first-order
first step). Here those states are built on the host for every possible start, their
per-evaluation tables placed at the evaluation's index in the full schedule (so the loop index
means the same thing whatever the start), and stacked; the traced call picks one row."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.common import Scheduler


def strength_for_start(steps: int, start: int) -> float:
    """A strength whose diffusers cut starts at step ``start`` (the half step keeps
    ``int(steps * strength)`` clear of float rounding)."""
    return 1.0 if start == 0 else (steps - start + 0.5) / steps


@dataclasses.dataclass(frozen=True)
class StartTable:
    """Every start's scheduler state, selectable with a traced start step."""

    stacked: Any  # the state pytree; the fields in `by_start` carry a leading start axis
    by_start: tuple[str, ...]
    first_eval: np.ndarray  # (steps,) int32: global index of each start's first evaluation
    num_evaluations: int  # of the full schedule; every start's loop ends there
    noise_levels: np.ndarray  # (M, 2) float32 add_noise coefficients at each evaluation

    def state(self, start: jax.Array) -> Any:
        """The scheduler state for the traced start step, indexed like the full schedule."""
        return self.stacked.replace(**{k: getattr(self.stacked, k)[start] for k in self.by_start})

    def first(self, start: jax.Array) -> jax.Array:
        return jnp.asarray(self.first_eval)[start]


def start_table(sched: Scheduler, steps: int, sample_shape: tuple[int, ...]) -> StartTable:
    """The states of every start of a ``steps``-step schedule, for samples shaped
    ``sample_shape`` (the per-device batch)."""
    full = sched.set_timesteps(steps, sample_shape=sample_shape)
    total = sched.num_evaluations(full)
    # A scheduler whose img2img run differs from txt2img's at the same start (the WebUI's
    # DDIM/PLMS) builds its img2img states itself.
    img2img = getattr(sched, "img2img_state", None)
    states = [img2img(steps, s) if img2img is not None
              else sched.set_timesteps(steps, strength_for_start(steps, s)) for s in range(steps)]
    lengths = [sched.num_evaluations(st) for st in states]
    stacked, by_start = {}, []
    for f in dataclasses.fields(full):
        per_start = [np.asarray(getattr(st, f.name)) for st in states]
        if per_start[0].size == 0:
            continue  # history buffers (built shapeless here): zeroed at every start
        per_eval = all(a.ndim and a.shape[0] == m for a, m in zip(per_start, lengths, strict=True))
        if per_eval:  # evaluation j of a later start sits at index j + (total - m)
            per_start = [np.concatenate([np.zeros((total - m, *a.shape[1:]), a.dtype), a])
                         for a, m in zip(per_start, lengths, strict=True)]
        stacked[f.name] = jnp.asarray(np.stack(per_start))
        by_start.append(f.name)
    return StartTable(
        stacked=full.replace(**stacked),
        by_start=tuple(by_start),
        first_eval=np.asarray([total - m for m in lengths], np.int32),
        num_evaluations=total,
        noise_levels=sched.noise_levels(full),
    )
