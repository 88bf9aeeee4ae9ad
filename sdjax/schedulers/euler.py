"""Euler and Euler ancestral ("Euler a") steps on the sigma ODE/SDE (Karras et al. 2022,
k-diffusion), as diffusers' EulerDiscreteScheduler and EulerAncestralDiscreteScheduler."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers import sigmas as sig
from sdjax.schedulers.common import check_steps, normal_like, start_index


@flax.struct.dataclass
class EulerState:
    timesteps: jax.Array  # (M,) float32
    init_sigma: jax.Array
    start_coefs: jax.Array
    input_div: jax.Array  # (M,)
    sigma: jax.Array  # (M,)
    v: jax.Array  # (M, 2)
    dt: jax.Array  # (M,) sigma_next (or sigma_down) - sigma
    noise_std: jax.Array  # (M,) sigma_up; zero for the deterministic sampler


def euler_step(
    sched: sig.SigmaScheduler, state: EulerState, i: jax.Array, model_output: jax.Array,
    sample: jax.Array, noise: jax.Array | None,
) -> jax.Array:
    sigma = state.sigma[i]
    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    x0 = sig.x0_from_sigma(sched.prediction_type, out, x, sigma, state.v[i])
    # Scalars first: XLA rewrites a division by a broadcast scalar in some compilations
    # and not others (docs/tpu-gpu.md#reproducibility).
    prev = x + (x - x0) * (state.dt[i] / sigma)
    if noise is not None:
        prev = prev + noise.astype(jnp.float32) * state.noise_std[i]
    return prev.astype(sample.dtype)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Euler(sig.SigmaScheduler):
    interpolation_type: str
    use_karras_sigmas: bool
    sigma_min: float | None
    sigma_max: float | None
    timestep_type: str
    final_sigmas_type: str

    name: ClassVar[str] = "euler"
    defaults: ClassVar[dict[str, Any]] = {
        **sig.SIGMA_DEFAULTS,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    fixed: ClassVar[dict[str, Any]] = {"use_exponential_sigmas": False, "use_beta_sigmas": False}

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, allowed in (
            ("interpolation_type", ("linear", "log_linear")),
            ("timestep_type", ("discrete", "continuous")),
            ("final_sigmas_type", ("zero", "sigma_min")),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"euler: {key} must be one of {allowed}")

    def set_timesteps(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        sample_shape: tuple[int, ...] | None = None,
    ) -> EulerState:
        check_steps(num_inference_steps, self.num_train_timesteps)
        timesteps, sigmas = sig.sigma_schedule(
            self,
            num_inference_steps,
            zero_snr_floor=True,
            interpolation_type=self.interpolation_type,
            use_karras_sigmas=self.use_karras_sigmas,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            final_sigmas_type=self.final_sigmas_type,
        )
        if self.timestep_type == "continuous" and self.prediction_type == "v_prediction":
            timesteps = np.float32(0.25) * np.log(sigmas[:-1])
        begin = start_index(num_inference_steps, strength)
        m = len(timesteps) - begin
        return EulerState(
            **sig.common_fields(self.timestep_spacing, timesteps, sigmas, begin),
            dt=jnp.asarray(sigmas[begin + 1 : begin + m + 1] - sigmas[begin : begin + m]),
            noise_std=jnp.asarray(np.zeros(m, np.float32)),
        )

    def step(
        self,
        state: EulerState,
        i: jax.Array,
        model_output: jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, EulerState]:
        return euler_step(self, state, i, model_output, sample, None), state


@dataclasses.dataclass(frozen=True, kw_only=True)
class EulerAncestral(sig.SigmaScheduler):
    name: ClassVar[str] = "euler_a"
    stochastic: ClassVar[bool] = True
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")
    defaults: ClassVar[dict[str, Any]] = {**sig.SIGMA_DEFAULTS, "rescale_betas_zero_snr": False}

    def set_timesteps(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        *,
        sample_shape: tuple[int, ...] | None = None,
    ) -> EulerState:
        n = num_inference_steps
        check_steps(n, self.num_train_timesteps)
        timesteps, sigmas = sig.sigma_schedule(self, n, zero_snr_floor=True)
        begin = start_index(n, strength)
        # Split the move to sigma_to into a deterministic part down to sigma_down and fresh
        # noise of std sigma_up, with sigma_down**2 + sigma_up**2 = sigma_to**2.
        s_from, s_to = sigmas[begin:-1], sigmas[begin + 1 :]
        from2, to2 = s_from * s_from, s_to * s_to
        up = np.sqrt(to2 * (from2 - to2) / from2)
        down = np.sqrt(to2 - up * up)
        return EulerState(
            **sig.common_fields(self.timestep_spacing, timesteps, sigmas, begin),
            dt=jnp.asarray(down - s_from),
            noise_std=jnp.asarray(up),
        )

    def step(
        self,
        state: EulerState,
        i: jax.Array,
        model_output: jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        *,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, EulerState]:
        """One ancestral step; `noise` (standard normal, like sample) replaces the draw from
        `key`."""
        if noise is None:
            noise = normal_like(key, sample)
        return euler_step(self, state, i, model_output, sample, noise), state
