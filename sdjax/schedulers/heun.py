"""Heun's second-order method on the sigma ODE (Karras et al. 2022, Algorithm 1), as diffusers'
HeunDiscreteScheduler: 2N - 1 model evaluations for N steps, the last step plain Euler.

Even evaluations (counted from the state's first) are Euler predictor steps, odd ones the
trapezoidal corrector that restarts from the predictor's origin; both are selected with the
traced loop index."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers import sigmas as sig
from sdjax.schedulers.common import (
    check_history,
    check_steps,
    history,
    scalar_divide,
    start_index,
)


@flax.struct.dataclass
class HeunState:
    timesteps: jax.Array  # (M,) float32
    init_sigma: jax.Array
    start_coefs: jax.Array
    input_div: jax.Array  # (M,)
    sigma: jax.Array  # (M,) the sigma the model output is interpreted at
    v: jax.Array  # (M, 2)
    dt: jax.Array  # (M,) the predictor's sigma increment (repeated for its corrector)
    predictor: jax.Array  # (M,) bool
    derivative: jax.Array  # (1, *shape) the predictor's slope
    origin: jax.Array  # (1, *shape) the predictor's starting sample


@dataclasses.dataclass(frozen=True, kw_only=True)
class Heun(sig.SigmaScheduler):
    use_karras_sigmas: bool
    clip_sample: bool
    clip_sample_range: float

    name: ClassVar[str] = "heun"
    order: ClassVar[int] = 2
    defaults: ClassVar[dict[str, Any]] = {
        **sig.SIGMA_DEFAULTS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
    }
    fixed: ClassVar[dict[str, Any]] = {"use_exponential_sigmas": False, "use_beta_sigmas": False}

    def set_timesteps(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        sample_shape: tuple[int, ...] | None = None,
    ) -> HeunState:
        n = num_inference_steps
        check_steps(n, self.num_train_timesteps)
        timesteps, sigmas = sig.sigma_schedule(self, n, use_karras_sigmas=self.use_karras_sigmas)
        # Every intermediate sigma is visited twice: predictor to it, corrector at it.
        sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        timesteps = np.concatenate([timesteps[:1], timesteps[1:].repeat(2)])
        begin = self.order * start_index(n, strength)
        g = np.arange(begin, len(timesteps))
        predictor = (g - begin) % 2 == 0
        # A corrector reuses its predictor's dt = sigma_here - sigma_before.
        before = sigmas[np.maximum(g - 1, 0)]
        dt = np.where(predictor, sigmas[g + 1] - sigmas[g], sigmas[g] - before)
        return HeunState(
            **sig.common_fields(self.timestep_spacing, timesteps, sigmas, begin),
            dt=jnp.asarray(dt),
            predictor=jnp.asarray(predictor),
            derivative=history(sample_shape, 1),
            origin=history(sample_shape, 1),
        )

    def step(
        self,
        state: HeunState,
        i: jax.Array,
        model_output: jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, HeunState]:
        check_history(state.origin, sample, self.name)
        sigma = state.sigma[i]
        x = sample.astype(jnp.float32)
        out = model_output.astype(jnp.float32)
        x0 = sig.x0_from_sigma(self.prediction_type, out, x, sigma, state.v[i])
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        slope = scalar_divide(x - x0, sigma)
        predictor = state.predictor[i]
        derivative = jnp.where(predictor, slope, (state.derivative[0] + slope) * 0.5)
        origin = jnp.where(predictor, x, state.origin[0])
        prev = origin + derivative * state.dt[i]
        state = state.replace(
            derivative=jnp.where(predictor, slope, state.derivative[0])[None],
            origin=origin[None],
        )
        return prev.astype(sample.dtype), state
