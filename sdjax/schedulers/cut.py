"""diffusers' ``denoising_end`` / ``denoising_start``: one schedule shared by two models, cut
where its timesteps cross a fraction of the training timesteps (SDXL's base→refiner hand-off:
the base runs the noisy part and returns latents, the refiner finishes them).

Both cuts are host-side numbers, computed from the same timesteps as diffusers'; the sampling
core takes them as runtime inputs (the start step of ``sdjax.schedulers.start`` and a stop
evaluation), so a new fraction never recompiles.
"""

from __future__ import annotations

import numpy as np

from sdjax.schedulers.common import Scheduler
from sdjax.schedulers.start import strength_for_start


def check_fraction(value, name: str) -> float:
    """A number strictly between 0 and 1 (diffusers ignores others silently; we refuse)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 < float(value) < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def cutoff(sched: Scheduler, fraction: float) -> int:
    """The training timestep at ``fraction`` of the way from pure noise (diffusers'
    ``discrete_timestep_cutoff``)."""
    n = sched.num_train_timesteps
    return int(round(n - fraction * n))


def _timesteps(sched: Scheduler, state) -> np.ndarray:
    return np.asarray(state.timesteps)[:sched.num_evaluations(state)]


def denoising_start_step(sched: Scheduler, steps: int, fraction: float) -> int:
    """The start step (as img2img's strength makes it, ``sdjax.schedulers.start``) of a
    ``steps``-step run that begins at ``denoising_start=fraction``: diffusers keeps the
    evaluations whose timestep is below the cutoff (an odd count for second-order schedulers,
    so a step's two evaluations are never split)."""
    timesteps = _timesteps(sched, sched.set_timesteps(steps))
    kept = int((timesteps < cutoff(sched, fraction)).sum())
    if sched.order == 2 and kept % 2 == 0:
        kept += 1
    if kept == 0:
        raise ValueError(f"denoising_start={fraction:g} leaves none of the {steps} steps to run "
                         "(every timestep is above its cutoff): lower it or add steps")
    start, rest = divmod(len(timesteps) - kept, sched.order)
    # Our per-start states reproduce diffusers' strength cut; a cut that is not one of them
    # would need a state we do not build.
    if rest or start >= steps or sched.num_evaluations(
            sched.set_timesteps(steps, strength_for_start(steps, start))) != kept:
        raise ValueError(f"the {sched.name} scheduler cannot start at denoising_start="
                         f"{fraction:g} with {steps} steps")
    return start


def denoising_end_stop(sched: Scheduler, steps: int, start: int, fraction: float) -> int:
    """The evaluation (index in the full ``steps``-step schedule) before which a run from
    ``start`` stops for ``denoising_end=fraction``: diffusers runs the evaluations whose
    timestep is at or above the cutoff."""
    full = sched.set_timesteps(steps)
    run = full if start == 0 else sched.set_timesteps(steps, strength_for_start(steps, start))
    timesteps = _timesteps(sched, run)
    kept = int((timesteps >= cutoff(sched, fraction)).sum())
    if kept == 0:
        raise ValueError(f"denoising_end={fraction:g} stops before the first of the steps that "
                         "run: raise it")
    return sched.num_evaluations(full) - len(timesteps) + kept
