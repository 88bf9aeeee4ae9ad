"""DDIM (Song et al. 2021) with eta = 0, the deterministic sampler diffusers' pipelines run."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers.common import (
    Scheduler,
    check_steps,
    f32,
    leading_trailing_linspace,
    scalar_divide,
    start_index,
)


@flax.struct.dataclass
class DDIMState:
    timesteps: jax.Array  # (M,) int32
    init_sigma: jax.Array
    start_coefs: jax.Array
    coefs: jax.Array  # (M, 4): sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev)


def x0_and_eps(
    prediction_type: str, out: jax.Array, x: jax.Array, sqrt_a: jax.Array, sqrt_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Predicted clean sample and noise from a model output, for x = sqrt_a x0 + sqrt_b eps."""
    if prediction_type == "epsilon":
        return scalar_divide(x - sqrt_b * out, sqrt_a), out
    if prediction_type == "sample":
        return out, scalar_divide(x - sqrt_a * out, sqrt_b)
    return sqrt_a * x - sqrt_b * out, sqrt_a * out + sqrt_b * x


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDIM(Scheduler):
    set_alpha_to_one: bool
    clip_sample: bool
    clip_sample_range: float

    name: ClassVar[str] = "ddim"
    defaults: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    fixed: ClassVar[dict[str, Any]] = {"thresholding": False}

    def set_timesteps(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        sample_shape: tuple[int, ...] | None = None,
    ) -> DDIMState:
        n = num_inference_steps
        check_steps(n, self.num_train_timesteps)
        t = leading_trailing_linspace(
            self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset,
            round_linspace=True,
        ).astype(np.int64)[start_index(n, strength) :]
        prev = t - self.num_train_timesteps // n
        ac = self.schedule.alphas_cumprod
        final = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        a_t = ac[t]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
        one = np.float32(1.0)
        # eta = 0: the noise term std = 0 * sqrt(variance) vanishes from 1 - a_prev - std**2.
        coefs = np.stack(
            [np.sqrt(a_t), np.sqrt(one - a_t), np.sqrt(a_prev), np.sqrt(one - a_prev)], axis=1
        )
        return DDIMState(
            timesteps=jnp.asarray(np.asarray(t, np.int32)),
            init_sigma=jnp.float32(1.0),
            start_coefs=jnp.asarray(f32([coefs[0, 0], coefs[0, 1]])),
            coefs=jnp.asarray(f32(coefs)),
        )

    def step(
        self,
        state: DDIMState,
        i: jax.Array,
        model_output: jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, DDIMState]:
        sqrt_a, sqrt_b, sqrt_a_prev, sqrt_b_prev = (state.coefs[i, k] for k in range(4))
        out = model_output.astype(jnp.float32)
        x = sample.astype(jnp.float32)
        x0, eps = x0_and_eps(self.prediction_type, out, x, sqrt_a, sqrt_b)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        prev = sqrt_a_prev * x0 + sqrt_b_prev * eps
        return prev.astype(sample.dtype), state
