"""DDPM (Ho et al. 2020) ancestral sampling over a strided subset of the training timesteps."""

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
    normal_like,
    start_index,
)
from sdjax.schedulers.ddim import x0_and_eps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@flax.struct.dataclass
class DDPMState:
    timesteps: jax.Array  # (M,) int32
    init_sigma: jax.Array
    start_coefs: jax.Array
    coefs: jax.Array  # (M, 5): sqrt(a_t), sqrt(1 - a_t), x0 coef, x_t coef, noise std
    noisy: jax.Array  # (M,) bool: the reference adds noise only while t > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDPM(Scheduler):
    variance_type: str
    clip_sample: bool
    clip_sample_range: float

    name: ClassVar[str] = "ddpm"
    stochastic: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    fixed: ClassVar[dict[str, Any]] = {"thresholding": False}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"ddpm: variance_type {self.variance_type!r} is not supported; "
                f"use one of {VARIANCE_TYPES}"
            )

    def set_timesteps(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        sample_shape: tuple[int, ...] | None = None,
    ) -> DDPMState:
        n = num_inference_steps
        check_steps(n, self.num_train_timesteps)
        full = leading_trailing_linspace(
            self.timestep_spacing, self.num_train_timesteps, n, self.steps_offset,
            round_linspace=True,
        ).astype(np.int64)
        # The previous timestep is the next entry of the full schedule (even for img2img).
        prev = np.concatenate([full[1:], [-1]])
        first = start_index(n, strength)
        t, prev = full[first:], prev[first:]
        ac = self.schedule.alphas_cumprod
        one = np.float32(1.0)
        a_t = ac[t]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], one)
        b_t, b_prev = one - a_t, one - a_prev
        alpha = a_t / a_prev
        beta = one - alpha
        variance = np.maximum(b_prev / b_t * beta, np.float32(1e-20))
        if self.variance_type == "fixed_small":
            std = np.sqrt(variance)
        elif self.variance_type == "fixed_small_log":
            std = np.exp(np.float32(0.5) * np.log(variance))
        else:
            std = np.sqrt(beta)
        x0_coef = np.sqrt(a_prev) * beta / b_t
        x_coef = np.sqrt(alpha) * b_prev / b_t
        coefs = np.stack([np.sqrt(a_t), np.sqrt(b_t), x0_coef, x_coef, std], axis=1)
        return DDPMState(
            timesteps=jnp.asarray(np.asarray(t, np.int32)),
            init_sigma=jnp.float32(1.0),
            start_coefs=jnp.asarray(f32([coefs[0, 0], coefs[0, 1]])),
            coefs=jnp.asarray(f32(coefs)),
            noisy=jnp.asarray(t > 0),
        )

    def step(
        self,
        state: DDPMState,
        i: jax.Array,
        model_output: jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, DDPMState]:
        """One ancestral step. `noise` (standard normal, like sample) replaces the draw from
        `key`; the pipeline passes keys, tests pass the reference's noise."""
        sqrt_a, sqrt_b, x0_coef, x_coef, std = (state.coefs[i, k] for k in range(5))
        out = model_output.astype(jnp.float32)
        x = sample.astype(jnp.float32)
        x0, _ = x0_and_eps(self.prediction_type, out, x, sqrt_a, sqrt_b)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        prev = x0_coef * x0 + x_coef * x
        if noise is None:
            noise = normal_like(key, sample)
        prev = jnp.where(state.noisy[i], prev + std * noise.astype(jnp.float32), prev)
        return prev.astype(sample.dtype), state
